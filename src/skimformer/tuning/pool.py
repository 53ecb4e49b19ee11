"""Where trials run: one worker in this process, or Ray actors (`ray_pool`), behind one interface.

A pool has `size` workers; `submit(index, method, *args)` starts a worker's method and returns a
handle, `wait(handles)` returns the first finished handle and its result. `run_jobs` keeps every
worker busy with one job at a time, in the order given, each job on its own worker when it names
one (a screened candidate's programs live in the worker that screened it), and starts no job
once the deadline has passed.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Iterator

from skimformer.tuning.worker import Worker


@dataclass
class Job:
    tag: Any
    method: str
    args: tuple
    worker: int | None = None  # None: any worker


class _Ready:
    def __init__(self, value):
        self.value = value


class LocalPool:
    """One worker in this process: jobs run one after the other, as they are submitted."""

    size = 1

    def __init__(self, worker: Worker):
        self.worker = worker

    def submit(self, index: int, method: str, *args) -> _Ready:
        return _Ready(getattr(self.worker, method)(*args))

    def wait(self, handles: list) -> tuple[Any, Any]:
        return handles[0], handles[0].value

    def close(self) -> None:
        self.worker.close()


def run_jobs(pool, jobs: list[Job], deadline: float | None = None) -> Iterator[tuple[Job, int, Any]]:
    """(job, worker, result) as jobs finish; jobs not started by `deadline` (time.monotonic())
    are yielded with the worker they named (or -1) and the result None."""
    queue, busy = list(jobs), {}  # busy: handle -> (worker, job)
    while queue or busy:
        late = deadline is not None and time.monotonic() >= deadline
        for index in [i for i in range(pool.size) if i not in {w for w, _ in busy.values()}]:
            job = None if late else next((j for j in queue if j.worker in (None, index)), None)
            if job is not None:
                queue.remove(job)
                busy[pool.submit(index, job.method, *job.args)] = (index, job)
        if not busy:  # nothing runs: the deadline passed with jobs waiting
            for job in queue:
                yield job, -1 if job.worker is None else job.worker, None
            return
        handle, result = pool.wait(list(busy))
        index, job = busy.pop(handle)
        yield job, index, result
