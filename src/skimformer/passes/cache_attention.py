"""Each decoder layer's attention over its cache, in the one form both the KV passes that replace
it and the ONNX Runtime backend's kernel selection need: the queries, the step's own new keys and
values, the past cache inputs, the model's mask and the softmax scale.

A layer qualifies when its cache is the past cache with the step's keys appended (the plain
growing cache of the decoder convention; in a prefill, the step's keys alone) and one fused
attention op reads it with an explicit mask or a causal flag.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch.fx as fx

from skimformer.errors import UserError
from skimformer.ir.attention import FUSED, sdpa_mask
from skimformer.ir.graph import op_name, shape
from skimformer.passes.kv_rewrite import CacheLayer, cache_layers


@dataclass
class CacheAttention:
    layer: CacheLayer
    k_new: fx.Node  # [B, H_kv, S, D]
    v_new: fx.Node
    mask: fx.Node | None  # the model's attention mask ([B|1, 1, S, T], boolean or additive)
    scale: float

    @property
    def index(self) -> int:
        return self.layer.index


def _is_empty(node) -> bool:
    val = node.meta.get("val") if isinstance(node, fx.Node) else None
    return val is not None and any(isinstance(d, int) and d == 0 for d in val.shape)


def _token_parts(node: fx.Node) -> list[fx.Node]:
    """What a cache is concatenated from along its token axis, empty operands dropped (a lazily
    created `transformers` cache starts as an empty tensor that every step concatenates to)."""
    if op_name(node) != "cat" or (node.args[1] if len(node.args) > 1 else 0) not in (2, -2):
        return [node]
    return [part for operand in node.args[0] if not _is_empty(operand) for part in _token_parts(operand)]


def _new_tokens(present: fx.Node, past: fx.Node | None) -> fx.Node | None:
    """The step's own keys (or values): the present cache itself in a prefill, the part after
    the past cache in a decode step; None when the cache is built any other way."""
    parts = _token_parts(present)
    want = 1 if past is None else 2
    if len(parts) != want or (past is not None and parts[0] is not past) or op_name(parts[-1]) == "cat":
        return None
    return parts[-1]


def _why_not(layer: CacheLayer, k_new, v_new) -> str | None:
    site = layer.attention
    if site.kind != "fused" or op_name(site.node) != FUSED:
        return "its attention is not one fused attention op"
    if k_new is None or v_new is None:
        return "its cache is not the past cache with the step's keys appended"
    if (site.node.kwargs.get("dropout_p") or 0) != 0 or len(site.node.args) > 4:
        return "its attention has dropout or positional options"
    if sdpa_mask(site.node) is None and not site.node.kwargs.get("is_causal", False):
        return "its attention is neither masked nor causal"
    qs, ks = shape(site.q), shape(k_new)
    if qs is None or ks is None or len(qs) != 4 or len(ks) != 4 or str(qs[2]) != str(ks[2]) or qs[3] != ks[3]:
        return "its queries and new keys differ in tokens or head size"
    if not isinstance(qs[1], int) or not isinstance(ks[1], int) or qs[1] % ks[1]:
        return "its head counts are not static multiples"
    return None


def cache_attentions(module: fx.GraphModule, pass_name: str) -> tuple[list[CacheAttention], list[str]]:
    """The layers that qualify, and for each other layer (or the whole program) why not."""
    try:
        layers = cache_layers(module, pass_name)
    except UserError as e:
        return [], [str(e)]
    found, skipped = [], []
    for layer in layers:
        k_new, v_new = _new_tokens(layer.key, layer.past_key), _new_tokens(layer.value, layer.past_value)
        reason = _why_not(layer, k_new, v_new)
        if reason:
            skipped.append(f"layer {layer.index}: {reason}")
            continue
        node = layer.attention.node
        scale = node.kwargs.get("scale") or float(shape(layer.attention.q)[3]) ** -0.5
        found.append(CacheAttention(layer, k_new, v_new, sdpa_mask(node), scale))
    return found, skipped


def additive(graph: fx.Graph, mask: fx.Node | None) -> fx.Node | None:
    """The model's attention mask as an additive bias (a boolean mask keeps where True); insert
    before the node that reads it."""
    import torch

    if mask is None or mask.meta["val"].dtype != torch.bool:
        return mask
    return graph.call_function(torch.ops.aten.where.ScalarOther,
                               (graph.call_function(torch.ops.aten.logical_not.default, (mask,)),
                                torch.finfo(torch.float32).min, 0.0))
