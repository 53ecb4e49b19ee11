"""`make demo`: a newcomer's first run shows a real shipped model, its speed and its fidelity."""
import json

import pytest

from skimformer import demo


@pytest.mark.slow
def test_demo_optimizes_real_minilm_on_unseen_text_and_reports_speed_and_fidelity(tmp_path, capfd):
    demo.main(str(tmp_path / "demo"))
    report = json.loads((tmp_path / "demo" / "minilm-engine" / "report.json").read_text())
    assert [p["name"] for p in report["passes"]] == ["prune"]
    assert report["speed"]["ratio"] > 0  # measured side by side; its value is the benchmarks' business
    fidelity = report["fidelity"]
    assert fidelity["measured_on"]["inputs"] == "the rows of --data" and fidelity["exercised"]["prune"] == "exercised"
    assert fidelity["pooler_output.cosine"] > 0.9
    assert (tmp_path / "demo" / "llama-engine" / "decode.onnx").exists()
    assert "speed" in capfd.readouterr().out
