"""The Triton kernels as the CUDA implementations of the skim ops.

The ops' own bodies (the plain-torch references) stay their implementation on every other
device; on CUDA, `torch.library` dispatches to the launchers in `triton_tokens` and `triton_kv`,
so a rewritten program run on a GPU runs the kernels.
"""
from __future__ import annotations

import importlib.util

import torch

_registered = False


def register_cuda_kernels() -> bool:
    """Register every kernel for CUDA (once); False when triton is not installed."""
    global _registered
    if _registered:
        return True
    if importlib.util.find_spec("triton") is None:
        return False
    from skimformer.kernels import triton_kv, triton_tokens

    for name, launcher in {**triton_tokens.KERNELS, **triton_kv.KERNELS}.items():
        torch.library.register_kernel(name, "cuda", launcher)
    _registered = True
    return True
