"""Calibration inputs: rows of a program's inputs, split into training and held-out batches.

A decoder calibrates on its prefill program, whose logits cover every prompt position, so each
row gives one calibration position per token. By default the rows are cut from the shipped texts
(`zoo.texts`, public-domain English) with the model's own tokenizer, so a decoder needs nothing
but itself. An encoder's inputs (images, sentences of some task, another language) cannot be
guessed: it needs an .npz with one array per program input, rows first. `optimize --data` reads
its fidelity inputs the same way.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from skimformer.backends.engine import folder_tokenizer
from skimformer.errors import UserError
from skimformer.ir import Model, Program

ROWS = 32  # text rows for a decoder: 32 x 128 = 4096 positions
SEQ_LEN = 128
HELD_OUT = 0.2  # the fraction of rows kept for agreement figures and thresholds
NPZ_HINT = "give an .npz with one array per program input, rows first (np.savez('inputs.npz', input_ids=...))"

Batch = dict[str, torch.Tensor]


def read_npz(path: str | Path, what: str = "calibration inputs") -> dict[str, np.ndarray]:
    try:
        data = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as e:
        raise UserError(f"{path}: cannot read {what} ({str(e).splitlines()[0]}); {NPZ_HINT}") from None
    if not isinstance(data, np.lib.npyio.NpzFile):
        raise UserError(f"{path} holds a single array, not named arrays; {NPZ_HINT}")
    try:
        with data:
            return {name: data[name] for name in data.files}
    except (OSError, ValueError, EOFError) as e:
        raise UserError(f"{path}: cannot read {what} ({str(e).splitlines()[0]}); {NPZ_HINT}") from None


def text_rows(model: Model, rows: int = ROWS, seq_len: int = SEQ_LEN, tokenizer=None) -> dict[str, np.ndarray]:
    """`input_ids [rows, seq_len]`: the start of `rows` different passages of the shipped texts,
    cut with `tokenizer` (default: the model folder's)."""
    from skimformer.zoo.texts import passage  # the zoo imports transformers: only when it is needed

    tokenizer = tokenizer or _tokenizer(model)
    ids = [tokenizer(passage(seq_len, i, tokenizer))["input_ids"][:seq_len] for i in range(rows)]
    return {"input_ids": np.array(ids, dtype=np.int64)}


def model_tokenizer(model: Model):
    """The tokenizer in the model's folder, or None when it has none."""
    folder = model.source
    try:
        return folder_tokenizer(folder) if folder is not None else None
    except (OSError, ValueError) as e:
        raise UserError(f"the tokenizer in {folder} cannot be loaded ({str(e).splitlines()[0]}): {NPZ_HINT}") from None


def _tokenizer(model: Model):
    tokenizer = model_tokenizer(model)
    if tokenizer is None:
        raise UserError(f"the decoder folder {model.source} has no tokenizer files, so calibrate cannot tokenize its "
                        f"texts: {NPZ_HINT}")
    return tokenizer


def as_inputs(arrays: dict, program: Program, decoder: bool, what: str = "calibration inputs",
              min_rows: int = 2) -> Batch:
    """The program's inputs as tensors of its dtypes, all with the same rows (at least `min_rows`:
    calibration trains on some and holds out others). A decoder's prefill may be given
    `input_ids` alone: no padding, positions counted from each row's first token."""
    tensors = {name: torch.as_tensor(value) for name, value in arrays.items()}
    if decoder and "input_ids" in tensors:
        mask = tensors.setdefault("attention_mask", torch.ones_like(tensors["input_ids"]))
        tensors.setdefault("position_ids", (mask.long().cumsum(-1) - 1).clamp(min=0))
    missing = [name for name in program.input_names if name not in tensors]
    if missing:
        raise UserError(f"the {what} lack {', '.join(missing)} (the {program.role} program takes "
                        f"{', '.join(program.input_names)}); {NPZ_HINT}")
    dtypes = {name: node.meta["val"].dtype for name, node in zip(program.input_names, program.input_nodes())}
    try:
        inputs = {name: tensors[name].to(dtypes[name]) for name in program.input_names}
    except (TypeError, RuntimeError) as e:
        raise UserError(f"the {what} cannot be converted to the program's dtypes ({e}); "
                        f"{NPZ_HINT}") from None
    rows = {t.shape[0] if t.dim() else 0 for t in inputs.values()}
    if len(rows) != 1 or min(rows) < min_rows:
        shapes = ", ".join(f"{name} {list(t.shape)}" for name, t in inputs.items())
        raise UserError(f"the {what} need the same number of rows (>= {min_rows}) in every array; got {shapes}")
    return inputs


def split(inputs: Batch, batch: int, seed: int) -> tuple[list[Batch], list[Batch]]:
    """Training and held-out batches of `batch` rows; rows are shuffled with `seed` first."""
    rows = next(iter(inputs.values())).shape[0]
    order = torch.randperm(rows, generator=torch.Generator().manual_seed(seed))
    held = max(1, round(HELD_OUT * rows))

    def batches(index: torch.Tensor) -> list[Batch]:
        return [{name: t[index[i:i + batch]] for name, t in inputs.items()} for i in range(0, len(index), batch)]

    return batches(order[held:]), batches(order[:held])
