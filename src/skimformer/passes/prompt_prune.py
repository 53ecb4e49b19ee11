"""prompt-prune: FastV / GemFilter-style pruning of a causal LM's prompt at prefill. Lossy.

FastV (Chen et al., ECCV 2024, arXiv 2403.06764) drops the tokens that receive little attention
after an early layer K; GemFilter (Shi et al., arXiv 2409.17422) selects them with the last
query's attention row of an early layer. Here: after block `layer` (0-based), keep the `keep`
fraction of prompt tokens that the last query attends to most (`score=last-query`, averaged over
heads; `mean-attention` and `key-norm` are also offered). Later blocks, and the KV cache they
write, hold only those tokens; the cache of blocks up to `layer`, computed before the pruning
point, is gathered with the same indices, so every layer's cache has the same shorter length and
the decode program runs unchanged on it. Kept tokens keep their original rotary positions (the
cos/sin tables and the causal mask are gathered along the token axis). Per row of a batch: the
padding goes first, then the lowest-scored real tokens; the first `protect` real tokens (BOS,
the attention sink) and the last token (the query that generates) are always kept.

The pruned prefill program returns one extra output, `attention_mask` (`[B, kept]`): the mask of
the cache it returns, which the engine grows step by step instead of the prompt's mask; position
ids still continue from the prompt's length. Per-token outputs (`logits[B, n, V]`) are restored
to every prompt token (a dropped token takes its representative's value) and reported as
approximate; the last position is computed exactly on the kept tokens.
Ordering: only the prefill program is rewritten; runs on SDPA attention (eager sites are
canonicalized first); put it before passes that change the KV cache's representation (KV
quantization, eviction) or lower attention further.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.fx as fx

from skimformer.errors import UserError
from skimformer.ir import Model
from skimformer.ir.attention import find_attention
from skimformer.ir.blocks import find_blocks
from skimformer.ir.graph import shape
from skimformer.ir.program import Program
from skimformer.ir.rewrite import reexport, tag
from skimformer.ir.signature import add_output, named_outputs, output_node
from skimformer.ir.shrink import Reduction, shrink_tokens
from skimformer.ir.token_axis import propagate
from skimformer.passes.base import Exercise, ModelResult, Pass, PassResult, fewest_dropped
from skimformer.passes.kv_rewrite import cache_bytes
from skimformer.passes.registry import register
from skimformer.passes.token_report import reduce_tokens
from skimformer.passes.token_select import select_tokens

NAME = "prompt-prune"
SCORES = {"last-query": 3, "mean-attention": 1, "key-norm": 2}
MASK = "attention_mask"
skim = torch.ops.skim


@dataclass
class PromptPruneConfig:
    layer: int = 2
    keep: float = 0.5
    score: Literal["last-query", "mean-attention", "key-norm"] = "last-query"
    protect: int = 1

    def __post_init__(self):
        if not 0 < self.keep <= 1:
            raise ValueError(f"keep is the fraction of prompt tokens kept, in (0, 1]; got {self.keep}")
        if self.layer < 0:
            raise ValueError(f"layer is a 0-based block index, >= 0; got {self.layer}")
        if self.protect < 0:
            raise ValueError(f"protect (leading tokens always kept) must be >= 0; got {self.protect}")
        if self.score not in SCORES:
            raise ValueError(f"score must be one of {', '.join(SCORES)}; got {self.score!r}")


def _reduction(site, config: PromptPruneConfig, dim: int):
    """The reduce callback for `shrink_tokens`: score with the block's attention, select, gather."""

    def reduce(graph: fx.Graph, x: fx.Node) -> Reduction:
        sel = select_tokens(graph, x, site, dim, SCORES[config.score], config.keep, config.protect)
        sources = graph.call_function(skim.token_sources.default, (sel.idx, sel.size, 0))
        nodes = sel.nodes | {sources}
        for node in nodes:
            tag(node, NAME)
        return Reduction(x=sel.kept, count=sel.count, side_index=sel.idx, sources=sources, nodes=nodes)

    return reduce


def _prune_prefill(program: Program, config: PromptPruneConfig) -> Program:
    module = program.ep.module()
    graph = module.graph
    blocks = find_blocks(graph, find_attention(graph), set())
    _check_layer(config, len(blocks))
    block = blocks[config.layer]
    if block.output is None or block.input_axis is None or not block.input_axis.plain:
        raise UserError(f"{NAME}: block {config.layer} has no residual stream with a token axis that can be reduced")
    first = blocks[0]
    if first.input is None or first.input_axis is None:
        raise UserError(f"{NAME}: the token axis of the first block's input was not found")
    named = named_outputs(module)
    names, leaves = list(named), list(named.values())
    output = output_node(module)
    cache = {i for i, name in enumerate(names) if name.startswith("present_")}
    if not cache:
        raise UserError(f"{NAME}: the prefill program returns no present_key_*/present_value_* cache outputs")
    # Where every output carries the token axis, followed from the residual stream (not by size).
    tokens = propagate(first.input, first.input_axis)
    for i in sorted(cache):
        ax = tokens.get(leaves[i])
        if ax is None or not ax.plain:
            raise UserError(f"{NAME}: the token axis of output {names[i]} was not found")
    axis = block.input_axis
    token_axis = type(axis)(axis.dim, shape(block.output)[axis.dim])
    downstream = propagate(block.output, token_axis)
    red = shrink_tokens(graph, block.output, token_axis, _reduction(block.attention[0], config, axis.dim),
                        keep_reduced=cache)
    # The cache of blocks up to `layer` was computed over every token: keep the same ones.
    new_leaves = list(output.args[0]) if isinstance(output.args[0], (list, tuple)) else [output.args[0]]
    for i in sorted(cache):
        if leaves[i] in downstream:
            continue
        with graph.inserting_before(output):
            new_leaves[i] = tag(graph.call_function(skim.gather_tokens.default,
                                                    (leaves[i], red.side_index, tokens[leaves[i]].dim)), NAME)
    output.args = (tuple(new_leaves),)
    mask = next((n for n in graph.nodes if n.op == "placeholder" and n.target == MASK), None)
    if mask is None:
        raise UserError(f"{NAME}: the prefill program has no {MASK} input (decoder convention)")
    with graph.inserting_before(output):
        kept_mask = tag(graph.call_function(skim.gather_tokens.default, (mask, red.side_index, 1)), NAME)
    add_output(module, MASK, kept_mask)
    graph.eliminate_dead_code()
    return reexport(program, module)


def _check_layer(config: PromptPruneConfig, blocks: int) -> None:
    if config.layer >= blocks:
        raise UserError(f"{NAME}(layer={config.layer}): the model has {blocks} blocks "
                        f"(0-based indices up to {blocks - 1})")


@register
class PromptPrune(Pass):
    """FastV / GemFilter-style prompt pruning at prefill: after block `layer`, keep the tokens the last query attends to (lossy)."""

    name = NAME
    Config = PromptPruneConfig
    lossless = False

    def exercise(self, config: PromptPruneConfig) -> Exercise:
        """A prompt long enough for `keep` to drop a token: the prefill's last position already reads
        the kept tokens only (and so does every decode step after it)."""
        if config.keep == 1:
            return Exercise(never="keep=1.0 keeps every prompt token")
        return Exercise(tokens=fewest_dropped(config.keep, config.protect))

    def apply(self, program: Program, config: PromptPruneConfig) -> PassResult:
        if MASK in program.output_names:
            raise UserError(f"{NAME}: the prefill program is already pruned (it returns {MASK}); apply {NAME} once")
        sites = find_attention(program.ep.graph)
        if sites:  # refuse a layer out of range before any rewriting
            _check_layer(config, len(find_blocks(program.ep.graph, sites, set())))
        result = reduce_tokens(program, lambda canonical: (_prune_prefill(canonical, config), 1))
        if not result.matched:
            return result
        pruned, report = result.program, result.report
        before = program.run(program.example_inputs)
        after = pruned.run(program.example_inputs)
        report["prompt_tokens"] = {"before": int(program.example_inputs[MASK].shape[1]),
                                   "after": int(after[MASK].shape[1])}
        report["kv_cache_bytes"] = {"before": cache_bytes(before), "after": cache_bytes(after)}
        return PassResult(pruned, report, 1)

    def apply_model(self, model: Model, config: PromptPruneConfig) -> ModelResult:
        if not model.is_decoder:
            raise UserError(f"{NAME} prunes a causal LM's prompt at prefill, and this model is an encoder "
                            "(no prefill and decode programs): give a decoder folder, or use `prune` for encoders")
        result = self.apply(model.programs["prefill"], config)
        programs = {**model.programs, "prefill": result.program}
        return ModelResult(model.replace(programs), {"prefill": result.report}, result.matched)
