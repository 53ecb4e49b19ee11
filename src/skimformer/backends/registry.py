"""Which backends exist. A backend module has NAME, SUFFIX, `lower(program, path, **options)`
(which may return `{file name: role}` for files it writes beside `path`), `Runner(path)`, and
optionally `require(**options)`, which raises UserError when an optional dependency is missing,
so that a build is refused before any work is done.

Modules are imported on first use: a backend's optional dependencies are never imported by
another backend's builds.
"""
from __future__ import annotations

from importlib import import_module
from types import ModuleType

from skimformer.errors import UserError

BACKENDS = ("onnxruntime", "aotinductor", "mlir", "tensorrt")


def backend_module(name: str) -> ModuleType:
    if name not in BACKENDS:
        raise UserError(f"unknown backend {name!r}; available: {', '.join(BACKENDS)}")
    return import_module(f"skimformer.backends.{name}")


def checked_backend(name: str, options: dict | None = None) -> ModuleType:
    """The backend module, after checking that it can build with `options` on this machine."""
    module = backend_module(name)
    require = getattr(module, "require", None)
    if require is not None:
        require(**(options or {}))
    elif options:
        raise UserError(f"the {name} backend takes no options (got {', '.join(options)})")
    return module
