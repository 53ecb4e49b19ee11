"""`Program`: one ExportedProgram, its user-facing names and its example inputs; `Model`: the
programs a model is made of (`model`, or `prefill` + `decode` for a causal LM)."""
from __future__ import annotations

import shutil
import weakref
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import torch
from torch.export import ExportedProgram
from torch.export.graph_signature import InputKind, OutputKind
from torch.utils import _pytree as pytree
from torch.utils._sympy.numbers import int_oo

from skimformer.ir.example_inputs import synthesize_inputs
from skimformer.ir.sizes import describe_size, to_expr

# torch.export specialises sizes 0 and 1 while tracing, so a dynamic size's range starts at 2 by
# default; the program accepts 0 and 1 all the same (torch checks only lower bounds above 2).
DEFAULT_LOWER_BOUND = 2


def _key_name(path) -> str:
    parts = []
    for key in path:
        for attr in ("key", "name", "idx"):
            if hasattr(key, attr):
                parts.append(str(getattr(key, attr)))
                break
    return ".".join(parts)


def leaf_names(spec: pytree.TreeSpec, fallback: str) -> list[str]:
    """Names for the flattened leaves of a pytree spec: dict keys and attributes where the
    program returned a dict or ModelOutput, `output_<i>` otherwise."""
    n = spec.num_leaves
    try:
        tree = pytree.tree_unflatten(list(range(n)), spec)
        names = [_key_name(p) for p, _ in pytree.tree_flatten_with_path(tree)[0]]
    except Exception:  # a custom container that will not rebuild from placeholders
        names = []
    if len(names) != n or len(set(names)) != n or not all(names):
        return [fallback] if n == 1 else [f"{fallback}_{i}" for i in range(n)]
    return names


# The file each loaded ExportedProgram was read from: saving one that no pass replaced copies the
# file (a second) instead of serializing it again (tens of seconds for a 500 MB decoder).
LOADED_FROM: "weakref.WeakKeyDictionary[ExportedProgram, Path]" = weakref.WeakKeyDictionary()


@dataclass(eq=False)
class Program:
    """An ExportedProgram plus what skimformer needs to run and compare it by name."""

    ep: ExportedProgram
    role: str = "model"
    example_inputs: dict[str, torch.Tensor] | None = None

    def __post_init__(self):
        if self.example_inputs is None:
            self.example_inputs = self._stored_example_inputs() or synthesize_inputs(self)

    @property
    def input_names(self) -> list[str]:
        return [s.arg.name for s in self.ep.graph_signature.input_specs if s.kind == InputKind.USER_INPUT]

    @cached_property
    def output_names(self) -> list[str]:
        return leaf_names(self.ep.call_spec.out_spec, "output")

    def input_nodes(self) -> list[torch.fx.Node]:
        by_name = {n.name: n for n in self.ep.graph.nodes if n.op == "placeholder"}
        return [by_name[name] for name in self.input_names]

    def output_nodes(self) -> list[torch.fx.Node]:
        out = next(n for n in self.ep.graph.nodes if n.op == "output")
        specs = self.ep.graph_signature.output_specs
        return [node for node, spec in zip(out.args[0], specs) if spec.kind == OutputKind.USER_OUTPUT]

    def _specs(self, nodes, names) -> list[dict]:
        specs = []
        for node, name in zip(nodes, names):
            v = node.meta.get("val")
            if isinstance(v, torch.Tensor):
                specs.append({"name": name, "shape": [describe_size(s) for s in v.shape], "dtype": str(v.dtype).removeprefix("torch.")})
            else:
                specs.append({"name": name, "shape": [], "dtype": type(v).__name__})
        return specs

    def input_specs(self) -> list[dict]:
        return self._specs(self.input_nodes(), self.input_names)

    def output_specs(self) -> list[dict]:
        return self._specs(self.output_nodes(), self.output_names)

    def size_ranges(self) -> dict[str, dict]:
        """`{symbol: {"min": int, "max": int | None}}` for each size symbol in the input shapes,
        from the export's range constraints: what an engine checks its inputs against, since the
        runtimes it lowers to check nothing (a tome program needs more tokens than it merges).
        The default lower bound reads as 0 (`DEFAULT_LOWER_BOUND`); `max` is None when unbounded."""
        constraints = self.ep.range_constraints
        ranges = {}
        for node in self.input_nodes():
            for size in getattr(node.meta.get("val"), "shape", ()):
                for symbol in sorted(to_expr(size).free_symbols, key=str):
                    bounds = constraints.get(symbol)
                    low = int(bounds.lower) if bounds is not None and bounds.lower > DEFAULT_LOWER_BOUND else 0
                    high = int(bounds.upper) if bounds is not None and bounds.upper != int_oo else None
                    ranges[str(symbol)] = {"min": low, "max": high}
        return ranges

    def _stored_example_inputs(self) -> dict[str, torch.Tensor] | None:
        stored = getattr(self.ep, "example_inputs", None)
        if not stored:
            return None
        leaves = pytree.tree_leaves(stored)
        if len(leaves) != len(self.input_names) or not all(isinstance(t, torch.Tensor) for t in leaves):
            return None
        return dict(zip(self.input_names, leaves))

    @cached_property
    def precision(self) -> torch.dtype:
        """The floating dtype the program computes in: the least precise of its weights' and float
        inputs' dtypes (fp32 when it has none). Two correct computations of a half-precision
        program differ by its rounding, so rewrites and engines are compared at this precision
        (`passes.manager.tolerance`)."""
        tensors = [*self.ep.state_dict.values(), *self.ep.constants.values(),
                   *(node.meta.get("val") for node in self.input_nodes())]
        floats = [t.dtype for t in tensors if isinstance(t, torch.Tensor) and t.dtype.is_floating_point]
        return max(floats, key=lambda dtype: torch.finfo(dtype).eps, default=torch.float32)

    @cached_property
    def module(self) -> torch.nn.Module:
        return self.ep.module()

    def run(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Run the program on named inputs; returns named outputs."""
        flat = [inputs[name] for name in self.input_names]
        args, kwargs = pytree.tree_unflatten(flat, self.ep.call_spec.in_spec)
        with torch.no_grad():
            out = self.module(*args, **kwargs)
        return dict(zip(self.output_names, pytree.tree_leaves(out)))

    def save(self, path: str | Path) -> None:
        source = LOADED_FROM.get(self.ep)
        if source is not None and source.is_file():
            shutil.copyfile(source, path)
        else:
            torch.export.save(self.ep, str(path))

    def with_ep(self, ep: ExportedProgram) -> "Program":
        """The same role and example inputs over a rewritten ExportedProgram."""
        return Program(ep=ep, role=self.role, example_inputs=dict(self.example_inputs))


@dataclass
class Model:
    """What a user hands skimformer: one program, or a causal LM's prefill and decode programs."""

    programs: dict[str, Program]
    source: Path | None = None
    extra_files: list[Path] = field(default_factory=list)  # tokenizer and config files beside a decoder
    generation: dict = field(default_factory=dict)  # settings the engine's decoding loop needs (e.g. draft length)

    @property
    def is_decoder(self) -> bool:
        return "prefill" in self.programs and "decode" in self.programs

    @property
    def kind(self) -> str:
        return "decoder" if self.is_decoder else "encoder"

    def replace(self, programs: dict[str, Program]) -> "Model":
        return Model(programs=programs, source=self.source, extra_files=list(self.extra_files),
                     generation=dict(self.generation))
