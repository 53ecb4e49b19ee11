"""Fidelity is measured where the lossy passes act, and a pass the measurement cannot reach is
reported as "not exercised", never with a perfect score."""
from __future__ import annotations

import json

import numpy as np
import pytest

from skimformer import load
from skimformer.backends.report import format_table
from skimformer.cli.main import main
from skimformer.passes import PassManager, pipeline_from


def fidelity(model, spec: str, data=None) -> dict:
    return PassManager(pipeline_from(spec), data=data).run(model)[2]


def test_kv_quant_is_measured_on_a_prompt_longer_than_its_full_precision_tail(tiny_decoder):
    fid = fidelity(load(tiny_decoder), "kv-quant(bits=2, group=8, residual=16)")
    assert fid["exercised"] == {"kv-quant": "exercised"}
    on = fid["measured_on"]
    assert on["prompt_tokens"] >= 16 + 8 and on["decode_steps"] >= 1 and on["rows"] >= 1
    assert on["inputs"].startswith("random token ids")  # the zoo's folder has no tokenizer
    assert fid["next_token_agreement"] < 1 and fid["next_token_kl"] > 0 and fid["next_token_cosine"] < 1
    assert fid["prefill.logits.cosine"] == pytest.approx(1)  # the prefill attends in full precision


def test_prompt_prune_is_measured_through_decode_steps(tiny_decoder):
    fid = fidelity(load(tiny_decoder), "prompt-prune(layer=0, keep=0.5)")
    assert fid["exercised"] == {"prompt-prune": "exercised"} and fid["measured_on"]["decode_steps"] >= 16
    assert 0 < fid["next_token_kl"] and fid["next_token_agreement"] < 1  # decode reads the pruned cache


@pytest.mark.parametrize("spec, reason", [
    ("kv-window(sink=4, window=4000)", "a prompt of at least 4005 tokens, and the model takes 256 positions"),
    ("early-exit(at=[0], threshold=1.0)", "a threshold of 1.0 never leaves"),
    ("early-exit(at=[0], threshold=0.9999)", "no measured step left at an exit (blocks run: [2])"),
])
def test_a_pass_the_measurement_cannot_reach_is_not_exercised(tiny_decoder, spec, reason):
    fid = fidelity(load(tiny_decoder), spec)
    (status,) = fid["exercised"].values()
    assert status.startswith("not exercised: ") and reason in status, status
    assert not any(isinstance(v, float) for v in fid.values()), fid  # no figures at all
    assert "not exercised" in format_table({"backend": "onnxruntime", "passes": [], "parity": {"max_abs": 0, "ok": True},
                                            "fidelity": fid, "memory": {"weights_bytes": 0}})


def test_data_rows_give_the_prompt_the_passes_need_then_decode_steps(tiny_decoder):
    model, ids = load(tiny_decoder), np.random.default_rng(0).integers(3, 300, size=(1, 40))
    fid = fidelity(model, "kv-quant(bits=8, group=8, residual=16)", data={"input_ids": ids})
    assert fid["measured_on"] == {"inputs": "the rows of --data", "rows": 1, "prompt_tokens": 24, "decode_steps": 15}
    fid = fidelity(model, "kv-quant(bits=8, group=8, residual=16)", data={"input_ids": ids[:, :20]})
    assert fid == {"exercised": {"kv-quant": "not exercised: it acts on a prompt of at least 24 tokens, and the "
                                             "20-token rows of --data leave 18 prompt tokens"}}


def test_an_encoder_pass_that_changes_nothing_is_not_exercised(exported):
    fid = fidelity(load(exported("bert")), "tome(r=0)")
    assert fid == {"exercised": {"tome": "not exercised: r=0 merges nothing"}}
    fid = fidelity(load(exported("bert")), "tome(r=2)")
    assert fid["exercised"] == {"tome": "exercised"} and fid["last_hidden_state.cosine"] < 1
    assert fid["measured_on"] == {"inputs": "the example inputs", "rows": 2, "tokens": 12}


def test_optimize_data_sets_what_fidelity_is_measured_on(exported, tmp_path, capsys):
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "in.npz", input_ids=rng.integers(3, 300, size=(3, 20)), attention_mask=np.ones((3, 20), int))
    out = tmp_path / "e"
    code = main(["optimize", str(exported("bert")), "-o", str(out), "--passes", "tome(r=2)",
                 "--data", str(tmp_path / "in.npz")])
    assert code == 0
    fid = json.loads((out / "report.json").read_text())["fidelity"]
    assert fid["measured_on"] == {"inputs": "the rows of --data", "rows": 3, "tokens": 20}
    assert fid["exercised"]["tome"] == "exercised"
    assert "| fidelity measured on | 3 rows of 20 tokens (the rows of --data) |" in (out / "report.md").read_text()
    assert main(["optimize", str(exported("bert")), "-o", str(tmp_path / "f"), "--data", str(tmp_path / "no.npz")]) == 2
    assert "cannot read fidelity inputs" in capsys.readouterr().err
