"""Token selection ops inserted by token-reduction passes: `skim::topk_tokens`,
`skim::gather_tokens`, `skim::fuse_tokens`, `skim::restore_tokens`, `skim::token_scores`.

Each op has a schema and fake implementation (so programs holding it export, save and load), a
plain-torch reference (the definition of correct, and the ATen decomposition every backend
lowers it through), collected in `REFERENCES`.

Scores and selections are computed in fp32 whatever the program's dtype: in fp16 or bf16 the
probabilities of a few dozen tokens round to ties that engines break differently, and the
sentinel ranks below do not fit. `token_scores` returns fp32 scores (as `kv_attention_scores`
does); the token values themselves keep their dtype.
"""
from __future__ import annotations

import math
from fractions import Fraction

import torch
from torch import Tensor

from skimformer.kernels.precision import apply_mask, keeps, most_negative

NEG = -1e30  # an fp32 rank no real token's score reaches (padding ranks below it by position)


def gather_tokens_ref(x: Tensor, idx: Tensor, dim: int) -> Tensor:
    """`x` with only the tokens `idx[b]` along `dim`, per batch row (broadcast batch of 1 too).

    Indexed by (row, token) pairs, not `torch.gather`: a gather needs its index expanded to the
    output's full shape, which for a `[B, N, 49152]` logits restore is an int64 tensor larger
    than the logits (ONNX: Expand + GatherElements, 5x slower than the GatherND this becomes)."""
    x, dim = batch_like(x, idx), dim % x.dim()
    rows = torch.arange(idx.shape[0], device=idx.device)[:, None]
    picked = x[(rows, *[slice(None)] * (dim - 1), idx)]  # the indexed axes come first: [B, K, ...]
    return picked if dim == 1 else picked.movedim(1, dim)


def gather_tokens_by_expanded_index(x: Tensor, idx: Tensor, dim: int) -> Tensor:
    """`gather_tokens_ref` as one `torch.gather`, for compilers that lower a gather but not
    indexing by tensors at dynamic sizes (torch-mlir's linalg-on-tensors)."""
    x, dim = batch_like(x, idx), dim % x.dim()
    return torch.gather(x, dim, expanded_index(idx, x, dim))


def expanded_index(idx: Tensor, x: Tensor, dim: int) -> Tensor:
    """`idx` `[B, K]` as the `torch.gather` index that takes those tokens of `x` along `dim`."""
    shape = [1] * x.dim()
    shape[0], shape[dim] = idx.shape[0], idx.shape[1]
    target = list(x.shape)
    target[0], target[dim] = idx.shape[0], idx.shape[1]
    return idx.reshape(shape).expand(target)


def batch_like(x: Tensor, idx: Tensor) -> Tensor:
    """`x` with as many batch rows as `idx` (a batch of 1 broadcasts)."""
    return x if x.shape[0] == idx.shape[0] else x.expand(idx.shape[0], *x.shape[1:])


def kept_count(n, keep: float, protect: int):
    """Tokens a `keep` fraction leaves: the protected ones plus ceil(keep * the rest), at least
    one. Integer arithmetic, so a symbolic token count stays symbolic."""
    frac = Fraction(keep).limit_denominator(1000)
    # ceil division on non-negative numbers only: ONNX integer division truncates toward zero
    rest = ((n - protect) * frac.numerator + frac.denominator - 1) // frac.denominator
    count = protect + (torch.sym_max(1, rest) if isinstance(rest, torch.SymInt) else max(1, rest))
    # never more than there are (a prompt of one token, or no more tokens than `protect`)
    return torch.sym_min(n, count) if isinstance(count, torch.SymInt) else min(n, count)


def valid_tokens(mask: Tensor | None, scores: Tensor) -> Tensor:
    """`[B, N]` True for real tokens, from an attention mask (boolean keep-mask or additive).

    A 4-D mask is read at its last query row: in an encoder's padding mask every row marks the
    real keys, and in a causal mask the last query (real, since decoders pad on the left) is the
    one that sees every real key (row 0 sees only key 0)."""
    if mask is None:
        return torch.ones_like(scores, dtype=torch.bool)
    row = mask[:, 0, -1, :] if mask.dim() == 4 else mask
    return keeps(row).expand_as(scores)


def topk_tokens_ref(scores: Tensor, mask: Tensor | None, keep: float, protect: int) -> Tensor:
    """Indices `[B, kept_count]`: the first `protect` real tokens of each row (the leading ones,
    or the first after a decoder's left padding), then the best-scored others, real tokens before
    padding, in their original order."""
    n = scores.shape[1]
    valid = valid_tokens(mask, scores)
    # Padding scores below every real token and, ties broken by position, the same padding is
    # chosen by every backend (top-k implementations order equal values differently).
    rank = torch.arange(n, device=scores.device, dtype=torch.float32)
    body = torch.where(valid, scores.float(), NEG - rank * 1e24)
    first = valid & (valid.long().cumsum(dim=1) <= protect)
    body = torch.where(first, torch.full_like(body, -NEG), body)
    return torch.sort(torch.topk(body, kept_count(n, keep, protect), dim=1).indices, dim=1).values


def fuse_tokens_ref(x: Tensor, scores: Tensor, mask: Tensor | None, idx: Tensor, dim: int) -> Tensor:
    """One token: the mean of the real tokens not in `idx`, weighted by softmax of their scores
    (weights and sum in fp32, the token in `x`'s dtype)."""
    scores = scores.float()
    weights = torch.softmax(scores.masked_fill(~valid_tokens(mask, scores), most_negative(scores.dtype)), dim=1)
    weights = weights * torch.ones_like(weights).scatter(1, idx, 0.0)
    weights = weights / weights.sum(dim=1, keepdim=True).clamp_min(1e-12)
    shape = [1] * x.dim()
    shape[0], shape[dim] = weights.shape[0], weights.shape[1]
    return (x.float() * weights.reshape(shape)).sum(dim=dim, keepdim=True).to(x.dtype)


def restore_tokens_ref(x: Tensor, src: Tensor, dim: int) -> Tensor:
    """Undo a reduction for a per-token output: original token i takes `x[src[b, i]]`."""
    return gather_tokens_ref(x, src, dim)


def token_sources_ref(idx: Tensor, n: int, fill: int) -> Tensor:
    """`[B, n]`: for each original token, its index among the kept ones (`fill` if dropped)."""
    src = torch.full((idx.shape[0], n), fill, dtype=torch.int64, device=idx.device)
    order = torch.arange(idx.shape[1], device=idx.device).expand(idx.shape[0], idx.shape[1])
    return src.scatter(1, idx, order)


def token_scores_ref(q: Tensor, k: Tensor, mask: Tensor | None, scale: float, mode: int) -> Tensor:
    """Importance of each key token `[B, N]` in fp32, averaged over heads.

    mode 0: the first query's attention row ([CLS] attention, EViT); mode 1: attention received,
    averaged over all queries; mode 2: minus the key norm (small keys draw attention); mode 3: the
    last query's attention row (FastV / GemFilter: the query that generates), with the last token
    itself scored 2.0, above any probability, so that it is always kept.
    q: `[B, H, Nq, D]`; k: `[B, H_kv, N, D]` (grouped-query keys are repeated to q's heads);
    mask: additive float or boolean keep-mask broadcastable to `[B, H, Nq, N]`.
    """
    q, k = q.float(), k.float()
    if mode == 2:
        return -k.norm(dim=-1).mean(dim=1)
    if k.shape[1] != q.shape[1]:
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    queries = q[:, :, :1] if mode == 0 else q[:, :, -1:] if mode == 3 else q
    logits = queries @ k.transpose(-1, -2) * scale
    rows = mask
    if mask is not None and mode in (0, 3) and mask.shape[-2] != 1:
        rows = mask[:, :, :1] if mode == 0 else mask[:, :, -1:]
    scores = torch.softmax(apply_mask(logits, rows).float(), dim=-1).mean(dim=(1, 2))
    if mode == 3:
        last = torch.arange(scores.shape[1], device=scores.device) == scores.shape[1] - 1
        scores = torch.where(last, torch.full_like(scores, 2.0), scores)
    return scores


@torch.library.custom_op("skim::gather_tokens", mutates_args=())
def gather_tokens(x: Tensor, idx: Tensor, dim: int) -> Tensor:
    return gather_tokens_ref(x, idx, dim)


@gather_tokens.register_fake
def _(x, idx, dim):
    shape = list(x.shape)
    shape[0], shape[dim] = idx.shape[0], idx.shape[1]
    return x.new_empty(shape)


@torch.library.custom_op("skim::restore_tokens", mutates_args=())
def restore_tokens(x: Tensor, src: Tensor, dim: int) -> Tensor:
    return restore_tokens_ref(x, src, dim)


@restore_tokens.register_fake
def _(x, src, dim):
    shape = list(x.shape)
    shape[0], shape[dim] = src.shape[0], src.shape[1]
    return x.new_empty(shape)


@torch.library.custom_op("skim::topk_tokens", mutates_args=())
def topk_tokens(scores: Tensor, mask: Tensor | None, keep: float, protect: int) -> Tensor:
    return topk_tokens_ref(scores, mask, keep, protect)


@topk_tokens.register_fake
def _(scores, mask, keep, protect):
    return scores.new_empty((scores.shape[0], kept_count(scores.shape[1], keep, protect)), dtype=torch.int64)


@torch.library.custom_op("skim::fuse_tokens", mutates_args=())
def fuse_tokens(x: Tensor, scores: Tensor, mask: Tensor | None, idx: Tensor, dim: int) -> Tensor:
    return fuse_tokens_ref(x, scores, mask, idx, dim)


@fuse_tokens.register_fake
def _(x, scores, mask, idx, dim):
    shape = list(x.shape)
    shape[dim] = 1
    return x.new_empty(shape)


@torch.library.custom_op("skim::token_scores", mutates_args=())
def token_scores(q: Tensor, k: Tensor, mask: Tensor | None, scale: float, mode: int) -> Tensor:
    return token_scores_ref(q, k, mask, scale, mode)


@token_scores.register_fake
def _(q, k, mask, scale, mode):
    return q.new_empty((q.shape[0], k.shape[-2]), dtype=torch.float32)


@torch.library.custom_op("skim::token_sources", mutates_args=())
def token_sources(idx: Tensor, n: int, fill: int) -> Tensor:
    return token_sources_ref(idx, n, fill)


@token_sources.register_fake
def _(idx, n, fill):
    return idx.new_empty((idx.shape[0], n))


REFERENCES = {
    torch.ops.skim.token_sources.default: token_sources_ref,
    torch.ops.skim.gather_tokens.default: gather_tokens_ref,
    torch.ops.skim.restore_tokens.default: restore_tokens_ref,
    torch.ops.skim.topk_tokens.default: topk_tokens_ref,
    torch.ops.skim.fuse_tokens.default: fuse_tokens_ref,
    torch.ops.skim.token_scores.default: token_scores_ref,
}


def default_scale(head_dim: int) -> float:
    return 1.0 / math.sqrt(head_dim)
