"""Re-export an edited graph: the route by which every rewrite becomes a fresh ExportedProgram.

Passes edit the graph of `program.ep.module()` and hand it back here; exporting it again on the
program's example inputs, with the same dimensions dynamic, gives correct fake-tensor shapes for
every node and a proper graph signature (DESIGN.md). Original nodes keep their
`nn_module_stack`; inserted nodes carry `meta["skim"]` so later analyses know them.
"""
from __future__ import annotations

import contextlib
import copy
import inspect
import operator

import torch
import torch.fx as fx
from torch._guards import detect_fake_mode
from torch.fx.passes.fake_tensor_prop import FakeTensorProp
from torch.utils import _pytree as pytree
from torch.utils._sympy.value_ranges import ValueRanges

from skimformer.ir.program import Program

METADATA_CHECK = torch.ops.aten._assert_tensor_metadata.default


def dynamic_dims(program: Program) -> list[dict[int, object]]:
    """Per user input, the dimensions that are symbolic in the program."""
    out = []
    for node in program.input_nodes():
        val = node.meta.get("val")
        dims = {}
        if isinstance(val, torch.Tensor):
            dims = {i: torch.export.Dim.DYNAMIC for i, s in enumerate(val.shape) if isinstance(s, torch.SymInt)}
        out.append(dims)
    return out


def _by_parameter(module: torch.nn.Module, args: tuple, kwargs: dict, specs_args, specs_kwargs) -> dict:
    sig = inspect.signature(module.forward)
    bound = sig.bind(*specs_args, **specs_kwargs).arguments
    sig.bind(*args, **kwargs)  # fail early if the module no longer takes these inputs
    return dict(bound)


class _PropagateFrom(FakeTensorProp):
    """FakeTensorProp that reuses the recorded values of nodes before `start`: an edit cannot
    change what comes before it in graph order, and symbolic shape arithmetic is slow."""

    def __init__(self, module: fx.GraphModule, mode, start: fx.Node | None):
        super().__init__(module, mode)
        self.fresh = start is None
        self.start = start

    def run_node(self, n: fx.Node):
        self.fresh = self.fresh or n is self.start
        if not self.fresh and "val" in n.meta and n.op != "placeholder":
            return n.meta["val"]
        return super().run_node(n)


def refresh_shapes(module: fx.GraphModule, start: fx.Node | None = None) -> None:
    """Recompute the fake values of the nodes from `start` on (all by default) after an in-place
    edit, in the program's own symbolic shape environment, so a pass can rewrite the same graph
    again without re-exporting it."""
    placeholders = [n.meta["val"] for n in module.graph.nodes if n.op == "placeholder"]
    mode = detect_fake_mode(placeholders)
    module.recompile()
    with mode, _allow_real_parameters(mode):
        _PropagateFrom(module, mode, start).propagate_dont_convert_inputs(*placeholders)


@contextlib.contextmanager
def _allow_real_parameters(mode):
    """Parameters are real tensors inside `ep.module()`; let the fake mode read them."""
    before, mode.allow_non_fake_inputs = mode.allow_non_fake_inputs, True
    try:
        yield
    finally:
        mode.allow_non_fake_inputs = before


def eliminate_dead_code(graph: fx.Graph) -> None:
    """Remove every node whose value no output needs, including two kinds FX keeps: export's
    `_assert_tensor_metadata` checks (side effects that read a tensor, so one check would keep
    a whole bypassed branch alive) and attention (counted as random for its dropout argument)."""
    graph.eliminate_dead_code(is_impure_node=lambda n: n.target is not METADATA_CHECK
                              and n.is_impure(impure_random=False))


def tag(node: fx.Node, pass_name: str) -> fx.Node:
    """Mark a node as inserted by a pass."""
    node.meta["skim"] = pass_name
    return node


def _batch_of_two(inputs: list, dims: list[dict]) -> list:
    """Examples with a dynamic batch of 1 repeated to 2 rows: export specializes a size-1
    dimension to the constant 1, which would fix the rewritten program's batch."""
    if not any(0 in d and isinstance(x, torch.Tensor) and x.dim() and x.shape[0] == 1 for x, d in zip(inputs, dims)):
        return inputs
    return [x.repeat(2, *[1] * (x.dim() - 1)) if 0 in d and x.shape[0] == 1 else x for x, d in zip(inputs, dims)]


def relax_sum_ranges(ep: torch.export.ExportedProgram) -> None:
    """Lower the range of input sizes that are sums of dynamic sizes to what the inputs allow.

    The decode mask is `[B, past + n]`. torch.export assumes while tracing that every dynamic
    size is >= 2 (sizes 0 and 1 run all the same), and derives from that a range for `past + n`
    that the program would check at run time, refusing `past + n < 4` (the second and third
    tokens after a one-token prompt) although it computes them correctly. A sum's lowest value
    is taken from its terms' declared lower bounds, with the tracer's 2 read as 0.
    """
    ranges = ep.range_constraints
    for expr, bounds in list(ranges.items()):
        if expr.is_Add and all(s in ranges for s in expr.free_symbols):
            lowest = expr.subs({s: 0 if ranges[s].lower <= 2 else ranges[s].lower for s in expr.free_symbols})
            ranges[expr] = ValueRanges(min(bounds.lower, lowest), bounds.upper)


def _drop_size_assumptions(ep: torch.export.ExportedProgram) -> None:
    """Remove run-time checks that an input size is >= 2.

    Tracing a `torch.cond` re-derives the sizes its branches read, and the checks export then
    writes carry its tracing assumption (every dynamic size >= 2, sizes 0 and 1 run all the same)
    into the program, which would refuse a one-token decode step or a batch of one."""
    graph = ep.graph_module.graph
    for node in list(graph.nodes):
        if node.target is not torch.ops.aten._assert_scalar.default:
            continue
        test = node.args[0]
        if not (isinstance(test, fx.Node) and test.target is operator.ge and test.args[1] == 2):
            continue
        size = test.args[0]
        if isinstance(size, fx.Node) and size.target is torch.ops.aten.sym_size.int and size.args[0].op == "placeholder":
            graph.erase_node(node)
            if not test.users:
                graph.erase_node(test)
    ep.graph_module.recompile()


def _name_module_types(ep: torch.export.ExportedProgram) -> None:
    """Write module types in `nn_module_stack` as names. Export records a class where a branch
    of a nested `torch.cond` was itself a GraphModule, and `torch.export.save` accepts names only."""
    for module in ep.graph_module.modules():
        if not isinstance(module, fx.GraphModule):
            continue
        for node in module.graph.nodes:
            stack = node.meta.get("nn_module_stack")
            for key, (path, kind) in (stack or {}).items():
                if not isinstance(kind, str):
                    stack[key] = (path, f"{kind.__module__}.{kind.__qualname__}")


def reexport(program: Program, module: torch.nn.Module, inputs: dict[str, torch.Tensor] | None = None,
             dims: dict[str, dict[int, object]] | None = None) -> Program:
    """Export `module` (an edited `program.ep.module()`) again with the same dynamic dimensions.

    A pass that changed the signature (`ir.signature.add_input`) gives the new example `inputs`
    by name, and `dims` for inputs the program did not have (their dynamic dimensions); the
    result keeps `inputs` as its example inputs.
    """
    inputs = dict(program.example_inputs if inputs is None else inputs)
    known = dict(zip(program.input_names, dynamic_dims(program)))
    known.update(dims or {})
    info = module.graph._codegen.pytree_info if isinstance(module, fx.GraphModule) else None
    changed = info is not None and list(info.orig_args) != program.input_names
    names = list(info.orig_args) if changed else program.input_names
    spec = module._in_spec if changed else program.ep.call_spec.in_spec
    missing = [n for n in names if n not in inputs or n not in known]
    if missing:
        raise ValueError(f"re-export needs example inputs and dynamic dims for {missing}")
    flat = _batch_of_two([inputs[n] for n in names], [known[n] for n in names])
    args, kwargs = pytree.tree_unflatten(flat, spec)
    ds_args, ds_kwargs = pytree.tree_unflatten([known[n] for n in names], spec)
    if isinstance(module, fx.GraphModule):
        module.graph.lint()
        module.recompile()
    dynamic = _by_parameter(module, args, kwargs, ds_args, ds_kwargs)
    ep = torch.export.export(module, tuple(args), dict(kwargs), dynamic_shapes=dynamic or None, strict=False)
    relax_sum_ranges(ep)
    _drop_size_assumptions(ep)
    _name_module_types(ep)
    return Program(ep=ep, role=program.role, example_inputs={n: inputs[n] for n in names})


def on_graph(ep: torch.export.ExportedProgram, gm: fx.GraphModule, input_specs: list | None = None,
             constants: dict | None = None) -> torch.export.ExportedProgram:
    """`ep` with `gm` (an edited copy of its graph module) as its graph, without tracing again: the
    same weights, `input_specs` (default: `ep`'s) and `constants` added to its own; outputs are
    named after `gm`'s output node, where an edit replaced a returned node."""
    from torch.export.graph_signature import ExportGraphSignature, OutputSpec, TensorArgument

    returned = next(n for n in reversed(gm.graph.nodes) if n.op == "output").args[0]
    outputs = [OutputSpec(kind=s.kind, arg=TensorArgument(name=node.name), target=s.target)
               if isinstance(s.arg, TensorArgument) else s for s, node in zip(ep.graph_signature.output_specs, returned)]
    signature = ExportGraphSignature(input_specs=input_specs or ep.graph_signature.input_specs, output_specs=outputs)
    return torch.export.ExportedProgram(root=gm, graph=gm.graph, graph_signature=signature, state_dict=ep.state_dict,
                                        range_constraints=ep.range_constraints,
                                        module_call_graph=copy.deepcopy(ep.module_call_graph),
                                        example_inputs=ep.example_inputs, constants={**ep.constants, **(constants or {})},
                                        verifiers=ep.verifiers)
