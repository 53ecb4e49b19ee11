"""AOTInductor backend: each program compiled ahead of time by `torch._inductor.aoti_compile_and_package`
into a `ROLE.aoti.pt2` package (C++ kernels built into a shared library, and the weights), which the
Runner loads with `torch._inductor.aoti_load_package`.

A package runs with torch alone, without skimformer: skim ops are decomposed to their plain-torch
references before compiling (CPU packages), and the package carries its input and output names in
its metadata, since the compiled model takes and returns flat lists of tensors:

    model = torch._inductor.aoti_load_package("decode.aoti.pt2")
    inputs = [i["name"] for i in json.loads(model.get_metadata()["skimformer.inputs"])]
    outputs = model.loader.run([feeds[name] for name in inputs])   # in the order of "skimformer.outputs"

What a package is tied to: the build machine's instruction set (`-march=native`, as the mlir
backend's IREE modules) and the thread count its parallel loops are planned for
(`torch.get_num_threads()` at build time). Build on the kind of machine that will run the engine.

Compile time (tiny zoo models, 2 cores): 10 to 20 s a program, in inductor's Python lowering (skim
ops are decomposed node by node first, not by a second trace of the program) and in g++ (the
wrapper at -O1 with precompiled headers, the kernels at -O3); the first build on a machine also
probes the CPU's vector ISAs and precompiles headers (cached in inductor's cache folder). Nothing
cheaper is configured: lower optimization levels would slow the engines, and the settings that
cost nothing at run time (line tables, frame pointers, compile threads: a CPU package's kernels
are one C++ file, compiled without inductor's worker pool) made no measurable difference.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from torch.utils import _pytree as pytree

from skimformer.errors import UserError
from skimformer.backends.quiet import quiet
from skimformer.ir import Program
from skimformer.ir.decompose import decomposed_node_by_node
from skimformer.ir.graph import holds_skim_ops, program_graphs
from skimformer.kernels import decompositions

NAME = "aotinductor"
SUFFIX = ".aoti.pt2"
# Package metadata keys: the program's inputs and outputs (`Program.input_specs()` form, JSON).
INPUTS_KEY = "skimformer.inputs"
OUTPUTS_KEY = "skimformer.outputs"
FALLBACK = "build it with --backend onnxruntime instead"
QUIET_LOGGERS = ("torch._inductor", "torch._dynamo", "torch.export", "torch.fx", "torch._functorch", "torch._export")


def require(**options) -> None:
    """Refuse before any work: options (this backend takes none), or no C++ compiler, which
    inductor's CPU code generation needs (it compiles the kernels with g++ or $CXX)."""
    if options:
        raise UserError(f"the {NAME} backend takes no options (got {', '.join(options)})")
    from torch._inductor import exc
    from torch._inductor.cpp_builder import get_cpp_compiler

    try:
        get_cpp_compiler()
    except (exc.InvalidCxxCompiler, RuntimeError):
        raise UserError(f"the {NAME} backend compiles C++ and found no C++ compiler: install g++ "
                        "(e.g. apt-get install g++) or set CXX to one") from None


def _quiet():
    """Inductor logs and warns while it lowers and compiles."""
    return quiet(QUIET_LOGGERS)


def _constructs(program: Program) -> str:
    """What in the program a failed compile may be about: its control flow, its skim ops, and the
    passes that inserted them (nodes carry `meta["skim"]`)."""
    found, passes = set(), set()
    for graph in program_graphs(program.ep):
        for node in graph.nodes:
            if node.op != "call_function":
                continue
            if isinstance(node.target, torch._ops.HigherOrderOperator):
                found.add(f"torch.{node.target.name()}")
            elif str(node.target).startswith("skim."):
                found.add(str(node.target).removesuffix(".default").replace(".", "::", 1))
            if "skim" in node.meta:
                passes.add(node.meta["skim"])
    if not found and not passes:
        return ""
    origin = f" inserted by {', '.join(sorted(passes))}" if passes else ""
    return f" (it holds {', '.join(sorted(found)) or 'rewritten nodes'}{origin})"


def _skim_ops_decomposed(ep: torch.export.ExportedProgram) -> torch.export.ExportedProgram:
    """Skim ops replaced node by node (`ir.decompose`: AOTInductor traces the whole program
    itself next, so a whole-program decomposition trace before it is a second one); a node
    whose decomposition does not trace alone sends the program through `run_decompositions`."""
    table = decompositions()
    ops = {n.target for graph in program_graphs(ep) for n in graph.nodes if n.op == "call_function" and n.target in table}
    try:
        return decomposed_node_by_node(ep, ops, table)
    except Exception:  # noqa: BLE001 - any failure to trace one node alone: the whole-program way
        return ep.run_decompositions(table)


def _compilable(program: Program) -> torch.export.ExportedProgram:
    """The program in plain ATen (skim ops replaced by their references, also inside torch.cond
    branches), holding the example inputs AOTInductor traces with: the program's own, also set on
    its ExportedProgram when there is nothing to decompose."""
    ep = program.ep
    if holds_skim_ops(ep):
        ep = _skim_ops_decomposed(ep)
    flat = [program.example_inputs[name] for name in program.input_names]
    ep.example_inputs = pytree.tree_unflatten(flat, ep.call_spec.in_spec)
    return ep


def lower(program: Program, path: Path) -> None:
    """Compile `program` for this machine's CPU into the AOTInductor package `path`."""
    from torch._inductor import aoti_compile_and_package

    metadata = {INPUTS_KEY: json.dumps(program.input_specs()), OUTPUTS_KEY: json.dumps(program.output_specs())}
    with _quiet():
        ep = _compilable(program)
        try:
            aoti_compile_and_package(ep, package_path=str(path), inductor_configs={"aot_inductor.metadata": metadata})
        except Exception as e:  # inductor's failures have many types; all mean this program cannot be built here
            reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise UserError(f"AOTInductor could not compile the {program.role} program{_constructs(program)}: "
                            f"{reason}; {FALLBACK}") from None


class Runner:
    """One compiled package, fed and read by name (the names its metadata carries)."""

    def __init__(self, path: Path):
        from torch._inductor import aoti_load_package

        with _quiet():
            self.model = aoti_load_package(str(path))
        metadata = self.model.get_metadata()
        inputs = json.loads(metadata[INPUTS_KEY])
        self.input_names = [spec["name"] for spec in inputs]
        self.output_names = [spec["name"] for spec in json.loads(metadata[OUTPUTS_KEY])]
        # The compiled code reads raw memory: a wrong dtype or rank would be read as garbage.
        self._expected = {spec["name"]: (np.dtype(spec["dtype"]), len(spec["shape"])) for spec in inputs}

    def _tensor(self, name: str, value: np.ndarray) -> torch.Tensor:
        array = np.ascontiguousarray(value)
        dtype, rank = self._expected[name]
        if array.dtype != dtype or array.ndim != rank:
            raise UserError(f"input {name} must be {dtype} with {rank} dimensions, not {array.dtype} "
                            f"with shape {list(array.shape)}")
        return torch.from_numpy(array if array.flags.writeable else array.copy())

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        flat = [self._tensor(name, inputs[name]) for name in self.input_names]
        outputs = self.model.loader.run(flat)
        return {name: t.numpy() for name, t in zip(self.output_names, outputs)}
