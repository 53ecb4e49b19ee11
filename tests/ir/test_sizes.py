"""Sizes are compared without guards: analysis and passes leave a program's dynamic sizes dynamic."""
import pytest
import torch
from torch._dynamo.source import ConstantSource
from torch.fx.experimental.symbolic_shapes import DimDynamic, ShapeEnv

from skimformer.ir import analyze, load
from skimformer.ir.sizes import same_shape, same_size
from skimformer.passes import get_pass

KV_HEADS = 2  # the tiny zoo Llama's


def _symbol(env: ShapeEnv, hint: int) -> torch.SymInt:
    symbol = env.create_symbol(hint, source=ConstantSource("n"), dynamic_dim=DimDynamic.DYNAMIC)
    return env.create_symintnode(symbol, hint=hint)


def _shape_env(program):
    return program.input_nodes()[0].meta["val"].fake_mode.shape_env


def _state(program) -> tuple:
    env = _shape_env(program)
    return [str(g.expr) for g in env.guards], dict(env.replacements)


def _tokens(program) -> int | str:
    """A decode program's new-token count as `inspect` shows it: a str while it is symbolic."""
    return next(s for s in program.input_specs() if s["name"] == "position_ids")["shape"][1]


def test_sizes_compare_by_expression_and_install_no_guard():
    env = ShapeEnv()
    n = _symbol(env, 2)
    assert not same_size(n, 2) and same_size(n, n) and same_size(3, 3) and not same_size(3, 4)
    assert same_shape((n, 4), (n, 4)) and not same_shape((n, 4), (2, 4)) and not same_shape((n,), (n, 4))
    assert same_shape(None, None) and not same_shape(None, (n,))
    assert not env.guards and not env.replacements


@pytest.fixture(scope="module")
def tokens_equal_kv_heads(tmp_path_factory):
    """The tiny Llama whose decode example feeds as many new tokens as it has KV heads."""
    import skimformer.zoo.hf_export as hf_export
    from skimformer.zoo import export_zoo

    out = tmp_path_factory.mktemp("decoder") / "llama"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(hf_export, "DECODE_TOKENS", KV_HEADS)
        export_zoo("llama", out, size="tiny")
    return out


def test_analysis_keeps_a_token_count_equal_to_the_kv_heads_symbolic(tokens_equal_kv_heads):
    decode = load(tokens_equal_kv_heads).programs["decode"]
    assert decode.example_inputs["input_ids"].shape[1] == KV_HEADS
    before = _state(decode)
    structure = analyze(decode)
    assert {s.kv_heads for s in structure.attention} == {KV_HEADS}
    assert _state(decode) == before
    assert isinstance(_tokens(decode), str)


def test_self_speculate_keeps_every_programs_token_count_dynamic(tokens_equal_kv_heads):
    model = load(tokens_equal_kv_heads)
    before = _state(model.programs["decode"])
    speculate = get_pass("self-speculate")
    new = speculate().apply_model(model, speculate.Config(exit=1, draft=2)).model
    assert _state(model.programs["decode"]) == before
    for role in ("decode", "draft"):
        assert isinstance(_tokens(new.programs[role]), str), role
    verify = new.programs["verify"]
    hidden = next(s for s in verify.input_specs() if s["name"] == "hidden_states")
    assert isinstance(hidden["shape"][1], str)
