"""Pass registry: names used in pipelines map to pass classes."""
from __future__ import annotations

from skimformer.errors import UserError
from skimformer.passes.base import Pass

_PASSES: dict[str, type[Pass]] = {}


def register(cls: type[Pass]) -> type[Pass]:
    if cls.name in _PASSES:
        raise ValueError(f"pass name {cls.name!r} registered twice")
    _PASSES[cls.name] = cls
    return cls


def all_passes() -> dict[str, type[Pass]]:
    return dict(sorted(_PASSES.items()))


def get_pass(name: str) -> type[Pass]:
    if name not in _PASSES:
        raise UserError(f"unknown pass {name!r}; valid passes: {', '.join(sorted(_PASSES))}")
    return _PASSES[name]
