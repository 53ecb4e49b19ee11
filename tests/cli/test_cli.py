"""The command line: outputs, JSON contracts and exit codes."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

from skimformer.cli.main import main, optimize_entry

BIN = Path(sys.executable).parent


def run_cli(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_version(capsys):
    assert main(["--version"]) == 0 and "skimformer 0.1.0" in capsys.readouterr().out


def test_inspect_json(capsys, exported):
    code, out, _ = run_cli(capsys, "inspect", exported("llama"), "--json")
    info = json.loads(out)
    assert code == 0
    assert {"blocks", "attention_sites", "token_axis", "kv_cache", "heads", "inputs", "outputs"} <= set(info)
    assert info["blocks"] == 2 and info["token_axis"] == 1 and info["kv_cache"] == {"inputs": 0, "outputs": 0}
    assert info["inputs"][0] == {"name": "input_ids", "shape": info["inputs"][0]["shape"], "dtype": "int64"}


def test_inspect_text(capsys, exported):
    code, out, _ = run_cli(capsys, "inspect", exported("gpt2", "eager"))
    assert code == 0 and "blocks 2, attention sites 2, token axis 1" in out and "eager" in out


def test_passes_lists_fields(capsys):
    code, out, _ = run_cli(capsys, "passes", "--json")
    assert code == 0 and json.loads(out)["canonicalize-attention"]["lossless"] is True


def test_optimize_then_run(capsys, exported, tmp_path):
    out_dir = tmp_path / "eng"
    code, out, err = run_cli(capsys, "optimize", exported("gpt2", "eager"), "-o", out_dir,
                             "--passes", "canonicalize-attention", "--json")
    report = json.loads(out)
    assert code == 0 and report["passes"][0]["matched"] == 2 and report["parity"]["ok"]
    assert "lowering model to onnxruntime" in err
    code, out, _ = run_cli(capsys, "run", out_dir, "--json")
    rows = json.loads(out)["outputs"]
    assert code == 0 and rows[0]["name"] == "last_hidden_state" and rows[0]["shape"] == [2, 12, 300]
    feeds = tmp_path / "in.npz"
    np.savez(feeds, input_ids=np.ones((1, 5), dtype=np.int64), attention_mask=np.ones((1, 5), dtype=np.int64))
    code, out, _ = run_cli(capsys, "run", out_dir, "--inputs", feeds, "--json")
    assert json.loads(out)["outputs"][0]["shape"] == [1, 5, 300]


def test_optimize_prints_table(capsys, exported, tmp_path):
    code = optimize_entry([str(exported("bert")), "-o", str(tmp_path / "e")])
    out = capsys.readouterr().out
    assert code == 0 and "parity vs program" in out and "passes" in out


def test_pass_that_matches_nothing_warns(capsys, exported, tmp_path):
    code, _, err = run_cli(capsys, "optimize", exported("bert"), "-o", tmp_path / "e", "--passes", "canonicalize-attention")
    assert code == 0 and "matched nothing" in err


def test_cnn_builds_and_says_no_structure(capsys, tmp_path):
    cnn = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(4 * 14 * 14, 3))
    path = tmp_path / "cnn.pt2"
    torch.export.save(torch.export.export(cnn.eval(), (torch.randn(1, 3, 16, 16),)), path)
    code, out, err = run_cli(capsys, "optimize", path, "-o", tmp_path / "e")
    assert code == 0 and "no transformer structure" in err and (tmp_path / "e" / "model.onnx").exists()


def _bad_inputs(tmp_path, exported):
    random_bytes = tmp_path / "random.pt2"
    random_bytes.write_bytes(b"\x00junk" * 100)
    truncated = tmp_path / "cut.pt2"
    truncated.write_bytes(exported("bert").read_bytes()[:5000])
    state = tmp_path / "sd.pt"
    torch.save({"w": torch.ones(2)}, state)
    script = tmp_path / "ts.pt"
    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), script)
    return {"missing": ["optimize", tmp_path / "missing.pt2"], "random": ["optimize", random_bytes],
            "truncated": ["optimize", truncated], "state_dict": ["optimize", state], "torchscript": ["optimize", script],
            "unknown pass": ["optimize", exported("bert"), "--passes", "nope"],
            "bad field": ["optimize", exported("bert"), "--passes", "canonicalize-attention(x=1)"],
            "bad backend": ["optimize", exported("bert"), "--backend", "nope"],
            "inspect missing": ["inspect", tmp_path / "missing.pt2"],
            "run not an engine": ["run", tmp_path]}


def test_bad_input_exits_2_with_one_line_and_writes_nothing(capsys, exported, tmp_path):
    cases = _bad_inputs(tmp_path, exported)
    before = sorted(tmp_path.iterdir())
    for label, argv in cases.items():
        extra = ["-o", tmp_path / "out"] if argv[0] == "optimize" else []
        code, out, err = run_cli(capsys, *argv, *extra)
        lines = [line for line in err.splitlines() if line.strip()]
        assert code == 2, (label, err)
        assert len(lines) == 1 and lines[0].startswith("error:"), (label, err)
        assert sorted(tmp_path.iterdir()) == before, label


def test_entry_points_as_installed(exported, tmp_path):
    """The console scripts exit with the documented codes."""
    ok = subprocess.run([BIN / "optimize", exported("bert"), "-o", tmp_path / "e", "--json"], capture_output=True, text=True)
    assert ok.returncode == 0 and json.loads(ok.stdout)["parity"]["ok"]
    again = subprocess.run([BIN / "skimformer", "optimize", exported("bert"), "-o", tmp_path / "e"], capture_output=True, text=True)
    assert again.returncode == 2 and "--force" in again.stderr


def test_export_and_inspect_decoder_folder(capsys, tmp_path):
    import transformers as tf

    folder = tmp_path / "hf"
    tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=300, n_embd=64, n_layer=3, n_head=4)).save_pretrained(folder)
    code, out, _ = run_cli(capsys, "export", folder, "-o", tmp_path / "exp", "--seq-len", "8")
    assert code == 0 and out.split() == [str(tmp_path / "exp" / "prefill.pt2"), str(tmp_path / "exp" / "decode.pt2")]
    code, out, _ = run_cli(capsys, "inspect", tmp_path / "exp", "--json")
    info = json.loads(out)
    assert (info["blocks"], info["attention_sites"], info["kv_cache"]) == (3, 3, {"inputs": 6, "outputs": 6})
    assert info["programs"]["prefill"]["kv_cache"] == {"inputs": 0, "outputs": 6}
    code, _, err = run_cli(capsys, "export", tmp_path / "nowhere", "-o", tmp_path / "x")
    assert code == 2 and "no such folder" in err
