"""The decoding loop of a decoder engine: prefill, then one decode step per token, owning every
tensor the programs hand from one step to the next.

Every `present_*` output feeds the matching `past_*` input of the next step and every `state_*`
output the `state_*` input of the same name (DESIGN.md), so passes may add cache companions
and state without changing this loop. A program that returns an `attention_mask` output (a
cache shorter than the tokens seen: prompt pruning, eviction, a window) gives the mask of the
cache it returns; the loop grows that one, while position ids keep counting from the prompt.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from skimformer.errors import UserError
from skimformer.ir.signature import carried_input

MASK = "attention_mask"
EXIT_LAYER = "exit_layer"  # blocks run by a step of a program with early exits


@dataclass
class Sampling:
    """Greedy when `temperature` is 0; otherwise softmax sampling at `temperature`, restricted to
    the `top_k` most likely tokens and the smallest set whose probability reaches `top_p`."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None

    def __post_init__(self):
        if self.temperature < 0:
            raise UserError(f"temperature must be >= 0 (0 is greedy); got {self.temperature}")
        if self.top_k < 0:
            raise UserError(f"top_k must be >= 0 (0 keeps every token); got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise UserError(f"top_p must be in (0, 1]; got {self.top_p}")

    def chooser(self) -> Callable[[np.ndarray], np.ndarray]:
        """A function from last-position logits `[B, V]` to next tokens `[B]`."""
        if self.temperature == 0:
            return lambda logits: logits.argmax(-1).astype(np.int64)
        rng = np.random.default_rng(self.seed)

        def sample(logits: np.ndarray) -> np.ndarray:
            z = logits.astype(np.float64) / self.temperature
            if self.top_k:
                kth = np.sort(z, axis=-1)[:, -min(self.top_k, z.shape[-1])][:, None]
                z = np.where(z < kth, -np.inf, z)
            p = np.exp(z - z.max(-1, keepdims=True))
            p /= p.sum(-1, keepdims=True)
            if self.top_p < 1:
                order = np.argsort(-p, axis=-1)
                sorted_p = np.take_along_axis(p, order, -1)
                drop = np.cumsum(sorted_p, -1) - sorted_p >= self.top_p  # keep the first token always
                np.put_along_axis(p, order, np.where(drop, 0.0, sorted_p), -1)
                p /= p.sum(-1, keepdims=True)
            return np.array([rng.choice(p.shape[-1], p=row) for row in p], dtype=np.int64)

        return sample


@dataclass
class Generation:
    ids: np.ndarray  # [B, generated], prompt excluded
    kv_cache_bytes: int  # every cache, companion and state tensor held after the last step
    seconds: float
    steps: int  # decode steps run
    extra: dict = field(default_factory=dict)
    prefill_seconds: float = 0.0  # of `seconds`

    @property
    def tokens_per_s(self) -> float:
        return self.ids.size / self.seconds if self.seconds > 0 else 0.0

    @property
    def decode_tokens_per_s(self) -> float:
        """Tokens the decode steps produced per second of decoding (the prefill's token excluded)."""
        decoding = self.seconds - self.prefill_seconds
        return self.ids.shape[0] * (self.ids.shape[1] - 1) / decoding if decoding > 0 else 0.0


@dataclass
class Prompt:
    """A checked prompt batch: ids and mask `[B, T]`, and each row's position ids."""

    ids: np.ndarray
    mask: np.ndarray
    positions: np.ndarray

    @classmethod
    def of(cls, prompt_ids, attention_mask, max_new_tokens: int) -> "Prompt":
        if max_new_tokens < 1:
            raise UserError(f"max_new_tokens must be >= 1; got {max_new_tokens}")
        ids = np.atleast_2d(np.asarray(prompt_ids, dtype=np.int64))
        if ids.shape[1] == 0:
            raise UserError("the prompt is empty: give at least one token")
        mask = np.ones_like(ids) if attention_mask is None else np.atleast_2d(np.asarray(attention_mask, dtype=np.int64))
        if mask.shape != ids.shape:
            raise UserError(f"attention_mask has shape {mask.shape}, the prompt {ids.shape}: they must match")
        return cls(ids, mask, np.clip(np.cumsum(mask, axis=1) - 1, 0, None))

    def prefill(self, run: Callable[[dict, str], dict]) -> dict:
        return run({"input_ids": self.ids, MASK: self.mask, "position_ids": self.positions}, "prefill")


class Finisher:
    """Rows of a batch finish independently at `eos_token_id`: later tokens of a finished row are
    `eos_token_id` too."""

    def __init__(self, rows: int, eos_token_id: int | None):
        self.eos = eos_token_id
        self.finished = np.zeros(rows, dtype=bool)

    def __call__(self, token: np.ndarray) -> np.ndarray:
        if self.eos is None:
            return token
        token = np.where(self.finished, self.eos, token)
        self.finished |= token == self.eos
        return token

    @property
    def done(self) -> bool:
        return bool(self.finished.all())


class CopiedCache:
    """The plain decoding state: every carried output of a step (`present_*`, `state_*`) is fed
    back as the next step's input, through numpy. Any engine can run it."""

    def __init__(self, run: Callable[[dict, str], dict]):
        self.run = run
        self.carried: dict[str, np.ndarray] = {}

    def step(self, feeds: dict, role: str) -> dict:
        outputs = self.run({**feeds, **self.carried}, role)
        self.carried = {carried_input(k): v for k, v in outputs.items() if carried_input(k)}
        return outputs

    @property
    def bytes(self) -> int:
        return int(sum(np.asarray(v).nbytes for v in self.carried.values()))


def generate(run: Callable[[dict, str], dict], prompt_ids, max_new_tokens: int, attention_mask=None,
             eos_token_id: int | None = None, sampling: Sampling | None = None, cache=None) -> Generation:
    """Generate with `run(feeds, role)` (an engine's programs); rows of a left-padded batch
    finish independently when `eos_token_id` is given. `cache` owns what steps hand each other
    (`CopiedCache(run)` by default; an engine may keep it in place instead). A decode program
    that returns `exit_layer` (early exits) gives `mean_exit_layer` and `exit_histogram` (blocks
    run -> decode steps) over the decode steps in `extra`."""
    prompt = Prompt.of(prompt_ids, attention_mask, max_new_tokens)
    cache = cache or CopiedCache(run)
    choose = (sampling or Sampling()).chooser()
    start = time.perf_counter()
    outputs = cache.step({"input_ids": prompt.ids, MASK: prompt.mask, "position_ids": prompt.positions}, "prefill")
    prefill_seconds = time.perf_counter() - start
    mask, rows = prompt.mask, prompt.ids.shape[0]
    generated, finish = [], Finisher(rows, eos_token_id)
    next_pos = prompt.positions[:, -1:] + 1
    depths = []
    while True:
        token = finish(choose(outputs["logits"][:, -1]))
        generated.append(token)
        if len(generated) == max_new_tokens or finish.done:
            break
        if MASK in outputs:
            mask = np.asarray(outputs[MASK], dtype=np.int64)
        mask = np.concatenate([mask, np.ones((rows, 1), dtype=np.int64)], axis=1)
        outputs = cache.step({"input_ids": token[:, None], MASK: mask, "position_ids": next_pos}, "decode")
        if EXIT_LAYER in outputs:
            depths.append(int(outputs[EXIT_LAYER]))
        next_pos = next_pos + 1
    extra = {"mean_exit_layer": float(np.mean(depths)),
             "exit_histogram": {str(d): depths.count(d) for d in sorted(set(depths))}} if depths else {}
    return Generation(np.stack(generated, axis=1), cache.bytes, time.perf_counter() - start,
                      len(generated) - 1, extra, prefill_seconds)
