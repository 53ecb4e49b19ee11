"""skip-ffn: chosen blocks lose their FFN, against transformers models whose FFN returns zeros."""
import numpy as np
import pytest
import torch
import transformers as tf

from skimformer import UserError, load
from skimformer.backends.build import build_engine
from skimformer.passes import PassManager, pipeline_from
from skimformer.zoo import build_model, export_model
from tests.conftest import SMALL, AttentionOnly, greedy_by_prefill


class Zero(torch.nn.Module):
    """Stands in for an FFN (or its last projection, `width` wide): returns zeros."""

    def __init__(self, width: int | None = None):
        super().__init__()
        self.width = width

    def forward(self, x):
        return x.new_zeros(*x.shape[:-1], self.width or x.shape[-1])


def _skip(model, spec):
    new, (record,), _ = PassManager(pipeline_from(spec)).run(model)
    return new, record


def _close_on_real_tokens(got, want, mask):
    """Logits of padded positions are arbitrary (they attend to nothing): compare the others."""
    real = mask[:, -got.shape[1]:].bool()
    torch.testing.assert_close(got[real], want[real], atol=1e-5, rtol=1e-5)


@pytest.fixture(scope="module")
def llama(tiny_decoder):
    model = load(tiny_decoder)
    reference = build_model("llama")
    reference.model.layers[1].mlp = Zero()
    return (model, *_skip(model, "skip-ffn(layers=[1])"), reference)


def test_llama_prefill_and_decode_equal_transformers_with_a_zero_mlp(llama):
    model, new, record, reference = llama
    prefill, decode = new.programs["prefill"].example_inputs, new.programs["decode"].example_inputs
    cache = tf.DynamicCache(config=reference.config)
    for i in range(2):
        cache.update(decode[f"past_key_{i}"], decode[f"past_value_{i}"], i)
    with torch.no_grad():
        want_prefill = reference(**prefill, use_cache=False).logits
        want_decode = reference(input_ids=decode["input_ids"], attention_mask=decode["attention_mask"],
                                position_ids=decode["position_ids"], past_key_values=cache).logits
    _close_on_real_tokens(new.programs["prefill"].run(prefill)["logits"], want_prefill, prefill["attention_mask"])
    _close_on_real_tokens(new.programs["decode"].run(decode)["logits"], want_decode, decode["attention_mask"])
    for role in ("prefill", "decode"):
        assert new.programs[role].output_specs() == model.programs[role].output_specs()
        report = record.report[role]
        assert report["blocks_before"] == report["blocks_after"] == 2
        assert report["flops"]["after"] < report["flops"]["before"]


def test_engine_generates_like_the_rewritten_prefill(llama, tmp_path):
    original, new, _, _ = llama
    engine, report = build_engine(new, original, tmp_path / "engine")
    assert report["parity"]["ok"]
    prompt = np.random.default_rng(1).integers(3, 300, (1, 5))
    got = engine.generate(prompt, max_new_tokens=4)
    assert got.tolist() == greedy_by_prefill(new.programs["prefill"], torch.from_numpy(prompt), 4).tolist()


def _neox():
    """Attention and MLP in parallel: x + attn(ln1(x)) + mlp(ln2(x))."""
    config = tf.GPTNeoXConfig(vocab_size=300, use_parallel_residual=True, **SMALL)
    model = tf.GPTNeoXForCausalLM._from_config(config, attn_implementation="sdpa")
    return model, lambda m: setattr(m.gpt_neox.layers[1], "mlp", Zero())


def _opt():
    """The MLP runs on a [B * n, hidden] view of the residual stream."""
    config = tf.OPTConfig(vocab_size=300, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, ffn_dim=128,
                          word_embed_proj_dim=64)
    model = tf.OPTForCausalLM._from_config(config, attn_implementation="sdpa")
    return model, lambda m: setattr(m.model.decoder.layers[1], "fc2", Zero(64))


@pytest.mark.parametrize("make", [_neox, _opt], ids=["parallel-gpt-neox", "reshaped-opt"])
def test_decoder_layouts_equal_transformers_with_a_zero_mlp(make, tmp_path):
    torch.manual_seed(0)
    reference, zero_mlp = make()
    export_model(reference.eval(), tmp_path / "m")
    new, record = _skip(load(tmp_path / "m"), "skip-ffn(layers=[1])")
    zero_mlp(reference)
    inputs = new.programs["prefill"].example_inputs
    with torch.no_grad():
        want = reference(**inputs, use_cache=False).logits
    _close_on_real_tokens(new.programs["prefill"].run(inputs)["logits"], want, inputs["attention_mask"])
    assert record.report["prefill"]["flops"]["after"] < record.report["prefill"]["flops"]["before"]


def _bert():
    """The tiny BERT with random norm weights: a fresh LayerNorm of an already normalized stream
    would be the identity, and the test could not tell whether the last norm ran."""
    torch.manual_seed(0)
    model = tf.BertModel._from_config(tf.BertConfig(vocab_size=300, **SMALL), attn_implementation="sdpa").eval()
    for norm in (m for m in model.modules() if isinstance(m, torch.nn.LayerNorm)):
        torch.nn.init.normal_(norm.weight, 1.0, 0.5)
        torch.nn.init.normal_(norm.bias, 0.0, 0.5)
    return model


@pytest.mark.parametrize("static", [False, True])
def test_post_norm_bert_keeps_the_final_norm(static, tmp_path):
    """BERT's block returns LayerNorm(h + ffn(h)): without the FFN, LayerNorm(h)."""
    export_model(_bert(), tmp_path / "bert", static=static)
    new, record = _skip(load(tmp_path / "bert" / "model.pt2"), "skip-ffn(layers=[0, 1])")
    program = new.programs["model"]
    reference = _bert()
    for layer in reference.encoder.layer:
        layer.output.dense = Zero(64)
    with torch.no_grad():
        want = reference(**program.example_inputs).last_hidden_state
    torch.testing.assert_close(program.run(program.example_inputs)["last_hidden_state"], want, atol=1e-5, rtol=1e-5)
    assert record.report["layers"] == [0, 1] and record.matched == 2


def test_no_layers_is_a_no_op(exported):
    model = load(exported("vit"))
    new, record = _skip(model, "skip-ffn(layers=[])")
    assert record.matched == 0 and new.programs["model"] is model.programs["model"]


@pytest.mark.parametrize("spec, message", [
    ("skip-ffn(layers=[3])", "0-based indices up to 1"),
    ("skip-ffn(layers=[0, 0])", "more than once"),
])
def test_bad_layers_are_refused(exported, spec, message):
    with pytest.raises(UserError, match=message):
        _skip(load(exported("bert")), spec)


def test_block_without_ffn_is_refused(tmp_path):
    torch.export.save(torch.export.export(AttentionOnly(residual=True), (torch.randn(2, 5, 16),)), tmp_path / "m.pt2")
    with pytest.raises(UserError, match="no FFN branch"):
        _skip(load(tmp_path / "m.pt2"), "skip-ffn(layers=[1])")
