"""`optimize --measure` for decoders: what users run, not one example step.

A decoder is timed as it is used: the prefill of a prompt of realistic length, and decode
tokens per second at that context, each against the unoptimized engine built the same way,
the two engines run in alternation so that drift in the machine's speed falls on both.
"""
from __future__ import annotations

import statistics

import numpy as np

from skimformer.backends.engine import Engine

PROMPT_TOKENS = 512
DECODE_TOKENS = 32
ROUNDS = 3


def measure_decoder(baseline: Engine, engine: Engine, vocab: int, prompt_tokens: int = PROMPT_TOKENS,
                    decode_tokens: int = DECODE_TOKENS, rounds: int = ROUNDS) -> dict:
    """Prefill milliseconds and decode tokens/s of `engine` and `baseline` on one random prompt."""
    return summarize(timed_requests(baseline, engine, vocab, prompt_tokens, decode_tokens, rounds), prompt_tokens,
                     decode_tokens)


def timed_requests(baseline: Engine, engine: Engine, vocab: int, prompt_tokens: int, decode_tokens: int,
                   rounds: int) -> dict[str, list]:
    """`rounds` requests (one random prompt's prefill, then `decode_tokens` steps) of each engine,
    alternating: `{"baseline": [Generation, ...], "optimized": [...]}`, round by round."""
    prompt = np.random.default_rng(0).integers(0, vocab, (1, prompt_tokens))
    runs = {"baseline": [], "optimized": []}
    for _ in range(rounds):
        for name, which in (("baseline", baseline), ("optimized", engine)):
            runs[name].append(which.generate_with_stats(prompt, decode_tokens))
    return runs


def summarize(runs: dict[str, list], prompt_tokens: int, decode_tokens: int) -> dict:
    """`timed_requests`' medians: prefill milliseconds, decode tokens/s, and their ratios."""
    prefill = {k: statistics.median(g.prefill_seconds for g in v) * 1e3 for k, v in runs.items()}
    decode = {k: statistics.median(g.decode_tokens_per_s for g in v) for k, v in runs.items()}
    return {"prefill": {"prompt_tokens": prompt_tokens, "baseline_ms": round(prefill["baseline"], 2),
                        "optimized_ms": round(prefill["optimized"], 2),
                        "ratio": round(prefill["baseline"] / prefill["optimized"], 3)},
            "decode": {"context_tokens": prompt_tokens, "tokens": decode_tokens - 1,
                       "baseline_tokens_per_s": round(decode["baseline"], 2),
                       "optimized_tokens_per_s": round(decode["optimized"], 2),
                       "ratio": round(decode["optimized"] / decode["baseline"], 3)}}
