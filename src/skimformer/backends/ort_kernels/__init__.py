"""Kernel selection for the ONNX Runtime backend: replace regions of a program with ONNX Runtime's
fused contrib kernels, one small rule per kernel.

Selection is a lowering step of this backend, not a pass: the program the other backends see is
untouched, and the engine is checked against the original program by the build's parity test.
Rules that work on the FX graph (attention with its cache) use what `ir` knows; rules for
element-wise regions (residual + norm) run on the exported ONNX graph.
"""
from __future__ import annotations

import copy

import torch
import torch.fx as fx
from torch.export.graph_signature import InputKind, InputSpec, TensorArgument

from skimformer.backends.ort_kernels.attention import fuse_cache_attention
from skimformer.backends.ort_kernels.encoder_attention import fuse_encoder_attention
from skimformer.ir import Program
from skimformer.ir.rewrite import eliminate_dead_code, on_graph


def select_graph_kernels(program: Program) -> Program:
    """The program with the FX-level rules applied; layers a rule does not fit keep the
    exporter's ops. The rules edit a copy of the program's own graph (same weights, shapes
    already known) rather than a module to export again: the exporter traces it once anyway.
    Constants a rule adds (rotary tables) are lifted like the program's own."""
    from skimformer.passes.manager import tolerance

    ep = program.ep
    gm = fx.GraphModule(ep.graph_module, copy.deepcopy(ep.graph))
    specs = ep.graph_signature.input_specs
    first_user = next(i for i, s in enumerate(specs) if s.kind == InputKind.USER_INPUT)
    first_input = [n for n in gm.graph.nodes if n.op == "placeholder"][first_user]  # placeholders follow the specs
    if any(name.startswith("present_") for name in program.output_names):
        fused, constants = fuse_cache_attention(program.module, gm.graph, first_input, tolerance(program.precision))
        fused += _fuse_in_branches(gm, tolerance(program.precision))
    else:
        fused, constants = fuse_encoder_attention(gm.graph), {}
    if not fused:
        return program
    eliminate_dead_code(gm.graph)
    _infer_values(gm.graph, constants)
    gm.recompile()
    added = [InputSpec(kind=InputKind.CONSTANT_TENSOR, arg=TensorArgument(name=name), target=name)
             for name in constants]
    lowered = on_graph(ep, gm, [*specs[:first_user], *added, *specs[first_user:]], constants)
    return program.with_ep(lowered)


def _fuse_in_branches(gm: fx.GraphModule, tolerance: float) -> int:
    """Fuse the decode layers inside exits' branches (`torch.cond` subgraphs: the layers after an
    exit run in one); returns how many were. Each branch is rewritten in a copy, set on `gm` in
    its place: `gm` shares its submodules with the program's own graph module."""
    fused = 0
    for node in gm.graph.nodes:
        if node.target is not torch.ops.higher_order.cond:
            continue
        for branch_node in node.args[1:3]:
            branch = getattr(gm, branch_node.target)
            copied = fx.GraphModule(branch, copy.deepcopy(branch.graph))
            count, _ = fuse_cache_attention(copied, copied.graph, None, tolerance)
            if count:
                eliminate_dead_code(copied.graph)
                _infer_values(copied.graph, {})
                copied.recompile()
                setattr(gm, branch_node.target, copied)
                fused += count
    return fused


def _infer_values(graph: fx.Graph, constants: dict[str, torch.Tensor]) -> None:
    """Give the nodes a rule inserted the fake values export would have traced (their dtypes and
    shapes type the ONNX graph's custom nodes), and the constants' placeholders theirs."""
    from torch._guards import detect_fake_mode

    fake_mode = detect_fake_mode([n.meta["val"] for n in graph.nodes if "val" in n.meta])
    for node in graph.nodes:
        if node.op == "placeholder" and node.name in constants:
            node.meta["val"] = fake_mode.from_tensor(constants[node.name], static_shapes=True)
    with fake_mode:
        for node in graph.nodes:
            if node.op == "call_function" and "val" not in node.meta:
                args, kwargs = fx.node.map_arg((node.args, node.kwargs), lambda n: n.meta["val"])
                node.meta["val"] = node.target(*args, **kwargs)
