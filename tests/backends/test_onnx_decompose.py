"""ONNX lowering without the exporter's whole-program decomposition where respelling and
node-by-node decomposition of skim ops leave nothing else to decompose; the exporter's own
decomposition otherwise. Both give engines equal to their programs at other sizes."""
import numpy as np
import pytest
import torch
from torch.onnx._internal.exporter import _fx_passes

from skimformer.backends.onnxruntime import Runner, lower
from skimformer.ir import Program

DYN = torch.export.Dim.DYNAMIC


class Gathers(torch.nn.Module):
    """Training-IR spellings (`&`, `to`) and a skim op without an ONNX translation of its own,
    whose result is also a program output."""

    def forward(self, x, idx):
        y = torch.ops.skim.gather_tokens(x, idx, 1)
        kept = (idx > 0) & (idx < x.shape[1] - 1)
        return {"y": y, "inner": kept.to(torch.float32), "total": y.sum(-1) * x.shape[1]}


class Quantizes(torch.nn.Module):
    """KIVI's split of a cache into codes and a tail, whose decomposition casts (`to`): the
    exporter would decompose those casts were they not respelled after inlining."""

    def forward(self, cache):
        codes, scale, zero, tail = torch.ops.skim.kv_quantize(cache, 8, 4, 4, 0)
        return {"codes": codes, "scale": scale, "tail": tail}


class AppendsTwice(torch.nn.Module):
    """Two layers' KIVI value caches with one KV head (Gemma's MQA), whose step quantizes
    nothing at the example's sizes: the second layer's op reuses the first one's trace."""

    def forward(self, codes, scale, zero, tail, new):
        out = {}
        for layer in range(2):
            parts = torch.ops.skim.kv_append(codes, scale, zero, torch.cat([tail, new * (layer + 1)], dim=2), 8, 4, 4, 8)
            out.update({f"{name}_{layer}": part for name, part in zip(("codes", "scale", "zero", "tail"), parts)})
        return out


class Diagonal(torch.nn.Module):
    """`torch.diag`, which the exporter decomposes itself."""

    def forward(self, x):
        return {"d": torch.diag(x) + 1}


@pytest.fixture
def whole_program_decompositions(monkeypatch):
    """The programs the exporter decomposed whole, as they reach its step."""
    calls, original = [], _fx_passes.decompose_with_registry

    def recording(ep, registry):
        calls.append(ep)
        return original(ep, registry)

    monkeypatch.setattr(_fx_passes, "decompose_with_registry", recording)
    return calls


def _targets(program: Program) -> list[str]:
    return sorted(str(n.target) for n in program.ep.graph.nodes if n.op == "call_function")


@pytest.mark.parametrize("portable", [True, False], ids=["portable", "fused"])
def test_skim_ops_decomposed_node_by_node_match_the_program_at_other_sizes(whole_program_decompositions, tmp_path,
                                                                           portable):
    x, idx = torch.randn(2, 7, 4), torch.tensor([[0, 2, 5], [1, 3, 6]])
    program = Program(torch.export.export(Gathers(), (x, idx), dynamic_shapes=({0: DYN, 1: DYN}, {0: DYN, 1: DYN})))
    before = _targets(program)
    lower(program, tmp_path / "model.onnx", portable=portable)
    assert whole_program_decompositions == []
    assert _targets(program) == before  # the program itself is untouched
    runner = Runner(tmp_path / "model.onnx", threads=1)
    x, idx = torch.randn(3, 11, 4), torch.tensor([[0, 4, 9, 10], [2, 3, 5, 7], [1, 6, 8, 9]])
    want = program.run({"x": x, "idx": idx})
    got = runner.run({"x": x.numpy(), "idx": idx.numpy()})
    assert set(got) == {"y", "inner", "total"}
    for name, value in want.items():
        np.testing.assert_allclose(got[name], value.numpy(), atol=1e-5, err_msg=name)


def test_casts_inside_a_decomposition_are_respelled_too(whole_program_decompositions, tmp_path):
    program = Program(torch.export.export(Quantizes(), (torch.randn(2, 3, 13, 8),), dynamic_shapes=({2: DYN},)))
    lower(program, tmp_path / "model.onnx", portable=True)
    assert whole_program_decompositions == []
    cache = torch.randn(2, 3, 22, 8)
    want = program.run({"cache": cache})
    got = Runner(tmp_path / "model.onnx", threads=1).run({"cache": cache.numpy()})
    assert got["codes"].shape == (2, 3, 16, 8) and got["tail"].shape == (2, 3, 6, 8)
    for name, value in want.items():
        np.testing.assert_allclose(got[name], value.numpy(), atol=1e-5, err_msg=name)


def _append_inputs(batch: int, quantized: int, tail: int) -> dict[str, torch.Tensor]:
    return {"codes": torch.randint(0, 255, (batch, 1, quantized, 8), dtype=torch.uint8),
            "scale": torch.rand(batch, 1, quantized, 1) + 0.1, "zero": torch.randn(batch, 1, quantized, 1),
            "tail": torch.randn(batch, 1, tail, 8), "new": torch.randn(batch, 1, 1, 8)}


def test_a_cache_step_that_quantizes_nothing_yet_lowers_with_one_kv_head(whole_program_decompositions, tmp_path):
    """The exporter decomposes with size-oblivious guards, under which torch divided by the
    empty slice's stride hint (0) while laying out the reused trace's values."""
    example = _append_inputs(2, 8, 3)
    sizes = {name: {0: DYN, 2: DYN} for name in example} | {"new": {0: DYN}}
    program = Program(torch.export.export(AppendsTwice(), (), example, dynamic_shapes=sizes))
    lower(program, tmp_path / "model.onnx", portable=True)
    assert whole_program_decompositions == []
    runner = Runner(tmp_path / "model.onnx", threads=1)
    for inputs in (_append_inputs(3, 4, 9), example):  # 9 + 1 tokens quantize 4; 3 + 1 quantize none
        want = program.run(inputs)
        got = runner.run({name: value.numpy() for name, value in inputs.items()})
        for name, value in want.items():
            np.testing.assert_allclose(got[name], value.numpy(), atol=1e-5, err_msg=name)


def test_an_op_the_exporter_decomposes_takes_its_way(whole_program_decompositions, tmp_path):
    program = Program(torch.export.export(Diagonal(), (torch.randn(5),), dynamic_shapes=({0: DYN},)))
    lower(program, tmp_path / "model.onnx", portable=True)
    assert len(whole_program_decompositions) == 1
    x = torch.randn(8)
    got = Runner(tmp_path / "model.onnx", threads=1).run({"x": x.numpy()})["d"]
    np.testing.assert_allclose(got, (torch.diag(x) + 1).numpy())
