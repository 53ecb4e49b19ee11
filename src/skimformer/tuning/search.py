"""The search: Optuna's multi-objective TPE sampler, asked and told in rounds.

Objectives: speed (ratio to the unoptimized engine, maximized) and the primary budget's metric;
every budget is a constraint (`Trial.set_constraint`: how far a trial is outside it), so the
sampler learns where the feasible region lies. TPE rather than NSGA-II: searches here last tens
of trials, below one NSGA-II population.

A round asks for two candidates per worker and screens them all (`Worker.screen`). Candidates the
screen puts outside a budget, and those whose passes all matched nothing (and that quantize no
weights), the unoptimized program again, are told to Optuna as pruned: no engine is built for them. Optuna's pruners are not used for this: they compare a trial's intermediate
values with other trials' (and do not support several objectives), while the budget is an absolute
bound known in advance. The rest are ranked by their work estimate (FLOPs and KV bytes after / before,
from the passes' reports), least work first, and their engines are built and timed in that order,
so a `--time` limit is spent on the most promising. The estimate only ranks: the passes measure it
on their programs' example inputs, which a KV pass's window may not reach.

Every finished trial is appended to `trials.jsonl` at once. A resumed search replays those lines
into the study (`enqueue_trial` with the same fields, told the stored results), so the sampler
continues from them and no configuration is run twice: a candidate already measured is told its
stored result again, and a space with nothing new left ends the search.
"""
from __future__ import annotations

import time
import warnings
from typing import Callable

from skimformer.errors import UserError
from skimformer.tuning.budget import Budget
from skimformer.tuning.journal import Journal
from skimformer.tuning.pool import Job, run_jobs
from skimformer.tuning.report import speed_text
from skimformer.tuning.space import Candidate, Space

PER_WORKER = 2  # candidates screened per worker and round
EXHAUSTED = 50  # consecutive candidates already tried: the space holds nothing new
STARTUP = 4  # trials before TPE models the results, at least; the space's starting points are the initial design


def require_optuna():
    try:
        import optuna
    except ImportError:
        raise UserError("tune needs Optuna, which is not installed: pip install 'skimformer[tune]'") from None
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna


def violations(budgets: list[Budget], figures: dict, missing: float = 1.0) -> list[float]:
    """Per budget, how far `figures` are outside it (<= 0: within); `missing` for a figure not
    measured (an engine's: outside, since it cannot be shown within; a screen's: 0, left to the engine)."""
    out = []
    for b in budgets:
        v = b.violation(figures)
        out.append(missing if v is None else round(v, 6))
    return out


def describe(budgets: list[Budget], figures: dict) -> str:
    """`cosine 0.9871 < 0.99`: the budgets `figures` miss."""
    missed = []
    for b, v in zip(budgets, violations(budgets, figures)):
        if v > 0:
            value, bound = figures.get(b.metric), figures.get(f"{b.metric}_bound")
            sure = "" if bound is None or bound == value else f" (90% bound {bound:.4g})"
            missed.append(f"{b.metric} not measured" if value is None else
                          f"{b.metric} {value:.4g}{sure} {'<' if b.floor else '>'} {b.bound:g}")
    return ", ".join(missed)


class Search:
    def __init__(self, space: Space, budgets: list[Budget], pool, journal: Journal, seed: int = 0,
                 progress: Callable[[str], None] = lambda m: None):
        self.optuna = require_optuna()
        self.space, self.budgets, self.pool, self.journal, self.progress = space, budgets, pool, journal, progress
        primary = budgets[0]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", self.optuna.exceptions.ExperimentalWarning)
            sampler = self.optuna.samplers.TPESampler(seed=seed, multivariate=True, group=True,
                                                      n_startup_trials=max(STARTUP, len(space.starts())))
        self.study = self.optuna.create_study(directions=["maximize", "maximize" if primary.floor else "minimize"],
                                              sampler=sampler)
        self.records: list[dict] = []
        self.done: dict[str, dict] = {}  # candidate key -> its record
        self.total: int | None = None

    # -- Optuna ----------------------------------------------------------------------------------

    def _ask(self) -> tuple:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", self.optuna.exceptions.ExperimentalWarning)
            trial = self.study.ask()
            return trial, self.space.suggest(trial)

    def _tell(self, trial, record: dict) -> None:
        state = self.optuna.trial.TrialState
        for b, v in zip(self.budgets, record.get("violations") or []):
            trial.set_constraint(str(b), v)  # TPE models where the feasible region lies
        if record["state"] == "complete":
            self.study.tell(trial, [record["speed"], record["figures"][self.budgets[0].metric]])
        else:  # pruned, or failed: infeasible (TPE ignores failed trials, and would propose them again)
            self.study.tell(trial, state=state.PRUNED if record.get("violations") is not None else state.FAIL)

    def replay(self, previous: list[dict]) -> None:
        """Tell the study the trials of an earlier run of this search, then queue the space's
        starting points not tried yet."""
        for record in previous:
            self.study.enqueue_trial(record["params"])
            trial, candidate = self._ask()
            self._tell(trial, record)
            self.records.append(record)
            self.done[candidate.key] = record
        for params in self.space.starts():
            if self.space.suggest(self.optuna.trial.FixedTrial(params)).key not in self.done:
                self.study.enqueue_trial(params)

    # -- rounds ----------------------------------------------------------------------------------

    def run(self, trials: int | None, deadline: float | None) -> list[dict]:
        """Search until `trials` trials are in the journal or `deadline` (time.monotonic()) passes."""
        self.total = trials
        repeats = 0
        while (trials is None or len(self.records) < trials) and (deadline is None or time.monotonic() < deadline):
            want = PER_WORKER * self.pool.size if trials is None else min(PER_WORKER * self.pool.size,
                                                                          trials - len(self.records))
            fresh: list[tuple] = []
            while len(fresh) < want and repeats < EXHAUSTED:
                trial, candidate = self._ask()
                earlier = self.done.get(candidate.key)
                if earlier is not None or candidate.key in {c.key for _, c in fresh}:
                    repeats += 1  # already tried (or asked this round): its result again, nothing run
                    self._tell(trial, earlier or {"state": "asked twice"})
                    continue
                repeats = 0
                fresh.append((trial, candidate))
            if not fresh:
                self.progress(f"every configuration of the space has been tried ({len(self.records)} trials)")
                break
            self._round(fresh, deadline)
        return self.records

    def _round(self, fresh: list[tuple], deadline: float | None) -> None:
        survivors = []
        jobs = [Job((trial, candidate), "screen", (trial.number, candidate)) for trial, candidate in fresh]
        for job, worker, result in run_jobs(self.pool, jobs, deadline):
            trial, candidate = job.tag
            if result is None:
                self.study.tell(trial, state=self.optuna.trial.TrialState.FAIL)  # not run: time is up
                continue
            record = self._record(trial, candidate, worker, result)
            if result["state"] == "screened":
                reason = self._prune_reason(candidate, result)
                if reason is None:
                    survivors.append((trial, candidate, worker, record))
                    continue
                self.pool.submit(worker, "drop", trial.number)
                record.update(state="pruned", reason=reason)
            self._finish(trial, record)
        survivors.sort(key=lambda s: s[3]["estimate"])
        jobs = [Job((trial, record), "measure", (trial.number,), worker) for trial, _, worker, record in survivors]
        for job, worker, result in run_jobs(self.pool, jobs, deadline):
            trial, record = job.tag
            if result is None:
                self.pool.submit(worker, "drop", trial.number)
                self.study.tell(trial, state=self.optuna.trial.TrialState.FAIL)
                continue
            record.update({k: v for k, v in result.items() if k != "seconds"}, state=result["state"])
            record["seconds"].update(result.get("seconds", {}))
            if result["state"] == "complete":
                record["violations"] = violations(self.budgets, result["figures"])
                record["within_budget"] = max(record["violations"], default=0) <= 0
                if self.budgets[0].metric not in result["figures"]:
                    record.update(state="failed", reason=f"the engine's outputs give no {self.budgets[0].metric}")
            if record["state"] == "failed":
                record["violations"] = [1.0] * len(self.budgets)
            self._finish(trial, record)

    def _record(self, trial, candidate: Candidate, worker: int, result: dict) -> dict:
        record = {"trial": None, "state": result["state"], "pipeline": candidate.pipeline, "weights": candidate.weights,
                  "label": candidate.label, "params": trial.params, "worker": worker,
                  "seconds": dict(result.get("seconds", {}))}
        if result["state"] == "screened":
            record.update(estimate=result["estimate"], screen=result["screen"],
                          violations=violations(self.budgets, result["screen"], missing=0.0))
            if result["unmatched"]:
                record["unmatched"] = result["unmatched"]
        else:
            record.update(reason=result["reason"], violations=[1.0] * len(self.budgets))
        return record

    def _prune_reason(self, candidate: Candidate, result: dict) -> str | None:
        screen = result["screen"]
        missed = describe([b for b in self.budgets if b.metric in screen], screen)
        if missed:
            return f"outside the budget at the screen: {missed}"
        if not result["changed"] and candidate.weights is None:
            return "changes nothing: the unoptimized program" + (f" ({', '.join(result['unmatched'])} matched nothing)"
                                                                  if result["unmatched"] else "")
        return None

    def _finish(self, trial, record: dict) -> None:
        record["trial"] = len(self.records)
        self._tell(trial, record)
        self.journal.append(record)
        self.records.append(record)
        self.done[record_key(record)] = record
        count = f" ({len(self.records)}/{self.total})" if self.total is not None else ""
        self.progress(f"trial {record['trial']}{count} {record['label']}: {summary_line(record, self.budgets)}")


def record_key(record: dict) -> str:
    return Candidate(record["pipeline"], record["weights"]).key


def summary_line(record: dict, budgets: list[Budget]) -> str:
    """One line on a finished trial: its speed and figures, or why it stopped."""
    if record["state"] != "complete":
        return f"{record['state']}: {record.get('reason', '')}"
    figures = ", ".join(f"{b.metric} {record['figures'][b.metric]:.4g}" for b in budgets
                        if b.metric in record["figures"])
    within = "within budget" if record["within_budget"] else f"outside: {describe(budgets, record['figures'])}"
    return f"{speed_text(record)}, {figures} ({within})"
