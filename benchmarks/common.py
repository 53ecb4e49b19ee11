"""Shared timing helpers for the benchmarks: warm-up, medians, one thread setting for everyone."""
from __future__ import annotations

import statistics
import time

import torch

THREADS = 2


def setup_threads() -> None:
    torch.set_num_threads(THREADS)


def median_ms(fn, warmup: int = 2, runs: int = 5, budget_s: float = 30.0) -> float:
    """Median wall time of `fn()` in milliseconds over `runs` runs (fewer if over budget)."""
    for _ in range(warmup):
        fn()
    samples, start = [], time.perf_counter()
    while len(samples) < runs and (not samples or time.perf_counter() - start < budget_s):
        t = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t) * 1e3)
    return statistics.median(samples)


def print_table(rows: list[dict], columns: list[str]) -> None:
    widths = {c: max(len(c), *(len(str(r.get(c, ""))) for r in rows)) for c in columns}
    print("  ".join(c.ljust(widths[c]) for c in columns))
    print("  ".join("-" * widths[c] for c in columns))
    for r in rows:
        print("  ".join(str(r.get(c, "")).ljust(widths[c]) for c in columns))
