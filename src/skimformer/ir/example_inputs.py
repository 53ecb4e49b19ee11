"""Example inputs for a program that was saved without them.

`torch.export.save` keeps the inputs the program was exported with, and `skimformer export`
always stores realistic ones; this is the fallback for other files: sizes from the program's own
shape constraints, token ids inside the embedding table, masks of ones, positions counting up.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import sympy
import torch

from skimformer.ir.graph import op_name

if TYPE_CHECKING:
    from skimformer.ir.program import Program

PREFERRED_SIZE = 4


def _symbol_values(ep) -> dict:
    values = {}
    for sym, bounds in ep.range_constraints.items():
        lower = int(bounds.lower) if bounds.lower.is_finite else 1
        upper = int(bounds.upper) if bounds.upper.is_finite else 1 << 30
        values[sym] = max(lower, min(upper, PREFERRED_SIZE))
    return values


def _concrete(size, values) -> int:
    if isinstance(size, torch.SymInt):
        return int(sympy.sympify(size.node.expr).subs(values))
    return int(size)


def _embedding_rows(node) -> int | None:
    """Rows of the embedding table this integer input indexes, following casts and reshapes."""
    todo, seen = [node], set()
    while todo:
        n = todo.pop()
        for user in n.users:
            if user in seen:
                continue
            seen.add(user)
            if op_name(user) == "embedding" and user.args[1] is n:
                return int(user.args[0].meta["val"].shape[0])
            if op_name(user) in ("to", "_to_copy", "view", "reshape", "flatten", "clone", "contiguous"):
                todo.append(user)
    return None


def synthesize_inputs(program: "Program", seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    values = _symbol_values(program.ep)
    inputs = {}
    for name, node in zip(program.input_names, program.input_nodes()):
        val = node.meta["val"]
        shape = [_concrete(s, values) for s in val.shape]
        if val.dtype.is_floating_point:
            inputs[name] = torch.randn(shape, generator=gen, dtype=val.dtype)
        elif val.dtype == torch.bool or "mask" in name:
            inputs[name] = torch.ones(shape, dtype=val.dtype)
        elif "position" in name and shape:
            inputs[name] = torch.arange(shape[-1], dtype=val.dtype).expand(shape).contiguous()
        elif (rows := _embedding_rows(node)) is not None:
            inputs[name] = torch.randint(0, rows, shape, generator=gen, dtype=val.dtype)
        else:
            inputs[name] = torch.zeros(shape, dtype=val.dtype)
    return inputs
