"""ONNX Runtime backend: lower each program with torch's dynamo ONNX exporter, run it with ORT.

The ONNX graph's inputs keep the program's input names; its outputs are renamed to the
program's output names (`logits`, `present_key_0`, ...) so engines are driven by name.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from skimformer.backends.quiet import quiet
from skimformer.ir import Program
from skimformer.ir.graph import holds_skim_ops
from skimformer.kernels import decompositions

NAME = "onnxruntime"
SUFFIX = ".onnx"
# ONNX names every value once: an output named like an input (the `attention_mask` a pruned
# prefill returns) is stored under this suffix and read back under its own name.
SAME_AS_INPUT = ":output"


def _quiet():
    return quiet(("torch.onnx", "onnxscript", "torch.export"))


def lower(program: Program, path: Path) -> None:
    """Write `program` as an ONNX model at `path`."""
    ep = program.ep
    if holds_skim_ops(ep):
        ep = ep.run_decompositions(decompositions())  # skim ops become standard ATen, then ONNX
    export_onnx(program, ep, path)


def export_onnx(program: Program, ep: torch.export.ExportedProgram, path: Path, translations: dict | None = None) -> None:
    """Write `ep` (the program, or a lowered form of it) as ONNX named like the program;
    `translations` map ops to onnxscript functions of their own (custom nodes)."""
    with _quiet():
        onnx_program = torch.onnx.export(ep, (), dynamo=True, verbose=False, custom_translation_table=translations)
    if translations:
        _type_untyped_values(onnx_program.model, ep)
    outputs = onnx_program.model.graph.outputs
    inputs = set(program.input_names)
    for value, name in zip(outputs, program.output_names):
        value.name = name + SAME_AS_INPUT if name in inputs else name
    with _quiet():
        onnx_program.save(str(path))


def _type_untyped_values(model, ep: torch.export.ExportedProgram) -> None:
    """Give custom nodes' outputs the dtype and shape torch traced: the exporter types only
    single outputs, and ONNX cannot infer a custom node's."""
    import onnx_ir as ir
    from torch.onnx._internal.exporter._core import _set_shape_type

    traced = {node.name: node.meta.get("val") for module in ep.graph_module.modules()
              if isinstance(module, torch.fx.GraphModule) for node in module.graph.nodes}
    returned = [arg.meta.get("val") if isinstance(arg, torch.fx.Node) else None
                for arg in ep.graph.output_node().args[0]]
    values = [(v, traced.get(v.name)) for node in ir.traversal.RecursiveGraphIterator(model.graph) for v in node.outputs]
    for value, val in [*zip(model.graph.outputs, returned), *values]:  # outputs are named after the program's
        if value.dtype is None and isinstance(val, torch.Tensor):
            _set_shape_type(value, val, complex_to_float=False)


class Runner:
    """One ONNX Runtime session, fed and read by name."""

    def __init__(self, path: Path, threads: int | None = None):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or torch.get_num_threads()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name.removesuffix(SAME_AS_INPUT) for o in self.session.get_outputs()]

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        feeds = {name: np.ascontiguousarray(inputs[name]) for name in self.input_names}
        return dict(zip(self.output_names, self.session.run(None, feeds)))
