"""Spare the ONNX exporter its type-promotion run where no operand would be cast.

After decomposing, `torch.onnx.export` inserts explicit casts where an op mixes dtypes
(`InsertTypePromotion`): it runs every node of the program again on fake tensors to learn its
operands' dtypes, 10 of 26 s when lowering a KIVI decoder's decode program. Every node already
carries those dtypes in `meta["val"]`, so the same rules are checked from there first; only a
program in which some operand would be cast goes through the exporter's pass.
"""
from __future__ import annotations

import torch
import torch.fx as fx

from skimformer.backends.exporter_step import exporter_step_replaced


def _would_cast(arg, dtype: torch.dtype | None, scalar_dtype) -> bool:
    """Whether the exporter's pass would cast `arg` (a node, a Python number, or a list of them)
    to `dtype`, as its `_maybe_promote_arg` decides."""
    if dtype is None or arg is None:
        return False
    if isinstance(arg, (tuple, list)):
        return any(_would_cast(a, dtype, scalar_dtype) for a in arg)
    value = arg.meta["val"] if isinstance(arg, fx.Node) else arg
    own = value.dtype if isinstance(value, torch.Tensor) else scalar_dtype(type(value))
    if own is None:
        raise TypeError(f"no dtype for {type(value).__name__}")  # the exporter's pass raises too: let it
    return own != dtype


def needs_promotion(module: fx.GraphModule) -> bool:
    """Whether the exporter's type promotion would change any node of `module` (its branch
    modules included); True where an operand's dtype is unknown."""
    from torch.onnx._internal.fx import type_utils
    from torch.onnx._internal.fx.passes import type_promotion

    table = type_promotion.TypePromotionTable()
    try:
        for gm in module.modules():
            for node in gm.graph.nodes:
                rule = type_promotion.get_type_promotion_rule(node, table) if node.op == "call_function" else None
                if rule is None:
                    continue
                args, kwargs = fx.map_arg((node.args, node.kwargs), lambda a: a.meta["val"])
                wanted = rule.preview_type_promotion(args, kwargs)
                pairs = [*((node.args[i], d) for i, d in wanted.args_dtypes.items()),
                         *((node.kwargs.get(k), d) for k, d in wanted.kwargs_dtypes.items())]
                if any(_would_cast(a, d, type_utils.from_scalar_type_to_torch_dtype) for a, d in pairs):
                    return True
    except (KeyError, TypeError, IndexError):  # a node without a recorded value: the exporter's own way
        return True
    return False


def promote_only_when_needed():
    """Within the block, the exporter's type promotion runs only on programs that need a cast."""
    def replacement(promote):
        def when_needed(graph_module):
            if needs_promotion(graph_module):
                promote(graph_module)
        return when_needed

    return exporter_step_replaced("insert_type_promotion_nodes", replacement)
