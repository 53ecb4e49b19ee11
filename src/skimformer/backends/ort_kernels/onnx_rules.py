"""Kernel rules that run on the exported ONNX graph, after the FX-level rules.

- Residual + norm: `SimplifiedLayerNormalization` (RMSNorm) and `Skip(Simplified)LayerNormalization`
  (the residual add fused into the norm that follows it), by onnxscript's ONNX Runtime fusion
  rules: their element-wise patterns are the same in every model, and a library maintains them.
- Packed QKV: the query, key and value projections that feed one GroupQueryAttention and read
  the same input become one MatMul over their weights side by side, whose output the kernel
  takes as its packed query (`[B, S, (H + 2 H_kv) D]`): two fewer nodes per layer, and one
  wider matmul that threads better than three narrow ones.
- The past length: under the decoder convention a step's past length is the attention mask's
  length minus the step's tokens. The exporter reads it from the cache's size instead, which
  ties the cache's size to its content; reading it from the mask lets the engine bind a
  preallocated cache buffer that GroupQueryAttention updates in place.
"""
from __future__ import annotations

MASK, IDS = "attention_mask", "input_ids"


def fuse_norms(model) -> dict[str, int]:
    """Apply the norm fusions to an `onnx_ir` model; returns how many of each were made."""
    from onnxscript.rewriter.ort_fusions.rms_normalization import fuse_rms_normalization
    from onnxscript.rewriter.ort_fusions.skip_normalization import (fuse_skip_layer_normalization,
                                                                    fuse_skip_rms_normalization)

    counts = {"simplified_layer_normalization": fuse_rms_normalization(model)}
    counts["skip_simplified_layer_normalization"] = fuse_skip_rms_normalization(model)
    counts["skip_layer_normalization"] = fuse_skip_layer_normalization(model)
    return {k: v for k, v in counts.items() if v}


def past_length_from_mask(model) -> int:
    """Replace every read of the token count of a cache input that GroupQueryAttention updates with
    `len(mask) - len(input_ids)`; returns how many were replaced."""
    import onnx_ir as ir

    graph = model.graph
    inputs = {v.name: v for v in graph.inputs}
    if MASK not in inputs or IDS not in inputs:
        return 0
    # only caches GroupQueryAttention reads: another cache's size (KIVI's codes and tail) is not the past length
    caches = {value.name for node in graph if node.op_type == "GroupQueryAttention"
              for value in node.inputs[3:5] if value is not None and value.name in inputs}
    replaced = 0
    for node in list(graph):
        if node.op_type != "Shape" or node.domain != "" or node.inputs[0].name not in caches:
            continue
        start, end = node.attributes.get_int("start", 0), node.attributes.get_int("end", None)
        if (start, end) != (2, 3):
            continue
        mask_len = ir.node("Shape", [inputs[MASK]], attributes={"start": 1, "end": 2})
        ids_len = ir.node("Shape", [inputs[IDS]], attributes={"start": 1, "end": 2})
        past = ir.node("Sub", [mask_len.outputs[0], ids_len.outputs[0]])
        graph.insert_before(node, [mask_len, ids_len, past])
        ir.convenience.replace_all_uses_with(node.outputs[0], past.outputs[0])
        graph.remove(node, safe=True)
        replaced += 1
    return replaced


def pack_qkv(model) -> int:
    """Give every GroupQueryAttention whose query, key and value come from bias-free MatMuls of one
    input by constant weights a packed QKV instead; returns how many were packed."""
    import numpy as np
    import onnx_ir as ir

    graph = model.graph
    packed = 0
    for node in [n for n in graph if n.op_type == "GroupQueryAttention" and n.domain == "com.microsoft"]:
        projections = [value.producer() if value is not None else None for value in node.inputs[:3]]
        if not all(_is_projection(p) and _read_by_kernel_or_sizes(p.outputs[0], node) for p in projections) \
                or len({p.inputs[0] for p in projections}) != 1:
            continue
        weights = [p.inputs[1] for p in projections]
        joined = ir.Value(name=f"{weights[0].name}_qkv",
                          const_value=ir.tensor(np.concatenate([w.const_value.numpy() for w in weights], axis=1)))
        graph.register_initializer(joined)
        matmul = ir.node("MatMul", [projections[0].inputs[0], joined])
        graph.insert_before(node, matmul)
        for projection in projections:  # the batch and token sizes read from them are the packed output's
            for user, index in list(projection.outputs[0].uses()):
                if user is not node:
                    user.replace_input_with(index, matmul.outputs[0])
        node.replace_input_with(0, matmul.outputs[0])
        node.replace_input_with(1, None)
        node.replace_input_with(2, None)
        for projection, weight in zip(projections, weights):
            graph.remove(projection, safe=True)
            if not weight.uses():
                graph.initializers.pop(weight.name)
        packed += 1
    return packed


def _read_by_kernel_or_sizes(value, kernel) -> bool:
    """Whether `value` is read only by `kernel` and for its batch or token size (`[B, S, ...]`)."""
    return all(user is kernel or (user.op_type == "Shape" and user.domain == ""
                                  and user.attributes.get_int("end", 99) <= 2) for user, _ in value.uses())


def _is_projection(node) -> bool:
    """A MatMul by a constant 2-D weight, as the exporter writes a bias-free linear layer."""
    return (node is not None and node.op_type == "MatMul" and node.domain == "" and len(node.inputs) == 2
            and node.inputs[1].const_value is not None and len(node.inputs[1].const_value.shape) == 2
            and node.inputs[1].name in node.graph.initializers)


def type_attention_outputs(model) -> None:
    """Give the attention kernels' output the query's type where the exporter left it untyped (it
    types a custom node's outputs from the values torch traced, by name, and a kernel that
    replaced an op with outputs of its own can miss): ONNX cannot infer a contrib op's types."""
    for node in model.graph:
        if node.op_type in ("GroupQueryAttention", "MultiHeadAttention") and node.outputs[0].dtype is None:
            node.outputs[0].dtype = node.inputs[0].dtype


def apply(model) -> dict[str, int]:
    type_attention_outputs(model)
    counts = fuse_norms(model)
    moved = past_length_from_mask(model)
    packed = pack_qkv(model)
    return {**counts, **({"past_length_from_mask": moved} if moved else {}), **({"packed_qkv": packed} if packed else {})}
