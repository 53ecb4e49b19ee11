"""Find attention in an exported graph, in either of the two forms it takes.

Fused: one `aten.scaled_dot_product_attention` node. Eager: `matmul(q, k^T)`, scaled and masked
elementwise, `softmax`, then `matmul(p, v)`. Both are described by one `AttentionSite` so passes
see the same q, k, v, mask whatever form the model was written in.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch.fx as fx

from skimformer.ir.graph import op_name, shape, tensor_value
from skimformer.ir.sizes import describe_size, same_shape

FUSED = "scaled_dot_product_attention"
MATMULS = frozenset({"matmul", "bmm"})
# Elementwise steps between q@k^T and softmax: scaling, masking, casts.
SCORE_STEPS = frozenset({"add", "sub", "mul", "div", "to", "_to_copy", "where", "masked_fill", "type_as",
                         "clone", "contiguous", "tanh"})
# Steps between softmax and p@v.
PROB_STEPS = frozenset({"to", "_to_copy", "dropout", "type_as", "clone", "contiguous", "mul", "masked_fill"})
# Data movement that expands KV heads for grouped-query attention (repeat_kv) or re-lays them out.
HEAD_MOVES = frozenset({"reshape", "view", "_unsafe_view", "expand", "unsqueeze", "clone", "contiguous", "slice", "repeat_interleave",
                        "to", "_to_copy", "_assert_tensor_metadata"})


@dataclass
class AttentionSite:
    """One attention computation: where it is, what feeds it, and its head geometry."""

    kind: str  # "fused" or "eager"
    node: fx.Node  # the SDPA node, or the softmax node of an eager pattern
    output: fx.Node  # the node whose value is attention's output (SDPA, or the p@v matmul)
    q: fx.Node
    k: fx.Node  # keys with their token axis at -2 (un-transposed for eager patterns)
    v: fx.Node
    mask: fx.Node | None
    heads: int | str | None
    kv_heads: int | str | None
    head_dim: int | str | None
    scores: fx.Node | None = None  # eager only: the q@k^T matmul

    def describe(self) -> dict:
        return {"kind": self.kind, "node": self.node.name, "heads": self.heads, "kv_heads": self.kv_heads,
                "head_dim": self.head_dim, "masked": self.mask is not None}


def sdpa_mask(node: fx.Node) -> fx.Node | None:
    """The `attn_mask` argument of a fused attention node, wherever it was passed."""
    return node.args[3] if len(node.args) > 3 else node.kwargs.get("attn_mask")


def set_sdpa_mask(node: fx.Node, mask: fx.Node | None) -> None:
    if len(node.args) > 3:
        node.update_arg(3, mask)
    else:
        node.update_kwarg("attn_mask", mask)


def _kv_heads(k: fx.Node, fused_gqa: bool) -> int | str | None:
    """KV heads before any repeat_kv expansion: walk back through pure data movement."""
    node, last4d = k, k
    while op_name(node) in HEAD_MOVES and node.args and isinstance(node.args[0], fx.Node):
        node = node.args[0]
        if shape(node) is not None and len(shape(node)) == 4:
            last4d = node
    if fused_gqa:
        last4d = k
    s = shape(last4d)
    return describe_size(s[1]) if s is not None and len(s) == 4 else None


def _fused_site(node: fx.Node) -> AttentionSite:
    q, k, v = node.args[:3]
    mask = node.args[3] if len(node.args) > 3 else node.kwargs.get("attn_mask")
    qs = shape(q) or ()
    return AttentionSite(
        kind="fused", node=node, output=node, q=q, k=k, v=v,
        mask=mask if isinstance(mask, fx.Node) else None,
        heads=describe_size(qs[1]) if len(qs) == 4 else None,
        kv_heads=_kv_heads(k, bool(node.kwargs.get("enable_gqa", False))),
        head_dim=describe_size(qs[-1]) if qs else None)


def _walk_back_to_matmul(start: fx.Node) -> tuple[fx.Node | None, fx.Node | None]:
    """From softmax's input back through scaling/masking to q@k^T; also return the mask seen."""
    node, mask = start, None
    while node is not None and op_name(node) not in MATMULS:
        if op_name(node) not in SCORE_STEPS:
            return None, None
        tensors = [a for a in node.args if isinstance(a, fx.Node)]
        chain = [a for a in tensors if tensor_value(a) is not None and tensor_value(a).dim() >= 3]
        # The score path is the operand with the full score shape; any other tensor is the mask.
        main = next((a for a in chain if same_shape(shape(a), shape(node))), chain[0] if chain else None)
        for other in tensors:
            if other is not main and mask is None and op_name(node) in ("add", "where", "masked_fill", "sub"):
                mask = other
        node = main
    return node, mask


def _walk_forward_to_matmul(softmax: fx.Node) -> fx.Node | None:
    node = softmax
    for _ in range(8):
        nxt = [u for u in node.users if op_name(u) in MATMULS and u.args[0] is node]
        if nxt:
            return nxt[0]
        steps = [u for u in node.users if op_name(u) in PROB_STEPS]
        if len(steps) != 1:
            return None
        node = steps[0]
    return None


def _untranspose(kt: fx.Node) -> fx.Node:
    """k^T as written (transpose(-1,-2) or permute); the site records k itself."""
    if op_name(kt) == "transpose":
        r = len(shape(kt))
        dims = {d % r for d in kt.args[1:3]}
        if dims == {r - 1, r - 2}:
            return kt.args[0]
    return kt


def _eager_site(softmax: fx.Node) -> AttentionSite | None:
    qk, mask = _walk_back_to_matmul(softmax.args[0])
    pv = _walk_forward_to_matmul(softmax)
    if qk is None or pv is None:
        return None
    q, k, v = qk.args[0], _untranspose(qk.args[1]), pv.args[1]
    qs, ss = shape(q) or (), shape(softmax) or ()
    return AttentionSite(
        kind="eager", node=softmax, output=pv, q=q, k=k, v=v, mask=mask,
        heads=describe_size(ss[1]) if len(ss) == 4 else None,
        kv_heads=_kv_heads(k, False) if k is not qk.args[1] else None,
        head_dim=describe_size(qs[-1]) if qs else None, scores=qk)


def find_attention(graph: fx.Graph) -> list[AttentionSite]:
    """Every attention site in graph order."""
    sites = []
    for node in graph.nodes:
        name = op_name(node)
        if name == FUSED:
            sites.append(_fused_site(node))
        elif name in ("softmax", "_softmax"):
            site = _eager_site(node)
            if site is not None:
                sites.append(site)
    return sites
