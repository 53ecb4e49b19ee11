"""What inputs an engine's program takes, checked before it runs.

ONNX Runtime and AOTInductor check little of what they are fed: a tome engine given fewer tokens
than it merges computes garbage without a word. The manifest records each program's inputs
(names, dtypes, shapes whose sizes are ints, symbols such as `s53`, or expressions such as
`s15 + s70`, a decode step's mask over the past and the new tokens) and the range each symbol
may take (`sizes`, from `Program.size_ranges`). `Signature.check` refuses anything else with one
line; `Signature.another_shape` derives a second input the program takes, for the build's parity
check at another size.
"""
from __future__ import annotations

import numpy as np
import sympy

from skimformer.errors import UserError


def _dtype(name: str) -> np.dtype | None:
    """The numpy dtype of a manifest dtype; None for one numpy cannot hold (bfloat16), left unchecked."""
    try:
        return np.dtype(name)
    except TypeError:
        return None


def _size(text: int | str) -> int | str | sympy.Expr:
    """A manifest size: an int, a symbol's name, or an expression of symbols."""
    if isinstance(text, int):
        return text
    expr = sympy.sympify(text)
    return text if expr.is_Symbol else expr


def _shape_text(sizes: list) -> str:
    return "[" + ", ".join(str(s) for s in sizes) + "]"


def _span(bounds: dict) -> str:
    return f"at least {bounds['min']}" if bounds["max"] is None else f"{bounds['min']} to {bounds['max']}"


class Signature:
    """One program's inputs as the manifest records them."""

    def __init__(self, role: str, inputs: list[dict], sizes: dict[str, dict]):
        self.role = role
        self.names = [spec["name"] for spec in inputs]
        self.inputs = {spec["name"]: (_dtype(spec["dtype"]), [_size(s) for s in spec["shape"]]) for spec in inputs}
        self.sizes = sizes
        self.expressions = [(name, d, size) for name, (_, shape) in self.inputs.items()
                            for d, size in enumerate(shape) if isinstance(size, sympy.Expr)]

    @classmethod
    def of(cls, role: str, program: dict) -> "Signature":
        """From the manifest's `programs[role]` (folders built before `sizes` was recorded check no ranges)."""
        return cls(role, program["inputs"], program.get("sizes", {}))

    def check(self, inputs: dict[str, np.ndarray]) -> None:
        """Refuse (UserError, one line) inputs the program does not take: missing or unknown
        names, another dtype or rank, a fixed size, one symbol with two sizes, a size outside
        its symbol's range, or an expression of sizes that the others do not give."""
        missing = [n for n in self.names if n not in inputs]
        if missing:
            raise UserError(f"inputs are missing {', '.join(missing)}; the {self.role} program takes {', '.join(self.names)}")
        unknown = [n for n in inputs if n not in self.inputs]
        if unknown:
            raise UserError(f"the {self.role} program takes no input {', '.join(unknown)}: drop it "
                            f"(it takes {', '.join(self.names)})")
        seen = {}  # symbol -> (size, input, dimension)
        for name, (dtype, shape) in self.inputs.items():
            array = inputs[name]
            dtype = array.dtype if dtype is None else dtype
            if array.dtype != dtype or array.ndim != len(shape):
                raise UserError(f"input {name} must be {dtype} with {len(shape)} dimensions, not "
                                f"{array.dtype} with shape {list(array.shape)}: convert it (this engine takes "
                                f"{_shape_text(shape)})")
            for d, (want, size) in enumerate(zip(shape, array.shape)):
                if isinstance(want, int) and size != want:
                    raise UserError(f"input {name} has shape {list(array.shape)}, but this engine takes "
                                    f"{_shape_text(shape)}: its dimension {d} is fixed at {want}")
                if isinstance(want, str):
                    self._bind(seen, want, size, name, d)
        for name, d, expr in self.expressions:
            self._check_expression(seen, name, d, expr, inputs[name].shape[d])

    def _bind(self, seen: dict, symbol: str, size: int, name: str, d: int) -> None:
        """Give `symbol` the size of dimension `d` of input `name`, in its range and the same everywhere."""
        if symbol in seen:
            first, other, od = seen[symbol]
            if size != first:
                raise UserError(f"input {name} has {size} along dimension {d}, but input {other} has {first} "
                                f"along dimension {od}: this engine needs them equal (both are size {symbol})")
            return
        seen[symbol] = (size, name, d)
        bounds = self.sizes.get(symbol)
        if bounds is None:
            return
        if size < bounds["min"]:
            raise UserError(f"input {name} has {size} along dimension {d}, but this engine needs at least "
                            f"{bounds['min']} there (size {symbol} takes {_span(bounds)}): give a longer input")
        if bounds["max"] is not None and size > bounds["max"]:
            raise UserError(f"input {name} has {size} along dimension {d}, but this engine takes at most "
                            f"{bounds['max']} there (size {symbol} takes {_span(bounds)}): give a shorter input")

    @staticmethod
    def _check_expression(seen: dict, name: str, d: int, expr: sympy.Expr, size: int) -> None:
        """A size given by an expression (a mask over `past + n`) must equal its value at the
        other inputs' sizes; one whose symbols no input gives alone is left unchecked."""
        want = _evaluate(expr, {s: v[0] for s, v in seen.items()})
        if want is not None and size != want:
            raise UserError(f"input {name} has {size} along dimension {d}, but the other inputs' sizes make it "
                            f"{expr} = {want}: give sizes that agree")

    def another_shape(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray] | None:
        """Inputs of another shape that the program takes, derived from `inputs` (which it takes),
        or None when no size may change. The batch (the symbols that open the inputs' shapes)
        grows by a copy of the first row, which adds no padding; the token count (`_tokens`)
        loses its last token, or, at its minimum, repeats it. Sizes given by an expression
        follow: a decode step's mask, `past + n`, loses its last column with the step's last
        token, and the past stays as it is."""
        now = {size: inputs[name].shape[d] for name, (_, shape) in self.inputs.items()
               for d, size in enumerate(shape) if isinstance(size, str)}
        batch = {shape[0] for _, shape in self.inputs.values() if shape and isinstance(shape[0], str)}
        new = {**now, **{s: self._moved(s, now[s], 1) for s in batch},
               **{s: self._moved(s, now[s], -1) for s in self._tokens(batch, set(now))}}
        if new == now:
            return None
        return {name: _resized(inputs[name], [_evaluate(sympy.sympify(s), new) for s in shape])
                for name, (_, shape) in self.inputs.items()}

    def _tokens(self, batch: set[str], symbols: set[str]) -> set[str]:
        """The token count: the symbols of the first input's sizes after the batch, while every
        other symbol is tied to them by an expression (a decode step's past, in its mask
        `past + n`). A symbol standing alone may hide a relation the ranges do not record (a
        re-exported decode step gives its mask a symbol of its own), so then none."""
        tokens = {s for s in self.inputs[self.names[0]][1][1:] if isinstance(s, str)} - batch
        tied = {s.name for _, _, expr in self.expressions if tokens & {t.name for t in expr.free_symbols}
                for s in expr.free_symbols}
        return tokens if symbols - batch - tokens <= tied else set()

    def _moved(self, symbol: str, size: int, step: int) -> int:
        """`size + step`, else `size - step`, whichever the symbol's range allows first (at least 1); else `size`."""
        bounds = self.sizes.get(symbol, {"min": 0, "max": None})
        for candidate in (size + step, size - step):
            if max(bounds["min"], 1) <= candidate and (bounds["max"] is None or candidate <= bounds["max"]):
                return candidate
        return size


def _evaluate(expr: sympy.Expr, sizes: dict[str, int]) -> int | None:
    """A size expression's value at the symbols' `sizes`; None when some symbol has none."""
    value = expr.xreplace({s: sympy.Integer(sizes[s.name]) for s in expr.free_symbols if s.name in sizes})
    return int(value) if value.is_Integer else None


def _resized(array: np.ndarray, sizes: list[int | None]) -> np.ndarray:
    """`array` cut to `sizes` (keeping the leading entries), or grown: rows by copies of the
    leading rows, other dimensions by repeating their last entry; None keeps a size."""
    for d, size in enumerate(sizes):
        have = array.shape[d]
        if size is not None and size != have:
            index = np.arange(size) % have if d == 0 else np.minimum(np.arange(size), have - 1)
            array = np.take(array, index, axis=d)
    return array
