"""Spare the ONNX exporter its second trace of the whole program.

`torch.onnx.export` always runs `ExportedProgram.run_decompositions` with its table before it
translates: a new trace of every node with fake tensors, which is most of a build's lowering
time (9 of 16 s for a pruned tiny Llama's prefill). Yet the programs that reach it hold only ops
the exporter translates directly, except

- a few spellings that torch.export's training IR keeps (`to`, `detach_`, `__and__`, shape
  asserts), which are respelled here, and
- skim ops without an ONNX translation of their own, whose decompositions are traced here one
  node at a time (with the program's own fake tensors and symbolic sizes) and put in their place.

This happens on a copy of the graph. When anything else would be decomposed, or a node's
decomposition cannot be traced alone, the exporter decomposes the program as it always does.
"""
from __future__ import annotations

import contextlib
import copy

import torch
import torch.fx as fx
import torch.utils._pytree as pytree

from skimformer.ir.rewrite import on_graph

aten = torch.ops.aten

_CASTS = {aten.to.dtype, aten.to.device, aten.to.dtype_layout}
_IDENTITIES = {aten.detach_.default, aten.detach.default}
_ASSERTS = {aten._assert_tensor_metadata.default, aten._assert_scalar.default, aten._assert_async.msg,
            aten.sym_constrain_range_for_size.default}  # the exporter drops them after decomposing
_RENAMED = {aten.__and__.Tensor: aten.bitwise_and.Tensor, aten.__or__.Tensor: aten.bitwise_or.Tensor}
RESPELLED = _CASTS | _IDENTITIES | _ASSERTS | set(_RENAMED)


def _graphs(ep: torch.export.ExportedProgram) -> list[fx.Graph]:
    """The program's graph and its control-flow branches'."""
    return [m.graph for m in ep.graph_module.modules() if isinstance(m, fx.GraphModule)]


def to_decompose(ep: torch.export.ExportedProgram, implemented: set, table: dict) -> set:
    """The ops of `ep` that the exporter would decompose or could not translate."""
    return {n.target for graph in _graphs(ep) for n in graph.nodes
            if n.op == "call_function" and isinstance(n.target, torch._ops.OpOverload)
            and (n.target in table or n.target not in implemented)}


def _respell(graph: fx.Graph) -> None:
    """Nodes keep their names (the signature names the program's outputs by them)."""
    for node in list(graph.nodes):
        target = node.target if node.op == "call_function" else None
        if target in _ASSERTS:
            graph.erase_node(node)
        elif target in _IDENTITIES:
            node.target, node.args, node.kwargs = aten.clone.default, node.args[:1], {}
        elif target in _CASTS:
            node.target, node.args, node.kwargs = aten._to_copy.default, node.args[:1], {"dtype": node.meta["val"].dtype}
        elif target in _RENAMED:
            node.target = _RENAMED[target]
    graph.lint()


def _traced_decomposition(node: fx.Node, table: dict) -> fx.GraphModule:
    """`table[node.target]` traced on the node's own fake inputs (its tensor and size operands
    become the placeholders, in argument order), decomposed further by `table`."""
    from torch._guards import detect_fake_mode
    from torch.fx.experimental.proxy_tensor import make_fx

    flat, spec = pytree.tree_flatten((node.args, node.kwargs))
    operands = [i for i, a in enumerate(flat) if isinstance(a, fx.Node)]

    def decomposed(*values):
        args = list(flat)
        for i, value in zip(operands, values):
            args[i] = value
        call_args, call_kwargs = pytree.tree_unflatten(args, spec)
        return table[node.target](*call_args, **call_kwargs)

    fakes = [flat[i].meta["val"] for i in operands]
    with detect_fake_mode(fakes):
        return make_fx(decomposed, decomposition_table=table, tracing_mode="real", pre_dispatch=True)(*fakes)


def _inline(graph: fx.Graph, node: fx.Node, sub: fx.GraphModule) -> None:
    """Put `sub`'s nodes in place of `node`, which it computes from `node`'s operands."""
    operands = iter(a for a in pytree.tree_leaves((node.args, node.kwargs)) if isinstance(a, fx.Node))
    env = {}
    with graph.inserting_before(node):
        for inner in sub.graph.nodes:
            if inner.op == "placeholder":
                env[inner] = next(operands)
            elif inner.op == "output":
                result = pytree.tree_map(lambda a: env[a] if isinstance(a, fx.Node) else a, inner.args[0])
            else:
                env[inner] = graph.node_copy(inner, lambda a: env[a])
    if isinstance(result, (tuple, list)):
        for user in list(node.users):  # multi-output ops are read through getitem
            user.replace_all_uses_with(result[user.args[1]])
            graph.erase_node(user)
    else:
        node.replace_all_uses_with(result)
    graph.erase_node(node)


def respelled(ep: torch.export.ExportedProgram, decomposed: set, table: dict) -> torch.export.ExportedProgram:
    """`ep` on a copy of its graph with the RESPELLED ops in the spelling the exporter translates
    and the `decomposed` ops replaced by their traced decompositions (same weights and signature,
    the outputs renamed where a replaced node was one)."""
    gm = copy.deepcopy(ep.graph_module)  # graphs and branch modules; weights are inputs, not attributes
    for module in gm.modules():
        if isinstance(module, fx.GraphModule):
            _respell(module.graph)
            for node in [n for n in module.graph.nodes if n.op == "call_function" and n.target in decomposed]:
                _inline(module.graph, node, _traced_decomposition(node, table))
            module.graph.lint()
            module.recompile()
    return on_graph(ep, gm)


@contextlib.contextmanager
def decompose_only_when_needed():
    """Within the block, the exporter's decomposition step returns the program respelled with
    its skim ops decomposed node by node when nothing else needs decomposing, and decomposes any
    other program as before. A torch whose exporter is laid out differently keeps its own step."""
    try:
        from torch.onnx._internal.exporter import _decomp, _fx_passes
    except ImportError:
        yield
        return
    decompose = getattr(_fx_passes, "decompose_with_registry", None)
    if decompose is None:
        yield
        return

    def when_needed(ep, registry):
        implemented = set(_decomp.get_onnx_implemented_overloads(registry))
        table = _decomp.create_onnx_friendly_decomposition_table(implemented)
        needed = to_decompose(ep, implemented, table) - RESPELLED
        if all(op.namespace == "skim" and op in table for op in needed):
            try:
                plain = respelled(ep, needed, table)
            except Exception:  # noqa: BLE001 - a node that does not trace alone: the exporter's own way
                plain = None
            if plain is not None and not to_decompose(plain, implemented, table):
                return plain
        return decompose(ep, registry)

    _fx_passes.decompose_with_registry = when_needed
    try:
        yield
    finally:
        _fx_passes.decompose_with_registry = decompose
