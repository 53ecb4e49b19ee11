"""Pipelines as text or YAML, parsed into `(pass class, typed config)` steps.

Text grammar (DESIGN.md): `tome(r=8); kv-quant(bits=4, group=32)`. Values are ints, floats,
`true`/`false`, `none`, lists `[a, b]`, quoted or bare strings. YAML: a list under `passes:`
whose items are `name`, `{name: {field: value}}` or `{name: NAME, field: value}`.
"""
from __future__ import annotations

import dataclasses
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

from skimformer.errors import UserError
from skimformer.passes.base import Pass
from skimformer.passes.registry import get_pass

Step = tuple[type[Pass], Any]
NAME = re.compile(r"^[A-Za-z][\w-]*$")


def _split_top(text: str, sep: str) -> list[str]:
    """Split on `sep` outside brackets, parentheses and quotes."""
    parts, depth, quote, cur = [], 0, None, []
    for ch in text:
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "([":
            depth += 1
        elif ch in ")]":
            depth -= 1
            if depth < 0:
                raise UserError(f"bad pipeline {text!r}: unbalanced '{ch}'")
        elif ch == sep and depth == 0:
            parts.append("".join(cur))
            cur = []
            continue
        cur.append(ch)
    if depth or quote:
        raise UserError(f"bad pipeline {text!r}: unclosed bracket or quote")
    parts.append("".join(cur))
    return parts


def parse_value(text: str) -> Any:
    text = text.strip()
    if not text:
        raise UserError("bad pipeline: a field has no value (write field=value)")
    if text.startswith("["):
        if not text.endswith("]"):
            raise UserError(f"bad pipeline value {text!r}: a list is written [a, b]")
        inner = text[1:-1].strip()
        return [parse_value(p) for p in _split_top(inner, ",")] if inner else []
    if text[0] in "'\"" and text[-1] == text[0] and len(text) >= 2:
        return text[1:-1]
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    if low in ("none", "null"):
        return None
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def parse_text(spec: str) -> list[tuple[str, dict]]:
    """`"a(x=1); b"` -> `[("a", {"x": 1}), ("b", {})]`."""
    steps = []
    for raw in _split_top(spec, ";"):
        raw = raw.strip()
        if not raw:
            continue
        m = re.match(r"^([^()]+?)\s*(?:\((.*)\))?\s*$", raw, re.S)
        if not m or not NAME.match(m.group(1).strip()):
            raise UserError(f"bad pipeline step {raw!r}: write name(field=value, ...)")
        fields = {}
        for item in _split_top(m.group(2) or "", ","):
            if not item.strip():
                continue
            if "=" not in item:
                raise UserError(f"bad pipeline step {raw!r}: {item.strip()!r} is not field=value")
            key, val = item.split("=", 1)
            fields[key.strip()] = parse_value(val)
        steps.append((m.group(1).strip(), fields))
    return steps


def parse_yaml(path: str | Path) -> list[tuple[str, dict]]:
    try:
        data = yaml.safe_load(Path(path).read_text())
    except FileNotFoundError:
        raise UserError(f"{path}: no such config file") from None
    except yaml.YAMLError as e:
        raise UserError(f"{path} is not valid YAML: {str(e).splitlines()[0]}") from None
    items = data.get("passes") if isinstance(data, dict) else data
    if not isinstance(items, list):
        raise UserError(f"{path}: expected a list of passes under 'passes:'")
    steps = []
    for item in items:
        if isinstance(item, str):
            steps.append((item, {}))
        elif isinstance(item, dict) and "name" in item:
            steps.append((str(item["name"]), {k: v for k, v in item.items() if k != "name"}))
        elif isinstance(item, dict) and len(item) == 1:
            (name, fields), = item.items()
            steps.append((str(name), dict(fields or {})))
        else:
            raise UserError(f"{path}: cannot read pass entry {item!r}; write '- name' or '- name: {{field: value}}'")
    return steps


def _coerce(pass_name: str, field: str, value: Any, hint: Any) -> Any:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    where = f"{pass_name}({field}=...)"
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for option in (a for a in args if a is not type(None)):
            try:
                return _coerce(pass_name, field, value, option)
            except UserError as e:
                errors.append(str(e))
        raise UserError(errors[0] if errors else f"{where}: bad value {value!r}")
    if origin is Literal:
        if value not in args:
            raise UserError(f"{where}: {value!r} is not one of {', '.join(map(str, args))}")
        return value
    if origin is list:
        items = value if isinstance(value, list) else [value]
        return [_coerce(pass_name, field, v, args[0] if args else Any) for v in items]
    if hint is bool:
        if not isinstance(value, bool):
            raise UserError(f"{where}: expected true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise UserError(f"{where}: expected an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise UserError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise UserError(f"{where}: expected a word, got {value!r}")
        return str(value)
    return value


def build_config(cls: type[Pass], fields: dict) -> Any:
    """A validated config instance; unknown fields and bad values are refused with the valid ones."""
    hints = typing.get_type_hints(cls.Config)
    valid = [f.name for f in dataclasses.fields(cls.Config)]
    for key in fields:
        if key not in valid:
            listing = ", ".join(valid) if valid else "none"
            raise UserError(f"pass {cls.name} has no field {key!r}; its fields: {listing}")
    values = {k: _coerce(cls.name, k, v, hints[k]) for k, v in fields.items()}
    try:
        return cls.Config(**values)
    except (ValueError, TypeError) as e:
        raise UserError(f"pass {cls.name}: {e}") from None


def build_pipeline(steps: list[tuple[str, dict]]) -> list[Step]:
    return [(get_pass(name), build_config(get_pass(name), fields)) for name, fields in steps]


def pipeline_from(passes: str | None = None, config_file: str | Path | None = None) -> list[Step]:
    if passes and config_file:
        raise UserError("give either --passes or --config, not both")
    if config_file:
        return build_pipeline(parse_yaml(config_file))
    return build_pipeline(parse_text(passes or ""))


def config_dict(config: Any) -> dict:
    return dataclasses.asdict(config) if dataclasses.is_dataclass(config) else {}
