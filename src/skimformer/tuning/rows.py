"""The rows a search measures on, and the rows it never sees.

Fidelity is the user's own: an encoder's rows come from `--data` (an .npz with one array per
program input, rows first, and optionally `labels`), a decoder's from `--data` or from passages
of the shipped texts cut with its tokenizer. The rows are shuffled once (seeded) and a quarter
is held out: trials measure on the rest, and only the chosen engine is measured on the held-out
rows at the end, so the figure reported for it is not one the search selected for.
"""
from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np

from skimformer.calibration.data import NPZ_HINT, as_inputs, model_tokenizer, text_rows
from skimformer.errors import UserError
from skimformer.ir import Model

HELD_OUT = 0.25
LABELS = "labels"
PROMPT = 512  # a decoder's prompt tokens (backends.measure times the same length)
FORCED = 32  # teacher-forced tokens after it
TEXT_ROWS = 12  # passages of the shipped texts: 9 searched (288 teacher-forced positions), 3 held out


@dataclass
class Rows:
    """Inputs named like the program's, rows first: `search` (trials) and `held_out` (the chosen
    engine only); an encoder's `labels` for each, when given; a decoder's `prompt` length (the
    tokens after it are fed one decode step each); `batch`: rows per timed call."""

    search: dict[str, np.ndarray]
    held_out: dict[str, np.ndarray]
    source: str
    batch: int
    labels: tuple[np.ndarray, np.ndarray] | None = None
    prompt: int = 0

    @property
    def rows(self) -> int:
        return len(next(iter(self.search.values())))

    def describe(self) -> dict:
        out = {"inputs": self.source, "search_rows": self.rows,
               "held_out_rows": len(next(iter(self.held_out.values()))), "batch": self.batch}
        return {**out, **({"prompt_tokens": self.prompt, "forced_tokens": self.forced} if self.prompt else {})}

    @property
    def forced(self) -> int:
        return next(iter(self.search.values())).shape[1] - self.prompt

    def timing_inputs(self) -> dict[str, np.ndarray]:
        """The first `batch` search rows: what an encoder's speed is measured on."""
        return {k: v[:self.batch] for k, v in self.search.items()}


def tune_rows(model: Model, data: dict[str, np.ndarray] | None, batch: int, seed: int) -> Rows:
    if batch < 1:
        raise UserError(f"--batch is the rows per timed call, >= 1; got {batch}")
    if model.is_decoder:
        return _decoder_rows(model, data, batch, seed)
    if data is None:
        raise UserError(f"tune needs --data for an encoder: its fidelity is measured on your inputs; {NPZ_HINT}")
    arrays = dict(data)
    labels = arrays.pop(LABELS, None)
    program = next(iter(model.programs.values()))
    inputs = {k: v.numpy() for k, v in as_inputs(arrays, program, False, what="tune inputs (--data)", min_rows=2).items()}
    rows = len(next(iter(inputs.values())))
    if labels is not None and (labels.ndim != 1 or len(labels) != rows):
        raise UserError(f"--data's labels must be one integer per row ({rows} rows); got shape {list(labels.shape)}")
    search, held = _split(rows, seed)
    pick = lambda arrays, index: {k: v[index] for k, v in arrays.items()}  # noqa: E731
    return Rows(pick(inputs, search), pick(inputs, held), "the rows of --data", min(batch, len(search)),
                None if labels is None else (labels[search].astype(np.int64), labels[held].astype(np.int64)))


def _decoder_rows(model: Model, data, batch: int, seed: int) -> Rows:
    if data is not None:
        inputs = as_inputs(data, model.programs["prefill"], True, what="tune inputs (--data)", min_rows=2)
        ids, mask = inputs["input_ids"].numpy(), inputs["attention_mask"].numpy()
        source = "the rows of --data"
    else:
        tokenizer = model_tokenizer(model)
        if tokenizer is None:
            raise UserError(f"the decoder folder {model.source} has no tokenizer to cut the shipped texts with: "
                            f"give --data with input_ids rows; {NPZ_HINT}")
        length = min(PROMPT + FORCED, _positions(model) or PROMPT + FORCED)
        ids = text_rows(model, TEXT_ROWS, length, tokenizer)["input_ids"]
        mask, source = np.ones_like(ids), "passages of the shipped texts"
    n = ids.shape[1]
    forced = min(FORCED, n // 4)
    if forced < 1:
        raise UserError(f"tune's decoder rows need at least 4 tokens (a prompt, then teacher-forced tokens); got {n}")
    search, held = _split(len(ids), seed)
    pick = lambda index: {"input_ids": ids[index], "attention_mask": mask[index]}  # noqa: E731
    return Rows(pick(search), pick(held), source, min(batch, len(search)), prompt=n - forced)


def _split(rows: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Search and held-out row indices (a quarter held out, at least one row each)."""
    if rows < 2:
        raise UserError(f"tune needs at least 2 rows of inputs (some held out); got {rows}")
    order = np.random.default_rng(seed).permutation(rows)
    held = min(rows - 1, max(1, round(HELD_OUT * rows)))
    return np.sort(order[held:]), np.sort(order[:held])


def _positions(model: Model) -> int | None:
    """The positions a decoder takes, from the config.json beside it (None when unknown)."""
    config = next((p for p in model.extra_files if p.name == "config.json"), None)
    values = json.loads(config.read_text()) if config is not None else {}
    return next((values[k] for k in ("max_position_embeddings", "n_positions") if isinstance(values.get(k), int)), None)
