"""What skip-layers and skip-ffn share: the list of blocks, the frame of the rewrite, the report.

Both passes drop work inside chosen blocks by routing the residual stream around it and removing
whatever no longer feeds an output. Neither changes the program's inputs, outputs or shapes, so
prefill and decode programs are rewritten independently and one re-export finishes each.
Indices are 0-based and count the blocks `find_blocks` finds, in graph order.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from skimformer.errors import UserError
from skimformer.ir.attention import find_attention
from skimformer.ir.blocks import Block, blocks_to_rewrite, find_blocks
from skimformer.ir.program import Program
from skimformer.ir.rewrite import eliminate_dead_code, reexport
from skimformer.ir.structure import analyze
from skimformer.passes.base import PassResult
from skimformer.passes.token_report import flops_change


@dataclass
class LayersConfig:
    """The blocks to rewrite, 0-based; `[]` leaves the program as it is."""

    layers: list[int] = field(default_factory=list)

    def __post_init__(self):
        if any(i < 0 for i in self.layers):
            raise UserError(f"layers are 0-based block indices, >= 0; got {self.layers}")
        if len(set(self.layers)) != len(self.layers):
            raise UserError(f"layers names a block more than once ({self.layers}); give each block once")


# Edits the graph for the chosen blocks (given all of them and the sorted chosen indices).
Edit = Callable[[list[Block], list[int]], None]


def rewrite_blocks(program: Program, name: str, layers: list[int], edit: Edit) -> PassResult:
    """Apply `edit` to the blocks `layers` of `program`, drop dead code, re-export and report
    `{layers, blocks_before, blocks_after, flops}`; `layers=[]` returns the program unchanged."""
    module = program.ep.module()
    graph = module.graph
    blocks = (blocks_to_rewrite(graph, name, program.role, f"apply {name} before kv-quant") if layers
              else find_blocks(graph, find_attention(graph), set()))
    if any(i >= len(blocks) for i in layers):
        raise UserError(f"{name}(layers={layers}): the {program.role} program has {len(blocks)} blocks "
                        f"(0-based indices up to {len(blocks) - 1})")
    report = {"layers": sorted(layers), "blocks_before": len(blocks)}
    if not layers:
        return PassResult(program, {**report, "blocks_after": len(blocks)}, 0)
    edit(blocks, sorted(layers))
    eliminate_dead_code(graph)
    rewritten = reexport(program, module)
    report.update(blocks_after=len(analyze(rewritten).blocks), flops=flops_change(program, rewritten))
    return PassResult(rewritten, report, len(layers))
