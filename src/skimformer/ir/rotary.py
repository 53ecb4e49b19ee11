"""Find the rotary position embedding (RoPE) a program applies to a layer's new keys, and replay
it on other tensors at other positions.

Cached keys are stored rotated. A pass that moves keys to new positions (kv-window's sinks, as
tokens after them are evicted) rotates them again by the position difference: RoPE is a
rotation, so R(p + d) k = R(d) R(p) k. The rotation is not
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

import torch
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

    def replay(self, graph: fx.Graph, key: fx.Node, positions: fx.Node, tables: dict | None = None) -> fx.Node:
        """Insert a copy that rotates `key` by `positions` (at the graph's insertion point).
        Replays that pass the same `tables` dict and positions share the copies of the nodes
        that do not read the key, the cos/sin computation layers share in the model too."""
        tables = {} if tables is None else tables
        env = {self.key: key, self.positions: positions}
        reads_key = descendants([self.key])
        for node in self.nodes:
            if node in reads_key:
                env[node] = graph.node_copy(node, lambda n: env.get(n, n))
            else:
                if (node, positions) not in tables:
                    tables[node, positions] = graph.node_copy(node, lambda n: env.get(n, n))
                env[node] = tables[node, positions]
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
    # through ops it does not use itself: stopping at `feeding` would replay cos of the old positions.
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


@dataclass
class RotaryTables:
    """A rotation as the tables a fused kernel takes: `cos`, `sin` `[positions, D/2]`, indexed by
    absolute position, applied to the whole head dim in rotate-half or interleaved form."""
    cos: torch.Tensor
    sin: torch.Tensor
    interleaved: bool


def _standalone(module: fx.GraphModule, rotary: Rotary) -> fx.GraphModule:
    """The rotation as a module of its own, `f(key, positions)`: what it computes from buffers
    alone (inverse frequencies) is copied along; any other input makes it not standalone
    (ValueError)."""
    graph = fx.Graph()
    env = {rotary.key: graph.placeholder("key"), rotary.positions: graph.placeholder("positions")}

    def arg(node: fx.Node) -> fx.Node:
        if node not in env:
            if node.op not in ("get_attr", "call_function"):
                raise ValueError(f"the rotation reads {node.name}")
            env[node] = graph.node_copy(node, arg)
        return env[node]

    for node in rotary.nodes:
        env[node] = graph.node_copy(node, arg)
    graph.output(env[rotary.rotated])
    return fx.GraphModule(module, graph)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool) -> torch.Tensor:
    """`x [..., S, D]` rotated by the tables' rows `cos`, `sin` `[S, D/2]`, in the given form."""
    if interleaved:
        even, odd = x[..., 0::2], x[..., 1::2]
        return torch.stack([even * cos - odd * sin, even * sin + odd * cos], dim=-1).flatten(-2)
    half = x.shape[-1] // 2
    first, second = x[..., :half], x[..., half:]
    return torch.cat([first * cos - second * sin, second * cos + first * sin], dim=-1)


def _unit_responses(function: fx.GraphModule, heads: int, head_dim: int, positions: int, dtype) -> torch.Tensor:
    """`[D, 3, N]`: for each unit key e_i rotated at every position, its own coordinate i, the
    coordinate i + D/2 (rotate-half's partner) and i + 1 (interleaved's partner)."""
    at = torch.arange(positions)[None]
    half = head_dim // 2
    responses = torch.zeros(head_dim, 3, positions, dtype=torch.float64)
    for start in range(0, head_dim, heads):  # the unit keys ride on the head axis, `heads` at a time
        units = range(start, min(start + heads, head_dim))
        probe = torch.zeros(1, heads, positions, head_dim, dtype=dtype)
        for slot, i in enumerate(units):
            probe[0, slot, :, i] = 1
        out = function(probe, at)[0].double()
        for slot, i in enumerate(units):
            responses[i, 0] = out[slot, :, i]
            responses[i, 1] = out[slot, :, (i + half) % head_dim]
            responses[i, 2] = out[slot, :, (i + 1) % head_dim]
    return responses


@torch.no_grad()
def rotary_candidates(module: fx.GraphModule, rotary: Rotary, positions: int) -> list[RotaryTables]:
    """The tables `rotary` would have for positions `0..positions-1` in each standard form
    (rotate-half, interleaved), read off the model's own rotation: unit keys rotated at every
    position. Empty when the rotation cannot be run on its own. Which form, if any, is right
    is for `rotates_by` to say."""
    key = rotary.key.meta["val"]
    heads, head_dim = key.shape[1], key.shape[3]
    if not all(isinstance(d, int) for d in (heads, head_dim)) or head_dim % 2:
        return []
    try:
        responses = _unit_responses(_standalone(module, rotary), heads, head_dim, positions, key.dtype)
    except (ValueError, RuntimeError):  # it reads other inputs, or does not take a one-row batch of this length
        return []
    half = head_dim // 2
    forms = {False: (responses[:half, 0], responses[:half, 1]),  # e_i -> cos at i, sin at i + D/2
             True: (responses[0::2, 0], responses[0::2, 2])}  # e_2j -> cos at 2j, sin at 2j + 1
    return [RotaryTables(cos.T.to(key.dtype).contiguous(), sin.T.to(key.dtype).contiguous(), interleaved)
            for interleaved, (cos, sin) in forms.items()]


@torch.no_grad()
def rotates_by(module: fx.GraphModule, rotary: Rotary, tables: RotaryTables, tolerance: float) -> bool:
    """Whether the model's rotation of random keys, at 256 random positions the tables cover, is
    the tables' rotation: so a rotation of another kind (partial, per head, scaled beyond the
    tables) is never replaced by them."""
    val = rotary.key.meta["val"]
    length = tables.cos.shape[0]
    at = torch.randperm(length, generator=torch.Generator().manual_seed(0))[:256].sort().values
    x = torch.randn(1, val.shape[1], len(at), val.shape[3], generator=torch.Generator().manual_seed(1)).to(val.dtype)
    try:
        want = _standalone(module, rotary)(x, at[None])
    except (ValueError, RuntimeError):
        return False
    got = rotate(x, tables.cos[at], tables.sin[at], tables.interleaved)
    return want.shape == got.shape and torch.allclose(want.double(), got.double(), atol=tolerance, rtol=tolerance)
