"""The mlir backend: torch-mlir text in each dialect, IREE CPU modules checked against their
programs, and the refusals (unknown dialect, missing toolchain, what torch-mlir / IREE cannot take)."""
import json
import sys
from importlib.util import find_spec

import numpy as np
import pytest
import torch
from torch._higher_order_ops.map import map as torch_map

from skimformer import Engine, UserError, load, optimize
from skimformer.backends import mlir
from skimformer.backends.generation import generate
from skimformer.backends.registry import checked_backend
from skimformer.cli.main import main
from skimformer.ir import Program
from skimformer.passes import PassManager, pipeline_from
from tests.decoding import assert_runs_both_branches_like, exit_decode_taking_both_branches, torch_runner

toolchain = pytest.mark.skipif(find_spec("torch_mlir") is None or find_spec("iree") is None,
                               reason="torch-mlir and IREE are not installed (pip install 'skimformer[mlir]')")


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


def test_cli_refuses_an_unknown_dialect(exported, tmp_path, capsys):
    out = tmp_path / "eng"
    code = main(["optimize", str(exported("bert")), "-o", str(out), "--backend", "mlir", "--mlir-dialect", "tosa"])
    assert code == 2 and "--mlir-dialect" in _one_line_error(capsys) and not out.exists()


def test_cli_refuses_a_dialect_without_the_mlir_backend(exported, tmp_path, capsys):
    out = tmp_path / "eng"
    code = main(["optimize", str(exported("bert")), "-o", str(out), "--mlir-dialect", "torch"])
    assert code == 2 and "--backend mlir" in _one_line_error(capsys) and not out.exists()


def test_require_refuses_unknown_dialects_and_options():
    with pytest.raises(UserError, match="unknown MLIR dialect 'tosa': choose one of torch, linalg-on-tensors, stablehlo"):
        checked_backend("mlir", {"dialect": "tosa"})
    with pytest.raises(UserError, match="only the option `dialect`, not threads"):
        checked_backend("mlir", {"threads": 2})


def test_a_missing_toolchain_is_refused_before_any_work(exported, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch_mlir", None)  # `import torch_mlir` now fails
    out = tmp_path / "eng"
    code = main(["optimize", str(exported("bert")), "-o", str(out), "--backend", "mlir"])
    err = _one_line_error(capsys)
    assert code == 2 and "torch_mlir is not installed: pip install 'skimformer[mlir]'" in err
    assert not out.exists()


@toolchain
def test_stablehlo_refuses_dynamic_shapes_and_writes_nothing(exported, tmp_path):
    out = tmp_path / "eng"
    with pytest.raises(UserError, match="static shapes only: choose --mlir-dialect torch or linalg-on-tensors"):
        optimize(exported("bert"), backend="mlir", output=out, backend_options={"dialect": "stablehlo"})
    assert list(tmp_path.iterdir()) == []


def _assert_generates_like_its_programs(engine, out) -> None:
    """Greedy generation from a 10-token prompt equals the engine's programs run in torch."""
    prompt = np.array([[5, 9, 14, 7, 3, 11, 20, 4, 8, 2]])
    want = generate(torch_runner(load(out)), prompt, 6).ids
    assert engine.generate(prompt, max_new_tokens=6).tolist() == want.tolist()


class _Mapped(torch.nn.Module):
    def forward(self, x):
        return {"y": torch_map(lambda row: row * 2, x)}


@toolchain
def test_a_higher_order_op_without_an_import_is_refused_by_name(tmp_path):
    ep = torch.export.export(_Mapped(), (torch.randn(3, 4),))
    with pytest.raises(UserError, match=r"cannot lower map_impl in the model program, because torch-mlir does not "
                                        r"import it: build with --backend onnxruntime"):
        mlir.lower(Program(ep), tmp_path / "model.vmfb")
    assert list(tmp_path.iterdir()) == []


@toolchain
def test_a_cache_selection_inside_an_exit_branch_is_refused(tiny_decoder, tmp_path):
    spec = "kv-evict(policy=h2o, budget=6); early-exit(at=[0], threshold=0.9)"
    model, _, _ = PassManager(pipeline_from(spec)).run(load(tiny_decoder))
    with pytest.raises(UserError, match=r"decode program selects cache tokens \(kv-evict\) inside an exit pass's branch"
                                        r".*--backend onnxruntime, or drop one of the passes"):
        mlir.lower(model.programs["decode"], tmp_path / "decode.vmfb")
    assert list(tmp_path.iterdir()) == []


class _TwoTopKs(torch.nn.Module):
    def forward(self, x, y):
        return {"i": torch.topk(x, 2).indices, "j": torch.topk(y, 2).indices}


@toolchain
def test_two_sorts_of_one_shape_are_refused_rather_than_miscompiled(tmp_path):
    ep = torch.export.export(_TwoTopKs(), (torch.randn(3, 5), torch.randn(3, 5)))
    with pytest.raises(UserError, match=r"sorts several tensors of one shape.*iree-org/iree#24665.*--backend onnxruntime"):
        mlir.lower(Program(ep), tmp_path / "model.vmfb")
    assert list(tmp_path.iterdir()) == []


@toolchain
@pytest.mark.slow
def test_an_exit_lowers_to_a_branch_that_runs_either_way(tiny_decoder, tmp_path):
    """torch.cond becomes scf.if (linalg-on-tensors): each step runs one branch, as the program does."""
    decode, feeds = exit_decode_taking_both_branches(tiny_decoder)
    mlir.lower(decode, tmp_path / "decode.vmfb")
    assert "scf.if" in (tmp_path / "decode.mlir").read_text()
    assert_runs_both_branches_like(mlir.Runner(tmp_path / "decode.vmfb").run, decode, feeds)


@toolchain
@pytest.mark.slow
def test_kv_evict_generates_like_its_programs(one_layer_decoder, tmp_path):
    """Sort-free selection (IREE miscompiles one sort per layer): H2O evicts at every step past 6 tokens."""
    out = tmp_path / "eng"
    engine = optimize(one_layer_decoder, "kv-evict(policy=h2o, budget=6)", backend="mlir", output=out)
    assert json.loads((out / "report.json").read_text())["parity"]["ok"]
    assert "sort" not in (out / "prefill.mlir").read_text()
    _assert_generates_like_its_programs(engine, out)


@toolchain
@pytest.mark.slow
def test_encoder_with_a_token_pass_matches_its_program_at_other_shapes(exported, tmp_path):
    """Default dialect (linalg-on-tensors), dynamic batch and length; prune's top-k and sorts
    take every repair of the decomposed graph."""
    out = tmp_path / "eng"
    engine = optimize(exported("bert"), "prune(at=[0], keep=0.5)", backend="mlir", output=out)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["programs"]["model"]["engine"] == "model.vmfb"
    assert set(manifest["programs"]["model"]["extra_files"]) == {"model.mlir", "model.io.json"}
    text = (out / "model.mlir").read_text()
    assert "linalg.generic" in text and "torch.aten" not in text
    assert json.loads((out / "report.json").read_text())["parity"]["ok"]
    program = load(out / "program.pt2").programs["model"]
    for batch, length in ((3, 9), (1, 20)):
        mask = torch.ones(batch, length, dtype=torch.long)
        mask[0, length - 3:] = 0
        feeds = {"input_ids": torch.randint(3, 300, (batch, length)), "attention_mask": mask}
        want = program.run(feeds)["last_hidden_state"].numpy()
        got = Engine.load(out).run(feeds)["last_hidden_state"]
        assert got.shape == want.shape
        np.testing.assert_allclose(got, want, atol=1e-4)
    assert engine.folder == out


@toolchain
@pytest.mark.slow
def test_decoder_with_a_kv_pass_generates_like_its_programs(one_layer_decoder, tmp_path):
    """The torch dialect; the cache is quantized from the prompt on and grows every step."""
    out = tmp_path / "eng"
    engine = optimize(one_layer_decoder, "kv-quant(bits=4, group=4, residual=4)", backend="mlir", output=out,
                      backend_options={"dialect": "torch"})
    assert sorted(engine.roles) == ["decode", "prefill"]
    assert "torch.aten" in (out / "decode.mlir").read_text()
    assert json.loads((out / "report.json").read_text())["parity"]["ok"]
    _assert_generates_like_its_programs(engine, out)


@toolchain
@pytest.mark.slow
def test_stablehlo_builds_a_static_program(exported, tmp_path):
    out = tmp_path / "eng"
    engine = optimize(exported("bert", dynamic=False), backend="mlir", output=out,
                      backend_options={"dialect": "stablehlo"})
    assert "stablehlo." in (out / "model.mlir").read_text()
    report = json.loads((out / "report.json").read_text())
    assert report["backend"] == "mlir" and report["backend_options"] == {"dialect": "stablehlo"}
    assert report["parity"]["ok"] and report["parity"]["max_abs"] < 1e-4
    assert engine.input_names() == ["input_ids", "attention_mask"]
