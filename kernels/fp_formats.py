"""fp8 block-scaled and nvfp4 weights: the plain-torch references, a Triton dequantization, and
the linear's dispatch point.

All take the tensors exactly as compressed-tensors stores them. ``orbit::fp_linear`` runs the
few-row packed GEMV (``packed_gemv``) or, up to ``packed_gemm.forward_max_rows`` rows, the tiled packed
GEMM on a GPU; larger inputs are dequantized by ``orbit::fp_dequant`` (one Triton pass, the
reference's arithmetic) and multiplied by cuBLAS. On the CPU the references run.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from orbit_kernels import packed_gemm as gemm
from orbit_kernels import packed_gemv as gemv
from orbit_kernels.packed_gemv import FP8_BLOCK
from orbit_kernels._triton import serves

# e2m1 magnitudes by their 3-bit code; bit 3 is the sign
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)


def dequant_fp8_block(weight: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """e4m3 weights with one scale per ``[128, 128]`` tile; scale ``[ceil(out/128), ceil(in/128)]``.

    The block is the scheme's, not ``ceil(dim / scale columns)``: the two differ when a dimension is
    not a multiple of 128 (200 columns are blocks of 128 and 72, not two of 100)."""
    rows, cols = weight.shape
    full = scale.float().repeat_interleave(FP8_BLOCK, 0)[:rows].repeat_interleave(FP8_BLOCK, 1)[:, :cols]
    return (weight.float() * full).to(dtype)


def e2m1_magnitude(code: torch.Tensor) -> torch.Tensor:
    """The value of a 3-bit e2m1 magnitude code: exponent bits 2..1 (bias 1), mantissa bit 0.

    Computed rather than looked up in ``E2M1_VALUES``: a table is a host tensor to copy in, which
    a CUDA graph cannot capture."""
    exponent, mantissa = (code >> 1).float(), (code & 1).float()
    return torch.where(exponent > 0, torch.exp2(exponent - 1) * (1 + 0.5 * mantissa), 0.5 * mantissa)


def unpack_fp4(packed: torch.Tensor) -> torch.Tensor:
    """uint8 ``[rows, cols/2]``, two e2m1 codes a byte, low nibble first -> float32 ``[rows, cols]``."""
    codes = torch.stack([packed & 0xF, packed >> 4], dim=-1).flatten(-2).to(torch.int32)
    magnitude = e2m1_magnitude(codes & 0x7)
    return torch.where(codes >= 8, -magnitude, magnitude)


def dequant_nvfp4(packed: torch.Tensor, scale: torch.Tensor, global_scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """NVFP4: ``w = fp4 * scale_e4m3[group of 16] / global_scale``."""
    values = unpack_fp4(packed)
    rows, cols = values.shape
    group = cols // scale.shape[-1]
    local = scale.float() / global_scale.float()
    return (values.view(rows, -1, group) * local[..., None]).view(rows, cols).to(dtype)


def dequant(fmt: str, weight: torch.Tensor, scale: torch.Tensor, global_scale: torch.Tensor | None,
            dtype: torch.dtype) -> torch.Tensor:
    if fmt == "fp8":
        return dequant_fp8_block(weight, scale, dtype)
    return dequant_nvfp4(weight, scale, global_scale, dtype)


@torch.library.custom_op("orbit::fp_dequant", mutates_args=())
def fp_dequant(weight: torch.Tensor, scale: torch.Tensor, global_scale: torch.Tensor | None, fmt: str,
               in_features: int, dtype: torch.dtype) -> torch.Tensor:
    """Dense ``[out, in]`` from fp8 block or nvfp4 tensors: one Triton pass on a GPU, the torch
    reference (``dequant``) elsewhere."""
    if serves(f"{fmt}_dequant", gemv.ENABLED, weight, lambda: gemm.dequant_reason(weight)):
        return gemm.dequantize(fmt, weight, scale, global_scale, in_features, dtype)
    return dequant(fmt, weight, scale, global_scale, dtype)


@fp_dequant.register_fake
def _(weight, scale, global_scale, fmt, in_features, dtype):
    return weight.new_empty((weight.shape[0], in_features), dtype=dtype)


@torch.library.custom_op("orbit::fp_linear", mutates_args=())
def fp_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, global_scale: torch.Tensor | None, fmt: str,
              in_features: int) -> torch.Tensor:
    """``x [..., in] @ W^T -> [..., out]`` for ``fmt`` "fp8" (``global_scale`` None) or "nvfp4"."""
    rows = x.numel() // in_features
    if rows <= gemv.MAX_ROWS and serves(f"{fmt}_gemv", gemv.ENABLED, x,
                                        lambda: gemv.unserved_reason(fmt, x, weight, scale, in_features)):
        return gemv.packed_gemv(fmt, x, weight, scale, in_features, global_scale)
    if rows <= gemm.forward_max_rows(fmt) and serves(f"{fmt}_gemm", gemm.ENABLED, x,
                                                lambda: gemm.unserved_reason(fmt, x, weight, scale, in_features)):
        return gemm.packed_gemm(fmt, x, weight, scale, in_features, global_scale)
    return F.linear(x, fp_dequant(weight, scale, global_scale, fmt, in_features, x.dtype))


@fp_linear.register_fake
def _(x, weight, scale, global_scale, fmt, in_features):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))
