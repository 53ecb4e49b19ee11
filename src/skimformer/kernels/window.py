"""Ops of the attention-sink window cache (StreamingLLM): `skim::window_tokens`,
`skim::cache_positions`, `skim::position_shift`.

Each has a schema and fake implementation, and a plain-torch reference that defines it and is
the ATen decomposition backends lower. Masks are a decoder's `[B, T]` keep-masks over its cache
(1 real, 0 padding; decoders pad on the left).
"""
from __future__ import annotations

import torch
from torch import Tensor


def window_size(total, sink: int, window: int):
    """Tokens a window cache holds: all of them until it is full. Symbolic when `total` is."""
    return torch.sym_min(total, sink + window) if isinstance(total, torch.SymInt) else min(total, sink + window)


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


def position_shift_ref(mask: Tensor, idx: Tensor) -> Tensor:
    """`[B, K]` position change of each kept slot: its position among the kept real tokens minus
    its position before eviction (0 until a token is evicted, then negative)."""
    before = torch.gather(_in_cache_positions(mask), 1, idx)
    after = _in_cache_positions(torch.gather(mask, 1, idx))
    return after - before


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


@torch.library.custom_op("skim::position_shift", mutates_args=())
def position_shift(mask: Tensor, idx: Tensor) -> Tensor:
    return position_shift_ref(mask, idx)


@position_shift.register_fake
def _(mask, idx):
    return idx.new_empty(idx.shape, dtype=torch.int64)


REFERENCES = {
    torch.ops.skim.window_tokens.default: window_tokens_ref,
    torch.ops.skim.cache_positions.default: cache_positions_ref,
    torch.ops.skim.position_shift.default: position_shift_ref,
}
