"""MLIR backend: torch-mlir's FX importer writes each program as MLIR text (`torch`,
`linalg-on-tensors` or `stablehlo`), IREE compiles that text for this machine's CPU (`llvm-cpu`)
into a `.vmfb` module, and the Runner runs the module with `iree.runtime`.

Beside `ROLE.vmfb` each program leaves `ROLE.mlir` (the text IREE compiled) and `ROLE.io.json`
(the module's input and output names and dtypes, in order: the compiled function's arguments and
results are positional, and the engine drives programs by name).

What the toolchain takes (torch-mlir 20261001, IREE 3.13), and what is refused with a UserError
rather than built wrong:
- `torch`: static and dynamic shapes (IREE lowers the torch dialect itself).
- `linalg-on-tensors`: static and dynamic shapes, provided `aten.linear` and `aten.matmul` reach
  torch-mlir whole: their ATen decomposition flattens `[B, N, C]` to `[B * N, C]`, and
  torch-mlir lowers a view that merges two dynamic dimensions as if the second were 1
  (llvm/torch-mlir#3852, #4743), which IREE's module then refuses at any other length.
- `stablehlo`: static shapes only. IREE legalizes none of StableHLO's dynamic broadcasts and
  reshapes, so a program with dynamic inputs is refused before import; and IREE rejects the
  top-k that torch-mlir writes (int64 indices where it infers int32), so token passes fail to
  compile there (a UserError that names another dialect).
- `torch.cond` (the exit passes): imported as `torch.prim.If` by `mlir_cond`, which torch-mlir's
  importer lacks; other higher-order ops it cannot import are refused by name.
- A KV pass's cache selection inside an exit pass's branch (`kv-window` or `kv-evict`, then an
  exit pass): IREE 3.13 returns wrong selected keys from the branch that runs every block (values
  and logits right), in both dialects; refused (`_refuse_cache_selection_in_branches`).
- IREE's sort is fragile on the CPU: the decomposed graph is repaired where that is exact (see
  `_decomposed`), kv-evict's selection is decomposed without a sort (`MLIR_DECOMPOSITIONS`), and
  a program that still sorts several tensors of one shape is refused (iree-org/iree#24665).
f64 stays f64: IREE demotes it to f32 by default, which changes what a program computes (the
references rank in f64 to break ties exactly).
"""
from __future__ import annotations

import json
import operator
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from torch.export import ExportedProgram
from torch.export.graph_signature import OutputKind, OutputSpec, TensorArgument

from skimformer.backends.mlir_cond import install_cond_import, select_constant_results
from skimformer.backends.mlir_dialects import DEFAULT_DIALECT, MLIR_DIALECTS
from skimformer.errors import UserError
from skimformer.ir import Program
from skimformer.ir.graph import program_graphs
from skimformer.kernels import decompositions
from skimformer.kernels.evict import kv_select_by_counting
from skimformer.kernels.tokens import gather_tokens_by_expanded_index

NAME = "mlir"
SUFFIX = ".vmfb"
INSTALL = "pip install 'skimformer[mlir]'"
ENTRY = "main"  # the function torch-mlir writes and the Runner calls
# IREE's input conversion for each dialect; `auto` also takes the tm_tensor ops (sort, scatter)
# that torch-mlir's linalg-on-tensors output holds beside linalg.
IREE_INPUT = {"torch": "torch", "linalg-on-tensors": "auto", "stablehlo": "stablehlo"}
# Code for this machine's CPU (as AOTInductor's is); f64 kept (module docstring), with the VM's f64 ops.
IREE_FLAGS = ["--iree-llvmcpu-target-cpu=host", "--iree-input-demote-f64-to-f32=false",
              "--iree-vm-target-extension-f64"]
KEPT_WHOLE = (torch.ops.aten.linear.default, torch.ops.aten.matmul.default)  # linalg-on-tensors, above
# Python functions on symbolic sizes that the importer does not take, and the ops it does.
SYMBOLIC_SIZE_OPS = {torch.sym_max: torch.ops.prim.max.int, torch.sym_min: torch.ops.prim.min.int}
# Cache selections that IREE gets wrong inside a branch (module docstring), by the pass inserting each.
SELECTIONS = {torch.ops.skim.kv_gather.default: "kv-evict", torch.ops.skim.window_tokens.default: "kv-window"}
SORTS = (torch.ops.aten.sort.default, torch.ops.aten.sort.stable, torch.ops.aten.topk.default)
ARANGES = (torch.ops.aten.arange.default, torch.ops.aten.arange.start, torch.ops.aten.arange.start_step)
# Skim ops decomposed here otherwise than by their references: kv-evict's selection without a sort
# (one per layer of one shape trips iree-org/iree#24665), token gathers as one aten.gather
# (torch-mlir lowers no indexing by tensors at dynamic sizes).
MLIR_DECOMPOSITIONS = {
    torch.ops.skim.kv_select.default: kv_select_by_counting,
    torch.ops.skim.gather_tokens.default: gather_tokens_by_expanded_index,
    torch.ops.skim.restore_tokens.default: gather_tokens_by_expanded_index,
}
MESSAGE_CHARS = 300  # of a tool's diagnostic quoted in an error


def require(dialect: str = DEFAULT_DIALECT, **unknown) -> None:
    """Refuse before any work: an unknown option or dialect, or torch-mlir / IREE missing."""
    if unknown:
        raise UserError(f"the mlir backend takes only the option `dialect`, not {', '.join(unknown)}")
    if dialect not in MLIR_DIALECTS:
        raise UserError(f"unknown MLIR dialect {dialect!r}: choose one of {', '.join(MLIR_DIALECTS)}")
    try:
        import iree.compiler  # noqa: F401
        import iree.runtime  # noqa: F401
        import torch_mlir  # noqa: F401
    except ImportError as e:
        raise UserError(f"the mlir backend needs torch-mlir and IREE, and {e.name} is not installed: {INSTALL}") from None


def io_file(path: Path) -> Path:
    return Path(path).with_suffix(".io.json")


def lower(program: Program, path: Path, dialect: str = DEFAULT_DIALECT) -> dict[str, str]:
    """Write `program` as MLIR text in `dialect` beside `path`, and IREE's module of it at `path`."""
    path, role = Path(path), program.role
    if dialect == "stablehlo" and _has_dynamic_inputs(program):
        raise UserError(f"the {role} program has dynamic shapes and IREE compiles StableHLO with static shapes only: "
                        "choose --mlir-dialect torch or linalg-on-tensors, or export the model with --static")
    _refuse_cache_selection_in_branches(program, role)
    ep = _decomposed(program)
    _refuse_control_flow(ep, role)
    _refuse_sorts_of_one_shape(ep, role)
    module = _import(ep, role, dialect)
    text_file = path.with_suffix(".mlir")
    with text_file.open("w") as f:
        module.operation.print(file=f)
    _compile(text_file, path, dialect, role)
    io_file(path).write_text(json.dumps({
        "entry": ENTRY, "dialect": dialect,
        "inputs": [{"name": s["name"], "dtype": s["dtype"]} for s in program.input_specs()],
        "outputs": [{"name": s["name"], "dtype": s["dtype"]} for s in program.output_specs()]}, indent=2))
    return {text_file.name: f"MLIR text ({dialect} dialect) that IREE compiled",
            io_file(path).name: "input and output names and dtypes of the IREE module, in order"}


def _has_dynamic_inputs(program: Program) -> bool:
    return any(isinstance(size, torch.SymInt) for node in program.input_nodes()
               for size in getattr(node.meta.get("val"), "shape", ()))


def _decomposed(program: Program) -> ExportedProgram:
    """The program in the ATen ops torch-mlir takes (skim ops as `MLIR_DECOMPOSITIONS` or their
    references, torch-mlir's own decompositions but `KEPT_WHOLE`), with the repairs below applied
    to its graph and to the graphs of its branches (the exit passes' `torch.cond`)."""
    from torch_mlir.extras.fx_decomp_util import get_decomposition_table

    table = {op: fn for op, fn in get_decomposition_table().items() if op not in KEPT_WHOLE}
    ep = program.ep.run_decompositions({**table, **decompositions(), **MLIR_DECOMPOSITIONS})
    unused = []
    for module in ep.graph_module.modules():
        if isinstance(module, torch.fx.GraphModule):
            found = _repaired(module.graph)
            if module is ep.graph_module:  # a branch keeps its unused results (none in skim's passes)
                unused = found
            module.recompile()
    if unused:
        _return_too(ep, unused)
    select_constant_results(ep)
    return ep


def _repaired(graph: torch.fx.Graph) -> list[torch.fx.Node]:
    """Apply the repairs to one graph; the sorts' unused results, which only the program's own
    graph can return."""
    unused = []
    for node in list(graph.nodes):
        if node.op != "call_function":
            continue
        if node.target in SYMBOLIC_SIZE_OPS:
            node.target = SYMBOLIC_SIZE_OPS[node.target]
        elif node.target is torch.sym_sum:
            _add_in_pairs(graph, node)
        elif node.target in ARANGES and node.meta["val"].dtype.is_floating_point:
            _count_in_integers(graph, node)
        elif node.target in SORTS:
            _sort_a_copy(graph, node)
            unused += _unused_results(graph, node)
    return unused


def _add_in_pairs(graph: torch.fx.Graph, node: torch.fx.Node) -> None:
    """`sym_sum([a, b, ...])` (which the importer does not take) as `a + b + ...`."""
    values = [t.meta["val"] if isinstance(t, torch.fx.Node) else t for t in node.args[0]]
    total = node.args[0][0]
    with graph.inserting_before(node):
        for count, term in enumerate(node.args[0][1:], start=2):
            total = graph.call_function(operator.add, (total, term))
            total.meta["val"] = sum(values[:count])
    node.replace_all_uses_with(total)
    graph.erase_node(node)


def _count_in_integers(graph: torch.fx.Graph, node: torch.fx.Node) -> None:
    """A floating-point `arange` counted in int64, then converted: IREE computes a float range's
    length on its VM, which has no f64-to-integer conversion (kv-evict ranks tokens by f64
    positions). Exact for the integer bounds the references use; others are left alone."""
    integral = all(isinstance(a.meta.get("val") if isinstance(a, torch.fx.Node) else a, (int, torch.SymInt))
                   for a in node.args)
    dtype = node.kwargs.get("dtype")
    if not integral or dtype is None:
        return
    node.kwargs = {**node.kwargs, "dtype": torch.int64}
    real = node.meta["val"]
    node.meta["val"] = real.to(torch.int64)
    node.meta.pop("tensor_meta", None)  # the importer reads it before `val`
    with graph.inserting_after(node):
        converted = graph.call_function(torch.ops.prims.convert_element_type.default, (node, dtype))
    converted.meta["val"] = real
    node.replace_all_uses_with(converted, delete_user_cb=lambda user: user is not converted)


def _sort_a_copy(graph: torch.fx.Graph, node: torch.fx.Node) -> None:
    """A sort or top-k reads a gathered copy of its input: IREE sorts in place, and its CPU code
    generator cannot when the input is a slice of another result with a dynamic size (the first
    k of a top-k, sorted back into token order: prune, kv-window)."""
    x = node.args[0]
    val = x.meta["val"]
    dim = node.normalized_arguments(graph.owning_module, normalize_to_only_use_kwargs=True).kwargs["dim"] % val.dim()
    size = val.shape[dim]
    with graph.inserting_before(node):
        count = size
        if isinstance(size, torch.SymInt):
            count = graph.call_function(torch.ops.aten.sym_size.int, (x, dim))
            count.meta["val"] = size
        index = graph.call_function(torch.ops.aten.arange.default, (count,), {"dtype": torch.int64})
        index.meta["val"] = val.new_empty((size,), dtype=torch.int64)
        copy = graph.call_function(torch.ops.aten.index_select.default, (x, dim, index))
        copy.meta["val"] = val.new_empty(val.shape)
    node.replace_input_with(x, copy)


def _unused_results(graph: torch.fx.Graph, node: torch.fx.Node) -> list[torch.fx.Node]:
    """The results of a sort or top-k that nothing reads (its values, or its indices), taken out:
    left dead, each is a scratch buffer the size of the sorted dimension inside the sort's
    kernel, which IREE's CPU code generator refuses when that size is dynamic (iree-org/iree#24735)."""
    read = {user.args[1] for user in node.users if user.target is operator.getitem}
    taken = []
    for index in sorted({0, 1} - read):
        with graph.inserting_after(node):
            result = graph.call_function(operator.getitem, (node, index))
        result.meta["val"] = node.meta["val"][index]
        taken.append(result)
    return taken


def _return_too(ep: ExportedProgram, extra: list[torch.fx.Node]) -> None:
    """Return `extra` after the program's outputs (the Runner reads only the named ones)."""
    output = ep.graph.output_node()
    output.args = ((*output.args[0], *extra),)
    ep.graph_signature.output_specs.extend(OutputSpec(OutputKind.USER_OUTPUT, TensorArgument(n.name), None)
                                           for n in extra)


def _refuse_sorts_of_one_shape(ep: ExportedProgram, role: str) -> None:
    """IREE 3.13 gives two sorts (or top-ks) of one shape in a module one index buffer, and one of
    them returns wrong indices (iree-org/iree#24665). Refused rather than built wrong."""
    shapes = [str(tuple(node.args[0].meta["val"].shape)) for node in ep.graph.nodes
              if node.op == "call_function" and node.target in SORTS]
    if len(shapes) != len(set(shapes)):
        raise UserError(f"the {role} program sorts several tensors of one shape, which IREE 3.13 miscompiles "
                        "(iree-org/iree#24665): build with --backend onnxruntime")


def _refuse_cache_selection_in_branches(program: Program, role: str) -> None:
    """Refused by the skim ops that select cache tokens (module docstring), before decomposition
    hides which pass inserted them."""
    branches = [graph for graph in program_graphs(program.ep) if graph is not program.ep.graph]
    passes = sorted({SELECTIONS[n.target] for graph in branches for n in graph.nodes if n.target in SELECTIONS})
    if passes:
        raise UserError(f"the {role} program selects cache tokens ({', '.join(passes)}) inside an exit pass's branch, "
                        "which IREE 3.13 computes wrong: build with --backend onnxruntime, or drop one of the passes")


def _refuse_control_flow(ep: ExportedProgram, role: str) -> None:
    """Higher-order ops that the importer cannot take, refused by name. It dispatches each to a
    method `_import_hop_NAME` (`cond`'s is ours), and without one it fails."""
    from torch_mlir.extras.fx_importer import GraphNodeImporter

    install_cond_import()
    for node in ep.graph.nodes:
        target = node.target
        if node.op == "call_function" and isinstance(target, torch._ops.HigherOrderOperator) \
                and not hasattr(GraphNodeImporter, f"_import_hop_{target.name()}"):
            raise UserError(f"the mlir backend cannot lower {target.name()} in the {role} program, "
                            "because torch-mlir does not import it: build with --backend onnxruntime")


def _import(ep: ExportedProgram, role: str, dialect: str):
    """A decomposed program as a torch-mlir module in `dialect`. Imported by the importer's
    mutation-aware path, although nothing mutates here: its frozen path looks non-persistent
    buffers (transformers' `position_ids`) up in the state dict, where they are not."""
    from torch_mlir.compiler_utils import TorchMlirCompilerError
    from torch_mlir.fx import export_and_import

    try:  # an empty table: decomposed already
        return export_and_import(ep, output_type=dialect, func_name=ENTRY, experimental_support_mutation=True,
                                 decomposition_table={})
    except (TorchMlirCompilerError, NotImplementedError) as e:
        raise UserError(f"torch-mlir could not lower the {role} program to {dialect} ({_first_error(str(e))}): "
                        "try another --mlir-dialect, or --backend onnxruntime") from None


def _compile(text_file: Path, path: Path, dialect: str, role: str) -> None:
    from iree.compiler import CompilerToolError, compile_file

    try:
        compile_file(str(text_file), target_backends=["llvm-cpu"], input_type=IREE_INPUT[dialect],
                     output_file=str(path), extra_args=IREE_FLAGS)
    except CompilerToolError as e:
        raise UserError(f"IREE could not compile the {role} program's {dialect} text ({_first_error(str(e))}): "
                        "try another --mlir-dialect, or --backend onnxruntime") from None


def _first_error(diagnostics: str) -> str:
    """The first diagnostic line that says `error:`, shortened (the tools print pages of context)."""
    lines = [line.strip() for line in diagnostics.splitlines() if line.strip()]
    line = next((line for line in lines if "error:" in line), lines[0] if lines else "no diagnostics")
    return line if len(line) <= MESSAGE_CHARS else line[:MESSAGE_CHARS] + "..."


@lru_cache(maxsize=None)
def _config(threads: int):
    """One IREE CPU device per process and thread count, which a decoder's programs share (each
    device starts its own worker pool). The pool size is a process-wide flag read at creation."""
    import iree.runtime as rt

    rt.flags.parse_flags(f"--task_topology_max_group_count={threads}")
    return rt.Config("local-task")


class Runner:
    """One compiled IREE module, fed and read by the names in its `.io.json`."""

    def __init__(self, path: Path, threads: int | None = None):
        import iree.runtime as rt

        path = Path(path)
        io = json.loads(io_file(path).read_text())
        self.input_names = [i["name"] for i in io["inputs"]]
        self.output_names = [o["name"] for o in io["outputs"]]
        self._dtypes = [np.dtype(i["dtype"]) for i in io["inputs"]]
        self._output_dtypes = [np.dtype(o["dtype"]) for o in io["outputs"]]
        config = _config(threads or torch.get_num_threads())
        self._module = rt.VmModule.mmap(config.vm_instance, str(path))
        self._context = rt.SystemContext(vm_modules=[self._module], config=config)
        self._entry = self._context.modules[self._module.name][io["entry"]]

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        args = [np.ascontiguousarray(inputs[name], dtype=dtype) for name, dtype in zip(self.input_names, self._dtypes)]
        results = self._entry(*args)
        if not isinstance(results, tuple):  # one result comes back bare
            results = (results,)
        # results after the named outputs are the sort results `_unused_results` kept alive
        return {name: _as(dtype, r.to_host()) for name, dtype, r in zip(self.output_names, self._output_dtypes, results)}


def _as(dtype: np.dtype, array: np.ndarray) -> np.ndarray:
    """IREE's integers are signless and come back signed (uint8 codes as int8): the same bits
    read as the program's dtype."""
    return array if array.dtype == dtype else array.view(dtype)
