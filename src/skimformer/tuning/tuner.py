"""`skimformer tune`: from a model and a budget to the fastest engine within it.

The line: refuse bad input before any slow work (budgets, space, backend, output folder); split
the rows; calibrate exit adapters once when exits are searched; search (`search.Search` over a
local or Ray `pool`); build the chosen pipeline's engine into `OUT/engine` (the unoptimized one
when nothing within the budget helps) with `optimize`'s own builder; measure it once more, on the
held-out rows and against the unoptimized engine (a choice that is no longer faster when timed
again had a gain within the machine's timing noise: the unoptimized engine replaces it); write
`best.yaml`, `trials.png` and `summary.json`. The folder is locked for the whole run, and
`trials.jsonl` grows as trials finish, so an interrupted run resumes where it stopped.
"""
from __future__ import annotations

import contextlib
import json
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from skimformer.api import optimize_model
from skimformer.atomic import atomic_file, exclusive
from skimformer.backends.engine import Engine
from skimformer.backends.registry import checked_backend
from skimformer.calibration import calibrate_model
from skimformer.errors import UserError
from skimformer.ir import load
from skimformer.passes.spec import build_pipeline, parse_text
from skimformer.tuning.budget import Budget, check_budgets, parse_budgets
from skimformer.tuning.journal import FORMAT, Journal, digest_arrays, digest_files
from skimformer.tuning.pool import LocalPool
from skimformer.tuning.report import (choose, faster, fastest_within, pareto_front, plot, speed_text, table,
                                     write_best)
from skimformer.tuning.rows import Rows, tune_rows
from skimformer.tuning.search import Search, describe, require_optuna, violations
from skimformer.tuning.space import Facts, Space, space_groups
from skimformer.tuning.worker import Worker

DEFAULT_TRIALS = 40
HEADS_FILE = "exit-heads.safetensors"


@dataclass
class TuneResult:
    """The search's outcome: `chosen` (a trials.jsonl record, None when nothing within the budget
    is faster), the Pareto `front`, every trial, the engine built and `summary` (summary.json)."""

    folder: Path
    chosen: dict | None
    front: list[dict]
    records: list[dict]
    engine: Engine
    summary: dict = field(default_factory=dict)

    def text(self) -> str:
        """What the CLI prints: the front, the answer and where the outputs are."""
        s = self.summary
        lines = [f"Pareto front (speed against {s['primary']}; "
                 f"{s['trials']['complete']} of {s['trials']['total']} trials measured, "
                 f"{s['trials']['pruned']} pruned, {s['trials']['failed']} failed):", s["front_table"], "",
                 s["answer"]]
        if s.get("held_out"):
            h = s["held_out"]
            figures = ", ".join(f"{k} {h['figures'][k]:.4g}" for k in h["budget_metrics"])
            lines.append(f"measured again on {s['inputs']['held_out_rows']} held-out rows: {figures} "
                         f"({'within' if h['within_budget'] else 'OUTSIDE'} the budget)"
                         + ("" if h["speed"] is None else f", {h['speed']:.2f}x"))
        lines += [*s["notes"], f"engine: {s['engine']}  pipeline: {s['best']}  trials: {s['trials_file']}"
                  + (f"  plot: {s['plot']}" if s.get("plot") else "")]
        return "\n".join(lines)


DURATION = re.compile(r"^\s*(?:(\d+(?:\.\d+)?)h)?\s*(?:(\d+(?:\.\d+)?)m)?\s*(?:(\d+(?:\.\d+)?)s?)?\s*$")


def parse_duration(text: str | float) -> float:
    """Seconds from `90`, `90s`, `20m`, `1h30m` (or a number of seconds)."""
    if isinstance(text, (int, float)):
        return float(text)
    m = DURATION.match(text)
    if not text.strip() or m is None or not any(m.groups()):
        raise UserError(f"--time {text!r} is not a duration: write seconds (90, 90s), minutes (20m) or hours (1h30m)")
    hours, minutes, seconds = (float(g or 0) for g in m.groups())
    return 3600 * hours + 60 * minutes + seconds


def _available(model_kind_decoder: bool, output: str, labels: bool) -> dict[str, str | None]:
    logits = output.endswith("logits")
    return {"cosine": None,
            "agreement": None if model_kind_decoder or logits else f"it compares the argmax of a logits output, and the "
                                                                   f"model's first output is {output}",
            "top1-drop": None if not model_kind_decoder and logits and labels else
            "it needs an encoder with a logits output and a `labels` array (one per row) in --data",
            "ppl-ratio": None if model_kind_decoder else "it is a decoder's perplexity on teacher-forced text"}


def tune_model(model: str | Path, budget: str | list[str] | list[Budget], out: str | Path, *,
               data: dict[str, np.ndarray] | None = None, space: str | None = None, trials: int | None = None,
               time_limit: float | None = None, backend: str = "onnxruntime", backend_options: dict | None = None,
               ray: str | None = None, workers: int | None = None, threads: int | None = None, batch: int = 8,
               seed: int = 0, force: bool = False, verbose: bool = False,
               progress: Callable[[str], None] = lambda m: None,
               warn: Callable[[str], None] = lambda m: None) -> TuneResult:
    """Search for the fastest engine of `model` within `budget` and write the folder `out` (see
    the module docstring and `skimformer.tune`); `time_limit` in seconds."""
    start = time.monotonic()
    budgets = list(budget) if budget and isinstance(budget[0], Budget) else parse_budgets(budget)
    options = dict(backend_options or {})
    if "weights" in options:
        raise UserError("the weight format is searched, not given: add weights to --space (onnxruntime)")
    checked_backend(backend, options)
    if trials is not None and trials < 1:
        raise UserError(f"--trials must be >= 1; got {trials}")
    if time_limit is not None and time_limit <= 0:
        raise UserError(f"--time must be positive; got {time_limit}")
    if ray is None and workers is not None:
        raise UserError("--workers sets the Ray workers: add --ray auto (a local cluster) or --ray ADDRESS")
    if threads is not None and threads < 1:
        raise UserError(f"--threads must be >= 1; got {threads}")
    trials = DEFAULT_TRIALS if trials is None and time_limit is None else trials
    require_optuna()
    out, path = Path(out), Path(model).resolve()
    loaded = load(path)
    progress(f"loaded {model} ({loaded.kind}: {', '.join(loaded.programs)})")
    rows = tune_rows(loaded, data, batch, seed)
    facts = Facts.of(loaded, rows, backend)
    groups = space_groups(facts, space)
    first = next(iter(loaded.programs.values())).output_names[0]
    check_budgets(budgets, _available(loaded.is_decoder, first, rows.labels is not None))
    settings = {"format": FORMAT, "model": str(path), "model_digest": digest_files(path), "data": digest_arrays(data),
                "budgets": [str(b) for b in budgets], "space": groups, "backend": backend, "backend_options": options,
                "seed": seed, "batch": batch, "inputs": rows.describe()}
    out.parent.mkdir(parents=True, exist_ok=True)
    # the cluster is joined before anything is written: a refused join leaves -o as it was
    with _joined(ray, workers, threads, verbose) as (cluster, size), exclusive(out):
        journal = Journal(out)
        previous = journal.open(settings, force)
        if previous:
            progress(f"resuming: {len(previous)} trial(s) in {journal.path} are not run again")
        heads = _exit_heads(loaded, rows, out, progress) if "exit" in groups else None
        search_space = Space(facts, groups, heads)
        progress(f"searching {', '.join(f'{g} ({d})' for g, d in search_space.describe().items())}; "
                 f"budget {', '.join(map(str, budgets))}; {rows.rows} search rows, "
                 f"{len(next(iter(rows.held_out.values())))} held out")
        pool = _pool(cluster, size, threads, path, heads, rows, backend, options, progress)
        try:
            search = Search(search_space, budgets, pool, journal, seed, progress)
            search.replay(previous)
            records = search.run(trials, None if time_limit is None else start + time_limit)
            checker = pool.worker if isinstance(pool, LocalPool) else Worker(path, rows, backend, options, threads)
            try:
                engine, chosen, unconfirmed, check = _final_engine(loaded, out / "engine", choose(records), checker,
                                                                   backend, options, rows, progress, warn)
            finally:
                if checker is not getattr(pool, "worker", None):
                    checker.close()
        finally:
            pool.close()
        front = pareto_front(records, budgets[0])
        summary = _summary(out, settings, search_space, rows, budgets, records, chosen, unconfirmed, front, check,
                           time.monotonic() - start)
        not_drawn = plot(out / "trials.png", records, front, budgets, chosen)
        summary["plot"] = None if not_drawn else str(out / "trials.png")
        summary["notes"] += [not_drawn] if not_drawn else []
        write_best(out / "best.yaml", chosen, str(model), budgets, backend)
        with atomic_file(out / "summary.json") as tmp:
            tmp.write_text(json.dumps(summary, indent=2, default=float))
    return TuneResult(out, chosen, front, records, engine, summary)


def _final_engine(model, folder: Path, chosen: dict | None, checker: Worker, backend: str, options: dict, rows: Rows,
                  progress, warn) -> tuple[Engine, dict | None, dict | None, dict]:
    """Build the chosen engine and measure it on the held-out rows, timed again: a choice that is
    not faster beyond timing noise now was faster by timing noise, and the unoptimized engine
    replaces it. Returns the engine, the choice, the unconfirmed one, and the check."""
    progress(f"building the engine of {'trial ' + str(chosen['trial']) if chosen else 'the unoptimized model'}")
    engine = _build(model, folder, chosen, backend, options, rows, progress, warn)
    progress("measuring the engine again on the held-out rows")
    check = checker.check(folder, timed=chosen is not None)  # not the unoptimized engine against itself
    if chosen is None or faster(check):
        return engine, chosen, None, check
    progress(f"trial {chosen['trial']} is {speed_text(check)} timed again: building the unoptimized engine")
    engine = _build(model, folder, None, backend, options, rows, progress, warn)
    return engine, None, {**chosen, "timed_again": check["speed"], "timed_again_bound": check["speed_bound"]}, \
        checker.check(folder, timed=False)



def _exit_heads(model, rows: Rows, out: Path, progress) -> str:
    """Exit adapters for this model, calibrated once per search (kept in the folder for resumes)."""
    path = out / HEADS_FILE
    if not path.is_file():
        progress("calibrating exit adapters (skimformer calibrate) for the exit group")
        data = rows.search if not model.is_decoder or rows.source != "passages of the shipped texts" else None
        calibrate_model(model, data, out=path, progress=progress)
    return str(path.resolve())


@contextlib.contextmanager
def _joined(ray: str | None, workers: int | None, threads: int | None, verbose: bool):
    """For the block, the Ray cluster and its worker count, or (None, None) without `--ray`."""
    if ray is None:
        yield None, None
        return
    from skimformer.tuning.ray_pool import Cluster

    cluster = Cluster(ray, verbose)
    try:
        yield cluster, cluster.workers(workers, threads or 1)
    finally:
        cluster.close()


def _pool(cluster, size, threads, path, heads, rows, backend, options, progress):
    if cluster is None:
        return LocalPool(Worker(path, rows, backend, options, threads))
    from skimformer.tuning.ray_pool import ModelFiles, RayPool

    pool = RayPool(cluster, size, threads or 1, ModelFiles(str(path), heads), rows, backend, options)
    progress(f"Ray: {pool.size} worker(s) of {threads or 1} thread(s)")
    return pool


def _build(model, folder: Path, chosen: dict | None, backend: str, options: dict, rows: Rows, progress, warn) -> Engine:
    pipeline = build_pipeline(parse_text(chosen["pipeline"])) if chosen else []
    weights = {"weights": chosen["weights"]} if chosen and chosen["weights"] else {}
    engine, _ = optimize_model(model, folder, pipeline, backend=backend, backend_options={**options, **weights},
                               force=True, data=rows.held_out, progress=progress, warn=warn)
    return engine


def _summary(out: Path, settings: dict, space: Space, rows: Rows, budgets: list[Budget], records: list[dict],
             chosen: dict | None, unconfirmed: dict | None, front: list[dict], check: dict, seconds: float) -> dict:
    states = [r["state"] for r in records]
    fastest = fastest_within(records)
    if chosen is not None:
        answer = (f"chosen: trial {chosen['trial']}, {chosen['label']}: {speed_text(chosen)} "
                  f"within {', '.join(map(str, budgets))}")
    else:
        best = (f"the fastest within it, trial {fastest['trial']} ({fastest['label']}), runs at {speed_text(fastest)}: "
                "within timing noise" if fastest else "no measured trial was within it")
        if unconfirmed is not None:
            best = (f"the fastest within it, trial {unconfirmed['trial']} ({unconfirmed['label']}), ran at "
                    f"{speed_text(unconfirmed)} in the search and {speed_text(unconfirmed, 'timed_again')} "
                    "timed again: timing noise")
        answer = (f"nothing within the budget ({', '.join(map(str, budgets))}) is faster than the unoptimized engine "
                  f"({best}): the engine built is the unoptimized one")
    # the held-out rows check what was measured on them, not its confidence bound
    measured = {k: v for k, v in check["figures"].items() if not k.endswith("_bound")}
    held = {"figures": check["figures"], "speed": check.get("speed"), "speed_bound": check.get("speed_bound"),
            "timing": check.get("timing"),
            "budget_metrics": [b.metric for b in budgets if b.metric in check["figures"]],
            "within_budget": max(violations(budgets, measured), default=0) <= 0}
    notes = []
    if not held["within_budget"]:
        notes.append(f"note: on the held-out rows the engine misses the budget ({describe(budgets, measured)}): "
                     "give more rows in --data, or a stricter budget")
    return {"output": str(out), "model": settings["model"], "budgets": [str(b) for b in budgets],
            "primary": budgets[0].metric,
            "space": space.describe(), "inputs": rows.describe(), "backend": settings["backend"],
            "trials": {"total": len(records), **{s: states.count(s) for s in ("complete", "pruned", "failed")}},
            "chosen": None if chosen is None else {k: chosen[k] for k in ("trial", "pipeline", "weights", "speed",
                                                                          "speed_bound", "figures", "timing")},
            "answer": answer, "held_out": held,
            "unconfirmed": None if unconfirmed is None else {k: unconfirmed[k] for k in ("trial", "label", "speed",
                                                                                       "speed_bound", "timed_again",
                                                                                       "timed_again_bound")},
            "front": [{k: r.get(k) for k in ("trial", "label", "speed", "figures", "within_budget")} for r in front],
            "front_table": table(front, budgets), "engine": str(out / "engine"), "best": str(out / "best.yaml"),
            "trials_file": str(out / "trials.jsonl"), "plot": None, "notes": notes, "seconds": round(seconds, 1)}
