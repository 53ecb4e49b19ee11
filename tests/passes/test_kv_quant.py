"""kv-quant: KIVI quantization of a causal LM's KV cache (skim::kv_quantize, kv_append, quant_attention)."""
import json

import pytest
import torch
import torch.nn.functional as F

from skimformer import UserError, load, optimize
from skimformer.ir.signature import carried_input
from skimformer.kernels.quant import dequantize_ref, pack_ref, quantized_length, unpack_ref
from skimformer.passes import PassManager, pipeline_from
from skimformer.passes.manager import max_abs_error

skim = torch.ops.skim
LOSSY = "kv-quant(bits=4, group=4, residual=4)"  # quantizes the zoo's 16-token prompts at once
NOOP = "kv-quant(residual=1000000)"  # every cache shorter than the residual: nothing quantized
PARTS = ("key", "key_scale", "key_zero", "key_residual", "value", "value_scale", "value_zero", "value_residual")


@pytest.fixture(scope="module")
def quantized(tiny_decoder):
    """`quantized(spec)` -> (original model, rewritten model, pass record) on the zoo's tiny Llama
    (GQA: 4 query heads, 2 KV heads, head dim 16); cached, since re-export is slow."""
    cache = {}

    def get(spec: str):
        if spec not in cache:
            model = load(tiny_decoder)
            new, records, _ = PassManager(pipeline_from(spec)).run(model)
            cache[spec] = model, new, records[-1]
        return cache[spec]

    return get


def _steps(model, ids, mask, steps, forced=None):
    """Greedy (or teacher-forced on `forced` `[B, steps]`) decoding with the programs in torch,
    threading every present_*/state_* output into the next step as the engine does. Returns the
    next-token logits per step `[B, steps, V]`, the tokens, and the last step's outputs."""
    pos = (mask.cumsum(1) - 1).clamp_min(0)
    out = model.programs["prefill"].run({"input_ids": ids, "attention_mask": mask, "position_ids": pos})
    nxt, logits, tokens = pos[:, -1:] + 1, [], []
    for step in range(steps):
        logits.append(out["logits"][:, -1])
        tokens.append(forced[:, step] if forced is not None else logits[-1].argmax(-1))
        mask = out.get("attention_mask", mask)  # the mask of a shortened cache (snapkv)
        mask = torch.cat([mask, torch.ones(mask.shape[0], 1, dtype=mask.dtype)], 1)
        feeds = {"input_ids": tokens[-1][:, None], "attention_mask": mask, "position_ids": nxt}
        feeds.update({carried_input(k): v for k, v in out.items() if carried_input(k)})
        out, nxt = model.programs["decode"].run(feeds), nxt + 1
    return torch.stack(logits, 1), torch.stack(tokens, 1), out


def _prompt(batch=2, n=11, pad=3):
    """Prompts with the second row left-padded by `pad`."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 300, (batch, n), generator=g)
    mask = torch.ones(batch, n, dtype=torch.long)
    mask[1, :pad] = 0
    return ids.masked_fill(mask == 0, 0), mask


# ---------------------------------------------------------------- the ops


@pytest.mark.parametrize("bits", [8, 4, 2])
@pytest.mark.parametrize("kind", ["key", "value"])
def test_quantization_error_is_at_most_half_a_step(bits, kind):
    """Odd sizes: 37 tokens, groups of 5 tokens (keys) or 4 of 12 channels (values), 7 kept."""
    x = torch.randn(3, 3, 37, 12) * torch.linspace(0.1, 4, 12)  # channels of different ranges
    channels = 0 if kind == "key" else 4
    codes, scale, zero, tail = skim.kv_quantize(x, bits, 5, 7, channels)
    m = quantized_length(37, 5, 7)
    assert m == 30 and codes.dtype == torch.uint8 and codes.shape == (3, 3, 30, 12 * bits // 8)
    assert scale.shape == zero.shape == ((3, 3, 6, 12) if kind == "key" else (3, 3, 30, 3))
    assert torch.equal(tail, x[:, :, 30:])  # the newest tokens stay exact
    err = (dequantize_ref(codes, scale, zero, bits, 5, channels) - x[:, :, :30]).abs()
    step = scale.repeat_interleave(5, dim=2) if kind == "key" else scale.repeat_interleave(4, dim=3)
    assert (err <= step / 2 + 1e-6).all()
    assert err.max() > 0  # it did quantize
    # asymmetric: each block's minimum (its zero) is represented exactly
    assert torch.equal(dequantize_ref(codes, scale, zero, bits, 5, channels).amin(), x[:, :, :30].amin())


@pytest.mark.parametrize("bits", [4, 2])
def test_packing_round_trips(bits):
    codes = torch.randint(0, 1 << bits, (2, 3, 5, 8)).float()
    packed = pack_ref(codes, bits)
    assert packed.dtype == torch.uint8 and packed.shape == (2, 3, 5, 8 * bits // 8)
    assert torch.equal(unpack_ref(packed, bits), codes)


def test_a_constant_block_is_exact():
    x = torch.full((1, 1, 8, 4), 0.5)
    codes, scale, zero, _ = skim.kv_quantize(x, 2, 4, 0, 0)
    assert torch.equal(dequantize_ref(codes, scale, zero, 2, 4, 0), x)


@pytest.mark.parametrize("channels", [0, 4])
def test_append_is_incremental_and_matches_quantizing_at_once(channels):
    """Tokens are quantized in whole groups once, oldest first: appending step by step gives the
    cache that quantizing the whole sequence gives, and never changes what was quantized."""
    x = torch.randn(2, 2, 31, 8)
    state = skim.kv_quantize(x[:, :, :9], 4, 4, 3, channels)
    assert state[0].shape[2] == 4 and state[3].shape[2] == 5
    t = 9
    for n in (1, 3, 1, 2, 5, 1, 1, 8):  # steps of one or several tokens
        before = state
        tail = torch.cat([state[3], x[:, :, t:t + n]], dim=2)
        state = skim.kv_append(*state[:3], tail, 4, 4, 3, channels)
        t += n
        q, r = state[0].shape[2], state[3].shape[2]
        assert q % 4 == 0 and q + r == t and (3 <= r < 3 + 4)
        for old, new in zip(before[:3], state[:3]):
            assert torch.equal(new[:, :, :old.shape[2]], old)
    once = skim.kv_quantize(x[:, :, :t], 4, 4, 3, channels)
    for a, b in zip(state, once):
        assert torch.equal(a, b)


def _sdpa(q, k, v, mask):
    rep = q.shape[1] // k.shape[1]
    return F.scaled_dot_product_attention(q, k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1),
                                          attn_mask=mask, scale=0.3)


@pytest.mark.parametrize("heads, kv_heads, n", [(4, 2, 1), (9, 3, 3), (2, 2, 2)])
def test_quant_attention_is_attention_over_the_dequantized_cache(heads, kv_heads, n):
    """Grouped-query heads, a left-padded row (additive and boolean masks), several new tokens."""
    b, d, group = 2, 8, 4
    cache = torch.randn(b, kv_heads, 17 + n, d)
    values = torch.randn(b, kv_heads, 17 + n, d)
    kq, vq = skim.kv_quantize(cache, 4, group, 5, 0), skim.kv_quantize(values, 4, group, 5, 4)
    assert kq[0].shape[2] == 12
    keep = torch.ones(b, 1, n, 17 + n, dtype=torch.bool)
    keep[1, ..., :6] = False  # row 1 left-padded
    keep[..., -n:] = torch.ones(n, n).tril().bool()  # causal among the new tokens
    q = torch.randn(b, heads, n, d)
    k = torch.cat([dequantize_ref(*kq[:3], 4, group, 0), kq[3]], 2)
    v = torch.cat([dequantize_ref(*vq[:3], 4, group, 4), vq[3]], 2)
    additive = torch.zeros(keep.shape).masked_fill(~keep, torch.finfo(torch.float32).min)
    for mask in (keep, additive):
        got = skim.quant_attention(q, *kq[:3], *vq[:3], kq[3], vq[3], mask, 0.3, 4, group, 4)
        torch.testing.assert_close(got, _sdpa(q, k, v, mask))
    # nothing quantized yet: exactly SDPA over the full-precision tail
    empty = skim.kv_quantize(cache, 4, group, 100, 0)
    vempty = skim.kv_quantize(values, 4, group, 100, 4)
    assert empty[0].shape[2] == 0
    got = skim.quant_attention(q, *empty[:3], *vempty[:3], cache, values, keep, 0.3, 4, group, 4)
    torch.testing.assert_close(got, _sdpa(q, cache, values, keep))


def test_fake_implementations_agree_with_the_references():
    x = torch.randn(2, 3, 13, 8)
    torch.library.opcheck(skim.kv_quantize.default, (x, 4, 4, 3, 0))
    torch.library.opcheck(skim.kv_quantize.default, (x, 2, 4, 3, 4))
    c, s, z, _ = skim.kv_quantize(x, 4, 4, 3, 0)
    torch.library.opcheck(skim.kv_append.default, (c, s, z, torch.randn(2, 3, 9, 8), 4, 4, 3, 0))
    vc, vs, vz, _ = skim.kv_quantize(x, 4, 4, 3, 4)
    args = (torch.randn(2, 6, 2, 8), c, s, z, vc, vs, vz, torch.randn(2, 3, 4, 8), torch.randn(2, 3, 4, 8),
            torch.zeros(2, 1, 2, 12), 0.35, 4, 4, 4)
    torch.library.opcheck(skim.quant_attention.default, args)


# ---------------------------------------------------------------- the pass on a decoder


def test_programs_carry_the_quantized_cache(quantized):
    model, new, record = quantized(LOSSY)
    prefill, decode = new.programs["prefill"], new.programs["decode"]
    cache = [f"present_{p}_{i}" for i in range(2) for p in PARTS]
    assert prefill.output_names == ["logits", *cache] and decode.output_names == ["logits", *cache]
    assert decode.input_names[:3] == ["input_ids", "attention_mask", "position_ids"]
    assert set(decode.input_names[3:]) == {carried_input(name) for name in cache}
    out = prefill.run(prefill.example_inputs)  # 16 tokens: 12 quantized, 4 kept
    assert out["present_key_0"].shape == out["present_value_0"].shape == (2, 2, 12, 8)  # 4 bits: 2 per byte
    assert out["present_key_0"].dtype == torch.uint8
    assert out["present_key_scale_0"].shape == out["present_key_zero_0"].shape == (2, 2, 3, 16)
    assert out["present_value_scale_0"].shape == (2, 2, 12, 4)  # 16 channels in groups of 4
    assert out["present_key_residual_1"].shape == out["present_value_residual_1"].shape == (2, 2, 4, 16)
    assert any(n.target == skim.quant_attention.default for n in decode.ep.graph.nodes)
    assert not any("scaled_dot_product_attention" in str(n.target) for n in decode.ep.graph.nodes)
    report = record.report
    assert record.lossless is False and record.matched
    for role in ("prefill", "decode"):
        assert report[role]["bits"] == 4 and report[role]["group"] == 4 and report[role]["residual"] == 4
        assert report[role]["kv_cache_bytes"]["after"] < report[role]["kv_cache_bytes"]["before"]


def test_layers_that_split_alike_share_their_cache_sizes(quantized):
    """One batch, one quantized length and one tail length for every layer's parts: the layers'
    cache ops then have one form, which backends decompose once instead of once per layer."""
    _, new, _ = quantized(LOSSY)
    decode = new.programs["decode"]
    sizes = {name: [str(s) for s in node.meta["val"].shape] for name, node in zip(decode.input_names, decode.input_nodes())}
    batch = sizes["input_ids"][0]
    assert {shape[0] for name, shape in sizes.items()} == {batch}
    for part in PARTS:
        assert sizes[f"past_{part}_0"][2] == sizes[f"past_{part}_1"][2], part
    assert sizes["past_key_0"][2] == sizes["past_value_0"][2] == sizes["past_value_scale_0"][2]
    assert sizes["past_key_residual_0"][2] == sizes["past_value_residual_0"][2]


def test_decode_steps_quantize_the_oldest_tokens_in_order(quantized):
    """Over several steps (batch 2, left padding, dynamic batch and lengths): whole groups move
    from the full-precision tail to the codes, tokens stay in order, and layer 0's cache (computed
    from the embeddings alone, so the same tokens give the same keys) is the original cache
    quantized within half a step."""
    model, new, _ = quantized(LOSSY)
    ids, mask = _prompt(batch=3, n=11, pad=3)
    _, tokens, want = _steps(model, ids, mask, 7)
    _, _, got = _steps(new, ids, mask, 7, forced=tokens)
    total = 11 + 7  # the prompt and the seven tokens fed since
    q, r = got["present_key_0"].shape[2], got["present_key_residual_0"].shape[2]
    assert q == 12 and r == 6 and q + r == total == want["present_key_0"].shape[2]
    for kind, channels in (("key", 0), ("value", 4)):
        full = want[f"present_{kind}_0"]
        parts = [got[f"present_{kind}{p}_0"] for p in ("", "_scale", "_zero")]
        torch.testing.assert_close(got[f"present_{kind}_residual_0"], full[:, :, q:])
        err = (dequantize_ref(*parts, 4, 4, channels) - full[:, :, :q]).abs()
        step = parts[1].repeat_interleave(4, dim=2) if kind == "key" else parts[1].repeat_interleave(4, dim=3)
        assert (err <= step / 2 + 1e-5).all() and err.max() > 0


def test_residual_longer_than_the_cache_is_lossless(quantized):
    model, new, _ = quantized(NOOP)
    for role in ("prefill", "decode"):
        program = new.programs[role]
        out = program.run(program.example_inputs)
        assert out["present_key_0"].shape[2] == 0 and out["present_key_scale_1"].shape[2] == 0
    ids, mask = _prompt()
    want_logits, tokens, want = _steps(model, ids, mask, 5)
    got_logits, got_tokens, got = _steps(new, ids, mask, 5)
    assert torch.equal(tokens, got_tokens)
    err, ok = max_abs_error({"logits": want_logits}, {"logits": got_logits})
    assert ok and err < 1e-5, err
    for i in range(2):
        for kind in ("key", "value"):
            torch.testing.assert_close(got[f"present_{kind}_residual_{i}"], want[f"present_{kind}_{i}"],
                                       atol=1e-5, rtol=1e-5)


@pytest.mark.slow  # a third rewrite of the model (about 10 s)
def test_eight_bits_agree_with_the_full_cache_teacher_forced(quantized):
    model, new, _ = quantized("kv-quant(bits=8, group=4, residual=4)")
    ids, mask = _prompt()
    want, tokens, _ = _steps(model, ids, mask, 24)
    got, _, out = _steps(new, ids, mask, 24, forced=tokens)
    assert out["present_key_0"].shape[2] == 28  # 35 tokens by then: 28 quantized, 7 kept
    agreement = (got.argmax(-1) == want.argmax(-1)).double().mean().item()
    assert agreement >= 0.95, agreement
    cosine = F.cosine_similarity(got.flatten(0, 1), want.flatten(0, 1), dim=-1).min().item()
    assert cosine > 0.999, cosine


def test_onnx_engine_generates_with_the_quantized_cache(quantized, tmp_path):
    _, new, _ = quantized(LOSSY)
    engine = optimize(new, output=tmp_path / "eng")
    report = json.loads((tmp_path / "eng" / "report.json").read_text())
    assert report["parity"]["ok"], report["parity"]
    assert report["memory"]["kv_cache_bytes"] > 0
    ids, mask = _prompt()
    got = engine.generate(ids.numpy(), max_new_tokens=9, attention_mask=mask.numpy())
    _, want, _ = _steps(load(tmp_path / "eng"), ids, mask, 9)
    assert got.shape == (2, 9) and got.tolist() == want.tolist()


def test_applying_it_twice_is_refused(quantized):
    from skimformer.passes.kv_quant import KVQuant, KVQuantConfig

    with pytest.raises(UserError, match="already quantized.*once"):
        KVQuant().apply_model(quantized(LOSSY)[1], KVQuantConfig())


@pytest.mark.parametrize("spec, message", [
    ("kv-quant(bits=3)", "8, 4 or 2"),
    ("kv-quant(group=0)", ">= 1"),
    ("kv-quant(residual=-1)", ">= 0"),
])
def test_bad_configs_are_refused(spec, message):
    with pytest.raises(UserError, match=message):
        pipeline_from(spec)


def test_an_encoder_is_refused(exported):
    from skimformer.passes.kv_quant import KVQuant, KVQuantConfig

    with pytest.raises(UserError, match="causal LM.*encoder"):
        KVQuant().apply_model(load(exported("bert")), KVQuantConfig())


def test_a_decode_cache_it_cannot_build_on_is_refused():
    """A decode program whose cache is not cat(past, new) (a pass gathered it after attention)."""
    from skimformer.passes.kv_quant import _new_tokens

    graph = torch.fx.Graph()
    past, fresh = graph.placeholder("past_key_0"), graph.placeholder("new")
    gathered = graph.call_function(torch.ops.aten.cat.default, ([fresh, past], -2))
    with pytest.raises(UserError, match="cat\\(past, new\\).*kv-window"):
        _new_tokens(gathered, past, 0)
    good = graph.call_function(torch.ops.aten.cat.default, ([past, fresh], -2))
    assert _new_tokens(good, past, 0) is fresh


@pytest.mark.slow  # two more passes over the model
def test_it_composes_after_snapkv(quantized):
    model, new, record = quantized("kv-evict(policy=snapkv, keep=0.5); " + LOSSY)
    prefill = new.programs["prefill"]
    out = prefill.run(prefill.example_inputs)
    assert out["present_key_0"].shape[2] + out["present_key_residual_0"].shape[2] == 8  # half the prompt
    ids, mask = _prompt()
    _, tokens, last = _steps(new, ids, mask, 6)
    assert tokens.shape == (2, 6) and last["present_key_0"].shape[2] % 4 == 0
