"""The Python API: `skimformer.optimize(model, passes=..., backend=...) -> Engine` and
`skimformer.calibrate(model, out=...) -> Calibration`."""
from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Callable

from skimformer.backends.build import build_engine, check_destination
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
