"""The exported ONNX graph's clean-up: what torch's exporter runs when asked to optimize
(onnxscript's constant folding, its default rewrite rules, dead-node removal, then its standard
fusions), without the default rules whose matcher is quadratic in the graph's size.

`SlicesSplit` (two Slices of one tensor become one Split) is a pattern with two output nodes,
which onnxscript matches by pairing every Slice with every node of the graph. A decoder has
Slice pairs in every layer (rotary's halves) and thousands of nodes: on SmolLM2 that one rule
took two thirds of a whole build's CPU time, for a Split that ONNX Runtime runs no faster.
"""
from __future__ import annotations

import onnx_ir as ir
import onnx_ir.passes.common as common
from onnxscript import optimizer, rewriter
from onnxscript.rewriter import onnx_fusions

QUADRATIC_RULES = frozenset({"SlicesSplit"})
ROUNDS = 2  # as the exporter: folding exposes rewrites, rewrites expose folding


def _rules() -> rewriter.RewriteRuleSet:
    return rewriter.RewriteRuleSet([r for r in rewriter._DEFAULT_REWRITE_RULES if r.name not in QUADRATIC_RULES])


def clean_up(model: ir.Model) -> None:
    """Optimize the exported `model` in place, as `torch.onnx.export(optimize=True)` would."""
    common.InlinePass()(model)
    rules = _rules()
    for _ in range(ROUNDS):
        folded = optimizer.fold_constants(model, onnx_shape_inference=True)
        rewritten = rules.apply_to_model(model)
        optimizer.remove_unused_nodes(model)
        if not folded.modified and not rewritten:
            break
    optimizer.remove_unused_functions(model)
    ir.passes.Sequential(
        common.RemoveUnusedOpsetsPass(),
        common.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0),
        common.LiftSubgraphInitializersToMainGraphPass(),
        common.DeduplicateInitializersPass(),
        common.CommonSubexpressionEliminationPass(),
        common.OutputFixPass(),
        common.NameFixPass(),
    )(model)
    onnx_fusions.fuse(model)
