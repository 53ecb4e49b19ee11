"""Run a build's independent jobs side by side, one forked process each.

Lowering a program is single-threaded Python (tracing, ONNX translation, graph clean-up), and a
decoder has two programs of about the same size: on two cores, a process per program halves
the wall time of the build's longest step. Children are forked so that each inherits its
program in memory (an ExportedProgram does not pickle); they send back only what the job
returns, or the exception it raised, with the child's traceback as a note.
"""
from __future__ import annotations

import multiprocessing
import os
import traceback
from typing import Callable, TypeVar

import torch

T = TypeVar("T")


def cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def can_fork() -> bool:
    """Forking is safe for CPU work; a process that has started CUDA must not fork."""
    return hasattr(os, "fork") and cores() > 1 and not torch.cuda.is_initialized()


def _child(job: Callable[[], T], conn) -> None:
    torch.set_num_threads(1)  # one core per job; also keeps OpenMP from reusing the parent's pool
    try:
        conn.send((True, job()))
    except BaseException as e:  # noqa: BLE001 - everything goes back to the parent, which raises it
        e.add_note(f"in a forked build process:\n{traceback.format_exc()}")
        try:
            conn.send((False, e))
        except Exception:  # an exception that does not pickle
            conn.send((False, RuntimeError(f"{type(e).__name__}: {e}")))
    finally:
        conn.close()


def run_forked(jobs: dict[str, Callable[[], T]]) -> dict[str, T]:
    """Each job's result by name, at most `cores()` at a time; the first failure is raised
    after every started job has ended (nothing is left running)."""
    context = multiprocessing.get_context("fork")
    names, results, failure = list(jobs), {}, None
    width = cores()
    for start in range(0, len(names), width):
        wave = []
        for name in names[start:start + width]:
            receive, send = context.Pipe(duplex=False)
            process = context.Process(target=_child, args=(jobs[name], send), daemon=True)
            process.start()
            send.close()
            wave.append((name, process, receive))
        for name, process, receive in wave:
            try:
                ok, value = receive.recv()
            except EOFError:  # killed before it could answer (out of memory)
                ok, value = False, RuntimeError(f"the build process for {name} died (exit code {process.exitcode})")
            process.join()
            if ok:
                results[name] = value
            elif failure is None:
                failure = value
        if failure is not None:
            raise failure
    return results
