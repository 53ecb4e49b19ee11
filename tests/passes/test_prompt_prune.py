"""prompt-prune: FastV / GemFilter-style pruning of a causal LM's prompt at prefill."""
import json

import numpy as np
import onnx
import pytest
import torch
import transformers as tf

from skimformer import UserError, load, optimize
from skimformer.kernels.tokens import kept_count
from skimformer.passes import PassManager, pipeline_from
from skimformer.passes.manager import max_abs_error
from skimformer.zoo import export_zoo
from skimformer.zoo.builders import build_model
from skimformer.zoo.hf_export import additive_causal_mask

N, KEPT = 16, kept_count(16, 0.5, 1)  # the zoo's prompts: 16 tokens, row 1 left-padded by 4


@pytest.fixture(scope="module")
def decoders(tiny_decoder, tmp_path_factory):
    """`decoders(family, static)` -> a zoo decoder folder (the session's tiny Llama when dynamic)."""
    cache = {("llama", False): tiny_decoder}
    root = tmp_path_factory.mktemp("prompt-prune")

    def get(family: str, static: bool):
        if (family, static) not in cache:
            out = root / f"{family}-{'static' if static else 'dyn'}"
            export_zoo(family, out, static=static)
            cache[(family, static)] = out
        return cache[(family, static)]

    return get


def _prune(path, spec):
    model = load(path)
    new, (record,), metrics = PassManager(pipeline_from(spec)).run(model)
    return model, new, record, metrics


@pytest.fixture(scope="module")
def pruned(decoders):
    """`pruned(family, static, spec)` -> `_prune` of that zoo decoder (cached: re-export is slow)."""
    cache = {}

    def get(family: str, static: bool, spec: str):
        if (family, static, spec) not in cache:
            cache[(family, static, spec)] = _prune(decoders(family, static), spec)
        return cache[(family, static, spec)]

    return get


def _take(t: torch.Tensor, idx: torch.Tensor, dim: int) -> torch.Tensor:
    """`t` with only the tokens `idx[b]` along `dim`, per batch row."""
    shape = [idx.shape[0] if j == 0 else idx.shape[1] if j == dim else 1 for j in range(t.dim())]
    return torch.gather(t, dim, idx.view(shape).expand([idx.shape[1] if j == dim else s for j, s in enumerate(t.shape)]))


def _reference(inputs: dict, layer: int) -> dict:
    """The zoo Llama run block by block in transformers: every token through block `layer`, then
    only the kept ones (chosen here from the last query's eager attention row: padding first, the
    first real token and the last token always kept) with their original rotary positions."""
    model = build_model("llama")
    model.set_attn_implementation("eager")
    inner, ids, mask, pos = model.model, inputs["input_ids"], inputs["attention_mask"], inputs["position_ids"]
    n = ids.shape[1]
    seen = {}
    inner.layers[layer].self_attn.register_forward_hook(lambda m, a, out: seen.update(p=out[1]))
    cache = tf.DynamicCache(config=model.config)
    with torch.no_grad():
        h = inner.embed_tokens(ids)
        cos, sin = inner.rotary_emb(h, pos)
        causal = additive_causal_mask(mask, n)
        for i, block in enumerate(inner.layers):
            h = block(h, attention_mask=causal, position_embeddings=(cos, sin), position_ids=pos,
                      past_key_values=cache, use_cache=True)
            if i == layer:
                scores = seen["p"][:, :, -1].mean(1)  # [B, n]: the last query's row, mean over heads
                real = mask.bool()
                scores = torch.where(real, scores, torch.full_like(scores, -1.0))
                scores[:, -1] = 2.0
                scores = torch.where(real & (real.long().cumsum(1) == 1), torch.full_like(scores, 3.0), scores)
                idx = scores.topk(kept_count(n, 0.5, 1), dim=1).indices.sort(dim=1).values
                h, cos, sin = _take(h, idx, 1), _take(cos, idx, 1), _take(sin, idx, 1)
                causal = _take(_take(causal, idx, 2), idx, 3)
                for done in cache.layers[:i + 1]:
                    done.keys, done.values = _take(done.keys, idx, 2), _take(done.values, idx, 2)
        logits = model.lm_head(inner.norm(h))
    out = {"logits_kept": logits, "idx": idx}
    for i, done in enumerate(cache.layers):
        out[f"present_key_{i}"], out[f"present_value_{i}"] = done.keys, done.values
    return out


def test_keep_everything_is_lossless(pruned):
    model, new, record, _ = pruned("llama", False, "prompt-prune(layer=0, keep=1.0)")
    prefill = model.programs["prefill"]
    want, got = prefill.run(prefill.example_inputs), new.programs["prefill"].run(prefill.example_inputs)
    err, ok = max_abs_error(want, got)
    assert ok and err < 1e-5, err
    assert torch.equal(got["attention_mask"], prefill.example_inputs["attention_mask"])
    assert new.programs["decode"] is model.programs["decode"]  # only the prefill is rewritten
    assert record.report["prefill"]["tokens_per_block"]["after"] == [N, N]


@pytest.mark.parametrize("static", [False, True], ids=["dynamic", "static"])
def test_later_blocks_and_cache_hold_only_the_kept_tokens(pruned, static):
    model, new, record, metrics = pruned("llama", static, "prompt-prune(layer=0, keep=0.5)")
    prefill = model.programs["prefill"]
    inputs = prefill.example_inputs
    got = new.programs["prefill"].run(inputs)
    report = record.report["prefill"]
    assert report["tokens_per_block"] == {"before": [N, N], "after": [N, KEPT]}
    assert report["approximate_outputs"] == ["logits"] and report["flops"]["ratio"] < 1
    assert report["kv_cache_bytes"]["after"] < report["kv_cache_bytes"]["before"]
    assert new.programs["prefill"].output_names[-1] == "attention_mask"
    assert got["logits"].shape == (2, N, 300)  # restored to every prompt token
    ref = _reference(inputs, layer=0)
    idx = ref["idx"]
    assert idx[0, 0] == 0 and idx[1, 0] == 4  # the first real token (row 1 is left-padded by 4)
    assert (idx[:, -1] == N - 1).all() and (idx[1] >= 4).all()  # the last token kept, no padding
    assert torch.equal(got["attention_mask"], torch.ones(2, KEPT, dtype=torch.long))
    for i in range(2):
        for kind in ("key", "value"):
            name = f"present_{kind}_{i}"
            assert got[name].shape == (2, 2, KEPT, 16)
            torch.testing.assert_close(got[name], ref[name], atol=1e-4, rtol=1e-4)
    # the last position is computed exactly on the kept tokens; so are the other kept ones
    torch.testing.assert_close(got["logits"][:, -1], ref["logits_kept"][:, -1], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(torch.gather(got["logits"], 1, idx[..., None].expand(-1, -1, 300)),
                               ref["logits_kept"], atol=1e-4, rtol=1e-4)
    assert 0 <= metrics["prefill.logits.top1_agreement"] <= 1  # lossy: fidelity is reported
    original = prefill.run(inputs)["logits"][:, -1]
    assert not torch.allclose(original, got["logits"][:, -1], atol=1e-3)


def test_gpt2_early_cache_is_the_original_one_gathered(pruned):
    """GPT-2, dynamic: Conv1D folds the tokens into the batch (`view(x, [-1, C])`) after the
    pruning point; block 0's cache, computed before it, holds original entries at kept positions."""
    model, new, record, _ = pruned("gpt2", False, "prompt-prune(layer=0, keep=0.5)")
    assert record.report["prefill"]["tokens_per_block"]["after"] == [N, KEPT]
    inputs = model.programs["prefill"].example_inputs
    want, got = model.programs["prefill"].run(inputs), new.programs["prefill"].run(inputs)
    assert got["logits"].shape == (2, N, 300) and got["present_value_1"].shape == (2, 4, KEPT, 16)
    for row, first in ((0, 0), (1, 4)):  # row 1 is left-padded by 4
        full, kept = want["present_key_0"][row, 0], got["present_key_0"][row, 0]  # [n, D]
        positions = [int((full - k).abs().sum(-1).argmin()) for k in kept]
        assert positions == sorted(set(positions)) and len(positions) == KEPT
        assert positions[0] == first and positions[-1] == N - 1
        for name in ("present_key_0", "present_value_0"):
            torch.testing.assert_close(got[name][row], want[name][row][:, positions])
    feeds = {"input_ids": torch.randint(3, 300, (3, 7)), "attention_mask": torch.ones(3, 7, dtype=torch.long),
             "position_ids": torch.arange(7).expand(3, 7)}
    other = new.programs["prefill"].run(feeds)  # still dynamic: another batch and prompt length
    assert other["logits"].shape == (3, 7, 300) and other["present_key_1"].shape[2] == kept_count(7, 0.5, 1)


def test_engine_generates_a_left_padded_batch_on_the_shorter_cache(pruned, decoders, tmp_path):
    engine = optimize(pruned("llama", False, "prompt-prune(layer=0, keep=0.5)")[1], output=tmp_path / "eng")
    assert json.loads((tmp_path / "eng" / "report.json").read_text())["parity"]["ok"]
    # tokens (and the restored logits) are gathered by rows, with no index expanded to the logits' size
    ops = {n.op_type for n in onnx.load(tmp_path / "eng" / "prefill.onnx", load_external_data=False).graph.node}
    assert "GatherND" in ops and "GatherElements" not in ops
    ids = np.array([[0, 0, 0, 0, 0, 0, 0, 0, 5, 9, 14, 7], [7, 3, 11, 20, 4, 8, 6, 9, 10, 12, 13, 15]])
    mask = np.array([[0] * 8 + [1] * 4, [1] * 12])
    pos = np.clip(np.cumsum(mask, 1) - 1, 0, None)
    first = engine.run({"input_ids": ids, "attention_mask": mask, "position_ids": pos}, "prefill")
    kept = kept_count(12, 0.5, 1)
    assert first["present_key_0"].shape[2] == first["present_value_1"].shape[2] == kept
    # row 0 has fewer real tokens than are kept: all of them, padding for the rest (masked out)
    assert first["attention_mask"].tolist() == [[0] * (kept - 4) + [1] * 4, [1] * kept]
    whole = load(decoders("llama", False)).programs["prefill"].run(
        {"input_ids": torch.as_tensor(ids), "attention_mask": torch.as_tensor(mask), "position_ids": torch.as_tensor(pos)})
    np.testing.assert_allclose(first["logits"][0, -1], whole["logits"][0, -1].numpy(), atol=1e-4, rtol=1e-4)
    got = engine.generate(ids, max_new_tokens=4, attention_mask=mask)
    assert got.shape == (2, 4)
    # reference: the rewritten programs in torch, decode fed the pruned cache and its mask
    pruned = load(tmp_path / "eng")
    t = torch.as_tensor
    out = pruned.programs["prefill"].run({"input_ids": t(ids), "attention_mask": t(mask), "position_ids": t(pos)})
    cache_mask, nxt, tokens = out["attention_mask"], t(pos[:, -1:]) + 1, []
    for _ in range(4):
        tokens.append(out["logits"][:, -1].argmax(-1))
        cache_mask = torch.cat([cache_mask, torch.ones(2, 1, dtype=torch.long)], 1)
        feeds = {"input_ids": tokens[-1][:, None], "attention_mask": cache_mask, "position_ids": nxt}
        feeds.update({k.replace("present_", "past_"): v for k, v in out.items() if k.startswith("present_")})
        assert feeds["past_key_0"].shape[2] == cache_mask.shape[1] - 1  # decode runs on the kept cache
        out, nxt = pruned.programs["decode"].run(feeds), nxt + 1
    assert got.tolist() == torch.stack(tokens, 1).tolist()


def test_kernels_protect_the_first_real_token_and_the_last():
    q, k = torch.randn(2, 4, 6, 8), torch.randn(2, 2, 6, 8)  # grouped-query keys: 2 heads for 4
    mask = additive_causal_mask(torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]]), 6)
    scores = torch.ops.skim.token_scores(q, k, mask, 8 ** -0.5, 3)
    assert scores.shape == (2, 6) and (scores[:, -1] == 2.0).all()
    assert (scores[0, :2] == 0).all()  # padding draws no attention from the last query
    idx = torch.ops.skim.topk_tokens(scores, mask, 0.4, 1)  # 1 + ceil(0.4 * 5) = 3 tokens
    assert idx[0].tolist()[0] == 2 and idx[0].tolist()[-1] == 5 and (idx[0] >= 2).all()
    assert idx[1].tolist()[0] == 0 and idx[1].tolist()[-1] == 5
    one = torch.ops.skim.topk_tokens(scores[:, -1:], mask[..., -1:, -1:], 0.5, 1)
    assert one.tolist() == [[0], [0]]  # a one-token prompt keeps its token


@pytest.mark.parametrize("spec, message", [
    ("prompt-prune(keep=0)", r"\(0, 1\]"),
    ("prompt-prune(keep=1.5)", r"\(0, 1\]"),
    ("prompt-prune(layer=-1)", ">= 0"),
    ("prompt-prune(score=cls)", "last-query"),
])
def test_bad_configs_are_refused(spec, message):
    with pytest.raises(UserError, match=message):
        pipeline_from(spec)


def test_layer_out_of_range(decoders):
    with pytest.raises(UserError, match=r"2 blocks \(0-based indices up to 1\)"):
        _prune(decoders("llama", False), "prompt-prune(layer=2)")


def test_pruning_twice_is_refused(pruned):
    from skimformer.passes.prompt_prune import PromptPrune, PromptPruneConfig

    with pytest.raises(UserError, match="already pruned"):
        PromptPrune().apply_model(pruned("llama", False, "prompt-prune(layer=0, keep=0.5)")[1], PromptPruneConfig(layer=0))


def test_an_encoder_is_refused(exported):
    with pytest.raises(UserError, match="causal LM.*encoder"):
        _prune(exported("bert"), "prompt-prune(layer=0)")
