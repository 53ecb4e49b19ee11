"""Each decoder layer's attention over its cache, in the one form both the KV passes that replace
it and the ONNX Runtime backend's kernel selection need: the queries, the step's own new keys and
values, the past cache inputs, the model's mask and the softmax scale.

A layer qualifies when its cache is the past cache with the step's keys appended (the plain
growing cache of the decoder convention; in a prefill, the step's keys alone) and one fused
attention op reads that whole cache with an explicit mask or a causal flag.

Models write the same cache in many ways: a fused QKV projection split by slices or chunks,
rotary embedding on part of the head dim concatenated with the rest, copies, casts and
shape-keeping views between the concatenation, the outputs and the attention, repeat_kv's head
expansion in front of the attention. The match therefore follows values through the ops that
pass a tensor on whole rather than expecting one pattern, and asks of the parts only what
makes the rewrite correct: the cache is a concatenation along the token axis of the past input
and one more part, that part does not read this layer's past (it is the step's own keys), and
the attention reads every token of that cache.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch.fx as fx

from skimformer.errors import UserError
from skimformer.ir.attention import FUSED, find_attention, sdpa_mask
from skimformer.ir.graph import op_name, shape
from skimformer.ir.signature import input_nodes, named_outputs
from skimformer.ir.sizes import same_shape, same_size, to_expr
from skimformer.passes.kv_rewrite import CacheLayer, cache_layers

# Ops whose output is their input's values, element for element (a cast rounds, no more).
COPIES = frozenset({"clone", "contiguous", "alias", "detach", "lift_fresh_copy", "to", "_to_copy"})
# Ops that pass a tensor on whole when their output has their input's shape (a full slice, a
# view to the same shape, an expand that broadcasts nothing).
WHOLE_IF_SAME_SHAPE = frozenset({"slice", "view", "reshape", "_unsafe_view", "expand"})
# repeat_kv: the KV heads repeated to the query heads (`[B, H_kv, T, D]` -> `[B, H, T, D]`).
HEAD_REPEATS = frozenset({"unsqueeze", "expand", "view", "reshape", "_unsafe_view", "repeat_interleave"})
SIZE_READS = frozenset({"sym_size", "sym_numel", "sym_stride", "sym_storage_offset"})
TOKENS = 2  # the token axis of a `[B, H_kv, T, D]` cache


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


def _passed_on(node: fx.Node) -> fx.Node | None:
    """The tensor `node` passes on whole (same values up to a cast, same shape), or None."""
    source = node.args[0] if node.op == "call_function" and node.args else None
    if not isinstance(source, fx.Node):
        return None
    name = op_name(node)
    if name in COPIES or (name in WHOLE_IF_SAME_SHAPE and same_shape(shape(node), shape(source))):
        return source
    return None


def _unwrapped(node: fx.Node) -> fx.Node:
    """`node` with the ops that pass a tensor on whole peeled off."""
    while (source := _passed_on(node)) is not None:
        node = source
    return node


def _is_token_cat(node: fx.Node) -> bool:
    dims = shape(node)
    if op_name(node) != "cat" or dims is None or len(dims) != 4:
        return False
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
    return dim % 4 == TOKENS


def _token_parts(node: fx.Node) -> list[fx.Node]:
    """What a cache is concatenated from along its token axis, in order, empty operands dropped
    (a lazily created `transformers` cache starts as an empty tensor that every step
    concatenates to)."""
    inner = _unwrapped(node)
    if not _is_token_cat(inner):
        return [node]
    return [part for operand in inner.args[0] if not _is_empty(operand) for part in _token_parts(operand)]


def _new_tokens(present: fx.Node, past: fx.Node | None) -> fx.Node | None:
    """The step's own keys (or values): the whole cache in a prefill, the part after the past
    cache in a decode step, when that part does not read the past; None for a cache built any
    other way (a window of the past, the new tokens first, a past gathered or rescaled)."""
    *old, new = _token_parts(present)
    if [_unwrapped(part) for part in old] != ([] if past is None else [past]):
        return None
    if past is not None and _reads_values(new, past):
        return None
    return new


def _reads_values(node: fx.Node, source: fx.Node) -> bool:
    """Whether `node` depends on the values of `source`; reading its sizes does not count (the
    exporter takes the batch size for every reshape from whichever input it met first)."""
    todo, seen = [node], set()
    while todo:
        current = todo.pop()
        if current is source:
            return True
        if current in seen or op_name(current) in SIZE_READS:
            continue
        seen.add(current)
        todo.extend(current.all_input_nodes)
    return False


def _reads_whole(attention_input: fx.Node, cache: fx.Node) -> bool:
    """Whether attention reads every token of `cache` as it is: through whole copies and
    repeat_kv's head expansion, with the cache's batch, token count and head dim."""
    node = attention_input
    while node is not cache:
        node = _read_from(node)
        if node is None:
            return False
    got, want = shape(attention_input), shape(cache)
    return got is not None and want is not None and len(got) == len(want) == 4 \
        and all(same_size(got[i], want[i]) for i in (0, TOKENS, 3))


def _why_not(layer: CacheLayer, k_new, v_new) -> str | None:
    site = layer.attention
    if site.kind != "fused" or op_name(site.node) != FUSED:
        return "its attention is not one fused attention op"
    if k_new is None or v_new is None:
        return "its cache is not the past cache with the step's keys appended"
    if not (_reads_whole(site.k, _unwrapped(layer.key)) and _reads_whole(site.v, _unwrapped(layer.value))):
        return "its attention does not read the whole cache it returns"
    if (site.node.kwargs.get("dropout_p") or 0) != 0 or len(site.node.args) > 4:
        return "its attention has dropout or positional options"
    if sdpa_mask(site.node) is None and not site.node.kwargs.get("is_causal", False):
        return "its attention is neither masked nor causal"
    qs, ks = shape(site.q), shape(k_new)
    if qs is None or ks is None or len(qs) != 4 or len(ks) != 4 or not same_size(qs[2], ks[2]) \
            or not same_size(qs[3], ks[3]):
        return "its queries and new keys differ in tokens or head size"
    heads, kv_heads = to_expr(qs[1]), to_expr(ks[1])
    if not (heads.is_Integer and kv_heads.is_Integer) or heads % kv_heads:
        return "its head counts are not static multiples"
    return None


def cache_attentions(module: fx.GraphModule, pass_name: str) -> tuple[list[CacheAttention], list[str]]:
    """The layers that qualify, and for each other layer (or the whole program) why not."""
    try:
        layers = cache_layers(module, pass_name)
    except UserError as e:
        return [], [str(e)]
    return _qualifying(layers)


def read_cache_attentions(module: fx.GraphModule, decode: bool | None = None) -> tuple[list[CacheAttention], list[str]]:
    """Like `cache_attentions`, for a graph whose cache outputs are made from the cache its
    attention reads rather than being it: a window or an eviction gathered from the grown cache,
    as kv-window and kv-evict(policy=h2o) write, or an exit's branch (a `torch.cond` subgraph,
    whose inputs and outputs have no names). In a decode step (`decode`; by default, when the
    program has `past_key_*` inputs) a layer is an attention that reads the concatenation of a
    graph input (its past cache) and the step's own keys; in a prefill every attention is a
    layer's, in order. A layer's `key`/`value` are the caches the attention reads, whose other
    readers (the gather, the eviction's scores, the branch's outputs) a rewrite must keep fed."""
    if decode is None:
        if not any(name.startswith("present_key_") for name in named_outputs(module)):
            return [], ["the program returns no cache"]
        decode = any(name.startswith("past_key_") for name in input_nodes(module))
    layers = []
    for index, site in enumerate(find_attention(module.graph)):
        key, value = _read_cache(site.k, decode), _read_cache(site.v, decode)
        pasts = (_past_input(key), _past_input(value)) if decode else (None, None)
        if key is not None and value is not None and (not decode or None not in pasts):
            layers.append(CacheLayer(index, key, value, *pasts, site))
    return _qualifying(layers)


def _read_cache(attention_input: fx.Node, decode: bool) -> fx.Node | None:
    """The cache attention reads through whole copies and repeat_kv's head expansion: in a decode
    step the token concatenation (None if there is none); in a prefill the keys themselves."""
    node = attention_input
    while node is not None and not (decode and _is_token_cat(node)):
        source = _read_from(node)
        if source is None and not decode:
            return node
        node = source
    return node


def _past_input(cache: fx.Node | None) -> fx.Node | None:
    """The graph input a grown cache concatenates the step's keys to, or None."""
    if cache is None:
        return None
    parts = _token_parts(cache)
    past = _unwrapped(parts[0]) if len(parts) == 2 else None
    return past if past is not None and past.op == "placeholder" else None


def _read_from(node: fx.Node) -> fx.Node | None:
    """What `node` reads whole, as attention reads its cache: the source of a whole copy or of
    repeat_kv's head expansion; None for any other op."""
    source = _passed_on(node)
    if source is None and op_name(node) in HEAD_REPEATS and isinstance(node.args[0], fx.Node):
        source = node.args[0]
    return source


def _qualifying(layers: list[CacheLayer]) -> tuple[list[CacheAttention], list[str]]:
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


def additive(graph: fx.Graph, mask: fx.Node | None, dtype) -> fx.Node | None:
    """The model's attention mask as an additive bias in `dtype`, the attention's (a boolean mask
    keeps where True); insert before the node that reads it. Fused kernels take one type for
    their operands, and a boolean mask's fill is the dtype's own lowest value (float32's would be
    -inf in float16)."""
    import torch

    if mask is None:
        return None
    current = mask.meta["val"].dtype
    if current == torch.bool:
        mask = graph.call_function(torch.ops.aten.where.Scalar,
                                   (graph.call_function(torch.ops.aten.logical_not.default, (mask,)),
                                    torch.finfo(dtype).min, 0.0))
        current = torch.float32  # a where() of two Python floats
    return mask if current == dtype else graph.call_function(torch.ops.aten._to_copy.default, (mask,), {"dtype": dtype})
