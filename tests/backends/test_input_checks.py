"""Engines refuse inputs their program does not take (the runtimes would compute garbage), and
the build's parity check runs a second input shape."""
import json

import numpy as np
import pytest

from skimformer import Engine, UserError, VerificationError, load, optimize
from skimformer.backends.input_check import Signature
from skimformer.cli.main import main
from skimformer.zoo import export_zoo


@pytest.fixture(scope="module")
def tome_engine(exported, tmp_path_factory):
    return optimize(exported("bert"), output=tmp_path_factory.mktemp("tome") / "engine", passes="tome(r=3)")


def _text(batch: int, tokens: int, dtype=np.int64) -> dict:
    return {"input_ids": np.full((batch, tokens), 7, dtype=dtype), "attention_mask": np.ones((batch, tokens), dtype=np.int64)}


def _refusal(engine: Engine, inputs: dict, program: str | None = None) -> str:
    with pytest.raises(UserError) as e:
        engine.run(inputs, program)
    message = str(e.value)
    assert "\n" not in message
    return message


def test_the_manifest_records_each_size_range(tome_engine):
    program = json.loads((tome_engine.folder / "manifest.json").read_text())["programs"]["model"]
    tokens = program["inputs"][0]["shape"][1]
    assert program["sizes"][tokens] == {"min": 10, "max": 512}  # 2 blocks merge 3 tokens each, CLS kept
    assert program["sizes"][program["inputs"][0]["shape"][0]] == {"min": 0, "max": None}  # export's default 2 reads as 0


def test_a_tome_engine_refuses_fewer_tokens_than_it_merges(tome_engine):
    assert "needs at least 10 there" in _refusal(tome_engine, _text(2, 9))
    assert _refusal(tome_engine, _text(1, 513)).endswith("give a shorter input")
    assert tome_engine.run(_text(1, 10))["last_hidden_state"].shape[0] == 1


def test_wrong_names_dtypes_ranks_and_sizes_are_refused(tome_engine):
    assert "must be int64 with 2 dimensions, not int32" in _refusal(tome_engine, _text(2, 12, np.int32))
    three_d = {k: v[None] for k, v in _text(2, 12).items()}
    assert "with 2 dimensions, not int64 with shape [1, 2, 12]" in _refusal(tome_engine, three_d)
    assert "missing attention_mask" in _refusal(tome_engine, {"input_ids": _text(2, 12)["input_ids"]})
    assert "takes no input token_type_ids" in _refusal(tome_engine, {**_text(2, 12), "token_type_ids": np.zeros((2, 12))})
    uneven = {**_text(2, 12), "attention_mask": np.ones((2, 11), dtype=np.int64)}
    assert "this engine needs them equal" in _refusal(tome_engine, uneven)


def test_skimformer_run_refuses_bad_inputs_with_one_line(tome_engine, tmp_path, capsys):
    bad = tmp_path / "bad.npz"
    np.savez(bad, **_text(2, 4))
    assert main(["run", str(tome_engine.folder), "--inputs", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "needs at least 10" in err and "bug" not in err


@pytest.fixture
def decoder_engine(tiny_engine):
    return tiny_engine()


def test_a_decode_mask_must_cover_the_past_and_the_new_tokens(decoder_engine):
    step = decoder_engine.example_inputs("decode")
    short = {**step, "attention_mask": step["attention_mask"][:, 1:]}
    assert "make it s" in _refusal(decoder_engine, short, "decode")
    report = json.loads((decoder_engine.folder / "report.json").read_text())["parity"]["programs"]["decode"]
    batch, new = step["input_ids"].shape
    past = step["past_key_0"].shape[2]
    assert report["other_shape"]["inputs"]["input_ids"] == [batch + 1, new - 1]
    assert report["other_shape"]["inputs"]["attention_mask"] == [batch + 1, past + new - 1]


def test_generate_checks_the_prompt_once_not_every_step(decoder_engine, monkeypatch):
    checked = []
    check = decoder_engine.signatures["prefill"].check
    monkeypatch.setattr(decoder_engine.signatures["prefill"], "check", lambda feeds: checked.append(1) or check(feeds))
    monkeypatch.setattr(decoder_engine.signatures["decode"], "check", lambda feeds: pytest.fail("a step was checked"))
    assert decoder_engine.generate([[5, 6, 7]], 4).shape == (1, 4)
    assert checked == [1]
    with pytest.raises(UserError, match="the prompt is empty"):
        decoder_engine.generate([[]], 4)


def test_generate_refuses_a_prompt_a_static_decoder_cannot_take(tmp_path):
    export_zoo("llama", tmp_path / "static", batch=1, seq_len=8, static=True)
    engine = optimize(load(tmp_path / "static"), output=tmp_path / "engine")
    with pytest.raises(UserError, match=r"input_ids has shape \[1, 5\], but this engine takes \[1, 8\]"):
        engine.generate([[5, 6, 7, 8, 9]], 1)


def _decode_step(mask: str) -> tuple[Signature, dict]:
    inputs = [{"name": "input_ids", "shape": ["b", "n"], "dtype": "int64"},
              {"name": "attention_mask", "shape": ["b", mask], "dtype": "int64"},
              {"name": "past_key_0", "shape": ["b", 2, "p", 4], "dtype": "float32"}]
    feeds = {"input_ids": np.arange(6).reshape(2, 3), "attention_mask": np.ones((2, 8), dtype=np.int64),
             "past_key_0": np.random.default_rng(0).random((2, 2, 5, 4), dtype=np.float32)}
    return Signature("decode", inputs, {"n": {"min": 0, "max": None}}), feeds


def test_the_second_shape_keeps_a_decode_step_consistent():
    signature, feeds = _decode_step("p + n")
    other = signature.another_shape(feeds)
    signature.check(other)
    assert {k: v.shape for k, v in other.items()} == {"input_ids": (3, 2), "attention_mask": (3, 7),
                                                      "past_key_0": (3, 2, 5, 4)}
    np.testing.assert_array_equal(other["input_ids"], [[0, 1], [3, 4], [0, 1]])  # a copy of the first row
    # a mask with a symbol of its own may hide `p + n`: only the batch changes
    signature, feeds = _decode_step("m")
    assert {k: v.shape[1] for k, v in signature.another_shape(feeds).items()} == {
        "input_ids": 3, "attention_mask": 8, "past_key_0": 2}


def test_parity_runs_a_second_shape(exported, tmp_path, monkeypatch):
    """An engine right at the example's batch and wrong at any other fails its build."""
    run = Engine.run

    def wrong_at_other_batches(self, inputs, program=None):
        out = run(self, inputs, program)
        return out if len(inputs["input_ids"]) == 2 else {k: v + 1 for k, v in out.items()}

    monkeypatch.setattr(Engine, "run", wrong_at_other_batches)
    with pytest.raises(VerificationError):
        optimize(exported("bert"), output=tmp_path / "eng")
    assert not (tmp_path / "eng").exists()


def test_parity_report_names_the_second_shape(tome_engine):
    check = json.loads((tome_engine.folder / "report.json").read_text())["parity"]["programs"]["model"]
    assert check["other_shape"]["inputs"]["input_ids"] == [3, 11] and check["other_shape"]["ok"]
