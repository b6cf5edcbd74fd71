"""A packed linear and its LoRA update in one kernel, for the rows of a decode step: the few-row
GEMV, or above its rows the packed GEMM while the forward runs it (``max_rows``).

At batch 1 the LoRA expand cost as much as a kernel of real work: on an H200, int4 Qwen3-1.7B
shape, 112 expand launches took 429 us of a 2.66 ms step to add a rank-16 update to outputs the
GEMV had just written (``decode_graph_replay_profile_round_h200.txt``). ``orbit::packed_lora_linear``
runs the shrink as before (``lora.shrink``: ``t = x @ A[s]^T`` per row, fp32), then the packed GEMV
(or GEMM) with the expand in its epilogue: the program that owns an output tile adds
``scaling * t @ B[s]^T`` and the bias to its fp32 sum before the one rounding to the activation
dtype. Two kernels a linear, or a fused group of linears (q/k/v, gate/up), instead of three.

The reference (also the CPU path) is the unfused order: the dequantized linear, the bias, then each
group's ``lora_add_reference``, each rounded to the activation dtype in turn; the kernel rounds
once, so the two differ by those roundings.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from orbit_kernels import lora, lora_groups, packed_gemm, packed_gemv
from orbit_kernels._triton import serves
from orbit_kernels.packed_grad import dense_weight

ENABLED = True
"""Set False to run the base op and the LoRA kernels apart (benchmarks compare the two)."""


def packed_lora_reference(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor,
                          global_scale: torch.Tensor | None, bias: torch.Tensor | None, fmt: str, in_features: int,
                          as_: list[torch.Tensor], bs: list[torch.Tensor], row_slot: torch.Tensor | None,
                          scaling: float) -> torch.Tensor:
    y = F.linear(x, dense_weight(fmt, weight, scale, global_scale, in_features, x.dtype))
    if bias is not None:
        y = y + bias.to(y.dtype)
    flat_x, flat_y = x.reshape(-1, in_features), y.view(-1, y.shape[-1])
    for view, a, b in zip(flat_y.split([b.shape[1] for b in bs], dim=-1), as_, bs):
        lora.lora_add_reference(view, flat_x, a, b, row_slot, scaling)
    return y


GEMM_MAX_ROWS = 8
"""Above the GEMV's rows, the packed GEMM takes the update in its epilogue up to this many rows
(and while the forward runs it at all). The epilogue adds one rank at a time
(``lora.rows_delta_by_rank``), in the program that also holds the first split's partials. H200,
int4 + LoRA r16 decode, against the shrink-GEMM-expand path in the same process
(``decode_throughput_gemm_lora_epilogue_h200.jsonl``): 2,952 / 2,969 tok/s against 2,858 at
batch 8, but 4,894 against 5,322 at 16 and 5,303 against 8,939 at 32. With this cap
(``decode_throughput_gemm_lora_cap8_h200.jsonl``): 2,982 / 2,957 against 2,867 at batch 8, 16 and
32 rows unchanged. Tried again to 32 rows with the GEMM's 64-column tiles
(``decode_throughput_gemm_lora_epilogue_narrow_h200.jsonl``): still slower, 5,394 / 5,449 against
5,633 at 16 and 6,564 / 6,561 against 9,519 at 32."""


def max_rows(fmt: str) -> int:
    """Up to this many rows a ``fmt`` base takes the update in its epilogue: the GEMV's few rows,
    then the packed GEMM's to ``GEMM_MAX_ROWS`` while the forward runs it
    (``packed_gemm.forward_max_rows``)."""
    return max(packed_gemv.MAX_ROWS, min(GEMM_MAX_ROWS, packed_gemm.forward_max_rows(fmt)))


def _kernel(rows: int):
    """The module whose kernel takes ``rows`` rows: the GEMV's few, else the packed GEMM."""
    return packed_gemv if rows <= packed_gemv.MAX_ROWS else packed_gemm


def unserved_reason(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
                    fmt: str, in_features: int, as_: list[torch.Tensor], bs: list[torch.Tensor],
                    row_slot: torch.Tensor | None) -> str | None:
    """Why the kernels cannot take this call (None: they can)."""
    rows = x.numel() // in_features
    if rows > max_rows(fmt):
        return f"{rows} rows (the kernels take up to {max_rows(fmt)} on a {fmt} base)"
    why = _kernel(rows).unserved_reason(fmt, x, weight, scale, in_features)
    if why is not None:
        return why
    if bias is not None and (bias.shape != (weight.shape[0],) or not bias.is_contiguous()):
        return f"bias {tuple(bias.shape)} is not one contiguous value per output"
    return lora_groups.linear_reason(as_, bs, weight.shape[0], rows, row_slot, lora.MAX_RANK)


def served(x, weight, scale, bias, fmt, in_features, as_, bs, row_slot) -> bool:
    return serves("packed_lora_linear", ENABLED and _kernel(x.numel() // in_features).ENABLED and lora.ENABLED, x,
                  lambda: unserved_reason(x, weight, scale, bias, fmt, in_features, as_, bs, row_slot))


def launch(x, weight, scale, global_scale, bias, fmt, in_features, as_, bs, row_slot, scaling) -> torch.Tensor:
    """The two kernels (no dispatch checks: tests call it directly, also under the Triton interpreter)."""
    flat = x.reshape(-1, in_features).contiguous()
    t = lora.shrink(flat, as_, row_slot)
    epilogue = packed_gemv.LoRAEpilogue(t, bs, row_slot, scaling, bias)
    if _kernel(flat.shape[0]) is packed_gemv:
        y = packed_gemv.packed_gemv(fmt, flat, weight, scale, in_features, global_scale, epilogue)
    else:
        y = packed_gemm.packed_gemm(fmt, flat, weight, scale, in_features, global_scale, lora=epilogue)
    return y.view(*x.shape[:-1], weight.shape[0])


@torch.library.custom_op("orbit::packed_lora_linear", mutates_args=())
def packed_lora_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor,
                       global_scale: torch.Tensor | None, bias: torch.Tensor | None, fmt: str, in_features: int,
                       as_: list[torch.Tensor], bs: list[torch.Tensor], row_slot: torch.Tensor | None,
                       scaling: float) -> torch.Tensor:
    """``x W^T + bias`` with ``W`` packed as stored, plus ``scaling * (x @ as_[g][s]^T) @ bs[g][s]^T``
    on output columns of linear ``g`` (laid end to end) for each row's slot ``s`` (inference only)."""
    if served(x, weight, scale, bias, fmt, in_features, as_, bs, row_slot):
        return launch(x, weight, scale, global_scale, bias, fmt, in_features, as_, bs, row_slot, scaling)
    return packed_lora_reference(x, weight, scale, global_scale, bias, fmt, in_features, as_, bs, row_slot, scaling)


@packed_lora_linear.register_fake
def _(x, weight, scale, global_scale, bias, fmt, in_features, as_, bs, row_slot, scaling):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))
