"""PassManager: run a pipeline over a model, re-check shapes after each pass, and verify it.

Lossless passes must reproduce the input program's outputs on its example inputs within
DESIGN.md's tolerance (max-abs error <= 1e-4 * max(1, max|reference|), fp32; `tolerance` for
half-precision programs); lossy passes are
measured instead, on inputs sized so that each of them acts (`passes.fidelity`), and the figures
go into the report.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from skimformer.errors import VerificationError
from skimformer.ir import Model
from skimformer.passes.fidelity import measure_fidelity
from skimformer.passes.spec import Step, config_dict

TOLERANCE = 1e-4
HALF_ULPS = 16


def tolerance(precision: torch.dtype) -> float:
    """The relative tolerance for two computations of a program that computes in `precision`
    (`Program.precision`): DESIGN.md's 1e-4 in fp32; HALF_ULPS units in the last place (eps) in
    fp16 (1.6e-2) and bf16 (1.25e-1). Every half-precision op rounds to 11 or 8 significant bits,
    and two correct computations (torch's, and an engine's that runs some ops in fp32; the eager
    ops and the fused attention that replaces them) round differently at each of them. The
    difference, far above 1e-4, grows with depth: 2 ulps of the largest output on the 2-layer
    test models; 16 leaves room for deep ones, while a wrong rewrite is off by the size of its
    outputs."""
    return max(TOLERANCE, HALF_ULPS * torch.finfo(precision).eps)


def max_abs_error(reference: dict[str, torch.Tensor], candidate: dict[str, torch.Tensor],
                  precision: torch.dtype = torch.float32) -> tuple[float, bool]:
    """Largest absolute difference over shared outputs, and whether it is within the tolerance of
    a program computing in `precision`."""
    worst, ok = 0.0, True
    for name, ref in reference.items():
        got = candidate[name]
        ref_t, got_t = torch.as_tensor(ref).double(), torch.as_tensor(got).double()
        if ref_t.shape != got_t.shape:
            return float("inf"), False
        if ref_t.numel() == 0:
            continue
        err = (ref_t - got_t).abs().max().item()
        worst = max(worst, err)
        ok = ok and err <= tolerance(precision) * max(1.0, ref_t.abs().max().item())
    return worst, ok


@dataclass
class PassRecord:
    name: str
    config: dict
    lossless: bool
    matched: int
    report: dict
    seconds: float

    def to_json(self) -> dict:
        return {"name": self.name, "config": self.config, "lossless": self.lossless, "matched": self.matched,
                "report": self.report, "seconds": round(self.seconds, 3)}


def run_model(model: Model) -> dict[str, dict[str, torch.Tensor]]:
    return {role: program.run(program.example_inputs) for role, program in model.programs.items()}


class PassManager:
    """Runs `pipeline`; `data` (arrays named like the inputs, rows first) replaces the inputs
    fidelity is measured on."""

    def __init__(self, pipeline: list[Step], progress: Callable[[str], None] = lambda msg: None,
                 data: dict[str, np.ndarray] | None = None):
        self.pipeline = pipeline
        self.progress = progress
        self.data = data

    def run(self, model: Model) -> tuple[Model, list[PassRecord], dict]:
        """The rewritten model, a record per pass, and the fidelity of its lossy passes against the
        input model (`passes.fidelity.measure_fidelity`; empty when none matched)."""
        records: list[PassRecord] = []
        original, lossy = model, []
        for cls, config in self.pipeline:
            self.progress(f"pass {cls.name}")
            before, start = model, time.perf_counter()
            result = cls().apply_model(model, config)
            model = result.model
            for program in model.programs.values():
                program.ep.graph.lint()
            if cls.lossless and result.matched:
                self._verify_lossless(cls.name, before, model)
            records.append(PassRecord(cls.name, config_dict(config), cls.lossless, result.matched,
                                      result.report, time.perf_counter() - start))
            if not cls.lossless and result.matched:
                lossy.append((cls.name, cls().exercise(config)))
        if not lossy:
            return model, records, {}
        return model, records, measure_fidelity(original, model, lossy, self.data, self.progress)

    @staticmethod
    def _verify_lossless(name: str, before: Model, after: Model) -> None:
        want, got = run_model(before), run_model(after)
        for role in want:
            err, ok = max_abs_error(want[role], got[role], before.programs[role].precision)
            if not ok:
                raise VerificationError(f"lossless pass {name} changed the {role} program's outputs "
                                        f"(max abs error {err:.3g})")
