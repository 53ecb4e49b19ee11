"""prune: EViT-style token pruning (Liang et al., ICLR 2022, arXiv 2202.07800). Lossy.

After each block in `at`, keep the `keep` fraction of tokens that the block's attention rates
highest and fuse the others into one token weighted by their scores; every later block runs on
the shorter sequence. Scores (`score`): `cls` is the [CLS] query's attention row, recomputed
next to the fused attention (one row, not the full matrix); `mean-attention` the attention each
token receives, averaged over queries; `key-norm` the attention-free baseline (small keys draw
attention). The first `protect` tokens ([CLS] and other leading special tokens) are always kept;
padding is dropped before any real token. Per-token outputs are restored to every original
token (dropped ones take the fused token's value) and reported as approximate.
Ordering: runs on SDPA attention (eager sites are canonicalized first); put it before passes
that lower attention further.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.fx as fx

from skimformer.errors import UserError
from skimformer.ir.attention import find_attention
from skimformer.ir.blocks import find_blocks
from skimformer.ir.graph import shape
from skimformer.ir.program import Program
from skimformer.ir.rewrite import reexport, refresh_shapes
from skimformer.ir.shrink import Reduction, shrink_tokens
from skimformer.passes.base import Exercise, Pass, PassResult, fewest_dropped
from skimformer.passes.registry import register
from skimformer.passes.token_report import reduce_tokens
from skimformer.passes.token_select import select_tokens

SCORES = {"cls": 0, "mean-attention": 1, "key-norm": 2}
skim = torch.ops.skim
aten = torch.ops.aten


@dataclass
class PruneConfig:
    keep: float = 0.7
    at: list[int] = field(default_factory=lambda: [4, 7, 10])
    score: Literal["cls", "mean-attention", "key-norm"] = "cls"
    fuse: bool = True
    protect: int = 1

    def __post_init__(self):
        if not 0 < self.keep <= 1:
            raise ValueError(f"keep is the fraction of tokens kept, in (0, 1]; got {self.keep}")
        if self.protect < 0 or any(k < 0 for k in self.at):
            raise ValueError("protect and the layer indices in `at` must be >= 0")


def _reduction(site, config: PruneConfig, dim: int):
    """The reduce callback for `shrink_tokens`: score, select, gather, fuse."""
    fuse = config.fuse and config.keep < 1

    def reduce(graph: fx.Graph, x: fx.Node) -> Reduction:
        call = graph.call_function
        sel = select_tokens(graph, x, site, dim, SCORES[config.score], config.keep, config.protect)
        nodes, count = set(sel.nodes), sel.count
        total = count if count is not None else call(aten.sym_size.int, (sel.idx, 1))
        if count is None:
            nodes.add(total)
        out, side = sel.kept, sel.idx
        if fuse:
            fused = call(skim.fuse_tokens.default, (x, sel.scores, site.mask, sel.idx, dim))
            out = call(aten.cat.default, ([sel.kept, fused], dim))
            first = call(aten.slice.Tensor, (sel.idx, 1, 0, 1))
            side = call(aten.cat.default, ([sel.idx, first], 1))
            nodes |= {fused, out, first, side}
            count = count + 1 if count is not None else None
        sources = call(skim.token_sources.default, (sel.idx, sel.size, total if fuse else 0))
        nodes.add(sources)
        return Reduction(x=out, count=count, side_index=side, sources=sources, nodes=nodes)

    return reduce


def _prune_after(module: fx.GraphModule, layer: int, config: PruneConfig) -> None:
    graph = module.graph
    blocks = find_blocks(graph, find_attention(graph), set())
    if layer >= len(blocks):
        raise UserError(f"prune(at=[{layer}]): the model has {len(blocks)} blocks (0-based indices up to {len(blocks) - 1})")
    block = blocks[layer]
    if block.output is None or block.input_axis is None or not block.input_axis.plain:
        raise UserError(f"prune: block {layer} has no residual stream with a token axis that can be reduced")
    axis = block.input_axis
    token_axis = type(axis)(axis.dim, shape(block.output)[axis.dim])
    shrink_tokens(graph, block.output, token_axis, _reduction(block.attention[0], config, axis.dim))
    graph.eliminate_dead_code()
    refresh_shapes(module, start=block.output)  # the next point's blocks are found on the shorter stream


def prune_tokens(program: Program, config: PruneConfig) -> tuple[Program, int]:
    """Prune after every layer of `at` on one graph; one re-export at the end (each costs seconds)."""
    module = program.ep.module()
    layers = sorted(set(config.at))
    for layer in layers:
        _prune_after(module, layer, config)
    return reexport(program, module), len(layers)


@register
class Prune(Pass):
    """EViT-style pruning: keep the top tokens by attention after chosen blocks, fuse the rest (lossy)."""

    name = "prune"
    Config = PruneConfig
    lossless = False

    def exercise(self, config: PruneConfig) -> Exercise:
        """Enough tokens for `keep` (plus the fused token) to leave fewer than there were."""
        if config.keep == 1:
            return Exercise(never="keep=1.0 keeps every token")
        return Exercise(tokens=fewest_dropped(config.keep, config.protect, extra=int(config.fuse)))

    def apply(self, program: Program, config: PruneConfig) -> PassResult:
        return reduce_tokens(program, lambda current: prune_tokens(current, config))
