"""KIVI KV-cache quantization ops inserted by `kv-quant`: `skim::kv_quantize`, `skim::kv_append`,
`skim::quant_attention`.

A layer's cache `[B, H_kv, T, D]` is held as a quantized part (the oldest tokens, a whole number
of `group`s) and a full-precision tail (the newest `residual` to `residual + group - 1` tokens,
or all of them while the cache is shorter). Quantization is asymmetric and round-to-nearest:
`code = round((x - zero) / scale)` in `[0, 2^bits - 1]`, `x ~ code * scale + zero`, where `zero`
is the block's minimum and `scale` its range over `2^bits - 1`.
- keys (`channels == 0`): per channel, `group` consecutive tokens share a scale and zero:
  scale/zero `[B, H_kv, Q / group, D]`;
- values (`channels > 0`): per token, `channels` consecutive channels share one: scale/zero
  `[B, H_kv, Q, D / channels]`.
Codes are uint8 `[B, H_kv, Q, D * bits / 8]`: 4- and 2-bit codes are packed 2 and 4 to a byte
along the head dim (the lowest bits hold the first channel). Keys and values split at the same
token count, so a layer's quantized and full-precision parts stay aligned with the mask
(quantized tokens first, then the tail).

Statistics, codes and attention are computed in fp32 whatever the cache's dtype (a block's range
overflows fp16, a small scale underflows it); scales and zeros are stored in the cache's dtype,
each scale rounded once and the codes computed with the rounded scale, so they decode with what
is stored.

Every size that depends on the token count is computed with integer arithmetic on the (possibly
symbolic) count, so programs holding these ops keep dynamic shapes; the references below are
the definition of correct and the ATen decomposition that ONNX export lowers.
"""
from __future__ import annotations

import torch
from torch import Tensor

from skimformer.kernels.precision import apply_mask, scale_floor


def quantized_length(tokens, group: int, residual: int):
    """How many of a full-precision cache's `tokens` are quantized: whole `group`s of the oldest,
    leaving at least `residual` (and fewer than `residual + group`) in full precision."""
    over = tokens - residual
    over = torch.sym_max(0, over) if isinstance(over, torch.SymInt) else max(0, over)
    return over // group * group


def pack_ref(codes: Tensor, bits: int) -> Tensor:
    """Integer codes `[..., D]` (values in `[0, 2^bits)`) as uint8 `[..., D * bits / 8]`.
    (Python-int multipliers, not a tensor constant: decompositions must not create tensors.)"""
    per = 8 // bits
    if per == 1:
        return codes.to(torch.uint8)
    *lead, d = codes.shape
    grouped = codes.to(torch.int32).reshape(*lead, d // per, per)
    packed = sum(grouped[..., j] * (1 << (bits * j)) for j in range(per))
    return packed.to(torch.uint8)


def unpack_ref(packed: Tensor, bits: int) -> Tensor:
    """uint8 `[..., D * bits / 8]` back to float codes `[..., D]`."""
    per = 8 // bits
    if per == 1:
        return packed.to(torch.float32)
    *lead, p = packed.shape
    wide = packed.to(torch.int32)
    codes = [torch.remainder(torch.div(wide, 1 << (bits * j), rounding_mode="floor"), 1 << bits) for j in range(per)]
    return torch.stack(codes, dim=-1).reshape(*lead, p * per).to(torch.float32)


def _blocks(x: Tensor, group: int, channels: int) -> tuple[Tensor, int]:
    """`x` `[B, H, T, D]` viewed so that each scale's block lies along one axis; the axis."""
    b, h, t, d = x.shape
    if channels == 0:
        return x.reshape(b, h, t // group, group, d), 3
    return x.reshape(b, h, t, d // channels, channels), 4


def quantize_ref(x: Tensor, bits: int, group: int, channels: int) -> tuple[Tensor, Tensor, Tensor]:
    """Codes, scale and zero of `x` `[B, H, T, D]` (T a multiple of `group` for keys); scale and
    zero in `x`'s dtype."""
    levels = float((1 << bits) - 1)  # float scalars: the ONNX exporter would cast Python ints beside fp32
    blocks, axis = _blocks(x.float(), group, channels)
    zero = blocks.amin(dim=axis, keepdim=True)
    # A constant block has no range: any positive scale codes it exactly as its zero.
    step = ((blocks.amax(dim=axis, keepdim=True) - zero) / levels).clamp_min(scale_floor(x.dtype))
    scale = step.to(x.dtype)
    codes = torch.round((blocks - zero) / scale.float()).clamp(0.0, levels)
    return pack_ref(codes.reshape(x.shape), bits), scale.squeeze(axis), zero.to(x.dtype).squeeze(axis)


def dequantize_ref(codes: Tensor, scale: Tensor, zero: Tensor, bits: int, group: int, channels: int) -> Tensor:
    """The full-precision `[B, H, Q, D]` that quantized codes stand for, in fp32.

    Each token's (or channel's) scale is gathered by index rather than by viewing the tokens as
    `[Q / group, group]`: splitting a symbolic length makes the exported shape arithmetic divide
    by `Q / group`, which is 0 while nothing is quantized."""
    values = unpack_ref(codes, bits)
    axis, size, per = (2, values.shape[2], group) if channels == 0 else (3, values.shape[3], channels)
    rows = torch.div(torch.arange(size, device=codes.device), per, rounding_mode="floor")
    return values * scale.float().index_select(axis, rows) + zero.float().index_select(axis, rows)


def kv_quantize_ref(x: Tensor, bits: int, group: int, residual: int, channels: int):
    """Split a full-precision cache `[B, H, T, D]`: (codes, scale, zero) of its oldest whole
    groups beyond `residual` tokens, and the full-precision tail."""
    m = quantized_length(x.shape[2], group, residual)
    codes, scale, zero = quantize_ref(x[:, :, :m], bits, group, channels)
    return codes, scale, zero, x[:, :, m:]


def kv_append_ref(codes: Tensor, scale: Tensor, zero: Tensor, tail: Tensor, bits: int, group: int,
                  residual: int, channels: int):
    """Move the tail's oldest whole groups beyond `residual` tokens into the quantized part.
    Tokens already quantized are never quantized again (KIVI's incremental update)."""
    new_codes, new_scale, new_zero, rest = kv_quantize_ref(tail, bits, group, residual, channels)
    return (torch.cat([codes, new_codes], dim=2), torch.cat([scale, new_scale], dim=2),
            torch.cat([zero, new_zero], dim=2), rest)


def quant_attention_ref(q: Tensor, key_codes: Tensor, key_scale: Tensor, key_zero: Tensor, value_codes: Tensor,
                        value_scale: Tensor, value_zero: Tensor, key_tail: Tensor, value_tail: Tensor,
                        mask: Tensor | None, scale: float, bits: int, group: int, channels: int) -> Tensor:
    """Attention of `q` `[B, H, n, D]` over the dequantized cache followed by the full-precision
    tail (which holds this step's new tokens): keys and values `[B, H_kv, Q + R, D]`, heads
    shared by groups of `H / H_kv` queries (grouped-query attention). `mask`: additive float or
    boolean keep-mask, broadcastable to `[B, H, n, Q + R]`, over the same token order. Computed in
    fp32, returned in `q`'s dtype."""
    k = torch.cat([dequantize_ref(key_codes, key_scale, key_zero, bits, group, 0), key_tail.float()], dim=2)
    v = torch.cat([dequantize_ref(value_codes, value_scale, value_zero, bits, group, channels), value_tail.float()],
                  dim=2)
    b, h_kv, t, d = k.shape
    rep = q.shape[1] // h_kv
    if rep != 1:  # repeat_kv: each KV head serves `rep` query heads
        k = k.unsqueeze(2).expand(b, h_kv, rep, t, d).reshape(b, h_kv * rep, t, d)
        v = v.unsqueeze(2).expand(b, h_kv, rep, t, v.shape[-1]).reshape(b, h_kv * rep, t, v.shape[-1])
    logits = apply_mask((q.float() @ k.transpose(-1, -2)) * scale, mask)
    return (torch.softmax(logits.float(), dim=-1) @ v).to(q.dtype)


def _packed(d, bits: int):
    return d * bits // 8


def _scale_shape(b, h, q, d, group: int, channels: int) -> list:
    return [b, h, q // group, d] if channels == 0 else [b, h, q, d // channels]


def _split_sizes():
    """Fake sizes of a split cache: its quantized groups and its full-precision tokens.

    Fresh unbacked sizes rather than `quantized_length` of the symbolic token count: a size like
    `max(0, T - residual) // group` is 0 or 1 for real caches, and export guards any expression
    it cannot bound (`!= 1`, `>= 2`) when it lays out a tensor of that size, which would refuse
    short caches when the program runs. The references compute the real sizes, and backends
    lower those."""
    ctx = torch.library.get_ctx()
    return ctx.new_dynamic_size(), ctx.new_dynamic_size()


@torch.library.custom_op("skim::kv_quantize", mutates_args=())
def kv_quantize(x: Tensor, bits: int, group: int, residual: int,
                channels: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return tuple(t.clone() for t in kv_quantize_ref(x, bits, group, residual, channels))


@kv_quantize.register_fake
def _(x, bits, group, residual, channels):
    b, h, _, d = x.shape
    groups, tail = _split_sizes()
    m = groups * group
    scale = x.new_empty(_scale_shape(b, h, m, d, group, channels))
    return (x.new_empty((b, h, m, _packed(d, bits)), dtype=torch.uint8), scale, torch.empty_like(scale),
            x.new_empty((b, h, tail, d)))


@torch.library.custom_op("skim::kv_append", mutates_args=())
def kv_append(codes: Tensor, scale: Tensor, zero: Tensor, tail: Tensor, bits: int, group: int, residual: int,
              channels: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return tuple(t.clone() for t in kv_append_ref(codes, scale, zero, tail, bits, group, residual, channels))


@kv_append.register_fake
def _(codes, scale, zero, tail, bits, group, residual, channels):
    b, h, _, d = tail.shape
    groups, rest = _split_sizes()
    q = groups * group
    new_scale = scale.new_empty(_scale_shape(b, h, q, d, group, channels))
    return (codes.new_empty((b, h, q, codes.shape[3])), new_scale, torch.empty_like(new_scale),
            tail.new_empty((b, h, rest, d)))


@torch.library.custom_op("skim::quant_attention", mutates_args=())
def quant_attention(q: Tensor, key_codes: Tensor, key_scale: Tensor, key_zero: Tensor, value_codes: Tensor,
                    value_scale: Tensor, value_zero: Tensor, key_tail: Tensor, value_tail: Tensor,
                    mask: Tensor | None, scale: float, bits: int, group: int, channels: int) -> Tensor:
    return quant_attention_ref(q, key_codes, key_scale, key_zero, value_codes, value_scale, value_zero,
                               key_tail, value_tail, mask, scale, bits, group, channels)


@quant_attention.register_fake
def _(q, key_codes, key_scale, key_zero, value_codes, value_scale, value_zero, key_tail, value_tail, mask, scale,
      bits, group, channels):
    return q.new_empty((*q.shape[:3], value_tail.shape[-1]))


REFERENCES = {
    torch.ops.skim.kv_quantize.default: kv_quantize_ref,
    torch.ops.skim.kv_append.default: kv_append_ref,
    torch.ops.skim.quant_attention.default: quant_attention_ref,
}
