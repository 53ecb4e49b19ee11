"""Kernel selection for the ONNX Runtime backend: replace regions of a program with ONNX Runtime's
fused contrib kernels, one small rule per kernel.

Selection is a lowering step of this backend, not a pass: the program the other backends see is
untouched, and the engine is checked against the original program by the build's parity test.
Rules that work on the FX graph (attention with its cache) use what `ir` knows; rules for
element-wise regions (residual + norm) run on the exported ONNX graph.
"""
from __future__ import annotations

from skimformer.backends.ort_kernels.attention import fuse_cache_attention
from skimformer.ir import Program
from skimformer.ir.rewrite import eliminate_dead_code, reexport


def select_graph_kernels(program: Program) -> Program:
    """The program with the FX-level rules applied (re-exported when anything changed); layers a
    rule does not fit keep the exporter's ops."""
    module = program.ep.module()
    if not fuse_cache_attention(module):
        return program
    eliminate_dead_code(module.graph)
    return reexport(program, module)
