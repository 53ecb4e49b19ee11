"""Name what follows the last block: `final_norm`, `lm_head`, `pooler`, `classifier`.

Found from dataflow after the residual stream leaves the last block: a normalisation of the
stream is the final norm; a projection to the vocabulary (the embedding table's size, or the tied
embedding weight itself) is the LM head; a reduction of the token axis (first token, mean) is a
pooler when a dense + tanh follows it, and any other projection that reaches an output is a
classifier.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch.fx as fx

from skimformer.ir.graph import descendants, op_name, shape
from skimformer.ir.sizes import same_size
from skimformer.ir.token_axis import Axis, propagate

NORMS = frozenset({"layer_norm", "native_layer_norm", "rms_norm", "rsqrt", "group_norm"})
PROJECTIONS = frozenset({"linear", "addmm", "mm", "matmul"})
TOKEN_REDUCTIONS = frozenset({"select", "mean", "sum", "amax", "index", "gather", "slice", "max"})


@dataclass
class Head:
    name: str  # one of final_norm, lm_head, pooler, classifier
    node: fx.Node

    def describe(self) -> dict:
        return {"name": self.name, "node": self.node.name}


def vocab_sizes(graph: fx.Graph) -> list:
    """Sizes of embedding tables looked up with program inputs (the vocabulary)."""
    return [shape(n.args[0])[0] for n in graph.nodes if op_name(n) == "embedding" and shape(n.args[0])]


def _weight(node: fx.Node) -> fx.Node | None:
    idx = {"linear": 1, "addmm": 2, "mm": 1, "matmul": 1}[op_name(node)]
    w = node.args[idx] if len(node.args) > idx else None
    while isinstance(w, fx.Node) and op_name(w) in ("t", "transpose", "permute"):
        w = w.args[0]
    return w if isinstance(w, fx.Node) else None


def find_heads(graph: fx.Graph, last_output: fx.Node | None, last_axis: Axis | None,
               block_nodes: set[fx.Node], outputs: set[fx.Node]) -> list[Head]:
    if last_output is None:
        return []
    after = [n for n in graph.nodes if n in descendants([last_output]) and n not in block_nodes]
    reaching_output = {n for n in after if n in outputs or descendants([n]) & outputs}
    vocab = vocab_sizes(graph)
    embedding_weights = {n.args[0] for n in graph.nodes if op_name(n) == "embedding"}
    heads: list[Head] = []
    norm = next((n for n in after if op_name(n) in NORMS), None)
    if norm is not None:
        heads.append(Head("final_norm", norm))
    token_path = propagate(last_output, last_axis, within=lambda n: n in set(after)) if last_axis else {}
    reductions = [n for n in after if n not in token_path and any(a in token_path for a in n.all_input_nodes)
                  and op_name(n) in TOKEN_REDUCTIONS]
    reduced = descendants(reductions)
    pooler_dense = set()
    for n in after:
        if op_name(n) not in PROJECTIONS or n not in reaching_output or _weight(n) is None:
            continue
        out_shape = shape(n)
        vocab_sized = bool(out_shape) and any(same_size(out_shape[-1], v) for v in vocab)
        if _weight(n) in embedding_weights or (vocab_sized and n not in reduced):
            heads.append(Head("lm_head", n))
        elif n in reduced and any(op_name(u) == "tanh" for u in n.users):
            heads.append(Head("pooler", n))
            pooler_dense.add(n)
        elif not (descendants([n]) & pooler_dense) and n not in pooler_dense:
            heads.append(Head("classifier", n))
    return heads
