"""ONNX Runtime's contrib ops as onnxscript can emit them, and the exporter's translation of
each `skim_ort` op into them.

onnxscript emits an op only when `onnx.defs` knows its schema, and the `com.microsoft` domain
lives in ONNX Runtime, not in `onnx`: the schema registered here states the inputs, outputs and
attributes skimformer uses, in ONNX Runtime's order (read from its own op schema).
"""
from __future__ import annotations

import functools

DOMAIN = "com.microsoft"
# GroupQueryAttention's inputs in ONNX Runtime's order (1.32); all but the query are optional.
GQA_INPUTS = ("query", "key", "value", "past_key", "past_value", "seqlens_k", "total_sequence_length", "cos_cache",
              "sin_cache", "position_ids", "attention_bias", "head_sink", "k_scale", "v_scale", "q_norm_weight",
              "k_norm_weight", "query_seqlens")
GQA_ATTRIBUTES = {"num_heads": "INT", "kv_num_heads": "INT", "scale": "FLOAT", "do_rotary": "INT",
                  "rotary_interleaved": "INT",
                  "local_window_size": "INT", "kv_cache_bit_width": "INT", "k_quant_type": "STRING",
                  "v_quant_type": "STRING"}
TYPES = ["tensor(float)", "tensor(float16)", "tensor(bfloat16)", "tensor(int32)", "tensor(int64)", "tensor(uint8)",
         "tensor(int8)"]


# MultiHeadAttention's inputs (1.32), of which the rule uses the query, key, value and attention_bias.
MHA_INPUTS = ("query", "key", "value", "bias", "key_padding_mask", "attention_bias")
MHA_ATTRIBUTES = {"num_heads": "INT", "scale": "FLOAT"}


@functools.cache
def register_schemas() -> None:
    """Make the contrib ops the rules emit known to `onnx.defs` (once per process)."""
    _register("GroupQueryAttention", GQA_INPUTS, ("output", "present_key", "present_value"), GQA_ATTRIBUTES)
    _register("MultiHeadAttention", MHA_INPUTS, ("output",), MHA_ATTRIBUTES)


def _register(name: str, input_names: tuple, output_names: tuple, attribute_kinds: dict) -> None:
    from onnx import defs

    if defs.has(name, DOMAIN):
        return
    optional = defs.OpSchema.FormalParameterOption.Optional
    inputs = [defs.OpSchema.FormalParameter(input_name, f"T{i}", param_option=optional if i else
                                            defs.OpSchema.FormalParameterOption.Single)
              for i, input_name in enumerate(input_names)]
    outputs = [defs.OpSchema.FormalParameter(output_name, f"R{j}") for j, output_name in enumerate(output_names)]
    constraints = [(f"T{i}", TYPES, "") for i in range(len(input_names))] + \
        [(f"R{j}", TYPES, "") for j in range(len(output_names))]
    attributes = [defs.OpSchema.Attribute(attribute, getattr(defs.OpSchema.AttrType, kind), "", required=False)
                  for attribute, kind in attribute_kinds.items()]
    defs.register_schema(defs.OpSchema(name, DOMAIN, 1, inputs=inputs, outputs=outputs,
                                       type_constraints=constraints, attributes=attributes))


def translations() -> dict:
    """The exporter's translation table for the ops kernel selection inserts."""
    import torch

    register_schemas()
    return {torch.ops.skim_ort.group_query_attention.default: _group_query_attention,
            torch.ops.skim_ort.multi_head_attention.default: _multi_head_attention}


def _multi_head_attention(q, k, v, bias, heads: int, scale: float):
    """`skim_ort::multi_head_attention` as MultiHeadAttention, input for input."""
    return _ms().MultiHeadAttention(q, k, v, None, None, bias, num_heads=heads, scale=scale)


def _group_query_attention(q, k, v, past_key, past_value, bias, seqlens_k, total_length, query_lengths, positions, cos,
                           sin, k_scale, v_scale, bits: int, heads: int, kv_heads: int, scale: float,
                           interleaved: bool):
    """`skim_ort::group_query_attention` as GroupQueryAttention: its operands are the kernel's own
    (token-major, lengths computed), so it maps input for input. A quantized cache's scales
    select the kernel's per-channel codes at decode steps. A prefill (no past) quantizes its keys
    and values itself and attends in full precision over what the codes stand for: the same
    numbers, but the kernel's quantized-cache path takes 5 times as long at a 2,000-token prompt
    (197 against 41 ms a layer, measured here), and a prompt is attended once."""
    attributes = {"do_rotary": 1, "rotary_interleaved": int(interleaved)} if cos is not None else {}
    if k_scale is not None and past_key is None:
        (k, key_codes), (v, value_codes) = (_through_codes(x, s, kv_heads, bits) for x, s in ((k, k_scale), (v, v_scale)))
        output, _, _ = _ms().GroupQueryAttention(q, k, v, None, None, seqlens_k, total_length, cos, sin, positions,
                                                 bias, None, None, None, None, None, query_lengths, num_heads=heads,
                                                 kv_num_heads=kv_heads, scale=scale, **attributes)
        return output, key_codes, value_codes
    if k_scale is not None:
        attributes.update(k_quant_type="PER_CHANNEL", v_quant_type="PER_CHANNEL", kv_cache_bit_width=bits)
    return _ms().GroupQueryAttention(q, k, v, past_key, past_value, seqlens_k, total_length, cos, sin, positions,
                                     bias, None, k_scale, v_scale, None, None, query_lengths, num_heads=heads,
                                     kv_num_heads=kv_heads, scale=scale, **attributes)


def _through_codes(x, scale, kv_heads: int, bits: int):
    """Token-major keys or values `x [B, S, H_kv * D]` with per-channel `scale [1, H_kv, 1, D]`:
    what their codes stand for (token-major), and the codes as the kernel caches them,
    `[B, H_kv, S, D]` int8 or, for 4 bits, `[B, H_kv, S, D / 2]` uint8 (`code + 8`, the even
    channel in the low nibble): `kernels.channel_quant`'s format."""
    import onnx
    from onnxscript import opset18 as op

    low, high = (-128.0, 127.0) if bits == 8 else (-8.0, 7.0)
    channels = op.Reshape(scale, op.Constant(value_ints=[1, 1, -1]))  # computed in the scales' dtype, as the reference
    codes = op.Clip(op.Round(op.Div(op.CastLike(x, scale), channels)), op.CastLike(op.Constant(value_float=low), scale),
                    op.CastLike(op.Constant(value_float=high), scale))
    width = x.shape[2] // kv_heads
    head_major = op.Transpose(op.Reshape(codes, op.Constant(value_ints=[0, 0, kv_heads, width])), perm=[0, 2, 1, 3])
    if bits == 8:
        cached = op.Cast(head_major, to=onnx.TensorProto.INT8)
    else:
        pairs = op.Reshape(op.Cast(op.Add(head_major, op.CastLike(op.Constant(value_float=8.0), scale)),
                                   to=onnx.TensorProto.INT32), op.Constant(value_ints=[0, 0, 0, width // 2, 2]))
        low_nibble, high_nibble = op.Split(pairs, num_outputs=2, axis=-1)
        packed = op.Add(low_nibble, op.Mul(high_nibble, op.CastLike(op.Constant(value_int=16), high_nibble)))
        cached = op.Cast(op.Squeeze(packed, op.Constant(value_ints=[-1])), to=onnx.TensorProto.UINT8)
    return op.CastLike(op.Mul(codes, channels), x), cached


def _ms():
    from onnxscript import values

    return values.Opset(DOMAIN, 1)
