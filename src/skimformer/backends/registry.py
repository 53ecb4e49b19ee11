"""Which backends exist. A backend module has NAME, SUFFIX, `lower(program, path)` and `Runner`."""
from __future__ import annotations

from types import ModuleType

from skimformer.errors import UserError

BACKENDS = ("onnxruntime",)


def backend_module(name: str) -> ModuleType:
    if name == "onnxruntime":
        from skimformer.backends import onnxruntime

        return onnxruntime
    raise UserError(f"unknown backend {name!r}; available: {', '.join(BACKENDS)}")
