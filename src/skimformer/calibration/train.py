"""Train one exit adapter with the backbone frozen, and choose the exits' thresholds.

Training distils the full model into the exit: minimise KL(full model || head(adapt(h_k))) over
the training positions, with Adam on the adapter alone (gradients flow through the frozen head
but are only taken for `down` and `up`). Thresholds follow CALM's calibration idea: on held-out
positions, an exit's threshold is the lowest at which the positions it would take agree with the
full model's top-1 at least `target` of the time.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F

from skimformer.calibration.backbone import Backbone, Captured
from skimformer.ir.exit_heads import adapt, identity_adapter
from skimformer.passes.early_exit import confidence

LR = 1e-2  # best of 1e-3, 3e-3 and 1e-2 on SmolLM2-135M (exits after blocks 6 and 26)
GRID = [i / 100 for i in range(100)] + [0.995, 0.999]  # exit when confidence > t; max-prob crowds near 1
NEVER = 1.0  # no confidence exceeds it

Adapter = tuple[torch.Tensor, torch.Tensor]


def train_adapter(backbone: Backbone, k: int, batches: list[Captured], rank: int, steps: int,
                  generator: torch.Generator, progress: Callable[[str], None]) -> Adapter:
    """The adapter for the exit after block `k`, after `steps` Adam steps of one batch each
    (batches in shuffled epochs; the learning rate decays linearly to zero)."""
    down, up = identity_adapter(batches[0].hidden[k].shape[-1], rank, generator)
    params = [down.requires_grad_(), up.requires_grad_()]
    optimizer = torch.optim.Adam(params, lr=LR)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 - step / max(steps, 1))
    epochs = math.ceil(steps / len(batches))
    order = [i for _ in range(epochs) for i in torch.randperm(len(batches), generator=generator).tolist()][:steps]
    for step, i in enumerate(order, 1):
        batch = batches[i]
        logits = backbone.head(adapt(batch.hidden[k], down, up), batch)
        loss = F.kl_div(logits.float().log_softmax(-1), batch.log_probs, log_target=True, reduction="batchmean")
        optimizer.zero_grad()
        loss.backward(inputs=params)
        optimizer.step()
        schedule.step()
        if step % 50 == 0 or step == steps:
            progress(f"exit {k}: step {step}/{steps}, KL {loss.item():.3f}")
    return down.detach(), up.detach()


@torch.no_grad()
def judge(backbone: Backbone, k: int, adapter: Adapter | None, batches: list[Captured],
          criterion: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Per position of `batches`: the exit's confidence and whether its top-1 is the full model's.
    `adapter=None` is the plain exit (the head on the block's output)."""
    confidences, agrees = [], []
    for batch in batches:
        hidden = batch.hidden[k] if adapter is None else adapt(batch.hidden[k], *adapter)
        logits = backbone.head(hidden, batch)
        confidences.append(confidence(logits, criterion))
        agrees.append(logits.argmax(-1) == batch.log_probs.argmax(-1))
    return torch.cat(confidences), torch.cat(agrees)


def choose_thresholds(judged: dict[int, tuple[torch.Tensor, torch.Tensor]],
                      target: float) -> tuple[dict[int, float], dict[int, float]]:
    """Thresholds and exit rates, exits tried in order as the program tries them: an exit sees
    the positions no earlier exit took, and gets the lowest threshold on `GRID` at which the
    positions above it agree at least `target` of the time (`NEVER` when none does)."""
    total = len(next(iter(judged.values()))[0])
    remaining = torch.ones(total, dtype=torch.bool)
    thresholds, rates = {}, {}
    for k in sorted(judged):
        conf, agree = judged[k]
        thresholds[k] = next((t for t in GRID if _agreement(agree[remaining & (conf > t)]) >= target), NEVER)
        taken = remaining & (conf > thresholds[k])
        rates[k] = int(taken.sum()) / total
        remaining &= ~taken
    return thresholds, rates


def _agreement(agree: torch.Tensor) -> float:
    """The fraction that agrees; 0 for no positions (an exit that takes nothing earns no threshold)."""
    return float(agree.float().mean()) if len(agree) else 0.0
