"""kernels: the `skim` custom ops that passes insert, with their references.

Importing this package registers every op with torch.library, which loading a rewritten
program needs; `decompositions()` maps each op to its plain-torch reference, the ATen form that
backends lower (ONNX Runtime runs it as standard ONNX ops).
"""
from skimformer.kernels import evict, merge, quant, tokens, window


def decompositions() -> dict:
    return {**tokens.REFERENCES, **merge.REFERENCES, **window.REFERENCES, **evict.REFERENCES, **quant.REFERENCES}


__all__ = ["decompositions", "evict", "merge", "quant", "tokens", "window"]
