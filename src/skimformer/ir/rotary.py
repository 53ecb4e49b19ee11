"""Find the rotary position embedding (RoPE) a program applies to a layer's new keys, and replay
it on other tensors at other positions.

Cached keys are stored rotated. A pass that moves keys to new positions (StreamingLLM keeps
positions within the cache, so keys shift down as older ones are evicted) rotates them again by
the position difference: RoPE is a rotation, so R(p + d) k = R(d) R(p) k. The rotation is not
matched as one library's code: it is the part of the graph between the pre-rotation key `x` and
the cached key that reads the position ids, taken by dataflow:

- tables: nodes that depend on the position ids and on no other input (cos/sin, whatever the
  frequency layout, scaling or partial-rotary split);
- the rotation: nodes between `x` and the cached key, which mix `x` with the tables using only
  elementwise arithmetic and data movement (rotate-half, interleaved and partial forms alike).

Models with learned absolute positions (GPT-2, OPT) add them to the embeddings, so the path from
their tables to a key crosses projections: no rotation is found, and none is needed.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch.fx as fx

from skimformer.ir.graph import ancestors, descendants, op_name

# What a rotation may do to keys and tables: arithmetic, sign, slicing and re-assembly, casts.
ROTATION_OPS = frozenset({
    "mul", "add", "sub", "neg", "slice", "cat", "stack", "view", "reshape", "_unsafe_view", "unsqueeze", "squeeze",
    "flatten", "unflatten", "to", "_to_copy", "type_as", "clone", "contiguous", "expand", "transpose", "permute",
    "select", "getitem", "_assert_tensor_metadata", "alias", "detach"})


@dataclass
class Rotary:
    key: fx.Node  # the key before rotation
    rotated: fx.Node  # the rotated key, as cached
    positions: fx.Node  # the position-ids input the tables read
    nodes: list[fx.Node]  # tables and rotation, in graph order

    def replay(self, graph: fx.Graph, key: fx.Node, positions: fx.Node) -> fx.Node:
        """Insert a copy that rotates `key` by `positions` (at the graph's insertion point)."""
        env = {self.key: key, self.positions: positions}
        for node in self.nodes:
            env[node] = graph.node_copy(node, lambda n: env.get(n, n))
        return env[self.rotated]


def _rotation_inputs(rotated: fx.Node) -> set[fx.Node]:
    """`rotated` and what it reads through rotation ops alone (plus the first node past them):
    earlier layers also feed a key, through projections and attention, and are no part of it."""
    found, todo = {rotated}, [rotated]
    while todo:
        node = todo.pop()
        if op_name(node) not in ROTATION_OPS and node is not rotated:
            continue
        for arg in node.all_input_nodes:
            if arg not in found:
                found.add(arg)
                todo.append(arg)
    return found


def _mixing(tables: set[fx.Node], feeding: set[fx.Node]) -> set[fx.Node]:
    """Nodes that feed the cached key and combine the tables with something else through
    rotation ops alone: walking forward from the tables, a projection or attention ends the walk
    (past it, positions reach later layers' keys through the residual stream, not by rotation)."""
    found, todo = set(), list(tables)
    while todo:
        for user in todo.pop().users:
            if user not in tables and user not in found and user in feeding and op_name(user) in ROTATION_OPS:
                found.add(user)
                todo.append(user)
    return found


def find_rotary(graph: fx.Graph, rotated: fx.Node, positions: fx.Node) -> Rotary | None:
    """The rotation that made `rotated` from a key and `positions`, or None if there is none."""
    others = [n for n in graph.nodes if n.op == "placeholder" and n is not positions]
    feeding = _rotation_inputs(rotated)
    # whole table computations (positions -> frequencies -> cos/sin), which reach the rotation
    # through ops it does not use itself: stopping at `feeding` would replay cos of the old positions
    tables = (descendants([positions]) - descendants(others)) & ancestors([rotated])
    mixing = _mixing(tables, feeding)
    if rotated not in mixing:
        return None
    frontier = {a for m in mixing for a in m.all_input_nodes if a not in mixing | tables and a.op != "get_attr"}
    key = next((x for x in frontier if frontier <= descendants([x]) | {x}), None)
    if key is None:
        return None
    rotation = (descendants([key]) & feeding) | mixing
    if any(op_name(n) not in ROTATION_OPS for n in rotation):
        return None
    members = rotation | tables
    nodes = [n for n in graph.nodes if n in members]
    return Rotary(key=key, rotated=rotated, positions=positions, nodes=nodes)
