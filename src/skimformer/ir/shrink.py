"""Shrink the token axis at one point of a graph and make everything downstream follow.

This is the rewrite every token-reduction pass shares. A pass supplies the reduction itself
(which tokens survive, how the others are folded in); this module finds what depends on the
token count by propagating the token axis forward (never by matching sizes) and rewrites it:

- side inputs that meet the token axis downstream (the `[B, 1, N, N]` attention mask built
  before the first block, position tensors) are gathered with the same indices, along every
  dimension that lines up with the token axis, the mask's key dimension included;
- size arguments of reshapes and expands along the token axis take the new count: an int in a
  static program, the `sym_size` of the reduced tensor in a dynamic one;
- a reduction already restored at an output (`skim::restore_tokens`) composes its index map;
- per-token outputs are restored to the original tokens, each dropped or merged token taking
  its representative's value, so outputs keep their shapes and meaning; outputs the caller names
  in `keep_reduced` (a decoder's KV cache after prompt pruning) stay reduced.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Collection

import sympy
import torch
import torch.fx as fx

from skimformer.errors import UserError
from skimformer.ir.attention import sdpa_mask
from skimformer.ir.graph import op_name, shape
from skimformer.ir.sizes import same_size
from skimformer.ir.token_axis import RESHAPES, Axis, dim_map, propagate

SIZED = RESHAPES | {"expand", "new_zeros", "new_ones", "new_empty", "new_full"}
SKIM = torch.ops.skim


@dataclass
class Reduction:
    """What a reduction inserted: the reduced tensor, its token count (an int when static,
    None when symbolic), indices `[B, K]` into the old tokens for side inputs (a fused token
    borrows a kept token's), and `[B, N]` sources: each old token's index in the new set."""

    x: fx.Node
    count: int | None
    side_index: fx.Node
    sources: fx.Node
    nodes: set


def _token_dims(user: fx.Node, arg: fx.Node, axis: Axis, downstream: dict) -> list[int]:
    """Dimensions of side input `arg` that index the tokens `user` computes with."""
    arg_shape = shape(arg)
    if arg_shape is None:
        return []
    same = [i for i, s in enumerate(arg_shape) if same_size(s, axis.n)]
    dims = [i for i, j in (dim_map(user, arg) or {}).items() if j == axis.dim and i in same]
    if op_name(user) == "scaled_dot_product_attention" and arg is sdpa_mask(user) and user.args[1] in downstream:
        last = len(arg_shape) - 1
        if last in same and last not in dims:
            dims.append(last)  # the key axis, contracted against the (reduced) keys
    return dims


def _new_size(entry, axis: Axis, red: Reduction, size_node: fx.Node):
    """The replacement for one size argument along the token axis, or `entry` unchanged."""
    if isinstance(entry, fx.Node):
        return size_node if axis.plain else entry
    if not isinstance(entry, int) or entry == -1 or red.count is None:
        return entry
    old = sympy.sympify(axis.outer * axis.n * axis.inner)
    if old.is_Integer and entry == int(old):
        return int(sympy.sympify(axis.outer * red.count * axis.inner))
    return entry


def shrink_tokens(graph: fx.Graph, point: fx.Node, axis: Axis, reduce, keep_reduced: Collection[int] = ()) -> Reduction:
    """Insert `reduce(graph, point) -> Reduction` after `point` and rewrite what follows.

    `keep_reduced`: positions among the output node's leaves that are returned reduced rather
    than restored to the original tokens."""
    downstream = propagate(point, axis)
    restores = [n for n in graph.nodes if n.target is SKIM.restore_tokens.default and n.args[0] in downstream]
    downstream.pop(point)
    with graph.inserting_before(point.next):  # in order, right after the point
        red = reduce(graph, point)
    for user in list(point.users):
        if user not in red.nodes:
            user.replace_input_with(point, red.x)
    with graph.inserting_after(red.x):
        size_node = graph.call_function(torch.ops.aten.sym_size.int, (red.x, axis.dim))
    gathered: dict[tuple, fx.Node] = {}
    output = next(n for n in graph.nodes if n.op == "output")
    for restore in restores:
        with graph.inserting_before(restore):  # an earlier reduction's map, composed with this one
            composed = graph.call_function(torch.ops.aten.gather.default, (red.sources, 1, restore.args[1]))
        restore.update_arg(1, composed)
    for user in [n for n in graph.nodes if n in downstream]:
        ax = downstream[user]
        for arg in list(user.all_input_nodes):
            if arg in downstream or arg in red.nodes or arg is point:
                continue
            dims = _token_dims(user, arg, ax, downstream)
            if not dims:
                continue
            key = (arg, tuple(dims))
            if key not in gathered:
                node = arg
                with graph.inserting_before(user):
                    for d in dims:
                        node = graph.call_function(SKIM.gather_tokens.default, (node, red.side_index, d))
                gathered[key] = node
            user.replace_input_with(arg, gathered[key])
        if op_name(user) in SIZED and len(user.args) > 1 and isinstance(user.args[1], (list, tuple)):
            folded = user.args[1][ax.dim] if ax.dim < len(user.args[1]) else None
            # -1 (GPT-2's Conv1D: view(x, [-1, C])) follows the new count by itself
            if not ax.plain and red.count is None and isinstance(folded, fx.Node):
                raise UserError(f"{user.name} folds the token axis into another dimension in a dynamic program; "
                                "export with --static to reduce tokens before it")
            sizes = list(user.args[1])
            if ax.dim < len(sizes):
                sizes[ax.dim] = _new_size(sizes[ax.dim], ax, red, size_node)
                user.update_arg(1, sizes)
    downstream[red.x] = Axis(axis.dim, axis.n)  # the point may itself be an output
    _restore_outputs(graph, output, downstream, red, set(keep_reduced))
    return red


def _restore_outputs(graph: fx.Graph, output: fx.Node, downstream: dict, red: Reduction,
                     keep_reduced: set[int] = frozenset()) -> None:
    leaves = output.args[0]
    restored = []
    for i, leaf in enumerate(leaves if isinstance(leaves, (list, tuple)) else [leaves]):
        ax = downstream.get(leaf) if isinstance(leaf, fx.Node) else None
        if ax is not None and ax.plain and i not in keep_reduced:
            with graph.inserting_before(output):
                leaf = graph.call_function(SKIM.restore_tokens.default, (leaf, red.sources, ax.dim))
        restored.append(leaf)
    output.args = (type(leaves)(restored) if isinstance(leaves, (list, tuple)) else restored[0],)
