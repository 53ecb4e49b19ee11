"""Small, shared views of an ATen FX graph: op names, fake values, module stacks, networkx views.

Every analysis reads the exported graph through these helpers so that the conventions (which
`meta` keys hold what, how an op is named) live in one place.
"""
from __future__ import annotations

import operator
from typing import Iterable

import networkx as nx
import torch
import torch.fx as fx


def op_name(node: fx.Node) -> str:
    """The op's overload-packet name (`linear`, `scaled_dot_product_attention`, `getitem`), or ''."""
    if node.op != "call_function":
        return ""
    target = node.target
    if target is operator.getitem:
        return "getitem"
    packet = getattr(target, "_overloadpacket", None)
    if packet is not None:
        return packet.__name__
    return getattr(target, "__name__", str(target))


def value(node) -> object:
    """The fake value recorded at export (a FakeTensor, SymInt, tuple...), or None."""
    return node.meta.get("val") if isinstance(node, fx.Node) else None


def tensor_value(node) -> torch.Tensor | None:
    v = value(node)
    return v if isinstance(v, torch.Tensor) else None


def shape(node) -> tuple | None:
    v = tensor_value(node)
    return tuple(v.shape) if v is not None else None


def module_stack(node: fx.Node) -> list[tuple[str, str, str]]:
    """`[(call_key, module_path, module_type)]` outermost first.

    The call key is unique per call: a module run several times (ALBERT's shared layer) appears
    with suffixes `@1`, `@2` on later calls, which is what separates its blocks.
    """
    stack = node.meta.get("nn_module_stack") or {}
    out = []
    for key, (path, typ) in stack.items():
        out.append((key, path, typ if isinstance(typ, str) else getattr(typ, "__qualname__", str(typ))))
    return out


def to_networkx(nodes: Iterable[fx.Node]) -> nx.DiGraph:
    """The dataflow DiGraph induced on `nodes` (edges producer -> consumer), labelled by op."""
    members = set(nodes)
    g = nx.DiGraph()
    for node in members:
        g.add_node(node, op=op_name(node))
        g.add_edges_from((src, node) for src in node.all_input_nodes if src in members)
    return g


def _reach(nodes: Iterable[fx.Node], step) -> set[fx.Node]:
    seen, todo = set(), list(nodes)
    while todo:
        for nxt in step(todo.pop()):
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


def descendants(nodes: Iterable[fx.Node]) -> set[fx.Node]:
    """Every node that reads, directly or not, one of `nodes` (not the nodes themselves)."""
    return _reach(nodes, lambda n: n.users)


def ancestors(nodes: Iterable[fx.Node]) -> set[fx.Node]:
    """Every node that `nodes` read, directly or not."""
    return _reach(nodes, lambda n: n.all_input_nodes)


def program_graphs(ep: torch.export.ExportedProgram) -> list[fx.Graph]:
    """The program's graph and those of its submodules (the branches of a torch.cond)."""
    return [m.graph for m in ep.graph_module.modules() if isinstance(m, fx.GraphModule)]


def holds_skim_ops(ep: torch.export.ExportedProgram) -> bool:
    """Whether any graph of the program, cond branches included, calls a `skim` op."""
    return any(str(n.target).startswith("skim.") for graph in program_graphs(ep) for n in graph.nodes)
