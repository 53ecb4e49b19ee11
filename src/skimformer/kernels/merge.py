"""Token merging ops inserted by `tome`: `skim::token_sizes`, `skim::bipartite_match`,
`skim::bipartite_merge`.

ToMe (Bolya et al., ICLR 2023) reimplemented from the paper: tokens split alternately into sets A
(even positions) and B (odd positions); each A token finds its most similar B token by cosine
similarity of a metric (the attention keys averaged over heads); the `r` best-matched A tokens
are merged into their B partners by a size-weighted mean. Unlike the reference code, survivors
keep their original order, so [CLS] stays first and position-indexed heads (poolers) still work.

Padding: a token's size counts the real tokens it stands for, 0 for padding. Padding is merged
first, never serves as a destination for a real token, and weighs nothing in a mean, so real
tokens never absorb padding values and padding never outlives real tokens.

Sizes, similarities and means are computed in fp32 whatever the program's dtype: bf16 counts
integers exactly only up to 256, and in fp16 or bf16 the position tie-break below (1e-6) vanishes
in rounding, so equal similarities would be broken differently by each engine. Sizes are fp32
outputs; merged tokens keep their dtype.
"""
from __future__ import annotations

import torch
from torch import Tensor

from skimformer.kernels.tokens import valid_tokens

NEG = -1e30  # an fp32 similarity rank below any real one (protected tokens rank at 3 * NEG)
TIE = 1e-6  # position tie-break: equal similarities pick the same pairs on every backend


def merge_count(n, r: int, protect: int):
    """Tokens left after merging up to `r` of the A set's unprotected tokens into B."""
    free = (n + 1) // 2 - (protect + 1) // 2  # A holds the even positions, the protected among them
    if isinstance(free, torch.SymInt):
        # A symbolic count stays `n - r` (a Min() nested block after block makes symbolic shape
        # arithmetic explode); the program then requires enough tokens, a range on `n`.
        torch._check(free >= r, lambda: f"tome needs at least {2 * r + protect} tokens to merge {r}")
        return n - r
    return n - min(r, max(free, 0))


def token_sizes_ref(x: Tensor, mask: Tensor | None, dim: int) -> Tensor:
    """`[B, N]` fp32 starting sizes: 1 for a real token, 0 for padding (from an attention mask)."""
    like = x.new_zeros((x.shape[0], x.shape[dim]), dtype=torch.float32)
    return valid_tokens(mask, like).to(torch.float32)


def bipartite_match_ref(metric: Tensor, size: Tensor, r: int, protect: int) -> tuple[Tensor, Tensor]:
    """Pick the merges. metric `[B, N, C]`, size `[B, N]`.

    Returns `keep` `[B, K]`, the surviving tokens' old indices in order, and `sources` `[B, N]`,
    each old token's index among the survivors (a merged token points at its destination).
    """
    batch, n = metric.shape[0], metric.shape[1]
    k = merge_count(n, r, protect)
    removed = n - k
    metric = metric.float()
    unit = metric / metric.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    a, b = unit[:, ::2], unit[:, 1::2]
    valid = size > 0
    pos = torch.arange(n, device=metric.device)
    pos_a, pos_b = pos[::2], pos[1::2]
    similarity = a @ b.transpose(1, 2)
    usable_b = valid[:, 1::2] & (pos_b >= protect)
    similarity = similarity.masked_fill(~usable_b[:, None, :], NEG)
    best, partner = similarity.max(dim=-1)
    rank = torch.arange(a.shape[1], device=metric.device, dtype=best.dtype)
    best = torch.where(valid[:, ::2], best - rank * TIE, 2.0 - rank * TIE)  # padding merges first
    best = best.masked_fill(pos_a < protect, 3 * NEG)
    chosen = torch.topk(best, removed, dim=1).indices  # A-set indices
    src = chosen * 2
    dst = partner.gather(1, chosen) * 2 + 1
    survives = torch.ones(batch, n, dtype=torch.bool, device=metric.device).scatter(1, src, False)
    order = torch.where(survives, pos, pos + n)  # survivors first, in their original order
    keep = torch.sort(order, dim=1).indices[:, :k]
    new_index = torch.cumsum(survives.to(torch.int64), dim=1) - 1
    sources = new_index.scatter(1, src, new_index.gather(1, dst))
    return keep, sources


def _along(t: Tensor, like: Tensor, dim: int) -> Tensor:
    """Reshape `[B, N]` to broadcast along `dim` of `like`."""
    shape = [1] * like.dim()
    shape[0], shape[dim] = t.shape[0], t.shape[1]
    return t.reshape(shape)


def bipartite_merge_ref(x: Tensor, size: Tensor, sources: Tensor, keep: Tensor, dim: int) -> tuple[Tensor, Tensor]:
    """Merge `x` along `dim` as `sources` says: each survivor becomes the size-weighted mean of
    the tokens that point at it. Returns the merged tensor `[.., K, ..]` and the sizes `[B, K]`.
    A survivor that stands only for padding keeps its own value. Sums in fp32; the merged tensor
    in `x`'s dtype, the sizes in fp32."""
    count = keep.shape[1]
    weights = size.float()
    values = x.float()
    shape = list(x.shape)
    shape[dim] = count
    index = _along(sources, x, dim).expand(x.shape)
    total = values.new_zeros(shape).scatter_add(dim, index, values * _along(weights, x, dim))
    new_size = weights.new_zeros((x.shape[0], count)).scatter_add(1, sources, weights)
    own = torch.gather(values, dim, _along(keep, x, dim).expand(shape))
    denominator = _along(new_size, x, dim)
    merged = torch.where(denominator > 0, total / denominator.clamp_min(1e-12), own)
    return merged.to(x.dtype), new_size


@torch.library.custom_op("skim::token_sizes", mutates_args=())
def token_sizes(x: Tensor, mask: Tensor | None, dim: int) -> Tensor:
    return token_sizes_ref(x, mask, dim)


@token_sizes.register_fake
def _(x, mask, dim):
    return x.new_empty((x.shape[0], x.shape[dim]), dtype=torch.float32)


@torch.library.custom_op("skim::bipartite_match", mutates_args=())
def bipartite_match(metric: Tensor, size: Tensor, r: int, protect: int) -> tuple[Tensor, Tensor]:
    return bipartite_match_ref(metric, size, r, protect)


@bipartite_match.register_fake
def _(metric, size, r, protect):
    batch, n = metric.shape[0], metric.shape[1]
    k = merge_count(n, r, protect)
    return metric.new_empty((batch, k), dtype=torch.int64), metric.new_empty((batch, n), dtype=torch.int64)


@torch.library.custom_op("skim::bipartite_merge", mutates_args=())
def bipartite_merge(x: Tensor, size: Tensor, sources: Tensor, keep: Tensor, dim: int) -> tuple[Tensor, Tensor]:
    return bipartite_merge_ref(x, size, sources, keep, dim)


@bipartite_merge.register_fake
def _(x, size, sources, keep, dim):
    shape = list(x.shape)
    shape[dim] = keep.shape[1]
    return x.new_empty(shape), size.new_empty((x.shape[0], keep.shape[1]), dtype=torch.float32)


REFERENCES = {
    torch.ops.skim.token_sizes.default: token_sizes_ref,
    torch.ops.skim.bipartite_match.default: bipartite_match_ref,
    torch.ops.skim.bipartite_merge.default: bipartite_merge_ref,
}
