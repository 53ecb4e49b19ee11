"""Shared timing helpers for the benchmarks: warm-up, medians, one thread setting for everyone."""
from __future__ import annotations

import statistics
import sys
import time
import traceback

import numpy as np
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


def grown(tensors: dict[str, list[np.ndarray]], lengths: tuple[int, ...], n: int) -> dict[str, np.ndarray]:
    """A decoder's carried tensors after `n` tokens, synthesized from its prefills at `lengths`
    (one tensor each; the last two are read): an axis that grew between them grows on linearly
    (its values tiled), one that stopped growing (a full window) stays. Decode speed does not
    depend on the cache's content, so long contexts are timed without their prefill."""
    l1, l2 = lengths[-2:]
    out = {}
    for name, values in tensors.items():
        t1, t2 = values[-2:]
        t = t2
        for axis in range(1, t2.ndim):
            a, b = t1.shape[axis], t2.shape[axis]
            if a == b:
                continue
            size = max(1, round(b + (b - a) * (n - l2) / (l2 - l1)))
            t = np.take(t, np.arange(size) % b, axis=axis)
        out[name] = t
    return out


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
    return [statistics.median(s) for s in interleaved_samples(fns, warmup, runs, budget_s, min_runs)]


def interleaved_samples(fns: list, warmup: int = 1, runs: int = 5, budget_s: float = 60.0,
                        min_runs: int = 3) -> list[list[float]]:
    """`interleaved_ms`' samples: per function, its milliseconds round by round."""
    for _ in range(warmup):
        for fn in fns:
            fn()
    samples, start = [[] for _ in fns], time.perf_counter()
    while len(samples[0]) < min_runs or (len(samples[0]) < runs and time.perf_counter() - start < budget_s):
        for fn, out in zip(fns, samples):
            t = time.perf_counter()
            fn()
            out.append((time.perf_counter() - t) * 1e3)
    return samples


class Sections:
    """A benchmark's sections, each run in turn and timed; one that fails becomes a row that says
    why, so the others still print. A section returns `(rows, note)`, or a list of
    `(title, note, rows, columns)` for several tables."""

    def __init__(self, only: list[str]):
        self.only = only
        self.tables: list[tuple] = []

    def run(self, name: str, title: str, columns: list[str], fn) -> None:
        if name not in self.only:
            return
        start = time.perf_counter()
        try:
            result = fn()
            made = result if isinstance(result, list) else [(title, result[1], result[0], columns)]
        except Exception as e:
            traceback.print_exc(file=sys.stderr)
            first = str(e).splitlines()[0] if str(e) else ""
            made = [(title, "", [{columns[0]: f"failed: {type(e).__name__}: {first}"[:120]}], columns)]
        seconds = time.perf_counter() - start
        self.tables.extend((t, note, rows, cols, seconds if i == 0 else None)
                           for i, (t, note, rows, cols) in enumerate(made))

    def print(self) -> None:
        for title, note, rows, columns, seconds in self.tables:
            print(f"\n{title}" + (f"  [{seconds:.0f} s]" if seconds is not None else ""))
            if note:
                print(note)
            print_table(rows, [c for c in columns if any(r.get(c) not in (None, "") for r in rows)])
