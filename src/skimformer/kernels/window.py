"""Ops of the attention-sink window cache (StreamingLLM): `skim::window_tokens`,
`skim::sink_index`, `skim::window_join`, `skim::cache_positions`.

Each has a schema and fake implementation, and a plain-torch reference that defines it and is
the ATen decomposition backends lower. Masks are a decoder's `[B, T]` keep-masks over its cache
(1 real, 0 padding; decoders pad on the left).
"""
from __future__ import annotations

import torch
from torch import Tensor

from skimformer.kernels.tokens import batch_like, expanded_index


def at_most(n, limit: int):
    """`min(n, limit)`, symbolic when `n` is."""
    return torch.sym_min(n, limit) if isinstance(n, torch.SymInt) else min(n, limit)


def window_size(total, sink: int, window: int):
    """Tokens a window cache holds: all of them until it is full."""
    return at_most(total, sink + window)


def _in_cache_positions(mask: Tensor) -> Tensor:
    """Each slot's position counted over the real tokens before it (padding takes 0)."""
    return (mask.long().cumsum(dim=1) - 1).clamp(min=0)


def window_tokens_ref(mask: Tensor, sink: int, window: int) -> Tensor:
    """`[B, min(T, sink + window)]` slot indices, ascending: the first `sink` real tokens of each
    row (the attention sinks), then the most recent real tokens; padding only when a row has
    fewer real tokens than the cache holds, so it stays in front where the mask marks it."""
    t = mask.shape[1]
    valid = mask != 0
    slot = torch.arange(t, device=mask.device, dtype=torch.float32).expand(mask.shape[0], t)
    sinks = valid & (valid.long().cumsum(dim=1) <= sink)
    # sinks above every other slot, then real tokens by recency, then padding (deterministic order)
    score = torch.where(sinks, slot + 2 * t, torch.where(valid, slot, slot - 2 * t))
    kept = torch.topk(score, window_size(t, sink, window), dim=1).indices
    return torch.sort(kept, dim=1).values


def cache_positions_ref(mask: Tensor, input_ids: Tensor) -> Tensor:
    """`[B, n]` positions of the step's `n` new tokens within the cache: the count of real tokens
    before each (the mask covers the cache and then the new tokens)."""
    positions = _in_cache_positions(mask)
    return positions[:, positions.shape[1] - input_ids.shape[1]:]


def sink_index_ref(idx: Tensor, sink: int, x: Tensor, dim: int) -> Tensor:
    """The `torch.gather` index that takes, from caches shaped like `x`, the first
    `min(K, sink)` of the kept slots `idx` (`window_tokens`) along `dim`: the attention sinks
    (or, in a cache of fewer slots, what it holds). Once per program; each cache's gather reads
    it (an ONNX Runtime node costs microseconds, however small its tensors, and there are 60)."""
    return expanded_index(idx[:, :at_most(idx.shape[1], sink)], x, dim).contiguous()


def window_join_ref(sinks: Tensor, x: Tensor, start: int, dim: int) -> Tensor:
    """The kept cache: `sinks` (gathered by `sink_index`, rotated or not), then `x` from slot
    `start` on. The kept slots after the sinks are always `x`'s last ones, the same for every
    row: the window keeps the most recent tokens and puts padding only in front. So the bulk of
    a window cache is a slice, not a gather. `start` is the program's (`T - K + min(K, sink)`,
    computed once for every layer); one op rather than a slice and a cat in the program, because
    a part that may be empty has a size export would guard on."""
    recent = batch_like(x, sinks)[(slice(None),) * dim + (slice(start, None),)]  # to the end: no size to compute
    return torch.cat([sinks, recent], dim)


@torch.library.custom_op("skim::window_tokens", mutates_args=())
def window_tokens(mask: Tensor, sink: int, window: int) -> Tensor:
    return window_tokens_ref(mask, sink, window)


@window_tokens.register_fake
def _(mask, sink, window):
    return mask.new_empty((mask.shape[0], window_size(mask.shape[1], sink, window)), dtype=torch.int64)


@torch.library.custom_op("skim::cache_positions", mutates_args=())
def cache_positions(mask: Tensor, input_ids: Tensor) -> Tensor:
    return cache_positions_ref(mask, input_ids)


@cache_positions.register_fake
def _(mask, input_ids):
    return input_ids.new_empty(input_ids.shape, dtype=torch.int64)


@torch.library.custom_op("skim::sink_index", mutates_args=())
def sink_index(idx: Tensor, sink: int, x: Tensor, dim: int) -> Tensor:
    return sink_index_ref(idx, sink, x, dim)


@sink_index.register_fake
def _(idx, sink, x, dim):
    shape = [idx.shape[0], *x.shape[1:]]
    shape[dim] = at_most(idx.shape[1], sink)
    return idx.new_empty(shape)


@torch.library.custom_op("skim::window_join", mutates_args=())
def window_join(sinks: Tensor, x: Tensor, start: int, dim: int) -> Tensor:
    return window_join_ref(sinks, x, start, dim)


@window_join.register_fake
def _(sinks, x, start, dim):
    shape = [sinks.shape[0], *x.shape[1:]]
    shape[dim] = sinks.shape[dim] + x.shape[dim] - start
    return x.new_empty(shape)


REFERENCES = {
    torch.ops.skim.window_tokens.default: window_tokens_ref,
    torch.ops.skim.cache_positions.default: cache_positions_ref,
    torch.ops.skim.sink_index.default: sink_index_ref,
    torch.ops.skim.window_join.default: window_join_ref,
}
