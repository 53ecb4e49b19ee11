"""skip-ffn: remove the feed-forward network (MLP) of chosen blocks (FFN-SkipLLM, Jaiswal et al.
2024, arXiv 2404.03865: the FFNs of later blocks barely change the hidden state, their input and
output saturate in cosine similarity). This is the paper's fixed-mask variant: the chosen
blocks' FFNs are removed from the graph for every token. Lossy.

Each chosen block computes what it would if its FFN returned zeros. Attention, the KV cache and
every shape stay as they were. The FFN is found from dataflow, not module names, in the two
block layouts transformers use:
- sequential (pre-norm Llama, GPT-2, ViT; post-norm BERT): the residual stream between
  attention and MLP (`residual_midpoint`) branches into the FFN and its skip; the `add` where
  they meet again becomes the skip. A pre-norm block then returns its post-attention stream; a
  post-norm block still applies its last norm to it (LayerNorm(h + 0)), which keeps the scale
  every later block was trained on.
- parallel (GPT-NeoX, GPT-J: x + attn(ln1(x)) + mlp(ln2(x))): the FFN reads the block input
  beside attention; the `add` where its output meets attention's becomes attention's operand.
Ordering: `layers` counts the blocks of the program as given; put it before kv-quant, whose
quantized attention is no block skip-ffn knows.
"""
from __future__ import annotations

import torch.fx as fx

from skimformer.errors import UserError
from skimformer.ir.blocks import Block, residual_midpoint, stream_views
from skimformer.ir.graph import ancestors, descendants, op_name
from skimformer.ir.program import Program
from skimformer.passes.base import Pass, PassResult
from skimformer.passes.block_skip import LayersConfig, rewrite_blocks
from skimformer.passes.registry import register

NAME = "skip-ffn"


def ffn_join(block: Block) -> tuple[fx.Node, fx.Node] | None:
    """`(join, stream)`: the `add` where the block's FFN output meets the residual stream, and
    its operand that carries the stream (what the join is without the FFN); None if there is none."""
    members = set(block.nodes)
    midpoint = residual_midpoint(block)
    if midpoint is not None:  # sequential: the FFN branches off the midpoint and meets its skip again
        stream = stream_views(midpoint, members)
        ffn = descendants([midpoint]) & members - stream
    else:  # parallel: the FFN neither feeds attention nor reads it
        attention = block.attention[0].output
        stream = ({attention} | descendants([attention])) & members
        ffn = members - stream - ancestors([attention])
    for node in block.nodes:
        if op_name(node) != "add" or len(node.args) < 2:
            continue
        a, b = node.args[:2]
        if a in stream and b in ffn:
            return node, a
        if b in stream and a in ffn:
            return node, b
    return None


def _skip(blocks: list[Block], layers: list[int]) -> None:
    joins = [ffn_join(blocks[i]) for i in layers]
    for i, found in zip(layers, joins):
        if found is None:
            raise UserError(f"{NAME}: block {i} has no FFN branch joining its residual stream by an add "
                            f"(found neither a stream between attention and MLP nor a parallel MLP); skip other blocks")
    for join, stream in joins:
        join.replace_all_uses_with(stream)


@register
class SkipFFN(Pass):
    """Remove the FFN (MLP) of chosen blocks: each block computes as if its FFN returned zeros (lossy)."""

    name = NAME
    Config = LayersConfig
    lossless = False

    def apply(self, program: Program, config: LayersConfig) -> PassResult:
        return rewrite_blocks(program, NAME, config.layers, _skip)
