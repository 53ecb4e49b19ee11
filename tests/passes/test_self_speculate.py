"""self-speculate: draft and verify programs cut from the decode program, and the lossless loop."""
import numpy as np
import pytest
import torch

from skimformer import UserError, load
from skimformer.backends.generation import Sampling, generate
from skimformer.backends.speculation import speculate
from skimformer.passes import PassManager, pipeline_from
from skimformer.zoo import build_model
from tests.decoding import hidden_after, torch_runner

PROMPT = np.array([[0, 0, 0, 5, 6, 7], [8, 9, 10, 11, 12, 13]])
MASK = (PROMPT > 0).astype(np.int64)


def _speculative(path, spec):
    model = load(path)
    new, (record,), _ = PassManager(pipeline_from(spec)).run(model)
    return model, new, record


@pytest.fixture(scope="module")
def split(tiny_decoder):
    return _speculative(tiny_decoder, "self-speculate(exit=1, draft=3)")


def test_draft_is_the_first_blocks_under_the_models_own_head(split):
    """Against transformers: the draft's logits are the final norm and LM head applied to the
    hidden state entering block 1."""
    model, new, _ = split
    prefill, decode = model.programs["prefill"].example_inputs, new.programs["decode"].example_inputs
    draft = new.programs["draft"]
    assert draft.input_names == ["input_ids", "attention_mask", "position_ids", "past_key_0", "past_value_0"]
    out = draft.run({k: decode[k] for k in draft.input_names})
    hf = build_model("llama")
    hidden = hidden_after(hf, prefill, decode, 1)
    with torch.no_grad():
        torch.testing.assert_close(out["logits"], hf.lm_head(hf.model.norm(hidden)), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out["hidden_states"], hidden, atol=1e-5, rtol=1e-5)


def test_verify_on_the_drafts_hidden_states_is_the_full_decode_step(split):
    _, new, _ = split
    decode = new.programs["decode"]
    verify = new.programs["verify"]
    assert "input_ids" not in verify.input_names and "past_key_0" not in verify.input_names
    hidden = new.programs["draft"].run({k: decode.example_inputs[k] for k in new.programs["draft"].input_names})
    feeds = {**decode.example_inputs, "hidden_states": hidden["hidden_states"]}
    got = verify.run({k: feeds[k] for k in verify.input_names})
    want = decode.run(decode.example_inputs)
    assert set(got) == {"logits", "present_key_1", "present_value_1"}
    for name, value in got.items():
        torch.testing.assert_close(value, want[name], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("draft", [1, 3, 6])
def test_speculative_decoding_equals_greedy_decoding(split, draft):
    model, new, _ = split
    want = generate(torch_runner(model), PROMPT, 24, MASK).ids
    got = speculate(torch_runner(new), PROMPT, 24, draft, MASK)
    np.testing.assert_array_equal(got.ids, want)
    assert 0 <= got.extra["acceptance"] <= 1 and got.extra["rounds"] >= 24 // (draft + 1)
    eos = int(want[0, 5])  # row 0 stops there, row 1 goes on where it does not meet it
    np.testing.assert_array_equal(speculate(torch_runner(new), PROMPT, 24, draft, MASK, eos).ids,
                                  generate(torch_runner(model), PROMPT, 24, MASK, eos).ids)


def test_engine_decodes_speculatively_and_losslessly(tiny_engine):
    engine = tiny_engine("self-speculate(exit=1, draft=2)")
    assert set(engine.roles) == {"prefill", "decode", "draft", "verify"}
    result = engine.generate_with_stats(PROMPT, 16, attention_mask=MASK)
    assert result.extra["draft"] == 2
    np.testing.assert_array_equal(result.ids, generate(engine.run, PROMPT, 16, MASK).ids)
    with pytest.raises(UserError, match="reproduces greedy decoding"):
        engine.generate(PROMPT, 4, attention_mask=MASK, sampling=Sampling(temperature=0.7))


@pytest.mark.parametrize("spec, message", [
    ("self-speculate(exit=2)", "draft with fewer"),
    ("self-speculate(exit=0)", "exit is the number of blocks"),
    ("kv-window(sink=2, window=8); self-speculate(exit=1)", "needs a plain growing cache"),
])
def test_bad_pipelines_are_refused(tiny_decoder, spec, message):
    with pytest.raises(UserError, match=message):
        _speculative(tiny_decoder, spec) if ";" not in spec else PassManager(pipeline_from(spec)).run(load(tiny_decoder))


def test_a_calibrated_adapter_changes_the_drafts_not_the_output(tiny_decoder, tmp_path):
    from skimformer.ir.exit_heads import ExitHeads

    g = torch.Generator().manual_seed(1)
    half = {0: 0.5}
    ExitHeads(kind="decoder", adapters={0: (torch.randn(4, 64, generator=g), torch.randn(64, 4, generator=g))},
              criterion="max-prob", thresholds=half, target_agreement=0.99, agreement_before=half,
              agreement_after=half, exit_rate=half).save(tmp_path / "heads.safetensors")
    model, plain, _ = _speculative(tiny_decoder, "self-speculate(exit=1)")
    _, adapted, record = _speculative(tiny_decoder, f"self-speculate(exit=1, heads='{tmp_path / 'heads.safetensors'}')")
    assert record.report["adapter"]
    ex = {k: plain.programs["decode"].example_inputs[k] for k in plain.programs["draft"].input_names}
    assert not torch.allclose(adapted.programs["draft"].run(ex)["logits"], plain.programs["draft"].run(ex)["logits"])
    np.testing.assert_array_equal(speculate(torch_runner(adapted), PROMPT, 16, 3, MASK).ids,
                                  generate(torch_runner(model), PROMPT, 16, MASK).ids)
    with pytest.raises(UserError, match="calibrate that exit"):
        _speculative(tiny_decoder, f"self-speculate(exit=2, heads='{tmp_path / 'heads.safetensors'}')")
