"""kv-window: StreamingLLM's attention-sink cache (Xiao et al., ICLR 2024, arXiv 2309.17453). Lossy.

Every program returns a cache of at most `sink + window` tokens per layer: the first `sink` real
tokens (the attention sinks, which absorb the attention mass that softmax must put somewhere)
and the `window` most recent ones. Memory is bounded, so generation runs past the model's
context length. Each step still attends over its full input cache plus its new tokens; the cache
it hands on is the compressed one, with `attention_mask` (`[B, kept]`) as an extra output: the
mask of that cache, which the engine grows step by step (DESIGN.md decoder convention).

Positions are those of StreamingLLM: a token attends to its keys as if they sat at their places
in the cache, so the distance from a query to a recent key is their distance in the text and
the distance to a sink is as if the evicted tokens had never been. The paper caches keys before
the rotary embedding and rotates the whole cache every step. A rotary model's program computes
the same attention with almost none of that work, because RoPE's scores depend only on the
difference of positions (R(a)q . R(b)k = q . R(b - a)k): queries and new keys rotate at the
positions the program is fed (their places in the text), recent keys stay as they were cached,
and only the sinks are rotated again, by as many tokens as each eviction removes. The cache is
a slice of the grown one plus `sink` gathered tokens, so a step touches the window once (an
engine attends over it and copies it, nothing more). The rotation at text positions bounds a
fused ONNX Runtime engine, whose rotary tables cover 32,768 positions, to that many tokens per
generation; `--portable` engines rotate at any position. Models with learned absolute positions
(GPT-2, OPT) have nothing to rotate; their queries take positions within the cache, which is
what keeps them inside the trained range, and the program ignores the position ids it is fed.
While no token has been evicted (a cache shorter than `sink + window`), the program computes
exactly what the original does. Ordering: apply before passes that change the cache's
representation (kv-quant); not after a pass that already shortens the cache.
"""
from __future__ import annotations

import operator
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
aten = torch.ops.aten


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


def _evicted(graph: fx.Graph, mask: fx.Node, kept_mask: fx.Node) -> fx.Node:
    """`[B, 1]`: the real tokens each row's eviction removes, the positions its sinks move by."""
    real = lambda m: graph.call_function(aten.sum.dim_IntList, (m, [1], True))  # noqa: E731
    return tag(graph.call_function(aten.sub.Tensor, (real(mask), real(kept_mask))), NAME)


def _per_slot(graph: fx.Graph, evicted: fx.Node, sinks: fx.Node) -> fx.Node:
    """`evicted` for each of the sinks' slots: the rotation's positions `[B, sinks]`."""
    return tag(graph.call_function(aten.expand.default, (evicted, [-1, _size(graph, sinks, 2)])), NAME)


def _recent_start(graph: fx.Graph, mask: fx.Node, idx: fx.Node, sinks: fx.Node) -> fx.Node:
    """The slot from which on the grown cache is kept whole: `T - K + sinks`. Once per program:
    an ONNX Runtime node costs microseconds, however small its tensors, and there are 60 caches."""
    recent = graph.call_function(operator.sub, (_size(graph, idx, 1), _size(graph, sinks, 2)))
    return graph.call_function(operator.sub, (_size(graph, mask, 1), recent))


def _sinks(graph: fx.Graph, idx: fx.Node, sink: int, caches: dict) -> dict:
    """Each cache's sinks, gathered with one index per cache shape (keys and values share one
    in most models)."""
    index, sinks = {}, {}
    for name, cache in caches.items():
        heads_and_width = tuple(cache.meta["val"].shape[i] for i in (1, 3))
        if heads_and_width not in index:
            index[heads_and_width] = tag(graph.call_function(skim.sink_index.default, (idx, sink, cache, 2)), NAME)
        sinks[name] = tag(graph.call_function(aten.gather.default, (cache, 2, index[heads_and_width])), NAME)
    return sinks


def _size(graph: fx.Graph, node: fx.Node, dim: int) -> fx.Node:
    return graph.call_function(aten.sym_size.int, (node, dim))


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
        rotated = any(r is not None for r in rotaries)
        outputs = named_outputs(module)
        with graph.inserting_before(output_node(module)):
            idx = tag(graph.call_function(skim.window_tokens.default, (mask, config.sink, config.window)), NAME)
            kept_mask = tag(graph.call_function(skim.gather_tokens.default, (mask, idx, 1)), NAME)
            caches = {(layer.index, kind): cache for layer in layers
                      for kind, cache in (("key", layer.key), ("value", layer.value))}
            sinks = _sinks(graph, idx, config.sink, caches)
            first = next(iter(sinks.values()))
            start = _recent_start(graph, mask, idx, first)
            shift = _per_slot(graph, _evicted(graph, mask, kept_mask), first) if rotated else None
            rotary_of, tables = {layer.index: rotary for layer, rotary in zip(layers, rotaries)}, {}
            for (index, kind), cache in caches.items():
                kept = sinks[index, kind]
                if kind == "key" and rotary_of[index] is not None:
                    kept = rotary_of[index].replay(graph, kept, shift, tables)
                outputs[f"present_{kind}_{index}"] = tag(
                    graph.call_function(skim.window_join.default, (kept, cache, start, 2)), NAME)
        set_outputs(module, outputs)
        add_output(module, MASK, kept_mask)
        if not rotated:  # learned positions: within the cache
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
