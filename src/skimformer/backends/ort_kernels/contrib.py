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
    """The exporter's translation table for the ops kernel selection inserts or lowers."""
    import torch

    register_schemas()
    return {torch.ops.skim_ort.group_query_attention.default: _group_query_attention,
            torch.ops.skim.cache_quant_attention.default: _cache_quant_attention}


def _group_query_attention(q, k, v, past_key, past_value, bias, seqlens_k, total_length, query_lengths, positions, cos,
                           sin, heads: int, kv_heads: int, scale: float, interleaved: bool):
    """`skim_ort::group_query_attention` as GroupQueryAttention over a float cache: its operands
    are the kernel's own (token-major, lengths computed), so it maps input for input."""
    rotary = {"do_rotary": 1, "rotary_interleaved": int(interleaved)} if cos is not None else {}
    return _ms().GroupQueryAttention(q, k, v, past_key, past_value, seqlens_k, total_length, cos, sin, positions,
                                     bias, None, None, None, None, None, query_lengths, num_heads=heads,
                                     kv_num_heads=kv_heads, scale=scale, **rotary)


def _cache_quant_attention(q, k, v, past_key, past_value, bias, k_scale, v_scale, bits: int, scale: float):
    """`skim::cache_quant_attention` as GroupQueryAttention over its quantized cache (per-channel
    scales). Its operands are the model's (`[B,H,S,D]`), so heads move to the op's `[B,S,H*D]`
    and back, and its lengths are computed here. The kernel takes a cache input to know its type:
    a prefill gets an empty one."""
    from onnxscript import opset18 as op

    heads, kv_heads, head_dim = q.shape[1], k.shape[1], q.shape[3]
    steps = op.Shape(q, start=2, end=3)
    total = op.Shape(bias, start=3, end=4) if bias is not None else op.Add(op.Shape(past_key, start=2, end=3), steps)
    batch = op.Shape(q, start=0, end=1)
    seqlens = op.Cast(op.Expand(op.Sub(total, op.Constant(value_ints=[1])), batch), to=6)
    total_scalar = op.Cast(op.Squeeze(total, op.Constant(value_ints=[0])), to=6)
    if bias is not None:
        bias = op.Expand(bias, op.Concat(op.Shape(bias, start=0, end=2), steps, total, axis=0))
    query_lens = None if past_key is None else op.Cast(op.Expand(steps, batch), to=6)  # every row's S are queries
    if past_key is None:
        import onnx

        code = onnx.TensorProto.INT8 if bits == 8 else onnx.TensorProto.UINT8
        empty = op.Concat(op.Shape(k, start=0, end=2), op.Constant(value_ints=[0, head_dim * bits // 8]), axis=0)
        past_key = past_value = op.ConstantOfShape(empty, value=onnx.helper.make_tensor("zero", code, [1], [0]))
    out, present_key, present_value = _ms().GroupQueryAttention(
        _tokens_last(q), _tokens_last(k), _tokens_last(v), past_key, past_value, seqlens, total_scalar,
        None, None, None, bias, None, k_scale, v_scale, None, None, query_lens,
        num_heads=heads, kv_num_heads=kv_heads, scale=scale, k_quant_type="PER_CHANNEL",
        v_quant_type="PER_CHANNEL", kv_cache_bit_width=bits)
    attended = op.Transpose(op.Reshape(out, op.Constant(value_ints=[0, 0, heads, head_dim])), perm=[0, 2, 1, 3])
    return attended, present_key, present_value


def _ms():
    from onnxscript import values

    return values.Opset(DOMAIN, 1)


def _tokens_last(x):
    """`[B,H,S,D]` as the op's `[B,S,H*D]`."""
    from onnxscript import opset18 as op

    return op.Reshape(op.Transpose(x, perm=[0, 2, 1, 3]), op.Constant(value_ints=[0, 0, -1]))

