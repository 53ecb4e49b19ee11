"""A worker evaluates trials on one machine: the cheap screen, then the engine and its timing.

`screen` runs the pipeline's passes (the project's `PassManager`: lossless checks, pass reports)
and measures the rewritten programs' fidelity in torch on the search rows. That costs a fraction
of building an engine, and since every engine is checked against its programs, an engine would
measure the same up to the parity tolerance: a candidate the screen puts outside the budget is
dropped before any engine is built. It also gives the work estimate the driver ranks candidates
by: FLOPs and KV-cache bytes after / before, from the passes' own reports.

`measure` builds the screened candidate's engine (the same `build_engine` as `optimize`, parity
included), measures its fidelity on the search rows against the unoptimized engine, and times
both in alternation. The unoptimized engine is built once per worker, so every ratio compares
two engines timed on the same machine in the same process.

The rewritten programs of a screened candidate stay in this worker until `measure` or `drop`.
Failures of one candidate (a pipeline a pass refuses, a parity failure) are the trial's result,
never the search's end.
"""
from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from skimformer.backends.build import build_engine
from skimformer.backends.engine import Engine
from skimformer.errors import UserError, cause, one_line
from skimformer.ir import Model, load
from skimformer.passes import PassManager
from skimformer.passes.spec import build_pipeline, parse_text
from skimformer.tuning.figures import (decoder_figures, decoder_speed, encoder_figures, encoder_speed,
                                       teacher_forced)
from skimformer.tuning.rows import Rows
from skimformer.tuning.space import Candidate

MASK = "attention_mask"


def work_estimate(records) -> float:
    """Work left after the pipeline, as a fraction: per pass the mean of the after/before ratios
    of FLOPs and KV-cache bytes in its report (a decoder's reports hold one per program), the
    passes' fractions multiplied; 1.0 for a pass that reports neither (early exits save work only
    at run time). A ranking heuristic, not a prediction of speed."""
    total = 1.0
    for record in records:
        ratios = [after / before for before, after in _counts(record.report) if before]
        if ratios:
            total *= sum(ratios) / len(ratios)
    return total


def _counts(report) -> list[tuple[float, float]]:
    out = []
    if isinstance(report, dict):
        for key, value in report.items():
            if key in ("flops", "kv_cache_bytes") and isinstance(value, dict) and "before" in value:
                out.append((value["before"], value["after"]))
            else:
                out.extend(_counts(value))
    return out


class Worker:
    """Screens and measures trials of one model on the rows `rows`, building engines with
    `backend` and `options` (a candidate's `weights` added); `threads` for torch and the engines
    (None: torch's default); `aliases` rewrite paths in pipeline texts (a remote worker's copy
    of the exit heads)."""

    def __init__(self, model: str | Path, rows: Rows, backend: str, options: dict, threads: int | None = None,
                 aliases: dict[str, str] | None = None):
        if threads:
            torch.set_num_threads(threads)
        self.model: Model = load(model)
        self.rows, self.backend, self.options = rows, backend, dict(options)
        self.aliases = aliases or {}
        self.workdir = Path(tempfile.mkdtemp(prefix="skimformer-tune-"))
        self._screened: dict[int, tuple] = {}
        self._baseline: Engine | None = None
        self._reference: dict[str, np.ndarray] = {}

    # -- the screen ------------------------------------------------------------------------------

    def screen(self, number: int, candidate: Candidate) -> dict:
        """Rewrite with the candidate's passes; its work estimate and program-level figures."""
        start = time.perf_counter()
        text = candidate.pipeline
        for old, new in self.aliases.items():
            text = text.replace(old, new)
        try:
            pipeline = build_pipeline(parse_text(text))
            data = self.rows.search if self.model.is_decoder else None
            rewritten, records, fidelity = PassManager(pipeline, data=data).run(self.model)
            figures = self._screen_figures(rewritten, fidelity)
        except Exception as e:  # noqa: BLE001 (one candidate's failure is its trial's result)
            return _failed(e, start)
        self._screened[number] = (candidate, rewritten, records, fidelity)
        return {"state": "screened", "screen": figures, "estimate": round(work_estimate(records), 4),
                "changed": any(r.matched for r in records), "unmatched": [r.name for r in records if not r.matched],
                "seconds": {"screen": round(time.perf_counter() - start, 2)}}

    def _screen_figures(self, rewritten: Model, fidelity: dict) -> dict:
        if self.model.is_decoder:  # the PassManager's teacher-forced measurement on the search rows
            names = {"next_token_agreement": "agreement", "next_token_cosine": "cosine"}
            return {names[k]: v for k, v in fidelity.items() if k in names}
        (role, program), = self.model.programs.items()
        reference = self._reference.setdefault("program", self._program_outputs(program))
        return self._encoder_figures(reference, self._program_outputs(rewritten.programs[role]), "search")

    def _program_outputs(self, program) -> np.ndarray:
        first = program.output_names[0]
        return np.concatenate([program.run({k: torch.as_tensor(v) for k, v in chunk.items()})[first].numpy()
                               for chunk in self._chunks(self.rows.search)])

    def drop(self, number: int) -> None:
        self._screened.pop(number, None)

    # -- the engine --------------------------------------------------------------------------------

    def measure(self, number: int) -> dict:
        """Build the screened candidate's engine; its fidelity on the search rows and its speed."""
        start = time.perf_counter()
        candidate, rewritten, records, fidelity = self._screened.pop(number)
        folder = self.workdir / f"trial-{number}"
        options = {**self.options, **({"weights": candidate.weights} if candidate.weights else {})}
        try:
            baseline = self.baseline()
            built = time.perf_counter()
            engine, _ = build_engine(rewritten, self.model, folder, backend=self.backend, backend_options=options,
                                     records=records, fidelity=fidelity)
            figures = self.figures(engine, "search")
            speed = self.speed(baseline, engine)
        except Exception as e:  # noqa: BLE001
            return _failed(e, start)
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        return {"state": "complete", "figures": figures, **_speed(speed), "timing": speed,
                "seconds": {"build": round(time.perf_counter() - built, 2),
                            "measure": round(time.perf_counter() - start, 2)}}

    def baseline(self) -> Engine:
        """The unoptimized engine, built the way every candidate's is (without their weights)."""
        if self._baseline is None:
            self._baseline, _ = build_engine(self.model, self.model, self.workdir / "baseline", backend=self.backend,
                                             backend_options=self.options)
        return self._baseline

    def figures(self, engine: Engine, which: str) -> dict:
        """Budget figures of `engine` against the unoptimized engine on the `search` or `held_out` rows."""
        rows = getattr(self.rows, which)
        if self.model.is_decoder:
            ids, mask, prompt = rows["input_ids"], rows[MASK], self.rows.prompt
            if which not in self._reference:
                self._reference[which] = teacher_forced(self.baseline().run, ids, mask, prompt)
            return decoder_figures(self._reference[which], teacher_forced(engine.run, ids, mask, prompt),
                                   ids[:, prompt:])
        if which not in self._reference:
            self._reference[which] = self._engine_outputs(self.baseline(), rows)
        return self._encoder_figures(self._reference[which], self._engine_outputs(engine, rows), which)

    def _encoder_figures(self, reference: np.ndarray, outputs: np.ndarray, which: str) -> dict:
        rows, program = getattr(self.rows, which), next(iter(self.model.programs.values()))
        labels = None if self.rows.labels is None else self.rows.labels[which != "search"]
        return encoder_figures(reference, outputs, program.output_names[0], rows.get(MASK), labels)

    def _engine_outputs(self, engine: Engine, rows: dict) -> np.ndarray:
        first = next(iter(self.model.programs.values())).output_names[0]
        return np.concatenate([engine.run(chunk)[first] for chunk in self._chunks(rows)])

    def _chunks(self, rows: dict):
        n, batch = len(next(iter(rows.values()))), self.rows.batch
        for i in range(0, n, batch):
            yield {k: v[i:i + batch] for k, v in rows.items()}

    def speed(self, baseline: Engine, engine: Engine) -> dict:
        if self.model.is_decoder:
            logits = next(s for s in self.model.programs["prefill"].output_specs() if s["name"] == "logits")
            return decoder_speed(baseline, engine, int(logits["shape"][-1]), self.rows.prompt)
        return encoder_speed(baseline, engine, self.rows.timing_inputs())

    def check(self, folder: str | Path, timed: bool = True) -> dict:
        """The chosen engine (an engine folder) on the held-out rows, and when `timed` its speed measured again."""
        engine = Engine.load(folder)
        figures = self.figures(engine, "held_out")
        if not timed:
            return {"figures": figures}
        speed = self.speed(self.baseline(), engine)
        return {"figures": figures, **_speed(speed), "timing": speed}

    def close(self) -> None:
        self._screened.clear()
        self._baseline = None
        shutil.rmtree(self.workdir, ignore_errors=True)


def _speed(timing: dict) -> dict[str, float]:
    """A record's `speed` and `speed_bound`, taken out of the timing figures."""
    return {"speed": round(timing.pop("ratio"), 4), "speed_bound": round(timing.pop("ratio_bound"), 4)}


def _failed(error: Exception, start: float) -> dict:
    kind = "refused" if isinstance(error, UserError) else type(error).__name__
    return {"state": "failed", "reason": f"{kind}: {one_line(cause(error, 200))}",
            "seconds": {"failed_after": round(time.perf_counter() - start, 2)}}
