"""`skim::cache_quant_attention`: attention over a KV cache held as integer codes with one fixed
scale per channel (`kv-quant(scheme=channel)`), in the form of ONNX Runtime's quantized
GroupQueryAttention so that backend runs it as one fused kernel.

Codes are symmetric and round-to-nearest with calibrated scales `[1, H_kv, 1, D]`:
- 8 bits: `code = clamp(round(x / scale), -128, 127)`, stored as int8 `[B, H_kv, T, D]`;
- 4 bits: `clamp(round(x / scale), -8, 7) + 8`, two to a uint8 `[B, H_kv, T, D / 2]`, the even
  channel in the low nibble.
A step quantizes its new keys and values, appends their codes to the past codes, and attends,
causally plus the model's additive mask, over the whole cache dequantized (`code * scale`): the
new tokens too, as the fused kernel does. The reference below is the definition of correct and
the decomposition that backends without the fused kernel run.
"""
from __future__ import annotations

import torch
from torch import Tensor

from skimformer.kernels.precision import most_negative

CODE_RANGE = {8: (-128, 127), 4: (-8, 7)}


def quantize_channels(x: Tensor, scale: Tensor, bits: int) -> Tensor:
    low, high = CODE_RANGE[bits]
    codes = torch.clamp(torch.round(x / scale), low, high)
    if bits == 8:
        return codes.to(torch.int8)
    pairs = (codes + 8).to(torch.int32).unflatten(-1, (-1, 2))
    return (pairs[..., 0] + pairs[..., 1] * 16).to(torch.uint8)


def dequantize_channels(codes: Tensor, scale: Tensor, bits: int) -> Tensor:
    if bits == 8:
        return codes.to(scale.dtype) * scale
    wide = codes.to(torch.int32)
    pairs = torch.stack([torch.remainder(wide, 16), torch.div(wide, 16, rounding_mode="floor")], dim=-1)
    return (pairs.flatten(-2) - 8).to(scale.dtype) * scale


def cache_quant_attention_ref(q: Tensor, k: Tensor, v: Tensor, past_key: Tensor | None, past_value: Tensor | None,
                              bias: Tensor | None, k_scale: Tensor, v_scale: Tensor, bits: int,
                              scale: float) -> tuple[Tensor, Tensor, Tensor]:
    key_codes = quantize_channels(k, k_scale, bits)
    value_codes = quantize_channels(v, v_scale, bits)
    if past_key is not None:
        key_codes = torch.cat([past_key, key_codes], dim=2)
        value_codes = torch.cat([past_value, value_codes], dim=2)
    key, value = dequantize_channels(key_codes, k_scale, bits), dequantize_channels(value_codes, v_scale, bits)
    return causal_attention(q, key.to(q.dtype), value.to(q.dtype), bias, scale), key_codes, value_codes


def causal_attention(q: Tensor, key: Tensor, value: Tensor, bias: Tensor | None, scale: float) -> Tensor:
    """Attention of the step's queries `[B,H,S,D]` over the whole cache `[B,H_kv,T,D]`, causal
    (query row s sits at position T - S + s) plus the model's additive `bias`: what ONNX Runtime's
    GroupQueryAttention computes."""
    s, t = q.shape[2], key.shape[2]
    causal = torch.ones(s, t, dtype=torch.bool, device=q.device).tril(t - s)
    mask = torch.zeros(s, t, dtype=q.dtype, device=q.device).masked_fill(~causal, most_negative(q.dtype))
    if bias is not None:
        mask = mask + bias
    return torch.nn.functional.scaled_dot_product_attention(q, key, value, attn_mask=mask, scale=scale, enable_gqa=True)


@torch.library.custom_op("skim::cache_quant_attention", mutates_args=())
def cache_quant_attention(q: Tensor, k: Tensor, v: Tensor, past_key: Tensor | None, past_value: Tensor | None,
                          bias: Tensor | None, k_scale: Tensor, v_scale: Tensor, bits: int,
                          scale: float) -> tuple[Tensor, Tensor, Tensor]:
    return cache_quant_attention_ref(q, k, v, past_key, past_value, bias, k_scale, v_scale, bits, scale)


@cache_quant_attention.register_fake
def _(q, k, v, past_key, past_value, bias, k_scale, v_scale, bits, scale):
    shape = list(k.shape)
    if past_key is not None:
        shape[2] = past_key.shape[2] + k.shape[2]
    shape[3] = shape[3] * bits // 8
    dtype = torch.int8 if bits == 8 else torch.uint8
    return q.new_empty(q.shape), k.new_empty(shape, dtype=dtype), v.new_empty(shape, dtype=dtype)


REFERENCES = {torch.ops.skim.cache_quant_attention.default: cache_quant_attention_ref}
