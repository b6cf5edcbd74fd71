"""A product of a few rows with a dense (bf16 or fp16) weight, for the decode step's lm_head,
beside its plain-torch reference.

At one row the lm_head is the step's largest read (the Qwen3-1.7B shape: a 151,936 x 2,048 bf16
table, 622 MB), and cuBLAS's kernel for it runs as a plain launch in a chain of kernels under
programmatic dependent launch. ``orbit::dense_gemv`` gives each program ``BLOCK_N`` output rows
of the weight over the whole reduction, read in one load per K step (evict-first: the table is
streamed once a step), and sums in fp32 before one rounding. The first K step of the weight, which
no kernel of the step writes, is read before the PDL wait (``_triton.EARLY_READS``), and each
program releases the kernel after it only at its end (``LATE_RELEASE``). The two differ from the
reference only in summation order.

Where it runs is measured (``MAX_ROWS``); above, the engine keeps ``F.linear``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from orbit_kernels import _triton
from orbit_kernels._triton import pdl_args, pdl_enter, pdl_release, pdl_wait, serves, tl, triton

ENABLED = True
"""Set False to force the reference (benchmarks compare the two in one process)."""
MAX_ROWS = 1
"""Rows the engine hands the kernel. One H100, the Qwen3-1.7B lm_head, ten calls a CUDA graph
(``bench/dense_gemv.py``, ``bench/results/dense_gemv_h100.jsonl``): 200.0 us at one row against
cuBLAS's 216.9, 209.9 against 218.0 at two rows and 262.3 against 218.5 at four. Two rows are not
taken: not measured end to end."""
BLOCK_N = 8
"""Output rows a program."""
BLOCK_K = 2048
"""The widest K step (a narrower reduction is one step)."""
WARPS = 4
LATE_RELEASE = True
"""Under PDL, let the kernel after this one (the sampling kernel) be scheduled only as each program
ends, not as it starts: this kernel runs in many waves (18,992 programs at the lm_head's shape),
whose SM slots the next kernel's waiting programs would otherwise hold. H100, int4 + LoRA r16 at
batch 1 (``decode_throughput_lm_head_edges_h100.jsonl``): 799.3 tok/s released at the start against
807.9. False: at the start, as the step's other kernels do (benchmarks compare)."""
EARLY = True
"""Read the first K step of the weight before the PDL wait (with ``_triton.EARLY_READS``); within
noise at batch 1 on the H100 (807.2 tok/s off against 807.9). False: after it (benchmarks compare)."""
EVICT_FIRST = True
"""Load the weight with L2's evict-first policy: it is streamed once a step. H100, int4 + LoRA r16
at batch 1 (``decode_throughput_evict_first_h100.jsonl``): 812.1 and 812.7 tok/s against 805.1
(with the default policy the kernel tied cuBLAS end to end though it was 15 us faster; why this
helps is not established). False: the default policy (benchmarks compare)."""


def dense_gemv_reference(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return F.linear(x, weight)


if triton is not None:

    @triton.jit
    def _dense_gemv_kernel(x_ptr, w_ptr, y_ptr, M, N, K, stride_w, ROWS: tl.constexpr, BLOCK_N: tl.constexpr,
                           BLOCK_K: tl.constexpr, EARLY: tl.constexpr = False, LATE: tl.constexpr = False,
                           EVICT: tl.constexpr = False, PDL: tl.constexpr = False):
        """``ROWS``: ``M`` rounded up to a power of two."""
        pid = tl.program_id(0)
        offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_k = tl.arange(0, BLOCK_K)
        n_mask = offs_n < N
        rows = tl.arange(0, ROWS)
        m_mask = rows < M
        if not EARLY:
            _enter(PDL, LATE)
        # the first K step of the weight: frozen, so it may come before the wait
        w = _weight_step(w_ptr, offs_n, offs_k, n_mask, stride_w, K, EVICT)
        if EARLY:
            _enter(PDL, LATE)
        acc = tl.zeros((ROWS, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            if k0 > 0:
                w = _weight_step(w_ptr, offs_n, k0 + offs_k, n_mask, stride_w, K, EVICT)
            x = tl.load(x_ptr + rows[:, None] * K + (k0 + offs_k)[None, :],
                        mask=m_mask[:, None] & ((k0 + offs_k)[None, :] < K), other=0.0)
            acc += tl.sum(w.to(tl.float32)[None, :, :] * x.to(tl.float32)[:, None, :], axis=2)
        tl.store(y_ptr + rows[:, None] * N + offs_n[None, :], acc.to(y_ptr.dtype.element_ty),
                 mask=m_mask[:, None] & n_mask[None, :])
        if LATE:
            pdl_release(PDL)

    @triton.jit
    def _weight_step(w_ptr, offs_n, offs_k, n_mask, stride_w, K, EVICT: tl.constexpr):
        mask = n_mask[:, None] & (offs_k[None, :] < K)
        if EVICT:
            return tl.load(w_ptr + offs_n[:, None] * stride_w + offs_k[None, :], mask=mask, other=0.0,
                           eviction_policy="evict_first")
        return tl.load(w_ptr + offs_n[:, None] * stride_w + offs_k[None, :], mask=mask, other=0.0)

    @triton.jit
    def _enter(PDL: tl.constexpr, LATE: tl.constexpr):
        if LATE:
            pdl_wait(PDL)
        else:
            pdl_enter(PDL)


def unserved_reason(x: torch.Tensor, weight: torch.Tensor) -> str | None:
    """Why the kernel cannot take this call (None: it can)."""
    if x.dtype not in (torch.bfloat16, torch.float16) or weight.dtype != x.dtype:
        return f"activations {x.dtype} with a {weight.dtype} weight"
    if weight.dim() != 2 or weight.stride(-1) != 1 or x.shape[-1] != weight.shape[1]:
        return f"a weight {tuple(weight.shape)} for rows of {x.shape[-1]}"
    if not x.is_contiguous():
        return "rows that are not contiguous"
    rows = x.numel() // x.shape[-1]
    if not 1 <= rows <= MAX_ROWS:
        return f"{rows} rows (the kernel takes 1 to {MAX_ROWS})"
    return None


def launch(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The kernel (no dispatch checks: tests call it directly, also under the Triton interpreter)."""
    n, k = weight.shape
    flat = x.reshape(-1, k)
    y = torch.empty((flat.shape[0], n), dtype=x.dtype, device=x.device)
    block_k = min(triton.next_power_of_2(k), BLOCK_K)
    _dense_gemv_kernel[(triton.cdiv(n, BLOCK_N),)](
        flat, weight, y, flat.shape[0], n, k, weight.stride(0), ROWS=triton.next_power_of_2(flat.shape[0]),
        BLOCK_N=BLOCK_N, BLOCK_K=block_k, num_warps=WARPS, EARLY=EARLY and _triton.EARLY_READS, LATE=LATE_RELEASE,
        EVICT=EVICT_FIRST, **pdl_args(x))
    return y.view(*x.shape[:-1], n)


@torch.library.custom_op("orbit::dense_gemv", mutates_args=())
def dense_gemv(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``x @ weight^T`` for one row (inference only)."""
    if serves("dense_gemv", ENABLED, x, lambda: unserved_reason(x, weight)):
        return launch(x, weight)
    return dense_gemv_reference(x, weight)


@dense_gemv.register_fake
def _(x, weight):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))
