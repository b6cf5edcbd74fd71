"""Plain-torch dequantization of the three compressed-tensors weight formats Orbit trains on.

These are the references the Triton kernels are tested against, and the CPU path. Each takes the
tensors exactly as stored in the checkpoint and returns ``[out, in]`` in ``dtype``.
"""

from __future__ import annotations

import torch

from orbit_kernels.int4 import dequant_int4, unpack_int4  # noqa: F401  (the int4 reference lives beside its kernel)

# e2m1 magnitudes by their 3-bit code; bit 3 is the sign
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)


def dequant_fp8_block(weight: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """e4m3 weights with one scale per ``[block, block]`` tile; scale ``[ceil(out/b), ceil(in/b)]``."""
    rows, cols = weight.shape
    block_r, block_c = -(-rows // scale.shape[0]), -(-cols // scale.shape[1])
    full = scale.float().repeat_interleave(block_r, 0)[:rows].repeat_interleave(block_c, 1)[:, :cols]
    return (weight.float() * full).to(dtype)


def unpack_fp4(packed: torch.Tensor) -> torch.Tensor:
    """uint8 ``[rows, cols/2]``, two e2m1 codes a byte, low nibble first -> float32 ``[rows, cols]``."""
    codes = torch.stack([packed & 0xF, packed >> 4], dim=-1).flatten(-2).to(torch.long)
    magnitude = torch.tensor(E2M1_VALUES, device=packed.device)[codes & 0x7]
    return torch.where(codes >= 8, -magnitude, magnitude)


def dequant_nvfp4(packed: torch.Tensor, scale: torch.Tensor, global_scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """NVFP4: ``w = fp4 * scale_e4m3[group of 16] / global_scale``."""
    values = unpack_fp4(packed)
    rows, cols = values.shape
    group = cols // scale.shape[-1]
    local = scale.float() / global_scale.float()
    return (values.view(rows, -1, group) * local[..., None]).view(rows, cols).to(dtype)
