"""kv-evict: keep only the KV-cache tokens that attention needs, chosen per KV head. Lossy.

Policies (each keeps `budget` tokens per layer when `budget` > 0, else the `keep` fraction of
the prompt; the last `window` real tokens are always kept):
- `snapkv` (Li et al., arXiv 2404.14469): at prefill, the last `window` queries' attention over
  the prompt (summed over those queries and over the query heads of each KV group), average-
  pooled along tokens with kernel `pool` so that kept tokens keep their neighbours, then
  top-k per KV head. Fused attention never materializes probabilities, so those rows are recomputed
  beside it (`skim::kv_attention_scores`). Decode runs unchanged on the shorter cache.
- `knorm` (Devoto et al., arXiv 2406.11430; kvpress KnormPress): score = minus the key's L2
  norm; prefill only, attention-free.
- `h2o` (Zhang et al., arXiv 2306.14048): heavy hitters plus recent tokens. Each layer's
  accumulated attention score per cached token is carried between steps as state
  `state_h2o_{i}` (`[B, H_kv, T]`, an input and an output of the decode program, threaded by the
  engine): the prefill starts it from the whole prompt's attention and evicts to the budget;
  every decode step attends to the whole cache first, adds its queries' attention rows, then
  evicts the lowest-scored tokens per KV head down to the budget. With `keep` (no budget) the
  budget in decode is the cache length the prefill left, so the cache stops growing (and
  `keep=1.0` never evicts).

Batches with different prompt lengths: padding ranks below every real token, by position alone,
and kept indices are sorted, so every head of a row keeps the same padding slots at the front and
one `[B, K]` mask describes every head and layer. A program that evicts returns that mask as the
extra output `attention_mask` (prompt-prune's convention: the engine grows it each step, and
position ids keep counting from the prompt's length). Kept keys keep their rotary positions.

`layer_budget=pyramid` (PyramidKV, arXiv 2406.02069) is refused for now: different cache lengths
per layer need per-layer attention masks in the decode program.
Ordering: run before passes that change the cache's representation (kv-quant), and not after
prompt-prune; keep=1.0 (or a budget no cache reaches) is lossless.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.fx as fx

from skimformer.errors import UserError
from skimformer.ir import Model, Program
from skimformer.ir.graph import shape
from skimformer.ir.rewrite import tag
from skimformer.ir.signature import add_input, input_nodes, named_outputs, output_node, set_outputs
from skimformer.kernels.tokens import default_scale
from skimformer.passes.base import Exercise, ModelResult, Pass, fewest_dropped
from skimformer.passes.kv_rewrite import MASK, cache_bytes, cache_layers, reexport_decoder_program, rewrite_decoder
from skimformer.passes.registry import register

NAME = "kv-evict"
POLICIES = ("snapkv", "h2o", "knorm")
skim = torch.ops.skim
aten = torch.ops.aten


def state_name(layer: int) -> str:
    return f"state_h2o_{layer}"


@dataclass
class KVEvictConfig:
    policy: Literal["snapkv", "h2o", "knorm"] = "snapkv"
    budget: int = 0
    keep: float = 0.5
    window: int = 32
    pool: int = 5
    layer_budget: Literal["uniform", "pyramid"] = "uniform"

    def __post_init__(self):
        if self.policy not in POLICIES:
            raise ValueError(f"policy must be one of {', '.join(POLICIES)}; got {self.policy!r}")
        if self.budget < 0:
            raise ValueError(f"budget is the tokens kept per layer (0: use keep), >= 0; got {self.budget}")
        if not 0 < self.keep <= 1:
            raise ValueError(f"keep is the fraction of prompt tokens kept, in (0, 1]; got {self.keep}")
        if self.window < 0:
            raise ValueError(f"window (recent tokens always kept) must be >= 0; got {self.window}")
        if self.pool < 1 or self.pool % 2 == 0:
            raise ValueError(f"pool is an odd pooling kernel along tokens (1: none); got {self.pool}")
        if self.layer_budget == "pyramid":
            raise UserError(f"{NAME}(layer_budget=pyramid) is not supported yet (per-layer cache lengths need "
                            "per-layer decode masks); use layer_budget=uniform")
        if self.layer_budget != "uniform":
            raise ValueError(f"layer_budget must be uniform or pyramid; got {self.layer_budget!r}")


def _scores(graph: fx.Graph, layer, mask: fx.Node, config: KVEvictConfig) -> fx.Node:
    """Each cached token's score for this step, `[B, H_kv, T]`."""
    if config.policy == "knorm":
        return graph.call_function(skim.kv_key_norm_scores.default, (layer.key,))
    site = layer.attention
    scale = site.node.kwargs.get("scale") or default_scale(shape(site.q)[-1])
    # SnapKV: the observation window, pooled; H2O: every query of the step, unpooled.
    window, pool = (config.window, config.pool) if config.policy == "snapkv" else (0, 1)
    return graph.call_function(skim.kv_attention_scores.default, (site.q, layer.key, mask, float(scale), window, pool))


def _evict_program(program: Program, inputs: dict | None, dims: dict | None, config: KVEvictConfig) -> Program:
    """Score, select and gather every layer's cache (and H2O state); the prefill, and an evicting
    decode program, also return the mask of the cache they keep."""
    prefill = inputs is None
    module = program.ep.module()
    graph = module.graph
    layers = cache_layers(module, NAME)
    mask = input_nodes(module).get(MASK)
    if mask is None:
        raise UserError(f"{NAME}: the {program.role} program has no {MASK} input (decoder convention)")
    outputs = named_outputs(module)
    if prefill and MASK in outputs:
        raise UserError(f"{NAME}: the prefill program already returns {MASK} (prompt-prune or {NAME} ran before); "
                        f"apply {NAME} once, before passes that shorten the prompt")
    h2o = config.policy == "h2o"
    evict = prefill or config.budget > 0 or config.keep < 1
    states = {layer.index: add_input(module, state_name(layer.index)) for layer in layers} if h2o and not prefill else {}
    new, first = dict(outputs), None
    with graph.inserting_before(output_node(module)):
        for layer in layers:
            nodes = [_scores(graph, layer, mask, config)]
            if layer.index in states:
                nodes.append(graph.call_function(skim.kv_accumulate.default, (states[layer.index], nodes[-1])))
            scores = nodes[-1]
            key, value = layer.key, layer.value
            if evict:
                if config.budget > 0:
                    keep, budget = 0.0, config.budget
                elif prefill:
                    keep, budget = config.keep, 0
                else:  # H2O with `keep`: the cache stays as long as the prefill left it
                    budget = graph.call_function(aten.sym_size.int, (layer.past_key, 2))
                    keep = 0.0
                    nodes.append(budget)
                idx = graph.call_function(skim.kv_select.default, (scores, mask, keep, budget, config.window))
                key, value = (graph.call_function(skim.kv_gather.default, (t, idx)) for t in (key, value))
                scores = graph.call_function(skim.kv_gather.default, (scores, idx)) if h2o else scores
                nodes += [idx, key, value, scores]
                first = idx if first is None else first
            new[f"present_key_{layer.index}"], new[f"present_value_{layer.index}"] = key, value
            if h2o:
                new[state_name(layer.index)] = scores
            for node in nodes:
                tag(node, NAME)
        if first is not None:
            row = tag(graph.call_function(aten.select.int, (first, 1, 0)), NAME)  # every head keeps the same padding
            new[MASK] = tag(graph.call_function(skim.gather_tokens.default, (mask, row, 1)), NAME)
    set_outputs(module, new)
    return reexport_decoder_program(program, module, inputs, dims)


def _report(before: Program, after: Program) -> dict:
    """Tokens kept per layer and cache bytes, each program on its own example inputs."""
    old, new = before.run(before.example_inputs), after.run(after.example_inputs)
    layers = sorted(int(k.rsplit("_", 1)[1]) for k in new if k.startswith("present_key_"))
    return {"tokens_per_layer": {"before": [int(old[f"present_key_{i}"].shape[2]) for i in layers],
                                 "after": [int(new[f"present_key_{i}"].shape[2]) for i in layers]},
            "kv_cache_bytes": {"before": cache_bytes(old), "after": cache_bytes(new)}}


@register
class KVEvict(Pass):
    """SnapKV / H2O / key-norm KV-cache eviction per KV head, at prefill and (H2O) every decode step (lossy)."""

    name = NAME
    Config = KVEvictConfig
    lossless = False

    def exercise(self, config: KVEvictConfig) -> Exercise:
        """A prompt longer than the budget (or, with `keep`, than the window and long enough for the
        fraction to drop a token) is evicted at prefill; decode then runs on what is left."""
        if config.budget:
            return Exercise(tokens=config.budget + 1, decode=1)
        if config.keep == 1:
            return Exercise(never="keep=1.0 keeps every token")
        return Exercise(tokens=max(config.window + 1, fewest_dropped(config.keep, 0)), decode=1)

    def apply_model(self, model: Model, config: KVEvictConfig) -> ModelResult:
        def rewrite(program: Program, inputs: dict | None, dims: dict | None):
            if inputs is not None and config.policy != "h2o":  # decode runs unchanged on the shorter cache
                new = Program(ep=program.ep, role=program.role, example_inputs=inputs)
            else:
                new = _evict_program(program, inputs, dims, config)
            return new, _report(program, new)

        return rewrite_decoder(model, NAME, rewrite)
