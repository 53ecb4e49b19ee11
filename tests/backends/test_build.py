"""Engine folders: contents, parity, atomic writes, and generation for decoders."""
import json

import numpy as np
import pytest
import torch

from skimformer import Engine, UserError, VerificationError, load, optimize
from skimformer.backends import build


def test_encoder_folder(exported, tmp_path):
    out = tmp_path / "eng"
    engine = optimize(exported("bert"), output=out)
    names = sorted(p.name for p in out.iterdir())
    assert names == ["example_inputs.npz", "manifest.json", "model.onnx", "model.onnx.data", "program.pt2",
                     "report.json", "report.md"]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["files"]["model.onnx.data"] == "model weights (ONNX external data)"
    assert manifest["backend"] == "onnxruntime" and manifest["programs"]["model"]["engine"] == "model.onnx"
    assert [i["name"] for i in manifest["programs"]["model"]["inputs"]] == ["input_ids", "attention_mask"]
    report = json.loads((out / "report.json").read_text())
    assert report["parity"]["ok"] and report["parity"]["max_abs"] < 1e-4
    assert report["memory"]["weights_bytes"] > 0 and report["passes"] == []
    assert load(out / "program.pt2").programs["model"].input_names == ["input_ids", "attention_mask"]
    # the engine runs at other batch sizes and lengths and matches eager torch
    program = load(exported("bert")).programs["model"]
    feeds = {"input_ids": torch.randint(3, 300, (3, 9)), "attention_mask": torch.ones(3, 9, dtype=torch.long)}
    want = program.run(feeds)["last_hidden_state"].numpy()
    got = Engine.load(out).run(feeds)["last_hidden_state"]
    np.testing.assert_allclose(got, want, atol=1e-4)
    assert engine.folder == out


def test_existing_folder_is_refused_then_replaced_with_force(exported, tmp_path):
    out = tmp_path / "eng"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(UserError, match="already exists"):
        optimize(exported("bert"), output=out)
    assert (out / "keep.txt").exists()
    optimize(exported("bert"), output=out, force=True)
    assert not (out / "keep.txt").exists() and (out / "model.onnx").exists()


def test_failed_parity_writes_nothing(exported, tmp_path, monkeypatch):
    monkeypatch.setattr(build, "parity", lambda model, engine, lossy=False: {"max_abs": 1.0, "ok": False, "programs": {}})
    out = tmp_path / "eng"
    with pytest.raises(VerificationError):
        optimize(exported("bert"), output=out)
    assert list(tmp_path.iterdir()) == []


def test_measure_reports_speed(exported, tmp_path):
    optimize(exported("vit"), output=tmp_path / "eng", measure=True, passes="canonicalize-attention")
    speed = json.loads((tmp_path / "eng" / "report.json").read_text())["speed"]
    assert speed["baseline_ms"] > 0 and speed["optimized_ms"] > 0
    assert speed["ratio"] == pytest.approx(speed["baseline_ms"] / speed["optimized_ms"], rel=0.01)


def test_measure_times_a_decoder_as_it_is_used(tiny_decoder, tmp_path):
    """Prefill of a realistic prompt and decode tokens/s at that context, each against the
    unoptimized engine: not one example step with prefill and decode added up."""
    optimize(tiny_decoder, "kv-quant(scheme=channel, bits=8)", output=tmp_path / "eng", measure=True)
    report = json.loads((tmp_path / "eng" / "report.json").read_text())
    prefill, decode = report["speed"]["prefill"], report["speed"]["decode"]
    assert prefill["prompt_tokens"] == decode["context_tokens"] == 512 and decode["tokens"] == 31
    assert prefill["ratio"] == pytest.approx(prefill["baseline_ms"] / prefill["optimized_ms"], rel=0.01)
    assert decode["ratio"] == pytest.approx(decode["optimized_tokens_per_s"] / decode["baseline_tokens_per_s"], rel=0.01)
    assert "decode speed" in (tmp_path / "eng" / "report.md").read_text()


def test_decoder_engine_generates_like_torch(tiny_decoder, tiny_engine):
    engine = tiny_engine()
    assert sorted(engine.roles) == ["decode", "prefill"]
    report = json.loads((engine.folder / "report.json").read_text())
    assert report["parity"]["ok"] and report["memory"]["kv_cache_bytes"] > 0
    model = load(tiny_decoder)
    prompt = torch.randint(3, 200, (1, 6))
    got = engine.generate(prompt.numpy(), max_new_tokens=5)
    # reference: greedy decoding by re-running the prefill program on the growing sequence
    prefill, ids = model.programs["prefill"], prompt
    for _ in range(5):
        n = ids.shape[1]
        out = prefill.run({"input_ids": ids, "attention_mask": torch.ones(1, n, dtype=torch.long),
                           "position_ids": torch.arange(n)[None]})
        ids = torch.cat([ids, out["logits"][:, -1:].argmax(-1)], dim=1)
    assert got.tolist() == ids[:, 6:].tolist()


def test_left_padded_batch_generates_like_single_rows(tiny_engine):
    engine = tiny_engine()
    short, long = [5, 9, 14], [7, 3, 11, 20, 4, 8]
    ids = np.array([[0] * 3 + short, long])
    mask = np.array([[0] * 3 + [1] * 3, [1] * 6])
    batched = engine.generate(ids, max_new_tokens=4, attention_mask=mask)
    assert batched[0].tolist() == engine.generate([short], max_new_tokens=4)[0].tolist()
    assert batched[1].tolist() == engine.generate([long], max_new_tokens=4)[0].tolist()
