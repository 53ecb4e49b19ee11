"""kv-window: StreamingLLM's attention-sink cache (Xiao et al., ICLR 2024, arXiv 2309.17453). Lossy.

Every program returns a cache of at most `sink + window` tokens per layer: the first `sink` real
tokens (the attention sinks, which absorb the attention mass that softmax must put somewhere)
and the `window` most recent ones. Memory is bounded, so generation runs past the model's
context length. Each step still attends over its full input cache plus its new tokens; the cache
it hands on is the compressed one, with `attention_mask` (`[B, kept]`) as an extra output: the
mask of that cache, which the engine grows step by step (DESIGN.md decoder convention).

Positions are assigned within the cache, as the paper does: a token's position is the number
of real tokens before it in the cache, for the new tokens' queries and keys alike (the program
computes them from its mask and ignores the position ids it is fed). The paper caches keys
before the rotary embedding and rotates the whole cache every step; here keys are cached rotated
and, when tokens are evicted, the kept keys are rotated again by their position change (RoPE is a
rotation: R(p - d) k = R(-d) R(p) k), which gives the same keys at the cost of rotating the cache
only. Models with learned absolute positions (GPT-2, OPT) need no re-rotation; their queries also
take positions within the cache, which is what keeps them inside the trained range.
While no token has been evicted (a cache shorter than `sink + window`), the program computes
exactly what the original does. Ordering: apply before passes that change the cache's
representation (kv-quant); not after a pass that already shortens the cache.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx

from skimformer.errors import UserError
from skimformer.ir import Model, Program
from skimformer.ir.graph import op_name
from skimformer.ir.rewrite import tag
from skimformer.ir.rotary import find_rotary
from skimformer.ir.signature import add_output, input_nodes, named_outputs, output_node, set_outputs
from skimformer.passes.base import Exercise, ModelResult, Pass
from skimformer.passes.kv_rewrite import MASK, cache_bytes, cache_layers, reexport_decoder_program, rewrite_decoder
from skimformer.passes.registry import register

NAME = "kv-window"
skim = torch.ops.skim


@dataclass
class KVWindowConfig:
    sink: int = 4
    window: int = 1024

    def __post_init__(self):
        if self.sink < 0:
            raise ValueError(f"sink (attention-sink tokens always kept) must be >= 0; got {self.sink}")
        if self.window < 1:
            raise ValueError(f"window (recent tokens kept) must be >= 1; got {self.window}")


def new_keys(key: fx.Node) -> fx.Node:
    """The keys this step adds: the last operand of the cache's concatenation(s)."""
    while op_name(key) == "cat":
        key = key.args[0][-1]
    return key


def _rewrite(config: KVWindowConfig):
    def rewrite(program: Program, inputs: dict | None, dims: dict | None) -> tuple[Program, dict]:
        module = program.ep.module()
        graph = module.graph
        if MASK in named_outputs(module):
            raise UserError(f"{NAME}: the {program.role} program already returns a shortened cache (an earlier pass "
                            f"such as prompt-prune or kv-evict); {NAME} manages the whole cache: apply it alone")
        layers = cache_layers(module, NAME)
        given = input_nodes(module)
        missing = [n for n in ("input_ids", MASK, "position_ids") if n not in given]
        if missing:
            raise UserError(f"{NAME}: the {program.role} program has no {', '.join(missing)} input (decoder convention)")
        mask, positions = given[MASK], given["position_ids"]
        rotaries = [find_rotary(graph, new_keys(layer.key), positions) for layer in layers]
        outputs = named_outputs(module)
        with graph.inserting_before(output_node(module)):
            idx = tag(graph.call_function(skim.window_tokens.default, (mask, config.sink, config.window)), NAME)
            shift = tag(graph.call_function(skim.position_shift.default, (mask, idx)), NAME)
            for layer, rotary in zip(layers, rotaries):
                key = tag(graph.call_function(skim.gather_tokens.default, (layer.key, idx, 2)), NAME)
                if rotary is not None:
                    key = rotary.replay(graph, key, shift)
                outputs[f"present_key_{layer.index}"] = key
                outputs[f"present_value_{layer.index}"] = tag(
                    graph.call_function(skim.gather_tokens.default, (layer.value, idx, 2)), NAME)
            kept_mask = tag(graph.call_function(skim.gather_tokens.default, (mask, idx, 1)), NAME)
        set_outputs(module, outputs)
        add_output(module, MASK, kept_mask)
        with graph.inserting_after(positions):
            in_cache = tag(graph.call_function(skim.cache_positions.default, (mask, given["input_ids"])), NAME)
        positions.replace_all_uses_with(in_cache, delete_user_cb=lambda user: user is not in_cache)
        rewritten = reexport_decoder_program(program, module, inputs, dims)
        before = program.run(program.example_inputs) if inputs is None else None
        after = rewritten.run(rewritten.example_inputs)
        report = {"layers": len(layers), "rerotated_layers": sum(r is not None for r in rotaries),
                  "cache_tokens": {"limit": config.sink + config.window, "after_example": int(after[MASK].shape[1])}}
        if before is not None:
            report["kv_cache_bytes"] = {"before": cache_bytes(before), "after": cache_bytes(after)}
        return rewritten, report

    return rewrite


@register
class KVWindow(Pass):
    """StreamingLLM attention-sink cache: keep the first `sink` and the last `window` tokens, positions within the cache (lossy)."""

    name = NAME
    Config = KVWindowConfig
    lossless = False

    def exercise(self, config: KVWindowConfig) -> Exercise:
        """A prompt longer than `sink + window` is windowed at prefill, and every decode step evicts again."""
        return Exercise(tokens=config.sink + config.window + 1, decode=1)

    def apply_model(self, model: Model, config: KVWindowConfig) -> ModelResult:
        return rewrite_decoder(model, NAME, _rewrite(config))
