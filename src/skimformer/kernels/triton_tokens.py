"""Triton GPU kernels for the token ops: `skim::gather_tokens`, `restore_tokens`, `topk_tokens`,
`fuse_tokens`, `token_scores`, `token_sources` (tokens.py), `token_sizes`, `bipartite_match`,
`bipartite_merge` (merge.py), `window_tokens`, `sink_index`, `window_join`,
`cache_positions` (window.py).

Each launcher has its reference's signature and semantics (the `*_ref` functions stay the
definition of correct); `KERNELS` maps op names to launchers for `torch.library.register_kernel`
on CUDA, and `AOT` describes one representative compilation of every kernel for ahead-of-time
builds. The kernels also run on CPU tensors under `TRITON_INTERPRET=1`, which is how they are
tested. This module imports only torch, triton and the reference modules, so it runs on a GPU
machine that has nothing else.

Conventions shared by the kernels:
- Tensors are viewed as `[B, P, N, Q]` around their token dim `N`, so a token is a contiguous
  row of `Q` elements and loads are coalesced along it (a KV cache `[B, H, T, D]` gathered on dim
  2 is `P=H, Q=D`; a residual stream `[B, N, C]` is `P=1, Q=C`; a `[B, T]` mask is `P=Q=1`).
- A batch of 1 broadcasts through a batch stride of 0, never through a copy.
- Sums are accumulated in fp32 and cast to the output dtype once.
- Selections (top-k) run in Triton, not torch.topk: a per-row search over an order-preserving
  int32 image of the fp32 scores finds the k-th largest value (4 bits per counting pass), ties
  at it go to the lowest positions, and the chosen positions are written in ascending order
  (what every reference returns after its `sort`). Where the reference itself ties (equal
  scores), it leaves the order to torch.topk; the kernels pick the lowest positions.
- Indices are trusted, as on any GPU path that must not synchronise with the host: an index
  out of range reads zeros or is skipped instead of raising like torch.gather.
- Half-precision inputs are computed in fp32, as the references compute them; scores and token
  sizes are fp32 outputs, token values keep their dtype.
"""
import math
from typing import Callable, NamedTuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from skimformer.kernels.aot import AotEntry
from skimformer.kernels import merge as merge_ref
from skimformer.kernels import tokens as tokens_ref
from skimformer.kernels import window as window_ref
from skimformer.kernels.merge import merge_count
from skimformer.kernels.precision import mask_threshold
from skimformer.kernels.tokens import kept_count
from skimformer.kernels.window import window_size

# The references' fp32 sentinel rank, also the kernels' masked logit: a finite fill that softmax
# sends to 0 gives the probabilities the references' dtype-derived fill gives.
NEG = tl.constexpr(tokens_ref.NEG)
TIE = tl.constexpr(merge_ref.TIE)  # the references' position tie-break for merge scores
PAD_STEP = tl.constexpr(1e24)  # topk_tokens_ref spaces padding scores by position with this
# fp32 dot products on tensor cores at fp32 accuracy (three TF32 products); plain TF32 would
# round scores enough to flip the references' selections, and the exact FMA path spills.
DOT_PRECISION = tl.constexpr("tf32x3")
MAX_BLOCK = 1024  # elements of a row that a row-scanning program handles per step
TILE = 4096  # elements of a [tokens, features] tile that one program moves
TILE_WARPS = 8  # warps for TILE-sized and tensor-core tiles (4 would need ~150 registers a thread)


# ---------------------------------------------------------------------------------------------
# shared device helpers


@triton.jit
def _order_key(x):
    """int32 image of fp32 values with the same order (for integer bisection and ties)."""
    bits = x.to(tl.int32, bitcast=True)
    return tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)


@triton.jit
def _valid_tokens(row_ptr, offs, in_row, stride_n, threshold, HAS_MASK: tl.constexpr, MASK_IS_BOOL: tl.constexpr):
    """`valid_tokens` for one mask row: True for real tokens (boolean keep-mask, or additive
    mask above `threshold`, the mask dtype's `mask_threshold`); every token when there is no mask."""
    if HAS_MASK:
        value = tl.load(row_ptr + offs * stride_n, mask=in_row, other=0)
        if MASK_IS_BOOL:
            valid = value != 0
        else:
            valid = value.to(tl.float32) > threshold
        valid = valid & in_row
    else:
        valid = in_row
    return valid


# ---------------------------------------------------------------------------------------------
# kernels


@triton.jit
def _gather_rows_kernel(x_ptr, idx_ptr, out_ptr, P, N, K, Q, x_batch_stride,
                        BLOCK_K: tl.constexpr, BLOCK_Q: tl.constexpr):
    """out[b, p, k, :] = x[b, p, idx[b, k], :] for a [BLOCK_K, BLOCK_Q] tile."""
    bp = tl.program_id(1).to(tl.int64)
    b = bp // P
    p = bp % P
    k = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
    q = tl.program_id(2) * BLOCK_Q + tl.arange(0, BLOCK_Q)
    k_ok = k < K
    q_ok = q < Q
    token = tl.load(idx_ptr + b * K + k, mask=k_ok, other=0).to(tl.int64)
    token_ok = k_ok & (token >= 0) & (token < N)
    src = x_ptr + b * x_batch_stride + (p * N + token)[:, None] * Q + q[None, :]
    rows = tl.load(src, mask=token_ok[:, None] & q_ok[None, :], other=0)
    dst = out_ptr + (bp * K + k)[:, None] * Q + q[None, :]
    tl.store(dst, rows, mask=k_ok[:, None] & q_ok[None, :])


@triton.jit
def _scatter_positions_kernel(idx_ptr, out_ptr, K, N, BLOCK: tl.constexpr):
    """out[b, idx[b, j]] = j: each kept token's place among the kept ones."""
    b = tl.program_id(0).to(tl.int64)
    j = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    j_ok = j < K
    token = tl.load(idx_ptr + b * K + j, mask=j_ok, other=-1).to(tl.int64)
    tl.store(out_ptr + b * N + token, j.to(tl.int64), mask=j_ok & (token >= 0) & (token < N))


@triton.jit
def _topk_keys_kernel(scores_ptr, mask_ptr, keys_ptr, N, protect, mask_stride_b, mask_stride_n, threshold,
                      HAS_MASK: tl.constexpr, MASK_IS_BOOL: tl.constexpr, BLOCK: tl.constexpr):
    """The ranking `topk_tokens_ref` sorts by, as order keys: the first `protect` real tokens at
    -NEG, real tokens at their score, padding at NEG - position * 1e24 (earlier padding first)."""
    b = tl.program_id(0).to(tl.int64)
    seen = tl.zeros([], tl.int32)  # real tokens in earlier steps
    for start in range(0, N, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        in_row = offs < N
        score = tl.load(scores_ptr + b * N + offs, mask=in_row, other=0).to(tl.float32)
        valid = _valid_tokens(mask_ptr + b * mask_stride_b, offs, in_row, mask_stride_n, threshold,
                              HAS_MASK, MASK_IS_BOOL)
        body = tl.where(valid, score, NEG - offs.to(tl.float32) * PAD_STEP)
        first = valid & (seen + tl.cumsum(valid.to(tl.int32), axis=0) <= protect)
        body = tl.where(first, -NEG, body)
        tl.store(keys_ptr + b * N + offs, _order_key(body), mask=in_row)
        seen += tl.sum(valid.to(tl.int32), axis=0)


@triton.jit
def _select_top_kernel(keys_ptr, out_ptr, N, K, COMPACT: tl.constexpr, BLOCK: tl.constexpr):
    """The K largest keys of each row, ties to the lowest positions. COMPACT writes their
    positions in ascending order to out[b, :K]; otherwise out[b, i] = 1 if i is chosen else 0.

    The K-th largest key T is found digit by digit, 4 bits per counting pass over the row (16
    candidate thresholds at once, 8 passes for 32 bits); then the keys above T, and the first
    (K - #above) equal to T, are chosen in one ordered pass."""
    b = tl.program_id(0).to(tl.int64)
    row = keys_ptr + b * N
    probes = tl.arange(0, 16).to(tl.int64)
    lo = tl.full([], -2147483648, tl.int64)  # count(key >= lo) >= K holds throughout
    for level in tl.static_range(8):
        step = 1 << (28 - 4 * level)
        thresholds = lo + probes * step
        counts = tl.zeros([16], tl.int32)
        for start in range(0, N, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            in_row = offs < N
            key = tl.load(row + offs, mask=in_row, other=-2147483648).to(tl.int64)
            reach = in_row[:, None] & (key[:, None] >= thresholds[None, :])
            counts += tl.sum(reach.to(tl.int32), axis=0)
        lo += (tl.sum((counts >= K).to(tl.int64), axis=0) - 1) * step
    above = tl.zeros([], tl.int32)
    for start in range(0, N, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        in_row = offs < N
        key = tl.load(row + offs, mask=in_row, other=0)
        above += tl.sum((in_row & (key > lo)).to(tl.int32), axis=0)
    ties_wanted = K - above
    ties_seen = tl.zeros([], tl.int32)
    chosen_before = tl.zeros([], tl.int32)
    for start in range(0, N, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        in_row = offs < N
        key = tl.load(row + offs, mask=in_row, other=0)
        tie = in_row & (key == lo)
        tie_rank = ties_seen + tl.cumsum(tie.to(tl.int32), axis=0)
        chosen = (in_row & (key > lo)) | (tie & (tie_rank <= ties_wanted))
        if COMPACT:
            place = chosen_before + tl.cumsum(chosen.to(tl.int32), axis=0) - 1
            tl.store(out_ptr + b * K + place, offs.to(tl.int64), mask=chosen)
        else:
            tl.store(out_ptr + b * N + offs, chosen.to(tl.int64), mask=in_row)
        ties_seen += tl.sum(tie.to(tl.int32), axis=0)
        chosen_before += tl.sum(chosen.to(tl.int32), axis=0)


@triton.jit
def _fuse_weights_kernel(scores_ptr, mask_ptr, slot_ptr, weights_ptr, N, scores_stride_b, mask_stride_b,
                         mask_stride_n, threshold, HAS_MASK: tl.constexpr, MASK_IS_BOOL: tl.constexpr,
                         BLOCK: tl.constexpr):
    """fuse_tokens' weights: softmax over the row (padding at NEG), kept tokens (slot >= 0)
    zeroed, renormalised to sum 1 (or all 0 when nothing is dropped). One online pass for the
    softmax statistics, one to write."""
    b = tl.program_id(0).to(tl.int64)
    top = tl.full([], float("-inf"), tl.float32)
    total = tl.zeros([], tl.float32)
    dropped_total = tl.zeros([], tl.float32)
    for start in range(0, N, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        in_row = offs < N
        logit = tl.load(scores_ptr + b * scores_stride_b + offs, mask=in_row, other=0).to(tl.float32)
        valid = _valid_tokens(mask_ptr + b * mask_stride_b, offs, in_row, mask_stride_n, threshold,
                              HAS_MASK, MASK_IS_BOOL)
        logit = tl.where(in_row, tl.where(valid, logit, NEG), float("-inf"))
        dropped = tl.load(slot_ptr + b * N + offs, mask=in_row, other=0) < 0
        new_top = tl.maximum(top, tl.max(logit, axis=0))
        rescale = tl.exp(top - new_top)
        e = tl.exp(logit - new_top)
        total = total * rescale + tl.sum(e, axis=0)
        dropped_total = dropped_total * rescale + tl.sum(tl.where(dropped, e, 0.0), axis=0)
        top = new_top
    denominator = tl.maximum(dropped_total / total, 1e-12)
    for start in range(0, N, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        in_row = offs < N
        logit = tl.load(scores_ptr + b * scores_stride_b + offs, mask=in_row, other=0).to(tl.float32)
        valid = _valid_tokens(mask_ptr + b * mask_stride_b, offs, in_row, mask_stride_n, threshold,
                              HAS_MASK, MASK_IS_BOOL)
        logit = tl.where(valid, logit, NEG)
        dropped = tl.load(slot_ptr + b * N + offs, mask=in_row, other=0) < 0
        probability = tl.exp(logit - top) / total
        tl.store(weights_ptr + b * N + offs, tl.where(dropped, probability, 0.0) / denominator, mask=in_row)


@triton.jit
def _weighted_sum_kernel(x_ptr, weights_ptr, out_ptr, P, N, Q, x_batch_stride, weights_batch_stride,
                         BLOCK_N: tl.constexpr, BLOCK_Q: tl.constexpr):
    """out[b, p, 0, :] = sum_n x[b, p, n, :] * weights[b, n]."""
    bp = tl.program_id(0).to(tl.int64)
    b = bp // P
    p = bp % P
    q = tl.program_id(1) * BLOCK_Q + tl.arange(0, BLOCK_Q)
    q_ok = q < Q
    acc = tl.zeros([BLOCK_Q], tl.float32)
    for start in range(0, N, BLOCK_N):
        n = start + tl.arange(0, BLOCK_N)
        n_ok = n < N
        w = tl.load(weights_ptr + b * weights_batch_stride + n, mask=n_ok, other=0)
        rows = tl.load(x_ptr + b * x_batch_stride + (p * N + n)[:, None] * Q + q[None, :],
                       mask=n_ok[:, None] & q_ok[None, :], other=0).to(tl.float32)
        acc += tl.sum(rows * w[:, None], axis=0)
    tl.store(out_ptr + bp * Q + q, acc.to(out_ptr.dtype.element_ty), mask=q_ok)


@triton.jit
def _masked_logits(queries, k_base, mask_base, cols, N, D, d, d_ok, rows_ok, scale, k_stride_n, k_stride_d,
                   mask_stride_n, HAS_MASK: tl.constexpr, MASK_IS_BOOL: tl.constexpr, USE_DOT: tl.constexpr):
    """q k^T * scale for a [BLOCK_M, BLOCK_N] tile with the mask applied as the reference does
    (boolean: NEG where False; additive: added); columns past N are -inf."""
    cols_ok = cols < N
    keys = tl.load(k_base + cols[:, None] * k_stride_n + d[None, :] * k_stride_d,
                   mask=cols_ok[:, None] & d_ok[None, :], other=0)
    if USE_DOT:
        logits = tl.dot(queries, tl.trans(keys), input_precision=DOT_PRECISION)
    else:
        logits = tl.sum(queries[:, None, :] * keys.to(tl.float32)[None, :, :], axis=2)
    logits = logits * scale
    if HAS_MASK:
        mask = tl.load(mask_base + cols[None, :] * mask_stride_n, mask=rows_ok[:, None] & cols_ok[None, :], other=0)
        if MASK_IS_BOOL:
            logits = tl.where(mask != 0, logits, NEG)
        else:
            logits = logits + mask.to(tl.float32)
    return tl.where(cols_ok[None, :], logits, float("-inf"))


@triton.jit
def _attention_columns_kernel(q_ptr, k_ptr, mask_ptr, partial_ptr, H, M, N, D, group, scale,
                              q_stride_b, q_stride_h, q_stride_m, q_stride_d,
                              k_stride_b, k_stride_h, k_stride_n, k_stride_d,
                              mask_stride_b, mask_stride_h, mask_stride_m, mask_stride_n,
                              HAS_MASK: tl.constexpr, MASK_IS_BOOL: tl.constexpr, USE_DOT: tl.constexpr,
                              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """Column sums of the softmax attention of BLOCK_M query rows of one (batch, head):
    partial[b, h * row_blocks + row_block, n] = sum_rows softmax(q k^T * scale + mask)[row, n].
    Flash-style: one pass for each row's max and normaliser, one to sum the probabilities."""
    bh = tl.program_id(0).to(tl.int64)
    row_block = tl.program_id(1)
    b = bh // H
    h = bh % H
    kv_head = h // group
    rows = row_block * BLOCK_M + tl.arange(0, BLOCK_M)
    rows_ok = rows < M
    d = tl.arange(0, BLOCK_D)
    d_ok = d < D
    queries = tl.load(q_ptr + b * q_stride_b + h * q_stride_h + rows[:, None] * q_stride_m + d[None, :] * q_stride_d,
                      mask=rows_ok[:, None] & d_ok[None, :], other=0)
    if not USE_DOT:
        queries = queries.to(tl.float32)
    k_base = k_ptr + b * k_stride_b + kv_head * k_stride_h
    mask_base = mask_ptr + b * mask_stride_b + h * mask_stride_h + rows[:, None] * mask_stride_m
    top = tl.full([BLOCK_M], float("-inf"), tl.float32)
    total = tl.zeros([BLOCK_M], tl.float32)
    for start in range(0, N, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        logits = _masked_logits(queries, k_base, mask_base, cols, N, D, d, d_ok, rows_ok, scale, k_stride_n,
                                k_stride_d, mask_stride_n, HAS_MASK, MASK_IS_BOOL, USE_DOT)
        new_top = tl.maximum(top, tl.max(logits, axis=1))
        shift = tl.where(new_top == float("-inf"), 0.0, new_top)  # rows masked so far: no NaN yet
        total = total * tl.exp(top - shift) + tl.sum(tl.exp(logits - shift[:, None]), axis=1)
        top = new_top
    for start in range(0, N, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        logits = _masked_logits(queries, k_base, mask_base, cols, N, D, d, d_ok, rows_ok, scale, k_stride_n,
                                k_stride_d, mask_stride_n, HAS_MASK, MASK_IS_BOOL, USE_DOT)
        probability = tl.exp(logits - top[:, None]) / total[:, None]
        column = tl.sum(tl.where(rows_ok[:, None], probability, 0.0), axis=0)
        out_row = bh * tl.num_programs(1) + row_block
        tl.store(partial_ptr + out_row * N + cols, column, mask=cols < N)


@triton.jit
def _column_mean_kernel(partial_ptr, out_ptr, G, N, count, LAST_IS_TWO: tl.constexpr, BLOCK: tl.constexpr):
    """out[b, n] = sum_g partial[b, g, n] / count; with LAST_IS_TWO the last token scores 2.0."""
    b = tl.program_id(0).to(tl.int64)
    n = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    n_ok = n < N
    acc = tl.zeros([BLOCK], tl.float32)
    for g in range(0, G):
        acc += tl.load(partial_ptr + (b * G + g) * N + n, mask=n_ok, other=0)
    score = acc / count
    if LAST_IS_TWO:
        score = tl.where(n == N - 1, 2.0, score)
    tl.store(out_ptr + b * N + n, score.to(out_ptr.dtype.element_ty), mask=n_ok)


@triton.jit
def _key_norm_kernel(k_ptr, out_ptr, H, N, D, k_stride_b, k_stride_h, k_stride_n, k_stride_d,
                     BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """out[b, n] = -mean_h ||k[b, h, n, :]|| (token_scores mode 2)."""
    b = tl.program_id(0).to(tl.int64)
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = n < N
    d = tl.arange(0, BLOCK_D)
    acc = tl.zeros([BLOCK_N], tl.float32)
    for h in range(0, H):
        keys = tl.load(k_ptr + b * k_stride_b + h * k_stride_h + n[:, None] * k_stride_n + d[None, :] * k_stride_d,
                       mask=n_ok[:, None] & (d < D)[None, :], other=0).to(tl.float32)
        acc += tl.sqrt(tl.sum(keys * keys, axis=1))
    tl.store(out_ptr + b * N + n, (-(acc / H)).to(out_ptr.dtype.element_ty), mask=n_ok)


@triton.jit
def _token_sizes_kernel(mask_ptr, out_ptr, N, mask_stride_b, mask_stride_n, threshold,
                        HAS_MASK: tl.constexpr, MASK_IS_BOOL: tl.constexpr, BLOCK: tl.constexpr):
    """out[b, n] = 1 for a real token, 0 for padding, in the output's dtype."""
    b = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    in_row = offs < N
    valid = _valid_tokens(mask_ptr + b * mask_stride_b, offs, in_row, mask_stride_n, threshold, HAS_MASK, MASK_IS_BOOL)
    tl.store(out_ptr + b * N + offs, valid.to(out_ptr.dtype.element_ty), mask=in_row)


@triton.jit
def _match_kernel(metric_ptr, size_ptr, keys_ptr, partner_ptr, NA, NB, C, protect,
                  metric_stride_b, metric_stride_n, metric_stride_c, size_stride_b, size_stride_n,
                  BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr):
    """For BLOCK_A tokens of set A (even positions): the most cosine-similar usable B token
    (odd, real, not protected; first on ties) and the merge priority the reference ranks by:
    padding first, then by similarity, later A tokens a TIE lower, protected ones never."""
    b = tl.program_id(0).to(tl.int64)
    a = tl.program_id(1) * BLOCK_A + tl.arange(0, BLOCK_A)
    a_ok = a < NA
    c = tl.arange(0, BLOCK_C)
    c_ok = c < C
    metric_row = metric_ptr + b * metric_stride_b
    left = tl.load(metric_row + (2 * a)[:, None] * metric_stride_n + c[None, :] * metric_stride_c,
                   mask=a_ok[:, None] & c_ok[None, :], other=0).to(tl.float32)
    left = left / tl.maximum(tl.sqrt(tl.sum(left * left, axis=1)), 1e-12)[:, None]
    best = tl.full([BLOCK_A], float("-inf"), tl.float32)
    partner = tl.zeros([BLOCK_A], tl.int32)
    for start in range(0, NB, BLOCK_B):
        j = start + tl.arange(0, BLOCK_B)
        j_ok = j < NB
        right = tl.load(metric_row + (2 * j + 1)[:, None] * metric_stride_n + c[None, :] * metric_stride_c,
                        mask=j_ok[:, None] & c_ok[None, :], other=0).to(tl.float32)
        right = right / tl.maximum(tl.sqrt(tl.sum(right * right, axis=1)), 1e-12)[:, None]
        similarity = tl.dot(left, tl.trans(right), input_precision=DOT_PRECISION)
        right_size = tl.load(size_ptr + b * size_stride_b + (2 * j + 1) * size_stride_n, mask=j_ok, other=0)
        usable = (right_size > 0) & (2 * j + 1 >= protect)
        similarity = tl.where(usable[None, :], similarity, NEG)
        similarity = tl.where(j_ok[None, :], similarity, float("-inf"))
        step_best = tl.max(similarity, axis=1)
        step_partner = tl.argmax(similarity, axis=1, tie_break_left=True) + start
        better = step_best > best  # strict: an earlier B token wins a tie
        partner = tl.where(better, step_partner, partner)
        best = tl.where(better, step_best, best)
    a_size = tl.load(size_ptr + b * size_stride_b + (2 * a) * size_stride_n, mask=a_ok, other=0)
    rank = a.to(tl.float32) * TIE
    priority = tl.where(a_size > 0, best - rank, 2.0 - rank)
    priority = tl.where(2 * a < protect, 3 * NEG, priority)
    tl.store(keys_ptr + b * NA + a, _order_key(priority), mask=a_ok)
    tl.store(partner_ptr + b * NA + a, partner.to(tl.int64), mask=a_ok)


@triton.jit
def _merge_plan_kernel(merged_ptr, keep_ptr, sources_ptr, N, NA, K, BLOCK: tl.constexpr):
    """From the merged flags of the A tokens: the survivors in order (keep) and each survivor's
    new index (sources; merged tokens are redirected by `_merge_redirect_kernel`)."""
    b = tl.program_id(0).to(tl.int64)
    kept = tl.zeros([], tl.int64)
    for start in range(0, N, BLOCK):
        i = start + tl.arange(0, BLOCK)
        in_row = i < N
        in_a = in_row & (i % 2 == 0)
        merged = tl.load(merged_ptr + b * NA + i // 2, mask=in_a, other=0) != 0
        survives = in_row & ~merged
        new_index = kept + tl.cumsum(survives.to(tl.int64), axis=0) - 1
        tl.store(keep_ptr + b * K + new_index, i.to(tl.int64), mask=survives)
        tl.store(sources_ptr + b * N + i, new_index, mask=survives)
        kept += tl.sum(survives.to(tl.int64), axis=0)


@triton.jit
def _merge_redirect_kernel(merged_ptr, partner_ptr, sources_ptr, N, NA, BLOCK: tl.constexpr):
    """A merged A token points where its B partner (a survivor) points."""
    b = tl.program_id(0).to(tl.int64)
    a = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    merged = (a < NA) & (tl.load(merged_ptr + b * NA + a, mask=a < NA, other=0) != 0)
    destination = 2 * tl.load(partner_ptr + b * NA + a, mask=merged, other=0) + 1
    target = tl.load(sources_ptr + b * N + destination, mask=merged, other=0)
    tl.store(sources_ptr + b * N + 2 * a, target, mask=merged)


@triton.jit
def _merge_kernel(x_ptr, weights_ptr, members_ptr, starts_ptr, keep_ptr, out_ptr, new_size_ptr,
                  P, N, K, Q, BLOCK_Q: tl.constexpr):
    """Survivor k of (b, p): the weight-weighted mean of the tokens that point at it (members
    listed in ascending order between starts[b, k] and starts[b, k + 1]), or its own row when
    they weigh nothing. No atomics: the sum order is fixed, so results are deterministic."""
    k = tl.program_id(0).to(tl.int64)
    bp = tl.program_id(1).to(tl.int64)
    q_block = tl.program_id(2)
    b = bp // P
    p = bp % P
    q = q_block * BLOCK_Q + tl.arange(0, BLOCK_Q)
    q_ok = q < Q
    first = tl.load(starts_ptr + b * (K + 1) + k)
    last = tl.load(starts_ptr + b * (K + 1) + k + 1)
    total = tl.zeros([BLOCK_Q], tl.float32)
    weight = tl.zeros([], tl.float32)
    x_base = x_ptr + b * P * N * Q + p * N * Q
    for j in range(first, last):
        member = tl.load(members_ptr + b * N + j)
        w = tl.load(weights_ptr + b * N + member).to(tl.float32)
        total += tl.load(x_base + member * Q + q, mask=q_ok, other=0).to(tl.float32) * w
        weight += w
    own = tl.load(x_base + tl.load(keep_ptr + b * K + k) * Q + q, mask=q_ok, other=0).to(tl.float32)
    merged = tl.where(weight > 0, total / tl.maximum(weight, 1e-12), own)
    tl.store(out_ptr + (bp * K + k) * Q + q, merged.to(out_ptr.dtype.element_ty), mask=q_ok)
    if (p == 0) & (q_block == 0):
        tl.store(new_size_ptr + b * K + k, weight.to(new_size_ptr.dtype.element_ty))


@triton.jit
def _window_kernel(mask_ptr, out_ptr, T, sink, size, BLOCK: tl.constexpr):
    """window_tokens in two ordered passes (its selection has no ties): the first `sink` real
    slots, the most recent real slots that fit, then the latest padding slots to fill `size`."""
    b = tl.program_id(0).to(tl.int64)
    row = mask_ptr + b * T
    real = tl.zeros([], tl.int32)
    for start in range(0, T, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        real += tl.sum(((offs < T) & (tl.load(row + offs, mask=offs < T, other=0) != 0)).to(tl.int32), axis=0)
    sinks = tl.minimum(real, sink)
    recent = tl.minimum(real - sinks, size - sinks)
    padding_kept = size - sinks - recent
    padding = T - real
    real_seen = tl.zeros([], tl.int32)
    padding_seen = tl.zeros([], tl.int32)
    chosen_before = tl.zeros([], tl.int32)
    for start in range(0, T, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        in_row = offs < T
        valid = in_row & (tl.load(row + offs, mask=in_row, other=0) != 0)
        pad = in_row & ~valid
        real_rank = real_seen + tl.cumsum(valid.to(tl.int32), axis=0)
        padding_rank = padding_seen + tl.cumsum(pad.to(tl.int32), axis=0)
        chosen = (valid & ((real_rank <= sinks) | (real_rank > real - recent))) | \
                 (pad & (padding_rank > padding - padding_kept))
        place = chosen_before + tl.cumsum(chosen.to(tl.int32), axis=0) - 1
        tl.store(out_ptr + b * size + place, offs.to(tl.int64), mask=chosen)
        real_seen += tl.sum(valid.to(tl.int32), axis=0)
        padding_seen += tl.sum(pad.to(tl.int32), axis=0)
        chosen_before += tl.sum(chosen.to(tl.int32), axis=0)


@triton.jit
def _positions_kernel(mask_ptr, out_ptr, T, first_column, BLOCK: tl.constexpr):
    """out[b, t - first_column] = max(real tokens up to t - 1, 0) for t >= first_column, where
    a slot counts as mask.long() does."""
    b = tl.program_id(0).to(tl.int64)
    width = T - first_column
    seen = tl.zeros([], tl.int64)
    for start in range(0, T, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        in_row = offs < T
        count = tl.load(mask_ptr + b * T + offs, mask=in_row, other=0).to(tl.int64)
        position = tl.maximum(seen + tl.cumsum(count, axis=0) - 1, 0)
        tl.store(out_ptr + b * width + offs - first_column, position, mask=in_row & (offs >= first_column))
        seen += tl.sum(count, axis=0)


# ---------------------------------------------------------------------------------------------
# launcher glue


def _block(n: int, cap: int, floor: int = 1) -> int:
    return max(floor, min(triton.next_power_of_2(max(n, 1)), cap))


def _token_dim(x: Tensor, dim: int, op: str) -> int:
    """`dim` as a non-negative index; the token dim comes after the batch dim."""
    if not -x.dim() <= dim < x.dim() or dim % x.dim() == 0:
        raise ValueError(f"{op}: dim {dim} is not a token dim of a {x.dim()}-d tensor (batch is dim 0)")
    return dim % x.dim()


def _rows(x: Tensor, dim: int) -> tuple[int, int, int]:
    """(P, N, Q) of x viewed as [B, P, N, Q] around its token dim."""
    return math.prod(x.shape[1:dim]), x.shape[dim], math.prod(x.shape[dim + 1:])


def _storage(t: Tensor) -> Tensor:
    """A tensor Triton can point at: booleans as bytes (same layout)."""
    return t.view(torch.uint8) if t.dtype == torch.bool else t


def _batch_stride(t: Tensor, batch: int, op: str) -> int:
    """Stride of dim 0 of `t` read as `batch` rows: its own, or 0 for a broadcast batch of 1."""
    if t.shape[0] == batch:
        return t.stride(0)
    if t.shape[0] == 1:
        return 0
    raise ValueError(f"{op}: a batch of {t.shape[0]} does not broadcast to {batch}")


class _MaskRow(NamedTuple):
    """A token-validity mask as the kernels read it (see `valid_tokens`)."""
    tensor: Tensor
    stride_b: int
    stride_n: int
    present: bool
    is_bool: bool
    threshold: float

    @staticmethod
    def of(mask: Tensor | None, batch: int, n: int, like: Tensor) -> "_MaskRow":
        if mask is None:
            return _MaskRow(like, 0, 0, False, False, 0.0)
        row = mask[:, 0, -1, :] if mask.dim() == 4 else mask
        row = row.expand(batch, n)  # the reference's expand_as: broadcast dims get stride 0
        is_bool = row.dtype == torch.bool
        return _MaskRow(_storage(row), row.stride(0), row.stride(1), True, is_bool,
                        0.0 if is_bool else mask_threshold(row.dtype))


def _gather(x: Tensor, idx: Tensor, dim: int, op: str) -> Tensor:
    """gather_tokens and restore_tokens: one row copy per (kept token, P) pair."""
    dim = _token_dim(x, dim, op)
    batch, count = idx.shape
    x = x.contiguous()
    x_batch_stride = _batch_stride(x, batch, op)
    p, n, q = _rows(x, dim)
    shape = list(x.shape)
    shape[0], shape[dim] = batch, count
    out = torch.empty(shape, dtype=x.dtype, device=x.device)
    if out.numel():
        block_q = _block(q, 256)
        block_k = _block(count, max(1, TILE // block_q))
        grid = (triton.cdiv(count, block_k), batch * p, triton.cdiv(q, block_q))
        _gather_rows_kernel[grid](_storage(x), idx.contiguous(), _storage(out), p, n, count, q, x_batch_stride,
                                  BLOCK_K=block_k, BLOCK_Q=block_q, num_warps=TILE_WARPS)
    return out


def _select_top(keys: Tensor, count: int, compact: bool) -> Tensor:
    """Run `_select_top_kernel` on [B, N] int32 keys: ascending positions [B, count] or flags."""
    batch, n = keys.shape
    out = torch.empty((batch, count if compact else n), dtype=torch.int64, device=keys.device)
    if batch and n:
        _select_top_kernel[(batch,)](keys, out, n, count, COMPACT=compact, BLOCK=_block(n, 256))
    return out


def _row_mask(mask: Tensor) -> Tensor:
    """A decoder's [B, T] cache mask as the row-scanning kernels read it (rows of T)."""
    return _storage(mask.contiguous())


# ---------------------------------------------------------------------------------------------
# launchers (signatures and semantics of the references)


def gather_tokens(x: Tensor, idx: Tensor, dim: int) -> Tensor:
    """`gather_tokens_ref`: x with only the tokens idx[b] along dim (x's batch of 1 broadcasts)."""
    return _gather(x, idx, dim, "gather_tokens")


def restore_tokens(x: Tensor, src: Tensor, dim: int) -> Tensor:
    """`restore_tokens_ref`: original token i takes x[src[b, i]] (a gather)."""
    return _gather(x, src, dim, "restore_tokens")


def token_sources(idx: Tensor, n: int, fill: int) -> Tensor:
    """`token_sources_ref`: [B, n], each token's index among the kept ones, `fill` if dropped."""
    batch, count = idx.shape
    out = torch.full((batch, n), fill, dtype=torch.int64, device=idx.device)
    if batch and count:
        block = _block(count, MAX_BLOCK)
        _scatter_positions_kernel[(batch, triton.cdiv(count, block))](idx.contiguous(), out, count, n, BLOCK=block)
    return out


def topk_tokens(scores: Tensor, mask: Tensor | None, keep: float, protect: int) -> Tensor:
    """`topk_tokens_ref`: [B, kept_count] ascending indices of the protected real tokens, then the
    best-scored real ones, then the earliest padding."""
    batch, n = scores.shape
    scores = scores.contiguous()
    rows = _MaskRow.of(mask, batch, n, scores)
    keys = torch.empty((batch, n), dtype=torch.int32, device=scores.device)
    if batch and n:
        _topk_keys_kernel[(batch,)](scores, rows.tensor, keys, n, protect, rows.stride_b, rows.stride_n,
                                    rows.threshold, HAS_MASK=rows.present, MASK_IS_BOOL=rows.is_bool,
                                    BLOCK=_block(n, MAX_BLOCK))
    return _select_top(keys, kept_count(n, keep, protect), compact=True)


def fuse_tokens(x: Tensor, scores: Tensor, mask: Tensor | None, idx: Tensor, dim: int) -> Tensor:
    """`fuse_tokens_ref`: one token, the mean of the real tokens not in idx weighted by the
    softmax of their scores."""
    dim = _token_dim(x, dim, "fuse_tokens")
    batch, n = scores.shape
    out_batch = max(batch, x.shape[0])
    x = x.contiguous()
    scores = scores.contiguous()
    rows = _MaskRow.of(mask, batch, n, scores)
    dropped = token_sources(idx, n, -1)
    weights = torch.empty((batch, n), dtype=torch.float32, device=scores.device)
    x_batch_stride = _batch_stride(x, out_batch, "fuse_tokens")
    weights_batch_stride = _batch_stride(weights, out_batch, "fuse_tokens")
    p, _, q = _rows(x, dim)
    shape = list(x.shape)
    shape[0], shape[dim] = out_batch, 1
    out = torch.empty(shape, dtype=x.dtype, device=x.device)
    if not out.numel():
        return out
    block = _block(n, MAX_BLOCK)
    _fuse_weights_kernel[(batch,)](scores, rows.tensor, dropped, weights, n, scores.stride(0), rows.stride_b,
                                   rows.stride_n, rows.threshold, HAS_MASK=rows.present,
                                   MASK_IS_BOOL=rows.is_bool, BLOCK=block)
    block_q = _block(q, 256)
    block_n = _block(n, max(1, TILE // block_q))
    _weighted_sum_kernel[(out_batch * p, triton.cdiv(q, block_q))](
        x, weights, out, p, n, q, x_batch_stride, weights_batch_stride,
        BLOCK_N=block_n, BLOCK_Q=block_q, num_warps=TILE_WARPS)
    return out


def token_scores(q: Tensor, k: Tensor, mask: Tensor | None, scale: float, mode: int) -> Tensor:
    """`token_scores_ref`: importance of each key token [B, N] in fp32, averaged over heads (modes 0:
    first query's attention, 1: mean attention received, 2: minus key norm, 3: last query's
    attention with the last token at 2.0)."""
    if mode == 2:
        return _key_norm_scores(k)
    heads, kv_heads, n, head_dim = q.shape[1], k.shape[1], k.shape[2], q.shape[3]
    if heads % kv_heads:
        raise ValueError(f"token_scores: {heads} query heads do not group over {kv_heads} key heads")
    queries = q[:, :, :1] if mode == 0 else q[:, :, -1:] if mode == 3 else q
    mask_is_bool = mask is not None and mask.dtype == torch.bool
    if mask is not None:
        mask = mask.reshape((1,) * (4 - mask.dim()) + tuple(mask.shape))
        if mode in (0, 3) and mask.shape[-2] != 1:
            mask = mask[:, :, :1] if mode == 0 else mask[:, :, -1:]
    rows = queries.shape[2]
    batch = torch.broadcast_shapes((q.shape[0],), (k.shape[0],), (mask.shape[0],) if mask is not None else (1,))[0]
    queries = queries.expand(batch, heads, rows, head_dim)
    keys = k.expand(batch, kv_heads, n, head_dim)
    if mask is not None:
        mask = _storage(mask.expand(batch, heads, rows, n))
    mask_arg = mask if mask is not None else queries
    mask_strides = mask.stride() if mask is not None else (0, 0, 0, 0)
    use_dot = rows > 1
    block_m = _block(rows, 64, floor=16) if use_dot else 1
    block_d = _block(head_dim, 256, floor=16)
    block_n = _block(n, 64 if use_dot else max(16, TILE // block_d), floor=16)
    row_blocks = triton.cdiv(rows, block_m)
    partial = torch.empty((batch, heads * row_blocks, n), dtype=torch.float32, device=q.device)
    out = torch.empty((batch, n), dtype=torch.float32, device=q.device)
    if not out.numel():
        return out
    _attention_columns_kernel[(batch * heads, row_blocks)](
        queries, keys, mask_arg, partial, heads, rows, n, head_dim, heads // kv_heads, scale,
        *queries.stride(), *keys.stride(), *mask_strides,
        HAS_MASK=mask is not None, MASK_IS_BOOL=mask_is_bool,
        USE_DOT=use_dot, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, num_warps=TILE_WARPS if use_dot else 4)
    block = _block(n, MAX_BLOCK)
    _column_mean_kernel[(batch, triton.cdiv(n, block))](partial, out, heads * row_blocks, n, float(heads * rows),
                                                        LAST_IS_TWO=mode == 3, BLOCK=block)
    return out


def _key_norm_scores(k: Tensor) -> Tensor:
    batch, heads, n, head_dim = k.shape
    out = torch.empty((batch, n), dtype=torch.float32, device=k.device)
    if out.numel():
        block_d = _block(head_dim, 256)
        block_n = _block(n, max(1, TILE // block_d))
        _key_norm_kernel[(batch, triton.cdiv(n, block_n))](k, out, heads, n, head_dim, *k.stride(),
                                                           BLOCK_N=block_n, BLOCK_D=block_d, num_warps=TILE_WARPS)
    return out


def token_sizes(x: Tensor, mask: Tensor | None, dim: int) -> Tensor:
    """`token_sizes_ref`: [B, N] in fp32, 1 for a real token and 0 for padding."""
    batch, n = x.shape[0], x.shape[dim]
    out = torch.empty((batch, n), dtype=torch.float32, device=x.device)
    rows = _MaskRow.of(mask, batch, n, out)
    if out.numel():
        block = _block(n, MAX_BLOCK)
        _token_sizes_kernel[(batch, triton.cdiv(n, block))](rows.tensor, _storage(out), n, rows.stride_b,
                                                            rows.stride_n, rows.threshold, HAS_MASK=rows.present,
                                                            MASK_IS_BOOL=rows.is_bool, BLOCK=block)
    return out


def bipartite_match(metric: Tensor, size: Tensor, r: int, protect: int) -> tuple[Tensor, Tensor]:
    """`bipartite_match_ref`: (keep [B, K] surviving old indices in order, sources [B, N] each old
    token's index among the survivors)."""
    batch, n, channels = metric.shape
    count = merge_count(n, r, protect)
    removed = n - count
    a_count, b_count = (n + 1) // 2, n // 2
    if removed and not b_count:
        raise ValueError(f"bipartite_match: {n} token(s) leave no partner to merge {removed} into")
    device = metric.device
    # Without B tokens nothing is removed, so the keys are never compared and partners never read.
    keys = torch.empty((batch, a_count), dtype=torch.int32, device=device)
    partner = torch.empty((batch, a_count), dtype=torch.int64, device=device)
    if batch and b_count:
        block_a = _block(a_count, 64, floor=16)
        block_c = _block(channels, 256, floor=16)
        _match_kernel[(batch, triton.cdiv(a_count, block_a))](
            metric, size, keys, partner, a_count, b_count, channels, protect, *metric.stride(), *size.stride(),
            BLOCK_A=block_a, BLOCK_B=_block(b_count, 64, floor=16), BLOCK_C=block_c)
    merged = _select_top(keys, removed, compact=False)
    keep = torch.empty((batch, count), dtype=torch.int64, device=device)
    sources = torch.empty((batch, n), dtype=torch.int64, device=device)
    if batch and n:
        block = _block(n, MAX_BLOCK)
        _merge_plan_kernel[(batch,)](merged, keep, sources, n, a_count, count, BLOCK=block)
        if removed:
            _merge_redirect_kernel[(batch, triton.cdiv(a_count, block))](merged, partner, sources, n, a_count,
                                                                         BLOCK=block)
    return keep, sources


def bipartite_merge(x: Tensor, size: Tensor, sources: Tensor, keep: Tensor, dim: int) -> tuple[Tensor, Tensor]:
    """`bipartite_merge_ref`: each survivor the size-weighted mean of the tokens that point at it
    (its own value when they weigh nothing), and the new sizes [B, K] in fp32."""
    dim = _token_dim(x, dim, "bipartite_merge")
    batch, count = keep.shape
    x = x.contiguous()
    p, n, q = _rows(x, dim)
    # Group the tokens by survivor: a stable sort of the small [B, N] index tensor lists each
    # survivor's members in ascending order, and `starts` delimits them.
    ordered, members = torch.sort(sources, dim=1, stable=True)
    survivors = torch.arange(count + 1, device=x.device).expand(batch, count + 1).contiguous()
    starts = torch.searchsorted(ordered.contiguous(), survivors)
    weights = size.float().contiguous()
    shape = list(x.shape)
    shape[dim] = count
    out = torch.empty(shape, dtype=x.dtype, device=x.device)
    new_size = torch.empty((batch, count), dtype=torch.float32, device=x.device)
    if out.numel():
        block_q = _block(q, 1024)
        _merge_kernel[(count, batch * p, triton.cdiv(q, block_q))](
            x, weights, members.contiguous(), starts, keep.contiguous(), out, new_size, p, n, count, q,
            BLOCK_Q=block_q)
    return out, new_size


def window_tokens(mask: Tensor, sink: int, window: int) -> Tensor:
    """`window_tokens_ref`: [B, min(T, sink + window)] ascending slots, the first `sink` real
    ones then the most recent, padding only when there are too few real tokens."""
    batch, t = mask.shape
    size = window_size(t, sink, window)
    out = torch.empty((batch, size), dtype=torch.int64, device=mask.device)
    if out.numel():
        _window_kernel[(batch,)](_row_mask(mask), out, t, sink, size, BLOCK=_block(t, MAX_BLOCK))
    return out


def cache_positions(mask: Tensor, input_ids: Tensor) -> Tensor:
    """`cache_positions_ref`: [B, n] positions of the step's n new tokens (real tokens before)."""
    batch, t = mask.shape
    new = input_ids.shape[1]
    if new > t:
        raise ValueError(f"cache_positions: the mask covers {t} slots, fewer than the {new} new tokens")
    out = torch.empty((batch, new), dtype=torch.int64, device=mask.device)
    if out.numel():
        _positions_kernel[(batch,)](_row_mask(mask), out, t, t - new, BLOCK=_block(t, MAX_BLOCK))
    return out


def sink_index(idx: Tensor, sink: int, x: Tensor, dim: int) -> Tensor:
    """`sink_index_ref`: an index, no arithmetic; built with torch's own copy."""
    return window_ref.sink_index_ref(idx, sink, x, dim)


def window_join(sinks: Tensor, x: Tensor, start: int, dim: int) -> Tensor:
    """`window_join_ref`: `sinks`, then `x` from slot `start` on."""
    dim = _token_dim(x, dim, "window_join")
    last = torch.arange(start, x.shape[dim], device=sinks.device).expand(sinks.shape[0], x.shape[dim] - start)
    return torch.cat([sinks, _gather(x, last, dim, "window_join")], dim)


KERNELS: dict[str, Callable] = {
    "skim::gather_tokens": gather_tokens,
    "skim::restore_tokens": restore_tokens,
    "skim::topk_tokens": topk_tokens,
    "skim::fuse_tokens": fuse_tokens,
    "skim::token_scores": token_scores,
    "skim::token_sources": token_sources,
    "skim::token_sizes": token_sizes,
    "skim::bipartite_match": bipartite_match,
    "skim::bipartite_merge": bipartite_merge,
    "skim::window_tokens": window_tokens,
    "skim::cache_positions": cache_positions,
    "skim::sink_index": sink_index,
    "skim::window_join": window_join,
}


# ---------------------------------------------------------------------------------------------
# ahead-of-time compilation


def _aot(kernel, name: str, types: str, *, num_warps: int = 4, **constexprs) -> AotEntry:
    """Pair `types` (one per runtime argument, in order) with the kernel's argument names; the
    constexpr arguments take the values given."""
    params = list(kernel.arg_names)
    annotations = kernel.fn.__annotations__
    runtime = [p for p in params if p not in annotations]
    if len(types.split()) != len(runtime) or set(constexprs) != set(annotations):
        raise ValueError(f"AOT entry {name}: {types.split()} / {sorted(constexprs)} do not cover "
                         f"{runtime} / {sorted(annotations)}")
    types_by_name = dict(zip(runtime, types.split()))
    signature = {p: types_by_name.get(p, "constexpr") for p in params}
    return AotEntry(name, kernel, signature, constexprs, {"num_warps": num_warps})


AOT: list[AotEntry] = [
    _aot(_gather_rows_kernel, "gather_tokens: fp16 KV cache [B, H, T, 64] on dim 2",
         "*fp16 *i64 *fp16 i32 i32 i32 i32 i64", BLOCK_K=64, BLOCK_Q=64, num_warps=TILE_WARPS),
    _aot(_scatter_positions_kernel, "token_sources", "*i64 *i64 i32 i32", BLOCK=256),
    _aot(_topk_keys_kernel, "topk_tokens keys: fp32 scores, additive fp16 mask",
         "*fp32 *fp16 *i32 i32 i32 i64 i64 fp32", HAS_MASK=True, MASK_IS_BOOL=False, BLOCK=256),
    _aot(_select_top_kernel, "topk selection, ascending indices", "*i32 *i64 i32 i32", COMPACT=True, BLOCK=256),
    _aot(_fuse_weights_kernel, "fuse_tokens weights: fp32 scores, boolean mask",
         "*fp32 *u8 *i64 *fp32 i32 i64 i64 i64 fp32", HAS_MASK=True, MASK_IS_BOOL=True, BLOCK=256),
    _aot(_weighted_sum_kernel, "fuse_tokens sum: fp16 [B, 197, 768]",
         "*fp16 *fp32 *fp16 i32 i32 i32 i64 i64", BLOCK_N=16, BLOCK_Q=256, num_warps=TILE_WARPS),
    _aot(_attention_columns_kernel, "token_scores mode 1: fp16, head dim 64, additive fp32 mask",
         "*fp16 *fp16 *fp32 *fp32 i32 i32 i32 i32 i32 fp32 " + "i64 " * 12,
         HAS_MASK=True, MASK_IS_BOOL=False, USE_DOT=True, BLOCK_M=64, BLOCK_N=64, BLOCK_D=64,
         num_warps=TILE_WARPS),
    _aot(_column_mean_kernel, "token_scores column mean, mode 3", "*fp32 *fp32 i32 i32 fp32",
         LAST_IS_TWO=True, BLOCK=256),
    _aot(_key_norm_kernel, "token_scores mode 2: fp16 keys, head dim 64", "*fp16 *fp32 i32 i32 i32 i64 i64 i64 i64",
         BLOCK_N=64, BLOCK_D=64, num_warps=TILE_WARPS),
    _aot(_token_sizes_kernel, "token_sizes: fp32 out, boolean mask", "*u8 *fp32 i32 i64 i64 fp32",
         HAS_MASK=True, MASK_IS_BOOL=True, BLOCK=256),
    _aot(_match_kernel, "bipartite_match: fp16 metric [B, 197, 64]",
         "*fp16 *fp32 *i32 *i64 i32 i32 i32 i32 i64 i64 i64 i64 i64", BLOCK_A=64, BLOCK_B=64, BLOCK_C=64),
    _aot(_merge_plan_kernel, "bipartite_match plan", "*i64 *i64 *i64 i32 i32 i32", BLOCK=256),
    _aot(_merge_redirect_kernel, "bipartite_match redirect", "*i64 *i64 *i64 i32 i32", BLOCK=256),
    _aot(_merge_kernel, "bipartite_merge: fp16 [B, 197, 768]",
         "*fp16 *fp32 *i64 *i64 *i64 *fp16 *fp32 i32 i32 i32 i32", BLOCK_Q=1024),
    _aot(_window_kernel, "window_tokens: int64 mask", "*i64 *i64 i32 i32 i32", BLOCK=1024),
    _aot(_positions_kernel, "cache_positions: int64 mask", "*i64 *i64 i32 i32", BLOCK=1024),
]
