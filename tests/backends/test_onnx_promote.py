"""The exporter's type promotion runs only on programs where it would insert a cast; engines
equal their programs either way."""
import numpy as np
import pytest
import torch
from torch.onnx._internal.exporter import _fx_passes

from skimformer.backends.onnx_promote import needs_promotion
from skimformer.backends.onnxruntime import Runner, lower
from skimformer.ir import Program


class FloatScalars(torch.nn.Module):
    def forward(self, x):
        return {"y": (x / 255.0).clamp(0.0, 1.0) * 2.0}


class IntScalar(torch.nn.Module):
    """An fp32 tensor divided by a Python int: the exporter casts the int to fp32."""

    def forward(self, x):
        return {"y": x / 255}


class MixedTensors(torch.nn.Module):
    def forward(self, x, n):
        return {"y": x + n}


@pytest.fixture
def promotions(monkeypatch):
    """The programs the exporter's type promotion ran on."""
    calls, original = [], _fx_passes.insert_type_promotion_nodes

    def recording(graph_module):
        calls.append(graph_module)
        return original(graph_module)

    monkeypatch.setattr(_fx_passes, "insert_type_promotion_nodes", recording)
    return calls


def _program(module, *inputs) -> Program:
    return Program(torch.export.export(module, inputs, dynamic_shapes=[{0: torch.export.Dim.DYNAMIC}] * len(inputs)))


@pytest.mark.parametrize(("module", "inputs", "promoted"), [
    (FloatScalars(), (torch.randn(4, 3),), False),
    (IntScalar(), (torch.randn(4, 3),), True),
    (MixedTensors(), (torch.randn(4, 3), torch.arange(12).reshape(4, 3)), True),
], ids=["float-scalars", "int-scalar", "int-tensor"])
def test_type_promotion_runs_only_where_a_cast_is_needed(promotions, tmp_path, module, inputs, promoted):
    program = _program(module, *inputs)
    assert needs_promotion(program.ep.graph_module) is promoted
    lower(program, tmp_path / "model.onnx", portable=True)
    assert len(promotions) == int(promoted)
    feeds = {name: x for name, x in zip(program.input_names, (torch.cat([x, x]) for x in inputs))}
    got = Runner(tmp_path / "model.onnx", threads=1).run({k: v.numpy() for k, v in feeds.items()})["y"]
    np.testing.assert_allclose(got, program.run(feeds)["y"].numpy(), rtol=1e-6)


def test_a_node_without_a_recorded_value_takes_the_exporters_way():
    program = _program(IntScalar(), torch.randn(4, 3))
    gm = program.ep.graph_module
    for node in gm.graph.nodes:
        node.meta.pop("val", None)
    assert needs_promotion(gm)
