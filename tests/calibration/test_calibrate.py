"""`skimformer calibrate`: exit adapters trained with the backbone frozen, thresholds, the file, the CLI."""
import json

import numpy as np
import pytest
import torch
import transformers as tf

import skimformer
from skimformer.calibration.backbone import Backbone, default_at
from skimformer.calibration.data import as_inputs, text_rows
from skimformer.calibration.train import GRID, NEVER, choose_thresholds
from skimformer.cli.main import main
from skimformer.errors import UserError
from skimformer.ir import load
from skimformer.ir.exit_heads import ExitHeads
from skimformer.zoo import build_model, export_model, real


def ids(rows, seq=16, seed=0):
    return {"input_ids": torch.randint(3, 300, (rows, seq), generator=torch.Generator().manual_seed(seed))}


@pytest.fixture(scope="module")
def decoder(tiny_decoder):
    """The tiny Llama, loaded once for the tests that do not go through the command line."""
    return load(tiny_decoder)


@pytest.fixture(scope="module")
def sharp_decoder(tmp_path_factory):
    """The tiny Llama made to disagree at its exit in a way an adapter can learn: a sharp LM head
    (random weights give near-uniform distributions) and a last block that changes the residual
    stream position by position (attention output zeroed, MLP amplified)."""
    model = build_model("llama")
    with torch.no_grad():
        model.lm_head.weight.mul_(30)
        model.model.layers[1].self_attn.o_proj.weight.zero_()
        model.model.layers[1].mlp.down_proj.weight.mul_(5)
    out = tmp_path_factory.mktemp("sharp") / "llama"
    export_model(model, out)
    return out


@pytest.fixture(scope="module")
def classifier(tmp_path_factory):
    torch.manual_seed(0)
    config = tf.BertConfig(vocab_size=300, hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
                           intermediate_size=128, num_labels=3)
    out = tmp_path_factory.mktemp("classifier") / "bert"
    export_model(tf.BertForSequenceClassification._from_config(config, attn_implementation="sdpa"), out)
    return out / "model.pt2"


def classifier_inputs(rows=40):
    feeds = ids(rows, 12)
    return {**feeds, "attention_mask": torch.ones_like(feeds["input_ids"]),
            "token_type_ids": torch.zeros_like(feeds["input_ids"])}


def test_default_exits_sit_at_quarters_of_the_depth():
    assert default_at(30) == [6, 14, 21] and default_at(2) == [0] and default_at(4) == [0, 1, 2]


def test_head_replays_the_programs_own_head(decoder):
    program = decoder.programs["prefill"]
    backbone = Backbone(program)
    batch = backbone.run(program.example_inputs, [0])
    last = batch.operands[backbone.last]
    torch.testing.assert_close(backbone.head(last, batch).log_softmax(-1), batch.log_probs)


def test_a_batch_splits_into_rows(decoder):
    program = decoder.programs["prefill"]
    mask = torch.tensor([[1] * 16, [0] * 4 + [1] * 12, [1] * 16])
    inputs = as_inputs({**ids(3), "attention_mask": mask}, program, decoder=True)
    batch = Backbone(program).run(inputs, [0])
    parts = batch.split(2)
    assert [len(p.valid) for p in parts] == [2, 1] and [len(p.log_probs) for p in parts] == [28, 16]
    assert torch.equal(torch.cat([p.log_probs for p in parts]), batch.log_probs)
    assert torch.equal(torch.cat([p.hidden[0] for p in parts]), batch.hidden[0])


def test_thresholds_reach_the_target_on_their_data():
    g = torch.Generator().manual_seed(0)
    conf = {k: torch.rand(2000, generator=g) for k in (2, 5)}
    judged = {k: (c, torch.rand(2000, generator=g) < c ** 0.2) for k, c in conf.items()}  # confident = right
    thresholds, rates = choose_thresholds(judged, 0.95)
    remaining = torch.ones(2000, dtype=torch.bool)
    for k in (2, 5):
        c, agree = judged[k]
        taken = remaining & (c > thresholds[k])
        assert thresholds[k] in GRID and taken.any() and agree[taken].float().mean() >= 0.95
        assert rates[k] == pytest.approx(taken.float().mean().item())
        lower = GRID[GRID.index(thresholds[k]) - 1] if thresholds[k] > GRID[0] else None
        assert lower is None or agree[remaining & (c > lower)].float().mean() < 0.95  # the lowest that qualifies
        remaining &= ~taken
    never, rate = choose_thresholds({0: (torch.rand(10, generator=g), torch.zeros(10, dtype=torch.bool))}, 0.9)
    assert never == {0: NEVER} and rate == {0: 0.0}


def test_decoder_calibration_round_trips(decoder, tmp_path):
    out = tmp_path / "heads.safetensors"
    result = skimformer.calibrate(decoder, data=ids(8), out=out, steps=5, rank=8, target_agreement=0.5)
    loaded = ExitHeads.load(out)
    assert result.output == out and loaded.metadata() == result.heads.metadata()
    assert loaded.kind == "decoder" and loaded.at == [0] and loaded.rank == 8
    assert all(torch.equal(a, b) for a, b in zip(loaded.adapters[0], result.heads.adapters[0]))
    assert result.positions == {"train": 6 * 16, "held_out": 2 * 16}
    assert 0 <= loaded.exit_rate[0] <= 1 and 0 <= loaded.agreement_after[0] <= 1


def test_no_training_keeps_the_plain_exit(decoder):
    result = skimformer.calibrate(decoder, data=ids(8), steps=0)
    h = result.heads
    assert torch.equal(h.adapters[0][1], torch.zeros_like(h.adapters[0][1]))
    assert h.agreement_after == h.agreement_before


@pytest.mark.slow
def test_training_raises_agreement_on_held_out_positions(sharp_decoder):
    result = skimformer.calibrate(sharp_decoder, data=ids(256), steps=200, target_agreement=0.9, seed=0)
    h = result.heads
    assert result.positions == {"train": 205 * 16, "held_out": 51 * 16}
    assert h.agreement_before[0] < 0.5  # the plain exit disagrees often (37%; seeds 0-3 gain 11 to 17 points)
    assert h.agreement_after[0] > h.agreement_before[0] + 0.05
    assert 0 < h.exit_rate[0] < 1 and h.thresholds[0] < NEVER


@pytest.mark.slow
def test_encoder_classifier(classifier, tmp_path):
    result = skimformer.calibrate(classifier, data=classifier_inputs(), at=[0, 1], out=tmp_path / "h.safetensors",
                                  steps=20)
    assert result.heads.kind == "encoder" and result.heads.at == [0, 1]
    assert result.positions == {"train": 32, "held_out": 8}  # one position per row: the sequence's label


def test_encoder_needs_data(classifier):
    with pytest.raises(UserError, match="encoder needs calibration inputs"):
        skimformer.calibrate(classifier)


def test_decoder_without_tokenizer_needs_data(decoder):
    with pytest.raises(UserError, match="no tokenizer files"):
        skimformer.calibrate(decoder)


def test_text_rows_use_the_models_tokenizer(tmp_path):
    try:
        folder = real.smollm2_dir()
    except real.MissingModel as e:
        pytest.skip(str(e))
    rows = text_rows(skimformer.Model(programs={}, source=folder), rows=3, seq_len=20)["input_ids"]
    assert rows.shape == (3, 20) and len({tuple(r) for r in rows.tolist()}) == 3


# -- the command line -----------------------------------------------------------------------------

def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_table_and_json(capsys, tiny_decoder, tmp_path):
    np.savez(tmp_path / "in.npz", **{k: v.numpy() for k, v in ids(8).items()})
    argv = ["calibrate", tiny_decoder, "--data", tmp_path / "in.npz", "-o", tmp_path / "h.safetensors", "--steps", "3"]
    code, out, err = run(capsys, *argv)
    assert code == 0 and "agreement before" in out and "exit heads written to" in out
    assert "exit 0: top-1 agreement" in err  # progress goes to stderr
    code, out, _ = run(capsys, *argv, "--at", "0", "--json")
    summary = json.loads(out)
    assert code == 0 and summary["exits"][0]["at"] == 0 and summary["kind"] == "decoder"
    assert {"agreement_before", "agreement_after", "threshold", "exit_rate"} <= set(summary["exits"][0])
    assert ExitHeads.load(tmp_path / "h.safetensors").at == [0]


@pytest.mark.parametrize("case, message", [
    ("missing", "cannot read calibration inputs"),
    ("text", "cannot read calibration inputs"),
    ("npy", "single array"),
    ("lacks", "lack attention_mask, token_type_ids"),
    ("rows", "same number of rows"),
    ("none", "encoder needs calibration inputs"),
])
def test_cli_bad_data_is_one_line_and_exit_2(capsys, classifier, tmp_path, case, message):
    data = tmp_path / "in.npz"
    feeds = {k: v.numpy() for k, v in classifier_inputs().items()}
    if case == "text":
        data.write_text("not an npz")
    elif case == "npy":
        data = tmp_path / "in.npy"
        np.save(data, feeds["input_ids"])
    elif case == "lacks":
        np.savez(data, input_ids=feeds["input_ids"])
    elif case == "rows":
        np.savez(data, **{**feeds, "attention_mask": feeds["attention_mask"][:3]})
    argv = ["calibrate", classifier, "-o", tmp_path / "h.safetensors"] + ([] if case == "none" else ["--data", data])
    code, out, err = run(capsys, *argv)
    assert code == 2 and out == "" and err.startswith("error:") and err.count("\n") == 1 and message in err, err
    assert not (tmp_path / "h.safetensors").exists()


@pytest.mark.parametrize("argv, message", [
    (["--at", "a,b"], "--at takes comma-separated"),
    (["--at", "1"], "at must list distinct blocks"),
    (["--target-agreement", "1.5"], "target agreement"),
    (["--criterion", "vibes"], "criterion must be one of"),
])
def test_cli_bad_options_exit_2(capsys, tiny_decoder, tmp_path, argv, message):
    code, _, err = run(capsys, "calibrate", tiny_decoder, "-o", tmp_path / "h.safetensors", *argv)
    assert code == 2 and err.startswith("error:") and err.count("\n") == 1 and message in err, err
