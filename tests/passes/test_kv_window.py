"""kv-window: StreamingLLM's attention-sink cache, positions within the cache."""
import numpy as np
import pytest
import torch

from skimformer import UserError, load, optimize
from skimformer.backends.build import build_engine
from skimformer.kernels.window import cache_positions_ref, window_tokens_ref
from skimformer.passes import PassManager, pipeline_from
from skimformer.passes.manager import max_abs_error
from skimformer.zoo import export_zoo

SINK, WINDOW = 2, 8  # the zoo's prompts have 16 tokens (row 1 left-padded by 4): eviction happens at prefill


def _window(path, spec):
    model = load(path)
    new, (record,), metrics = PassManager(pipeline_from(spec)).run(model)
    return model, new, record


@pytest.fixture(scope="module")
def windowed(tiny_decoder):
    return _window(tiny_decoder, f"kv-window(sink={SINK}, window={WINDOW})")


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    out = tmp_path_factory.mktemp("kv-window") / "gpt2"
    export_zoo("gpt2", out)
    return out


def test_window_keeps_sinks_then_recent_tokens_and_padding_only_when_short():
    mask = torch.tensor([[1, 1, 1, 1, 1, 1, 1, 1], [0, 0, 0, 1, 1, 1, 1, 1], [0, 0, 0, 0, 0, 0, 1, 1]])
    idx = window_tokens_ref(mask, 2, 3)
    assert idx.tolist() == [[0, 1, 5, 6, 7], [3, 4, 5, 6, 7], [3, 4, 5, 6, 7]]
    kept = torch.gather(mask, 1, idx)
    assert kept.tolist()[2] == [0, 0, 0, 1, 1]  # the short row keeps padding, in front
    assert window_tokens_ref(mask, 2, 30).shape == (3, 8)  # a cache that is not full keeps everything


def test_positions_count_real_tokens_in_the_cache():
    mask = torch.tensor([[0, 0, 1, 1, 1, 1, 1]])
    assert cache_positions_ref(mask, torch.zeros(1, 2, dtype=torch.long)).tolist() == [[3, 4]]


def test_cache_is_bounded_and_returns_its_mask(windowed):
    _, new, record = windowed
    for role in ("prefill", "decode"):
        program = new.programs[role]
        out = program.run(program.example_inputs)
        assert out["attention_mask"].shape == (2, SINK + WINDOW)
        assert out["present_key_0"].shape[2] == out["present_value_1"].shape[2] == SINK + WINDOW
    assert record.report["prefill"]["rerotated_layers"] == 2  # the tiny Llama uses RoPE in both layers
    assert record.report["prefill"]["kv_cache_bytes"]["after"] < record.report["prefill"]["kv_cache_bytes"]["before"]


def test_a_window_that_never_fills_is_lossless(tiny_decoder):
    model, new, _ = _window(tiny_decoder, "kv-window(sink=4, window=1000)")
    for role in ("prefill", "decode"):
        want = model.programs[role].run(model.programs[role].example_inputs)
        got = new.programs[role].run(new.programs[role].example_inputs)
        assert got.pop("attention_mask").shape[1] == want["present_key_0"].shape[2]
        err, ok = max_abs_error(want, got)
        assert ok, f"{role}: {err}"


def test_the_cache_is_streamingllms_rotated_by_the_evicted_count(windowed):
    """StreamingLLM puts each kept key at its place in the cache. This cache holds the same keys
    all turned by one angle per row, the tokens evicted before them, as are the queries that read
    it (they rotate at their places in the text): the same attention scores. Layer 0's keys depend
    only on the token and its position, so the original program computes the expected ones."""
    model, new, _ = windowed
    prefill = model.programs["prefill"]
    inputs = dict(prefill.example_inputs)
    mask = inputs["attention_mask"]
    idx = window_tokens_ref(mask, SINK, WINDOW)
    kept = torch.gather(mask, 1, idx)
    evicted = mask.sum(1, keepdim=True) - kept.sum(1, keepdim=True)
    assert evicted.tolist() == [[6], [2]]  # 16 and 12 real tokens, 10 kept: this test can fail
    in_cache = (kept.cumsum(1) - 1).clamp(min=0)
    moved = inputs["position_ids"].clone().scatter(1, idx, in_cache + evicted)
    want = prefill.run({**inputs, "position_ids": moved})["present_key_0"]
    want = torch.gather(want, 2, idx[:, None, :, None].expand(-1, want.shape[1], -1, want.shape[3]))
    got = new.programs["prefill"].run(inputs)["present_key_0"]
    real = kept.bool()[:, None, :, None].expand_as(got)
    assert torch.allclose(got[real], want[real], atol=1e-5)
    # the recent keys are the ones the prompt computed; the sinks alone were rotated again
    cached = torch.gather(prefill.run(inputs)["present_key_0"], 2, idx[:, None, :, None].expand_as(got))
    assert torch.equal(got[:, :, SINK:], cached[:, :, SINK:])
    assert not torch.allclose(got[:, :, :SINK], cached[:, :, :SINK], atol=1e-3)


def test_a_decode_step_rotates_its_sinks_by_what_it_evicts(windowed):
    model, new, _ = windowed
    decode = new.programs["decode"]
    inputs = decode.example_inputs
    grown = model.programs["decode"].run(inputs)["present_key_1"]  # the past and the step's 3 tokens
    out = decode.run(inputs)["present_key_1"]
    assert out.shape[2] == SINK + WINDOW < grown.shape[2]
    assert torch.equal(out[:, :, SINK:], grown[:, :, -WINDOW:])
    sinks = torch.gather(grown, 2, window_tokens_ref(inputs["attention_mask"], SINK, WINDOW)[:, None, :SINK, None]
                         .expand(-1, grown.shape[1], -1, grown.shape[3]))
    assert not torch.allclose(out[:, :, :SINK], sinks, atol=1e-3)


def test_decode_takes_positions_from_its_cache_not_from_its_inputs(gpt2):
    model, new, record = _window(gpt2, f"kv-window(sink={SINK}, window={WINDOW})")
    assert record.report["decode"]["rerotated_layers"] == 0  # learned absolute positions: nothing to rotate
    decode = new.programs["decode"]
    inputs = decode.example_inputs
    a = decode.run(inputs)["logits"]
    b = decode.run({**inputs, "position_ids": inputs["position_ids"] + 50})["logits"]
    assert torch.equal(a, b)


def test_engine_generates_past_the_window_with_flat_memory(windowed, tmp_path):
    _, new, _ = windowed
    engine, _ = build_engine(new, windowed[0], tmp_path / "engine")
    ids = np.random.default_rng(0).integers(3, 300, (2, 12))
    mask = np.ones_like(ids)
    mask[1, :5] = 0
    short = engine.generate_with_stats(ids, 20, attention_mask=mask)
    long = engine.generate_with_stats(ids, 40, attention_mask=mask)
    assert long.ids.shape == (2, 40) and long.ids[:, :20].tolist() == short.ids.tolist()
    assert short.kv_cache_bytes == long.kv_cache_bytes == 2 * 2 * 2 * 2 * (SINK + WINDOW) * 16 * 4


def test_encoders_are_refused(exported):
    with pytest.raises(UserError, match="encoder"):
        optimize(exported("bert"), passes="kv-window(window=4)")


def test_rewritten_decode_runs_the_first_one_token_steps_in_torch(windowed):
    """Re-exported programs keep accepting the smallest steps: one cached token, one new token."""
    decode = windowed[1].programs["decode"]
    x = {k: v[:1] for k, v in decode.example_inputs.items()}
    x.update(input_ids=x["input_ids"][:, :1], position_ids=x["position_ids"][:, :1],
             attention_mask=torch.ones(1, 2, dtype=torch.long))
    x.update({k: v[:, :, :1] for k, v in x.items() if k.startswith("past_")})
    out = decode.run(x)
    assert out["logits"].shape == (1, 1, 300) and out["present_key_0"].shape[2] == 2


def test_a_decoder_exported_without_grad_is_rerotated(tmp_path):
    """Under torch.no_grad the rotary tables are inlined ops (not one set_grad_enabled block):
    the replay must copy them from the position ids on, or it rotates by the old positions."""
    with torch.no_grad():
        export_zoo("llama", tmp_path / "llama", size="tiny")
    model, new, record = _window(tmp_path / "llama", f"kv-window(sink={SINK}, window={WINDOW})")
    assert record.report["decode"]["rerotated_layers"] == 2
    decode = new.programs["decode"]
    out = decode.run(decode.example_inputs)
    assert out["present_key_0"].shape[2] <= SINK + WINDOW
