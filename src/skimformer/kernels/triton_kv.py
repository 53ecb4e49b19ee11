"""Triton kernels for the KV-cache ops (`kv-evict`'s and `kv-quant`'s), for CUDA backends.

Every launcher has exactly its op's signature and semantics; the plain-torch references in
`skimformer.kernels.evict` and `skimformer.kernels.quant` stay the definition of correct, and the
tests compare each launcher against its reference under Triton's interpreter
(`TRITON_INTERPRET=1`, where kernels take CPU tensors). Launchers only allocate, pick block
sizes and pass strides; every byte the op moves is moved by a kernel.

- `kv_attention_scores`: three passes, flash-attention style, never materializing the
  `[queries, T]` probabilities: per query row its log-sum-exp over the causal, masked keys; then
  per block of keys the probabilities recomputed from it and summed over the window's queries and
  the group's query heads (each key block owned by one program, so no atomics and the sums are
  deterministic); then SnapKV's average pooling along tokens.
- `kv_key_norm_scores`, `kv_accumulate`, `kv_gather`: one streaming pass each.
- `kv_select`: a top-k per KV head in one program per row: the reference's float64 ranks mapped
  to order-preserving int64 keys, the k-th largest key found by bisection on its bits (64
  counting passes over the row, held in registers when it fits), then the kept positions
  written in ascending order by a prefix sum. Ranks are distinct by the reference's design
  except for exactly tied scores (a zero score, a repeated key's norm), where the reference's
  `torch.topk` picks in an unspecified order; this kernel keeps the earliest of them.
- `kv_quantize`, `kv_append`: KIVI quantization (keys per channel over `group` tokens, values per
  token over `channels` channels) with the reference's roundings step by step, so codes match it
  bit for bit; `kv_append`'s concatenation is a copy kernel into the grown tensors.
- `quant_attention`: flash-decoding over the bit-packed cache. Programs split the quantized
  tokens into chunks (enough programs to fill the GPU) plus one program per KV head for the
  full-precision tail; each reads packed codes and scales, unpacks them in registers, runs the
  online softmax for every query head that shares its KV head (grouped-query attention reads the
  cache once), and writes a partial result; a second kernel combines the partials. Keys are
  never dequantized element by element when a block of tokens shares one group's scales: the
  scale folds into the queries and the zero into one dot product per query. At 4 bits with
  group 32 it reads about a third of the bytes that attention over an fp16 cache reads.

`KERNELS` maps each op's name to its launcher (the caller registers them for CUDA); `AOT` lists
one representative compile configuration per kernel for `triton.compile`. Only torch, triton and
the reference modules are imported: a GPU machine runs this with nothing else installed.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
import triton
import triton.language as tl
from torch import Tensor

from skimformer.kernels.aot import AotEntry
from skimformer.kernels.evict import SPACING, TIE, TOP, kept_tokens
from skimformer.kernels.precision import scale_floor
from skimformer.kernels.quant import quantized_length

# A masked logit. The references fill with the dtype's most negative value; the kernels scale
# logits by log2(e) after masking, which would overflow that to -inf (and a row of -inf to NaN),
# so they fill with a finite value softmax sends to 0 all the same.
_NEG = tl.constexpr(-1e30)
_TOP = tl.constexpr(TOP)
_SPACING = tl.constexpr(SPACING)
_TIE = tl.constexpr(TIE)
_LOG2E = tl.constexpr(math.log2(math.e))
_INF = tl.constexpr(float("inf"))
_INT64_MAX = tl.constexpr(0x7FFFFFFFFFFFFFFF)
SELECT_MAX_BLOCK = 16384  # kv_select holds rows up to this many tokens in registers,
SELECT_CHUNK = 4096  # and reads longer ones in chunks of this many


def _pow2(n: int, low: int, high: int) -> int:
    """`n` rounded up to a power of two, within [low, high] (block sizes are powers of two)."""
    return max(low, min(high, triton.next_power_of_2(max(int(n), 1))))


def _loadable(x: Tensor) -> Tensor:
    """Boolean tensors as uint8 (same bytes): kernels read masks as `!= 0`."""
    return x.view(torch.uint8) if x.dtype == torch.bool else x


def _precision(dtype: torch.dtype) -> str:
    """`tl.dot`'s precision: full fp32 for fp32 inputs (TF32 would break parity with the reference)."""
    return "ieee" if dtype == torch.float32 else "tf32"


def _multiprocessors(device: torch.device) -> int:
    """Programs a GPU runs at once, to size flash-decoding's splits (a few under the interpreter)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4


# ---------------------------------------------------------------------------------------------
# kv_key_norm_scores, kv_accumulate, kv_gather: streaming passes


@triton.jit
def _key_norm_kernel(k_ptr, out_ptr, H, T, D, k_sb, k_sh, k_st, k_sd,
                     BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    """Minus the L2 norm of each key row, accumulated in fp32."""
    bh = tl.program_id(0).to(tl.int64)
    toks = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    base = k_ptr + (bh // H) * k_sb + (bh % H) * k_sh + toks[:, None] * k_st
    total = tl.zeros([BLOCK_T], tl.float32)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        x = tl.load(base + cols[None, :] * k_sd, mask=(toks < T)[:, None] & (cols < D)[None, :], other=0.0)
        x = x.to(tl.float32)
        total += tl.sum(x * x, axis=1)
    tl.store(out_ptr + bh * T + toks, -tl.sqrt_rn(total), mask=toks < T)


def _streaming_meta(cols: int, names: tuple[str, str] = ("BLOCK_T", "BLOCK_D")) -> dict:
    """Tiles of about 4096 elements, whole rows of up to 256: 32 per thread over 4 warps, enough
    bytes in flight per program without spilling the per-element addresses."""
    block_cols = _pow2(cols, 1, 256)
    return {names[0]: _pow2(4096 // block_cols, 1, 256), names[1]: block_cols, "num_warps": 4}


def kv_key_norm_scores(k: Tensor) -> Tensor:
    b, h, t, d = k.shape
    out = torch.empty((b, h, t), dtype=torch.float32, device=k.device)
    meta = _streaming_meta(d)
    _key_norm_kernel[(b * h, triton.cdiv(t, meta["BLOCK_T"]))](k, out, h, t, d, *k.stride(), **meta)
    return out


@triton.jit
def _accumulate_kernel(prior_ptr, scores_ptr, out_ptr, H, P, T, p_sb, p_sh, p_st, s_sb, s_sh, s_st,
                       BLOCK: tl.constexpr):
    """`out[.., t] = scores[.., t] + prior[.., t]` for `t < P`, `scores[.., t]` after."""
    bh = tl.program_id(0).to(tl.int64)
    b, h = bh // H, bh % H
    toks = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    s = tl.load(scores_ptr + b * s_sb + h * s_sh + toks * s_st, mask=toks < T, other=0.0).to(tl.float32)
    p = tl.load(prior_ptr + b * p_sb + h * p_sh + toks * p_st, mask=toks < P, other=0.0).to(tl.float32)
    tl.store(out_ptr + bh * T + toks, (s + p).to(out_ptr.dtype.element_ty), mask=toks < T)


def kv_accumulate(prior: Tensor, scores: Tensor) -> Tensor:
    b, h, t = scores.shape
    p = prior.shape[-1]
    if p > t:
        raise ValueError(f"kv_accumulate: the prior state holds {p} tokens, more than the {t} scored")
    prior = prior.expand(b, h, p)  # the reference broadcasts a batch (or head) of 1
    out = torch.empty((b, h, t), dtype=torch.promote_types(prior.dtype, scores.dtype), device=scores.device)
    block = _pow2(t, 16, 1024)
    _accumulate_kernel[(b * h, triton.cdiv(t, block))](prior, scores, out, h, p, t, *prior.stride(), *scores.stride(),
                                                       BLOCK=block, num_warps=4)
    return out


@triton.jit
def _gather_kernel(x_ptr, idx_ptr, out_ptr, H, K, C, x_sb, x_sh, x_st, x_sc, i_sb, i_sh, i_sk,
                   BLOCK_K: tl.constexpr, BLOCK_C: tl.constexpr):
    """`out[b, h, j, :] = x[b, h, idx[b, h, j], :]`, rows of `C` elements."""
    bh = tl.program_id(0).to(tl.int64)
    b, h = bh // H, bh % H
    rows = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    src = tl.load(idx_ptr + b * i_sb + h * i_sh + rows * i_sk, mask=rows < K, other=0)
    base = x_ptr + b * x_sb + h * x_sh + src[:, None] * x_st
    for c0 in range(0, C, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        ok = (rows < K)[:, None] & (cols < C)[None, :]
        v = tl.load(base + cols[None, :] * x_sc, mask=ok)
        tl.store(out_ptr + (bh * K + rows)[:, None] * C + cols[None, :], v, mask=ok)


def kv_gather(x: Tensor, idx: Tensor) -> Tensor:
    b, h, k = idx.shape
    out = torch.empty((b, h, k, *x.shape[3:]), dtype=x.dtype, device=x.device)
    src = x.unsqueeze(3) if x.dim() == 3 else x.flatten(3)  # rows of C elements per token
    c = src.shape[3]
    meta = _streaming_meta(c, ("BLOCK_K", "BLOCK_C"))
    _gather_kernel[(b * h, triton.cdiv(k, meta["BLOCK_K"]))](
        _loadable(src), idx, _loadable(out), h, k, c, *src.stride(), *idx.stride(), **meta)
    return out


# ---------------------------------------------------------------------------------------------
# kv_select: top-k per KV head


@triton.jit
def _rank_keys(scores_ptr, mask_ptr, toks, T, window, s_st, m_st):
    """The reference's float64 ranks of tokens `toks` as int64 keys in the same order."""
    ok = toks < T
    s = tl.load(scores_ptr + toks * s_st, mask=ok, other=0.0).to(tl.float64)
    real = tl.load(mask_ptr + toks * m_st, mask=ok, other=0) != 0
    pos = toks.to(tl.float64)
    one = tl.full([], 1.0, tl.float64)
    top = tl.full([], _TOP, tl.float64)
    spacing = tl.full([], _SPACING, tl.float64)
    rank = tl.where(real, s * (one + pos * tl.full([], _TIE, tl.float64)), -top + pos * spacing)
    rank = tl.where(real & (toks >= T - window), top + pos * spacing, rank)
    bits = rank.to(tl.int64, bitcast=True)
    # negative floats order backwards as integers: flipping all but the sign bit fixes that
    return tl.where(bits < 0, bits ^ _INT64_MAX, bits), ok


@triton.jit
def _select_kernel(scores_ptr, mask_ptr, out_ptr, H, T, K, window, s_sb, s_sh, s_st, m_sb, m_st,
                   BLOCK_T: tl.constexpr, ONE_CHUNK: tl.constexpr):
    """Positions of the `K` largest ranks of one row, ascending."""
    row = tl.program_id(0).to(tl.int64)
    scores_ptr += (row // H) * s_sb + (row % H) * s_sh
    mask_ptr += (row // H) * m_sb
    offs = tl.arange(0, BLOCK_T)
    if ONE_CHUNK:
        key, ok = _rank_keys(scores_ptr, mask_ptr, offs, T, window, s_st, m_st)
    # bisection for the K-th largest key: the largest `lo` with count(key >= lo) >= K
    lo = tl.full([], -_INT64_MAX, tl.int64)
    hi = tl.full([], _INT64_MAX, tl.int64)
    for _ in range(64):
        mid = (lo >> 1) + (hi >> 1) + ((lo | hi) & 1)  # ceil((lo + hi) / 2) without overflow
        if ONE_CHUNK:
            count = tl.sum((ok & (key >= mid)).to(tl.int32), axis=0)
        else:
            count = tl.zeros([], tl.int32)
            for t0 in range(0, T, BLOCK_T):
                chunk_key, chunk_ok = _rank_keys(scores_ptr, mask_ptr, t0 + offs, T, window, s_st, m_st)
                count += tl.sum((chunk_ok & (chunk_key >= mid)).to(tl.int32), axis=0)
        enough = count >= K
        lo = tl.where(enough, mid, lo)
        hi = tl.where(enough, hi, mid - 1)
    above = tl.zeros([], tl.int32)
    for t0 in range(0, T, BLOCK_T):
        chunk_key, chunk_ok = _rank_keys(scores_ptr, mask_ptr, t0 + offs, T, window, s_st, m_st)
        above += tl.sum((chunk_ok & (chunk_key > lo)).to(tl.int32), axis=0)
    ties_wanted = K - above  # keys equal to the K-th: the earliest ones
    kept, ties = tl.zeros([], tl.int32), tl.zeros([], tl.int32)
    for t0 in range(0, T, BLOCK_T):
        toks = t0 + offs
        chunk_key, chunk_ok = _rank_keys(scores_ptr, mask_ptr, toks, T, window, s_st, m_st)
        tie = (chunk_ok & (chunk_key == lo)).to(tl.int32)
        chosen = (chunk_ok & (chunk_key > lo)) | ((tie != 0) & (ties + tl.cumsum(tie, axis=0) - tie < ties_wanted))
        flag = chosen.to(tl.int32)
        slot = kept + tl.cumsum(flag, axis=0) - flag
        tl.store(out_ptr + row * K + slot, toks.to(tl.int64), mask=chosen)
        kept += tl.sum(flag, axis=0)
        ties += tl.sum(tie, axis=0)


def kv_select(scores: Tensor, mask: Tensor, keep: float, budget: int, window: int) -> Tensor:
    b, h, t = scores.shape
    k = int(kept_tokens(t, keep, budget))
    out = torch.empty((b, h, k), dtype=torch.int64, device=scores.device)
    mask = _loadable(mask).expand(b, t)
    _select_kernel[(b * h,)](scores, mask, out, h, t, k, window, *scores.stride(), *mask.stride(), **_select_meta(t))
    return out


def _select_meta(t: int) -> dict:
    """The whole row in registers when it fits (16 keys a thread), else chunks."""
    one_chunk = t <= SELECT_MAX_BLOCK
    block = _pow2(t, 16, SELECT_MAX_BLOCK) if one_chunk else SELECT_CHUNK
    return dict(BLOCK_T=block, ONE_CHUNK=one_chunk, num_warps=_pow2(block // 512, 4, 16))


# ---------------------------------------------------------------------------------------------
# kv_attention_scores: SnapKV / H2O attention received by each key


@triton.jit
def _score_stats_kernel(q_ptr, k_ptr, mask_ptr, lse_ptr, qk_scale, H, G, N, W, T, D,
                        q_sb, q_sh, q_sn, q_sd, k_sb, k_sh, k_st, k_sd, m_sb, m_st,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                        PRECISION: tl.constexpr):
    """Base-2 log-sum-exp of each window query's causal, masked logits (rows of one query head)."""
    bh = tl.program_id(0).to(tl.int64)
    b, h = bh // H, bh % H
    i = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    q_pos = T - W + i
    cols = tl.arange(0, BLOCK_D)
    q = tl.load(q_ptr + b * q_sb + h * q_sh + (N - W + i)[:, None] * q_sn + cols[None, :] * q_sd,
                mask=(i < W)[:, None] & (cols < D)[None, :], other=0.0)
    k_base = k_ptr + b * k_sb + (h // G) * k_sh
    m_i = tl.full([BLOCK_M], -_INF, tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    end = tl.minimum(T, T - W + (tl.program_id(1) + 1) * BLOCK_M)  # keys after the last query are masked
    for k0 in range(0, end, BLOCK_N):
        k_pos = k0 + tl.arange(0, BLOCK_N)
        k = tl.load(k_base + k_pos[:, None] * k_st + cols[None, :] * k_sd,
                    mask=(k_pos < T)[:, None] & (cols < D)[None, :], other=0.0)
        real = tl.load(mask_ptr + b * m_sb + k_pos * m_st, mask=k_pos < T, other=0) != 0
        logits = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        allowed = (k_pos[None, :] <= q_pos[:, None]) & real[None, :]
        logits = tl.where(allowed, logits, _NEG * _LOG2E)
        logits = tl.where((k_pos < T)[None, :], logits, -_INF)
        m_new = tl.maximum(m_i, tl.max(logits, axis=1))
        l_i = l_i * tl.exp2(m_i - m_new) + tl.sum(tl.exp2(logits - m_new[:, None]), axis=1)
        m_i = m_new
    tl.store(lse_ptr + bh * W + i, m_i + tl.log2(l_i), mask=i < W)


@triton.jit
def _score_sum_kernel(q_ptr, k_ptr, mask_ptr, lse_ptr, out_ptr, qk_scale, H_KV, G, N, W, T, D,
                      q_sb, q_sh, q_sn, q_sd, k_sb, k_sh, k_st, k_sd, m_sb, m_st,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                      PRECISION: tl.constexpr):
    """Each key's probability summed over the real window queries of every head of its group."""
    bk = tl.program_id(0).to(tl.int64)
    b, hk = bk // H_KV, bk % H_KV
    k_pos = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.arange(0, BLOCK_D)
    k = tl.load(k_ptr + b * k_sb + hk * k_sh + k_pos[:, None] * k_st + cols[None, :] * k_sd,
                mask=(k_pos < T)[:, None] & (cols < D)[None, :], other=0.0)
    real_k = tl.load(mask_ptr + b * m_sb + k_pos * m_st, mask=k_pos < T, other=0) != 0
    key_ok = real_k & (k_pos < T)
    total = tl.zeros([BLOCK_N], tl.float32)
    first = tl.maximum(tl.program_id(1) * BLOCK_N - (T - W), 0)  # earlier queries see none of these keys
    for g in range(G):
        h = hk * G + g
        for i0 in range(first // BLOCK_M * BLOCK_M, W, BLOCK_M):
            i = i0 + tl.arange(0, BLOCK_M)
            q_pos = T - W + i
            q = tl.load(q_ptr + b * q_sb + h * q_sh + (N - W + i)[:, None] * q_sn + cols[None, :] * q_sd,
                        mask=(i < W)[:, None] & (cols < D)[None, :], other=0.0)
            real_q = tl.load(mask_ptr + b * m_sb + q_pos * m_st, mask=i < W, other=0) != 0
            lse = tl.load(lse_ptr + (b * H_KV * G + h) * W + i, mask=i < W, other=0.0)
            logits = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
            allowed = (k_pos[None, :] <= q_pos[:, None]) & key_ok[None, :] & (real_q & (i < W))[:, None]
            total += tl.sum(tl.exp2(tl.where(allowed, logits - lse[:, None], -_INF)), axis=0)
    tl.store(out_ptr + bk * T + k_pos, total, mask=k_pos < T)


@triton.jit
def _avg_pool_kernel(src_ptr, out_ptr, T, L, pool, pad, BLOCK: tl.constexpr):
    """`avg_pool1d(kernel=pool, stride=1, padding=pad)` along each row (zero padding counted)."""
    row = tl.program_id(0).to(tl.int64)
    j = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    total = tl.zeros([BLOCK], tl.float32)
    for o in range(pool):
        src = j - pad + o
        total += tl.load(src_ptr + row * T + src, mask=(src >= 0) & (src < T) & (j < L), other=0.0)
    tl.store(out_ptr + row * L + j, tl.math.div_rn(total, pool.to(tl.float32)), mask=j < L)


def kv_attention_scores(q: Tensor, k: Tensor, mask: Tensor, scale: float, window: int, pool: int) -> Tensor:
    b, h, n, d = q.shape
    h_kv, t = k.shape[1], k.shape[2]
    w = min(window, n) if window > 0 else n
    mask = _loadable(mask).expand(b, t)
    qk_scale = float(scale) * math.log2(math.e)
    meta = _scores_meta(w, d, q.dtype, q.is_cuda)
    lse = torch.empty((b, h, w), dtype=torch.float32, device=q.device)
    _score_stats_kernel[(b * h, triton.cdiv(w, meta["BLOCK_M"]))](
        q, k, mask, lse, qk_scale, h, h // h_kv, n, w, t, d, *q.stride(), *k.stride(), *mask.stride(), **meta)
    sums = torch.empty((b, h_kv, t), dtype=torch.float32, device=q.device)
    _score_sum_kernel[(b * h_kv, triton.cdiv(t, meta["BLOCK_N"]))](
        q, k, mask, lse, sums, qk_scale, h_kv, h // h_kv, n, w, t, d, *q.stride(), *k.stride(), *mask.stride(), **meta)
    if pool <= 1:
        return sums
    pad = pool // 2
    length = t + 2 * pad - pool + 1
    out = torch.empty((b, h_kv, length), dtype=torch.float32, device=q.device)
    block = _pow2(length, 16, 1024)
    _avg_pool_kernel[(b * h_kv, triton.cdiv(length, block))](sums, out, t, length, pool, pad, BLOCK=block, num_warps=4)
    return out


def _scores_meta(w: int, d: int, dtype: torch.dtype, cuda: bool) -> dict:
    """Query tiles as tall as the window (16 to 64 rows), key blocks of 64 (16 under the
    interpreter, so that tests cover several)."""
    return dict(BLOCK_M=_pow2(w, 16, 64), BLOCK_N=64 if cuda else 16, BLOCK_D=_pow2(d, 16, 256),
                PRECISION=_precision(dtype), num_warps=4)


# ---------------------------------------------------------------------------------------------
# kv_quantize, kv_append: KIVI quantization


@triton.jit
def _as_dtype(x, DTYPE: tl.constexpr):
    """`x` (fp32) rounded to the input dtype and back: the reference stores scales in that dtype."""
    if DTYPE == tl.bfloat16:
        # to nearest even on the bits: Triton's interpreter truncates in casts to bfloat16
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        return bits.to(tl.float32, bitcast=True)
    else:
        return x.to(DTYPE).to(tl.float32)


@triton.jit
def _scale_of(low, high, LEVELS: tl.constexpr, DTYPE: tl.constexpr, FLOOR: tl.constexpr):
    """`((max - min) / levels).clamp_min(floor)` in fp32, rounded once to the input dtype
    (`FLOOR`: the dtype's `precision.scale_floor`)."""
    return _as_dtype(tl.maximum(tl.math.div_rn(high - low, LEVELS * 1.0), FLOOR), DTYPE)


@triton.jit
def _codes_of(x, zero, scale, LEVELS: tl.constexpr):
    """`round((x - zero) / scale).clamp(0, levels)` in fp32 as the reference computes it (halves to even)."""
    v = tl.math.div_rn(x - zero, scale)
    r = tl.floor(v)
    frac = v - r
    odd = (r - 2.0 * tl.floor(r * 0.5)) != 0.0
    r = tl.where((frac > 0.5) | ((frac == 0.5) & odd), r + 1.0, r)
    return tl.minimum(tl.maximum(r, 0.0), LEVELS * 1.0)


@triton.jit
def _pack(codes, BITS: tl.constexpr, ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
    """Codes `[ROWS, BLOCK_D]` as bytes `[ROWS, BLOCK_D * BITS / 8]`, the first channel lowest."""
    PER: tl.constexpr = 8 // BITS
    grouped = tl.reshape(codes.to(tl.int32), [ROWS, BLOCK_D // PER, PER])
    shifts = tl.arange(0, PER) * BITS
    return tl.sum(grouped << shifts[None, None, :], axis=2).to(tl.uint8)


@triton.jit
def _quantize_keys_kernel(x_ptr, codes_ptr, scale_ptr, zero_ptr, H, D, group, x_sb, x_sh, x_st, x_sd,
                          out_t0, out_T, scale_r0, scale_R,
                          BITS: tl.constexpr, FLOOR: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr):
    """One group of `group` tokens: per-channel min and scale, and the packed codes. Outputs are
    contiguous, codes `[B, H, out_T, D * BITS / 8]` written from token `out_t0` and scales
    `[B, H, scale_R, D]` from row `scale_r0` (so `kv_append` quantizes into the grown cache)."""
    LEVELS: tl.constexpr = (1 << BITS) - 1
    PER: tl.constexpr = 8 // BITS
    bh = tl.program_id(0).to(tl.int64)
    gi = tl.program_id(1)
    rows = tl.arange(0, BLOCK_G)
    cols = tl.arange(0, BLOCK_D)
    ok = (rows < group)[:, None] & (cols < D)[None, :]
    toks = gi * group + rows
    x = tl.load(x_ptr + (bh // H) * x_sb + (bh % H) * x_sh + toks[:, None] * x_st + cols[None, :] * x_sd,
                mask=ok, other=0.0)
    DTYPE: tl.constexpr = x_ptr.dtype.element_ty
    x = x.to(tl.float32)
    zero = tl.where(cols < D, tl.min(tl.where(ok, x, _INF), axis=0), 0.0)  # padding channels: 0 and 1, not inf
    scale = tl.where(cols < D, _scale_of(zero, tl.max(tl.where(ok, x, -_INF), axis=0), LEVELS, DTYPE, FLOOR), 1.0)
    codes = tl.where(ok, _codes_of(x, zero[None, :], scale[None, :], LEVELS), 0.0)
    srow = bh * scale_R + scale_r0 + gi
    tl.store(scale_ptr + srow * D + cols, scale.to(scale_ptr.dtype.element_ty), mask=cols < D)
    tl.store(zero_ptr + srow * D + cols, zero.to(zero_ptr.dtype.element_ty), mask=cols < D)
    pcols = tl.arange(0, BLOCK_D // PER)
    crow = bh * out_T + out_t0 + toks
    tl.store(codes_ptr + crow[:, None] * (D // PER) + pcols[None, :], _pack(codes, BITS, BLOCK_G, BLOCK_D),
             mask=(rows < group)[:, None] & (pcols < D // PER)[None, :])


@triton.jit
def _quantize_values_kernel(x_ptr, codes_ptr, scale_ptr, zero_ptr, H, T, D, channels, x_sb, x_sh, x_st, x_sd,
                            out_t0, out_T, scale_r0, scale_R,
                            BITS: tl.constexpr, FLOOR: tl.constexpr, BLOCK_T: tl.constexpr,
                            BLOCK_D: tl.constexpr, BLOCK_NB: tl.constexpr, BLOCK_CH: tl.constexpr):
    """A block of tokens: per token, min and scale of each run of `channels` channels, and the
    packed codes; codes as for keys, scales `[B, H, scale_R, D / channels]` from row `scale_r0`."""
    LEVELS: tl.constexpr = (1 << BITS) - 1
    PER: tl.constexpr = 8 // BITS
    bh = tl.program_id(0).to(tl.int64)
    toks = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    nb = D // channels
    base = x_ptr + (bh // H) * x_sb + (bh % H) * x_sh + toks * x_st
    DTYPE: tl.constexpr = x_ptr.dtype.element_ty
    # statistics from a [tokens, blocks, channels] view of the tile
    blocks = tl.arange(0, BLOCK_NB)
    within = tl.arange(0, BLOCK_CH)
    cols3 = blocks[:, None] * channels + within[None, :]
    ok3 = (toks < T)[:, None, None] & ((blocks < nb)[:, None] & (within < channels)[None, :])[None, :, :]
    x3 = tl.load(base[:, None, None] + cols3[None, :, :] * x_sd, mask=ok3, other=0.0).to(tl.float32)
    sok = (toks < T)[:, None] & (blocks < nb)[None, :]
    zero = tl.where(sok, tl.min(tl.where(ok3, x3, _INF), axis=2), 0.0)  # padding blocks: 0 and 1, not inf
    scale = tl.where(sok, _scale_of(zero, tl.max(tl.where(ok3, x3, -_INF), axis=2), LEVELS, DTYPE, FLOOR), 1.0)
    srow = bh * scale_R + scale_r0 + toks
    tl.store(scale_ptr + srow[:, None] * nb + blocks[None, :], scale.to(scale_ptr.dtype.element_ty), mask=sok)
    tl.store(zero_ptr + srow[:, None] * nb + blocks[None, :], zero.to(zero_ptr.dtype.element_ty), mask=sok)
    # codes from the plain [tokens, channels] tile, each channel given its block's statistics
    cols = tl.arange(0, BLOCK_D)
    ok = (toks < T)[:, None] & (cols < D)[None, :]
    x = tl.load(base[:, None] + cols[None, :] * x_sd, mask=ok, other=0.0).to(tl.float32)
    owner = tl.broadcast_to(tl.minimum(cols // channels, BLOCK_NB - 1)[None, :], [BLOCK_T, BLOCK_D])
    codes = _codes_of(x, tl.gather(zero, owner, 1), tl.gather(scale, owner, 1), LEVELS)
    pcols = tl.arange(0, BLOCK_D // PER)
    row = bh * out_T + out_t0 + toks
    packed = _pack(tl.where(ok, codes, 0.0), BITS, BLOCK_T, BLOCK_D)
    tl.store(codes_ptr + row[:, None] * (D // PER) + pcols[None, :], packed,
             mask=(toks < T)[:, None] & (pcols < D // PER)[None, :])


@triton.jit
def _copy_tokens_kernel(src_ptr, dst_ptr, H, N, C, s_sb, s_sh, s_st, s_sc, dst_t0, dst_T,
                        BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr):
    """`dst[b, h, dst_t0 + i, :] = src[b, h, i, :]` for `i < N` (dst contiguous, `dst_T` tokens),
    cast to dst's dtype: concatenation along tokens, one source at a time."""
    bh = tl.program_id(0).to(tl.int64)
    rows = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    base = src_ptr + (bh // H) * s_sb + (bh % H) * s_sh + rows[:, None] * s_st
    for c0 in range(0, C, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        ok = (rows < N)[:, None] & (cols < C)[None, :]
        v = tl.load(base + cols[None, :] * s_sc, mask=ok)
        tl.store(dst_ptr + (bh * dst_T + dst_t0 + rows)[:, None] * C + cols[None, :],
                 v.to(dst_ptr.dtype.element_ty), mask=ok)


def _copy_tokens(src: Tensor, dst: Tensor, dst_t0: int) -> None:
    b, h, n, c = src.shape
    if n == 0 or c == 0:
        return
    meta = _streaming_meta(c, ("BLOCK_N", "BLOCK_C"))
    _copy_tokens_kernel[(b * h, triton.cdiv(n, meta["BLOCK_N"]))](src, dst, h, n, c, *src.stride(), dst_t0,
                                                                  dst.shape[2], **meta)


def _check_quant_args(d: int, bits: int, group: int, channels: int) -> None:
    if bits not in (2, 4, 8):
        raise ValueError(f"bits must be 8, 4 or 2; got {bits}")
    if d * bits % 8:
        raise ValueError(f"a head dim of {d} at {bits} bits does not pack into whole bytes")
    if group < 1 or channels < 0 or (channels and d % channels):
        raise ValueError(f"group must be >= 1 and channels 0 (keys) or a divisor of the head dim {d}; "
                         f"got group={group}, channels={channels}")


def _quantize_into(x: Tensor, codes: Tensor, scale: Tensor, zero: Tensor, out_t0: int, scale_r0: int, bits: int,
                   group: int, channels: int) -> None:
    """Quantize every token of `x` `[B, H, M, D]` into the contiguous outputs, codes from token
    `out_t0` and scales from row `scale_r0`."""
    b, h, m, d = x.shape
    if m == 0:
        return
    offsets = (out_t0, codes.shape[2], scale_r0, scale.shape[2])
    meta = {**_quantize_meta(d, group, channels), "BITS": bits, "FLOOR": scale_floor(x.dtype)}
    if channels == 0:
        _quantize_keys_kernel[(b * h, m // group)](x, codes, scale, zero, h, d, group, *x.stride(), *offsets, **meta)
    else:
        _quantize_values_kernel[(b * h, triton.cdiv(m, meta["BLOCK_T"]))](
            x, codes, scale, zero, h, m, d, channels, *x.stride(), *offsets, **meta)


def _quantize_meta(d: int, group: int, channels: int) -> dict:
    """Keys: a whole group of tokens per program (its scales reduce over them), warps grown with
    it. Values: tiles of about 2048 elements, viewed as [tokens, blocks, channels] for the scales."""
    block_d = _pow2(d, 16, 1024)
    if channels == 0:
        block_g = _pow2(group, 1, 4096)
        return dict(BLOCK_G=block_g, BLOCK_D=block_d, num_warps=_pow2(block_g * block_d // 1024, 4, 16))
    return dict(BLOCK_T=_pow2(2048 // block_d, 1, 64), BLOCK_D=block_d, BLOCK_NB=_pow2(d // channels, 1, 1024),
                BLOCK_CH=_pow2(channels, 1, 1024), num_warps=4)


def _scale_rows(tokens: int, group: int, channels: int) -> int:
    return tokens // group if channels == 0 else tokens


def kv_quantize(x: Tensor, bits: int, group: int, residual: int, channels: int):
    b, h, t, d = x.shape
    _check_quant_args(d, bits, group, channels)
    m = quantized_length(t, group, residual)
    codes = torch.empty((b, h, m, d * bits // 8), dtype=torch.uint8, device=x.device)
    scale_cols = d if channels == 0 else d // channels
    scale = torch.empty((b, h, _scale_rows(m, group, channels), scale_cols), dtype=x.dtype, device=x.device)
    zero = torch.empty_like(scale)
    tail = torch.empty((b, h, t - m, d), dtype=x.dtype, device=x.device)
    _quantize_into(x[:, :, :m], codes, scale, zero, 0, 0, bits, group, channels)
    _copy_tokens(x[:, :, m:], tail, 0)
    return codes, scale, zero, tail


def kv_append(codes: Tensor, scale: Tensor, zero: Tensor, tail: Tensor, bits: int, group: int, residual: int,
              channels: int):
    b, h, r, d = tail.shape
    _check_quant_args(d, bits, group, channels)
    q = codes.shape[2]
    m = quantized_length(r, group, residual)
    new_codes = torch.empty((b, h, q + m, codes.shape[3]), dtype=torch.uint8, device=tail.device)
    rows = scale.shape[2] + _scale_rows(m, group, channels)
    # the reference's torch.cat promotes the old scales' dtype with the new ones' (the tail's)
    new_scale, new_zero = (torch.empty((b, h, rows, old.shape[3]), dtype=torch.promote_types(old.dtype, tail.dtype),
                                       device=tail.device) for old in (scale, zero))
    for old, new in ((codes, new_codes), (scale, new_scale), (zero, new_zero)):
        _copy_tokens(old, new, 0)
    _quantize_into(tail[:, :, :m], new_codes, new_scale, new_zero, q, scale.shape[2], bits, group, channels)
    rest = torch.empty((b, h, r - m, d), dtype=tail.dtype, device=tail.device)
    _copy_tokens(tail[:, :, m:], rest, 0)
    return new_codes, new_scale, new_zero, rest


# ---------------------------------------------------------------------------------------------
# quant_attention: flash-decoding over the packed cache and its full-precision tail


@triton.jit
def _unpack(codes_ptr, toks, t_ok, D, BITS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """The integer codes of tokens `toks`, `[BLOCK_N, BLOCK_D]` in fp32: bytes unpacked in registers."""
    PER: tl.constexpr = 8 // BITS
    pcols = tl.arange(0, BLOCK_D // PER)
    packed = tl.load(codes_ptr + toks[:, None] * (D // PER) + pcols[None, :],
                     mask=t_ok[:, None] & (pcols < D // PER)[None, :], other=0)
    shifts = tl.arange(0, PER) * BITS
    wide = (packed.to(tl.int32)[:, :, None] >> shifts[None, None, :]) & ((1 << BITS) - 1)
    return tl.reshape(wide, [BLOCK_N, BLOCK_D]).to(tl.float32)


@triton.jit
def _dequantize(codes_ptr, scale_ptr, zero_ptr, toks, t_ok, scale_rows, per_col, n_cols, D,
                BITS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_C: tl.constexpr):
    """`code * scale + zero` for tokens `toks`, `[BLOCK_N, BLOCK_D]` in fp32. Scales are loaded as
    the `[BLOCK_N, BLOCK_C]` block they are (row `scale_rows`, `n_cols` columns of `per_col`
    channels each) and spread over the channels in registers."""
    cols = tl.arange(0, BLOCK_C)
    ok = t_ok[:, None] & (cols < n_cols)[None, :]
    offs = scale_rows[:, None] * n_cols + cols[None, :]
    scale = tl.load(scale_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    zero = tl.load(zero_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    owner = tl.broadcast_to(tl.minimum(tl.arange(0, BLOCK_D) // per_col, BLOCK_C - 1)[None, :], [BLOCK_N, BLOCK_D])
    values = _unpack(codes_ptr, toks, t_ok, D, BITS, BLOCK_N, BLOCK_D)
    return values * tl.gather(scale, owner, 1) + tl.gather(zero, owner, 1)


@triton.jit
def _quantized_logits(q, kc, ks, kz, t0, toks, t_ok, group, D, BITS: tl.constexpr, BLOCK_N: tl.constexpr,
                      BLOCK_D: tl.constexpr, GROUPED: tl.constexpr, PRECISION: tl.constexpr):
    """`q @ dequantized keys^T` for one block of tokens. GROUPED (the block within one group of
    `group` tokens, which share each channel's scale and zero): the scale folds into the queries
    and the zero into one dot product per query, `q @ (c * s + z)^T = (q * s) @ c^T + q . z`,
    so keys are never dequantized element by element."""
    if GROUPED:
        cols = tl.arange(0, BLOCK_D)
        row = t0 // group  # one group for the whole block
        scale = tl.load(ks + row * D + cols, mask=cols < D, other=0.0).to(tl.float32)
        zero = tl.load(kz + row * D + cols, mask=cols < D, other=0.0).to(tl.float32)
        qf = q.to(tl.float32)
        codes = _unpack(kc, toks, t_ok, D, BITS, BLOCK_N, BLOCK_D)
        logits = tl.dot((qf * scale[None, :]).to(q.dtype), tl.trans(codes.to(q.dtype)), input_precision=PRECISION)
        return logits + tl.sum(qf * zero[None, :], axis=1)[:, None]
    else:
        k = _dequantize(kc, ks, kz, toks, t_ok, toks // group, 1, D, D, BITS, BLOCK_N, BLOCK_D, BLOCK_D)
        return tl.dot(q, tl.trans(k.to(q.dtype)), input_precision=PRECISION)


@triton.jit
def _softmax_step(logits, v, m_i, l_i, acc, mask_ptrs, valid, qk_scale,
                  HAS_MASK: tl.constexpr, MASK_BOOL: tl.constexpr, PRECISION: tl.constexpr):
    """One block of keys through the online softmax, in base 2 (`qk_scale` holds log2 e)."""
    logits = logits * qk_scale
    if HAS_MASK:
        bias = tl.load(mask_ptrs, mask=valid, other=0)
        if MASK_BOOL:
            logits = tl.where(bias != 0, logits, _NEG * _LOG2E)
        else:
            logits += bias.to(tl.float32) * _LOG2E
    logits = tl.where(valid, logits, -_INF)
    m_new = tl.maximum(m_i, tl.max(logits, axis=1))
    shift = tl.where(m_new == -_INF, 0.0, m_new)  # rows with nothing yet: no inf - inf
    p = tl.exp2(logits - shift[:, None])
    alpha = tl.exp2(m_i - shift)
    l_i = l_i * alpha + tl.sum(p, axis=1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
    return m_new, l_i, acc


@triton.jit
def _quant_attention_kernel(q_ptr, kc_ptr, ks_ptr, kz_ptr, vc_ptr, vs_ptr, vz_ptr, kt_ptr, vt_ptr, mask_ptr,
                            part_acc_ptr, part_m_ptr, part_l_ptr, qk_scale,
                            H_KV, REP, N, Q, R, D, DV, group, v_per_row, v_per_col, chunk, splits,
                            q_sb, q_sh, q_sn, q_sd, kt_sb, kt_sh, kt_st, kt_sd, vt_sb, vt_sh, vt_st, vt_sd,
                            m_sb, m_sh, m_sn, m_st,
                            HAS_MASK: tl.constexpr, MASK_BOOL: tl.constexpr, BITS: tl.constexpr,
                            GROUPED: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                            BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_VC: tl.constexpr,
                            PRECISION: tl.constexpr):
    """Partial attention of one KV head's query rows (its `REP` query heads x `N` queries) over
    one chunk of quantized tokens (split `s < splits`) or over the tail (split `splits`). Key
    scales have a row per `group` tokens; value scales a row per `v_per_row` tokens (1, or
    `group` in the keys' layout) and a column per `v_per_col` channels (`channels`, or 1)."""
    PER: tl.constexpr = 8 // BITS
    m_tiles = tl.cdiv(REP * N, BLOCK_M)
    pid = tl.program_id(0)
    s = tl.program_id(1)
    kv = (pid // m_tiles).to(tl.int64)  # b * H_KV + KV head
    b, hk = kv // H_KV, kv % H_KV
    rows = (pid % m_tiles) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < REP * N
    heads = hk * REP + rows // N
    qi = rows % N
    dk = tl.arange(0, BLOCK_D)
    dv = tl.arange(0, BLOCK_DV)
    q = tl.load(q_ptr + b * q_sb + heads[:, None] * q_sh + qi[:, None] * q_sn + dk[None, :] * q_sd,
                mask=row_ok[:, None] & (dk < D)[None, :], other=0.0)
    mask_rows = mask_ptr + b * m_sb + heads * m_sh + qi * m_sn
    m_i = tl.full([BLOCK_M], -_INF, tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
    if s < splits:
        v_cols = DV // v_per_col
        kc = kc_ptr + kv * Q * (D // PER)
        ks = ks_ptr + kv * (Q // group) * D
        kz = kz_ptr + kv * (Q // group) * D
        vc = vc_ptr + kv * Q * (DV // PER)
        vs = vs_ptr + kv * (Q // v_per_row) * v_cols
        vz = vz_ptr + kv * (Q // v_per_row) * v_cols
        end = tl.minimum(Q, (s + 1) * chunk)
        for t0 in range(s * chunk, end, BLOCK_N):
            toks = t0 + tl.arange(0, BLOCK_N)
            t_ok = toks < end
            logits = _quantized_logits(q, kc, ks, kz, t0, toks, t_ok, group, D, BITS, BLOCK_N, BLOCK_D, GROUPED,
                                       PRECISION)
            v = _dequantize(vc, vs, vz, toks, t_ok, toks // v_per_row, v_per_col, v_cols, DV, BITS, BLOCK_N,
                            BLOCK_DV, BLOCK_VC)
            m_i, l_i, acc = _softmax_step(logits, v.to(q.dtype), m_i, l_i, acc,
                                          mask_rows[:, None] + toks[None, :] * m_st, row_ok[:, None] & t_ok[None, :],
                                          qk_scale, HAS_MASK, MASK_BOOL, PRECISION)
    else:
        kt = kt_ptr + b * kt_sb + hk * kt_sh
        vt = vt_ptr + b * vt_sb + hk * vt_sh
        for t0 in range(0, R, BLOCK_N):
            toks = t0 + tl.arange(0, BLOCK_N)
            t_ok = toks < R
            k = tl.load(kt + toks[:, None] * kt_st + dk[None, :] * kt_sd,
                        mask=t_ok[:, None] & (dk < D)[None, :], other=0.0)
            v = tl.load(vt + toks[:, None] * vt_st + dv[None, :] * vt_sd,
                        mask=t_ok[:, None] & (dv < DV)[None, :], other=0.0)
            logits = tl.dot(q, tl.trans(k.to(q.dtype)), input_precision=PRECISION)
            m_i, l_i, acc = _softmax_step(logits, v.to(q.dtype), m_i, l_i, acc,
                                          mask_rows[:, None] + (Q + toks)[None, :] * m_st,
                                          row_ok[:, None] & t_ok[None, :], qk_scale, HAS_MASK, MASK_BOOL, PRECISION)
    part = ((b * H_KV * REP + heads) * N + qi) * (splits + 1) + s  # partials [B, H, N, splits + 1]
    tl.store(part_m_ptr + part, m_i, mask=row_ok)
    tl.store(part_l_ptr + part, l_i, mask=row_ok)
    tl.store(part_acc_ptr + part[:, None] * DV + dv[None, :], acc, mask=row_ok[:, None] & (dv < DV)[None, :])


@triton.jit
def _combine_splits_kernel(part_acc_ptr, part_m_ptr, part_l_ptr, out_ptr, S, DV,
                           BLOCK_S: tl.constexpr, BLOCK_DV: tl.constexpr):
    """One query row's output from its `S` partial softmaxes (rescaled to the common maximum)."""
    row = tl.program_id(0).to(tl.int64)
    sp = tl.arange(0, BLOCK_S)
    dv = tl.arange(0, BLOCK_DV)
    m = tl.load(part_m_ptr + row * S + sp, mask=sp < S, other=-_INF)
    l = tl.load(part_l_ptr + row * S + sp, mask=sp < S, other=0.0)
    top = tl.max(m, axis=0)
    weight = tl.exp2(m - tl.where(top == -_INF, 0.0, top))
    acc = tl.load(part_acc_ptr + (row * S + sp)[:, None] * DV + dv[None, :],
                  mask=(sp < S)[:, None] & (dv < DV)[None, :], other=0.0)
    out = tl.sum(acc * weight[:, None], axis=0) / tl.sum(l * weight, axis=0)
    tl.store(out_ptr + row * DV + dv, out.to(out_ptr.dtype.element_ty), mask=dv < DV)


def _mask_view(mask: Tensor, shape: tuple[int, int, int, int]) -> Tensor:
    """An attention mask broadcast (by strides, without copying) to `[B, H, n, T]`."""
    mask = _loadable(mask)
    return mask.reshape((1,) * (4 - mask.dim()) + tuple(mask.shape)).expand(shape)


def _quant_attention_meta(rows: int, d: int, dv: int, group: int, channels: int, dtype: torch.dtype,
                          cuda: bool) -> dict:
    """Block sizes of `_quant_attention_kernel`. Blocks of tokens within one key group when the
    group allows one of at least 16 tokens (tl.dot's minimum): the GROUPED path. The interpreter
    runs blocks of 16 so that tests cover several blocks and splits on small caches."""
    largest = 64 if cuda else 16
    aligned = group & -group  # the largest power of two dividing group
    grouped = aligned >= 16
    return dict(GROUPED=grouped, BLOCK_N=min(largest, aligned) if grouped else largest,
                BLOCK_M=_pow2(rows, 16, 64), BLOCK_D=_pow2(d, 16, 256), BLOCK_DV=_pow2(dv, 16, 256),
                BLOCK_VC=_pow2(dv // channels if channels else dv, 1, 256), PRECISION=_precision(dtype),
                num_warps=4, num_stages=2)


def quant_attention(q: Tensor, key_codes: Tensor, key_scale: Tensor, key_zero: Tensor, value_codes: Tensor,
                    value_scale: Tensor, value_zero: Tensor, key_tail: Tensor, value_tail: Tensor,
                    mask: Tensor | None, scale: float, bits: int, group: int, channels: int) -> Tensor:
    b, h, n, d = q.shape
    h_kv, r, dv = key_tail.shape[1], key_tail.shape[2], value_tail.shape[-1]
    _check_quant_args(d, bits, group, 0)
    _check_quant_args(dv, bits, group, channels)
    if h % h_kv:
        raise ValueError(f"quant_attention: {h} query heads are not a multiple of {h_kv} KV heads")
    cached = key_codes.shape[2]
    rep = h // h_kv
    meta = _quant_attention_meta(rep * n, d, dv, group, channels, q.dtype, q.is_cuda)
    block_n = meta["BLOCK_N"]
    # flash-decoding: enough programs to fill the GPU twice over, each a whole number of blocks
    programs = b * h_kv * triton.cdiv(rep * n, meta["BLOCK_M"])
    blocks = triton.cdiv(cached, block_n)
    per_split = triton.cdiv(blocks, max(1, min(blocks, triton.cdiv(2 * _multiprocessors(q.device), programs))))
    chunk = max(1, per_split) * block_n
    splits = triton.cdiv(cached, chunk)
    mask_view = _mask_view(mask, (b, h, n, cached + r)) if mask is not None else q
    m_strides = mask_view.stride() if mask is not None else (0, 0, 0, 0)
    part_acc = torch.empty((b, h, n, splits + 1, dv), dtype=torch.float32, device=q.device)
    part_m = torch.empty((b, h, n, splits + 1), dtype=torch.float32, device=q.device)
    part_l = torch.empty_like(part_m)
    _quant_attention_kernel[(programs, splits + 1)](
        q, key_codes.contiguous(), key_scale.contiguous(), key_zero.contiguous(), value_codes.contiguous(),
        value_scale.contiguous(), value_zero.contiguous(), key_tail, value_tail, mask_view,
        part_acc, part_m, part_l, float(scale) * math.log2(math.e),
        h_kv, rep, n, cached, r, d, dv, group, *((1, channels) if channels else (group, 1)), chunk, splits,
        *q.stride(), *key_tail.stride(), *value_tail.stride(), *m_strides,
        HAS_MASK=mask is not None, MASK_BOOL=mask is not None and mask.dtype == torch.bool, BITS=bits, **meta)
    out = torch.empty((b, h, n, dv), dtype=q.dtype, device=q.device)
    _combine_splits_kernel[(b * h * n,)](part_acc, part_m, part_l, out, splits + 1, dv,
                                         BLOCK_S=_pow2(splits + 1, 2, 1 << 16), BLOCK_DV=_pow2(dv, 16, 256))
    return out


KERNELS: dict[str, Callable] = {
    "skim::kv_attention_scores": kv_attention_scores,
    "skim::kv_key_norm_scores": kv_key_norm_scores,
    "skim::kv_accumulate": kv_accumulate,
    "skim::kv_select": kv_select,
    "skim::kv_gather": kv_gather,
    "skim::kv_quantize": kv_quantize,
    "skim::kv_append": kv_append,
    "skim::quant_attention": quant_attention,
}


def _spec(name: str, kernel, types: dict, meta: dict, unit=(), aligned=()) -> AotEntry:
    """`types`: the pointers' and floats' types (other arguments are i32 sizes and strides); `meta`:
    the launcher's constexprs and options; `unit`: arguments equal to 1 (contiguous last dims, one
    query); `aligned`: sizes and strides that are multiples of 16."""
    options = {key: meta[key] for key in ("num_warps", "num_stages") if key in meta}
    constexprs = {**{key: value for key, value in meta.items() if key not in options}, **{arg: 1 for arg in unit}}
    signature, attrs = {}, {}
    for i, arg in enumerate(kernel.arg_names):
        signature[arg] = "constexpr" if arg in constexprs else types.get(arg, "i32")
        if signature[arg].startswith("*") or arg in aligned:
            attrs[(i,)] = [["tt.divisibility", 16]]
    return AotEntry(name, kernel, signature, constexprs, options, attrs)


_FP16_CACHE = dict(q_ptr="*fp16", k_ptr="*fp16", mask_ptr="*i64", lse_ptr="*fp32", out_ptr="*fp32", qk_scale="fp32")
_QUANT_POINTERS = dict(x_ptr="*fp16", codes_ptr="*u8", scale_ptr="*fp16", zero_ptr="*fp16")
_CACHE_STRIDES = ("q_sb", "q_sh", "q_sn", "k_sb", "k_sh", "k_st")

# Llama-style shapes: 32 query heads and 8 KV heads of 128 dims, fp16, an 8k-token cache, KIVI 4-bit, group 32
AOT: list[AotEntry] = [
    _spec("key_norm_fp16_d128", _key_norm_kernel, dict(k_ptr="*fp16", out_ptr="*fp32"), _streaming_meta(128),
          unit=("k_sd",), aligned=("T", "k_sb", "k_sh", "k_st")),
    _spec("accumulate_fp32", _accumulate_kernel, dict(prior_ptr="*fp32", scores_ptr="*fp32", out_ptr="*fp32"),
          dict(BLOCK=1024, num_warps=4), unit=("p_st", "s_st"), aligned=("T", "p_sb", "p_sh", "s_sb", "s_sh")),
    _spec("gather_fp16_d128", _gather_kernel, dict(x_ptr="*fp16", idx_ptr="*i64", out_ptr="*fp16"),
          _streaming_meta(128, ("BLOCK_K", "BLOCK_C")), unit=("x_sc", "i_sk"),
          aligned=("K", "C", "x_sb", "x_sh", "x_st", "i_sb", "i_sh")),
    _spec("select_8k", _select_kernel, dict(scores_ptr="*fp32", mask_ptr="*i64", out_ptr="*i64"), _select_meta(8192),
          unit=("s_st", "m_st"), aligned=("T", "s_sb", "s_sh", "m_sb")),
    _spec("score_stats_fp16_d128", _score_stats_kernel, _FP16_CACHE, _scores_meta(32, 128, torch.float16, True),
          unit=("q_sd", "k_sd", "m_st"), aligned=(*_CACHE_STRIDES, "W", "T", "D", "m_sb")),
    _spec("score_sum_fp16_d128", _score_sum_kernel, _FP16_CACHE, _scores_meta(32, 128, torch.float16, True),
          unit=("q_sd", "k_sd", "m_st"), aligned=(*_CACHE_STRIDES, "W", "T", "D", "m_sb")),
    _spec("avg_pool", _avg_pool_kernel, dict(src_ptr="*fp32", out_ptr="*fp32"), dict(BLOCK=1024, num_warps=4),
          aligned=("T", "L")),
    _spec("quantize_keys_fp16_4bit", _quantize_keys_kernel, _QUANT_POINTERS,
          {**_quantize_meta(128, 32, 0), "BITS": 4, "FLOOR": scale_floor(torch.float16)},
          unit=("x_sd",), aligned=("D", "group", "x_sb", "x_sh", "x_st", "out_t0", "out_T", "scale_r0", "scale_R")),
    _spec("quantize_values_fp16_4bit", _quantize_values_kernel, _QUANT_POINTERS,
          {**_quantize_meta(128, 32, 32), "BITS": 4, "FLOOR": scale_floor(torch.float16)}, unit=("x_sd",),
          aligned=("T", "D", "channels", "x_sb", "x_sh", "x_st", "out_t0", "out_T", "scale_r0", "scale_R")),
    _spec("copy_tokens_u8", _copy_tokens_kernel, dict(src_ptr="*u8", dst_ptr="*u8"),
          _streaming_meta(64, ("BLOCK_N", "BLOCK_C")), unit=("s_sc",),
          aligned=("N", "C", "s_sb", "s_sh", "s_st", "dst_t0", "dst_T")),
    _spec("quant_attention_fp16_4bit_d128", _quant_attention_kernel,
          {**{p: "*fp16" for p in ("q_ptr", "ks_ptr", "kz_ptr", "vs_ptr", "vz_ptr", "kt_ptr", "vt_ptr")},
           "kc_ptr": "*u8", "vc_ptr": "*u8", "mask_ptr": "*u8", "part_acc_ptr": "*fp32", "part_m_ptr": "*fp32",
           "part_l_ptr": "*fp32", "qk_scale": "fp32"},
          {**_quant_attention_meta(4, 128, 128, 32, 32, torch.float16, True), "HAS_MASK": True, "MASK_BOOL": True,
           "BITS": 4},
          unit=("N", "v_per_row", "q_sd", "kt_sd", "vt_sd", "m_st"),
          aligned=("Q", "D", "DV", "group", "v_per_col", "chunk", "q_sb", "q_sh", "q_sn", "kt_sb", "kt_sh", "kt_st",
                   "vt_sb", "vt_sh", "vt_st", "m_sh")),
    _spec("combine_splits_fp16", _combine_splits_kernel,
          dict(part_acc_ptr="*fp32", part_m_ptr="*fp32", part_l_ptr="*fp32", out_ptr="*fp16"),
          dict(BLOCK_S=16, BLOCK_DV=128), aligned=("DV",)),
]
