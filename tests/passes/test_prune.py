"""prune: EViT-style token pruning rewrites the graph so later blocks run fewer tokens."""
import pytest
import torch

from skimformer import load, optimize
from skimformer.passes import PassManager, pipeline_from
from skimformer.passes.manager import max_abs_error
from skimformer.zoo import export_zoo


def _prune(path, spec):
    model = load(path)
    new, (record,), metrics = PassManager(pipeline_from(spec)).run(model)
    return model.programs["model"], new.programs["model"], record, metrics


def test_dynamic_bert_with_padding(exported, tmp_path):
    before, after, record, metrics = _prune(exported("bert"), "prune(keep=0.5, at=[0])")
    assert record.report["tokens_per_block"] == {"before": [12, 12], "after": [12, 8]}  # 1 + ceil(0.5*11) + fused
    assert record.report["flops"]["ratio"] < 1
    assert record.report["approximate_outputs"] == ["last_hidden_state"]
    out = after.run(before.example_inputs)
    assert out["last_hidden_state"].shape == (2, 12, 64)  # restored to every original token
    assert 0 < metrics["last_hidden_state.cosine"] <= 1
    feeds = {"input_ids": torch.randint(3, 300, (3, 20)), "attention_mask": torch.ones(3, 20, dtype=torch.long)}
    assert after.run(feeds)["last_hidden_state"].shape == (3, 20, 64)  # still dynamic
    engine = optimize(after, output=tmp_path / "e")
    got = engine.run(feeds)["last_hidden_state"]
    torch.testing.assert_close(torch.from_numpy(got), after.run(feeds)["last_hidden_state"], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("family", ["bert", "vit"])
def test_keep_everything_is_lossless(exported, family):
    before, after, record, _ = _prune(exported(family), "prune(keep=1.0, at=[0, 1])")
    err, ok = max_abs_error(before.run(before.example_inputs), after.run(before.example_inputs))
    assert ok, err
    assert record.report["tokens_per_block"]["after"] == record.report["tokens_per_block"]["before"]


def test_static_program_where_tokens_equal_head_dim(tmp_path):
    """16 tokens and head dim 16: sizes are rewritten by dataflow, not by value."""
    export_zoo("bert", tmp_path / "b", static=True, batch=2, seq_len=16)
    before, after, record, _ = _prune(tmp_path / "b" / "model.pt2", "prune(keep=0.5, at=[0, 1], score=mean-attention)")
    assert record.report["tokens_per_block"]["after"] == [16, 10]
    out = after.run(before.example_inputs)
    assert out["last_hidden_state"].shape == (2, 16, 64)
    assert all(isinstance(d, int) for d in after.output_specs()[0]["shape"])


def test_vit_two_points_through_the_engine(exported, tmp_path):
    before, after, record, _ = _prune(exported("vit"), "prune(keep=0.5, at=[0, 1], score=key-norm, fuse=false)")
    assert record.report["tokens_per_block"]["after"] == [17, 9]
    engine = optimize(after, output=tmp_path / "e")
    got = engine.run(before.example_inputs)
    want = after.run(before.example_inputs)
    for name in want:
        torch.testing.assert_close(torch.from_numpy(got[name]), want[name], atol=1e-4, rtol=1e-4)


def test_padding_is_dropped_before_real_tokens():
    scores = torch.tensor([[0.0, 5.0, 4.0, 9.0, 8.0, 7.0]])
    mask = torch.tensor([[True, True, True, False, False, True]])[:, None, None, :]
    idx = torch.ops.skim.topk_tokens(scores, mask, 0.6, 1)  # 1 + ceil(0.6 * 5) = 4 tokens
    assert idx.tolist() == [[0, 1, 2, 5]]


def test_layer_out_of_range(exported):
    from skimformer import UserError

    with pytest.raises(UserError, match="0-based"):
        _prune(exported("bert"), "prune(at=[5])")


def test_program_exported_at_batch_one_stays_dynamic(tmp_path):
    """A dynamic batch exported from one example must not be specialized to 1 by the rewrite."""
    export_zoo("vit", tmp_path / "v", batch=1)
    _, after, _, _ = _prune(tmp_path / "v" / "model.pt2", "prune(keep=0.5, at=[0])")
    assert isinstance(after.input_specs()[0]["shape"][0], str)
    assert after.run({"pixel_values": torch.randn(3, 3, 32, 32)})["last_hidden_state"].shape == (3, 17, 64)
