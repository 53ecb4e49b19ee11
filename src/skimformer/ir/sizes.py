"""Compare tensor sizes without guarding them: the one way every analysis looks at sizes.

A size in an exported graph is an int or a `torch.SymInt` whose symbols live in a shape
environment that the program, its `ep.module()` copies and every pass share. `SymInt == x` is a
`SymBool`, and asking for its truth (`if`, `bool()`, a tuple or `in` comparison) installs a guard
in that environment: on SmolLM2 the decode example's 3 new tokens equal its 3 KV heads, and one
such comparison fixed the token count of the program a pass was meant to leave dynamic. Sizes
here are compared as sympy expressions instead, structurally: `n` and `3` differ even when the
example makes them equal, and nothing is recorded.
"""
from __future__ import annotations

from typing import Iterable

import sympy
import torch


def to_expr(size) -> sympy.Expr:
    """A size as a sympy expression (a SymInt keeps its symbols; nothing is guarded)."""
    if isinstance(size, torch.SymInt):
        return sympy.sympify(size.node.expr)
    if isinstance(size, sympy.Basic):
        return size
    return sympy.Integer(int(size))


def same_size(a, b) -> bool:
    """Whether two sizes are the same expression (a symbolic size never equals a constant)."""
    return to_expr(a) == to_expr(b)


def same_shape(a: Iterable | None, b: Iterable | None) -> bool:
    """Whether two shapes (or None, for a value that is not a tensor) have the same sizes."""
    if a is None or b is None:
        return a is None and b is None
    a, b = tuple(a), tuple(b)
    return len(a) == len(b) and all(same_size(x, y) for x, y in zip(a, b))


def same_shape_but(a: Iterable | None, b: Iterable | None, dim: int) -> bool:
    """Whether two shapes have the same rank and sizes, except perhaps along `dim`."""
    if a is None or b is None:
        return False
    a, b = tuple(a), tuple(b)
    return len(a) == len(b) and all(same_size(x, y) for i, (x, y) in enumerate(zip(a, b)) if i != dim)


def divides(a, b) -> bool:
    """True when b / a is a whole number (or a polynomial in the size symbols)."""
    q = sympy.cancel(to_expr(b) / to_expr(a))
    if q.is_Integer:
        return bool(q > 0)
    return sympy.fraction(q)[1] == 1 and not q.is_Rational


def describe_size(size) -> int | str:
    """A size for reports and `inspect`: an int, or the symbolic expression as text (`s15 + s70`)."""
    return str(size) if isinstance(size, torch.SymInt) else int(size)
