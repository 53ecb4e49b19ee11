"""The Triton KV-cache kernels against their plain-torch references, on CPU under Triton's
interpreter: integer outputs (selections, codes) exactly, floats to fp32 rounding."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported (conftest sets it too)

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")

from skimformer.kernels import evict, quant  # noqa: E402
from skimformer.kernels import triton_kv as tk  # noqa: E402

FP32 = dict(rtol=1e-5, atol=1e-6)


def assert_same(actual, expected, **tolerance):
    """Same structure, shapes and dtypes; integers exactly, floats within `tolerance` (default FP32)."""
    if isinstance(expected, tuple):
        assert isinstance(actual, tuple) and len(actual) == len(expected)
        for a, e in zip(actual, expected):
            assert_same(a, e, **tolerance)
        return
    assert actual.shape == expected.shape and actual.dtype == expected.dtype
    if expected.dtype.is_floating_point:
        torch.testing.assert_close(actual, expected, **(tolerance or FP32))
    else:
        assert torch.equal(actual, expected)


def left_padded(batch: int, tokens: int, pad: int, dtype=torch.long) -> torch.Tensor:
    """A decoder's `[B, T]` keep-mask: the last row starts with `pad` padding tokens."""
    mask = torch.ones(batch, tokens, dtype=dtype)
    mask[-1, :pad] = 0
    return mask


@pytest.fixture(autouse=True)
def seed():
    torch.manual_seed(0)


# --- kv-evict ---------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(2, 3, 13, 64), (1, 2, 33, 48), (1, 1, 1, 16)])
def test_key_norm_scores(shape):
    k = torch.randn(shape)
    assert_same(tk.kv_key_norm_scores(k), evict.kv_key_norm_scores_ref(k))


def test_key_norm_scores_strided_fp16():
    k = torch.randn(2, 7, 3, 64).transpose(1, 2)  # a non-contiguous view
    assert_same(tk.kv_key_norm_scores(k), evict.kv_key_norm_scores_ref(k))
    half = k.half()
    assert_same(tk.kv_key_norm_scores(half), evict.kv_key_norm_scores_ref(half), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("prior_shape, scores_shape", [((2, 3, 5), (2, 3, 9)), ((2, 3, 9), (2, 3, 9)),
                                                       ((2, 3, 0), (2, 3, 4)), ((1, 3, 6), (2, 3, 7))])
def test_accumulate(prior_shape, scores_shape):
    prior, scores = torch.randn(prior_shape), torch.randn(scores_shape)
    assert_same(tk.kv_accumulate(prior, scores), evict.kv_accumulate_ref(prior, scores))


def test_accumulate_promotes_like_the_reference():
    prior, scores = torch.randn(1, 2, 3), torch.randn(1, 2, 5).half()
    assert_same(tk.kv_accumulate(prior, scores), evict.kv_accumulate_ref(prior, scores))


def test_accumulate_refuses_a_longer_prior():
    with pytest.raises(ValueError, match="holds 6 tokens, more than the 4 scored"):
        tk.kv_accumulate(torch.zeros(1, 1, 6), torch.zeros(1, 1, 4))


@pytest.mark.parametrize("x_shape", [(2, 3, 13, 64), (2, 3, 13), (1, 2, 9, 2, 5)])
def test_gather(x_shape):
    x = torch.randn(x_shape)
    idx = torch.sort(torch.rand(x_shape[0], x_shape[1], x_shape[2]).argsort(-1)[..., :7], dim=-1).values
    assert_same(tk.kv_gather(x, idx), evict.kv_gather_ref(x, idx))


def test_gather_int_and_bool():
    idx = torch.tensor([[[4, 0, 2]]])
    for x in (torch.arange(5).reshape(1, 1, 5), torch.tensor([[[True, False, True, True, False]]])):
        assert_same(tk.kv_gather(x, idx), evict.kv_gather_ref(x, idx))


@pytest.mark.parametrize("t, keep, budget, window", [
    (13, 0.5, 0, 3),    # SnapKV-style: a fraction, recent tokens protected
    (33, 0.0, 8, 0),    # a budget, no window
    (13, 1.0, 0, 2),    # keep everything
    (13, 0.0, 1, 0),    # one token
    (13, 0.0, 9, 30),   # a window longer than the cache
    (1, 0.5, 0, 0),     # one token in all
])
def test_select(t, keep, budget, window):
    scores = torch.randn(2, 2, t)
    mask = left_padded(2, t, pad=t // 3)
    assert_same(tk.kv_select(scores, mask, keep, budget, window),
                evict.kv_select_ref(scores, mask, keep, budget, window))


def test_select_bool_mask_and_broadcast_batch():
    scores = torch.randn(2, 1, 17)
    mask = left_padded(1, 17, pad=5, dtype=torch.bool)
    assert_same(tk.kv_select(scores, mask, 0.4, 0, 2), evict.kv_select_ref(scores, mask, 0.4, 0, 2))


def test_select_long_rows_in_chunks(monkeypatch):
    """Rows longer than a register block are counted chunk by chunk."""
    monkeypatch.setattr(tk, "SELECT_MAX_BLOCK", 16)
    monkeypatch.setattr(tk, "SELECT_CHUNK", 16)
    scores = torch.randn(1, 2, 40)
    mask = left_padded(1, 40, pad=11)
    assert_same(tk.kv_select(scores, mask, 0.0, 20, 4), evict.kv_select_ref(scores, mask, 0.0, 20, 4))


def test_select_breaks_ties_by_position():
    """Equal scores (here all zero): the reference's topk picks in an unspecified order; the
    kernel keeps the earliest, after the protected recent tokens."""
    scores = torch.zeros(1, 1, 10)
    idx = tk.kv_select(scores, torch.ones(1, 10, dtype=torch.long), 0.0, 5, 2)
    assert idx.tolist() == [[[0, 1, 2, 8, 9]]]


@pytest.mark.parametrize("heads, kv_heads, n, t, d, window, pool", [
    (4, 2, 13, 13, 64, 5, 3),    # SnapKV at prefill: grouped heads, an observation window, pooled
    (2, 2, 33, 33, 48, 0, 1),    # H2O at prefill: every query, a head dim that is not a power of two
    (4, 1, 1, 21, 32, 0, 1),     # H2O decode step: one query over the whole cache
    (2, 2, 7, 7, 16, 20, 5),     # a window longer than the prompt
])
def test_attention_scores(heads, kv_heads, n, t, d, window, pool):
    q, k = torch.randn(2, heads, n, d), torch.randn(2, kv_heads, t, d)
    mask = left_padded(2, t, pad=t // 4)
    assert_same(tk.kv_attention_scores(q, k, mask, d ** -0.5, window, pool),
                evict.kv_attention_scores_ref(q, k, mask, d ** -0.5, window, pool))


def test_attention_scores_fp16_bool_mask():
    q, k = torch.randn(1, 2, 9, 32).half(), torch.randn(1, 2, 9, 32).half()
    mask = left_padded(1, 9, pad=2, dtype=torch.bool)
    assert_same(tk.kv_attention_scores(q, k, mask, 0.2, 4, 3), evict.kv_attention_scores_ref(q, k, mask, 0.2, 4, 3),
                rtol=2e-3, atol=2e-3)


# --- kv-quant -----------------------------------------------------------------------------------

@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("d, group, channels", [(16, 4, 0), (16, 4, 4), (48, 24, 24), (48, 3, 3), (32, 16, 16)])
def test_quantize(bits, d, group, channels):
    x = torch.randn(2, 2, 33, d) * 3
    assert_same(tk.kv_quantize(x, bits, group, 5, channels), quant.kv_quantize_ref(x, bits, group, 5, channels),
                rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_quantize_half_precision_bit_exact(dtype):
    """The reference computes in fp32 and rounds each scale to the cache's dtype once; so does the kernel."""
    x = (torch.randn(1, 2, 40, 32) * 2).to(dtype)
    for channels in (0, 8):
        assert_same(tk.kv_quantize(x, 4, 8, 3, channels), quant.kv_quantize_ref(x, 4, 8, 3, channels), rtol=0, atol=0)


def test_quantize_constant_blocks_and_short_caches():
    x = torch.ones(1, 1, 12, 16)
    for dtype in (torch.float32, torch.float16):  # the scale floor is the dtype's (1e-8 is 0 in fp16)
        assert_same(tk.kv_quantize(x.to(dtype), 4, 4, 0, 0), quant.kv_quantize_ref(x.to(dtype), 4, 4, 0, 0),
                    rtol=0, atol=0)
    short = torch.randn(1, 2, 5, 16)  # residual >= tokens: nothing is quantized
    assert_same(tk.kv_quantize(short, 4, 4, 8, 4), quant.kv_quantize_ref(short, 4, 4, 8, 4), rtol=0, atol=0)


def test_quantize_refuses_unpackable_head_dims():
    with pytest.raises(ValueError, match="head dim of 7 at 4 bits"):
        tk.kv_quantize(torch.zeros(1, 1, 8, 7), 4, 4, 0, 0)


@pytest.mark.parametrize("channels", [0, 4])
@pytest.mark.parametrize("new", [1, 6])
def test_append(channels, new):
    codes, scale, zero, tail = quant.kv_quantize_ref(torch.randn(2, 2, 23, 16), 4, 4, 3, channels)
    tail = torch.cat([tail, torch.randn(2, 2, new, 16)], dim=2)
    assert_same(tk.kv_append(codes, scale, zero, tail, 4, 4, 3, channels),
                quant.kv_append_ref(codes, scale, zero, tail, 4, 4, 3, channels), rtol=0, atol=0)


def quantized_cache(b, h_kv, tokens, d, bits, group, residual, channels, dtype=torch.float32):
    """Keys and values of a `tokens`-long cache as kv-quant holds them, the tail grown by nothing."""
    keys, values = torch.randn(b, h_kv, tokens, d, dtype=dtype), torch.randn(b, h_kv, tokens, d, dtype=dtype)
    kc, ks, kz, kt = quant.kv_quantize_ref(keys, bits, group, residual, 0)
    vc, vs, vz, vt = quant.kv_quantize_ref(values, bits, group, residual, channels)
    return (kc, ks, kz, vc, vs, vz, kt, vt)


def masks(b, n, t):
    """None, a boolean keep-mask `[B, 1, n, T]` with left padding, and the same as an additive mask."""
    keep = torch.ones(b, 1, n, t, dtype=torch.bool)
    keep[-1, ..., :3] = False
    return [None, keep, torch.where(keep, 0.0, float("-inf"))]


@pytest.mark.parametrize("bits, group, channels, d", [(4, 16, 16, 32), (2, 4, 4, 16), (8, 16, 0, 32), (4, 8, 2, 16)])
def test_quant_attention(bits, group, channels, d):
    """Grouped-query decode steps over several splits of the quantized part and the tail; keys in
    whole groups of 16 (the folded-scale path) or fewer, values per token or in the keys' layout;
    no mask, a boolean one (with verification steps of 3 queries) and an additive one."""
    cache = quantized_cache(2, 2, 70, d, bits, group, 5, channels)
    t = cache[0].shape[2] + cache[6].shape[2]
    for n, mask in zip((1, 3, 1), masks(2, 3, t)):
        q = torch.randn(2, 4, n, d)
        mask = mask if mask is None else mask[:, :, :n]
        assert_same(tk.quant_attention(q, *cache, mask, d ** -0.5, bits, group, channels),
                    quant.quant_attention_ref(q, *cache, mask, d ** -0.5, bits, group, channels))


def test_quant_attention_nothing_quantized_and_broadcast_masks():
    cache = quantized_cache(2, 1, 6, 16, 4, 4, 8, 4)  # residual > tokens: the tail only
    q = torch.randn(2, 3, 1, 16)
    for mask in (torch.tensor([True, False, True, True, True, True]), torch.zeros(2, 3, 1, 6)):
        assert_same(tk.quant_attention(q, *cache, mask, 0.25, 4, 4, 4),
                    quant.quant_attention_ref(q, *cache, mask, 0.25, 4, 4, 4))


def test_quant_attention_fp16():
    cache = quantized_cache(1, 2, 70, 32, 4, 16, 5, 16, dtype=torch.float16)
    q = torch.randn(1, 4, 1, 32, dtype=torch.float16)
    for mask in masks(1, 1, cache[0].shape[2] + cache[6].shape[2])[1:]:  # boolean and additive
        mask = mask if mask.dtype == torch.bool else mask.half()
        assert_same(tk.quant_attention(q, *cache, mask, 32 ** -0.5, 4, 16, 16),
                    quant.quant_attention_ref(q, *cache, mask, 32 ** -0.5, 4, 16, 16), rtol=1e-2, atol=1e-2)


def test_every_op_has_a_launcher_and_every_kernel_an_aot_config():
    ops = {str(op).removeprefix("skim.").removesuffix(".default") for op in {**evict.REFERENCES, **quant.REFERENCES}}
    assert set(tk.KERNELS) == {f"skim::{name}" for name in ops}
    jitted = {value for value in vars(tk).values() if type(value).__name__ in ("JITFunction", "InterpretedFunction")
              and value.__name__.endswith("_kernel")}
    assert {spec.kernel for spec in tk.AOT} == jitted
    for spec in tk.AOT:
        assert list(spec.signature) == spec.kernel.arg_names
        assert all(spec.signature[name] == "constexpr" for name in spec.constexprs)
