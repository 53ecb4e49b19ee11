"""The build's shortcuts keep what they skip: an unchanged program is copied, not serialized
again; programs lowered in forked processes give the same engine and the same errors."""
import filecmp

import pytest

from skimformer import UserError, load, optimize
from skimformer.backends import build
from skimformer.backends.forked import run_forked


def test_unchanged_programs_are_copied_byte_for_byte(tiny_decoder, tmp_path):
    out = tmp_path / "eng"
    optimize(load(tiny_decoder), output=out)
    for name in ("prefill.pt2", "decode.pt2"):
        assert filecmp.cmp(tiny_decoder / name, out / name, shallow=False)


def test_a_rewritten_program_is_saved_as_rewritten(tiny_decoder, tmp_path):
    out = tmp_path / "eng"
    optimize(load(tiny_decoder), output=out, passes="kv-window(sink=2, window=6)")
    assert not filecmp.cmp(tiny_decoder / "decode.pt2", out / "decode.pt2", shallow=False)
    assert any(str(n.target).startswith("skim.") for n in load(out / "decode.pt2").programs["model"].ep.graph.nodes)


def test_forked_jobs_return_their_results_by_name():
    assert run_forked({"a": lambda: {"x": 1}, "b": lambda: 2, "c": lambda: None}) == {"a": {"x": 1}, "b": 2, "c": None}


def test_a_forked_job_raises_its_own_error_with_the_child_traceback():
    def refuse():
        raise UserError("the prefill program cannot be lowered: do this instead")

    with pytest.raises(UserError, match="cannot be lowered") as caught:
        run_forked({"ok": lambda: 1, "bad": refuse})
    assert any("forked build process" in note for note in caught.value.__notes__)


def test_lowering_side_by_side_matches_one_at_a_time(tiny_decoder, tmp_path, monkeypatch):
    model = load(tiny_decoder)
    forked = build.lower_model(model, _folder(tmp_path / "forked"), "onnxruntime", lambda m: None)
    monkeypatch.setattr(build, "can_fork", lambda: False)
    serial = build.lower_model(model, _folder(tmp_path / "serial"), "onnxruntime", lambda m: None)
    assert forked == serial
    for role in ("prefill", "decode"):
        assert filecmp.cmp(tmp_path / "forked" / f"{role}.onnx", tmp_path / "serial" / f"{role}.onnx", shallow=False)


def _folder(path):
    path.mkdir()
    return path
