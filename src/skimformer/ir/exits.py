"""Cut a graph after a block and let it leave early: the graph surgery behind every exit pass.

Everything downstream of a block's output (`hidden`) is the *rest* of the model: the later
blocks, the final norm and the head, and every output they produce (the logits, the later
layers' cache). An exit replaces the rest by a `torch.cond` (an ONNX `If` in the engine) between

- the *full* branch: the rest, exactly as it was;
- the *exit* branch: the same outputs computed from `hidden` alone. The head is applied to
  `hidden` (every path from the last block's output to an output is replayed with `hidden` in its
  place), and each later block's input is `hidden` too, which is CALM's state propagation: the
  skipped layers' keys and values are their own projections of the exit hidden state, so the
  cache keeps its shape and later tokens attend to something meaningful at every layer.

Both branches take the same operands: every value from before the cut that the rest reads. The
cut is found from dataflow (descendants of `hidden`), never from module names, so it holds for any
architecture whose blocks `ir.blocks` finds. `replay` is the shared primitive: copy the nodes that
compute some outputs with chosen nodes replaced by others, into the same or another graph.
"""
from __future__ import annotations

from dataclasses import dataclass
import operator
from typing import Callable

import torch
import torch.fx as fx

from skimformer.ir.exit_heads import adapt
from skimformer.ir.graph import descendants
from skimformer.ir.rewrite import eliminate_dead_code


def needed(targets: list[fx.Node], stop: set[fx.Node], within: set[fx.Node]) -> list[fx.Node]:
    """Nodes of `within` that `targets` read, not looking past `stop`, in graph order."""
    seen, todo = set(), [t for t in targets if t not in stop]
    while todo:
        node = todo.pop()
        if node in seen or node not in within:
            continue
        seen.add(node)
        todo.extend(a for a in node.all_input_nodes if a not in stop)
    graph = targets[0].graph
    return [n for n in graph.nodes if n in seen]


def replay(graph: fx.Graph, targets: list[fx.Node], env: dict[fx.Node, fx.Node], within: set[fx.Node]) -> list[fx.Node]:
    """Copy into `graph` the nodes of `within` that compute `targets`, reading `env[n]` wherever
    the original reads a node `n` of `env`; nodes outside `within` and `env` are read as they are
    (same graph only). Returns the copies of `targets`; `env` gains every copy."""
    def read(arg: fx.Node) -> fx.Node:
        if arg not in env and arg.op == "get_attr" and arg.graph is not graph:
            env[arg] = graph.get_attr(arg.target)  # a weight, read by name from the new graph's module
            env[arg].meta = dict(arg.meta)
        return env.get(arg, arg)

    for node in needed(targets, set(env), within):
        env[node] = graph.node_copy(node, read)
    return [env.get(t, t) for t in targets]


@dataclass
class Cut:
    """What lies after `hidden` in a graph: the rest's nodes, the tensors it reads from before the
    cut (`operands`, graph order), what it reads from before the cut that each branch recomputes
    from operands (`sizes`: symbolic ints, which cannot be `torch.cond` operands, and views, since
    two operands viewing one tensor, such as each layer's `cos.unsqueeze(1)`, are aliases that
    `torch.cond` refuses) and the graph outputs it produces."""

    hidden: fx.Node
    rest: set[fx.Node]
    operands: list[fx.Node]
    sizes: set[fx.Node]
    outputs: list[fx.Node]

    @property
    def copied(self) -> set[fx.Node]:
        """What a branch copies: the rest and the sizes it reads."""
        return self.rest | self.sizes


def _is_tensor(node: fx.Node) -> bool:
    return isinstance(node.meta.get("val"), torch.Tensor)


def _is_view(node: fx.Node) -> bool:
    return isinstance(node.target, torch._ops.OpOverload) and node.target.is_view


def cut_after(graph: fx.Graph, hidden: fx.Node, outputs: list[fx.Node]) -> Cut:
    """The cut of `graph` after `hidden`; weights (`get_attr`) are copied, not passed."""
    rest = descendants([hidden]) - {n for n in graph.nodes if n.op == "output"}
    operands, sizes = {hidden}, set()
    todo = [a for n in rest for a in n.all_input_nodes if a not in rest]
    while todo:
        node = todo.pop()
        if node.op == "get_attr" or node in operands or node in sizes:
            continue
        if (_is_tensor(node) and not _is_view(node)) or node.op == "placeholder":
            operands.add(node)
        else:
            sizes.add(node)
            todo.extend(node.all_input_nodes)
    ordered = [n for n in graph.nodes if n in operands]
    return Cut(hidden, rest, ordered, sizes, [o for o in dict.fromkeys(outputs) if o in rest])


def branch_graph(cut: Cut, extra: list[str]) -> tuple[fx.Graph, dict[fx.Node, fx.Node], dict[str, fx.Node]]:
    """A new graph taking the cut's operands, then `extra` named inputs: the graph, the map from
    each operand to its placeholder, and the extra placeholders by name."""
    graph = fx.Graph()
    env = {}
    for node in cut.operands:
        env[node] = graph.placeholder(node.name)
        env[node].meta = dict(node.meta)
    return graph, env, {name: graph.placeholder(name) for name in extra}


def output_of(graph: fx.Graph) -> fx.Node:
    return next(n for n in reversed(graph.nodes) if n.op == "output")


def conditional(root: fx.GraphModule, graph: fx.Graph, pred: fx.Node, taken: fx.Graph, otherwise: fx.Graph,
                operands: list[fx.Node], count: int) -> list[fx.Node]:
    """Insert `torch.cond(pred, taken, otherwise, operands)` before `graph`'s output node and return
    its `count` results. The branches become GraphModules reading their weights from `root`."""
    for branch in (taken, otherwise):
        eliminate_dead_code(branch)
    with graph.inserting_before(output_of(graph)):
        fns = []
        for name, branch in (("exit_branch", taken), ("full_branch", otherwise)):
            fns.append(graph.get_attr(_attach(root, name, fx.GraphModule(root, branch))))
        cond = graph.call_function(torch.cond, (pred, fns[0], fns[1], tuple(operands)))
        return [graph.call_function(operator.getitem, (cond, i)) for i in range(count)]


def _attach(root: fx.GraphModule, name: str, module: fx.GraphModule) -> str:
    """Register `module` on `root` under a free attribute name based on `name`."""
    i = 0
    while hasattr(root, f"{name}_{i}"):
        i += 1
    root.add_module(f"{name}_{i}", module)
    return f"{name}_{i}"


def adapter_input(root: fx.GraphModule, name: str, down: torch.Tensor, up: torch.Tensor,
                  hidden: fx.Node) -> HeadInput:
    """A `HeadInput` that maps the hidden state through a calibrated exit adapter
    (`ir.exit_heads.adapt`), its weights stored on `root` as buffers `{name}_down` / `{name}_up` in
    the dtype of the hidden state `hidden` (adapters are saved in fp32; a half-precision program's
    linear layers take weights of their own dtype)."""
    dtype = hidden.meta["val"].dtype
    root.register_buffer(f"{name}_down", down.detach().to(dtype).clone())
    root.register_buffer(f"{name}_up", up.detach().to(dtype).clone())

    def build(graph: fx.Graph, hidden: fx.Node) -> fx.Node:
        weights = (graph.get_attr(f"{name}_down"), graph.get_attr(f"{name}_up"))
        return graph.call_function(adapt, (hidden, *weights))

    return build


def constant(graph: fx.Graph, value: int) -> fx.Node:
    """A 0-d int64 tensor node (branch outputs must be tensors)."""
    return graph.call_function(torch.ops.aten.scalar_tensor.default, (value,), {"dtype": torch.int64})


HeadInput = Callable[[fx.Graph, fx.Node], fx.Node]


@dataclass
class ExitPoint:
    """Where a graph may leave: after `layers_run` blocks, whose residual stream is `hidden`.
    `skipped` are the later blocks' inputs and the last block's output, all read as `hidden` when
    the graph leaves here. `head_input`, when given, builds what the head reads instead of
    `hidden` (a calibrated exit adapter) in whichever graph the exit ends up in."""

    layers_run: int
    hidden: fx.Node
    skipped: list[fx.Node]
    head_input: HeadInput | None = None


Decide = Callable[[fx.Graph, fx.Node, int], fx.Node]  # (graph, exit logits, layers run) -> leave?


def insert_exits(root: fx.GraphModule, graph: fx.Graph, points: list[ExitPoint], logits: fx.Node,
                 outputs: list[fx.Node], depth: int, decide: Decide) -> tuple[list[fx.Node], fx.Node]:
    """Let `graph` leave at each of `points` (in order) where `decide(graph, exit_logits, layers_run)`
    says so.

    The head's output at an exit (`logits` computed from the exit's hidden state) is computed once
    before the `torch.cond` and handed to the exit branch; later exits nest in the full branch.
    Returns the graph's outputs (`outputs`, with those after the first exit replaced by the
    conditional's results) and a 0-d int64 node: the number of blocks run.
    """
    point = points[0]
    cut = cut_after(graph, point.hidden, outputs)
    if logits not in cut.outputs:
        raise ValueError("the logits do not depend on the exit's hidden state")
    with graph.inserting_before(output_of(graph)):
        head_reads = point.head_input(graph, point.hidden) if point.head_input else point.hidden
        early = replay(graph, [logits], {n: head_reads for n in point.skipped}, cut.rest)[0]
        pred = decide(graph, early, point.layers_run)

    taken, env, extra = branch_graph(cut, ["exit_logits"])
    env.update({n: env[point.hidden] for n in point.skipped})
    results = [taken.call_function(torch.clone, (extra["exit_logits"],)) if o is logits
               else replay(taken, [o], env, cut.copied)[0] for o in cut.outputs]
    taken.output(tuple(results + [constant(taken, point.layers_run)]))

    full, env, _ = branch_graph(cut, ["exit_logits"])
    copies = replay(full, cut.outputs, env, cut.copied)
    full.output(tuple(copies))
    if points[1:]:
        inner = [ExitPoint(p.layers_run, env[p.hidden], [env[s] for s in p.skipped], p.head_input) for p in points[1:]]
        copies, ran = insert_exits(root, full, inner, env[logits], copies, depth, decide)
    else:
        with full.inserting_before(output_of(full)):
            ran = constant(full, depth)
    output_of(full).args = (tuple(copies + [ran]),)

    values = conditional(root, graph, pred, taken, full, cut.operands + [early], len(cut.outputs) + 1)
    by_original = dict(zip(cut.outputs, values))
    return [by_original.get(o, o) for o in outputs], values[-1]
