"""ONNX Runtime backend: lower each program with torch's dynamo ONNX exporter, run it with ORT.

The ONNX graph's inputs keep the program's input names; its outputs are renamed to the
program's output names (`logits`, `present_key_0`, ...) so engines are driven by name.
"""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Callable

import numpy as np
import onnx_ir.passes.common as ir_passes
import torch

from skimformer.backends.onnx_cleanup import clean_up
from skimformer.backends.onnx_decompose import decompose_only_when_needed
from skimformer.backends.onnx_promote import promote_only_when_needed
from skimformer.backends.ort_kernels import contrib, onnx_rules, select_graph_kernels
from skimformer.backends.quiet import quiet
from skimformer.errors import UserError
from skimformer.ir import Program
from skimformer.kernels import decompositions

NAME = "onnxruntime"
SUFFIX = ".onnx"
FORKS = True  # programs lower in forked processes side by side (`backends.forked`): pure CPU work
# ONNX names every value once: an output named like an input (the `attention_mask` a pruned
# prefill returns) is stored under this suffix and read back under its own name.
SAME_AS_INPUT = ":output"


def _quiet():
    return quiet(("torch.onnx", "onnxscript", "onnx_ir", "torch.export", "onnxruntime.quantization.matmul_nbits_quantizer"))


WEIGHTS = {"int8": 8, "int4": 4}
WEIGHT_BLOCK = 32  # weights per quantization scale, as ONNX Runtime's LLM builder uses on CPU
QUANTIZED_OPS = {8: ("MatMul",), 4: ("MatMul", "Gather")}


PROVIDERS = {"cuda": "CUDAExecutionProvider", "cpu": "CPUExecutionProvider"}


def require(portable: bool = False, weights: str | None = None, provider: str = "auto", **unknown) -> None:
    """Refuse options this backend does not have before any work is done."""
    if unknown:
        raise UserError(f"the onnxruntime backend has no option {', '.join(unknown)}: it takes portable, weights "
                        "and provider")
    if weights is not None and weights not in WEIGHTS:
        raise UserError(f"--weights {weights} is not a weight format: use {' or '.join(WEIGHTS)}")
    execution_providers(provider)


def execution_providers(provider: str = "auto") -> list[str]:
    """ONNX Runtime's providers for `provider`: `auto` takes CUDA when onnxruntime-gpu offers it."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    if provider == "auto":
        return [PROVIDERS["cuda"], PROVIDERS["cpu"]] if PROVIDERS["cuda"] in available else [PROVIDERS["cpu"]]
    if provider not in PROVIDERS:
        raise UserError(f"--provider {provider} is not an execution provider: use auto, {' or '.join(PROVIDERS)}")
    if PROVIDERS[provider] not in available:
        raise UserError(f"--provider {provider}: this ONNX Runtime has no {PROVIDERS[provider]} (it has "
                        f"{', '.join(available)}); install onnxruntime-gpu for cuda")
    return [PROVIDERS[provider], PROVIDERS["cpu"]]


def runner_options(backend_options: dict) -> dict:
    """What an engine's Runner takes from the options it was built with."""
    return {"provider": backend_options.get("provider", "auto")}


def lossy(weights: str | None = None, **_) -> bool:
    """Whether engines built with these options approximate their programs (quantized weights)."""
    return weights is not None


def lower(program: Program, path: Path, portable: bool = False, weights: str | None = None, provider: str = "auto") -> None:
    """Write `program` as an ONNX model at `path`: with ONNX Runtime's fused kernels selected,
    or in standard ONNX alone when `portable`; with matmul weights quantized to `weights`."""
    lowered, translations = program, None
    if not portable:
        lowered = select_graph_kernels(program)
        translations = contrib.translations()
    export_onnx(program, lowered.ep, path, translations, None if portable else onnx_rules.apply)
    if weights is not None:
        quantize_weights(path, WEIGHTS[weights])
    return {external_data(path): "weights (ONNX external data)"}


def external_data(path: Path) -> str:
    """The file beside an engine that holds its weights: kept apart from the graph, so reading
    the graph (`_cache_in_place`, tools) does not parse hundreds of megabytes."""
    return path.name + ".data"


def quantize_weights(path: Path, bits: int) -> None:
    """Quantize every matmul with a constant weight to `MatMulNBits` (blockwise, symmetric) with
    ONNX Runtime's own quantizer; `accuracy_level=4` lets its CPU kernel compute in int8. At 4
    bits the embedding tables' lookups too (`GatherBlockQuantized`, which takes 4 bits only):
    SmolLM2's table is 113 of its 190 MB of int4 weights otherwise."""
    import logging

    import onnx

    root = logging.getLogger()
    level, handlers = root.level, list(root.handlers)
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    root.setLevel(level)  # the quantizer's module configures the root logger at INFO when imported
    root.handlers[:] = handlers
    model = onnx.load(str(path))
    _fold_weight_transposes(model.graph)
    _gemms_as_matmuls(model.graph)
    with _quiet():
        quantizer = MatMulNBitsQuantizer(model, bits=bits, block_size=WEIGHT_BLOCK, is_symmetric=True,
                                         accuracy_level=4, op_types_to_quantize=QUANTIZED_OPS[bits])
        quantizer.process()
    (path.parent / external_data(path)).unlink()  # onnx.save appends to an existing data file
    onnx.save(quantizer.model.model, str(path), save_as_external_data=True, location=external_data(path))


def _fold_weight_transposes(graph) -> None:
    """Give every MatMul that reads a transposed weight (a tied LM head: the embedding table,
    `Transpose`d) the transposed weight as a constant of its own, which the quantizer takes
    (it quantizes only constant weights). The float table stays for the embedding's lookup."""
    initializers = {i.name: i for i in graph.initializer}
    producers = {out: node for node in graph.node for out in node.output}
    for node in graph.node:
        transpose = producers.get(node.input[1]) if node.op_type == "MatMul" and len(node.input) == 2 else None
        if transpose is None or transpose.op_type != "Transpose" or transpose.input[0] not in initializers:
            continue
        perm = next((list(a.ints) for a in transpose.attribute if a.name == "perm"), [1, 0])
        if len(initializers[transpose.input[0]].dims) != 2 or perm != [1, 0]:
            continue
        node.input[1] = _transposed_initializer(graph, initializers[transpose.input[0]])
    used = {name for node in graph.node for name in node.input} | {value.name for value in graph.output}
    for node in [n for n in graph.node if n.op_type == "Transpose" and not set(n.output) & used]:
        graph.node.remove(node)


def _transposed_initializer(graph, weight) -> str:
    """The name of a new initializer of `graph` holding the 2-D `weight` transposed."""
    from onnx import numpy_helper

    transposed = numpy_helper.from_array(numpy_helper.to_array(weight).T.copy(), name=f"{weight.name}_transposed")
    graph.initializer.append(transposed)
    return transposed.name


def _gemms_as_matmuls(graph) -> None:
    """Write every `Gemm` of a constant weight (GPT-2's `Conv1D` projections, 2-D inputs) as a
    MatMul of that weight (transposed where the Gemm transposes it) plus its bias: the quantizer
    takes MatMuls only, and these are most of such a model's weights."""
    import onnx

    initializers = {i.name: i for i in graph.initializer}
    for index, node in reversed(list(enumerate(graph.node))):
        attributes = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        if (node.op_type != "Gemm" or len(node.input) < 2 or node.input[1] not in initializers
                or attributes.get("transA", 0) or attributes.get("alpha", 1.0) != 1.0
                or attributes.get("beta", 1.0) != 1.0):
            continue
        weight_name = (_transposed_initializer(graph, initializers[node.input[1]]) if attributes.get("transB", 0)
                       else node.input[1])
        biased = len(node.input) > 2 and node.input[2]
        product = f"{node.output[0]}_matmul" if biased else node.output[0]
        replacement = [onnx.helper.make_node("MatMul", [node.input[0], weight_name], [product], name=f"{node.name}_matmul")]
        if biased:
            replacement.append(onnx.helper.make_node("Add", [product, node.input[2]], [node.output[0]],
                                                     name=f"{node.name}_bias"))
        graph.node.remove(node)
        for offset, new in enumerate(replacement):
            graph.node.insert(index + offset, new)


def export_onnx(program: Program, ep: torch.export.ExportedProgram, path: Path, translations: dict | None = None,
                rewrite: Callable | None = None) -> None:
    """Write `ep` (the program, or a lowered form of it) as ONNX named like the program;
    `translations` map ops to onnxscript functions of their own (custom nodes), and `rewrite`
    edits the exported `onnx_ir` model before it is saved."""
    with _quiet(), _skim_ops_decomposed(translations or {}), decompose_only_when_needed(), promote_only_when_needed():
        onnx_program = torch.onnx.export(ep, (), dynamo=True, verbose=False, optimize=False,
                                         custom_translation_table=translations)
        clean_up(onnx_program.model)
    if translations:  # named as the program the exporter translated: it decomposes `ep`, which renames nodes
        _type_untyped_values(onnx_program.model, onnx_program.exported_program)
    outputs = onnx_program.model.graph.outputs
    inputs = set(program.input_names)
    for value, name in zip(outputs, program.output_names):
        value.name = name + SAME_AS_INPUT if name in inputs else name
    if rewrite is not None:
        rewrite(onnx_program.model)
        # values a rule adds are named by a counter that does not know the initializers lifted
        # from an exit's subgraphs: names can collide
        ir_passes.NameFixPass()(onnx_program.model)
    with _quiet():
        onnx_program.save(str(path), external_data=True)


@contextlib.contextmanager
def _skim_ops_decomposed(translations: dict):
    """Let the exporter's own decomposition turn skim ops into ATen (ops with a translation of
    their own stay whole): it decomposes with torch's global table, and tracing the program a
    second time for a decomposition of ours would double the build's slowest step."""
    from torch._decomp import decomposition_table

    added = {op: fn for op, fn in decompositions().items() if op not in translations and op not in decomposition_table}
    decomposition_table.update(added)
    try:
        yield
    finally:
        for op in added:
            del decomposition_table[op]


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

    def __init__(self, path: Path, threads: int | None = None, provider: str = "auto"):
        import onnx
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or torch.get_num_threads()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3
        self.session = ort.InferenceSession(str(path), options, providers=execution_providers(provider))
        self.provider = self.session.get_providers()[0]
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name.removesuffix(SAME_AS_INPUT) for o in self.session.get_outputs()]
        graph = onnx.load(str(path), load_external_data=False).graph
        self.in_place_cache = _cache_in_place(graph)
        self.position_limit = _position_limit(graph)

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        feeds = {name: np.ascontiguousarray(inputs[name]) for name in self.input_names}
        return dict(zip(self.output_names, self.session.run(None, feeds)))


def _cache_in_place(graph) -> bool:
    """Whether every `past_*` input is read only by GroupQueryAttention (or for its batch size)
    and every `present_*` output is what one writes, so that a buffer larger than the tokens it
    holds can be bound to both and updated in place (a cache the program gathers from the grown
    one, a window or an eviction, is a new, shorter tensor every step)."""
    past = {i.name for i in graph.input if i.name.startswith("past_")}
    written = {name for node in graph.node if node.op_type == "GroupQueryAttention" for name in node.output[1:3]}
    if not past or not {o.name for o in graph.output if o.name.startswith("present_")} <= written:
        return False
    for node in graph.node:
        for name in past.intersection(node.input):
            batch_size = node.op_type == "Shape" and {a.name: a.i for a in node.attribute} == {"start": 0, "end": 1}
            if not (batch_size or (node.op_type == "GroupQueryAttention" and list(node.input).index(name) in (3, 4))):
                return False
    return True


def _position_limit(graph) -> int | None:
    """The positions a GroupQueryAttention with the rotary embedding inside can rotate at: its
    tables' rows (ONNX Runtime refuses a later position), or None where no kernel rotates."""
    rows = {table.name: table.dims[0] for table in graph.initializer if table.dims}
    tables = [node.input[7] for node in graph.node if node.op_type == "GroupQueryAttention" and len(node.input) > 7]
    return min((rows[t] for t in tables if t in rows), default=None)


def position_limit(runners: dict[str, Runner]) -> int | None:
    """The first position an engine's programs cannot take (None: no limit of the engine's own)."""
    return min((r.position_limit for r in runners.values() if r.position_limit), default=None)


def decoding_cache(prefill: Runner, decode: Runner, max_new_tokens: int):
    """The cache `generate` keeps between steps: in place when the decode engine allows it."""
    from skimformer.backends.ort_cache import InPlaceCache

    return InPlaceCache(prefill, decode, max_new_tokens) if decode.in_place_cache else None
