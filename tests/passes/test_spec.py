"""Pipeline grammar, YAML, and the refusal of unknown passes and bad fields."""
import dataclasses
from typing import Literal

import pytest

from skimformer import UserError
from skimformer.passes import Pass, pipeline_from, register
from skimformer.passes.registry import _PASSES
from skimformer.passes.spec import build_config, parse_text, parse_value


def test_parse_text():
    steps = parse_text('tome(r=8, schedule=decreasing); prune(keep=0.7, at=[4, 7, 10], fuse=true) ;x; n(s="a;b")')
    assert steps == [("tome", {"r": 8, "schedule": "decreasing"}),
                     ("prune", {"keep": 0.7, "at": [4, 7, 10], "fuse": True}), ("x", {}), ("n", {"s": "a;b"})]


def test_values():
    assert parse_value("[]") == [] and parse_value("none") is None and parse_value("1e-3") == 1e-3
    assert parse_value("false") is False and parse_value("key-norm") == "key-norm"


@pytest.mark.parametrize("bad", ["tome(r=)", "tome(r=8", "tome(8)", "to me(r=1)", "tome(r=[1, 2)"])
def test_malformed(bad):
    with pytest.raises(UserError):
        parse_text(bad)


@dataclasses.dataclass
class _Cfg:
    r: int = 8
    keep: float = 0.5
    at: list[int] = dataclasses.field(default_factory=lambda: [1])
    mode: Literal["a", "b"] = "a"
    flag: bool = True
    budget: int | None = None

    def __post_init__(self):
        if not 0 < self.keep <= 1:
            raise ValueError(f"keep must be in (0, 1], got {self.keep}")


@pytest.fixture
def toy_pass():
    @register
    class Toy(Pass):
        """A toy pass for grammar tests."""
        name = "toy-for-tests"
        Config = _Cfg
        lossless = True

    yield Toy
    _PASSES.pop("toy-for-tests")


def test_typed_config(toy_pass):
    cfg = build_config(toy_pass, {"r": 4, "keep": 1, "at": 3, "mode": "b", "budget": None})
    assert cfg == _Cfg(r=4, keep=1.0, at=[3], mode="b", budget=None)


@pytest.mark.parametrize("fields,words", [
    ({"nope": 1}, ["no field 'nope'", "r, keep, at, mode, flag, budget"]),
    ({"r": 1.5}, ["expected an integer"]),
    ({"flag": 1}, ["true or false"]),
    ({"mode": "c"}, ["not one of a, b"]),
    ({"keep": 0}, ["keep must be in (0, 1]"]),
])
def test_bad_fields(toy_pass, fields, words):
    with pytest.raises(UserError) as err:
        build_config(toy_pass, fields)
    for w in words:
        assert w in str(err.value)


def test_unknown_pass_lists_valid_ones():
    with pytest.raises(UserError) as err:
        pipeline_from("no-such-pass(r=1)")
    assert "unknown pass 'no-such-pass'" in str(err.value) and "canonicalize-attention" in str(err.value)


def test_yaml_forms(toy_pass, tmp_path):
    f = tmp_path / "p.yaml"
    f.write_text("passes:\n  - canonicalize-attention\n  - toy-for-tests: {r: 2}\n  - name: toy-for-tests\n    mode: b\n")
    steps = pipeline_from(config_file=f)
    assert [c.name for c, _ in steps] == ["canonicalize-attention", "toy-for-tests", "toy-for-tests"]
    assert steps[1][1].r == 2 and steps[2][1].mode == "b"


def test_yaml_errors(tmp_path):
    f = tmp_path / "p.yaml"
    f.write_text("passes: [unclosed\n")
    with pytest.raises(UserError, match="not valid YAML"):
        pipeline_from(config_file=f)
    with pytest.raises(UserError, match="no such config file"):
        pipeline_from(config_file=tmp_path / "missing.yaml")
    with pytest.raises(UserError, match="either --passes or --config"):
        pipeline_from("x", f)
