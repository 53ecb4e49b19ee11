"""TensorRT backend: refused without TensorRT (exit 2, nothing written); its first stage writes
ONNX whose skim ops are plugin nodes in the form TensorRT's ONNX parser maps to plugins."""
import importlib.util
import json
import os
import subprocess
import sys

import onnx
import pytest
import torch

from skimformer import UserError, load, optimize
from skimformer.backends import tensorrt
from skimformer.ir.graph import program_graphs
from skimformer.passes import PassManager, pipeline_from

pytestmark = pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None,
                                reason="these tests describe a machine without TensorRT")


def _rewritten(path, spec: str):
    model, _, _ = PassManager(pipeline_from(spec)).run(load(path))
    return model


def _skim_calls(program) -> list[str]:
    """Names of the skim ops the program calls, subgraphs (torch.cond branches) included."""
    return sorted(n.target._schema.name.split("::")[1] for graph in program_graphs(program.ep) for n in graph.nodes
                  if n.op == "call_function" and str(n.target).startswith("skim."))


def _plugin_nodes(path) -> list[onnx.NodeProto]:
    model = onnx.load(str(path))
    graphs, nodes = [model.graph], []
    while graphs:
        graph = graphs.pop()
        for node in graph.node:
            nodes.append(node)
            graphs += [a.g for a in node.attribute if a.type == onnx.AttributeProto.GRAPH]
    return [n for n in nodes if n.domain == tensorrt.PLUGIN_NAMESPACE]


def test_cli_refuses_without_tensorrt_and_writes_nothing(exported, tmp_path):
    out = tmp_path / "eng"
    run = subprocess.run([sys.executable, "-m", "skimformer.cli.main", "optimize", str(exported("bert")), "-o", str(out),
                          "--backend", "tensorrt"], capture_output=True, text=True)
    assert run.returncode == 2, run.stderr
    assert "TensorRT is needed to build the engine" in run.stderr and len(run.stderr.strip().splitlines()) == 1
    assert not out.exists()
    with pytest.raises(UserError, match="TensorRT is needed"):
        optimize(exported("bert"), backend="tensorrt", output=out)
    assert not out.exists()


@pytest.mark.parametrize("spec, role", [("tome(r=2)", "model"), ("kv-quant(bits=4)", "decode")])
def test_skim_ops_become_plugin_nodes(exported, tiny_decoder, tmp_path, spec, role):
    program = _rewritten(tiny_decoder if role == "decode" else exported("bert"), spec).programs[role]
    path = tmp_path / f"{role}{tensorrt.SUFFIX}"
    tensorrt.lower(program, path)
    nodes = _plugin_nodes(path)
    assert sorted(n.op_type for n in nodes) == _skim_calls(program) != []
    for node in nodes:
        attributes = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        assert attributes["plugin_namespace"] == b"skim" and attributes["plugin_version"] == b"1"
        schema = getattr(torch.ops.skim, node.op_type).default._schema
        tensors = [a.name for a in schema.arguments if "Tensor" in str(a.type)]
        scalars = [a.name for a in schema.arguments if "Tensor" not in str(a.type)]
        # each scalar is a constant attribute, or a size computed from shapes: its optional input
        sizes = [name for name, given in zip(scalars, node.input[len(tensors):]) if given]
        assert sorted([*set(attributes) - {"plugin_namespace", "plugin_version"}, *sizes]) == sorted(scalars)
    model = onnx.load(str(path))
    assert any(o.domain == "skim" and o.version == 1 for o in model.opset_import)
    onnx.checker.check_model(model)
    # every value has a type: TensorRT's parser needs the plugin outputs' dtypes
    assert all(v.type.tensor_type.elem_type != 0 for v in model.graph.output)


STAGE_ONE = """
import json, sys
from skimformer import load
from skimformer.backends.tensorrt import write_stage_one
from skimformer.kernels import triton_kv, triton_tokens
from skimformer.passes import PassManager, pipeline_from
model, _, _ = PassManager(pipeline_from("prune(keep=0.5, at=[0])")).run(load(sys.argv[1]))
print(json.dumps(write_stage_one(model, sys.argv[2], kernels=[triton_tokens.AOT[0], triton_kv.AOT[-1]])))
"""


def test_stage_one_writes_plugin_onnx_and_kernels_compiled_for_sm90(exported, tmp_path):
    """Triton compiles for a named GPU without one; its interpreter (on in the other tests) cannot
    compile, so this runs in a process without it."""
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-c", STAGE_ONE, str(exported("bert")), str(tmp_path / "trt")],
                         capture_output=True, text=True, env=env)
    assert run.returncode == 0, run.stderr[-2000:]
    written = json.loads(run.stdout.strip().splitlines()[-1])
    assert written["onnx"] == ["model.plugins.onnx"] and len(written["kernels"]) == 5
    plugins = sorted({n.op_type for n in _plugin_nodes(tmp_path / "trt" / "model.plugins.onnx")})
    assert plugins == ["fuse_tokens", "gather_tokens", "restore_tokens", "token_scores", "token_sources", "topk_tokens"]
    index = json.loads((tmp_path / "trt" / "kernels" / "kernels.json").read_text())
    assert len(index) == 2
    for kernel in index:
        ptx = (tmp_path / "trt" / "kernels" / kernel["ptx"]).read_text()
        assert ".target sm_90" in ptx and f".entry {kernel['symbol']}" in ptx
        assert (tmp_path / "trt" / "kernels" / kernel["cubin"]).read_bytes()[:4] == b"\x7fELF"
        assert kernel["arch"] == "sm_90" and kernel["num_warps"] >= 1
