"""canonicalize-attention rewrites eager attention into SDPA, exactly."""
import math

import pytest
import torch

from skimformer import analyze, load
from skimformer.ir import Model, Program
from skimformer.passes import PassManager, pipeline_from
from skimformer.passes.manager import max_abs_error


def _run(model):
    return PassManager(pipeline_from("canonicalize-attention")).run(model)


@pytest.mark.parametrize("family", ["bert", "distilbert", "gpt2", "llama", "vit"])
def test_rewrites_every_eager_site_losslessly(exported, family):
    model = load(exported(family, "eager"))
    new, records, _ = _run(model)
    (record,) = records
    assert record.matched == 2 and record.report["rewritten"] == 2 and record.lossless
    program = new.programs["model"]
    kinds = [a.kind for a in analyze(program).attention]
    assert kinds == ["fused", "fused"]
    before = model.programs["model"]
    err, ok = max_abs_error(before.run(before.example_inputs), program.run(before.example_inputs))
    assert ok, err
    # dynamic shapes survive the rewrite: run at another batch and length
    ids = torch.randint(3, 300, (3, 7)) if family != "vit" else None
    if ids is not None:
        feeds = {"input_ids": ids, "attention_mask": torch.ones(3, 7, dtype=torch.long)}
        err, ok = max_abs_error(before.run(feeds), program.run(feeds))
        assert ok, err


def test_fused_model_is_left_alone(exported):
    model = load(exported("bert", "sdpa"))
    new, (record,), _ = _run(model)
    assert record.matched == 0 and new.programs["model"] is model.programs["model"]


class MaskedFillAttention(torch.nn.Module):
    def forward(self, q, k, v, pad):
        scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
        scores = scores.masked_fill(pad[:, None, None, :], float("-inf"))
        return torch.softmax(scores, dim=-1) @ v


class SoftCapped(torch.nn.Module):
    def forward(self, q, k, v):
        scores = torch.tanh(q @ k.transpose(-1, -2) / 30.0) * 30.0
        return torch.softmax(scores, dim=-1) @ v


def _program(module, *args):
    return Program(torch.export.export(module, args))


def test_boolean_masked_fill():
    q, k, v = (torch.randn(2, 3, 5, 8) for _ in range(3))
    pad = torch.zeros(2, 5, dtype=torch.bool)
    pad[1, 3:] = True
    program = _program(MaskedFillAttention(), q, k, v, pad)
    new, (record,), _ = _run(Model({"model": program}))
    assert record.matched == 1
    out_new = new.programs["model"].run(program.example_inputs)
    out_old = program.run(program.example_inputs)
    assert max_abs_error(out_old, out_new)[1]


def test_soft_capping_is_skipped_not_mangled():
    q, k, v = (torch.randn(1, 2, 4, 8) for _ in range(3))
    program = _program(SoftCapped(), q, k, v)
    new, (record,), _ = _run(Model({"model": program}))
    assert record.matched == 0 and len(record.report["skipped"]) == 1
