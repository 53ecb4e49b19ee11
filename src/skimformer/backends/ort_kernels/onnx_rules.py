"""Kernel rules that run on the exported ONNX graph, after the FX-level rules.

- Residual + norm: `SimplifiedLayerNormalization` (RMSNorm) and `Skip(Simplified)LayerNormalization`
  (the residual add fused into the norm that follows it), by onnxscript's ONNX Runtime fusion
  rules: their element-wise patterns are the same in every model, and a library maintains them.
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


def apply(model) -> dict[str, int]:
    counts = fuse_norms(model)
    moved = past_length_from_mask(model)
    return {**counts, **({"past_length_from_mask": moved} if moved else {})}
