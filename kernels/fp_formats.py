"""fp8 block-scaled and nvfp4 weights: the plain-torch references, a Triton dequantization, and
the linear's dispatch point.

All take the tensors exactly as compressed-tensors stores them. ``orbit::fp_linear`` runs the
few-row packed GEMV (``packed_gemv``) or, up to ``packed_gemm.MAX_ROWS`` rows, the tiled packed
GEMM on a GPU; larger inputs are dequantized by ``orbit::fp_dequant`` (one Triton pass, the
reference's arithmetic) and multiplied by cuBLAS. On the CPU the references run.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from orbit_kernels import packed_gemm as gemm
from orbit_kernels import packed_gemv as gemv
from orbit_kernels.packed_gemv import FP8_BLOCK
from orbit_kernels._triton import serves, tl, triton

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


if triton is not None:

    @triton.jit
    def _dequant_kernel(w_ptr, s_ptr, gs_ptr, out_ptr, rows, cols, stride_w, stride_s, stride_o, FMT: tl.constexpr,
                        CODES: tl.constexpr, GROUP: tl.constexpr, SCALE_ROWS: tl.constexpr, HAS_GLOBAL: tl.constexpr,
                        BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
        # the references' arithmetic exactly: the code's fp32 value times the fp32 scale (nvfp4:
        # scale / global first), rounded once to the output dtype
        BITS: tl.constexpr = 32 // CODES
        offs_r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
        mask = (offs_r[:, None] < rows) & (offs_c[None, :] < cols)
        words = tl.load(w_ptr + offs_r[:, None] * stride_w + offs_c[None, :] // CODES, mask=mask, other=0)
        value = gemv._decode((words >> ((offs_c[None, :] % CODES) * BITS)) & ((1 << BITS) - 1), FMT)
        scale = tl.load(s_ptr + (offs_r[:, None] // SCALE_ROWS) * stride_s + offs_c[None, :] // GROUP, mask=mask,
                        other=0.0).to(tl.float32)
        if HAS_GLOBAL:
            scale = tl.math.div_rn(scale, tl.load(gs_ptr).to(tl.float32))  # IEEE division, as torch divides
        tl.store(out_ptr + offs_r[:, None] * stride_o + offs_c[None, :], (value * scale).to(out_ptr.dtype.element_ty),
                 mask=mask)


def _dequant_reason(weight: torch.Tensor, in_features: int) -> str | None:
    if not weight.is_contiguous() or weight.shape[-1] * weight.element_size() % 4:
        return "the packed weight is not contiguous whole int32 words"
    return None


@torch.library.custom_op("orbit::fp_dequant", mutates_args=())
def fp_dequant(weight: torch.Tensor, scale: torch.Tensor, global_scale: torch.Tensor | None, fmt: str,
               in_features: int, dtype: torch.dtype) -> torch.Tensor:
    """Dense ``[out, in]`` from fp8 block or nvfp4 tensors: one Triton pass on a GPU, the torch
    reference (``dequant``) elsewhere."""
    if not serves(f"{fmt}_dequant", gemv.ENABLED, weight, lambda: _dequant_reason(weight, in_features)):
        return dequant(fmt, weight, scale, global_scale, dtype)
    if gemm.shape_reason(fmt, weight, scale, in_features) is None:
        return gemm.dequantize(fmt, weight, scale, global_scale, in_features, dtype)
    rows = weight.shape[0]  # any other shape: one thread per weight
    codes, group, scale_rows = gemv.layout(fmt, scale, in_features)
    words = weight.view(torch.int32)
    out = torch.empty((rows, in_features), dtype=dtype, device=weight.device)
    block_r, block_c = 16, 256
    grid = (triton.cdiv(rows, block_r), triton.cdiv(in_features, block_c))
    _dequant_kernel[grid](words, scale, scale if global_scale is None else global_scale, out, rows, in_features,
                          words.stride(0), scale.stride(0), out.stride(0), FMT=gemv.FORMAT_CODES[fmt], CODES=codes,
                          GROUP=group, SCALE_ROWS=scale_rows,
                          HAS_GLOBAL=global_scale is not None, BLOCK_R=block_r, BLOCK_C=block_c)
    return out


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
    if rows <= gemm.MAX_ROWS[fmt] and serves(f"{fmt}_gemm", gemm.ENABLED, x,
                                                lambda: gemm.unserved_reason(fmt, x, weight, scale, in_features)):
        return gemm.packed_gemm(fmt, x, weight, scale, in_features, global_scale)
    return F.linear(x, fp_dequant(weight, scale, global_scale, fmt, in_features, x.dtype))


@fp_linear.register_fake
def _(x, weight, scale, global_scale, fmt, in_features):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))
