"""Find the KV-cache ports: program inputs that carry past keys/values and outputs that carry
present ones, per layer.

A port is a program input or output joined to an attention site's k or v by data movement alone
(concatenation, head expansion, reshapes, casts): `input_ids` also reaches k, but only through a
projection, so it is not a port.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch.fx as fx

from skimformer.ir.attention import HEAD_MOVES, AttentionSite
from skimformer.ir.graph import op_name

KV_MOVES = HEAD_MOVES | {"cat", "transpose", "permute", "getitem", "index_select", "detach", "alias"}


@dataclass(frozen=True)
class KVPort:
    name: str  # the program input or output name
    layer: int  # block index
    kind: str  # "key" or "value"


@dataclass
class KVCache:
    inputs: list[KVPort]
    outputs: list[KVPort]

    def describe(self) -> dict:
        return {"inputs": len(self.inputs), "outputs": len(self.outputs),
                "layers": sorted({p.layer for p in self.inputs + self.outputs})}


def _sources(start: fx.Node, outputs: dict[fx.Node, str], inputs: dict[fx.Node, str]):
    """Input and output names reached from `start` backwards through data movement."""
    found_in, found_out, todo, seen = [], [], [start], set()
    while todo:
        node = todo.pop()
        if node in seen:
            continue
        seen.add(node)
        if node in outputs:
            found_out.append(outputs[node])
        if node in inputs:
            found_in.append(inputs[node])
        if node is start or op_name(node) in KV_MOVES:
            todo.extend(a for a in node.all_input_nodes if a.op != "get_attr")
    return found_in, found_out


def find_kv_cache(sites_by_layer: list[tuple[int, AttentionSite]], user_inputs: dict[fx.Node, str],
                  user_outputs: dict[fx.Node, str]) -> KVCache:
    ins, outs = {}, {}
    for layer, site in sites_by_layer:
        for kind, node in (("key", site.k), ("value", site.v)):
            found_in, found_out = _sources(node, user_outputs, user_inputs)
            for name in found_in:
                ins.setdefault(name, KVPort(name, layer, kind))
            for name in found_out:
                outs.setdefault(name, KVPort(name, layer, kind))
    return KVCache(inputs=list(ins.values()), outputs=list(outs.values()))
