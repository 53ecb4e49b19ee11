"""Kernel rule: a decoder layer's attention with its cache becomes ONNX Runtime's fused
`com.microsoft.GroupQueryAttention`.

What the exporter writes for one layer of a decode step concatenates the past and new keys
(a full copy of the cache), repeats the KV heads to the query heads (another, larger copy), and
runs unfused attention over them. GroupQueryAttention reads the cache in its `[B, H_kv, T, D]`
layout with the KV heads shared, appends the new keys itself, and, when the engine binds the
same buffer as `past_key` and `present_key`, writes them in place: a step then copies no cache.

The rule works from what `ir` knows (each layer's present and past cache ports and the attention
site that reads them), not from ONNX patterns. Per layer it inserts one
`skim_ort::group_query_attention(q, k_new, v_new, past_key, past_value, bias, scale)` whose
torch definition is the computation it replaces: causal attention over the concatenated cache
plus the model's own additive mask (`bias`, padding and causality as the model built them).
Query rows whose every key is masked (the left padding of a prompt) are unspecified, as they
are for the model: the kernel and torch's attention disagree there, and nothing reads them.

The rotary embedding stays outside the op, exactly as the model computes it, so positions of
left-padded rows and of compressed caches remain the model's own.
"""
from __future__ import annotations

import operator

import torch
import torch.fx as fx
from torch import Tensor

from skimformer.kernels.channel_quant import causal_attention


@torch.library.custom_op("skim_ort::group_query_attention", mutates_args=())
def group_query_attention(q: Tensor, k: Tensor, v: Tensor, past_key: Tensor | None, past_value: Tensor | None,
                          bias: Tensor | None, scale: float) -> tuple[Tensor, Tensor, Tensor]:
    """Causal attention of `q [B,H,S,D]` over the past and new keys `[B,H_kv,*,D]`, plus `bias`
    (`[B|1, 1, S, T]`, additive); returns the output `[B,H,S,D]` and the grown cache."""
    key = k.clone() if past_key is None else torch.cat([past_key, k], dim=2)
    value = v.clone() if past_value is None else torch.cat([past_value, v], dim=2)
    return causal_attention(q, key, value, bias, scale), key, value


@group_query_attention.register_fake
def _(q, k, v, past_key, past_value, bias, scale):
    grown = list(k.shape)
    if past_key is not None:
        grown[2] = past_key.shape[2] + k.shape[2]
    return q.new_empty(q.shape), k.new_empty(grown), v.new_empty(grown)


OP = torch.ops.skim_ort.group_query_attention.default


def fuse_cache_attention(module: fx.GraphModule, graph: fx.Graph) -> int:
    """Rewrite every layer whose cache and attention fit the kernel; returns how many were.

    The layers are found in `module` (the program's `ep.module()`); the rewrite goes into `graph`,
    a copy of the program's lifted graph whose nodes bear the same names (export need not trace
    it again)."""
    from skimformer.passes.cache_attention import additive, cache_attentions

    found, _ = cache_attentions(module, "kernel selection")
    same = {n.name: n for n in graph.nodes}
    node_in = lambda n: n if n is None or isinstance(n, float) else same[n.name]  # noqa: E731
    out = next(n for n in reversed(graph.nodes) if n.op == "output")
    for layer in found:
        site = node_in(layer.layer.attention.node)
        with graph.inserting_before(site):
            node = graph.call_function(OP, (node_in(layer.layer.attention.q), node_in(layer.k_new),
                                            node_in(layer.v_new), node_in(layer.layer.past_key),
                                            node_in(layer.layer.past_value), additive(graph, node_in(layer.mask)),
                                            layer.scale))
            node.meta["skim"] = "kernel-selection"
            attended, key, value = (graph.call_function(operator.getitem, (node, i)) for i in range(3))
        site.replace_all_uses_with(attended)
        out.replace_input_with(node_in(layer.layer.key), key)
        out.replace_input_with(node_in(layer.layer.value), value)
    return len(found)
