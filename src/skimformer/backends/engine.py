"""`Engine`: an engine folder loaded back, run by name; for decoders it also generates.

The engine owns the state between decode steps: every `present_*` output feeds the matching
`past_*` input of the next step and every `state_*` output the `state_*` input of the same name
(the decoder convention of DESIGN.md), so passes may add state without changing this loop. A
program that returns an `attention_mask` output (prompt pruning keeps fewer tokens in the cache
than the prompt had) gives the mask of the cache it returns; the loop grows that one instead,
while position ids keep counting from the prompt's own length.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from skimformer.backends.registry import backend_module
from skimformer.errors import UserError
from skimformer.ir.signature import carried_input

MANIFEST = "manifest.json"
EXAMPLES = "example_inputs.npz"


def _as_numpy(x) -> np.ndarray:
    return x.detach().cpu().numpy() if hasattr(x, "detach") else np.asarray(x)


class Engine:
    def __init__(self, folder: Path, manifest: dict):
        self.folder = Path(folder)
        self.manifest = manifest
        backend = backend_module(manifest["backend"])
        self.runners = {role: backend.Runner(self.folder / spec["engine"])
                        for role, spec in manifest["programs"].items()}

    @classmethod
    def load(cls, folder: str | Path) -> "Engine":
        folder = Path(folder)
        try:
            manifest = json.loads((folder / MANIFEST).read_text())
        except FileNotFoundError:
            raise UserError(f"{folder} is not an engine folder (no {MANIFEST}): build one with `optimize MODEL -o DIR`") from None
        except json.JSONDecodeError as e:
            raise UserError(f"{folder / MANIFEST} is damaged ({e}): build the engine again") from None
        return cls(folder, manifest)

    @property
    def roles(self) -> list[str]:
        return list(self.runners)

    @property
    def is_decoder(self) -> bool:
        return "prefill" in self.runners and "decode" in self.runners

    def _role(self, program: str | None) -> str:
        role = program or self.roles[0]
        if role not in self.runners:
            raise UserError(f"this engine has no program {role!r}; it has: {', '.join(self.roles)}")
        return role

    def input_names(self, program: str | None = None) -> list[str]:
        return self.runners[self._role(program)].input_names

    def example_inputs(self, program: str | None = None) -> dict[str, np.ndarray]:
        role = self._role(program)
        with np.load(self.folder / EXAMPLES) as data:
            return {k.removeprefix(f"{role}."): data[k] for k in data.files if k.startswith(f"{role}.")}

    def run(self, inputs: dict, program: str | None = None) -> dict[str, np.ndarray]:
        """Run one program (the first by default) on named inputs (numpy arrays or tensors)."""
        role = self._role(program)
        runner = self.runners[role]
        missing = [n for n in runner.input_names if n not in inputs]
        if missing:
            raise UserError(f"inputs are missing {', '.join(missing)}; the {role} program takes {', '.join(runner.input_names)}")
        return runner.run({k: _as_numpy(v) for k, v in inputs.items()})

    def generate(self, prompt_ids, max_new_tokens: int = 32, attention_mask=None,
                 eos_token_id: int | None = None) -> np.ndarray:
        """Greedy generation; returns the generated ids `[B, max_new_tokens]` (prompt excluded)."""
        if not self.is_decoder:
            raise UserError("generate needs a decoder engine (prefill and decode programs)")
        ids = np.atleast_2d(np.asarray(prompt_ids, dtype=np.int64))
        mask = np.ones_like(ids) if attention_mask is None else np.atleast_2d(np.asarray(attention_mask, dtype=np.int64))
        positions = np.clip(np.cumsum(mask, axis=1) - 1, 0, None)
        outputs = self.run({"input_ids": ids, "attention_mask": mask, "position_ids": positions}, "prefill")
        generated, finished = [], np.zeros(ids.shape[0], dtype=bool)
        next_pos = positions[:, -1:] + 1
        for _ in range(max_new_tokens):
            token = outputs["logits"][:, -1].argmax(-1).astype(np.int64)
            if eos_token_id is not None:
                token = np.where(finished, eos_token_id, token)
                finished |= token == eos_token_id
            generated.append(token)
            if len(generated) == max_new_tokens or finished.all():
                break
            if "attention_mask" in outputs:  # the mask of the cache the program returned
                mask = np.asarray(outputs["attention_mask"], dtype=np.int64)
            mask = np.concatenate([mask, np.ones((ids.shape[0], 1), dtype=np.int64)], axis=1)
            feeds = {"input_ids": token[:, None], "attention_mask": mask, "position_ids": next_pos}
            feeds.update({carried_input(k): v for k, v in outputs.items() if carried_input(k)})
            outputs = self.run(feeds, "decode")
            next_pos = next_pos + 1
        return np.stack(generated, axis=1)
