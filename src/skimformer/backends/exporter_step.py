"""Stand in for one step of torch's ONNX exporter for the length of a block.

The exporter calls its steps through `torch.onnx._internal.exporter._fx_passes`, so a step is
replaced by rebinding its name there, and bound back after the block. The backend uses this to
skip whole-program work the programs it exports do not need (`onnx_decompose`, `onnx_promote`).
"""
from __future__ import annotations

import contextlib
from typing import Callable


@contextlib.contextmanager
def exporter_step_replaced(name: str, replacement: Callable[[Callable], Callable]):
    """Within the block, the exporter's step `name` is `replacement(step)`. A torch whose exporter
    is laid out differently keeps its own step."""
    try:
        from torch.onnx._internal.exporter import _fx_passes
    except ImportError:
        yield
        return
    step = getattr(_fx_passes, name, None)
    if step is None:
        yield
        return
    setattr(_fx_passes, name, replacement(step))
    try:
        yield
    finally:
        setattr(_fx_passes, name, step)
