"""A trial's two objectives: fidelity figures (budget metrics) and its speed ratio.

Fidelity compares a candidate's outputs with the unoptimized engine's on the same rows:
- encoders: `cosine`, the mean over rows of the cosine between the first outputs, a per-token
  output (`[B, N, D]`) mean-pooled over the attention mask first: token-reduction passes restore
  removed tokens only approximately (each takes its representative's value), and what is read
  from a per-token encoder is its pooled embedding, not its padding; `agreement`, the top-1
  agreement of a logits output; `top1-drop`, accuracy points lost against the labels.
- decoders: teacher-forced (both fed the same text, position by position): `agreement` of the
  next-token argmax, `cosine` of the next-token logits, `ppl-ratio` of the perplexities of the
  fed text, and `kl` (nats).

Each budget metric comes with `METRIC_bound`, its one-sided 90% confidence bound over the rows
(or a decoder's positions) it was measured on, on the side the budget bounds: budgets are checked
on it, so a choice keeps its budget on rows the search never saw. On a few hundred labelled
images one point of accuracy is two images: a candidate that fixes three and breaks four shows a
small drop whose bound is two points, where one that changes no prediction is exact.

Speed is a ratio to the unoptimized engine timed in the same process, the two run in alternation
(so drift in a machine's speed falls on both, and workers of different speeds give comparable
ratios): an encoder's time per call on a batch of search rows; a decoder's time for a request,
the prefill of a prompt plus its decode steps (`backends.measure`). It is the geometric mean of
the rounds' paired ratios, with `ratio_bound`, its one-sided 90% lower bound: on a shared
machine two timings of one engine differ by 10-20%, and a gain a search measured once can be
that noise (a 17-token model measured 1.26x in a search and 0.89x in a benchmark an hour later).
"""
from __future__ import annotations

import statistics
import time

import numpy as np
import torch

from skimformer.backends.engine import Engine
from skimformer.backends.measure import summarize, timed_requests
from skimformer.backends.teacher_forcing import Decoder, Run, forced_logits
from skimformer.passes.fidelity import next_token_metrics

Z_90 = 1.2816  # the standard normal's 90% quantile: one-sided 90% bounds
TIMING_S = 2.0  # an encoder's timing: at least MIN_RUNS calls of each engine, then until this is spent
MIN_RUNS = 5
DECODE_TOKENS = 16  # a decoder's request: the prompt's prefill, then these decode steps
DECODER_ROUNDS = 5  # requests of each engine, alternating: the speed bound needs a few


def encoder_figures(reference: np.ndarray, candidate: np.ndarray, name: str, mask: np.ndarray | None,
                    labels: np.ndarray | None) -> dict[str, float]:
    """Budget figures of an encoder's first output `name` (rows first) against the reference's."""
    if candidate.shape != reference.shape:
        return {}
    ref, got = _pooled(reference, mask), _pooled(candidate, mask)
    cos = (ref * got).sum(-1) / np.maximum(np.linalg.norm(ref, axis=-1) * np.linalg.norm(got, axis=-1), 1e-12)
    figures = {**_bounded("cosine", cos, floor=True), "cosine_min": float(cos.min())}
    if name.endswith("logits"):
        figures.update(_bounded("agreement", reference.argmax(-1) == candidate.argmax(-1), floor=True))
        if labels is not None and reference.ndim == 2:
            right, right_ref = candidate.argmax(-1) == labels, reference.argmax(-1) == labels
            figures.update({**_bounded("top1-drop", 100.0 * (right_ref.astype(np.float64) - right), floor=False),
                            "top1": float(right.mean()), "top1_reference": float(right_ref.mean())})
    return figures


def _bounded(metric: str, samples: np.ndarray, floor: bool, scale=float) -> dict[str, float]:
    """`metric`, the mean of per-row (or per-position) `samples`, and `METRIC_bound`, its one-sided
    90% confidence bound below (`floor`) or above it (normal approximation; exact when every
    sample is equal, as for a pass that changes no prediction); `scale` maps both (a log-ratio to
    a ratio)."""
    x = np.asarray(samples, dtype=np.float64).ravel()
    mean = float(x.mean())
    half = Z_90 * float(x.std(ddof=1)) / np.sqrt(x.size) if x.size > 1 else 0.0
    return {metric: scale(mean), f"{metric}_bound": scale(mean - half if floor else mean + half)}


def _pooled(x: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    """Rows as vectors `[B, F]` in float64: a `[B, N, D]` output mean-pooled over `mask`'s tokens."""
    x = x.astype(np.float64)
    if x.ndim == 3:
        m = mask[..., None].astype(np.float64) if mask is not None and mask.shape == x.shape[:2] else np.ones_like(x[..., :1])
        return (x * m).sum(1) / np.maximum(m.sum(1), 1e-9)
    return x.reshape(len(x), -1)


def teacher_forced(run: Run, ids: np.ndarray, mask: np.ndarray, prompt: int) -> np.ndarray:
    """Logits `[B, n, V]` predicting each of `ids[:, prompt:]`: the prompt is prefilled, then the
    rest is fed a decode step a token, the carried state threaded as the engine threads it."""
    decoder = Decoder.prefill(run, ids[:, :prompt], mask[:, :prompt])
    return np.concatenate(list(forced_logits(decoder, ids[:, prompt:])), axis=1)


def decoder_figures(reference: np.ndarray, candidate: np.ndarray, targets: np.ndarray) -> dict[str, float]:
    """Budget figures from teacher-forced logits `[B, n, V]` predicting `targets` `[B, n]`."""
    ref, got = torch.from_numpy(reference).double(), torch.from_numpy(candidate).double()
    nll = [_nll(x, targets) for x in (ref, got)]
    return {**_bounded("agreement", (ref.argmax(-1) == got.argmax(-1)).numpy(), floor=True),
            **_bounded("cosine", torch.nn.functional.cosine_similarity(ref, got, dim=-1).numpy(), floor=True),
            **_bounded("ppl-ratio", (nll[1] - nll[0]).numpy(), floor=False, scale=lambda m: float(np.exp(m))),
            "kl": next_token_metrics(reference, candidate)["next_token_kl"]}


def _nll(logits: torch.Tensor, targets: np.ndarray) -> torch.Tensor:
    """Per position, the negative log-likelihood of `targets` `[B, n]` under `logits` `[B, n, V]`."""
    return -logits.log_softmax(-1).gather(-1, torch.from_numpy(targets)[..., None])[..., 0]


def encoder_speed(baseline: Engine, engine: Engine, feeds: dict[str, np.ndarray]) -> dict:
    """Median ms per call of both engines on `feeds`, run in alternation, and their ratio."""
    engines = (baseline, engine)
    for e in engines:  # warm-up
        e.run(feeds)
    samples, start = ([], []), time.perf_counter()
    while len(samples[0]) < MIN_RUNS or (time.perf_counter() - start < TIMING_S and len(samples[0]) < 200):
        for e, out in zip(engines, samples):
            t = time.perf_counter()
            e.run(feeds)
            out.append((time.perf_counter() - t) * 1e3)
    base, opt = (statistics.median(s) for s in samples)
    return {**paired_ratio(*samples), "baseline_ms": round(base, 3), "optimized_ms": round(opt, 3),
            "runs": len(samples[0])}


def paired_ratio(baseline: list[float], optimized: list[float]) -> dict[str, float]:
    """`ratio`, the geometric mean of the per-round time ratios baseline / optimized (each round
    times both engines back to back), and `ratio_bound`, its one-sided 90% lower bound."""
    logs = np.log(np.asarray(baseline, dtype=np.float64) / np.asarray(optimized, dtype=np.float64))
    return _bounded("ratio", logs, floor=True, scale=lambda m: float(np.exp(m)))


def decoder_speed(baseline: Engine, engine: Engine, vocab: int, prompt: int) -> dict:
    """A request's time (prefill of `prompt` tokens, then DECODE_TOKENS steps) of both engines,
    and its ratio; prefill and decode ratios alongside."""
    tokens = DECODE_TOKENS + 1
    runs = timed_requests(baseline, engine, vocab, prompt, tokens, DECODER_ROUNDS)
    m = summarize(runs, prompt, tokens)
    request = {k: [1e3 * g.seconds for g in v] for k, v in runs.items()}
    return {**paired_ratio(request["baseline"], request["optimized"]),
            "baseline_ms": round(statistics.median(request["baseline"]), 2),
            "optimized_ms": round(statistics.median(request["optimized"]), 2),
            "prefill_ratio": m["prefill"]["ratio"], "decode_ratio": m["decode"]["ratio"], "prompt_tokens": prompt,
            "decode_tokens": m["decode"]["tokens"]}
