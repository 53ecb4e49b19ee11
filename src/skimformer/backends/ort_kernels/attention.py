"""Kernel rule: a decoder layer's attention with its cache becomes ONNX Runtime's fused
`com.microsoft.GroupQueryAttention`, over a float cache or the per-channel int8/int4 codes of
`kv-quant(scheme=channel)`'s `skim::cache_quant_attention`.

What the exporter writes for one layer of a decode step concatenates the past and new keys
(a full copy of the cache), repeats the KV heads to the query heads (another, larger copy), and
runs unfused attention over them. GroupQueryAttention reads the cache in its `[B, H_kv, T, D]`
layout with the KV heads shared, appends the new keys itself, and, when the engine binds the
same buffer as `past_key` and `present_key`, writes them in place: a step then copies no cache.

The rule works from what `ir` knows (each layer's present and past cache ports, the attention
site that reads them, the rotary embedding), not from ONNX patterns. Per layer it inserts one
`skim_ort::group_query_attention` whose torch definition is the computation it replaces: causal
attention over the concatenated cache plus the model's own additive mask (`bias`, padding and
causality as the model built them). Query rows whose every key is masked (the left padding of a
prompt) are unspecified, as they are for the model: the kernel and torch's attention disagree
there, and nothing reads them.

A decode step is where a small model's time goes to the number of ops rather than to
arithmetic (an ONNX Runtime node costs microseconds however small its tensors), so the rule
also removes what surrounds attention:
- the op reads queries, keys and values token-major (`[B, S, H*D]`), as the projections write
  them, and its output goes straight to the output projection: no head transposes;
- in a step with a past cache the rotary embedding runs inside the op (`do_rotary`, tables read
  off the model's own rotation and checked against it, `ir.rotary.rotary_candidates`), at the
  positions the model rotates at, its position ids.
  A prefill keeps the model's rotation outside the op: the kernel takes only the first position
  of a prompt, and rows of a left-padded prompt start at different positions;
- the kernel's length inputs and the bias are computed once per program, not per layer.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
import torch.fx as fx
from torch import Tensor

from skimformer.backends.ort_kernels.layout import heads_first, kernel_bias, replace_output, token_major
from skimformer.ir.graph import descendants, op_name, shape
from skimformer.ir.rotary import RotaryTables, find_rotary, rotary_candidates, rotates_by, rotate
from skimformer.kernels.channel_quant import cache_quant_attention_ref, causal_attention

aten = torch.ops.aten
# Rotary tables cover positions [0, ROTARY_POSITIONS): 8 MB of tables for a 64-wide head. ONNX
# Runtime refuses a position past them with INVALID_ARGUMENT (it does not wrap or read beyond).
ROTARY_POSITIONS = 32768


@torch.library.custom_op("skim_ort::group_query_attention", mutates_args=())
def group_query_attention(q: Tensor, k: Tensor, v: Tensor, past_key: Tensor | None, past_value: Tensor | None,
                          bias: Tensor | None, seqlens_k: Tensor, total_length: Tensor, query_lengths: Tensor | None,
                          positions: Tensor | None, cos: Tensor | None, sin: Tensor | None, k_scale: Tensor | None,
                          v_scale: Tensor | None, bits: int, heads: int, kv_heads: int, scale: float,
                          interleaved: bool) -> tuple[Tensor, Tensor, Tensor]:
    """Causal attention of `q [B,S,H*D]` over the past and new keys (`k`, `v` `[B,S,H_kv*D]`),
    plus `bias` (`[B|1, 1, S, T]`, additive); with tables, `q` and `k` are first rotated at
    `positions [B,S]`. Returns the output `[B,S,H*D]` and the grown cache `[B,H_kv,T,D]`: float,
    or with `k_scale`, `v_scale` the codes of `skim::cache_quant_attention` (`bits` 8 or 4).
    `seqlens_k`, `total_length` and `query_lengths` are the kernel's length inputs, computed once
    per program; they follow from the other inputs and this definition does not read them."""
    q, k, v = heads_first(q, heads), heads_first(k, kv_heads), heads_first(v, kv_heads)
    if cos is not None:
        q = rotate(q, cos[positions][:, None], sin[positions][:, None], interleaved)
        k = rotate(k, cos[positions][:, None], sin[positions][:, None], interleaved)
    if k_scale is not None:
        attended, key, value = cache_quant_attention_ref(q, k, v, past_key, past_value, bias, k_scale, v_scale, bits,
                                                         scale)
    else:
        key = k if past_key is None else torch.cat([past_key, k], dim=2)
        value = v.clone() if past_value is None else torch.cat([past_value, v], dim=2)
        attended = causal_attention(q, key, value, bias, scale)
    return attended.transpose(1, 2).flatten(2), key.contiguous(), value.contiguous()


@group_query_attention.register_fake
def _(q, k, v, past_key, past_value, bias, seqlens_k, total_length, query_lengths, positions, cos, sin, k_scale, v_scale,
      bits, heads, kv_heads, scale, interleaved):
    head_dim = k.shape[2] // kv_heads
    tokens = k.shape[1] if past_key is None else past_key.shape[2] + k.shape[1]
    if k_scale is None:
        cache = (k.shape[0], kv_heads, tokens, head_dim)
        return q.new_empty(q.shape), k.new_empty(cache), v.new_empty(cache)
    cache, dtype = (k.shape[0], kv_heads, tokens, head_dim * bits // 8), torch.int8 if bits == 8 else torch.uint8
    return q.new_empty(q.shape), k.new_empty(cache, dtype=dtype), v.new_empty(cache, dtype=dtype)


OP = torch.ops.skim_ort.group_query_attention.default
QUANTIZED_OP = torch.ops.skim.cache_quant_attention.default


@dataclass
class _Lengths:
    """What every layer reading one mask shares: the additive bias and the kernel's lengths."""
    bias: fx.Node | None
    seqlens_k: fx.Node
    total: fx.Node
    query_lengths: fx.Node | None  # in a step with a past: every row's S tokens are queries


@dataclass
class _Site:
    """One layer's attention as the kernel takes it (nodes of `ep.module()`'s graph): queries and
    the step's keys and values `[B,H,S,D]` after rotation, the past cache, the model's mask; the
    node whose `[B,H,S,D]` output the kernel's output replaces and those of the grown cache."""
    q: fx.Node
    k: fx.Node
    v: fx.Node
    past_key: fx.Node | None
    past_value: fx.Node | None
    mask: fx.Node | None
    scale: float
    output: fx.Node
    key: fx.Node
    value: fx.Node
    bits: int = 0  # a `skim::cache_quant_attention`'s code width (its output is item 0); 0: a float cache


def fuse_cache_attention(module: fx.GraphModule, graph: fx.Graph, first_input: fx.Node | None,
                         tolerance: float) -> tuple[int, dict[str, Tensor]]:
    """Rewrite every layer whose cache and attention fit the kernel; returns how many were and
    the constants the rewrite reads (rotary tables, by the placeholder names it gave them).

    The layers are found in `module` (the program's `ep.module()`): plain growing caches, and the
    `skim::cache_quant_attention` of `kv-quant(scheme=channel)`. The rewrite goes into `graph`, a
    copy of the program's lifted graph whose nodes bear the same names (export need not trace it
    again). Rotary tables become placeholders before `first_input` (the first user input), which
    the caller lifts as constants; `tolerance` is how closely their rotation must match the
    model's. Without `first_input`, `module` is an exit's branch (a `torch.cond` subgraph, rewritten
    in its own `graph`): its decode layers are fused with the rotation left outside the kernel."""
    same = {n.name: n for n in graph.nodes}
    node_in = lambda n: n if n is None else same[n.name]  # noqa: E731
    order = {n: i for i, n in enumerate(graph.nodes)}  # nodes the rewrite inserts come after all of these
    lengths: dict[fx.Node | None, _Lengths] = {}
    tables = _TableSource(module, graph, first_input, tolerance)
    sites = _sites(module, branch=first_input is None)
    for site in sites:
        q_heads, k_heads = shape(site.q)[1], shape(site.k)[1]
        rotary = tables.for_layer(site) if site.past_key is not None and first_input is not None else None
        q, k = (rotary.q.key, rotary.k.key) if rotary else (site.q, site.k)
        with graph.inserting_before(node_in(site.output)):
            q, k, v = (token_major(graph, node_in(x)) for x in (q, k, site.v))
            if site.mask not in lengths:
                lengths[site.mask] = _shared_lengths(graph, node_in(site.mask), q, site.q.meta["val"],
                                                     node_in(site.past_key))
            shared = lengths[site.mask]
            positions, cos, sin = (node_in(tables.positions), *tables.placeholders(rotary.tables)) if rotary \
                else (None,) * 3
            # the scales as the lifted graph reads them (its buffers are placeholders of other names)
            k_scale, v_scale = node_in(site.output).args[0].args[6:8] if site.bits else (None, None)
            node = graph.call_function(OP, (q, k, v, node_in(site.past_key), node_in(site.past_value),
                                            shared.bias, shared.seqlens_k, shared.total, shared.query_lengths,
                                            positions, cos, sin, k_scale, v_scale, site.bits,
                                            q_heads, k_heads, site.scale, bool(rotary and rotary.tables.interleaved)))
            node.meta["skim"] = "kernel-selection"
            attended, key, value = (graph.call_function(operator.getitem, (node, i)) for i in range(3))
        replace_output(graph, node_in(site.output), attended, q_heads)
        # the grown cache's readers after attention (the outputs, a window's gather, an
        # eviction's scores) read the op's; those before it only feed the attention replaced
        after = order[node_in(site.output)]
        for old, new in ((site.key, key), (site.value, value)):
            node_in(old).replace_all_uses_with(new, delete_user_cb=lambda user: order.get(user, len(order)) > after)
    return len(sites), tables.constants


def _sites(module: fx.GraphModule, branch: bool) -> list[_Site]:
    from skimformer.passes.cache_attention import cache_attentions, read_cache_attentions

    found, _ = read_cache_attentions(module, decode=True) if branch else cache_attentions(module, "kernel selection")
    if not found and not branch:  # a program that returns a window or an eviction of the cache it grows
        found, _ = read_cache_attentions(module)
    sites = [_Site(c.layer.attention.q, c.k_new, c.v_new, c.layer.past_key, c.layer.past_value, c.mask, c.scale,
                   c.layer.attention.node, c.layer.key, c.layer.value) for c in found]
    for node in module.graph.nodes:
        if node.target is QUANTIZED_OP:
            q, k, v, past_key, past_value, bias, _, _, bits, scale = node.args
            parts = {user.args[1]: user for user in node.users if op_name(user) == "getitem"}
            if len(parts) == 3:
                sites.append(_Site(q, k, v, past_key, past_value, bias, scale, parts[0], parts[1], parts[2], bits))
    return sites


def _shared_lengths(graph: fx.Graph, mask: fx.Node | None, q: fx.Node, queries: Tensor,
                    past_key: fx.Node | None) -> _Lengths:
    """The bias (additive, in the queries' dtype, broadcast to the kernel's `[B|1, 1|H, S, T]`)
    and the lengths: every row holds `T` tokens after the step (left padding is masked by the
    bias, not shortened), so `seqlens_k = T - 1` for each row. `q` is token-major; `queries`,
    the head-major queries' traced value."""
    size = lambda x, d: graph.call_function(aten.sym_size.int, (x, d))  # noqa: E731
    bias, steps = kernel_bias(graph, mask, q, queries), size(q, 1)
    if bias is not None:
        total = size(bias, 3)
    else:
        total = steps if past_key is None else graph.call_function(operator.add, (size(past_key, 2), steps))
    per_row = lambda length: graph.call_function(aten.full.default, ([size(q, 0)], length),  # noqa: E731
                                                 {"dtype": torch.int32})
    seqlens = per_row(graph.call_function(operator.sub, (total, 1)))
    total_scalar = graph.call_function(aten.scalar_tensor.default, (total,), {"dtype": torch.int32})
    return _Lengths(bias, seqlens, total_scalar, None if past_key is None else per_row(steps))


@dataclass
class _LayerRotary:
    q: object  # ir.rotary.Rotary of the queries
    k: object  # ... of the new keys
    tables: RotaryTables


def _rotary_positions(graph: fx.Graph) -> fx.Node | None:
    """The positions the model rotates at: its `position_ids` input, where a call reads it (not
    only export's guard check)."""
    given = next((n for n in graph.nodes if n.op == "placeholder" and n.name == "position_ids"), None)
    return given if given is not None and any(user.op == "call_function" for user in given.users) else None


class _TableSource:
    """Rotary tables for the layers of one program: read once per table computation the model
    shares between layers, checked against every layer's query and key rotation, and given to
    the graph as placeholders once."""

    def __init__(self, module: fx.GraphModule, graph: fx.Graph, first_input: fx.Node, tolerance: float):
        self.module, self.graph, self.first_input, self.tolerance = module, graph, first_input, tolerance
        self.positions = _rotary_positions(module.graph)
        self.candidates: dict[frozenset, list[RotaryTables]] = {}
        self.constants: dict[str, Tensor] = {}
        self.nodes: dict[int, tuple[fx.Node, fx.Node]] = {}

    def for_layer(self, site: _Site) -> _LayerRotary | None:
        if self.positions is None:
            return None
        q = find_rotary(self.module.graph, site.q, self.positions)
        k = find_rotary(self.module.graph, site.k, self.positions)
        if q is None or k is None:
            return None
        # layers share the model's cos and sin and differ in what moves them into place (an
        # unsqueeze per layer): key by those, and check each layer's own rotation against them
        computation = frozenset(k.nodes) - descendants([k.key])
        source = frozenset(n for n in computation if op_name(n) in ("cos", "sin")) or computation
        if source not in self.candidates:
            self.candidates[source] = rotary_candidates(self.module, k, ROTARY_POSITIONS)
        chosen = next((t for t in self.candidates[source]
                       if rotates_by(self.module, q, t, self.tolerance) and rotates_by(self.module, k, t, self.tolerance)),
                      None)
        return _LayerRotary(q, k, chosen) if chosen is not None else None

    def placeholders(self, tables: RotaryTables) -> tuple[fx.Node, fx.Node]:
        if id(tables) not in self.nodes:
            index = len(self.nodes)
            pair = []
            for kind in ("cos", "sin"):
                name = f"skim_rotary_{kind}_{index}"
                self.constants[name] = getattr(tables, kind)
                with self.graph.inserting_before(self.first_input):
                    pair.append(self.graph.placeholder(name))
            self.nodes[id(tables)] = tuple(pair)
        return self.nodes[id(tables)]

