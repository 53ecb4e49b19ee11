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


@functools.cache
def register_schemas() -> None:
    """Make GroupQueryAttention known to `onnx.defs` (once per process)."""
    from onnx import defs

    if defs.has("GroupQueryAttention", DOMAIN):
        return
    optional = defs.OpSchema.FormalParameterOption.Optional
    inputs = [defs.OpSchema.FormalParameter(name, f"T{i}", param_option=optional if i else
                                            defs.OpSchema.FormalParameterOption.Single)
              for i, name in enumerate(GQA_INPUTS)]
    outputs = [defs.OpSchema.FormalParameter(name, f"R{j}")
               for j, name in enumerate(("output", "present_key", "present_value"))]
    constraints = [(f"T{i}", TYPES, "") for i in range(len(GQA_INPUTS))] + [(f"R{j}", TYPES, "") for j in range(3)]
    attributes = [defs.OpSchema.Attribute(name, getattr(defs.OpSchema.AttrType, kind), "", required=False)
                  for name, kind in GQA_ATTRIBUTES.items()]
    defs.register_schema(defs.OpSchema("GroupQueryAttention", DOMAIN, 1, inputs=inputs, outputs=outputs,
                                       type_constraints=constraints, attributes=attributes))


def translations() -> dict:
    """The exporter's translation table for the ops kernel selection inserts."""
    import torch

    register_schemas()
    return {torch.ops.skim_ort.group_query_attention.default: _group_query_attention}


def _group_query_attention(q, k, v, past_key, past_value, bias, seqlens_k, total_length, query_lengths, positions, cos,
                           sin, k_scale, v_scale, bits: int, heads: int, kv_heads: int, scale: float,
                           interleaved: bool):
    """`skim_ort::group_query_attention` as GroupQueryAttention: its operands are the kernel's own
    (token-major, lengths computed), so it maps input for input. A quantized cache's scales
    select the kernel's per-channel codes; its prefill gets an empty cache of codes, from which
    the kernel learns their type."""
    attributes = {"do_rotary": 1, "rotary_interleaved": int(interleaved)} if cos is not None else {}
    if k_scale is not None:
        attributes.update(k_quant_type="PER_CHANNEL", v_quant_type="PER_CHANNEL", kv_cache_bit_width=bits)
        if past_key is None:
            past_key = past_value = _empty_codes(k, kv_heads, bits)
    return _ms().GroupQueryAttention(q, k, v, past_key, past_value, seqlens_k, total_length, cos, sin, positions,
                                     bias, None, k_scale, v_scale, None, None, query_lengths, num_heads=heads,
                                     kv_num_heads=kv_heads, scale=scale, **attributes)


def _empty_codes(k, kv_heads: int, bits: int):
    """`[B, H_kv, 0, D * bits / 8]` codes for the token-major keys `k [B, S, H_kv * D]`."""
    import onnx
    from onnxscript import opset18 as op

    code = onnx.TensorProto.INT8 if bits == 8 else onnx.TensorProto.UINT8
    width = k.shape[2] // kv_heads * bits // 8
    shape = op.Concat(op.Shape(k, start=0, end=1), op.Constant(value_ints=[kv_heads, 0, width]), axis=0)
    return op.ConstantOfShape(shape, value=onnx.helper.make_tensor("zero", code, [1], [0]))


def _ms():
    from onnxscript import values

    return values.Opset(DOMAIN, 1)
