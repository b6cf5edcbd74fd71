"""``orbit::packed_input_grad``: ``dy @ W`` for a packed frozen weight, the input gradient of its
linear, for int4, fp8 block and nvfp4 tensors as stored.

On a GPU, up to ``packed_gemm.MAX_ROWS`` rows, the packed GEMM decodes ``W`` tile by tile
(nothing dense is written); above, or for a shape it does not serve, the format's dequantization
op and cuBLAS. On the CPU the reference: the format's torch dequantization, then a matmul.
"""

from __future__ import annotations

import torch

from orbit_kernels import packed_gemm as gemm
from orbit_kernels._triton import serves
from orbit_kernels.fp_formats import fp_dequant
from orbit_kernels.int4 import int4_dequant


def dense_weight(fmt: str, weight: torch.Tensor, scale: torch.Tensor, global_scale: torch.Tensor | None,
                 in_features: int, dtype: torch.dtype) -> torch.Tensor:
    """The dense ``[out, in]`` weight through the format's dequantization op."""
    if fmt == "int4":
        return int4_dequant(weight, scale, in_features, dtype)
    return fp_dequant(weight, scale, global_scale, fmt, in_features, dtype)


@torch.library.custom_op("orbit::packed_input_grad", mutates_args=())
def packed_input_grad(grad: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor,
                      global_scale: torch.Tensor | None, fmt: str, in_features: int) -> torch.Tensor:
    """``grad [..., out] @ W -> [..., in]``; ``global_scale`` only for nvfp4."""
    rows = grad.numel() // weight.shape[0]
    if rows <= gemm.MAX_ROWS[fmt] and serves(f"{fmt}_input_grad", gemm.ENABLED, grad,
                                                 lambda: gemm.unserved_reason(fmt, grad, weight, scale, in_features)):
        return gemm.packed_gemm(fmt, grad, weight, scale, in_features, global_scale, forward=False)
    return grad @ dense_weight(fmt, weight, scale, global_scale, in_features, grad.dtype)


@packed_input_grad.register_fake
def _(grad, weight, scale, global_scale, fmt, in_features):
    return grad.new_empty((*grad.shape[:-1], in_features))
