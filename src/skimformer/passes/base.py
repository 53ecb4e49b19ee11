"""The pass contract: a named, typed rewrite of a Program that says whether it is lossless.

A pass implements `apply(program, config) -> PassResult`. Passes that must see a causal LM's
prefill and decode programs together (KV compression, prompt pruning) override `apply_model`;
the default applies `apply` to every program of the model and gathers the reports by role.
A lossy pass also says what inputs make it act (`exercise`), so that its fidelity is measured
where it changes something (`passes.fidelity`).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar

from skimformer.ir import Model, Program
from skimformer.kernels.tokens import kept_count


@dataclass
class PassResult:
    """The rewritten program, what the pass did (`report`), and how many sites it rewrote."""

    program: Program
    report: dict = field(default_factory=dict)
    matched: int = 0


@dataclass
class ModelResult:
    model: Model
    report: dict = field(default_factory=dict)
    matched: int = 0


@dataclass(frozen=True)
class Exercise:
    """The fidelity inputs on which a lossy pass acts: at least `tokens` tokens (a decoder's prompt,
    an encoder's sequence entering the first block) and `decode` decode steps; for early exits, a
    measured step must run one of `exits` blocks (leave there). `never` says why no input does
    (a setting that changes nothing, such as keep=1.0)."""

    tokens: int = 1
    decode: int = 0
    exits: tuple[int, ...] = ()
    never: str = ""


def fewest_dropped(keep: float, protect: int, extra: int = 0) -> int:
    """The fewest tokens of which keeping the `keep` fraction (`protect` always kept, `extra`
    tokens added, such as a fused one) leaves fewer; `keep` < 1."""
    n = protect + 1
    while kept_count(n, keep, protect) + extra >= n:
        n += 1
    return n


class Pass:
    """Base class of every pass. Subclasses set `name`, `Config` (a dataclass) and `lossless`."""

    name: ClassVar[str]
    Config: ClassVar[type]
    lossless: ClassVar[bool]

    def apply(self, program: Program, config: Any) -> PassResult:
        raise NotImplementedError(f"pass {self.name} rewrites whole models; call apply_model")

    def apply_model(self, model: Model, config: Any) -> ModelResult:
        programs, reports, matched = {}, {}, 0
        for role, program in model.programs.items():
            result = self.apply(program, config)
            programs[role] = result.program
            reports[role] = result.report
            matched += result.matched
        report = next(iter(reports.values())) if len(reports) == 1 else reports
        return ModelResult(model.replace(programs), report, matched)

    def exercise(self, config: Any) -> Exercise:
        """What inputs make this (lossy) pass act; by default any (removing layers, say)."""
        return Exercise()

    @classmethod
    def fields(cls) -> list[dict]:
        """The config's fields with their types and defaults, for `skimformer passes`."""
        out = []
        for f in dataclasses.fields(cls.Config):
            default = f.default if f.default is not dataclasses.MISSING else (
                f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
            out.append({"name": f.name, "type": _type_name(f.type), "default": default})
        return out

    @classmethod
    def summary(cls) -> str:
        doc = (cls.__doc__ or "").strip().splitlines()
        return doc[0] if doc else ""


def _type_name(t) -> str:
    return t if isinstance(t, str) else getattr(t, "__name__", str(t))
