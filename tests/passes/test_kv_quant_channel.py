"""kv-quant(scheme=channel): per-channel int8/int4 caches with calibrated scales, run by ONNX
Runtime's quantized GroupQueryAttention (and decomposed for every other engine)."""
import json

import numpy as np
import onnx
import pytest
import torch
import transformers as tf

from skimformer import UserError, load, optimize
from skimformer.backends.generation import generate
from skimformer.ir.signature import carried_input
from skimformer.kernels.channel_quant import dequantize_channels, quantize_channels
from skimformer.passes import pipeline_from
from skimformer.passes.cache_attention import cache_attentions
from skimformer.passes.kv_quant import KVQuant, KVQuantConfig
from skimformer.zoo import export_model
from tests.decoding import torch_runner


def test_codes_round_to_the_nearest_step_and_pack_the_even_channel_low():
    scale = torch.full((1, 1, 1, 4), 0.5)
    x = torch.tensor([[[[0.74, -1.26, 3.9, -10.0]]]])
    np.testing.assert_array_equal(quantize_channels(x, scale, 8).numpy().ravel(), [1, -3, 8, -20])
    packed = quantize_channels(x, scale, 4)  # codes 1, -3, 7 (clipped from 8), -8 (clipped), +8 each
    assert packed.dtype == torch.uint8 and packed.shape[-1] == 2
    assert packed.numpy().ravel().tolist() == [9 + 5 * 16, 15 + 0 * 16]
    np.testing.assert_allclose(dequantize_channels(packed, scale, 4).numpy().ravel(), [0.5, -1.5, 3.5, -4.0])
    within = torch.randn(2, 2, 5, 4) * 0.2
    assert (dequantize_channels(quantize_channels(within, scale, 8), scale, 8) - within).abs().max() <= 0.25


@pytest.mark.parametrize("bits", [8, 4])
def test_channel_cache_runs_fused_in_place_and_matches_its_programs(tiny_decoder, tmp_path, bits, capfd):
    engine = optimize(tiny_decoder, f"kv-quant(scheme=channel, bits={bits})", output=tmp_path / "eng")
    printed = capfd.readouterr()
    assert "is not known" not in printed.out + printed.err  # every value the engine holds is typed
    report = json.loads((engine.folder / "report.json").read_text())
    assert report["parity"]["ok"] and report["parity"]["max_abs"] < 1e-4
    assert report["passes"][0]["report"]["decode"]["kv_cache_bytes"]["ratio"] == pytest.approx(bits / 32)
    assert report["fidelity"]["exercised"]["kv-quant"] == "exercised"
    decode = onnx.load(str(engine.folder / "decode.onnx"), load_external_data=False).graph
    attention = [n for n in decode.node if n.op_type == "GroupQueryAttention"]
    assert len(attention) == 2
    attributes = {a.name: (a.s.decode() if a.s else a.i) for a in attention[0].attribute}
    assert attributes["k_quant_type"] == "PER_CHANNEL" and attributes["kv_cache_bit_width"] == bits
    assert attributes["do_rotary"] == 1 and attention[0].input[1] == ""  # rotary inside, QKV packed
    assert engine.runners["decode"].in_place_cache
    prefill = onnx.load(str(engine.folder / "prefill.onnx"), load_external_data=False).graph
    prompt_attention = [n for n in prefill.node if n.op_type == "GroupQueryAttention"]
    assert len(prompt_attention) == 2  # a prompt attends in full precision over what its codes stand for
    assert not any(a.name == "k_quant_type" for n in prompt_attention for a in n.attribute)
    ids = np.random.default_rng(0).integers(3, 300, (2, 10))
    mask = np.ones_like(ids)
    mask[1, :3] = 0
    out = engine.run({"input_ids": ids, "attention_mask": mask, "position_ids": np.maximum(mask.cumsum(1) - 1, 0)},
                     "prefill")
    assert out["present_key_0"].dtype == (np.int8 if bits == 8 else np.uint8)
    assert out["present_key_0"].shape == (2, 2, 10, 16 * bits // 8)
    want = generate(torch_runner(load(engine.folder)), ids, 10, mask).ids
    np.testing.assert_array_equal(engine.generate(ids, 10, mask), want)


def test_portable_engine_decomposes_the_channel_cache(tiny_decoder, tmp_path):
    engine = optimize(tiny_decoder, "kv-quant(scheme=channel, bits=8)", output=tmp_path / "eng",
                      backend_options={"portable": True})
    decode = onnx.load(str(engine.folder / "decode.onnx"), load_external_data=False).graph
    assert not [n for n in decode.node if n.domain]
    assert json.loads((engine.folder / "report.json").read_text())["parity"]["ok"]


def test_channel_scheme_takes_8_or_4_bits_and_a_plain_cache(tiny_decoder):
    with pytest.raises(UserError, match="bits 8 or 4"):
        pipeline_from("kv-quant(scheme=channel, bits=2)")
    with pytest.raises(UserError, match="scheme must be"):
        pipeline_from("kv-quant(scheme=tensor)")
    with pytest.raises(UserError, match="plain growing cache"):
        optimize(tiny_decoder, "kv-window(sink=2, window=4); kv-quant(scheme=channel, bits=8)")


def test_rounded_parity_is_judged_at_the_scale_of_one_code():
    """Another runtime's last-bit float differences flip some codes by one step, which then
    moves the floats after them: checked by cosine and the share of identical codes."""
    from skimformer.backends.build import _compare_rounded

    torch.manual_seed(0)
    logits = torch.randn(2, 5, 50)
    codes = torch.randint(-100, 100, (2, 3, 40, 8), dtype=torch.int8)
    flipped = codes.clone()
    flipped.view(-1)[::10] += 1  # a tenth of the codes one step off
    near = {"logits": (logits + 1e-3 * torch.randn_like(logits)).numpy(), "present_key_0": flipped.numpy()}
    check = _compare_rounded({"logits": logits, "present_key_0": codes}, near)
    assert check["ok"] and check["rounded"]["codes_identical"] == pytest.approx(0.9, abs=0.01)
    far = {"logits": torch.randn_like(logits).numpy(), "present_key_0": codes.numpy()}
    assert not _compare_rounded({"logits": logits, "present_key_0": codes}, far)["ok"]
    flipped.view(-1)[::2] += 1
    assert not _compare_rounded({"logits": logits, "present_key_0": codes},
                                {"logits": logits.numpy(), "present_key_0": flipped.numpy()})["ok"]


class CacheStep(torch.nn.Module):
    """One attention layer over a growing cache `build(past, new)`, of which attention reads
    `read(cache)`: the forms a model may write its cache in."""

    def __init__(self, build, read):
        super().__init__()
        self.qkv = torch.nn.Linear(16, 48)
        self.build, self.read = build, read

    def forward(self, x, past_key_0, past_value_0):
        q, k, v = self.qkv(x).unflatten(-1, (3, 2, 8)).permute(2, 0, 3, 1, 4)
        key, value = self.build(past_key_0, k), self.build(past_value_0, v)
        key_read, value_read = self.read(key), self.read(value)
        bias = torch.zeros(q.shape[2], key_read.shape[2])
        out = torch.nn.functional.scaled_dot_product_attention(q, key_read, value_read, bias)
        return {"logits": out, "present_key_0": key, "present_value_0": value}


def _partial_rotary(new):
    """A stand-in for rotary embedding on the first half of the head dim, the rest passed on."""
    return torch.cat([new[..., :4] * 2, new[..., 4:]], dim=-1)


WHOLE = lambda cache: cache  # noqa: E731
CACHE_FORMS = {
    "past ++ new": (lambda past, new: torch.cat([past, new], 2), WHOLE, None),
    "partial rotary, copies": (lambda past, new: torch.cat([past.contiguous(), _partial_rotary(new)], -2).contiguous(),
                               WHOLE, None),
    "new first": (lambda past, new: torch.cat([new, past], 2), WHOLE, "not the past cache with the step's keys"),
    "a window of the past": (lambda past, new: torch.cat([past[:, :, 1:], new], 2), WHOLE,
                             "not the past cache with the step's keys"),
    "new keys read the past": (lambda past, new: torch.cat([past, new + past.mean(2, keepdim=True)], 2), WHOLE,
                               "not the past cache with the step's keys"),
    "attention reads a window": (lambda past, new: torch.cat([past, new], 2), lambda cache: cache[:, :, -4:],
                                 "does not read the whole cache"),
}


@pytest.mark.parametrize("form", CACHE_FORMS)
def test_cache_match_follows_copies_and_partial_rotary_and_refuses_other_caches(form):
    """A cache qualifies however its new keys are computed and copied, as long as it is the past
    with the step's own keys appended and attention reads all of it."""
    build, read, refusal = CACHE_FORMS[form]
    dyn = torch.export.Dim.DYNAMIC
    ep = torch.export.export(CacheStep(build, read), (torch.randn(2, 3, 16), torch.randn(2, 2, 5, 8),
                                                      torch.randn(2, 2, 5, 8)),
                             dynamic_shapes=({0: dyn, 1: dyn}, {0: dyn, 2: dyn}, {0: dyn, 2: dyn}))
    found, skipped = cache_attentions(ep.module(), "kv-quant")
    if refusal is None:
        assert len(found) == 1 and not skipped
        assert found[0].k_new.meta["val"].shape[2] == 3  # the step's 3 tokens, past excluded
    else:
        assert not found and refusal in skipped[0]


SMALL = dict(hidden_size=64, num_hidden_layers=1, num_attention_heads=4, intermediate_size=128)
# The conformance configurations: GPT-NeoX (fused QKV chunked, rotary on a quarter of the head
# dim), Phi-3 (fused QKV sliced, rotary with an empty pass-through part), GPT-2 (Conv1D QKV).
DECODERS = {
    "gpt_neox": lambda: tf.GPTNeoXForCausalLM(tf.GPTNeoXConfig(vocab_size=300, **SMALL)),
    "phi3": lambda: tf.Phi3ForCausalLM(tf.Phi3Config(vocab_size=300, num_key_value_heads=2, pad_token_id=0, **SMALL)),
    "gpt2": lambda: tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=300, n_embd=64, n_layer=1, n_head=4)),
}


def _teacher_forced_logits(model, ids: torch.Tensor) -> torch.Tensor:
    """Next-token logits of a one-row prompt: a prefill of its first half, then one-token decode
    steps over the rest, each step's cache threaded into the next as the engine does."""
    half = ids.shape[1] // 2
    out = model.programs["prefill"].run({"input_ids": ids[:, :half], "attention_mask": torch.ones_like(ids[:, :half]),
                                         "position_ids": torch.arange(half)[None]})
    logits = [out["logits"][:, -1]]
    for t in range(half, ids.shape[1]):
        feeds = {"input_ids": ids[:, t:t + 1], "attention_mask": torch.ones(1, t + 1, dtype=torch.long),
                 "position_ids": torch.tensor([[t]])}
        feeds.update({carried_input(k): v for k, v in out.items() if carried_input(k)})
        out = model.programs["decode"].run(feeds)
        logits.append(out["logits"][:, -1])
    return torch.cat(logits)


@pytest.mark.parametrize("family", DECODERS)
def test_channel_cache_of_other_families_follows_the_original_step_by_step(family, tmp_path):
    """Fused QKV projections and partial rotary are matched (GPT-NeoX and Phi-3 were refused), and
    the decode program keeps its dynamic batch and token count: GPT-2's re-export had recorded
    `B != B * n`, which refused every one-token step."""
    torch.manual_seed(0)
    export_model(DECODERS[family](), tmp_path / family)
    original = load(tmp_path / family)
    result = KVQuant().apply_model(original, KVQuantConfig(scheme="channel", bits=8))
    model = result.model
    assert result.report["decode"]["layers"] == 1
    ids_shape = next(s["shape"] for s in model.programs["decode"].input_specs() if s["name"] == "input_ids")
    assert all(isinstance(size, str) for size in ids_shape)  # batch and tokens stay symbolic
    ids = torch.randint(3, 300, (1, 12), generator=torch.Generator().manual_seed(0))
    want, got = _teacher_forced_logits(original, ids), _teacher_forced_logits(model, ids)
    assert torch.nn.functional.cosine_similarity(want, got, dim=-1).min() > 0.999
