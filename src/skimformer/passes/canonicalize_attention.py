"""canonicalize-attention: rewrite every eager attention pattern into `scaled_dot_product_attention`.

Lossless. Later passes then see attention in one form, and the engines get the fused kernel.
An eager site `softmax(q @ k^T * s + mask) @ v` becomes `sdpa(q, k, v, attn_mask=mask, scale=s)`;
a boolean `masked_fill(scores, m, -inf)` / `where(m, scores, fill)` becomes a boolean mask when the
fill removes keys in the scores' dtype (`precision.mask_threshold`: fp32's -3.4e38, fp16's -65504). Sites
whose scores pass through anything else (soft-capping, a head mask after softmax, a mask added
before the scale) are left as they are and counted in the report as skipped. Run it first: it
has no ordering constraints of its own.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.fx as fx

from skimformer.ir.attention import find_attention
from skimformer.ir.graph import ancestors, descendants, op_name
from skimformer.ir.program import Program
from skimformer.ir.rewrite import reexport, tag
from skimformer.kernels.precision import mask_threshold
from skimformer.passes.base import Pass, PassResult
from skimformer.passes.registry import register

IGNORED = frozenset({"to", "_to_copy", "type_as", "clone", "contiguous", "_assert_tensor_metadata"})


@dataclass
class CanonicalizeAttentionConfig:
    """No options: every eager site that can be rewritten exactly is rewritten."""


def _scalar(x) -> float | None:
    return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) else None


class _Unsupported(Exception):
    pass


def _score_chain(qk: fx.Node, softmax: fx.Node) -> tuple[float, fx.Node | None, str]:
    """Scale, mask and mask kind of the path from q@k^T to softmax. The kind is `add` (a float
    mask added to the scores), `keep` (True where attention is allowed) or `drop` (True where a
    masked_fill removes it)."""
    path = (ancestors([softmax.args[0]]) | {softmax.args[0]}) & (descendants([qk]) | {qk})
    chain = [n for n in path if n is not qk]
    chain.sort(key=lambda n: len(ancestors([n])))
    scale, mask, kind = 1.0, None, "add"
    for step in chain:
        name = op_name(step)
        others = [a for a in step.args if not (isinstance(a, fx.Node) and a in path)]
        if name in IGNORED:
            continue
        if name in ("mul", "div") and len(others) == 1 and _scalar(others[0]) is not None and mask is None:
            scale = scale * others[0] if name == "mul" else scale / others[0]
        elif name == "add" and len(others) == 1 and isinstance(others[0], fx.Node) and mask is None:
            mask = others[0]
        elif name == "masked_fill" and mask is None and _scalar(step.args[2]) == -math.inf:
            mask, kind = step.args[1], "drop"
        elif name == "where" and mask is None and step.args[1] in path and _scalar(step.args[2]) is not None \
                and _scalar(step.args[2]) <= mask_threshold(step.meta["val"].dtype):
            mask, kind = step.args[0], "keep"
        else:
            raise _Unsupported(name)
    return scale, mask, kind


def _prob_chain_ok(softmax: fx.Node, pv: fx.Node) -> bool:
    """Only casts and inference dropout may sit between softmax and p@v."""
    node = pv.args[0]
    while node is not softmax:
        name = op_name(node)
        if name not in IGNORED and not (name == "dropout" and (node.args[1] == 0 or node.args[2] is False)):
            return False
        node = node.args[0]
    return True


def _rewrite_site(graph: fx.Graph, site) -> None:
    scale, mask, kind = _score_chain(site.scores, site.node)
    if not _prob_chain_ok(site.node, site.output):
        raise _Unsupported("probability path")
    with graph.inserting_before(site.output):
        k = site.k
        if k is site.scores.args[1]:  # keys arrived pre-transposed: undo it for sdpa
            k = tag(graph.call_function(torch.ops.aten.transpose.int, (k, -1, -2)), "canonicalize-attention")
        attn_mask = mask
        if kind == "drop":
            attn_mask = tag(graph.call_function(torch.ops.aten.logical_not.default, (mask,)), "canonicalize-attention")
        kwargs = {"attn_mask": attn_mask, "scale": scale}
        sdpa = graph.call_function(torch.ops.aten.scaled_dot_product_attention.default, (site.q, k, site.v), kwargs)
        tag(sdpa, "canonicalize-attention")
        sdpa.meta["nn_module_stack"] = dict(site.output.meta.get("nn_module_stack", {}))
    site.output.replace_all_uses_with(sdpa)


@register
class CanonicalizeAttention(Pass):
    """Rewrite eager matmul-softmax-matmul attention into scaled_dot_product_attention (lossless)."""

    name = "canonicalize-attention"
    Config = CanonicalizeAttentionConfig
    lossless = True

    def apply(self, program: Program, config: CanonicalizeAttentionConfig) -> PassResult:
        module = program.ep.module()
        graph = module.graph
        eager = [s for s in find_attention(graph) if s.kind == "eager"]
        rewritten, skipped = 0, {}
        for site in eager:
            try:
                _rewrite_site(graph, site)
                rewritten += 1
            except _Unsupported as why:
                skipped[site.node.name] = f"unsupported step: {why}"
        report = {"eager_sites": len(eager), "rewritten": rewritten, "skipped": skipped}
        if not rewritten:
            return PassResult(program, report, 0)
        graph.eliminate_dead_code()
        return PassResult(reexport(program, module), report, rewritten)
