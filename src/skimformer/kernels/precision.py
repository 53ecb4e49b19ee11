"""Dtype-aware masking and scaling rules, shared by every skim reference and by the passes that
build masks or compare programs.

Programs come in fp32, fp16 and bf16. A literal like -1e30 does not fit fp16 (its most negative
finite value is -65504), a mask value that fp32 code treats as "very negative" is -inf or an
ordinary number in another dtype, and a scale floor like 1e-8 rounds to 0 in fp16. So every such
value is derived here from the dtype it lives in. This module imports only torch: the Triton
kernels (`triton_tokens`, `triton_kv`) read it too, on a GPU machine that has nothing else.
"""
from __future__ import annotations

import torch
from torch import Tensor


def most_negative(dtype: torch.dtype) -> float:
    """The fill for a masked-out logit in `dtype`: its most negative finite value, as transformers
    builds masks. Softmax turns it into 0 beside any real logit, and a row masked everywhere
    stays finite (uniform) where -inf would give NaN."""
    return torch.finfo(dtype).min


def mask_threshold(dtype: torch.dtype) -> float:
    """Additive mask values at or below this remove a key: half of `dtype`'s most negative value.
    Half, not the value itself, so that a mask summed with another (causal plus padding) or with a
    small bias (ToMe's log-size) still counts, while real biases (ALiBi, relative positions) never
    come near it. fp16 masks at -65504 count as padding; no fp32 value a model uses for keys it
    keeps reaches -1.7e38."""
    return most_negative(dtype) / 2


def keeps(mask: Tensor) -> Tensor:
    """True where `mask` lets attention through: a boolean keep-mask as it is; an additive float
    mask where it is above `mask_threshold` of its own dtype."""
    return mask if mask.dtype == torch.bool else mask > mask_threshold(mask.dtype)


def apply_mask(logits: Tensor, mask: Tensor | None) -> Tensor:
    """`logits` with an attention mask applied as scaled_dot_product_attention does: a boolean
    keep-mask fills the removed logits with `most_negative` of the logits' dtype, an additive mask
    is added (promoting to the wider dtype: fp32 logits stay fp32)."""
    if mask is None:
        return logits
    if mask.dtype == torch.bool:
        return logits.masked_fill(~mask, most_negative(logits.dtype))
    return logits + mask


def scale_floor(dtype: torch.dtype) -> float:
    """The least quantization scale for a cache stored in `dtype`: its smallest normal number. A
    constant block has no range and needs some positive scale; a smaller one would be stored as a
    subnormal or as 0 (1e-8 is 0 in fp16), and dividing by it gives inf or NaN codes."""
    return torch.finfo(dtype).tiny

