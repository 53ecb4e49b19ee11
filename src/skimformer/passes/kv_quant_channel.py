"""`kv-quant(scheme=channel)`: the KV cache held as int8 or int4 codes with one fixed scale per
channel, calibrated when the pass runs, in the form ONNX Runtime's GroupQueryAttention runs
fused (its PER_CHANNEL quantized cache). Lossy.

Each layer's attention over its cache becomes one `skim::cache_quant_attention` (see
`kernels.channel_quant`), in the prefill and the decode program alike: the step's keys and
values are quantized with the layer's scales and appended to the past codes, and attention reads
the whole cache dequantized. The cache keeps its names and shapes, `[B, H_kv, T, D]` (int8) or
`[B, H_kv, T, D / 2]` (uint8, two 4-bit codes a byte); the scales are constants of the programs,
so a step hands nothing else on.

Scales: per layer and per KV-head channel, the largest magnitude of the keys (values) over
calibration prompts, mapped to the largest code (127, or 7 for 4 bits); larger values clip.
The prompts are passages of the shipped texts cut with the model's tokenizer, or random token
ids when the folder has none.
"""
from __future__ import annotations

import operator

import numpy as np
import torch
import torch.fx as fx

from skimformer.errors import UserError
from skimformer.ir import Model, Program
from skimformer.ir.rewrite import tag
from skimformer.ir.signature import output_node
from skimformer.kernels import channel_quant
from skimformer.passes.cache_attention import additive, cache_attentions
from skimformer.passes.kv_rewrite import reexport_decoder_program, replace_guards

CALIBRATION_ROWS, CALIBRATION_TOKENS = 8, 256
OP = torch.ops.skim.cache_quant_attention.default


def calibration_ids(model: Model) -> np.ndarray:
    """Token ids to calibrate on: shipped-text passages, or random ids without a tokenizer."""
    from skimformer.calibration.data import model_tokenizer, text_rows

    tokenizer = model_tokenizer(model)
    if tokenizer is not None:
        return text_rows(model, CALIBRATION_ROWS, CALIBRATION_TOKENS, tokenizer)["input_ids"]
    vocab = int(model.programs["prefill"].example_inputs["input_ids"].max()) + 1
    return np.random.default_rng(0).integers(0, vocab, (CALIBRATION_ROWS, CALIBRATION_TOKENS))


def calibrate(model: Model, bits: int) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """Per layer, the key and value scales `[1, H_kv, 1, D]` (float32)."""
    prefill = model.programs["prefill"]
    ids = torch.as_tensor(calibration_ids(model), dtype=torch.int64)
    biggest = channel_quant.CODE_RANGE[bits][1]
    amax: dict[str, torch.Tensor] = {}
    for row in ids.split(2):
        out = prefill.run({"input_ids": row, "attention_mask": torch.ones_like(row),
                           "position_ids": torch.arange(row.shape[1]).expand_as(row)})
        for name, value in out.items():
            if name.startswith(("present_key_", "present_value_")):
                seen = value.float().abs().amax(dim=(0, 2), keepdim=True)
                amax[name] = torch.maximum(amax[name], seen) if name in amax else seen
    scales = {}
    for name, value in amax.items():
        kind, layer = name.removeprefix("present_").rsplit("_", 1)
        scales.setdefault(int(layer), {})[kind] = value.clamp_min(1e-6) / biggest
    return {layer: (s["key"], s["value"]) for layer, s in scales.items()}


def quantize_program(program: Program, scales: dict, bits: int, pass_name: str, inputs=None, dims=None) -> Program:
    """Replace every layer's attention over its cache with `skim::cache_quant_attention`."""
    module = program.ep.module()
    found, skipped = cache_attentions(module, pass_name)
    if skipped:
        raise UserError(f"{pass_name}(scheme=channel): the {program.role} program's {skipped[0]}; this scheme needs "
                        "the plain growing cache (use scheme=kivi after passes that rewrite the decode-time cache)")
    graph, out = module.graph, output_node(module)
    for layer in found:
        site = layer.layer.attention
        k_scale, v_scale = scales[layer.index]
        with graph.inserting_before(site.node):
            constants = [_constant(module, f"skim_kv_{kind}_scale_{layer.index}", value)
                         for kind, value in (("key", k_scale), ("value", v_scale))]
            bias = additive(graph, layer.mask, site.q.meta["val"].dtype)
            node = tag(graph.call_function(OP, (site.q, layer.k_new, layer.v_new, layer.layer.past_key,
                                                layer.layer.past_value, bias, *constants, bits, layer.scale)), pass_name)
            attended, key, value = (tag(graph.call_function(operator.getitem, (node, i)), pass_name) for i in range(3))
        site.node.replace_all_uses_with(attended)
        graph.erase_node(site.node)
        out.replace_input_with(layer.layer.key, key)
        out.replace_input_with(layer.layer.value, value)
    replace_guards(module)  # the export's checks of the old cache's dtype and head dim
    return reexport_decoder_program(program, module, inputs, dims)


def _constant(module: fx.GraphModule, name: str, value: torch.Tensor) -> fx.Node:
    module.register_buffer(name, value.contiguous())
    return module.graph.get_attr(name)
