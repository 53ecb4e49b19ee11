"""Decompose chosen ops of a program one node at a time, instead of tracing the whole program again.

`ExportedProgram.run_decompositions` retraces every node with fake tensors, seconds on a small
program, when only the few nodes a pass inserted (skim ops) need replacing. Here each such node's
decomposition is traced alone, on the node's own fake inputs and symbolic sizes, and its nodes are
put in its place, on a copy of the graph (cond branches included); the weights and the signature
are the program's. Backends that lower through a whole-program trace of their own (the ONNX
exporter, AOTInductor) call it before that trace.
"""
from __future__ import annotations

import copy
import re
from typing import Callable

import torch
import torch.fx as fx
import torch.utils._pytree as pytree

from skimformer.ir.rewrite import on_graph


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


def _spelling(node: fx.Node) -> str:
    """A node's op, constant arguments, and its operands' shapes (with their symbols) and dtypes."""
    def spelled(a):
        if isinstance(a, fx.Node):
            val = a.meta["val"]
            return f"T{tuple(val.shape)}{val.dtype}" if isinstance(val, torch.Tensor) else f"S{val}"
        return repr(a)

    return f"{node.target}" + repr(pytree.tree_map(spelled, (node.args, node.kwargs)))


def _signature(spelling: str) -> str:
    """What a node's decomposition depends on: its spelling with the size symbols numbered by
    first appearance. Every layer's cache op in a decoder has the same one (on sizes of its own,
    or the same sizes), so one trace serves them all: each trace takes about a second on a
    30-layer model's symbolic sizes."""
    numbers: dict[str, str] = {}
    return re.sub(r"\b[su]\d+\b", lambda m: numbers.setdefault(m.group(), f"#{len(numbers)}"), spelling)


def _inline(graph: fx.Graph, node: fx.Node, sub: fx.GraphModule, resized: bool) -> None:
    """Put `sub`'s nodes in place of `node`, which it computes from `node`'s operands. A `sub`
    traced on another node whose operands have other sizes (`resized`) has those sizes in its
    fake values: they are computed again from `node`'s operands."""
    from torch._guards import detect_fake_mode

    operands = [a for a in pytree.tree_leaves((node.args, node.kwargs)) if isinstance(a, fx.Node)]
    remaining, env = iter(operands), {}
    val = lambda a: a.meta["val"]  # noqa: E731
    with graph.inserting_before(node), detect_fake_mode([val(a) for a in operands]):
        for inner in sub.graph.nodes:
            if inner.op == "placeholder":
                env[inner] = next(remaining)
            elif inner.op == "output":
                result = pytree.tree_map(lambda a: env[a] if isinstance(a, fx.Node) else a, inner.args[0])
            else:
                copied = env[inner] = graph.node_copy(inner, lambda a: env[a])
                if resized:  # node_copy gave it a meta dict of its own
                    copied.meta["val"] = copied.target(*fx.map_arg(copied.args, val),
                                                       **fx.map_arg(copied.kwargs, val))
    if isinstance(result, (tuple, list)):
        for user in list(node.users):  # multi-output ops are read through getitem
            user.replace_all_uses_with(result[user.args[1]])
            graph.erase_node(user)
    else:
        node.replace_all_uses_with(result)
    graph.erase_node(node)


def decomposed_node_by_node(ep: torch.export.ExportedProgram, ops: set, table: dict,
                            edit: Callable[[fx.Graph], None] | None = None) -> torch.export.ExportedProgram:
    """`ep` on a copy of its graph with every node calling one of `ops` replaced by its traced
    decomposition from `table`, then changed in place by `edit` when given (the inlined nodes
    too); the outputs are renamed where a replaced node was one. Raises what tracing a node raises."""
    gm = copy.deepcopy(ep.graph_module)  # graphs and branch modules; weights are inputs, not attributes
    traced: dict[str, tuple[fx.GraphModule, str]] = {}
    for module in gm.modules():
        if isinstance(module, fx.GraphModule):
            _decompose_graph(module.graph, ops, table, traced)
            if edit is not None:
                edit(module.graph)
            module.graph.lint()
            module.recompile()
    return on_graph(ep, gm)


def _decompose_graph(graph: fx.Graph, ops: set, table: dict, traced: dict[str, tuple[fx.GraphModule, str]]) -> None:
    """Replace `graph`'s nodes calling `ops`, reusing and adding to the `traced` decompositions.

    The ONNX exporter calls for this with size-oblivious guards (sizes 0 and 1 taken as >= 2),
    under which torch divides by the hint of an empty slice's stride (a cache that has quantized
    nothing yet: 0). The references are written for sizes 0 and 1, so they run with exact guards."""
    with torch.fx.experimental._config.patch(backed_size_oblivious=False):
        for node in [n for n in graph.nodes if n.op == "call_function" and n.target in ops]:
            spelling = _spelling(node)
            key = _signature(spelling)
            if key not in traced:
                traced[key] = (_traced_decomposition(node, table), spelling)
            sub, traced_on = traced[key]
            _inline(graph, node, sub, resized=spelling != traced_on)
