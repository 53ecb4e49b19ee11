"""The Triton token kernels against their plain-torch references, on CPU under Triton's
interpreter: integer outputs exactly, floats to 1e-5 relative in fp32."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported (tests/conftest.py does too)

import pytest
import torch

pytest.importorskip("triton")

from skimformer.kernels import merge, tokens, window  # noqa: E402
from skimformer.kernels import triton_tokens as tt  # noqa: E402

FP32 = dict(rtol=1e-5, atol=1e-6)


def keep_mask(lengths: list[int], n: int, left: bool = False) -> torch.Tensor:
    """[B, n] boolean keep-mask with `lengths[b]` real tokens, padded on the right (or left)."""
    pos = torch.arange(n)
    rows = [(pos >= n - length) if left else (pos < length) for length in lengths]
    return torch.stack(rows)


def attention_mask(keep: torch.Tensor, kind: str, causal: bool = False) -> torch.Tensor | None:
    """The masks attention sites carry, built from a [B, N] keep-mask: `none`, `bool2d`, `bool4d`
    ([B, 1, N, N]), `additive4d` (0 / finfo.min, as transformers and the decoder export build them,
    where each query always sees itself), `additive2d`, or `shared4d` (batch of 1)."""
    n = keep.shape[1]
    if kind == "none":
        return None
    if kind == "bool2d":
        return keep
    if kind == "additive2d":
        return torch.zeros(keep.shape).masked_fill(~keep, torch.finfo(torch.float32).min)
    allowed = keep[:, None, None, :].expand(-1, 1, n, n)
    if causal:
        allowed = allowed & torch.ones(n, n, dtype=torch.bool).tril()
    allowed = allowed | torch.eye(n, dtype=torch.bool)
    if kind == "bool4d":
        return allowed
    if kind == "shared4d":
        return allowed[:1]
    assert kind == "additive4d"
    return torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min)


def distinct_scores(batch: int, n: int, dtype=torch.float32) -> torch.Tensor:
    """Scores with no ties (the references leave the order of equal scores to torch.topk)."""
    return torch.stack([torch.randperm(n) for _ in range(batch)]).to(dtype) / 8 - 1


def random_subset(batch: int, n: int, count: int) -> torch.Tensor:
    return torch.stack([torch.randperm(n)[:count].sort().values for _ in range(batch)])


# --- gather_tokens / restore_tokens / token_sources -----------------------------------------


@pytest.mark.parametrize("shape, dim, count", [
    ((2, 3, 13, 64), 2, 5),  # KV cache along its token dim
    ((2, 3, 13, 20), -2, 13),  # negative dim, every token, head dim not a power of two
    ((2, 7, 24), 1, 1),  # residual stream, one token kept
    ((2, 33), 1, 9),  # a [B, T] mask
    ((2, 1, 5), 1, 1),  # one token
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.bool])
def test_gather_tokens_matches_reference(shape, dim, count, dtype):
    torch.manual_seed(0)
    x = torch.randn(shape)
    x = (x > 0) if dtype == torch.bool else (x * 100).to(dtype)
    idx = random_subset(shape[0], shape[dim], count)
    got = tt.gather_tokens(x, idx, dim)
    assert got.dtype == dtype
    assert torch.equal(got, tokens.gather_tokens_ref(x, idx, dim))


def test_gather_tokens_broadcasts_a_batch_of_one():
    x = torch.randn(1, 2, 13, 16)
    idx = random_subset(3, 13, 4)
    assert torch.equal(tt.gather_tokens(x, idx, 2), tokens.gather_tokens_ref(x, idx, 2))


def test_gather_tokens_reads_non_contiguous_input():
    x = torch.randn(2, 13, 3, 16).transpose(1, 2)  # [B, H, T, D] as a transposed view
    idx = random_subset(2, 13, 6)
    assert torch.equal(tt.gather_tokens(x, idx, 2), tokens.gather_tokens_ref(x, idx, 2))


def test_gather_tokens_refuses_what_the_reference_cannot_do():
    with pytest.raises(ValueError, match="a batch of 3 does not broadcast to 2"):
        tt.gather_tokens(torch.randn(3, 7, 4), random_subset(2, 7, 3), 1)
    with pytest.raises(ValueError, match="dim 0 is not a token dim"):
        tt.gather_tokens(torch.randn(2, 7, 4), random_subset(2, 7, 3), 0)


@pytest.mark.parametrize("n, count, fill", [(13, 5, -1), (13, 13, 0), (7, 1, 1), (1, 1, 0), (33, 9, 9)])
def test_token_sources_matches_reference(n, count, fill):
    idx = random_subset(2, n, count)
    got = tt.token_sources(idx, n, fill)
    assert got.dtype == torch.int64
    assert torch.equal(got, tokens.token_sources_ref(idx, n, fill))


@pytest.mark.parametrize("fill_with_fused", [True, False])
def test_restore_tokens_undoes_a_selection(fill_with_fused):
    """restore_tokens as the passes use it: sources from token_sources, dropped tokens read the
    fused token (index K) or token 0."""
    n, count = 13, 5
    idx = random_subset(2, n, count)
    reduced = torch.randn(2, count + 1, 12)
    src = tokens.token_sources_ref(idx, n, count if fill_with_fused else 0)
    got = tt.restore_tokens(reduced, src, 1)
    assert got.shape == (2, n, 12)
    assert torch.equal(got, tokens.restore_tokens_ref(reduced, src, 1))


# --- topk_tokens ------------------------------------------------------------------------------


@pytest.mark.parametrize("n, keep, protect", [(1, 0.5, 1), (7, 1.0, 0), (13, 0.5, 1), (33, 0.3, 2), (33, 0.01, 0)])
@pytest.mark.parametrize("kind", ["none", "bool2d", "bool4d", "additive4d", "additive2d", "shared4d"])
def test_topk_tokens_matches_reference(n, keep, protect, kind):
    torch.manual_seed(n)
    lengths = [n, max(1, n // 3)]
    mask = attention_mask(keep_mask(lengths, n, left=kind == "additive4d"), kind, causal=kind == "additive4d")
    scores = distinct_scores(2, n)
    got = tt.topk_tokens(scores, mask, keep, protect)
    assert got.dtype == torch.int64
    assert torch.equal(got, tokens.topk_tokens_ref(scores, mask, keep, protect))


def test_topk_tokens_fills_with_the_earliest_padding():
    """More tokens kept than real ones: the reference ranks padding by position."""
    scores = distinct_scores(1, 13)
    mask = keep_mask([3], 13, left=True)
    got = tt.topk_tokens(scores, mask, 0.5, 1)
    assert got.tolist() == [[0, 1, 2, 3, 10, 11, 12]]
    assert torch.equal(got, tokens.topk_tokens_ref(scores, mask, 0.5, 1))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_topk_tokens_half_precision_ranks_like_fp32(dtype):
    """In fp16 the reference's padding scores overflow to -inf and tie; the kernel ranks in fp32."""
    scores = distinct_scores(2, 33, dtype)
    mask = attention_mask(keep_mask([33, 9], 33), "bool4d")
    assert torch.equal(tt.topk_tokens(scores, mask, 0.5, 1), tokens.topk_tokens_ref(scores.float(), mask, 0.5, 1))


# --- fuse_tokens ------------------------------------------------------------------------------


@pytest.mark.parametrize("shape, dim", [((2, 13, 64), 1), ((2, 3, 7, 20), 2), ((2, 1, 8), 1)])
@pytest.mark.parametrize("kind", ["none", "bool2d", "additive4d"])
@pytest.mark.parametrize("keep", [0.25, 0.5, 1.0])  # real and padding dropped; only padding; nothing
def test_fuse_tokens_matches_reference(shape, dim, kind, keep):
    torch.manual_seed(1)
    n = shape[dim]
    x = torch.randn(shape)
    scores = torch.rand(2, n)
    mask = attention_mask(keep_mask([n, max(1, n // 2)], n), kind)
    idx = tokens.topk_tokens_ref(scores, mask, keep, 1)
    got = tt.fuse_tokens(x, scores, mask, idx, dim)
    want = tokens.fuse_tokens_ref(x, scores, mask, idx, dim)
    assert got.shape == want.shape and got.dtype == want.dtype
    torch.testing.assert_close(got, want, **FP32)


def test_fuse_tokens_broadcasts_a_batch_of_one_and_reads_half_precision():
    x = torch.randn(1, 13, 24, dtype=torch.float16)
    scores = torch.rand(2, 13, dtype=torch.float16)
    idx = tokens.topk_tokens_ref(scores.float(), None, 0.5, 1)
    got = tt.fuse_tokens(x, scores, None, idx, 1)
    want = tokens.fuse_tokens_ref(x.float(), scores.float(), None, idx, 1)
    assert got.shape == (2, 1, 24) and got.dtype == torch.float16
    torch.testing.assert_close(got.float(), want, rtol=2e-3, atol=2e-3)


# --- token_scores -----------------------------------------------------------------------------


@pytest.mark.parametrize("mode", [0, 1, 2, 3])
@pytest.mark.parametrize("n, heads, kv_heads, head_dim, kind", [
    (7, 2, 2, 64, "none"),
    (13, 4, 2, 24, "bool4d"),  # grouped-query heads, head dim not a power of two
    (33, 2, 1, 16, "additive4d"),  # more queries than one row block
    (13, 2, 2, 64, "shared4d"),  # a mask with a batch of 1
    (1, 2, 2, 8, "additive4d"),  # one token
])
def test_token_scores_matches_reference(mode, n, heads, kv_heads, head_dim, kind):
    torch.manual_seed(2)
    q = torch.randn(2, heads, n, head_dim)
    k = torch.randn(2, kv_heads, n, head_dim)
    decoder = mode == 3
    mask = attention_mask(keep_mask([n, max(1, n - 4)], n, left=decoder), kind, causal=decoder)
    scale = head_dim ** -0.5
    got = tt.token_scores(q, k, mask, scale, mode)
    want = tokens.token_scores_ref(q, k, mask, scale, mode)
    assert got.shape == want.shape and got.dtype == want.dtype
    torch.testing.assert_close(got, want, **FP32)


def test_token_scores_single_query_decode_step_against_a_longer_cache():
    """A decoder step: 3 queries over 13 keys (cache + new), mask [B, 1, 3, 13]."""
    q, k = torch.randn(2, 4, 3, 16), torch.randn(2, 2, 13, 16)
    mask = torch.zeros(2, 1, 3, 13).masked_fill(~keep_mask([13, 9], 13, left=True)[:, None, None], -1e30)
    for mode in (1, 3):
        torch.testing.assert_close(tt.token_scores(q, k, mask, 0.25, mode),
                                   tokens.token_scores_ref(q, k, mask, 0.25, mode), **FP32)


@pytest.mark.parametrize("mode", [1, 2, 3])
def test_token_scores_half_precision(mode):
    q = torch.randn(2, 2, 13, 64, dtype=torch.float16)
    k = torch.randn(2, 2, 13, 64, dtype=torch.float16)
    mask = attention_mask(keep_mask([13, 9], 13), "bool4d")
    got = tt.token_scores(q, k, mask, 0.125, mode)
    assert got.dtype == torch.float32  # scores are fp32 whatever the program's dtype
    torch.testing.assert_close(got, tokens.token_scores_ref(q, k, mask, 0.125, mode), **FP32)


# --- token_sizes ------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["none", "bool2d", "bool4d", "additive4d", "additive2d", "shared4d"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_token_sizes_matches_reference(kind, dtype):
    x = torch.randn(2, 13, 8, dtype=dtype)
    mask = attention_mask(keep_mask([13, 5], 13), kind)
    got = tt.token_sizes(x, mask, 1)
    assert got.dtype == torch.float32  # sizes count tokens: fp32 whatever x's dtype
    assert torch.equal(got, merge.token_sizes_ref(x, mask, 1))


# --- bipartite_match / bipartite_merge --------------------------------------------------------


def merge_inputs(n: int, channels: int, lengths: list[int], seed: int = 3):
    torch.manual_seed(seed)
    metric = torch.randn(len(lengths), n, channels)
    size = keep_mask(lengths, n).float()
    return metric, size


@pytest.mark.parametrize("n, channels", [(2, 16), (3, 24), (7, 64), (13, 24), (33, 16)])
@pytest.mark.parametrize("r, protect", [(0, 0), (1, 1), (3, 0), (3, 3), (100, 1)])
def test_bipartite_match_matches_reference(n, channels, r, protect):
    metric, size = merge_inputs(n, channels, [n, max(2, n - 5)])
    keep, sources = tt.bipartite_match(metric, size, r, protect)
    want_keep, want_sources = merge.bipartite_match_ref(metric, size, r, protect)
    assert keep.dtype == sources.dtype == torch.int64
    assert torch.equal(keep, want_keep)
    assert torch.equal(sources, want_sources)


def test_bipartite_match_with_merged_sizes_and_half_precision():
    metric, _ = merge_inputs(33, 64, [33, 33])
    size = torch.randint(0, 4, (2, 33)).float()
    for dtype in (torch.float32, torch.float16):
        keep, sources = tt.bipartite_match(metric.to(dtype), size.to(dtype), 8, 1)
        want_keep, want_sources = merge.bipartite_match_ref(metric.to(dtype).float(), size, 8, 1)
        assert torch.equal(keep, want_keep) and torch.equal(sources, want_sources)


def test_bipartite_match_equal_similarities_pick_the_first_partner():
    """Duplicate tokens: torch.max in the reference picks the first of equal B tokens, also
    when they are in different steps of the kernel's loop over B (64 B tokens a step)."""
    metric, size = merge_inputs(141, 16, [141, 141])
    metric[:, 5] = metric[:, 131] = metric[:, 4]  # A token 4 equally similar to B tokens 5 and 131
    keep, sources = tt.bipartite_match(metric, size, 2, 0)
    want_keep, want_sources = merge.bipartite_match_ref(metric, size, 2, 0)
    assert torch.equal(sources[:, 4], sources[:, 5])  # token 4 merged into token 5, not 131
    assert torch.equal(keep, want_keep) and torch.equal(sources, want_sources)


def test_bipartite_match_of_one_token():
    """The reference fails on one token (max over an empty B set); nothing can merge."""
    metric, size = merge_inputs(1, 16, [1, 1])
    keep, sources = tt.bipartite_match(metric, size, 0, 0)
    assert keep.tolist() == [[0], [0]] and sources.tolist() == [[0], [0]]
    with pytest.raises(ValueError, match="1 token"):
        tt.bipartite_match(metric, size, 1, 0)


@pytest.mark.parametrize("shape, dim", [((2, 13, 24), 1), ((2, 3, 13, 16), 2), ((2, 33, 64), 1)])
@pytest.mark.parametrize("r", [0, 4, 100])
def test_bipartite_merge_matches_reference(shape, dim, r):
    n = shape[dim]
    metric, size = merge_inputs(n, 16, [n, n - 6])
    size = size * torch.randint(1, 4, size.shape)  # tokens that already stand for several
    keep, sources = merge.bipartite_match_ref(metric, size, r, 1)
    x = torch.randn(shape)
    got, got_size = tt.bipartite_merge(x, size, sources, keep, dim)
    want, want_size = merge.bipartite_merge_ref(x, size, sources, keep, dim)
    assert got.shape == want.shape and got.dtype == want.dtype
    torch.testing.assert_close(got, want, **FP32)
    assert torch.equal(got_size, want_size)


def test_bipartite_merge_half_precision_keeps_its_dtype():
    metric, size = merge_inputs(13, 16, [13, 7])
    keep, sources = merge.bipartite_match_ref(metric, size, 4, 1)
    x = torch.randn(2, 13, 24, dtype=torch.float16)
    got, got_size = tt.bipartite_merge(x, size, sources, keep, 1)
    want, want_size = merge.bipartite_merge_ref(x, size, sources, keep, 1)
    assert got.dtype == want.dtype == torch.float16 and got_size.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-3)
    assert torch.equal(got_size, want_size)


# --- window_tokens / sink_index / window_join / cache_positions ------------------------------


def decoder_mask(t: int, lengths: list[int], dtype=torch.int64) -> torch.Tensor:
    return keep_mask(lengths, t, left=True).to(dtype)


@pytest.mark.parametrize("t", [1, 7, 13, 33])
@pytest.mark.parametrize("sink, size", [(0, 4), (1, 3), (4, 8), (2, 64)])
@pytest.mark.parametrize("dtype", [torch.int64, torch.bool])
def test_window_tokens_matches_reference(t, sink, size, dtype):
    mask = decoder_mask(t, [t, max(1, t // 2), 0][:2] if t > 1 else [1, 0], dtype)
    got = tt.window_tokens(mask, sink, size)
    assert got.dtype == torch.int64
    assert torch.equal(got, window.window_tokens_ref(mask, sink, size))


@pytest.mark.parametrize("t, new", [(1, 1), (13, 1), (13, 3), (33, 33)])
def test_cache_positions_matches_reference(t, new):
    mask = decoder_mask(t, [t, max(0, t - 5)])
    ids = torch.zeros(2, new, dtype=torch.int64)
    got = tt.cache_positions(mask, ids)
    assert got.dtype == torch.int64
    assert torch.equal(got, window.cache_positions_ref(mask, ids))


def test_cache_positions_refuses_more_new_tokens_than_slots():
    with pytest.raises(ValueError, match="fewer than the 4 new tokens"):
        tt.cache_positions(decoder_mask(3, [3]), torch.zeros(1, 4, dtype=torch.int64))


@pytest.mark.parametrize("t, sink, size", [(1, 1, 2), (3, 4, 8), (13, 1, 4), (33, 4, 8), (33, 0, 40)])
def test_sink_index_and_window_join_match_reference_and_gather_the_kept_slots(t, sink, size):
    """Every row's kept slots after its sinks are the cache's last ones: a short row keeps
    padding in front, a full one its most recent tokens."""
    mask = decoder_mask(t, [t, max(1, t - 9)])
    idx = window.window_tokens_ref(mask, sink, size)
    x = torch.randn(2, 3, t, 8)
    index = tt.sink_index(idx, sink, x, 2)
    assert torch.equal(index, window.sink_index_ref(idx, sink, x, 2))
    sinks = torch.gather(x, 2, index)
    start = t - idx.shape[1] + sinks.shape[2]
    joined = tt.window_join(sinks, x, start, 2)
    assert torch.equal(joined, window.window_join_ref(sinks, x, start, 2))
    assert torch.equal(joined, tokens.gather_tokens_ref(x, idx, 2))


# --- tables -----------------------------------------------------------------------------------


def test_every_op_of_the_group_has_a_kernel():
    ops = {*tokens.REFERENCES, *merge.REFERENCES, *window.REFERENCES}
    assert set(tt.KERNELS) == {op.name() for op in ops}


def test_aot_entries_cover_every_kernel_with_its_arguments():
    kernels = {name: fn for name, fn in vars(tt).items() if name.endswith("_kernel") and hasattr(fn, "arg_names")}
    assert {entry.kernel for entry in tt.AOT} == set(kernels.values())
    for entry in tt.AOT:
        assert list(entry.signature) == list(entry.kernel.arg_names)
        constexprs = [name for name, kind in entry.signature.items() if kind == "constexpr"]
        assert sorted(constexprs) == sorted(entry.constexprs)
        assert all(kind == "constexpr" or kind.lstrip("*") in {"fp16", "bf16", "fp32", "i32", "i64", "u8"}
                   for kind in entry.signature.values())


# --- rows longer than one step of a kernel's loop ---------------------------------------------


def test_topk_and_fuse_over_several_row_steps():
    """600 and 1100 tokens: the selection counts 256 keys a step, row scans take 1024."""
    for n in (600, 1100):
        scores = distinct_scores(2, n)
        mask = keep_mask([n, n // 3], n)
        idx = tt.topk_tokens(scores, mask, 0.3, 1)
        assert torch.equal(idx, tokens.topk_tokens_ref(scores, mask, 0.3, 1))
        x = torch.randn(2, n, 8)
        torch.testing.assert_close(tt.fuse_tokens(x, scores, mask, idx, 1),
                                   tokens.fuse_tokens_ref(x, scores, mask, idx, 1), **FP32)


def test_topk_tokens_equal_scores_keep_the_earliest_tokens():
    """The reference leaves equal scores to torch.topk's order; the kernel keeps the earliest
    positions, the same on every row step (600 tokens, 256 a step)."""
    scores = torch.full((2, 600), 0.5)
    count = tokens.kept_count(600, 0.7, 0)
    assert torch.equal(tt.topk_tokens(scores, None, 0.7, 0), torch.arange(count).expand(2, count))


def test_window_ops_over_several_row_steps():
    mask = decoder_mask(1500, [1500, 700])
    idx = tt.window_tokens(mask, 4, 1000)
    assert torch.equal(idx, window.window_tokens_ref(mask, 4, 1000))
    ids = torch.zeros(2, 3, dtype=torch.int64)
    assert torch.equal(tt.cache_positions(mask, ids), window.cache_positions_ref(mask, ids))
    x = torch.randn(2, 1500, 2)
    sinks = torch.gather(x, 1, tt.sink_index(idx, 4, x, 1))
    assert torch.equal(tt.window_join(sinks, x, 1500 - 1000, 1), tokens.gather_tokens_ref(x, idx, 1))


@pytest.mark.parametrize("mode", [1, 3])
def test_token_scores_over_several_key_steps_with_an_infinite_mask(mode):
    """150 keys (64 a step) behind 90 left-padding slots masked with -inf: whole steps of a row
    are -inf, which the online softmax must skip without producing NaN."""
    n = 150
    q, k = torch.randn(2, 2, n, 16), torch.randn(2, 1, n, 16)
    allowed = attention_mask(keep_mask([n, 60], n, left=True), "bool4d", causal=True)
    mask = torch.zeros(allowed.shape).masked_fill(~allowed, float("-inf"))
    got = tt.token_scores(q, k, mask, 0.25, mode)
    assert not got.isnan().any()
    torch.testing.assert_close(got, tokens.token_scores_ref(q, k, mask, 0.25, mode), **FP32)
