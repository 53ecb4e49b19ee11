"""KV-cache eviction ops inserted by `kv-evict`: `skim::kv_attention_scores`,
`skim::kv_key_norm_scores`, `skim::kv_accumulate`, `skim::kv_select`, `skim::kv_gather`.

Scores and selections are per KV head (`[B, H_kv, T]`, `[B, H_kv, K]`): SnapKV (arXiv
2404.14469) and H2O (arXiv 2306.14048) both choose tokens per head, and with grouped-query
attention one KV head serves a group of query heads, whose attention is summed. Each op has a
schema and fake implementation (programs holding it export, save and load) and a plain-torch
reference, the definition of correct and the ATen decomposition every backend lowers.
"""
from __future__ import annotations

import torch
from torch import Tensor

from skimformer.kernels.precision import most_negative
from skimformer.kernels.tokens import kept_count

# Ranks for the selection are float64 (constants that float32 holds: the ONNX export keeps them
# as float32): protected recent tokens rank above every score, padding below, each by position. Real scores tie exactly, e.g. key norms of a repeated
# token (rotary rotations keep norms), and engines order ties differently; scaling each score by
# 1 + position * TIE breaks them by position without reordering distinct float32 scores
# (TIE * 2**21 tokens stays below float32's relative spacing, 2**-24).
TOP = 1e30
SPACING = 1e16
TIE = 2.0 ** -46


def kv_attention_scores_ref(q: Tensor, k: Tensor, mask: Tensor, scale: float, window: int, pool: int) -> Tensor:
    """Attention each cached key receives from the last `window` queries (all when `window` <= 0),
    summed over those queries and over the query heads of each KV group, then average-pooled
    along tokens with kernel `pool` (SnapKV's clustering step); `[B, H_kv, T]`.

    Recomputed beside fused attention, which never materializes probabilities. q: `[B, H, n, D]`
    (the step's queries, the last n positions of the cache); k: `[B, H_kv, T, D]` (the cache the
    step attends to, not repeated); mask: `[B, T]`, 1 for real tokens. The softmax runs over real
    keys at or before each query (causal), and padding queries contribute nothing.
    """
    b, h, n, d = q.shape
    h_kv, t = k.shape[1], k.shape[2]
    if window > 0:  # the last min(window, n) queries, without a guard on n
        start = torch.sym_max(n - window, 0)
        q = q.narrow(2, start, n - start)
    w = q.shape[2]
    grouped = q.reshape(b, h_kv, h // h_kv, w, d)
    logits = (grouped.float() @ k.float().unsqueeze(2).transpose(-1, -2)) * scale  # [B, H_kv, G, w, T]
    q_pos = torch.arange(w, device=q.device) + (t - w)
    k_pos = torch.arange(t, device=q.device)
    real = mask.bool()
    allowed = (k_pos[None, :] <= q_pos[:, None])[None] & real[:, None, :]  # [B, w, T]
    logits = logits.masked_fill(~allowed[:, None, None], most_negative(logits.dtype))
    probs = torch.softmax(logits, dim=-1) * real.narrow(1, t - w, w).to(logits.dtype)[:, None, None, :, None]
    scores = probs.sum(dim=(2, 3))
    if pool > 1:
        scores = torch.nn.functional.avg_pool1d(scores, pool, stride=1, padding=pool // 2)
    return scores


def kv_key_norm_scores_ref(k: Tensor) -> Tensor:
    """Minus each key's L2 norm, `[B, H_kv, T]`: keys with a small norm draw more attention
    (Devoto et al., arXiv 2406.11430; kvpress KnormPress), an attention-free baseline."""
    return -k.float().norm(dim=-1)


def kv_accumulate_ref(prior: Tensor, scores: Tensor) -> Tensor:
    """H2O's running score: the state carried for the `P` cached tokens plus this step's scores
    over all `T >= P` tokens (the new tokens start from their own)."""
    p = prior.shape[-1]
    return torch.cat([scores[..., :p] + prior, scores[..., p:]], dim=-1)


def kept_tokens(t, keep: float, budget):
    """Tokens a selection keeps out of `t`: the `keep` fraction when `keep` > 0, else `budget`
    (an int or a symbolic size), never more than `t`."""
    if keep > 0:
        return kept_count(t, keep, 0)
    return torch.sym_min(budget, t)


def kv_select_ref(scores: Tensor, mask: Tensor, keep: float, budget: int, window: int) -> Tensor:
    """Kept token indices per KV head, `[B, H_kv, K]`, ascending.

    The last `window` tokens rank first (real ones) (SnapKV's observation window, H2O's recent
    tokens), then real tokens by score, then padding. Padding ranks by position alone, so every
    head of a row keeps the same padding slots; with the indices sorted they come first in every
    head (decoders pad on the left), and one `[B, K]` mask is right for all heads.
    """
    rank = _selection_rank(scores, mask, window)
    idx = torch.topk(rank, kept_tokens(scores.shape[-1], keep, budget), dim=-1).indices
    return torch.sort(idx, dim=-1).values


def kv_select_by_counting(scores: Tensor, mask: Tensor, keep: float, budget: int, window: int) -> Tensor:
    """`kv_select_ref` without a sort, for compilers whose sort is unreliable (IREE's, see the
    mlir backend). The ranks are distinct, so a token is kept when fewer than K tokens outrank it,
    and the j-th kept index is the number of tokens before the (j+1)-th kept one. Exact, at
    O(T^2) comparisons per head instead of a sort's O(T log T). Both counts compare `[T, T]`
    (then keep the first K) so that no size is the symbolic K against T, which IREE cannot bound."""
    t = scores.shape[-1]
    rank = _selection_rank(scores, mask, window)
    outranked_by = _count_true(rank[..., None, :] > rank[..., :, None])  # [B, H, T]
    k = kept_tokens(t, keep, budget)
    kept_so_far = torch.cumsum((outranked_by < k).long(), dim=-1)
    slots = torch.arange(t, device=scores.device)
    first_after = _count_true(kept_so_far[..., None, :] <= slots[:, None])  # j -> index of kept token j+1
    return first_after[..., :k]


def _count_true(matrix: Tensor) -> Tensor:
    """True entries along the last axis of a boolean `[..., T, T]`, as a product with ones: IREE
    3.13's CPU code generator fails on the same sum written as a reduction when T is dynamic
    (a stack allocation it cannot bound). float32 counts exactly up to 2**24 tokens."""
    ones = torch.ones(matrix.shape[-1], 1, device=matrix.device)
    return (matrix.to(torch.float32) @ ones).squeeze(-1).long()


def _selection_rank(scores: Tensor, mask: Tensor, window: int) -> Tensor:
    """`[B, H_kv, T]` float64 ranks, distinct (module constants): recent real tokens, then real
    tokens by score, then padding."""
    t = scores.shape[-1]
    pos = torch.arange(t, device=scores.device, dtype=torch.float64)
    real = mask.bool()[:, None, :]
    recent = pos >= t - window
    rank = torch.where(real, scores.double() * (1 + pos * TIE), -TOP + pos * SPACING)
    return torch.where(real & recent, TOP + pos * SPACING, rank)


def kv_gather_ref(x: Tensor, idx: Tensor) -> Tensor:
    """`x[b, h, idx[b, h, j], ...]`: a cache `[B, H_kv, T, D]` or a score state `[B, H_kv, T]`
    with only the kept tokens of each head."""
    view = idx.reshape(*idx.shape, *[1] * (x.dim() - 3))
    return torch.gather(x, 2, view.expand(*idx.shape, *x.shape[3:]))


@torch.library.custom_op("skim::kv_attention_scores", mutates_args=())
def kv_attention_scores(q: Tensor, k: Tensor, mask: Tensor, scale: float, window: int, pool: int) -> Tensor:
    return kv_attention_scores_ref(q, k, mask, scale, window, pool)


@kv_attention_scores.register_fake
def _(q, k, mask, scale, window, pool):
    return q.new_empty((k.shape[0], k.shape[1], k.shape[2]), dtype=torch.float32)


@torch.library.custom_op("skim::kv_key_norm_scores", mutates_args=())
def kv_key_norm_scores(k: Tensor) -> Tensor:
    return kv_key_norm_scores_ref(k)


@kv_key_norm_scores.register_fake
def _(k):
    return k.new_empty(k.shape[:3], dtype=torch.float32)


@torch.library.custom_op("skim::kv_accumulate", mutates_args=())
def kv_accumulate(prior: Tensor, scores: Tensor) -> Tensor:
    return kv_accumulate_ref(prior, scores)


@kv_accumulate.register_fake
def _(prior, scores):
    return scores.new_empty(scores.shape)


@torch.library.custom_op("skim::kv_select", mutates_args=())
def kv_select(scores: Tensor, mask: Tensor, keep: float, budget: int, window: int) -> Tensor:
    return kv_select_ref(scores, mask, keep, budget, window)


@kv_select.register_fake
def _(scores, mask, keep, budget, window):
    b, h, t = scores.shape
    return scores.new_empty((b, h, kept_tokens(t, keep, budget)), dtype=torch.int64)


@torch.library.custom_op("skim::kv_gather", mutates_args=())
def kv_gather(x: Tensor, idx: Tensor) -> Tensor:
    return kv_gather_ref(x, idx)


@kv_gather.register_fake
def _(x, idx):
    return x.new_empty((*idx.shape, *x.shape[3:]))


REFERENCES = {
    torch.ops.skim.kv_attention_scores.default: kv_attention_scores_ref,
    torch.ops.skim.kv_key_norm_scores.default: kv_key_norm_scores_ref,
    torch.ops.skim.kv_accumulate.default: kv_accumulate_ref,
    torch.ops.skim.kv_select.default: kv_select_ref,
    torch.ops.skim.kv_gather.default: kv_gather_ref,
}
