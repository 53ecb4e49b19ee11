"""tome: Token Merging (Bolya et al., ICLR 2023, arXiv 2210.09461), reimplemented from the paper.
Lossy.

In every block, between attention and the MLP, the tokens are split alternately into two sets;
each token of the first set is matched to its most similar token of the second (cosine
similarity of the block's attention keys averaged over heads) and the `r` best pairs are merged
by a size-weighted mean (`skim::bipartite_match`, `skim::bipartite_merge`). Sizes (how many
original tokens each one stands for) are tracked and, with `prop_attn`, `log(size)` is added to
the attention logits of every later block: with fused attention, an additive mask.

`schedule=constant` merges `r` per block; `decreasing` starts at `2r` and falls linearly to 0
(about the same total, front-loaded). `r=0` inserts identity merges in every block: a lossless
check of the rewrite. [CLS] is never merged (`protect_cls`); padding merges first and weighs
nothing. Per-token outputs are restored ("unmerged": each token takes its merged token's value)
and reported as approximate. Causal decoders are refused: merging breaks causality.
Ordering: runs on SDPA attention (eager sites are canonicalized first); put it before passes
that lower attention further.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Literal

import torch
import torch.fx as fx

from skimformer.errors import UserError
from skimformer.ir import Model
from skimformer.ir.attention import find_attention, sdpa_mask, set_sdpa_mask
from skimformer.ir.blocks import Block, find_blocks, residual_midpoint
from skimformer.ir.graph import shape
from skimformer.ir.program import Program
from skimformer.ir.rewrite import reexport, refresh_shapes
from skimformer.ir.shrink import Reduction, shrink_tokens
from skimformer.ir.token_axis import Axis
from skimformer.kernels.merge import merge_count
from skimformer.kernels.precision import most_negative
from skimformer.passes.base import Exercise, ModelResult, Pass, PassResult
from skimformer.passes.registry import register
from skimformer.passes.token_report import reduce_tokens

skim = torch.ops.skim
aten = torch.ops.aten
FUSED = aten.scaled_dot_product_attention.default


@dataclass
class TomeConfig:
    r: int = 8
    schedule: Literal["constant", "decreasing"] = "constant"
    prop_attn: bool = True
    protect_cls: bool = True

    def __post_init__(self):
        if self.r < 0:
            raise ValueError(f"r is the number of tokens merged per block, >= 0; got {self.r}")


def merges_per_block(config: TomeConfig, blocks: int) -> list[int]:
    if config.schedule == "constant" or blocks < 2:
        return [config.r] * blocks
    return [round(2 * config.r * (1 - i / (blocks - 1))) for i in range(blocks)]


class _ProportionalAttention:
    """Keeps `log(size)` on the masks of the attention sites after the latest merge.

    Before each merge the bias is taken off the sites after it, so the merge gathers their plain
    mask; afterwards the new sizes' bias goes on."""

    def __init__(self):
        self.biased: dict[fx.Node, tuple[fx.Node | None, fx.Node]] = {}

    def remove(self, sites: list[fx.Node]) -> None:
        """Take the bias off `sites` (those after the next merge); earlier sites keep theirs."""
        for site in sites:
            if site in self.biased:
                set_sdpa_mask(site, self.biased.pop(site)[0])

    def add(self, graph: fx.Graph, sites: list[fx.Node], sizes: fx.Node) -> None:
        """Bias `sites` by the log of `sizes` (fp32), cast to the attention's dtype: sdpa takes a
        float mask only in its query's dtype. A boolean mask becomes the bias where it keeps and
        that dtype's most negative value where it removes."""
        if not sites:
            return
        call = graph.call_function
        dtype = sites[0].meta["val"].dtype
        bias = sizes  # log(max(size, 1)) as [B, 1, 1, N]: padding (size 0) is masked already
        steps = [(aten.clamp_min.default, (1.0,), {}), (aten.log.default, (), {}),
                 (aten.unsqueeze.default, (1,), {}), (aten.unsqueeze.default, (1,), {})]
        if dtype != torch.float32:
            steps.append((aten._to_copy.default, (), {"dtype": dtype}))
        for target, args, kwargs in steps:
            with graph.inserting_after(bias):
                bias = call(target, (bias, *args), kwargs)
        for site in sites:
            base = sdpa_mask(site)
            with graph.inserting_before(site):
                if base is None:
                    biased = bias
                elif _is_bool(base):
                    biased = call(aten.where.ScalarOther, (base, bias, most_negative(dtype)))
                else:
                    biased = call(aten.add.Tensor, (base, bias))
            set_sdpa_mask(site, biased)
            self.biased[site] = (base, biased)


def _is_bool(mask: fx.Node) -> bool:
    """Whether a mask is boolean; masks gathered by this rewrite have no fake value yet."""
    while "val" not in mask.meta and mask.target is skim.gather_tokens.default:
        mask = mask.args[0]
    return mask.meta["val"].dtype == torch.bool


def _reduction(block: Block, r: int, config: TomeConfig, dim: int, sizes: fx.Node | None, holder: dict):
    """The reduce callback for `shrink_tokens`: match on head-averaged keys, merge by size."""
    site = block.attention[0]
    protect = 1 if config.protect_cls else 0

    def reduce(graph: fx.Graph, x: fx.Node) -> Reduction:
        call = graph.call_function
        n = shape(x)[dim]
        current = sizes if sizes is not None else call(skim.token_sizes.default, (x, site.mask, dim))
        metric = call(aten.mean.dim, (site.k, [1]))
        match = call(skim.bipartite_match.default, (metric, current, r, protect))
        keep, sources = call(operator.getitem, (match, 0)), call(operator.getitem, (match, 1))
        merge = call(skim.bipartite_merge.default, (x, current, sources, keep, dim))
        merged, new_sizes = call(operator.getitem, (merge, 0)), call(operator.getitem, (merge, 1))
        holder["sizes"] = new_sizes
        count = merge_count(n, r, protect) if isinstance(n, int) else None
        nodes = {metric, match, keep, sources, merge, merged, new_sizes} | ({current} if sizes is None else set())
        return Reduction(x=merged, count=count, side_index=keep, sources=sources, nodes=nodes)

    return reduce


def _fused_sites_after(graph: fx.Graph, point: fx.Node) -> list[fx.Node]:
    order = {n: i for i, n in enumerate(graph.nodes)}
    return [n for n in graph.nodes if n.target is FUSED and order[n] > order[point]]


def merge_tokens(program: Program, config: TomeConfig) -> tuple[Program, int]:
    """Insert a merge in every block that merges (all of them for `r=0`); one re-export at the end."""
    module = program.ep.module()
    graph = module.graph
    count = len(find_blocks(graph, find_attention(graph), set()))
    plan = [(i, r) for i, r in enumerate(merges_per_block(config, count)) if r > 0 or config.r == 0]
    sizes, bias, holder = None, _ProportionalAttention(), {}
    point = None
    for index, r in plan:
        if point is not None:
            refresh_shapes(module, start=point)
        block = find_blocks(graph, find_attention(graph), set())[index]
        if block.output is None or block.input_axis is None or not block.input_axis.plain:
            raise UserError(f"tome: block {index} has no residual stream with a token axis that can be merged")
        point = residual_midpoint(block)
        if point is None:
            raise UserError(f"tome: block {index} has no residual stream between attention and MLP to merge on")
        dim = block.input_axis.dim
        bias.remove(_fused_sites_after(graph, point))
        shrink_tokens(graph, point, Axis(dim, shape(point)[dim]), _reduction(block, r, config, dim, sizes, holder))
        sizes = holder["sizes"]
        if config.prop_attn:
            bias.add(graph, _fused_sites_after(graph, sizes), sizes)
    graph.eliminate_dead_code()  # only now: the sizes feed the next merge
    return reexport(program, module), len(plan)


@register
class Tome(Pass):
    """ToMe: merge the r most similar tokens in every block by bipartite soft matching (lossy)."""

    name = "tome"
    Config = TomeConfig
    lossless = False

    def apply_model(self, model: Model, config: TomeConfig) -> ModelResult:
        if model.is_decoder:
            raise UserError("tome merges tokens across positions, which breaks a causal decoder's masking; "
                            "use it on encoders, or prompt-prune for decoders")
        return super().apply_model(model, config)

    def exercise(self, config: TomeConfig) -> Exercise:
        """One pair to merge besides [CLS]; r=0 is the identity check."""
        if config.r == 0:
            return Exercise(never="r=0 merges nothing")
        return Exercise(tokens=2 + int(config.protect_cls))

    def apply(self, program: Program, config: TomeConfig) -> PassResult:
        result = reduce_tokens(program, lambda canonical: merge_tokens(canonical, config))
        if result.matched:
            blocks = len(result.report["tokens_per_block"]["before"])
            result.report["merges_per_block"] = merges_per_block(config, blocks)
        return result
