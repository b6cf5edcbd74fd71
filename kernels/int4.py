"""W4A16 kernels on the compressed-tensors ``pack-quantized`` layout, as stored on disk.

``weight_packed`` is int32 ``[out, in / 8]`` (eight offset-by-8 nibbles per word, lowest first)
and ``weight_scale`` is ``[out, in / group]``; ``w = (q - 8) * scale``. Two ops, each with one
dispatch point (``torch.library.custom_op`` + ``register_fake``) and the plain-torch reference
(``dequant_int4``, also the CPU path) beside it:

* ``orbit::int4_dequant``: packed -> dense ``[out, in]`` (one Triton pass instead of a chain of
  elementwise torch kernels); the training path dequantizes with it and calls cuBLAS.
* ``orbit::int4_linear``: ``x @ W^T`` with the weight unpacked tile by tile inside the GEMM, so a
  decode step reads 0.5 bytes per weight instead of dequantizing the whole matrix first. Up to
  ``packed_gemv.MAX_ROWS`` rows the few-row GEMV shared with fp8 and nvfp4 runs; up to
  ``GEMV_MAX_ROWS`` rows a split-K kernel spreads K over more programs (a decode linear has too
  few output tiles to fill the GPU); up to ``FUSED_MAX_ROWS`` a tiled kernel; above, dequantize
  and cuBLAS.

On the CPU, for dtypes other than bf16/fp16, or for a shape a kernel does not serve, the reference
runs (and the shape is logged once); a kernel never returns numbers the reference would not.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from orbit_kernels import packed_gemv
from orbit_kernels._triton import note_fallback, tl, triton


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


FUSED_MAX_ROWS = 32
"""Up to this many activation rows, ``int4_linear`` runs the fused kernel; above, dequant + cuBLAS.
Set from the first version of the kernel on an H100 at the Qwen3-1.7B shape (eager decode,
bench/results/decode_throughput_h100.jsonl): even with the dequant path at 32 rows, 1.45x
slower at 256."""
GEMV_MAX_ROWS = 16
"""Up to this many rows, ``int4_linear`` runs the split-K kernel."""
GEMV_BLOCK_N = 32
GEMV_TARGET_PROGRAMS = 264
"""Two programs per SM of an H100 (132 SMs)."""
LINEAR_BLOCK_K = 64
"""The fused kernel's K tile: in_features and the group size must be multiples of it."""
ENABLED = True
"""Set False to force the references (benchmarks compare the two in one process)."""


def _note_fallback(op: str, why: str, key: tuple) -> None:
    note_fallback(op, f"{why}; out, in, group, dtype = {key}")


def _triton_ready(*tensors: torch.Tensor) -> bool:
    return ENABLED and triton is not None and all(t.is_cuda for t in tensors)


if triton is not None:

    @triton.jit
    def _dequant_kernel(packed_ptr, scale_ptr, out_ptr, rows, cols, stride_p, stride_s, stride_o,
                        GROUP: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
        offs_r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
        mask = (offs_r[:, None] < rows) & (offs_c[None, :] < cols)
        words = tl.load(packed_ptr + offs_r[:, None] * stride_p + offs_c[None, :] // 8, mask=mask, other=0)
        q = ((words >> ((offs_c[None, :] % 8) * 4)) & 0xF) - 8
        scale = tl.load(scale_ptr + offs_r[:, None] * stride_s + offs_c[None, :] // GROUP, mask=mask, other=0.0)
        value = q.to(tl.float32) * scale.to(tl.float32)
        tl.store(out_ptr + offs_r[:, None] * stride_o + offs_c[None, :], value.to(out_ptr.dtype.element_ty), mask=mask)

    _LINEAR_CONFIGS = [
        triton.Config({"BLOCK_M": 16, "BLOCK_N": 32}, num_warps=4, num_stages=4),
        triton.Config({"BLOCK_M": 16, "BLOCK_N": 64}, num_warps=4, num_stages=4),
        triton.Config({"BLOCK_M": 16, "BLOCK_N": 128}, num_warps=4, num_stages=4),
        triton.Config({"BLOCK_M": 32, "BLOCK_N": 64}, num_warps=4, num_stages=3),
        triton.Config({"BLOCK_M": 32, "BLOCK_N": 128}, num_warps=8, num_stages=3),
        triton.Config({"BLOCK_M": 64, "BLOCK_N": 64}, num_warps=4, num_stages=3),
        triton.Config({"BLOCK_M": 64, "BLOCK_N": 128}, num_warps=8, num_stages=3),
        triton.Config({"BLOCK_M": 128, "BLOCK_N": 64}, num_warps=8, num_stages=3),
        triton.Config({"BLOCK_M": 128, "BLOCK_N": 128}, num_warps=8, num_stages=3),
    ]

    @triton.autotune(configs=_LINEAR_CONFIGS, key=["M_BUCKET", "N", "K"])
    @triton.jit
    def _linear_kernel(x_ptr, packed_ptr, scale_ptr, y_ptr, M, N, K, M_BUCKET, stride_xm, stride_p, stride_s, stride_ym,
                       GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        # packed words are read as a contiguous [BLOCK_N, BLOCK_K / 8] tile and unpacked in registers;
        # one scale per row and K tile (BLOCK_K divides the group)
        offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_w = tl.arange(0, BLOCK_K // 8)
        shifts = tl.arange(0, 8) * 4
        n_mask = offs_n < N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :], mask=offs_m[:, None] < M, other=0.0)
            words = tl.load(packed_ptr + offs_n[:, None] * stride_p + (k0 // 8 + offs_w)[None, :], mask=n_mask[:, None],
                            other=0)
            q = tl.reshape((words[:, :, None] >> shifts[None, None, :]) & 0xF, (BLOCK_N, BLOCK_K)) - 8
            scale = tl.load(scale_ptr + offs_n * stride_s + k0 // GROUP, mask=n_mask, other=0.0)
            w = (q.to(tl.float32) * scale.to(tl.float32)[:, None]).to(x.dtype)
            acc = tl.dot(x, tl.trans(w), acc)
        y_mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
        tl.store(y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :], acc.to(y_ptr.dtype.element_ty), mask=y_mask)


    @triton.jit
    def _gemv_kernel(x_ptr, packed_ptr, scale_ptr, out_ptr, M, N, K, stride_xm, stride_p, stride_s, stride_split,
                     stride_om, GROUP: tl.constexpr, SPLIT_K: tl.constexpr, BLOCK_M: tl.constexpr,
                     BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        # split-K over a few rows: a decode-sized linear has too few output tiles to keep every SM
        # streaming weights, so K is dealt out round-robin to SPLIT_K programs per tile; each writes
        # its partial sums to its own slice of ``out`` (reduced by the caller when SPLIT_K > 1)
        offs_m = tl.arange(0, BLOCK_M)
        offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_w = tl.arange(0, BLOCK_K // 8)
        shifts = tl.arange(0, 8) * 4
        n_mask = offs_n < N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(tl.program_id(1) * BLOCK_K, K, SPLIT_K * BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            words = tl.load(packed_ptr + offs_n[:, None] * stride_p + (k0 // 8 + offs_w)[None, :], mask=n_mask[:, None],
                            other=0)
            x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :], mask=offs_m[:, None] < M, other=0.0)
            q = tl.reshape((words[:, :, None] >> shifts[None, None, :]) & 0xF, (BLOCK_N, BLOCK_K)) - 8
            scale = tl.load(scale_ptr + offs_n * stride_s + k0 // GROUP, mask=n_mask, other=0.0)
            w = (q.to(tl.float32) * scale.to(tl.float32)[:, None]).to(x.dtype)
            acc = tl.dot(x, tl.trans(w), acc)
        out = out_ptr + tl.program_id(1) * stride_split + offs_m[:, None] * stride_om + offs_n[None, :]
        tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=(offs_m[:, None] < M) & n_mask[None, :])


@torch.library.custom_op("orbit::int4_dequant", mutates_args=())
def int4_dequant(packed: torch.Tensor, scale: torch.Tensor, in_features: int, dtype: torch.dtype) -> torch.Tensor:
    rows = packed.shape[0]
    if not _triton_ready(packed, scale):
        return dequant_int4(packed, scale, (rows, in_features), dtype)
    group = in_features // scale.shape[1]
    out = torch.empty((rows, in_features), dtype=dtype, device=packed.device)
    block_r, block_c = 16, 256
    grid = (triton.cdiv(rows, block_r), triton.cdiv(in_features, block_c))
    _dequant_kernel[grid](packed, scale, out, rows, in_features, packed.stride(0), scale.stride(0), out.stride(0),
                          GROUP=group, BLOCK_R=block_r, BLOCK_C=block_c)
    return out


@int4_dequant.register_fake
def _(packed, scale, in_features, dtype):
    return packed.new_empty((packed.shape[0], in_features), dtype=dtype)


def _fused_reason(x: torch.Tensor, in_features: int, group: int) -> str | None:
    if x.dtype not in (torch.bfloat16, torch.float16):
        return f"activations are {x.dtype}"
    if in_features % LINEAR_BLOCK_K or group % LINEAR_BLOCK_K:
        return f"in_features={in_features} or group={group} is not a multiple of {LINEAR_BLOCK_K}"
    return None


@torch.library.custom_op("orbit::int4_linear", mutates_args=())
def int4_linear(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, in_features: int) -> torch.Tensor:
    """``x [..., in] @ W^T -> [..., out]`` (no bias)."""
    out_features = packed.shape[0]
    rows = x.numel() // in_features
    if not _triton_ready(x, packed, scale):
        return F.linear(x, dequant_int4(packed, scale, (out_features, in_features), x.dtype))
    group = in_features // scale.shape[1]
    reason = _fused_reason(x, in_features, group)
    if reason is not None or rows > FUSED_MAX_ROWS:
        if reason is not None:
            _note_fallback("int4_linear", reason, (out_features, in_features, group, x.dtype))
        return F.linear(x, int4_dequant(packed, scale, in_features, x.dtype))
    if (rows <= packed_gemv.MAX_ROWS and packed_gemv.ENABLED
            and packed_gemv.unserved_reason("int4", x, packed, scale, in_features) is None):
        return packed_gemv.packed_gemv("int4", x, packed, scale, in_features)
    if rows <= GEMV_MAX_ROWS:
        return int4_gemv(x, packed, scale, in_features)
    return fused_int4_linear(x, packed, scale, in_features)


def int4_gemv(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, in_features: int) -> torch.Tensor:
    """The split-K Triton kernel for up to ``GEMV_MAX_ROWS`` rows (callers check ``_fused_reason`` first)."""
    out_features = packed.shape[0]
    rows = x.numel() // in_features
    group = in_features // scale.shape[1]
    flat = x.reshape(rows, in_features).contiguous()
    block_n, block_k = GEMV_BLOCK_N, min(128, group)
    tiles = triton.cdiv(out_features, block_n)
    # enough programs for two per SM, but each keeps at least two K tiles to stream
    split = max(1, min(GEMV_TARGET_PROGRAMS // tiles, in_features // (2 * block_k)))
    split = 1 << (split.bit_length() - 1)
    out = torch.empty((split, rows, out_features), dtype=x.dtype if split == 1 else torch.float32, device=x.device)
    _gemv_kernel[(tiles, split)](flat, packed, scale, out, rows, out_features, in_features, flat.stride(0),
                                 packed.stride(0), scale.stride(0), out.stride(0), out.stride(1), GROUP=group,
                                 SPLIT_K=split, BLOCK_M=16, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=4, num_stages=4)
    y = out[0] if split == 1 else out.sum(0).to(x.dtype)
    return y.view(*x.shape[:-1], out_features)


def fused_int4_linear(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, in_features: int) -> torch.Tensor:
    """The Triton W4A16 GEMM itself, for any row count (callers check ``_fused_reason`` first)."""
    out_features = packed.shape[0]
    rows = x.numel() // in_features
    group = in_features // scale.shape[1]
    flat = x.reshape(rows, in_features).contiguous()
    y = torch.empty((rows, out_features), dtype=x.dtype, device=x.device)
    bucket = 1 << max(rows - 1, 0).bit_length()

    def grid(meta):
        return triton.cdiv(rows, meta["BLOCK_M"]), triton.cdiv(out_features, meta["BLOCK_N"])

    _linear_kernel[grid](flat, packed, scale, y, rows, out_features, in_features, bucket, flat.stride(0), packed.stride(0),
                         scale.stride(0), y.stride(0), GROUP=group, BLOCK_K=LINEAR_BLOCK_K)
    return y.view(*x.shape[:-1], out_features)


@int4_linear.register_fake
def _(x, packed, scale, in_features):
    return x.new_empty((*x.shape[:-1], packed.shape[0]))
