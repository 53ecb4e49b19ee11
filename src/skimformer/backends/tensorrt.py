"""TensorRT backend: the stages that can be built and checked without TensorRT.

TensorRT's libraries cannot be installed where skimformer is developed, so the engine build
itself (parsing with TensorRT's ONNX parser, registering the `skim` plugins, serializing a plan)
has never run and is not written: `optimize --backend tensorrt` is refused before any work. What
exists is the first stage, for a machine that has TensorRT:

- `lower(program, path)` writes the program as ONNX whose `skim` ops stay single custom nodes in
  the form TensorRT's ONNX parser maps to plugins: op type = plugin name (`bipartite_merge`), the
  string attributes `plugin_namespace` ("skim") and `plugin_version` ("1"), the op's scalar
  arguments as attributes; every other op is standard ONNX.
- `skimformer.kernels.aot.compile_kernels` compiles the Triton kernels that implement those
  plugins ahead of time to PTX and cubin (sm_90 by default), which a plugin loads.
- `write_stage_one(model, folder)` writes both for every program of a model.
"""
from __future__ import annotations

import importlib.util
import inspect
from pathlib import Path

import torch

from skimformer.backends.onnxruntime import export_onnx, external_data
from skimformer.errors import UserError
from skimformer.ir import Model, Program

NAME = "tensorrt"
SUFFIX = ".plugins.onnx"
PLUGIN_NAMESPACE = "skim"
PLUGIN_VERSION = "1"
_ONNX_TYPES = ["tensor(float)", "tensor(float16)", "tensor(bfloat16)", "tensor(double)", "tensor(int64)",
               "tensor(int32)", "tensor(int8)", "tensor(uint8)", "tensor(bool)"]


def require(**options) -> None:
    """Refuse every build: without TensorRT nothing can be built, and with it the plugin
    registration and engine build are not written (they could not be run here)."""
    if options:
        raise UserError(f"the tensorrt backend takes no options (got {', '.join(options)})")
    if importlib.util.find_spec("tensorrt") is None:
        raise UserError("TensorRT is needed to build the engine and is not installed: install NVIDIA's TensorRT on a "
                        "machine with an NVIDIA GPU, or use --backend onnxruntime (skimformer.backends.tensorrt."
                        "write_stage_one writes the plugin ONNX and compiled kernels without TensorRT)")
    raise UserError("skimformer cannot build TensorRT engines yet: the skim plugin registration has never run on a "
                    "machine with TensorRT, so it is not shipped; use skimformer.backends.tensorrt.write_stage_one "
                    "for the plugin ONNX and compiled kernels, or --backend onnxruntime")


def skim_ops() -> list[torch._ops.OpOverload]:
    """Every `skim` custom op (the kernels package registers them on import)."""
    import skimformer.kernels  # noqa: F401  (registers the ops)

    return [getattr(torch.ops.skim, name).default for name in sorted(dir(torch.ops.skim))
            if isinstance(getattr(torch.ops.skim, name, None), torch._ops.OpOverloadPacket)]


def _is_tensor(argument) -> bool:
    return "Tensor" in str(argument.type)


def _name(op: torch._ops.OpOverload) -> str:
    return op._schema.name.split("::")[1]


def _onnx_schema(op: torch._ops.OpOverload):
    """An ONNX schema for the op's plugin node. Tensors are inputs in the op's order; a scalar
    argument is an attribute of its name when it is a constant of the program, and otherwise (a
    size that depends on the input shapes, such as a token count) the optional input NAME_size
    after the tensors, a 0-d int64 tensor."""
    from onnx import defs

    schema = op._schema
    inputs, attributes, constraints = [], [], []
    for i, arg in enumerate(schema.arguments):
        if _is_tensor(arg):
            option = (defs.OpSchema.FormalParameterOption.Optional if isinstance(arg.type, torch.OptionalType)
                      else defs.OpSchema.FormalParameterOption.Single)
            inputs.append(defs.OpSchema.FormalParameter(arg.name, f"T{i}", param_option=option))
            constraints.append((f"T{i}", _ONNX_TYPES, ""))
        else:
            kind = defs.OpSchema.AttrType.FLOAT if str(arg.type) == "float" else defs.OpSchema.AttrType.INT
            attributes.append(defs.OpSchema.Attribute(arg.name, kind, "", required=False))
    inputs += [defs.OpSchema.FormalParameter(f"{arg.name}_size", "tensor(int64)",
                                             param_option=defs.OpSchema.FormalParameterOption.Optional)
               for arg in schema.arguments if not _is_tensor(arg)]
    for name in ("plugin_namespace", "plugin_version"):
        attributes.append(defs.OpSchema.Attribute(name, defs.OpSchema.AttrType.STRING, "", required=False))
    outputs = [defs.OpSchema.FormalParameter(f"output_{j}", f"R{j}") for j in range(len(schema.returns))]
    constraints += [(f"R{j}", _ONNX_TYPES, "") for j in range(len(schema.returns))]
    return defs.OpSchema(_name(op), PLUGIN_NAMESPACE, 1, inputs=inputs, outputs=outputs, type_constraints=constraints,
                         attributes=attributes)


def _register_schemas(ops: list) -> None:
    """ONNX schemas for the plugin nodes, so onnxscript can emit them (once per process)."""
    from onnx import defs

    for op in ops:
        if not defs.has(_name(op), PLUGIN_NAMESPACE):
            defs.register_schema(_onnx_schema(op))


def _translation(op: torch._ops.OpOverload):
    """The exporter's translation of `op`: one plugin node (see `_onnx_schema` for its form)."""
    from onnxscript import values

    arguments = op._schema.arguments
    node = getattr(values.Opset(PLUGIN_NAMESPACE, 1), _name(op))

    def to_plugin(*args):
        tensors = [a for a, spec in zip(args, arguments) if _is_tensor(spec)]
        scalars = [(spec.name, a) for a, spec in zip(args, arguments) if not _is_tensor(spec)]
        constants = {name: a for name, a in scalars if isinstance(a, (int, float, bool))}
        sizes = [None if name in constants else a for name, a in scalars]
        return node(*tensors, *sizes, **constants, plugin_namespace=PLUGIN_NAMESPACE, plugin_version=PLUGIN_VERSION)

    to_plugin.__signature__ = inspect.Signature(
        [inspect.Parameter(a.name, inspect.Parameter.POSITIONAL_OR_KEYWORD) for a in arguments])
    return to_plugin


def lower(program: Program, path: Path) -> dict[str, str]:
    """Write `program` as ONNX with every `skim` op as a TensorRT plugin node; returns the file
    beside it that holds its weights."""
    ops = skim_ops()
    _register_schemas(ops)
    # Core ATen first (skim ops stay: they have no decomposition there): the exporter's own
    # decomposition of a program that holds them fails on views after a merge (symbolic strides).
    export_onnx(program, program.ep.run_decompositions(), path, {op: _translation(op) for op in ops})
    return {external_data(path): "weights (ONNX external data)"}


def write_stage_one(model: Model, folder: str | Path, arch: int = 90, kernels: list | None = None) -> dict[str, list[str]]:
    """Plugin ONNX for every program and the Triton kernels compiled for `arch` (sm_90: H100),
    written into `folder`; returns the files written per part. `kernels`: the AOT entries to
    compile (default: all of them)."""
    from skimformer.kernels.aot import compile_kernels

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    written = {"onnx": []}
    for role, program in model.programs.items():
        lower(program, folder / f"{role}{SUFFIX}")
        written["onnx"].append(f"{role}{SUFFIX}")
    written["kernels"] = [f"kernels/{name}" for name in compile_kernels(folder / "kernels", arch, kernels)]
    return written
