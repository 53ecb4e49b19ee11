"""The selection step that the pruning passes share: score tokens with one attention site, pick
the top `keep` fraction, gather them. Each pass adds its own ending (EViT's fused token, or the
cache that prompt pruning keeps short)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx

from skimformer.ir.attention import AttentionSite
from skimformer.ir.graph import shape
from skimformer.kernels.tokens import default_scale, kept_count

skim = torch.ops.skim
aten = torch.ops.aten


@dataclass
class Selection:
    scores: fx.Node
    idx: fx.Node  # [B, K] kept token indices
    kept: fx.Node  # the point's tensor with only those tokens
    count: int | None  # K when the token count is static
    size: int | fx.Node  # the token count before selection (a sym_size node when dynamic)
    nodes: set


def select_tokens(graph: fx.Graph, x: fx.Node, site: AttentionSite, dim: int, mode: int, keep: float,
                  protect: int) -> Selection:
    """Insert score -> top-k -> gather for `x` along `dim`, scored by `site` in `mode`
    (see `skim::token_scores`)."""
    scale = site.node.kwargs.get("scale") or default_scale(shape(site.q)[-1])
    call = graph.call_function
    n = shape(x)[dim]
    scores = call(skim.token_scores.default, (site.q, site.k, site.mask, float(scale), mode))
    idx = call(skim.topk_tokens.default, (scores, site.mask, float(keep), protect))
    kept = call(skim.gather_tokens.default, (x, idx, dim))
    nodes = {scores, idx, kept}
    if isinstance(n, int):
        return Selection(scores, idx, kept, kept_count(n, keep, protect), n, nodes)
    size = call(aten.sym_size.int, (x, dim))
    return Selection(scores, idx, kept, None, size, nodes | {size})
