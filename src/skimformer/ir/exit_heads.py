"""Exit adapters and their thresholds: what `skimformer calibrate` writes and the exit passes read.

A model's own head (final norm + LM head, or pooler + classifier) expects the last block's output,
so applied after an early block it mostly disagrees with the full model (SmolLM2-135M after layer
6 of 30: 7% of next tokens). An exit after block k therefore first maps the residual stream
through a small low-rank residual adapter, `adapt(h) = h + (h @ down.T) @ up.T` (`down` [r, D],
`up` [D, r]), trained with the backbone frozen (Kangaroo's adapter before the shared head), and
then applies the model's head unchanged. `up` starts at zero, so an untrained adapter is the
identity and an exit without a trained adapter is CALM's plain exit.

The file is safetensors: tensors `exit.{k}.down` and `exit.{k}.up` (float32) per exit k, and string
metadata `format`, `kind` (decoder|encoder), `at` (JSON list), `rank`, `criterion`, `thresholds`
(JSON {k: t}: exit when confidence > t), `target_agreement`, `agreement_before`,
`agreement_after` and `exit_rate` (JSON {k: fraction}, measured on held-out calibration positions).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from skimformer.atomic import atomic_file
from skimformer.errors import UserError, cause

FORMAT = "skimformer-exit-heads/1"
KINDS = ("decoder", "encoder")
PER_EXIT = ("thresholds", "agreement_before", "agreement_after", "exit_rate")
HOW_TO_MAKE = "write one with `skimformer calibrate MODEL -o heads.safetensors`"


def adapt(hidden: torch.Tensor, down: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """The exit adapter: `hidden + (hidden @ down.T) @ up.T`, a plain function of tensors so that
    passes can insert it as one `call_function` node in front of the head."""
    return hidden + F.linear(F.linear(hidden, down), up)


def identity_adapter(dim: int, rank: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """`(down, up)` that `adapt` maps to the identity: `down` random (so training can start from
    it), `up` zero (LoRA's initialisation)."""
    down = torch.randn(rank, dim, generator=generator) / dim ** 0.5
    return down, torch.zeros(dim, rank)


@dataclass
class ExitHeads:
    """Trained adapters by exit (block index k, 0-based: the exit after block k) and the figures
    calibration measured for them."""

    kind: str
    adapters: dict[int, tuple[torch.Tensor, torch.Tensor]]
    criterion: str
    thresholds: dict[int, float]
    target_agreement: float
    agreement_before: dict[int, float]
    agreement_after: dict[int, float]
    exit_rate: dict[int, float]

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {', '.join(KINDS)}; got {self.kind!r}")
        if not self.adapters:
            raise ValueError("exit heads need at least one exit")
        ranks = {down.shape[0] for down, _ in self.adapters.values()}
        for k, (down, up) in self.adapters.items():
            if down.dim() != 2 or up.shape != (down.shape[1], down.shape[0]):
                raise ValueError(f"exit {k}: down must be [r, D] and up [D, r]; "
                                 f"got {tuple(down.shape)}, {tuple(up.shape)}")
        if len(ranks) != 1:
            raise ValueError(f"every exit adapter must have the same rank; got {sorted(ranks)}")
        for name in PER_EXIT:
            if set(getattr(self, name)) != set(self.adapters):
                raise ValueError(f"{name} must give a value for every exit {self.at}; "
                                 f"got {sorted(getattr(self, name))}")

    @property
    def at(self) -> list[int]:
        return sorted(self.adapters)

    @property
    def rank(self) -> int:
        return next(iter(self.adapters.values()))[0].shape[0]

    def metadata(self) -> dict[str, str]:
        def per_exit(values: dict[int, float]) -> str:
            return json.dumps({str(k): values[k] for k in self.at})

        return {"format": FORMAT, "kind": self.kind, "at": json.dumps(self.at), "rank": str(self.rank),
                "criterion": self.criterion, "target_agreement": repr(self.target_agreement),
                **{name: per_exit(getattr(self, name)) for name in PER_EXIT}}

    def save(self, path: str | Path) -> None:
        """Write the file atomically: a failed save leaves `path` as it was."""
        tensors = {}
        for k in self.at:
            down, up = self.adapters[k]
            tensors[f"exit.{k}.down"] = down.detach().float().contiguous()
            tensors[f"exit.{k}.up"] = up.detach().float().contiguous()
        with atomic_file(path) as tmp:
            save_file(tensors, str(tmp), metadata=self.metadata())

    @classmethod
    def load(cls, path: str | Path) -> "ExitHeads":
        """Read a file `save` wrote; anything else is refused with a UserError naming what is wrong."""
        path = Path(path)
        if not path.is_file():
            raise UserError(f"{path}: no such file; {HOW_TO_MAKE}")
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                tensors = {name: f.get_tensor(name) for name in f.keys()}
        except (SafetensorError, OSError, ValueError) as e:
            raise UserError(f"{path} is not a safetensors file ({cause(e)}); {HOW_TO_MAKE}") from None
        if meta.get("format") != FORMAT:
            raise UserError(f"{path} is not an exit-heads file (format {meta.get('format')!r}, "
                            f"expected {FORMAT!r}); {HOW_TO_MAKE}")
        try:
            at = [int(k) for k in json.loads(meta["at"])]
            per_exit = {name: {int(k): float(v) for k, v in json.loads(meta[name]).items()} for name in PER_EXIT}
            return cls(kind=meta["kind"], criterion=meta["criterion"], target_agreement=float(meta["target_agreement"]),
                       adapters={k: (tensors[f"exit.{k}.down"], tensors[f"exit.{k}.up"]) for k in at}, **per_exit)
        except (KeyError, ValueError, TypeError, AttributeError) as e:
            raise UserError(f"{path} is a damaged exit-heads file ({type(e).__name__}: {cause(e)}); {HOW_TO_MAKE}") from None
