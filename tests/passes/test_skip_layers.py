"""skip-layers: whole blocks removed, against transformers models with the layer deleted."""
import numpy as np
import pytest
import torch
import transformers as tf

from skimformer import UserError, load
from skimformer.backends.build import build_engine
from skimformer.passes import PassManager, pipeline_from
from skimformer.zoo import build_model, export_model
from tests.conftest import FAMILIES, AttentionOnly, greedy_by_prefill


def _skip(model, spec):
    new, (record,), _ = PassManager(pipeline_from(spec)).run(model)
    return new, record


def _delete(layers: torch.nn.ModuleList, index: list[int]) -> None:
    for i in sorted(index, reverse=True):
        del layers[i]


@pytest.fixture(scope="module")
def llama(tiny_decoder):
    model = load(tiny_decoder)
    return (model, *_skip(model, "skip-layers(layers=[0])"))


def test_prefill_equals_llama_without_the_layer(llama):
    _, new, record = llama
    inputs = new.programs["prefill"].example_inputs
    reference = build_model("llama")
    _delete(reference.model.layers, [0])
    with torch.no_grad():
        want = reference(**inputs, use_cache=False).logits
    real = inputs["attention_mask"].bool()  # padded positions attend to nothing; their logits are arbitrary
    torch.testing.assert_close(new.programs["prefill"].run(inputs)["logits"][real], want[real], atol=1e-5, rtol=1e-5)
    assert record.report["prefill"]["blocks_before"] == 2 and record.report["prefill"]["blocks_after"] == 1
    flops = record.report["decode"]["flops"]
    assert flops["after"] < flops["before"]
    assert record.matched == 2  # one block in each program
    assert "projected from the hidden state that skips them" in record.report["decode"]["cache"]


def test_skipped_layer_keeps_its_cache_projected_from_the_stream_that_skips_it(llama):
    model, new, _ = llama
    for role in ("prefill", "decode"):
        before, after = model.programs[role], new.programs[role]
        assert after.output_specs() == before.output_specs()  # names, shapes and dtypes
        want, got = before.run(before.example_inputs), after.run(before.example_inputs)
        # block 0's input (the embeddings) is unchanged, so its keys and values are too
        torch.testing.assert_close(got["present_key_0"], want["present_key_0"])
        torch.testing.assert_close(got["present_value_0"], want["present_value_0"])
        assert not torch.allclose(got["logits"], want["logits"], atol=1e-3)


def test_decode_continues_the_rewritten_prefill(llama):
    """Prefill 6 tokens and decode 3 on its cache: the logits of the prefill run on all 9 at once."""
    prefill, decode = llama[1].programs["prefill"], llama[1].programs["decode"]
    ids = torch.randint(3, 300, (2, 9))
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, :2] = 0
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    whole = prefill.run({"input_ids": ids, "attention_mask": mask, "position_ids": pos})["logits"]
    state = prefill.run({"input_ids": ids[:, :6], "attention_mask": mask[:, :6], "position_ids": pos[:, :6]})
    cache = {name.replace("present", "past"): t for name, t in state.items() if name.startswith("present")}
    step = decode.run({"input_ids": ids[:, 6:], "attention_mask": mask, "position_ids": pos[:, 6:], **cache})
    torch.testing.assert_close(step["logits"], whole[:, 6:], atol=1e-5, rtol=1e-5)


def test_engine_generates_like_the_rewritten_prefill(llama, tmp_path):
    original, new, _ = llama
    engine, report = build_engine(new, original, tmp_path / "engine")
    assert report["parity"]["ok"]
    prompt = np.random.default_rng(0).integers(3, 300, (1, 5))
    got = engine.generate(prompt, max_new_tokens=4)
    assert got.tolist() == greedy_by_prefill(new.programs["prefill"], torch.from_numpy(prompt), 4).tolist()


@pytest.mark.parametrize("dynamic", [True, False])
def test_bert_equals_transformers_without_the_layer(exported, dynamic):
    model = load(exported("bert", dynamic=dynamic))
    new, record = _skip(model, "skip-layers(layers=[1])")
    program = new.programs["model"]
    torch.manual_seed(0)  # the conftest's weights
    reference = FAMILIES["bert"]("sdpa").eval()
    _delete(reference.encoder.layer, [1])
    with torch.no_grad():
        want = reference(**program.example_inputs).last_hidden_state
    torch.testing.assert_close(program.run(program.example_inputs)["last_hidden_state"], want, atol=1e-5, rtol=1e-5)
    assert record.report["layers"] == [1] and record.report["blocks_after"] == 1
    assert program.output_specs() == model.programs["model"].output_specs()


def test_skipping_consecutive_blocks(tmp_path):
    """Blocks 0 and 1 of three: block 2 reads the embeddings."""
    config = tf.BertConfig(vocab_size=300, hidden_size=32, num_hidden_layers=3, num_attention_heads=2,
                           intermediate_size=64)
    torch.manual_seed(0)
    reference = tf.BertModel._from_config(config, attn_implementation="sdpa").eval()
    export_model(reference, tmp_path / "bert3")
    new, record = _skip(load(tmp_path / "bert3" / "model.pt2"), "skip-layers(layers=[1, 0])")
    program = new.programs["model"]
    _delete(reference.encoder.layer, [0, 1])
    with torch.no_grad():
        want = reference(**program.example_inputs).last_hidden_state
    torch.testing.assert_close(program.run(program.example_inputs)["last_hidden_state"], want, atol=1e-5, rtol=1e-5)
    assert record.report["layers"] == [0, 1] and record.report["blocks_after"] == 1


def test_no_layers_is_a_no_op(exported):
    model = load(exported("vit"))
    new, record = _skip(model, "skip-layers(layers=[])")
    assert record.matched == 0 and new.programs["model"] is model.programs["model"]


@pytest.mark.parametrize("spec, message", [
    ("skip-layers(layers=[2])", "0-based indices up to 1"),
    ("skip-layers(layers=[0, 1])", "all 2 blocks"),
    ("skip-layers(layers=[1, 1])", "more than once"),
    ("skip-layers(layers=[-1])", ">= 0"),
])
def test_bad_layers_are_refused(exported, spec, message):
    with pytest.raises(UserError, match=message):
        _skip(load(exported("bert")), spec)


def test_block_without_residual_stream_is_refused(tmp_path):
    ep = torch.export.export(AttentionOnly(residual=False), (torch.randn(2, 5, 16),))
    torch.export.save(ep, tmp_path / "m.pt2")
    with pytest.raises(UserError, match="no residual stream"):
        _skip(load(tmp_path / "m.pt2"), "skip-layers(layers=[0])")
