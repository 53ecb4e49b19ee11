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


def interleaved_ms(fns: list, warmup: int = 1, runs: int = 5, budget_s: float = 60.0, min_runs: int = 3) -> list[float]:
    """Median wall time in milliseconds of each of `fns`, run round-robin (one call of each per
    round) so that every function sees the same machine state; after `min_runs` rounds, stops at
    `runs` rounds or when `budget_s` is spent."""
    for _ in range(warmup):
        for fn in fns:
            fn()
    samples, start = [[] for _ in fns], time.perf_counter()
    while len(samples[0]) < min_runs or (len(samples[0]) < runs and time.perf_counter() - start < budget_s):
        for fn, out in zip(fns, samples):
            t = time.perf_counter()
            fn()
            out.append((time.perf_counter() - t) * 1e3)
    return [statistics.median(s) for s in samples]
