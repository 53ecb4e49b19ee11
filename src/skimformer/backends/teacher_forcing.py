"""Teacher-forced decoding: prefill a prompt, then feed given tokens a decode step at a time and
read the logits that predict each of them.

Fidelity is measured this way (on the programs in torch) and so are the benchmarks' agreement
and perplexity (on engines): feeding the same tokens to a reference and a rewritten model
compares them position by position, where free generation would drift apart after the first
disagreement. Anything with `run(feeds, role) -> outputs` drives it; carried tensors are
threaded as the engine's loop threads them (`present_*` -> `past_*`, `state_*` -> `state_*`, a
returned `attention_mask` is the mask of the cache held).
"""
from __future__ import annotations

from typing import Callable, Iterator

import numpy as np
import torch

from skimformer.backends.generation import Prompt
from skimformer.ir import Model
from skimformer.ir.signature import carried_input

MASK = "attention_mask"
Run = Callable[[dict, str], dict]


def program_runner(model: Model) -> Run:
    """`run(feeds, role)` over a model's programs in torch, numpy in and out (an engine's interface).
    numpy has no bfloat16: such outputs come out as float32 (exactly) and inputs are cast to the
    dtype the program takes, so a bfloat16 cache threads through unchanged."""

    def run(feeds: dict, role: str) -> dict[str, np.ndarray]:
        program = model.programs[role]
        inputs = {node.name: torch.as_tensor(np.asarray(feeds[node.name])).to(node.meta["val"].dtype)
                  for node in program.input_nodes()}
        return {k: (v.float() if v.dtype == torch.bfloat16 else v).numpy() for k, v in program.run(inputs).items()}

    return run


class Decoder:
    """A prefilled prompt and the decode steps fed after it.

    `mask` is the mask of the cache held (the returned `attention_mask` when the program returns
    one, else the running one); positions count on from each row's last prompt position.
    """

    def __init__(self, run: Run, prompt: Prompt, outputs: dict):
        """Continue from `outputs`, what the prefill program returned for `prompt`."""
        self.run = run
        self.last_logits = outputs["logits"][:, -1]
        self._take(outputs, prompt.mask)
        self.position = prompt.positions[:, -1:] + 1

    @classmethod
    def prefill(cls, run: Run, ids: np.ndarray, attention_mask: np.ndarray | None = None) -> "Decoder":
        prompt = Prompt.of(ids, attention_mask, 1)
        return cls(run, prompt, prompt.prefill(run))

    def _take(self, out: dict, mask: np.ndarray) -> None:
        self.carried = {carried_input(k): v for k, v in out.items() if carried_input(k)}
        self.mask = np.asarray(out[MASK], dtype=np.int64) if MASK in out else mask
        self.returns_mask = MASK in out

    def fork(self) -> "Decoder":
        other = object.__new__(Decoder)
        other.__dict__.update(self.__dict__)
        other.carried = dict(self.carried)
        return other

    @property
    def cache_bytes(self) -> int:
        return sum(v.nbytes for v in self.carried.values())

    def step(self, tokens: np.ndarray) -> np.ndarray:
        """Feed `tokens` [B, k]; returns their logits [B, k, V]."""
        batch, k = tokens.shape
        mask = np.concatenate([self.mask, np.ones((batch, k), dtype=np.int64)], axis=1)
        positions = self.position + np.arange(k, dtype=np.int64)
        out = self.run({"input_ids": tokens, MASK: mask, "position_ids": positions, **self.carried}, "decode")
        before = self.carried
        self._take(out, mask)
        self.grew = {name: (before[name].shape, v.shape) for name, v in self.carried.items() if name in before}
        self.position = self.position + k
        return out["logits"]


def forced_logits(decoder: Decoder, tokens: np.ndarray, chunk: int = 1) -> Iterator[np.ndarray]:
    """The logits predicting each of `tokens` [B, n], in order: the prefill's last position's
    ([B, 1, V]), then those of the decode steps that feed `tokens[:, :n - 1]`, `chunk` a step
    ([B, k, V]). Runs on a fork: `decoder` stays at the end of its prompt."""
    d = decoder.fork()
    yield d.last_logits[:, None]
    n = tokens.shape[1]
    for j in range(0, n - 1, chunk):
        yield d.step(tokens[:, j:min(j + chunk, n - 1)])
