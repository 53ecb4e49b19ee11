"""Find the transformer blocks: which nodes form each layer and the residual stream between them.

Module paths only suggest: the call key of `nn_module_stack` at the outermost depth where the
attention sites part ways is the block (that is `encoder.layer.3` in BERT, `h.3` in GPT-2 and the
`@k`-th call of ALBERT's one shared layer), whatever the modules are called. The residual stream is
then found from dataflow: the tensor entering a block that feeds its queries and a residual `add`.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import networkx as nx
import torch
import torch.fx as fx

from skimformer.errors import UserError
from skimformer.ir.attention import AttentionSite, find_attention
from skimformer.ir.graph import module_stack, op_name, shape, tensor_value, to_networkx
from skimformer.ir.sizes import same_shape, same_shape_but
from skimformer.ir.token_axis import Axis, propagate


@dataclass
class Block:
    """One transformer layer, its nodes in graph order and its residual stream ends."""

    index: int
    path: str | None
    nodes: list[fx.Node]
    attention: list[AttentionSite]
    input: fx.Node | None = None
    output: fx.Node | None = None
    input_axis: Axis | None = None
    signature: str = ""  # a hash of the block's dataflow graph: equal for repeated layers

    def describe(self) -> dict:
        return {"index": self.index, "path": self.path, "nodes": len(self.nodes),
                "attention": [a.node.name for a in self.attention],
                "input": self.input.name if self.input is not None else None, "signature": self.signature,
                "output": self.output.name if self.output is not None else None}


def _block_depth(sites: list[AttentionSite]) -> int | None:
    """Outermost module-stack depth at which the attention sites fall into several calls.

    A lone site has nothing to part from: its block is the outermost module of the stack that
    sits in a list of layers (a path ending in an index), if any.
    """
    stacks = [module_stack(s.node) for s in sites]
    if not sites or not all(stacks):
        return None
    if len(sites) == 1:
        return next((d for d, (_, path, _) in enumerate(stacks[0]) if path.rsplit(".", 1)[-1].isdigit()), None)
    for d in range(min(len(s) for s in stacks)):
        if len({s[d][0] for s in stacks}) > 1:
            return d
    return None


def _group_sites(sites: list[AttentionSite]) -> list[tuple[str | None, str | None, list[AttentionSite]]]:
    """`[(call_key, module_path, sites)]` per block, in graph order."""
    depth = _block_depth(sites)
    if depth is None:
        return [(None, None, [s]) for s in sites]
    groups: dict[str, tuple[str, list]] = {}
    for s in sites:
        key, path, _ = module_stack(s.node)[depth]
        groups.setdefault(key, (path, []))[1].append(s)
    return [(key, path, ss) for key, (path, ss) in groups.items()]


def _in_call(node: fx.Node, key: str) -> bool:
    return any(k == key for k, _, _ in module_stack(node))


def _is_weight(node: fx.Node, params: set[str]) -> bool:
    return node.op == "placeholder" and node.name in params or node.op == "get_attr"


NO_OP_STEPS = frozenset({"to", "_to_copy", "clone", "contiguous", "alias", "dropout", "type_as", "detach"})


def _feeds_add(node: fx.Node, members: set[fx.Node]) -> bool:
    """True when `node` reaches an `add` of the block directly or through casts (the residual
    connection; a float32 model's no-op casts sit in between after export)."""
    todo = [node]
    while todo:
        for user in todo.pop().users:
            if user in members and op_name(user) == "add":
                return True
            if user in members and op_name(user) in NO_OP_STEPS:
                todo.append(user)
    return False


def _residual_ends(block: Block, params: set[str]) -> None:
    """Fill in the residual input (with its token axis) and output of a block."""
    members = set(block.nodes)
    site = block.attention[0]
    q_shape = shape(site.q)
    if q_shape is None:
        return
    q_axis = Axis(len(q_shape) - 2, q_shape[-2])
    external = {a for n in block.nodes for a in n.all_input_nodes if a not in members and not _is_weight(a, params)}
    reached = propagate(site.q, q_axis, forward=False, within=lambda n: n in members or n in external)
    candidates = [n for n in external if n in reached and _feeds_add(n, members)]
    if not candidates:
        return
    block.input = max(candidates, key=lambda n: (tensor_value(n).dim(), -len(n.users)))
    block.input_axis = reached[block.input]
    # the stream leaves with the shape it came in with, but for its token count: a token pass
    # (tome, prune) may reduce the tokens between a block's attention and its MLP
    same = [n for n in block.nodes if same_shape_but(shape(n), shape(block.input), block.input_axis.dim)
            and any(u not in members for u in n.users)]
    block.output = same[-1] if same else None


def _signature(nodes: list[fx.Node]) -> str:
    """Weisfeiler-Lehman hash of a block's dataflow: repeated layers hash alike."""
    if not nodes:
        return ""
    with warnings.catch_warnings():  # networkx notes that its directed hashes changed in 3.5
        warnings.simplefilter("ignore")
        return nx.weisfeiler_lehman_graph_hash(to_networkx(nodes), node_attr="op")


def find_blocks(graph: fx.Graph, sites: list[AttentionSite], params: set[str]) -> list[Block]:
    """The blocks of a graph, in order; each attention site belongs to exactly one."""
    blocks = []
    for i, (key, path, group) in enumerate(_group_sites(sites)):
        nodes = [n for n in graph.nodes if n.op == "call_function" and _in_call(n, key)] if key else []
        signature = _signature(nodes)
        block = Block(index=i, path=path, nodes=nodes, attention=group, signature=signature)
        if nodes:
            _residual_ends(block, params)
        blocks.append(block)
    return blocks


# Steps that keep the residual stream's values: no-op casts and reshapes (OPT runs its MLP on a
# `[B * n, hidden]` view of the stream).
STREAM_STEPS = NO_OP_STEPS | {"view", "reshape", "_unsafe_view", "flatten", "unflatten"}


def stream_views(node: fx.Node, members: set[fx.Node]) -> set[fx.Node]:
    """`node` and the casts and reshapes of it among `members`, directly or in a chain."""
    found, todo = {node}, [node]
    while todo:
        for user in todo.pop().users:
            if user in members and op_name(user) in STREAM_STEPS and user not in found:
                found.add(user)
                todo.append(user)
    return found


def residual_midpoint(block: Block) -> fx.Node | None:
    """The residual stream between attention and MLP: the first node after attention that every
    path to the block's output crosses and that then branches, itself or a cast or reshape of
    it (into the MLP and its skip). None when there is none: attention and MLP in parallel
    (GPT-NeoX), or no residual ends."""
    if block.output is None:
        return None
    site = block.attention[0]
    graph = to_networkx(block.nodes)
    after = nx.descendants(graph, site.output) if site.output in graph else set()
    members = set(graph)
    for node in block.nodes:
        if node not in after or node is block.output or not same_shape(shape(node), shape(block.input)):
            continue
        if all(len([u for u in view.users if u in members]) < 2 for view in stream_views(node, members)):
            continue
        cut = graph.copy()
        cut.remove_node(node)
        if not nx.has_path(cut, site.output, block.output):
            return node
    return None


def blocks_to_rewrite(graph: fx.Graph, pass_name: str, role: str, advice: str) -> list[Block]:
    """The graph's blocks, for a pass that rewrites some of them; refused with the reason when
    there are none. After kv-quant that is expected: its attention is one `skim::quant_attention`
    op, not attention structure analysis can read; `advice` says what the user can do then."""
    blocks = find_blocks(graph, find_attention(graph), set())
    if blocks:
        return blocks
    if any(n.target is torch.ops.skim.quant_attention.default for n in graph.nodes):
        raise UserError(f"{pass_name} cannot follow kv-quant: its quantized attention is one skim op in which "
                        f"{pass_name} finds no blocks to rewrite; {advice}")
    raise UserError(f"{pass_name}: found no attention it knows in the {role} program, hence no blocks to rewrite")
