"""Every skim op has a Triton kernel, registered as its CUDA implementation."""
import pytest
import torch

import skimformer.kernels  # noqa: F401  (registers the ops)
from skimformer.kernels import gpu


def _skim_ops() -> list[str]:
    return sorted(f"skim::{name}" for name in dir(torch.ops.skim)
                  if isinstance(getattr(torch.ops.skim, name, None), torch._ops.OpOverloadPacket))


# Ops without a Triton kernel yet: ONNX Runtime runs this one as its fused quantized
# GroupQueryAttention, and every other engine (CUDA torch too) runs its plain-torch reference.
WITHOUT_TRITON = {"skim::cache_quant_attention"}


def test_every_skim_op_gets_a_cuda_kernel():
    pytest.importorskip("triton")
    from skimformer.kernels import triton_kv, triton_tokens

    ops = [op for op in _skim_ops() if op not in WITHOUT_TRITON]
    assert len(ops) >= 20 and WITHOUT_TRITON <= set(_skim_ops())
    assert sorted({**triton_tokens.KERNELS, **triton_kv.KERNELS}) == ops
    assert gpu.register_cuda_kernels()
    for op in ops:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(op, "CUDA"), op
        assert not torch._C._dispatch_has_kernel_for_dispatch_key(op, "XLA")  # the check can say no
