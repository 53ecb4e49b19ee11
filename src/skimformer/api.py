"""The Python API: `skimformer.optimize(model, passes=..., backend=...) -> Engine`,
`skimformer.calibrate(model, out=...) -> Calibration` and `skimformer.tune(model, budget=...)`."""
from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Callable

from skimformer.backends.build import build_engine, check_destination, check_dtypes
from skimformer.backends.registry import checked_backend
from skimformer.backends.engine import Engine
from skimformer.calibration import CRITERION, RANK, STEPS, TARGET_AGREEMENT, Calibration, calibrate_model
from skimformer.calibration.data import read_npz
from skimformer.ir import Model, Program, analyze, load
from skimformer.passes import PassManager, pipeline_from
from skimformer.passes.spec import Step

NO_STRUCTURE = "no transformer structure was found (no attention): the engine runs the program unchanged"


def _as_model(model) -> Model:
    if isinstance(model, Model):
        return model
    if isinstance(model, Program):
        return Model(programs={model.role: model})
    return load(model)


def optimize_model(model: Model, out: str | Path, pipeline: list[Step], *, backend: str = "onnxruntime",
                   backend_options: dict | None = None, measure: bool = False, force: bool = False, progress: Callable[[str], None] = lambda m: None,
                   warn: Callable[[str], None] = lambda m: None, data: dict | None = None):
    """Rewrite `model` with a parsed pipeline, build the engine folder `out`; returns (engine, report).
    `data` (arrays named like the program's inputs, rows first) are the inputs fidelity is measured on."""
    check_dtypes(model)  # before the passes run: the engine would be refused after them
    notes = []
    if not any(analyze(p).is_transformer for p in model.programs.values()):
        notes.append(NO_STRUCTURE)
        warn(NO_STRUCTURE)
    progress(f"running {len(pipeline)} pass(es)" if pipeline else "no passes: building the unchanged program")
    rewritten, records, metrics = PassManager(pipeline, progress, data).run(model)
    for record in records:
        if not record.matched:
            warn(f"pass {record.name} matched nothing; the program is unchanged by it")
    return build_engine(rewritten, model, Path(out), backend=backend, backend_options=backend_options, force=force,
                        records=records,
                        fidelity=metrics, measure=measure, notes=notes, progress=progress)


def optimize(model, passes: str | None = None, backend: str = "onnxruntime", output: str | Path | None = None, *,
             config: str | Path | None = None, backend_options: dict | None = None, measure: bool = False,
             force: bool = False, data: str | Path | dict | None = None) -> Engine:
    """Optimize a model (a path, `Model` or `Program`) and return its engine.

    Without `output` the engine folder goes to a new temporary folder (`engine.folder` says where).
    `backend_options` are the backend's own (the mlir backend's `dialect`). `data` (an .npz path
    or a dict of arrays named like the program's inputs, rows first) replaces the inputs that
    lossy passes' fidelity is measured on (a decoder's default: the shipped texts).
    """
    data = read_npz(data, "fidelity inputs") if isinstance(data, (str, Path)) else data
    pipeline = pipeline_from(passes, config)
    checked_backend(backend, backend_options)
    out = Path(output) if output is not None else Path(tempfile.mkdtemp(prefix="skimformer-")) / "engine"
    check_destination(out, force)
    engine, _ = optimize_model(_as_model(model), out, pipeline, backend=backend, backend_options=backend_options,
                               measure=measure, force=force, data=data)
    return engine


def calibrate(model, data: str | Path | dict | None = None, at: list[int] | None = None, out: str | Path | None = None,
              *, target_agreement: float = TARGET_AGREEMENT, rank: int = RANK, criterion: str = CRITERION,
              steps: int = STEPS, seed: int = 0) -> Calibration:
    """Train exit adapters for a model (a path, `Model` or `Program`; the backbone stays frozen) and
    choose per-exit thresholds; writes the exit-heads file `out` when given (see `skimformer.calibration`).

    `data`: an .npz path or a dict of arrays named like the program's inputs, rows first (a
    decoder's default: the shipped texts). `at`: blocks to exit after (default: at 1/4, 1/2 and 3/4
    of the depth). The result's `heads` hold the adapters, thresholds and agreement figures.
    """
    return calibrate_model(_as_model(model), data, at, out, target_agreement=target_agreement, rank=rank,
                           criterion=criterion, steps=steps, seed=seed)


def tune(model: str | Path, budget: str | list[str], data: str | Path | dict | None = None,
         output: str | Path | None = None, *, space: str | None = None, trials: int | None = None,
         time: str | float | None = None, backend: str = "onnxruntime", backend_options: dict | None = None,
         ray: str | None = None, workers: int | None = None, threads: int | None = None, batch: int = 8,
         seed: int = 0, force: bool = False):
    """Search the passes that apply to a model (a .pt2 path or a decoder folder) for the fastest
    engine within `budget` (`"cosine>=0.99"`, several comma-separated; see `skimformer.tuning`).

    `data`: an .npz path or a dict of arrays named like the program's inputs, rows first (an
    encoder's `labels` for `top1-drop`; a decoder's default: the shipped texts). `space`: groups
    of passes, `"tokens,kv,exit,skip,weights"` (default: those that apply). `trials` (default 40)
    and `time` (seconds or `"20m"`) bound the search. `ray`: `"auto"` (a local Ray cluster) or a
    cluster's address, with `workers` of `threads` threads. Without `output` the folder is a new
    temporary one. Returns a `TuneResult` (`.chosen`, `.front`, `.engine`, `.summary`).
    """
    from skimformer.tuning import parse_duration, tune_model  # Optuna loads only when tuning

    data = read_npz(data, "tune inputs") if isinstance(data, (str, Path)) else data
    out = Path(output) if output is not None else Path(tempfile.mkdtemp(prefix="skimformer-")) / "tuned"
    return tune_model(model, budget, out, data=data, space=space, trials=trials,
                      time_limit=None if time is None else parse_duration(time), backend=backend,
                      backend_options=backend_options, ray=ray, workers=workers, threads=threads, batch=batch,
                      seed=seed, force=force)
