"""The frozen model as calibration sees it: blocks whose outputs feed exits, and a head that maps
any hidden state to logits exactly as the program maps the last block's output.

The head is found from dataflow, not from module names: everything after the last block's output
that computes `logits` (`ir.exits.cut_after` + `replay`), as a GraphModule of that output and of
whatever else the head reads (an attention mask for mean pooling, say). One run of the program per
calibration batch (an `fx.Interpreter`, no grad) keeps the exit blocks' outputs, the head's other
operands and the full model's distribution; training then only ever runs the head.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx

from skimformer.errors import UserError
from skimformer.ir import Program
from skimformer.ir.attention import find_attention
from skimformer.ir.blocks import find_blocks
from skimformer.ir.exits import branch_graph, cut_after, replay
from skimformer.ir.signature import named_outputs


@dataclass
class Captured:
    """One calibration batch after the full model ran: each exit block's output, the head's
    operands (by node; the last block's output among them), the positions that count (`valid`,
    over the logits' leading dimensions: padding excluded) and the full model's log-probabilities
    at those positions, `[P, V]`."""

    hidden: dict[int, torch.Tensor]
    operands: dict[fx.Node, torch.Tensor]
    valid: torch.Tensor
    log_probs: torch.Tensor

    def split(self, rows: int) -> list["Captured"]:
        """The batch cut into batches of `rows` rows: the full model runs faster on many rows at a
        time, and training steps want fewer positions."""
        ends = self.valid.reshape(len(self.valid), -1).sum(1).cumsum(0).tolist()
        out = []
        for i in range(0, len(self.valid), rows):
            j = min(i + rows, len(self.valid))
            first = ends[i - 1] if i else 0
            out.append(Captured({k: h[i:j] for k, h in self.hidden.items()},
                                {n: t[i:j] for n, t in self.operands.items()}, self.valid[i:j],
                                self.log_probs[first:ends[j - 1]]))
        return out


class _Keep(fx.Interpreter):
    """Runs a graph and keeps the values of chosen nodes."""

    def __init__(self, module: fx.GraphModule, keep: set[fx.Node]):
        super().__init__(module)
        self.keep, self.kept = keep, {}

    def run_node(self, n):
        out = super().run_node(n)
        if n in self.keep:
            self.kept[n] = out
        return out


def default_at(blocks: int) -> list[int]:
    """Exits after the blocks at a quarter, half and three quarters of the depth (distinct, and
    never after the last block, where leaving saves nothing)."""
    return sorted({q * blocks // 4 - 1 for q in (1, 2, 3)} & set(range(blocks - 1)))


class Backbone:
    """A program's blocks and head, for exits after the blocks in `at`."""

    def __init__(self, program: Program):
        self.program = program
        self.module = program.ep.module()
        graph = self.module.graph
        self.blocks = find_blocks(graph, find_attention(graph), set())
        if not self.blocks or any(b.output is None for b in self.blocks):
            raise UserError("calibrate found no transformer blocks with a residual stream in this program: "
                            "run `skimformer inspect MODEL` to see what was found")
        outputs = named_outputs(self.module)
        if "logits" not in outputs:
            raise UserError(f"calibrate needs the model's head: the program returns no `logits` (it returns "
                            f"{', '.join(outputs)}); export the model with its LM head or classifier")
        self.logits = outputs["logits"]
        self.last = self.blocks[-1].output
        cut = cut_after(graph, self.last, [self.logits])
        if self.logits not in cut.rest:
            raise UserError("calibrate needs `logits` computed from the last block's output; this program's are not")
        head, env, _ = branch_graph(cut, [])
        head.output(replay(head, [self.logits], env, cut.copied)[0])
        head.eliminate_dead_code()
        self.operands = [n for n in cut.operands if env[n].users]  # what the logits read, the last output among them
        for node in set(cut.operands) - set(self.operands):
            head.erase_node(env[node])
        self.head_module = fx.GraphModule(self.module, head)

    def check_at(self, at: list[int]) -> None:
        last = len(self.blocks) - 1
        if not at or len(set(at)) != len(at) or any(not 0 <= k < last for k in at):
            raise UserError(f"at must list distinct blocks to exit after, 0..{last - 1} for this model's "
                            f"{len(self.blocks)} blocks (0-based; leaving after the last block saves nothing); "
                            f"got {at}")

    def run(self, inputs: dict[str, torch.Tensor], at: list[int]) -> Captured:
        """Run the full program on one batch, keeping what training and evaluation need."""
        exits = {k: self.blocks[k].output for k in at}
        keep = _Keep(self.module, {*exits.values(), *self.operands, self.logits})
        with torch.no_grad():
            keep.run(*[inputs[name] for name in self.program.input_names])
        logits = keep.kept[self.logits]
        rows = len(logits)
        if any(len(keep.kept[n]) != rows for n in self.operands):
            raise UserError("the model's head reads a tensor that is not one row per input row, which calibrate "
                            "cannot split into batches")
        mask = inputs.get("attention_mask")
        valid = (mask.bool() if mask is not None and mask.shape == logits.shape[:-1]
                 else torch.ones(logits.shape[:-1], dtype=torch.bool))
        return Captured(hidden={k: keep.kept[node] for k, node in exits.items()},
                        operands={n: keep.kept[n] for n in self.operands}, valid=valid,
                        log_probs=logits[valid].float().log_softmax(-1))

    def head(self, hidden: torch.Tensor, batch: Captured) -> torch.Tensor:
        """The model's head applied to `hidden` in place of the last block's output: the logits at
        the batch's valid positions, `[P, V]`."""
        args = [hidden if n is self.last else batch.operands[n] for n in self.operands]
        return self.head_module(*args)[batch.valid]
