"""Run a decoder's programs in torch behind the engine's `run(feeds, role)` interface, so the
decoding loops can be checked against the programs themselves without building an engine; and an
early-exit decode program with steps that exit and steps that do not, for the backends' checks
of its control flow."""
from __future__ import annotations

import numpy as np
import torch

from skimformer import load
from skimformer.backends.teacher_forcing import program_runner as torch_runner  # noqa: F401  (the tests' name)
from skimformer.ir import Program
from skimformer.passes import PassManager, pipeline_from
from skimformer.passes.early_exit import confidence
from skimformer.zoo import build_model


def hidden_after(hf, prefill: dict, decode: dict, blocks: int) -> torch.Tensor:
    """The transformers model's residual stream after its first `blocks` layers at the decode
    step's positions, computed over the whole sequence (prefill example, then decode example)."""
    n = decode["input_ids"].shape[1]
    with torch.no_grad():
        out = hf(input_ids=torch.cat([prefill["input_ids"], decode["input_ids"]], 1),
                 attention_mask=decode["attention_mask"],
                 position_ids=torch.cat([prefill["position_ids"], decode["position_ids"]], 1),
                 output_hidden_states=True)
    return out.hidden_states[blocks][:, -n:]


def exit_decode_taking_both_branches(tiny_decoder) -> tuple[Program, list[dict]]:
    """The zoo llama's decode program with `early-exit(at=[0])` at the median confidence of some
    one-row decode steps (of 1-3 tokens), and those steps: some leave after block 0, some do not."""
    feeds = _decode_feeds(tiny_decoder, (1, 1, 2, 3, 1, 2))
    threshold = float(np.median(_exit_confidences(tiny_decoder, feeds)))
    model = PassManager(pipeline_from(f"early-exit(at=[0], threshold={threshold})")).run(load(tiny_decoder))[0]
    return model.programs["decode"], feeds


def assert_runs_both_branches_like(run, decode: Program, feeds: list[dict]) -> None:
    """`run(numpy feeds) -> numpy outputs` matches `decode` on every step, and left after block 0
    on some steps and ran both blocks on others."""
    depths = []
    for feed in feeds:
        want = decode.run(feed)
        got = run({k: v.numpy() for k, v in feed.items()})
        for name, value in want.items():
            np.testing.assert_allclose(got[name], value.numpy(), atol=1e-4, err_msg=name)
        depths.append(int(got["exit_layer"]))
    assert sorted(set(depths)) == [1, 2], depths


def _decode_feeds(tiny_decoder, lengths) -> list[dict]:
    """One-row decode steps of `n` random tokens after the first prefill example's 16-token cache."""
    example = load(tiny_decoder).programs["decode"].example_inputs
    past = example["past_key_0"].shape[2]
    g = torch.Generator().manual_seed(0)
    return [{**{k: v[:1] for k, v in example.items() if k.startswith("past_")},
             "input_ids": torch.randint(3, 300, (1, n), generator=g),
             "attention_mask": torch.ones(1, past + n, dtype=torch.long),
             "position_ids": torch.arange(past, past + n)[None]} for n in lengths]


def _exit_confidences(tiny_decoder, feeds: list[dict]) -> list[float]:
    """The max-prob confidence of the head applied after block 0 at each decode feed, from the
    transformers model (what the exit's torch.cond compares with the threshold)."""
    hf = build_model("llama")
    prefill = {k: v[:1] for k, v in load(tiny_decoder).programs["prefill"].example_inputs.items()}
    with torch.no_grad():
        return [float(confidence(hf.lm_head(hf.model.norm(hidden_after(hf, prefill, feed, 1))), "max-prob")[0])
                for feed in feeds]
