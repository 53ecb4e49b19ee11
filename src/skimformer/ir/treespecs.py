"""Read the input and output structure of a program whose containers this process has not registered.

torch.export stores a program's pytree specs as JSON that names each container by its registered
type name (`transformers.modeling_outputs.BaseModelOutputWithPooling`). Libraries register their
containers when the module defining them is imported, so a fresh process cannot read a program
exported straight from a transformers model. Before torch reads a spec, an unregistered container
is registered by importing its module, but only when that module belongs to an installed
distribution: the file gives a dotted name, never a path, so what runs is installed code, as if
skimformer imported the library itself. A container that still cannot be found becomes a dict
keyed by the field names its spec lists (a tuple when it lists none): the program keeps its
leaves and their names, and only the container class is lost.
"""
from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.metadata
import json
import sys
import zipfile
from pathlib import Path
from typing import Any, Callable

from torch.utils import _pytree as pytree

from skimformer.errors import UserError

NAMEDTUPLE = "collections.namedtuple"
DICT = pytree.SUPPORTED_SERIALIZED_TYPES[dict].serialized_type_name
TUPLE = pytree.SUPPORTED_SERIALIZED_TYPES[tuple].serialized_type_name


@functools.cache
def _installed_packages() -> frozenset[str]:
    return frozenset(importlib.metadata.packages_distributions())


def _may_import(module: str) -> bool:
    """Whether importing `module` runs only code that is already loaded or installed."""
    parts = module.split(".")
    if not all(p.isidentifier() for p in parts):
        return False
    return module in sys.modules or parts[0] in _installed_packages()


def _register(type_name: str) -> bool:
    """Import the module that defines `type_name` (the longest importable prefix); whether that registered it."""
    parts = type_name.split(".")
    for end in range(len(parts) - 1, 0, -1):
        module = ".".join(parts[:end])
        if not _may_import(module):
            return False
        try:
            importlib.import_module(module)
        except Exception:  # absent, or a library that fails to import: the container stays unknown
            continue
        break
    return type_name in pytree.SERIALIZED_TYPE_TO_PYTHON_TYPE


def _refuse_foreign_enums(obj: dict) -> dict:
    """torch rebuilds an enum in a context by importing the module the file names: refuse any other."""
    if "__enum__" in obj:
        module = str(obj.get("fqn", "")).partition(":")[0]
        if not _may_import(module):
            raise UserError(f"the program's input or output structure names an enum from {module!r}, "
                            "which is not an installed package: install it, or export without that enum")
    return obj


def _parse(context: Any) -> Any:
    """A context as torch would decode it: JSON text, unless the type registered its own format."""
    if not isinstance(context, str):
        return context
    try:
        return json.loads(context, object_hook=_refuse_foreign_enums)
    except json.JSONDecodeError:
        return context


def _names_in(value: Any, n: int) -> list[str] | None:
    """The first list of `n` distinct strings in a context: a dict-like's keys (ModelOutput), a
    registered dataclass's present fields (`[present, absent]`)."""
    if isinstance(value, list) and len(value) == n and all(isinstance(v, str) for v in value) and len(set(value)) == n:
        return value
    children = value if isinstance(value, list) else list(value.values()) if isinstance(value, dict) else []
    for child in children:
        if (found := _names_in(child, n)) is not None:
            return found
    return None


def _as_builtin(node: dict, names: list[str] | None) -> None:
    """Make `node` a dict keyed by `names`, or a tuple when there are none."""
    node["type"], node["context"] = (DICT, json.dumps(names)) if names is not None else (TUPLE, "null")


def _resolve(node: dict, namedtuple_fields: Callable[[], dict[str, list[str]]]) -> None:
    for child in node["children_spec"]:
        _resolve(child, namedtuple_fields)
    kind, context, n = node["type"], node["context"], len(node["children_spec"])
    if kind is None:
        return
    if kind == NAMEDTUPLE:
        if context not in pytree.SERIALIZED_TYPE_TO_PYTHON_TYPE and not _register(context):
            fields = namedtuple_fields().get(context)
            _as_builtin(node, fields if fields is not None and len(fields) == n else None)
        return
    context = _parse(context)
    if kind not in pytree.SERIALIZED_TYPE_TO_PYTHON_TYPE and not _register(kind):
        _as_builtin(node, _names_in(context, n))


def readable(serialized: str, namedtuple_fields: Callable[[], dict[str, list[str]]]) -> str:
    """`serialized` (a `treespec_dumps` string) with every container this process can rebuild."""
    protocol, root = json.loads(serialized)
    _resolve(root, namedtuple_fields)
    return json.dumps([protocol, root])


def _namedtuple_fields(path: Path) -> dict[str, list[str]]:
    """The field names of the namedtuples the archive's programs return, by serialized type name."""
    fields: dict[str, list[str]] = {}
    with zipfile.ZipFile(path) as z:
        for name in z.namelist():
            if "/models/" in name and name.endswith(".json"):
                program = json.loads(z.read(name))
                for type_name, spec in program["graph_module"].get("treespec_namedtuple_fields", {}).items():
                    fields[type_name] = list(spec["field_names"])
    return fields


@contextlib.contextmanager
def reading_specs(path: Path):
    """While torch.export.load reads `path`, its specs go through `readable`."""
    from torch._export.serde import serialize

    real = serialize.treespec_loads
    fields = functools.cache(lambda: _namedtuple_fields(path))
    serialize.treespec_loads = lambda serialized: real(readable(serialized, fields))
    try:
        yield
    finally:
        serialize.treespec_loads = real
