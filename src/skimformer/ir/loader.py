"""`load(path) -> Model`: read what `torch.export.save` wrote, and refuse everything else.

A `.pt2` archive is a zip whose graph is JSON and whose tensors are raw bytes or weights-only
pickles. The archive format is checked before torch reads it, and torch's reader runs with
weights-only unpickling forced and Python-object pickles refused, so a file cannot execute code.
Input and output containers that this process has not registered (a transformers `ModelOutput`)
are registered from installed packages or read as dicts (`treespecs`), so they never refuse a file.
"""
from __future__ import annotations

import contextlib
import os
import pickle
import zipfile
from pathlib import Path

import sympy
import torch

import skimformer.kernels  # noqa: F401  (registers the skim ops rewritten programs hold)
from skimformer.errors import UserError, cause
from skimformer.ir.program import LOADED_FROM, Model, Program
from skimformer.ir.treespecs import reading_specs

HOW_TO_EXPORT = "save one with torch.export.save(torch.export.export(model, args), PATH) or `skimformer export MODEL_DIR -o OUT`"
DECODER_FILES = ("prefill.pt2", "decode.pt2")
TOKENIZER_AND_CONFIG = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                        "special_tokens_map.json", "vocab.json", "vocab.txt", "merges.txt", "tokenizer.model",
                        "added_tokens.json", "chat_template.jinja")


def _classify_zip(path: Path, names: list[str]) -> None:
    """Refuse zips that are not exported programs, naming what they are instead."""
    if any(n.endswith("/code/") or "/code/__torch__" in n for n in names) or any(n.endswith("constants.pkl") for n in names):
        raise UserError(f"{path} is a TorchScript file (torch.jit), not an exported program: {HOW_TO_EXPORT}")
    if not any(n.endswith("archive_format") for n in names):
        if any(n.endswith("data.pkl") for n in names):
            raise UserError(f"{path} is a torch.save file (a state_dict or pickled module), not an exported program: {HOW_TO_EXPORT}")
        raise UserError(f"{path} is a zip file but not a torch.export archive: {HOW_TO_EXPORT}")
    if any("/aotinductor/" in n for n in names):
        raise UserError(f"{path} is an AOTInductor package, not an exported program: pass the .pt2 written by torch.export.save")
    if not any("/models/" in n and n.endswith(".json") for n in names):
        raise UserError(f"{path} is a pt2 archive without an exported program: {HOW_TO_EXPORT}")


def check_archive(path: Path) -> None:
    """Raise UserError unless `path` looks like a complete torch.export archive."""
    if not path.exists():
        raise UserError(f"{path}: no such file; give a .pt2 file written by torch.export.save or a decoder folder")
    with open(path, "rb") as f:
        head = f.read(4)
    if not zipfile.is_zipfile(path):
        if head.startswith(b"PK"):
            raise UserError(f"{path} is a damaged archive (truncated or corrupt): save it again with torch.export.save")
        if head[:1] == b"\x80":
            raise UserError(f"{path} is a pickle (a state_dict or torch.save file), not an exported program: {HOW_TO_EXPORT}")
        raise UserError(f"{path} is not a torch.export archive: {HOW_TO_EXPORT}")
    try:
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
            bad = z.testzip()
    except (zipfile.BadZipFile, OSError, EOFError) as e:
        raise UserError(f"{path} is a damaged archive ({cause(e)}): save it again with torch.export.save") from None
    if bad is not None:
        raise UserError(f"{path} is a damaged archive (entry {bad} is corrupt): save it again with torch.export.save")
    _classify_zip(path, names)


class _NoPythonObjects:
    """Stands in for `pickle` inside torch's archive reader: tensors load, Python objects do not."""

    @staticmethod
    def loads(*_args, **_kwargs):
        raise pickle.UnpicklingError("a constant is a pickled Python object")


@contextlib.contextmanager
def _weights_only():
    from torch.export.pt2_archive import _package

    old_env, old_pickle = os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD"), _package.pickle
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    _package.pickle = _NoPythonObjects
    try:
        yield
    finally:
        _package.pickle = old_pickle
        if old_env is None:
            os.environ.pop("TORCH_FORCE_WEIGHTS_ONLY_LOAD", None)
        else:
            os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = old_env


@contextlib.contextmanager
def _schema_hints_cached():
    """torch's reader asks `typing.get_type_hints` for a schema dataclass's field types at every
    node, argument and size it reads (thousands of times for a small program, a third of its
    reading time); a class's hints do not change, so they are looked up once per class."""
    import typing

    original, cache = typing.get_type_hints, {}

    def hints(obj, globalns=None, localns=None, include_extras=False):
        if not isinstance(obj, type) or globalns is None or localns is not None or include_extras:
            return original(obj, globalns, localns, include_extras)
        key = (obj, id(globalns))
        if key not in cache:
            cache[key] = original(obj, globalns)
        return dict(cache[key])

    typing.get_type_hints = hints
    try:
        yield
    finally:
        typing.get_type_hints = original


class _SympyParsingOnce:
    """`sympy` as torch's reader sees it, but `sympify` of a text parses it once per program.

    The reader parses every symbolic size of every node from its text (`s0`, `s1 + s70`): tens
    of thousands of `parse_expr` calls for a 30-layer decoder, most of its loading time, for a
    few hundred distinct texts. Within one program a text always names the same symbols, so it
    parses to the same expression."""

    def __init__(self):
        self._parsed: dict[str, sympy.Basic] = {}

    def __getattr__(self, name):
        return getattr(sympy, name)

    def sympify(self, a, *args, **kwargs):
        if not isinstance(a, str):
            return sympy.sympify(a, *args, **kwargs)
        if a not in self._parsed:
            self._parsed[a] = sympy.sympify(a, *args, **kwargs)
        return self._parsed[a]


@contextlib.contextmanager
def _sizes_parsed_once():
    from torch._export.serde import serialize

    original = serialize.sympy
    serialize.sympy = _SympyParsingOnce()
    try:
        yield
    finally:
        serialize.sympy = original


def load_program(path: str | Path, role: str = "model") -> Program:
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{path} is a folder: give a .pt2 file, or a decoder folder with {' and '.join(DECODER_FILES)}")
    check_archive(path)
    try:
        with _weights_only(), reading_specs(path), _schema_hints_cached(), _sizes_parsed_once():
            ep = torch.export.load(str(path))
    except UserError:
        raise
    except pickle.UnpicklingError as e:  # torch's weights-only refusal, or ours
        raise UserError(f"{path} needs Python objects unpickled ({cause(e)}), which skimformer never does: "
                        "save the program again with torch.export.save") from None
    except Exception as e:  # torch raises many types for unreadable archives
        raise UserError(f"{path} could not be read as an exported program ({cause(e)}): {HOW_TO_EXPORT}") from None
    _drop_expression_ranges(ep)
    LOADED_FROM[ep] = path.resolve()
    return Program(ep=ep, role=role)


def _drop_expression_ranges(ep: torch.export.ExportedProgram) -> None:
    """Forget value ranges keyed by expressions (`past + n`) rather than symbols.

    A loaded program gets one for every input dimension that is a sum of symbols (a decoder's
    attention mask), and torch's decomposition pass, which the ONNX exporter runs, rejects
    them ("expected sympy.Symbol"). They follow from the symbols' own ranges, so nothing is lost.
    """
    from torch._export.utils import _get_shape_env_from_gm

    ep._range_constraints = {k: v for k, v in ep.range_constraints.items() if isinstance(k, sympy.Symbol)}
    shape_env = _get_shape_env_from_gm(ep.graph_module)
    if shape_env is not None:
        for key in [k for k in shape_env.var_to_range if not isinstance(k, sympy.Symbol)]:
            del shape_env.var_to_range[key]


def load(path: str | Path) -> Model:
    """A `.pt2` file, a folder holding `model.pt2`, or a decoder folder (`prefill.pt2` + `decode.pt2`)."""
    path = Path(path)
    if path.is_dir():
        if all((path / f).exists() for f in DECODER_FILES):
            programs = {f.removesuffix(".pt2"): load_program(path / f, f.removesuffix(".pt2")) for f in DECODER_FILES}
            extra = [path / f for f in TOKENIZER_AND_CONFIG if (path / f).exists()]
            return Model(programs=programs, source=path, extra_files=extra)
        if (path / "model.pt2").exists():
            return Model(programs={"model": load_program(path / "model.pt2")}, source=path)
        raise UserError(f"{path} is a folder without {' and '.join(DECODER_FILES)} (or model.pt2): "
                        "give a .pt2 file or a folder written by `skimformer export`")
    return Model(programs={"model": load_program(path)}, source=path)
