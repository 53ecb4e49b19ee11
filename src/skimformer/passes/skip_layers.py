"""skip-layers: remove whole transformer blocks (layer pruning as in LayerDrop, Fan et al., ICLR
2020, arXiv 1909.11556, and ShortGPT, Men et al. 2024, arXiv 2403.03853: deep models carry
layers whose removal barely changes the output). Lossy.

Every use of a chosen block's residual output reads its residual input instead, and whatever fed
only the block is removed: its attention, MLP and norms. Blocks are found from the graph's
structure (`ir.blocks`), whatever their modules are called.

Decoders keep every layer's cache. A skipped layer's `present_key_{i}` / `present_value_{i}`
still feed the engine's `past_*` inputs, so they stay, with their shapes: its keys and values are
still projected (norm, K/V projections, rotary embedding) from the hidden state entering the
layer, which is the hidden state that skips it. Prefill and decode compute them alike, so the
cache stays consistent between steps; its bytes do not shrink, and nothing reads it any more.
Ordering: `layers` counts the blocks of the program as given, and later passes that name blocks
count those that remain. KV-cache passes that rewrite every layer's attention (kv-window,
kv-evict) go first: after skip-layers they find a cache that no attention reads, and refuse.
kv-quant combines in neither order, since its quantized attention is no block skip-layers knows.
"""
from __future__ import annotations

from skimformer.errors import UserError
from skimformer.ir.blocks import Block
from skimformer.ir.program import Program
from skimformer.passes.base import Pass, PassResult
from skimformer.passes.block_skip import LayersConfig, rewrite_blocks
from skimformer.passes.registry import register

NAME = "skip-layers"
CACHE_NOTE = ("the skipped layers still return present_key/present_value, projected from the hidden state "
              "that skips them (the same in prefill and decode)")


def _skip(blocks: list[Block], layers: list[int]) -> None:
    if len(layers) == len(blocks):
        raise UserError(f"{NAME}(layers={layers}) would remove all {len(blocks)} blocks; keep at least one")
    for i in layers:
        if blocks[i].input is None or blocks[i].output is None:
            raise UserError(f"{NAME}: block {i} has no residual stream in and out to route around it; "
                            f"skip other blocks")
    for i in reversed(layers):  # the last first: a block's input may be the previous skipped block's output
        blocks[i].output.replace_all_uses_with(blocks[i].input)


@register
class SkipLayers(Pass):
    """Remove whole blocks: each chosen block's output becomes its input (lossy)."""

    name = NAME
    Config = LayersConfig
    lossless = False

    def apply(self, program: Program, config: LayersConfig) -> PassResult:
        result = rewrite_blocks(program, NAME, config.layers, _skip)
        if result.matched and any(name.startswith("present_") for name in program.output_names):
            result.report["cache"] = CACHE_NOTE
        return result
