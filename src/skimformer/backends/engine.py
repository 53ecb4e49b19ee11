"""`Engine`: an engine folder loaded back, run by name; for decoders it also generates (the
loop that owns the cache and state between steps is `backends.generation`)."""
from __future__ import annotations

import json
import threading
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from skimformer.backends.generation import Generation, Prompt, Sampling, generate
from skimformer.backends.input_check import Signature
from skimformer.backends.registry import backend_module
from skimformer.backends.speculation import speculate
from skimformer.errors import UserError

MANIFEST = "manifest.json"
EXAMPLES = "example_inputs.npz"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt")


def folder_tokenizer(folder: Path):
    """The tokenizer whose files lie in `folder`, or None when there are none; a damaged one
    raises OSError or ValueError (from transformers)."""
    if not any((Path(folder) / name).exists() for name in TOKENIZER_FILES):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder, local_files_only=True)


def _as_numpy(x) -> np.ndarray:
    return x.detach().cpu().numpy() if hasattr(x, "detach") else np.asarray(x)


class Engine:
    def __init__(self, folder: Path, manifest: dict):
        self.folder = Path(folder)
        self.manifest = manifest
        backend = self.backend = backend_module(manifest["backend"])
        options = getattr(backend, "runner_options", lambda _: {})(manifest.get("backend_options") or {})
        self.runners = {role: backend.Runner(self.folder / spec["engine"], **options)
                        for role, spec in manifest["programs"].items()}
        self.signatures = {role: Signature.of(role, spec) for role, spec in manifest["programs"].items()}
        self._generating = threading.local()

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

    def check_inputs(self, inputs: dict, program: str | None = None) -> None:
        """Refuse (UserError, one line) inputs that the program does not take (`input_check`)."""
        self.signatures[self._role(program)].check({k: _as_numpy(v) for k, v in inputs.items()})

    def run(self, inputs: dict, program: str | None = None) -> dict[str, np.ndarray]:
        """Run one program (the first by default) on named inputs (numpy arrays or tensors),
        checked first: the runtimes would compute garbage on inputs the program does not take.
        The steps of the engine's own decoding loop skip the check: they follow from a prompt
        checked once, and a draft step is handed the whole cache."""
        role = self._role(program)
        feeds = {k: _as_numpy(v) for k, v in inputs.items()}
        if not getattr(self._generating, "active", False):
            self.signatures[role].check(feeds)
        return self.runners[role].run(feeds)

    @contextmanager
    def _own_steps(self):
        """While the engine generates, in this thread, `run` leaves its steps unchecked."""
        self._generating.active = True
        try:
            yield
        finally:
            self._generating.active = False

    def generate(self, prompt_ids, max_new_tokens: int = 32, attention_mask=None,
                 eos_token_id: int | None = None, sampling: Sampling | None = None) -> np.ndarray:
        """Generated ids `[B, max_new_tokens]` (prompt excluded); greedy unless `sampling` says otherwise."""
        return self.generate_with_stats(prompt_ids, max_new_tokens, attention_mask, eos_token_id, sampling).ids

    def generate_with_stats(self, prompt_ids, max_new_tokens: int = 32, attention_mask=None,
                            eos_token_id: int | None = None, sampling: Sampling | None = None) -> Generation:
        """Like `generate`, with the cache bytes held at the end and the speed. The prompt is
        checked once, as the prefill program's inputs (too few tokens for a pass, too many for a
        static export)."""
        if not self.is_decoder:
            raise UserError("generate needs a decoder engine (prefill and decode programs)")
        prompt = Prompt.of(prompt_ids, attention_mask, max_new_tokens)
        self._check_positions(int(prompt.positions.max()) + max_new_tokens - 1)
        prompt.prefill(self.check_inputs)
        with self._own_steps():
            return self._generate(prompt_ids, max_new_tokens, attention_mask, eos_token_id, sampling)

    def _check_positions(self, last: int) -> None:
        """Refuse a generation whose last fed position the engine cannot rotate at, before it runs."""
        limit = getattr(self.backend, "position_limit", None)
        limit = limit(self.runners) if limit else None
        if limit is not None and last >= limit:
            raise UserError(f"this engine rotates positions inside ONNX Runtime's GroupQueryAttention, whose tables "
                            f"cover {limit:,} positions, and this generation reaches position {last:,}: generate "
                            f"fewer tokens, or build the engine with --portable")

    def _generate(self, prompt_ids, max_new_tokens: int, attention_mask, eos_token_id: int | None,
                  sampling: Sampling | None) -> Generation:
        if "draft" in self.runners and "verify" in self.runners:
            if sampling is not None and sampling.temperature > 0:
                raise UserError("this engine decodes self-speculatively, which reproduces greedy decoding: "
                                "drop the sampling options (temperature 0)")
            draft = self.manifest.get("generation", {}).get("draft", 4)
            return speculate(self.run, prompt_ids, max_new_tokens, draft, attention_mask, eos_token_id)
        make_cache = getattr(self.backend, "decoding_cache", None)
        cache = make_cache(self.runners["prefill"], self.runners["decode"], max_new_tokens) if make_cache else None
        return generate(self.run, prompt_ids, max_new_tokens, attention_mask, eos_token_id, sampling, cache)

    def tokenizer(self):
        """The model's tokenizer, when the engine folder holds its files; else None."""
        try:
            return folder_tokenizer(self.folder)
        except (OSError, ValueError):
            return None
