"""Budgets: the fidelity a tuned engine must keep, written `METRIC>=X` or `METRIC<=X`.

    cosine>=0.99       outputs' cosine to the unoptimized engine's (mean over rows)
    agreement>=0.99    top-1 agreement of logits (encoders), teacher-forced next-token agreement (decoders)
    top1-drop<=1       top-1 accuracy points lost against `labels` (encoders whose --data has labels)
    ppl-ratio<=1.05    perplexity over the unoptimized engine's, teacher-forced on text (decoders)

Several are given as repeated `--budget` options or separated by commas (`cosine>=0.99,
agreement>=0.98`); each metric at most once. The first is the primary one: the fidelity axis of
the Pareto front and of the plot; every budget is a constraint of the search. Each metric has one
direction (a cosine is bounded from below, a drop from above), so a reversed operator is a typo
and is refused rather than read literally.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from skimformer.errors import UserError


@dataclass(frozen=True)
class Metric:
    name: str
    floor: bool  # True: higher is better, written METRIC>=X; False: METRIC<=X
    low: float
    high: float
    what: str


METRICS = {m.name: m for m in (
    Metric("cosine", True, -1.0, 1.0, "a cosine similarity in [-1, 1]"),
    Metric("agreement", True, 0.0, 1.0, "a fraction in [0, 1]"),
    Metric("top1-drop", False, 0.0, 100.0, "accuracy points in [0, 100]"),
    Metric("ppl-ratio", False, 1.0, float("inf"), "a perplexity ratio >= 1"),
)}
EXAMPLE = "cosine>=0.99"
GRAMMAR = f"write METRIC>=X or METRIC<=X with METRIC one of {', '.join(METRICS)} (e.g. {EXAMPLE})"
BUDGET = re.compile(r"^\s*([A-Za-z][\w-]*)\s*(>=|<=|=>|=<|==|=|>|<)?\s*(.*?)\s*$")


@dataclass(frozen=True)
class Budget:
    metric: str
    bound: float

    @property
    def floor(self) -> bool:
        return METRICS[self.metric].floor

    def __str__(self) -> str:
        return f"{self.metric}{'>=' if self.floor else '<='}{self.bound:g}"

    def violation(self, figures: dict) -> float | None:
        """How far `figures` are outside this budget (> 0 outside, <= 0 within), in the metric's
        units, judged on the metric's confidence bound where the figures give one
        (`tuning.figures`); None when the figures lack the metric."""
        value = figures.get(f"{self.metric}_bound", figures.get(self.metric))
        if value is None:
            return None
        return self.bound - value if self.floor else value - self.bound


def parse_budgets(texts: str | list[str]) -> list[Budget]:
    """Budgets from `--budget` texts (each may hold several, comma- or semicolon-separated)."""
    items = [part for text in ([texts] if isinstance(texts, str) else texts) for part in re.split(r"[,;]", text)]
    items = [item for item in items if item.strip()]
    if not items:
        raise UserError(f"no budget given: {GRAMMAR}")
    budgets = [_parse_one(item.strip()) for item in items]
    seen = set()
    for b in budgets:
        if b.metric in seen:
            raise UserError(f"budget {b.metric} is given twice: give each metric once")
        seen.add(b.metric)
    return budgets


def _parse_one(text: str) -> Budget:
    m = BUDGET.match(text)
    name, op, value = (m.group(1), m.group(2), m.group(3)) if m else (text, None, "")
    if name not in METRICS:
        raise UserError(f"unknown budget metric {name!r} in {text!r}: {GRAMMAR}")
    metric = METRICS[name]
    if op not in (">=", "<="):
        raise UserError(f"bad budget {text!r}: {GRAMMAR}")
    right = ">=" if metric.floor else "<="
    if op != right:
        raise UserError(f"budget {text!r} bounds {name} from the wrong side: {name} is bounded from "
                        f"{'below' if metric.floor else 'above'}, write {name}{right}{value or 'X'}")
    try:
        bound = float(value)
    except ValueError:
        raise UserError(f"bad budget {text!r}: {value!r} is not a number; {GRAMMAR}") from None
    if not metric.low <= bound <= metric.high:
        raise UserError(f"budget {text!r} is out of range: {name} is {metric.what}")
    return Budget(name, bound)


def check_budgets(budgets: list[Budget], available: dict[str, str | None]) -> None:
    """Refuse budgets whose metric this model and data cannot measure; `available` maps each
    metric to None (measurable) or the reason it is not."""
    for b in budgets:
        why = available.get(b.metric)
        if why is not None:
            raise UserError(f"budget {b} cannot be measured: {why}")
