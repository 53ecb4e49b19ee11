"""The token-major layout ONNX Runtime's attention kernels read and write (`[B, S, H*D]`, as the
projections write it and the output projection reads it), the moves between it and the
head-major `[B, H, S, D]` a model's attention works in, and the mask as the kernels take it:
shared by the kernel rules, which take the layout the projections already have instead of
transposing to heads and back.
"""
from __future__ import annotations

import torch
import torch.fx as fx
from torch import Tensor

from skimformer.ir.graph import op_name, shape
from skimformer.ir.sizes import same_shape, same_size

aten = torch.ops.aten


def heads_first(x: Tensor, heads: int) -> Tensor:
    return x.unflatten(2, (heads, -1)).transpose(1, 2)


def token_major(graph: fx.Graph, x: fx.Node) -> fx.Node:
    """`x [B,H,S,D]` as `[B,S,H*D]`: the projection it was split from when it is
    `transpose(view(projection, [B,S,H,D]), 1, 2)`, else a transpose and flatten."""
    if op_name(x) == "transpose" and sorted(x.args[1:]) == [1, 2]:
        split = x.args[0]
        source = split.args[0] if op_name(split) in ("view", "reshape", "_unsafe_view") else None
        wanted = shape(x)
        if source is not None and len(shape(source)) == 3 and same_size(shape(source)[2], wanted[1] * wanted[3]) \
                and same_size(shape(source)[1], wanted[2]):
            return source
    return graph.call_function(aten.flatten.using_ints, (graph.call_function(aten.transpose.int, (x, 1, 2)), 2))


def kernel_bias(graph: fx.Graph, mask: fx.Node | None, q: fx.Node, queries: Tensor) -> fx.Node | None:
    """The model's attention mask as the kernels take it: additive, in the queries' dtype, a row
    per query (`[B|1, H|1, S, T]`: a mask broadcast over the queries is expanded). `q` is the
    token-major queries; `queries`, the head-major queries' traced value."""
    from skimformer.passes.cache_attention import additive

    bias = additive(graph, mask, queries.dtype)
    if bias is not None and not same_size(shape(mask)[2], queries.shape[2]):
        steps = graph.call_function(aten.sym_size.int, (q, 1))
        bias = graph.call_function(aten.expand.default, (bias, [-1, -1, steps, -1]))
    return bias


def replace_output(graph: fx.Graph, site: fx.Node, attended: fx.Node, heads: int) -> None:
    """Give the site's readers the op's token-major output: where the model turns attention's
    `[B,H,S,D]` back into `[B,S,H*D]` (shape-keeping views, `transpose(1, 2)`, a copy, a view to
    rank 3) the op's output replaces that whole chain; otherwise it is split into heads again."""
    node = site
    while len(node.users) == 1 and (node is site or (op_name(node) in ("view", "reshape", "_unsafe_view")
                                                     and same_shape(shape(node), shape(node.args[0])))):
        node = next(iter(node.users))
    if op_name(node) == "transpose" and sorted(node.args[1:]) == [1, 2] and len(node.users) == 1:
        merged = next(iter(node.users))
        if op_name(merged) in ("contiguous", "clone") and len(merged.users) == 1:
            merged = next(iter(merged.users))
        if op_name(merged) in ("view", "reshape", "_unsafe_view") and len(shape(merged)) == 3 \
                and same_size(shape(merged)[2], shape(site)[1] * shape(site)[3]):
            merged.replace_all_uses_with(attended)
            return
    with graph.inserting_after(attended):
        split = graph.call_function(aten.unflatten.int, (attended, 2, [heads, -1]))
        with graph.inserting_after(split):
            back = graph.call_function(aten.transpose.int, (split, 1, 2))
    site.replace_all_uses_with(back)
