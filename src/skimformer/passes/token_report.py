"""What a token-reduction pass reports: tokens entering each block and FLOPs, before and after,
measured on the program's example inputs, and the frame those passes share."""
from __future__ import annotations

from typing import Callable

import torch
import torch.fx as fx
from torch.utils.flop_counter import FlopCounterMode

from skimformer.ir.attention import find_attention
from skimformer.ir.program import Program
from skimformer.ir.structure import analyze
from skimformer.passes.base import PassResult
from skimformer.passes.canonicalize_attention import CanonicalizeAttention


class _BlockShapes(fx.Interpreter):
    """Runs a graph and records the token count at each block's residual input."""

    def __init__(self, module, watch: dict[str, int]):
        super().__init__(module)
        self.watch, self.seen = watch, {}

    def run_node(self, n):
        out = super().run_node(n)
        if n.name in self.watch and isinstance(out, torch.Tensor):
            self.seen[n.name] = int(out.shape[self.watch[n.name]])
        return out


def tokens_per_block(program: Program) -> list[int | None]:
    blocks = analyze(program).blocks
    watch = {b.input.name: b.input_axis.dim for b in blocks if b.input is not None and b.input_axis is not None}
    gm = program.ep.module()
    args = [program.example_inputs[n] for n in program.input_names]
    interp = _BlockShapes(gm, watch)
    with torch.no_grad():
        interp.run(*args)
    return [interp.seen.get(b.input.name) if b.input is not None else None for b in blocks]


def flops(program: Program) -> int:
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        program.run(program.example_inputs)
    return int(counter.get_total_flops())


def flops_change(before: Program, after: Program) -> dict:
    """FLOPs of a program before and after a rewrite, on its example inputs, and their ratio."""
    f0, f1 = flops(before), flops(after)
    return {"before": f0, "after": f1, "ratio": round(f1 / f0, 4) if f0 else None}


def token_report(before: Program, after: Program) -> dict:
    return {"tokens_per_block": {"before": tokens_per_block(before), "after": tokens_per_block(after)},
            "flops": flops_change(before, after),
            "approximate_outputs": [name for name, node in zip(after.output_names, after.output_nodes())
                                    if node.target is torch.ops.skim.restore_tokens.default]}


def reduce_tokens(program: Program, rewrite: Callable[[Program], tuple[Program, int]]) -> PassResult:
    """The frame every token-reduction pass shares: canonicalize attention, rewrite (returning the
    program and the sites rewritten), and report tokens and FLOPs; a program without attention is
    returned unchanged."""
    canonical = CanonicalizeAttention().apply(program, CanonicalizeAttention.Config()).program
    if not find_attention(canonical.ep.graph):
        return PassResult(program, {"reason": "no attention"}, 0)
    rewritten, matched = rewrite(canonical)
    return PassResult(rewritten, token_report(program, rewritten), matched)
