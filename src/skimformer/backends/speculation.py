"""The self-speculative decoding loop of an engine with `draft` and `verify` programs
(`passes.self_speculate`): greedy, and token for token what greedy decoding with the full model
gives.

Each round starts from `token`, the newest token, not yet in the cache. The draft program runs
`draft + 1` one-token steps (`token` and the `draft` tokens it proposes), extending the cache of
its layers and returning each step's hidden state; the verify program runs the remaining layers
over those `draft + 1` positions at once and gives the full model's next token after each. The
drafted tokens are kept up to the first disagreement (the smallest such prefix over the batch's
unfinished rows), followed by the full model's own token there; every cache is then trimmed to
the kept tokens, which is why the cache must be a plain growing one.
"""
from __future__ import annotations

import time
from typing import Callable

import numpy as np

from skimformer.backends.generation import MASK, Finisher, Generation, Prompt
from skimformer.errors import UserError
from skimformer.ir.signature import carried_input

HIDDEN = "hidden_states"
SEQUENCE_AXIS = 2  # of every cache tensor, [B, H_kv, T, D] (decoder convention)


def _agreed(drafts: np.ndarray, verified: np.ndarray, rows: np.ndarray) -> int:
    """Leading drafted tokens that the full model agrees with, in every row of `rows`."""
    same = drafts == verified[:, : drafts.shape[1]]
    prefix = np.cumprod(same, axis=1).sum(axis=1)
    return int(prefix[rows].min()) if rows.any() else drafts.shape[1]


def _trim(cache: dict[str, np.ndarray], drop: int) -> dict[str, np.ndarray]:
    if not drop:
        return cache
    return {k: np.take(v, np.arange(v.shape[SEQUENCE_AXIS] - drop), axis=SEQUENCE_AXIS) for k, v in cache.items()}


def speculate(run: Callable[[dict, str], dict], prompt_ids, max_new_tokens: int, draft: int, attention_mask=None,
              eos_token_id: int | None = None) -> Generation:
    """Generate greedily with draft-then-verify rounds; `extra` holds `acceptance` (fraction of
    drafted tokens kept) and `rounds`."""
    if draft < 1:
        raise UserError(f"the draft length must be >= 1; got {draft}")
    prompt = Prompt.of(prompt_ids, attention_mask, max_new_tokens)
    start = time.perf_counter()
    out = prompt.prefill(run)
    prefill_seconds = time.perf_counter() - start
    cache = {carried_input(k): v for k, v in out.items() if carried_input(k)}
    rows = prompt.ids.shape[0]
    finish = Finisher(rows, eos_token_id)
    token = finish(out["logits"][:, -1].argmax(-1).astype(np.int64))
    generated, mask, position = [token], prompt.mask, prompt.positions[:, -1:] + 1
    drafted = kept = rounds = 0
    while len(generated) < max_new_tokens and not finish.done:
        step_token, hidden, proposals = token, [], []
        for k in range(draft + 1):
            mask = np.concatenate([mask, np.ones((rows, 1), dtype=np.int64)], axis=1)
            step = run({"input_ids": step_token[:, None], MASK: mask, "position_ids": position + k, **cache}, "draft")
            cache.update({carried_input(n): v for n, v in step.items() if carried_input(n)})
            hidden.append(step[HIDDEN])
            step_token = step["logits"][:, -1].argmax(-1).astype(np.int64)
            if k < draft:
                proposals.append(step_token)
        checked = run({HIDDEN: np.concatenate(hidden, axis=1), MASK: mask,
                       "position_ids": position + np.arange(draft + 1), **cache}, "verify")
        cache.update({carried_input(n): v for n, v in checked.items() if carried_input(n)})
        verified = checked["logits"].argmax(-1).astype(np.int64)  # [B, draft + 1]
        proposals = np.stack(proposals, axis=1)
        n = _agreed(proposals, verified, ~finish.finished)
        for t in list(proposals[:, :n].T) + [verified[:, n]]:
            generated.append(finish(t))
        drop = draft - n
        cache, mask = _trim(cache, drop), mask[:, : mask.shape[1] - drop]
        position = position + n + 1
        token = generated[-1]
        drafted, kept, rounds = drafted + draft, kept + n, rounds + 1
    ids = np.stack(generated[:max_new_tokens], axis=1)
    extra = {"acceptance": kept / drafted if drafted else 0.0, "rounds": rounds, "draft": draft}
    return Generation(ids, int(sum(v.nbytes for v in cache.values())), time.perf_counter() - start, rounds, extra,
                      prefill_seconds)
