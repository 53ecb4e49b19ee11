"""kernels: the `skim` custom ops that passes insert, with their references.

Importing this package registers every op with torch.library, which loading a rewritten
program needs; `decompositions()` maps each op to its plain-torch reference, the ATen form that
backends lower (ONNX Runtime runs it as standard ONNX ops). Where CUDA is available, the Triton
kernels (`triton_tokens`, `triton_kv`) become the ops' CUDA implementations (`gpu`).
"""
import torch

from skimformer.kernels import channel_quant, evict, gpu, merge, quant, tokens, window

if torch.cuda.is_available():
    gpu.register_cuda_kernels()


def decompositions() -> dict:
    return {**channel_quant.REFERENCES, **tokens.REFERENCES, **merge.REFERENCES, **window.REFERENCES, **evict.REFERENCES, **quant.REFERENCES}


__all__ = ["channel_quant", "decompositions", "evict", "gpu", "merge", "quant", "tokens", "window"]
