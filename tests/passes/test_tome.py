"""tome: bipartite token merging in every block, with sizes and proportional attention."""
import pytest
import torch

from skimformer import UserError, load, optimize
from skimformer.ir import Model, Program
from skimformer.passes import PassManager, pipeline_from
from skimformer.passes.manager import max_abs_error

skim = torch.ops.skim


def _tome(model, spec):
    new, (record,), metrics = PassManager(pipeline_from(spec)).run(model)
    return model.programs["model"], new.programs["model"], record, metrics


def _count(program, op):
    return sum(n.target is op for n in program.ep.graph.nodes)


@pytest.mark.parametrize("family", ["bert", "vit"])
def test_r0_is_lossless_through_the_merge_ops(exported, family):
    before, after, record, _ = _tome(load(exported(family)), "tome(r=0)")
    assert _count(after, skim.bipartite_merge.default) == 2  # identity merges in both blocks
    err, ok = max_abs_error(before.run(before.example_inputs), after.run(before.example_inputs))
    assert ok, err
    assert record.report["tokens_per_block"]["after"] == record.report["tokens_per_block"]["before"]


def test_dynamic_bert_merges_r_per_block_and_restores_outputs(exported, tmp_path):
    before, after, record, metrics = _tome(load(exported("bert")), "tome(r=3)")
    assert record.report["tokens_per_block"] == {"before": [12, 12], "after": [12, 9]}
    assert record.report["merges_per_block"] == [3, 3]
    assert record.report["flops"]["ratio"] < 0.9
    assert record.report["approximate_outputs"] == ["last_hidden_state"]
    assert 0 < metrics["last_hidden_state.cosine"] <= 1
    feeds = {"input_ids": torch.randint(3, 300, (3, 20)), "attention_mask": torch.ones(3, 20, dtype=torch.long)}
    want = after.run(feeds)["last_hidden_state"]
    assert want.shape == (3, 20, 64)  # still dynamic, every original token restored
    engine = optimize(after, output=tmp_path / "e")
    torch.testing.assert_close(torch.from_numpy(engine.run(feeds)["last_hidden_state"]), want, atol=1e-4, rtol=1e-4)


def test_static_vit_with_decreasing_schedule_runs_in_the_engine(tmp_path):
    from skimformer.zoo import export_zoo

    export_zoo("vit", tmp_path / "v", static=True)
    before, after, record, _ = _tome(load(tmp_path / "v" / "model.pt2"), "tome(r=3, schedule=decreasing)")
    assert record.report["merges_per_block"] == [6, 0]
    assert record.report["tokens_per_block"]["after"] == [17, 11]
    assert all(isinstance(d, int) for d in after.output_specs()[0]["shape"])
    engine = optimize(after, output=tmp_path / "e")
    got, want = engine.run(before.example_inputs), after.run(before.example_inputs)
    for name in want:
        torch.testing.assert_close(torch.from_numpy(got[name]), want[name], atol=1e-4, rtol=1e-4)


def test_padding_merges_first_and_leaves_real_tokens_alone(exported):
    """Row 1 ends in padding: one merge per block takes a padding token, so row 1's real tokens
    come out exactly as without merging, while row 0 (no padding) changes."""
    model = load(exported("bert"))
    before, after, _, _ = _tome(model, "tome(r=1)")
    ids = torch.randint(3, 300, (2, 12))
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, 8:] = 0
    feeds = {"input_ids": ids, "attention_mask": mask}
    want, got = before.run(feeds)["last_hidden_state"], after.run(feeds)["last_hidden_state"]
    torch.testing.assert_close(got[1, :8], want[1, :8], atol=1e-5, rtol=1e-5)
    assert (got[0] - want[0]).abs().max() > 1e-3


class PairedTokens(torch.nn.Module):
    """No position information, so two equal tokens stay equal through every layer."""

    def __init__(self):
        super().__init__()
        layer = torch.nn.TransformerEncoderLayer(32, 4, 64, batch_first=True, dropout=0.0)
        self.enc = torch.nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)

    def forward(self, x):
        return self.enc(x)


@pytest.mark.parametrize("prop_attn", [True, False])
def test_proportional_attention_makes_merging_duplicates_exact(prop_attn):
    """Merging two equal tokens into one of size 2 changes nothing when log(size) is added to
    the logits (the point of proportional attention), and changes attention when it is not."""
    torch.manual_seed(0)
    base = torch.randn(1, 5, 32)
    x = base.repeat_interleave(2, dim=1)  # tokens 2i and 2i+1 are equal
    ep = torch.export.export(PairedTokens().eval(), (x,))
    model = Model(programs={"model": Program(ep, example_inputs={"x": x})})
    before, after, _, _ = _tome(model, f"tome(r=2, protect_cls=false, prop_attn={str(prop_attn).lower()})")
    want, got = before.run({"x": x}), after.run({"x": x})
    assert _count(after, skim.bipartite_merge.default) == 2
    err, ok = max_abs_error(want, got)
    assert ok == prop_attn, err


def test_cls_is_never_merged():
    metric = torch.tensor([[[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0], [0.5, 0.5]]])
    keep, sources = skim.bipartite_match(metric, torch.ones(1, 5), 2, 1)
    assert keep[0, 0] == 0 and sources[0, 0] == 0  # [CLS] (token 0) equals token 1 but stays
    assert sources[0, 2] == sources[0, 3]  # equal tokens 2 and 3 merged
    merged, sizes = skim.bipartite_merge(metric, torch.ones(1, 5), sources, keep, 1)
    assert sizes.sum() == 5 and merged.shape == (1, 3, 2)


def test_decoders_are_refused(tiny_decoder):
    with pytest.raises(UserError, match="causal"):
        PassManager(pipeline_from("tome(r=2)")).run(load(tiny_decoder))


def test_cli_optimize_reports_and_inspect_shows_the_merge_ops(exported, tmp_path, capsys):
    import json

    from skimformer.cli.main import main

    out = tmp_path / "out"
    assert main(["optimize", str(exported("vit")), "--passes", "tome(r=4)", "-o", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    (entry,) = report["passes"]
    assert entry["name"] == "tome" and entry["lossless"] is False and entry["matched"] == 2
    assert entry["report"]["tokens_per_block"]["after"] == [17, 13]
    assert report["parity"]["ok"] and "last_hidden_state.cosine" in report["fidelity"]
    capsys.readouterr()
    assert main(["inspect", str(out / "program.pt2"), "--json"]) == 0
    ops = json.loads(capsys.readouterr().out)["skim_ops"]
    assert {"skim.bipartite_match.default", "skim.bipartite_merge.default", "skim.restore_tokens.default"} <= set(ops)
