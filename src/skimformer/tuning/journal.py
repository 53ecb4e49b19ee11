"""The output folder as the search's memory: `tune.json` (what is searched) and `trials.jsonl`
(one line per finished trial, appended and flushed to disk as each finishes).

A run that finds the folder holding the same search (model, data, budgets, space, backend and
seed) resumes it: the finished trials are replayed into Optuna, never run again. Another search
in the folder is refused, unless `--force` starts over. A line cut short by a crash is dropped
(the file is rewritten without it), so a kill at any moment loses at most the trial in flight.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np

from skimformer.atomic import atomic_file
from skimformer.errors import UserError

SETTINGS = "tune.json"
TRIALS = "trials.jsonl"
FORMAT = 2  # 2: trials carry speed_bound


def digest_files(path: str | Path) -> str:
    """sha256 over a file, or a folder's files by name."""
    path, h = Path(path), hashlib.sha256()
    for p in sorted(path.rglob("*")) if path.is_dir() else [path]:
        if p.is_file():
            h.update(p.name.encode())
            with open(p, "rb") as f:
                for block in iter(lambda: f.read(1 << 22), b""):
                    h.update(block)
    return h.hexdigest()[:16]


def digest_arrays(arrays: dict[str, np.ndarray] | None) -> str | None:
    if arrays is None:
        return None
    h = hashlib.sha256()
    for name in sorted(arrays):
        a = np.ascontiguousarray(arrays[name])
        h.update(f"{name}{a.dtype}{a.shape}".encode())
        h.update(a.tobytes())
    return h.hexdigest()[:16]


class Journal:
    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.path = self.folder / TRIALS

    def open(self, settings: dict, force: bool) -> list[dict]:
        """Prepare the folder for `settings`; the trials of the same search found there."""
        if self.folder.exists() and force:
            shutil.rmtree(self.folder)
        if self.folder.exists() and not self.folder.is_dir():
            raise UserError(f"{self.folder} exists and is not a folder: choose another -o folder")
        stored = self._stored_settings()
        if stored is None and self.folder.exists() and any(self.folder.iterdir()):
            raise UserError(f"{self.folder} exists and holds no tune search: choose another -o folder or pass --force "
                            "to replace it")
        if stored is not None and stored != settings:
            changed = sorted(k for k in settings.keys() | stored.keys() if settings.get(k) != stored.get(k))
            raise UserError(f"{self.folder} holds another search (its {', '.join(changed)} differ): run the same search "
                            "to resume it, choose another -o folder, or pass --force to start over")
        self.folder.mkdir(parents=True, exist_ok=True)
        if stored is None:
            with atomic_file(self.folder / SETTINGS) as tmp:
                tmp.write_text(json.dumps(settings, indent=2))
        return self._read()

    def _stored_settings(self) -> dict | None:
        path = self.folder / SETTINGS
        if not path.is_file():
            return None
        try:
            return json.loads(path.read_text())
        except json.JSONDecodeError:
            raise UserError(f"{path} is damaged: pass --force to start the search over") from None

    def _read(self) -> list[dict]:
        if not self.path.is_file():
            return []
        records, lines = [], self.path.read_text().splitlines()
        for line in lines:
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                break  # a line a crash cut short: it and anything after it are dropped
        if len(records) < len([line for line in lines if line.strip()]):
            with atomic_file(self.path) as tmp:
                tmp.write_text("".join(json.dumps(r) + "\n" for r in records))
        return records

    def append(self, record: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record, default=float) + "\n")
            f.flush()
            os.fsync(f.fileno())
