"""calibration: train exit adapters with the backbone frozen and choose per-exit thresholds.

The model's own head applied after an early block mostly disagrees with the full model when the
model was not trained for early exit. `calibrate_model` distils a small low-rank adapter per exit
(`ir.exit_heads.adapt`, placed before the head, as Kangaroo does for self-speculation) from the
full model's own distributions, then picks each exit's threshold so that what it takes agrees
with the full model at a target rate (CALM's calibration idea). The result is an `ExitHeads`
file that `early-exit(heads=...)` and `self-speculate(heads=...)` read.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from skimformer.calibration.backbone import Backbone, default_at
from skimformer.calibration.data import as_inputs, read_npz, split, text_rows
from skimformer.calibration.train import choose_thresholds, judge, train_adapter
from skimformer.errors import UserError
from skimformer.ir import Model
from skimformer.ir.exit_heads import ExitHeads
from skimformer.passes.early_exit import CRITERIA

TARGET_AGREEMENT, RANK, CRITERION, STEPS = 0.99, 32, "max-prob", 200  # the defaults of the API and the CLI
STEP_POSITIONS = 128  # calibration positions per training step (a decoder row has one per token)
# The full model runs on 4 steps' rows at a time, at most 64 rows (one row alone is ~3x slower per row on CPU).
RUN_STEPS, RUN_ROWS = 4, 64


@dataclass
class Calibration:
    """What `calibrate` made (`heads`), where it was written, and on how much data in how long."""

    heads: ExitHeads
    output: Path | None
    positions: dict[str, int]  # train, held_out
    seconds: float

    def summary(self) -> dict:
        h = self.heads
        exits = [{"at": k, "agreement_before": h.agreement_before[k], "agreement_after": h.agreement_after[k],
                  "threshold": h.thresholds[k], "exit_rate": h.exit_rate[k]} for k in h.at]
        return {"output": str(self.output) if self.output else None, "kind": h.kind, "rank": h.rank,
                "criterion": h.criterion, "target_agreement": h.target_agreement, "exits": exits,
                "positions": self.positions, "seconds": round(self.seconds, 1)}

    def table(self) -> str:
        """The figures per exit, for people: top-1 agreement with the full model on held-out
        positions before and after training, the threshold and the share of positions it takes."""
        h = self.heads
        lines = [f"{h.kind}, rank {h.rank}, {h.criterion} > threshold, target agreement {h.target_agreement:g}; "
                 f"{self.positions['train']} training and {self.positions['held_out']} held-out positions, "
                 f"{self.seconds:.0f} s",
                 f"{'exit after':>10}  {'agreement before':>16}  {'after':>7}  {'threshold':>9}  {'exit rate':>9}"]
        for k in h.at:
            lines.append(f"{k:>10}  {h.agreement_before[k]:>16.1%}  {h.agreement_after[k]:>7.1%}  "
                         f"{h.thresholds[k]:>9.3g}  {h.exit_rate[k]:>9.1%}")
        return "\n".join(lines)


def check_options(out: str | Path | None, target_agreement: float, rank: int, criterion: str, steps: int) -> None:
    """Refuse bad options before any slow work."""
    if out is not None and Path(out).is_dir():
        raise UserError(f"{out} is a folder: give the exit-heads file to write, e.g. -o heads.safetensors")
    if not 0 < target_agreement <= 1:
        raise UserError(f"target agreement is a fraction in (0, 1], e.g. 0.99; got {target_agreement}")
    if rank < 1:
        raise UserError(f"rank must be >= 1; got {rank}")
    if criterion not in CRITERIA:
        raise UserError(f"criterion must be one of {', '.join(CRITERIA)}; got {criterion!r}")
    if steps < 0:
        raise UserError(f"steps must be >= 0 (0 keeps the plain exits and only picks thresholds); got {steps}")


def calibrate_model(model: Model, data: str | Path | dict | None = None, at: list[int] | None = None,
                    out: str | Path | None = None, *, target_agreement: float = TARGET_AGREEMENT, rank: int = RANK,
                    criterion: str = CRITERION, steps: int = STEPS, seed: int = 0,
                    progress: Callable[[str], None] = lambda m: None) -> Calibration:
    """Train adapters for the exits after the blocks in `at` (default: at 1/4, 1/2 and 3/4 of the
    depth) on `data` (an .npz path or a dict of arrays named like the program's inputs; for a
    decoder, default: the shipped texts), choose their thresholds and write them to `out`."""
    check_options(out, target_agreement, rank, criterion, steps)
    start = time.perf_counter()
    program = model.programs["prefill"] if model.is_decoder else next(iter(model.programs.values()))
    backbone = Backbone(program)
    at = sorted(at) if at is not None else default_at(len(backbone.blocks))
    backbone.check_at(at)
    if data is None and not model.is_decoder:
        raise UserError("an encoder needs calibration inputs: give --data inputs.npz with one array per program "
                        f"input ({', '.join(program.input_names)}), rows first")
    arrays = read_npz(data) if isinstance(data, (str, Path)) else data if data is not None else text_rows(model)
    inputs = as_inputs(arrays, program, model.is_decoder)
    step_rows = max(1, STEP_POSITIONS // (inputs["input_ids"].shape[1] if model.is_decoder else 1))
    train, held = split(inputs, min(RUN_ROWS, RUN_STEPS * step_rows), seed)
    progress(f"running the full model on {len(next(iter(inputs.values())))} rows")
    train = [part for b in train for part in backbone.run(b, at).split(step_rows) if len(part.log_probs)]
    held = [backbone.run(b, at) for b in held]
    if not train or not sum(len(b.log_probs) for b in held):
        raise UserError("the calibration inputs have too few unpadded positions to train on and hold out: "
                        "give more rows")
    generator = torch.Generator().manual_seed(seed)
    adapters, before, after, judged = {}, {}, {}, {}
    for k in at:
        before[k] = float(judge(backbone, k, None, held, criterion)[1].float().mean())
        adapters[k] = train_adapter(backbone, k, train, rank, steps, generator, progress)
        judged[k] = judge(backbone, k, adapters[k], held, criterion)
        after[k] = float(judged[k][1].float().mean())
        progress(f"exit {k}: top-1 agreement {before[k]:.1%} before, {after[k]:.1%} after")
    thresholds, rates = choose_thresholds(judged, target_agreement)
    heads = ExitHeads(kind=model.kind, adapters=adapters, criterion=criterion, thresholds=thresholds,
                      target_agreement=target_agreement, agreement_before=before, agreement_after=after,
                      exit_rate=rates)
    if out is not None:
        heads.save(out)
    positions = {"train": sum(len(b.log_probs) for b in train), "held_out": sum(len(b.log_probs) for b in held)}
    return Calibration(heads, Path(out) if out is not None else None, positions, time.perf_counter() - start)
