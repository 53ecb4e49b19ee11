"""`analyze(program) -> Structure`: the semantic view of a program that passes rely on."""
from __future__ import annotations

from dataclasses import dataclass

import torch.fx as fx

from skimformer.ir.attention import AttentionSite, find_attention
from skimformer.ir.blocks import Block, find_blocks
from skimformer.ir.heads import Head, find_heads
from skimformer.ir.kv_cache import KVCache, find_kv_cache
from skimformer.ir.program import Program
from skimformer.ir.token_axis import propagate


@dataclass
class Structure:
    """Blocks, attention sites, the residual stream's token axis, KV-cache ports and heads."""

    program: Program
    blocks: list[Block]
    attention: list[AttentionSite]
    token_axis: int | None
    kv_cache: KVCache
    heads: list[Head]
    skim_ops: list[fx.Node]

    @property
    def is_transformer(self) -> bool:
        return bool(self.attention)

    def summary(self) -> dict:
        """The fields `inspect --json` promises (issue #2), plus detail for humans."""
        return {
            "role": self.program.role,
            "blocks": len(self.blocks),
            "attention_sites": len(self.attention),
            "token_axis": self.token_axis,
            "kv_cache": {"inputs": len(self.kv_cache.inputs), "outputs": len(self.kv_cache.outputs)},
            "heads": sorted({h.name for h in self.heads}),
            "inputs": self.program.input_specs(),
            "outputs": self.program.output_specs(),
            "skim_ops": sorted({str(n.target) for n in self.skim_ops}),
            "uniform_blocks": len({b.signature for b in self.blocks}) <= 1,
            "detail": {
                "blocks": [b.describe() for b in self.blocks],
                "attention": [a.describe() for a in self.attention],
                "kv_cache": {"inputs": [vars(p) for p in self.kv_cache.inputs],
                             "outputs": [vars(p) for p in self.kv_cache.outputs]},
                "heads": [h.describe() for h in self.heads],
            },
        }


def analyze(program: Program) -> Structure:
    graph = program.ep.graph
    sig = program.ep.graph_signature
    params = set(sig.inputs_to_parameters) | set(sig.inputs_to_buffers) | set(sig.inputs_to_lifted_tensor_constants)
    sites = find_attention(graph)
    blocks = find_blocks(graph, sites, params)
    first = next((b for b in blocks if b.input_axis is not None), None)
    token_axis = first.input_axis.dim if first is not None and first.input_axis.plain else None
    placeholders = {n.name: n for n in graph.nodes if n.op == "placeholder"}
    user_inputs = {placeholders[name]: name for name in program.input_names}
    user_outputs = dict(zip(program.output_nodes(), program.output_names))
    layer_sites = [(b.index, s) for b in blocks for s in b.attention]
    kv = find_kv_cache(layer_sites, user_inputs, user_outputs)
    last = next((b for b in reversed(blocks) if b.output is not None), None)
    last_axis = propagate(first.input, first.input_axis).get(last.output) if first and last else None
    block_nodes = {n for b in blocks for n in b.nodes}
    heads = find_heads(graph, last.output if last else None, last_axis, block_nodes, set(user_outputs))
    skim = [n for n in graph.nodes if n.op == "call_function" and str(n.target).startswith("skim.")]
    return Structure(program, blocks, sites, token_axis, kv, heads, skim)
