"""W4A16 kernels on the compressed-tensors ``pack-quantized`` layout, as stored on disk.

``weight_packed`` is int32 ``[out, in / 8]`` (eight offset-by-8 nibbles per word, lowest first)
and ``weight_scale`` is ``[out, in / group]``; ``w = (q - 8) * scale``. Two ops, each with one
dispatch point (``torch.library.custom_op`` + ``register_fake``) and the plain-torch reference
(``dequant_int4``, also the CPU path) beside it:

* ``orbit::int4_dequant``: packed -> dense ``[out, in]`` (one Triton pass instead of a chain of
  elementwise torch kernels: ``packed_gemm.dequantize``, shared with fp8 and nvfp4); the training
  path dequantizes with it and calls cuBLAS.
* ``orbit::int4_linear``: ``x @ W^T`` with the weight decoded tile by tile inside the kernel, so a
  decode step reads 0.5 bytes per weight instead of dequantizing the whole matrix first. Up to
  ``packed_gemv.MAX_ROWS`` rows the few-row GEMV shared with fp8 and nvfp4 runs; up to
  ``packed_gemm.forward_max_rows`` the tiled GEMM shared with them; above, dequantize and cuBLAS.

On the CPU, for dtypes other than bf16/fp16, or for a shape a kernel does not serve, the reference
runs (and the shape is logged once); a kernel never returns numbers the reference would not.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from orbit_kernels import packed_gemm, packed_gemv
from orbit_kernels._triton import serves, triton


def unpack_int4(packed: torch.Tensor, columns: int) -> torch.Tensor:
    """int32 ``[rows, ceil(cols/8)]``, eight offset-by-8 nibbles each, lowest first -> int8 ``[rows, cols]``."""
    shifts = torch.arange(0, 32, 4, device=packed.device, dtype=torch.int32)
    nibbles = (packed[..., None] >> shifts) & 0xF
    return (nibbles.flatten(-2)[..., :columns] - 8).to(torch.int8)


def dequant_int4(packed: torch.Tensor, scale: torch.Tensor, shape: tuple[int, int], dtype: torch.dtype) -> torch.Tensor:
    """W4A16 symmetric group-wise: ``w = q * scale[group]``; scale ``[out, in / group]``."""
    rows, cols = shape
    q = unpack_int4(packed, cols).to(torch.float32)
    group = cols // scale.shape[-1]
    return (q.view(rows, -1, group) * scale.float()[..., None]).view(rows, cols).to(dtype)


ENABLED = True
"""Set False to force the references (benchmarks compare the two in one process)."""


def _triton_ready(*tensors: torch.Tensor) -> bool:
    return ENABLED and triton is not None and all(t.is_cuda for t in tensors)


@torch.library.custom_op("orbit::int4_dequant", mutates_args=())
def int4_dequant(packed: torch.Tensor, scale: torch.Tensor, in_features: int, dtype: torch.dtype) -> torch.Tensor:
    if serves("int4_dequant", ENABLED, packed, lambda: packed_gemm.dequant_reason(packed)):
        return packed_gemm.dequantize("int4", packed, scale, None, in_features, dtype)
    return dequant_int4(packed, scale, (packed.shape[0], in_features), dtype)


@int4_dequant.register_fake
def _(packed, scale, in_features, dtype):
    return packed.new_empty((packed.shape[0], in_features), dtype=dtype)


@torch.library.custom_op("orbit::int4_linear", mutates_args=())
def int4_linear(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, in_features: int) -> torch.Tensor:
    """``x [..., in] @ W^T -> [..., out]`` (no bias)."""
    out_features = packed.shape[0]
    rows = x.numel() // in_features
    if not _triton_ready(x, packed, scale):
        return F.linear(x, dequant_int4(packed, scale, (out_features, in_features), x.dtype))
    if rows <= packed_gemv.MAX_ROWS and serves("int4_gemv", packed_gemv.ENABLED, x,
                                               lambda: packed_gemv.unserved_reason("int4", x, packed, scale, in_features)):
        return packed_gemv.packed_gemv("int4", x, packed, scale, in_features)
    if rows <= packed_gemm.forward_max_rows("int4") and serves(
            "int4_gemm", packed_gemm.ENABLED, x, lambda: packed_gemm.unserved_reason("int4", x, packed, scale, in_features)):
        return packed_gemm.packed_gemm("int4", x, packed, scale, in_features)
    return F.linear(x, int4_dequant(packed, scale, in_features, x.dtype))


@int4_linear.register_fake
def _(x, packed, scale, in_features):
    return x.new_empty((*x.shape[:-1], packed.shape[0]))
