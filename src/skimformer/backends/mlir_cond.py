"""`torch.cond` (the exit passes' control flow) through torch-mlir and IREE.

torch-mlir 20261001's FX importer imports a higher-order op by calling its importer's method
`_import_hop_NAME`, and has one for `while_loop` but none for `cond`. `install_cond_import` adds
it: the branches are already imported as private functions (the importer imports every child
graph module first), so `cond` becomes `torch.prim.If` whose regions call them. torch-mlir lowers
`torch.prim.If` to `scf.if` in every dialect it writes, and IREE compiles that as a branch: only
the branch taken runs.

One repair goes with it (`select_constant_results`): a result that both branches take from
outside (a constant such as the exit depth, or an operand) is folded by MLIR's canonicalizer into
an `arith.select` on tensors, which torch-mlir's linalg-on-tensors contract refuses. Such results
are chosen outside the cond with `aten.where` instead, and leave the branches."""
from __future__ import annotations

import torch
from torch.export import ExportedProgram

COND = torch.ops.higher_order.cond


def install_cond_import() -> None:
    """Give torch-mlir's graph importer its `cond` import (once per process)."""
    from torch_mlir.extras.fx_importer import GraphNodeImporter

    if not hasattr(GraphNodeImporter, "_import_hop_cond"):
        GraphNodeImporter._import_hop_cond = _import_hop_cond


def _import_hop_cond(self, loc, node: torch.fx.Node, hop) -> None:
    """`cond(pred, true_graph, false_graph, operands)` as `torch.prim.If` on `pred`, each region
    calling its branch's function on the operands and yielding what it returns."""
    from torch_mlir.ir import Block, FlatSymbolRefAttr, InsertionPoint, Operation

    pred, true_graph, false_graph, operands = node.args
    root = node.graph.owning_module
    callees = [self.fx_importer._graph_module_to_func_name[id(getattr(root, ref.target))]
               for ref in (true_graph, false_graph)]
    values = [self._import_argument(loc, operand) for operand in operands]
    result_types = [self._cc.value_info_to_type(value) for value in node.meta["val"]]
    flag = Operation.create("torch.aten.Bool.Tensor", results=[self._cc.torch_bool_type],
                            operands=[self._import_argument(loc, pred)], loc=loc).result
    branch = Operation.create("torch.prim.If", results=result_types, operands=[flag], regions=2, loc=loc)
    for region, callee in zip(branch.regions, callees):
        with InsertionPoint(Block.create_at_start(region, [])):
            call = Operation.create("func.call", attributes={"callee": FlatSymbolRefAttr.get(callee)},
                                    results=result_types, operands=values, loc=loc)
            Operation.create("torch.prim.If.yield", results=[], operands=list(call.results), loc=loc)
    self._multi_result_nodes.add(node)
    for index, value in enumerate(branch.results):
        self.bind_node_value(node, value, index)


def select_constant_results(ep: ExportedProgram) -> None:
    """Each cond result that both branches take from outside (module docstring) becomes
    `where(pred, if_true, if_false)` beside the cond, and is dropped from its branches."""
    for node in [n for n in ep.graph.nodes if n.op == "call_function" and n.target is COND]:
        pred, true_graph, false_graph, operands = node.args
        branches = [getattr(ep.graph_module, ref.target) for ref in (true_graph, false_graph)]
        results = [list(branch.graph.output_node().args[0]) for branch in branches]
        outside = [i for i in range(len(results[0])) if all(_from_outside(r[i]) for r in results)]
        if not isinstance(pred, torch.fx.Node) or not outside or len(outside) == len(results[0]):
            continue  # a Python predicate has no tensor to select on; a cond keeps one result
        _select_outside(ep.graph, node, outside, results, branches)
        ep.graph_module.recompile()


def _from_outside(value) -> bool:
    """A branch result that reads nothing computed in the branch: an operand, or a constant op."""
    if not isinstance(value, torch.fx.Node):
        return False
    return value.op == "placeholder" or (
        value.op == "call_function" and not value.all_input_nodes
        and isinstance(value.target, torch._ops.OpOverload) and not value.target._schema.is_mutable)


def _select_outside(graph: torch.fx.Graph, node: torch.fx.Node, outside: list[int],
                    results: list[list[torch.fx.Node]], branches: list[torch.fx.GraphModule]) -> None:
    pred, _, _, operands = node.args
    readers = {user.args[1]: user for user in node.users}  # getitem(cond, index)
    for index in outside:
        with graph.inserting_before(node):
            chosen = [_copied_outside(graph, r[index], branch, operands) for r, branch in zip(results, branches)]
        if index in readers:  # the reader becomes the where, keeping its name (outputs are named)
            reader = readers.pop(index)
            reader.target, reader.args = torch.ops.aten.where.self, (pred, *chosen)
    kept = [i for i in range(len(results[0])) if i not in outside]
    for branch, result in zip(branches, results):
        branch.graph.output_node().args = (tuple(result[i] for i in kept),)
        branch.graph.eliminate_dead_code()
        branch.recompile()
    node.meta["val"] = tuple(node.meta["val"][i] for i in kept)
    for new_index, old_index in enumerate(kept):
        if old_index in readers:
            readers[old_index].args = (node, new_index)


def _copied_outside(graph: torch.fx.Graph, value: torch.fx.Node, branch: torch.fx.GraphModule,
                    operands) -> torch.fx.Node:
    """The outer graph's node for a branch result `_from_outside` accepted."""
    if value.op == "placeholder":
        placeholders = [n for n in branch.graph.nodes if n.op == "placeholder"]
        return operands[placeholders.index(value)]
    copy = graph.call_function(value.target, value.args, value.kwargs)
    copy.meta["val"] = value.meta["val"]
    return copy
