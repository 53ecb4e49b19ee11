"""Spare the ONNX exporter its second trace of the whole program.

`torch.onnx.export` always runs `ExportedProgram.run_decompositions` with its table before it
translates: a new trace of every node with fake tensors, which is most of a build's lowering
time (9 of 16 s for a pruned tiny Llama's prefill). Yet the programs that reach it hold only ops
the exporter translates directly, except

- a few spellings that torch.export's training IR keeps (`to`, `detach_`, `__and__`, shape
  asserts), which are respelled here, and
- skim ops without an ONNX translation of their own, whose decompositions are traced one node at
  a time and put in their place (`ir.decompose`).

This happens on a copy of the graph. When anything else would be decomposed, or a node's
decomposition cannot be traced alone, the exporter decomposes the program as it always does.
"""
from __future__ import annotations

import torch
import torch.fx as fx

from skimformer.backends.exporter_step import exporter_step_replaced
from skimformer.ir.decompose import decomposed_node_by_node
from skimformer.ir.graph import program_graphs

aten = torch.ops.aten

_CASTS = {aten.to.dtype, aten.to.device, aten.to.dtype_layout}
_IDENTITIES = {aten.detach_.default, aten.detach.default}
_ASSERTS = {aten._assert_tensor_metadata.default, aten._assert_scalar.default, aten._assert_async.msg,
            aten.sym_constrain_range_for_size.default}  # the exporter drops them after decomposing
_RENAMED = {aten.__and__.Tensor: aten.bitwise_and.Tensor, aten.__or__.Tensor: aten.bitwise_or.Tensor}
RESPELLED = _CASTS | _IDENTITIES | _ASSERTS | set(_RENAMED)


def to_decompose(ep: torch.export.ExportedProgram, implemented: set, table: dict) -> set:
    """The ops of `ep` that the exporter would decompose or could not translate."""
    return {n.target for graph in program_graphs(ep) for n in graph.nodes
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


def respelled(ep: torch.export.ExportedProgram, decomposed: set, table: dict) -> torch.export.ExportedProgram:
    """`ep` with the RESPELLED ops in the spelling the exporter translates and the `decomposed`
    ops replaced by their traced decompositions."""
    return decomposed_node_by_node(ep, decomposed, table, edit=_respell)


def decompose_only_when_needed():
    """Within the block, the exporter's decomposition step returns the program respelled with
    its skim ops decomposed node by node when nothing else needs decomposing, and decomposes any
    other program as before."""
    return exporter_step_replaced("decompose_with_registry", _when_needed)


def _when_needed(decompose):
    from torch.onnx._internal.exporter import _decomp

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

    return when_needed
