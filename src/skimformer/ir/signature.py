"""Edit the named inputs and outputs of a module from `ep.module()` before it is re-exported.

Passes that add state (H2O's accumulated scores), change the cache's representation (KIVI's
integer codes and scales) or return a new tensor (the mask of a compressed cache) change the
program's signature. The graph's placeholders and output node, the codegen's pytree specs and
the module's `_in_spec`/`_out_spec` must change together, or the re-exported program loses its
names; these helpers keep them in step.
"""
from __future__ import annotations

import torch
import torch.fx as fx
from torch.utils import _pytree as pytree

from skimformer.errors import UserError
from skimformer.ir.rewrite import eliminate_dead_code
from skimformer.ir.sizes import same_size


def output_node(module: fx.GraphModule) -> fx.Node:
    return next(n for n in reversed(module.graph.nodes) if n.op == "output")


def named_outputs(module: fx.GraphModule) -> dict[str, fx.Node]:
    """The module's outputs by name, in order; the program must return a dict (decoder convention)."""
    info = module.graph._codegen.pytree_info
    out = output_node(module)
    leaves = list(out.args[0]) if isinstance(out.args[0], (list, tuple)) else [out.args[0]]
    tree = pytree.tree_unflatten(list(range(len(leaves))), info.out_spec) if info is not None else None
    if not isinstance(tree, dict):
        raise UserError("the program must return its outputs as a dict (logits, present_key_0, ...): "
                        "export it with `skimformer export` or return a dict from forward")
    return {name: leaves[i] for name, i in tree.items()}


def set_outputs(module: fx.GraphModule, outputs: dict[str, fx.Node]) -> None:
    """Make `outputs` (name -> node, in order) the module's outputs."""
    info = module.graph._codegen.pytree_info
    spec = pytree.tree_structure({name: 0 for name in outputs})
    output_node(module).args = (tuple(outputs.values()),)
    module.graph._codegen.pytree_info = info._replace(out_spec=spec)
    module._out_spec = spec


def add_output(module: fx.GraphModule, name: str, node: fx.Node) -> None:
    """Append `node` to the outputs as `name` (refused if the name is taken)."""
    outputs = named_outputs(module)
    if name in outputs:
        raise UserError(f"the program already returns an output named {name}: was this pass applied twice?")
    set_outputs(module, {**outputs, name: node})


def input_nodes(module: fx.GraphModule) -> dict[str, fx.Node]:
    return {n.target: n for n in module.graph.nodes if n.op == "placeholder"}


def add_input(module: fx.GraphModule, name: str, val=None) -> fx.Node:
    """A new positional input `name` after the last one; `val` (a fake or real tensor) becomes its
    `meta["val"]` so analyses that read shapes see it before the program is re-exported."""
    graph = module.graph
    if name in input_nodes(module):
        raise UserError(f"the program already takes an input named {name}: was this pass applied twice?")
    last = [n for n in graph.nodes if n.op == "placeholder"][-1]
    with graph.inserting_after(last):
        node = graph.placeholder(name)
    if val is not None:
        node.meta["val"] = val
    _reset_input_spec(module)
    return node


def _size_elsewhere(module: fx.GraphModule, dropping: set[str], size) -> tuple[fx.Node, int] | None:
    """An input outside `dropping` with a dimension symbolically equal to `size`."""
    for name, node in input_nodes(module).items():
        val = node.meta.get("val")
        if name in dropping or val is None or not hasattr(val, "shape"):
            continue
        for dim, other in enumerate(val.shape):
            if same_size(other, size):
                return node, dim
    return None


def removable_inputs(module: fx.GraphModule) -> list[str]:
    """Inputs nothing reads but their sizes, when every such size is also a size of an input
    that stays (a program cut from another reads its batch and lengths from inputs it lost)."""
    eliminate_dead_code(module.graph)
    candidates = set()
    for name, node in input_nodes(module).items():
        users = [u for u in node.users if not (u.op == "call_module" and u.target == "_guards_fn")]
        if all(u.target is torch.ops.aten.sym_size.int for u in users):
            candidates.add(name)
    inputs = input_nodes(module)
    return [name for name in candidates
            if all(_size_elsewhere(module, candidates, inputs[name].meta["val"].shape[u.args[1]]) is not None
                   for u in inputs[name].users if u.target is torch.ops.aten.sym_size.int)]


def remove_inputs(module: fx.GraphModule, names: list[str]) -> None:
    """Drop the inputs `names` (see `removable_inputs`); their sizes are read from other inputs."""
    graph = module.graph
    for guard in [n for n in graph.nodes if n.op == "call_module" and n.target == "_guards_fn"]:
        graph.erase_node(guard)  # export's input checks read every input; re-export writes new ones
    dropping = set(names)
    for name in names:
        node = input_nodes(module)[name]
        for user in [u for u in node.users if u.target is torch.ops.aten.sym_size.int]:
            source, dim = _size_elsewhere(module, dropping, node.meta["val"].shape[user.args[1]])
            user.args = (source, dim)
        if node.users:
            raise ValueError(f"input {name} is still read by {list(node.users)}")
        graph.erase_node(node)
    _reset_input_spec(module)


def _reset_input_spec(module: fx.GraphModule) -> None:
    graph = module.graph
    info = graph._codegen.pytree_info
    names = [n.target for n in graph.nodes if n.op == "placeholder"]
    spec = pytree.tree_structure((tuple(range(len(names))), {}))
    graph._codegen.pytree_info = info._replace(orig_args=names, in_spec=spec)
    module._in_spec = spec


def carried_input(output_name: str) -> str | None:
    """The next decode step's input that an output feeds (decoder convention), or None.

    `present_X` feeds `past_X` (the cache and companions such as `present_key_scale_0`), and
    `state_X` feeds `state_X`."""
    if output_name.startswith("present_"):
        return "past_" + output_name.removeprefix("present_")
    if output_name.startswith("state_"):
        return output_name
    return None
