"""kv-evict: SnapKV / H2O / key-norm KV-cache eviction per KV head."""
import json

import numpy as np
import pytest
import torch

from skimformer import UserError, load, optimize
from skimformer.kernels.evict import (kv_accumulate_ref, kv_attention_scores_ref, kv_gather_ref,
                                      kv_key_norm_scores_ref, kv_select_by_counting, kv_select_ref)
from skimformer.passes import PassManager, pipeline_from
from skimformer.passes.manager import max_abs_error

N, PAD = 16, 4  # the zoo's prompts: 16 tokens, row 1 left-padded by 4; decode examples add 3


def _run(model, spec):
    new, (record,), _ = PassManager(pipeline_from(spec)).run(model)
    return new, record


def _outputs(model):
    return {role: p.run(p.example_inputs) for role, p in model.programs.items()}


@pytest.fixture(scope="module")
def llama(tiny_decoder):
    return load(tiny_decoder)


# -- the ops' references --------------------------------------------------------------------------

def test_select_per_head_top_k_window_and_padding():
    scores = torch.tensor([[[9., 1., 8., 2., 0., 0.],  # head 0 likes tokens 0 and 2
                            [1., 9., 2., 8., 0., 0.]],  # head 1 likes tokens 1 and 3
                           [[5., 5., 9., 1., 0., 0.],
                            [5., 5., 1., 9., 0., 0.]]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 1]])
    idx = kv_select_ref(scores, mask, 0.0, 4, 2)  # 4 per head, the last 2 tokens always kept
    assert idx[0].tolist() == [[0, 2, 4, 5], [1, 3, 4, 5]]
    # Row 1 has 4 real tokens: padding goes first, whatever it scored.
    assert idx[1].tolist() == [[2, 3, 4, 5], [2, 3, 4, 5]]
    # More kept than real tokens: every head keeps the same padding slots, at the front.
    idx = kv_select_ref(scores, mask, 0.0, 5, 2)
    assert idx[1].tolist() == [[1, 2, 3, 4, 5], [1, 2, 3, 4, 5]]
    assert idx[0].tolist() == [[0, 2, 3, 4, 5], [1, 2, 3, 4, 5]]
    # `keep` is the fraction kept; a budget above the length keeps everything.
    assert kv_select_ref(scores, mask, 0.5, 0, 0).shape == (2, 2, 3)
    assert kv_select_ref(scores, mask, 0.0, 100, 0)[0, 0].tolist() == list(range(6))
    # Exact ties (a repeated token's key norm) break by position, the same in every engine.
    ties = torch.tensor([[[2., 2., 2., 1.]]])
    assert kv_select_ref(ties, torch.ones(1, 4), 0.0, 2, 0).tolist() == [[[1, 2]]]


def test_the_sort_free_selection_equals_the_reference():
    """The mlir backend's decomposition of kv_select: same indices, padding, ties, k = 1 and all."""
    g = torch.Generator().manual_seed(0)
    for b, h, t in [(1, 1, 1), (2, 3, 17), (3, 2, 40)]:
        scores = torch.rand(b, h, t, generator=g)
        scores[..., 1::3] = scores[..., :1]  # exact ties
        mask = torch.ones(b, t, dtype=torch.long)
        mask[-1, :t // 3] = 0
        for keep, budget, window in [(0.5, 0, 2), (0.0, 1, 0), (0.0, 4, 1), (0.0, 100, 0), (1.0, 0, 3)]:
            want = kv_select_ref(scores, mask, keep, budget, window)
            assert torch.equal(kv_select_by_counting(scores, mask, keep, budget, window), want), (b, h, t, keep, budget)


def test_attention_scores_are_the_window_rows_of_masked_attention():
    torch.manual_seed(0)
    b, h, h_kv, n, d, w = 2, 4, 2, 7, 8, 3
    q, k = torch.randn(b, h, n, d), torch.randn(b, h_kv, n, d)
    mask = torch.ones(b, n, dtype=torch.long)
    mask[1, :2] = 0
    scores = kv_attention_scores_ref(q, k, mask, 0.5, w, 1)
    logits = q @ k.repeat_interleave(h // h_kv, dim=1).transpose(-1, -2) * 0.5
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    probs = torch.softmax(logits.masked_fill(~(causal & mask.bool()[:, None, None]), -1e30), -1)
    want = probs[:, :, -w:].sum(2).reshape(b, h_kv, 2, n).sum(2)
    torch.testing.assert_close(scores, want)
    assert torch.all(scores[1, :, :2] == 0)  # padding keys receive nothing
    # Every real query row sums to 1: H2O's accumulated total is (real queries) x (heads per group).
    full = kv_attention_scores_ref(q, k, mask, 0.5, 0, 1)
    torch.testing.assert_close(full.sum(-1), torch.tensor([[14., 14.], [10., 10.]]))
    pooled = kv_attention_scores_ref(q, k, mask, 0.5, w, 3)
    torch.testing.assert_close(pooled[..., 1:-1], (want[..., :-2] + want[..., 1:-1] + want[..., 2:]) / 3)


def test_key_norm_accumulate_and_gather():
    k = torch.randn(2, 2, 5, 4)
    torch.testing.assert_close(kv_key_norm_scores_ref(k), -k.norm(dim=-1))
    prior, step = torch.ones(2, 2, 3), torch.full((2, 2, 5), 2.0)
    assert kv_accumulate_ref(prior, step)[0, 0].tolist() == [3, 3, 3, 2, 2]
    idx = torch.tensor([[[0, 4], [1, 2]]] * 2)
    assert torch.equal(kv_gather_ref(k, idx)[0, 1], k[0, 1, [1, 2]])
    assert torch.equal(kv_gather_ref(step + torch.arange(5.), idx)[0, 0], torch.tensor([2., 6.]))


def test_config_is_validated():
    for spec in ("kv-evict(keep=0)", "kv-evict(pool=4)", "kv-evict(budget=-1)", "kv-evict(policy=lru)",
                 "kv-evict(layer_budget=pyramid)"):
        with pytest.raises(UserError):
            pipeline_from(spec)


# -- the pass on the zoo's Llama (4 query heads, 2 KV heads) --------------------------------------

def test_keep_all_is_lossless(llama):
    # H2O covers both programs: the prefill selects (all) and gathers, decode threads the state.
    new, _ = _run(llama, "kv-evict(policy=h2o, keep=1.0)")
    want, got = _outputs(llama), _outputs(new)
    for role in want:
        err, ok = max_abs_error(want[role], {k: got[role][k] for k in want[role]})
        assert ok, (role, err)
    assert got["prefill"]["attention_mask"].tolist() == llama.programs["prefill"].example_inputs["attention_mask"].tolist()


def test_snapkv_keeps_half_per_head(llama):
    new, record = _run(llama, "kv-evict(policy=snapkv, keep=0.5, window=4)")
    report = record.report["prefill"]
    assert report["tokens_per_layer"] == {"before": [N, N], "after": [N // 2, N // 2]}
    assert report["kv_cache_bytes"]["after"] * 2 == report["kv_cache_bytes"]["before"]
    full = llama.programs["prefill"].run(llama.programs["prefill"].example_inputs)
    out = new.programs["prefill"].run(new.programs["prefill"].example_inputs)
    assert out["attention_mask"].tolist() == [[1] * 8, [1] * 8]  # row 1's 4 padding tokens dropped first
    for i in range(2):
        key, kept = full[f"present_key_{i}"], out[f"present_key_{i}"]
        # each kept key is one of the prompt's, in order, the last 4 (the window) among them
        match = (kept[:, :, :, None] == key[:, :, None]).all(-1)  # [B, H_kv, K, N]
        where = match.float().argmax(-1)
        assert match.any(-1).all() and (where.diff(dim=-1) > 0).all()
        assert (where[..., -4:] == torch.arange(N - 4, N)).all()
        assert (where[1] >= PAD).all()
    # the decode program runs unchanged on the shorter cache
    assert new.programs["decode"].ep is llama.programs["decode"].ep
    assert new.programs["decode"].example_inputs["past_key_0"].shape[2] == N // 2


def test_knorm_keeps_the_smallest_keys(llama):
    new, _ = _run(llama, "kv-evict(policy=knorm, budget=6, window=0)")
    full = llama.programs["prefill"].run(llama.programs["prefill"].example_inputs)
    out = new.programs["prefill"].run(new.programs["prefill"].example_inputs)
    norms = full["present_key_1"][0].norm(dim=-1)  # row 0 has no padding
    want = norms.topk(6, largest=False).indices.sort().values
    kept = out["present_key_1"][0]
    torch.testing.assert_close(kept, torch.stack([full["present_key_1"][0, h, want[h]] for h in range(2)]))


# -- H2O through ONNX Runtime ------------------------------------------------------------------------

BUDGET = 18  # above the prompt (16): the prefill keeps everything, decoding fills the budget, then evicts


@pytest.fixture(scope="module")
def h2o_engine(tiny_decoder, tmp_path_factory):
    out = tmp_path_factory.mktemp("kv-evict") / "h2o"
    return optimize(str(tiny_decoder), passes=f"kv-evict(policy=h2o, budget={BUDGET}, window=2)", output=str(out))


def test_h2o_engine_parity_and_state(h2o_engine):
    report = json.loads((h2o_engine.folder / "report.json").read_text())
    assert report["parity"]["ok"]
    names = h2o_engine.input_names("decode")
    assert names[-2:] == ["state_h2o_0", "state_h2o_1"]
    # State threading: the prefill's state feeds the decode step; without eviction the accumulated
    # attention per KV head is (real queries so far) x (2 query heads per KV head).
    prefill = h2o_engine.example_inputs("prefill")
    out = h2o_engine.run(prefill, "prefill")
    assert out["state_h2o_0"].shape == (2, 2, N)
    np.testing.assert_allclose(out["state_h2o_0"].sum(-1), [[2 * N] * 2, [2 * (N - PAD)] * 2], rtol=1e-5)
    step = h2o_engine.example_inputs("decode")
    np.testing.assert_allclose(step["state_h2o_1"], out["state_h2o_1"], rtol=1e-5)  # the example, from torch
    after = h2o_engine.run(step, "decode")  # 3 new tokens: 19 > 18, one token evicted per head
    assert after["present_key_0"].shape[2] == BUDGET and after["attention_mask"].shape == (2, BUDGET)
    assert after["state_h2o_0"].shape == (2, 2, BUDGET)
    assert np.all(after["state_h2o_0"].sum(-1) < np.array([[2 * (N + 3)] * 2, [2 * (N - PAD + 3)] * 2]) + 1e-4)


def test_h2o_generate_keeps_the_cache_at_budget(h2o_engine):
    lengths, run = [], h2o_engine.run

    def recording(inputs, program=None):
        out = run(inputs, program)
        lengths.append((program, out["present_key_0"].shape[2], out.get("attention_mask", np.zeros((0, 0))).shape[-1]))
        return out

    h2o_engine.run = recording
    prompt = h2o_engine.example_inputs("prefill")
    tokens = h2o_engine.generate(prompt["input_ids"], max_new_tokens=10, attention_mask=prompt["attention_mask"])
    assert tokens.shape == (2, 10)
    assert lengths[0] == ("prefill", N, N)
    assert [n for _, n, _ in lengths[1:]] == [17, 18] + [BUDGET] * 7
    assert all(m == n for _, n, m in lengths[2:])  # the engine's mask follows the evicted cache
