"""Kernel selection for the ONNX Runtime backend: replace regions of a program with ONNX Runtime's
fused contrib kernels, one small rule per kernel.

Selection is a lowering step of this backend, not a pass: the program the other backends see is
untouched, and the engine is checked against the original program by the build's parity test.
Rules that work on the FX graph (attention with its cache) use what `ir` knows; rules for
element-wise regions (residual + norm) run on the exported ONNX graph.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from skimformer.backends.ort_kernels.attention import fuse_cache_attention
from skimformer.ir import Program
from skimformer.ir.rewrite import eliminate_dead_code, reexport


@dataclass
class Selection:
    """What kernel selection did to one program."""

    attention_layers: int = 0
    skipped: list[str] = field(default_factory=list)
    onnx_fusions: dict[str, int] = field(default_factory=dict)

    def to_json(self) -> dict:
        return {"group_query_attention": self.attention_layers, **self.onnx_fusions,
                **({"not_fused": self.skipped} if self.skipped else {})}


def select_graph_kernels(program: Program) -> tuple[Program, Selection]:
    """The program with the FX-level rules applied (re-exported when anything changed)."""
    module = program.ep.module()
    fused, skipped = fuse_cache_attention(module)
    selection = Selection(attention_layers=fused, skipped=skipped)
    if not fused:
        return program, selection
    eliminate_dead_code(module.graph)
    return reexport(program, module), selection
