"""A dense linear and its LoRA update for many rows, the update written first and the base GEMM
accumulating onto it, beside its plain-torch reference.

Above ``lora.KERNEL_MAX_ROWS`` rows the engine ran a dense base (bf16, or a packed weight
dequantized ahead) through cuBLAS and then the tile expand (``lora_tiles``), which reads the
GEMM's whole output back and writes it again to add a rank-16 update. At a 256-row x 128-token
prefill of the Qwen3-1.7B shape those read-and-rewrite passes took 35 ms of 222 ms of kernels on an
H100 (``decode_graph_replay_profile_prefill_256_h100.txt``). ``orbit::dense_lora_linear`` runs the
shrink, then the expand writing ``scaling * t @ B[s]^T`` into a fresh output (nothing read), then
cuBLAS's ``addmm_`` with that output as its C operand (beta = 1): the GEMM, bound by arithmetic
at these row counts, reads C in its epilogue, and the output makes one round trip fewer.

It rounds the update to the activation dtype before the GEMM adds the product in fp32, where the
unfused order rounds the product first; the two differ by those roundings.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from orbit_kernels import lora, lora_groups, lora_tiles
from orbit_kernels._triton import serves

ENABLED = True
"""Set False to run the base GEMM, then the tile expand adding into its output (benchmarks compare)."""
MIN_ROWS = 4096
"""From this many rows (a prefill's tokens) the engine takes this op. One H100, bf16 + LoRA r16 at
the Qwen3-1.7B shape, with the op at every row count above 32
(``decode_graph_replay_profile_prefill_256_dense_lora_h100.txt``, against
``decode_graph_replay_profile_prefill_256_h100.txt``): the 256 x 128-token prefill's expand went
from 35.3 to 19.3 ms and its two largest GEMM kernels, reading C, from 115.3 to 122.2 ms; but the
256-row decode step's replay went from 5.46 to 5.88 ms. With this threshold, decoding 256 rows of
128 new tokens after 128-token prompts (``decode_throughput_prefill_tiles_h100.jsonl``, first and
last all-on runs against the op off): int4 + LoRA 30,443 and 30,384 tok/s against 29,753, bf16 +
LoRA 35,125 and 35,515 against 35,015. Between 256 and 32,768 rows the crossing is not measured."""


def dense_lora_reference(x: torch.Tensor, weight: torch.Tensor, as_: list[torch.Tensor], bs: list[torch.Tensor],
                         row_slot: torch.Tensor | None, scaling: float) -> torch.Tensor:
    """The unfused order: the base product, then each group's update added to its columns."""
    y = F.linear(x, weight)
    flat_x, flat_y = x.reshape(-1, x.shape[-1]), y.view(-1, y.shape[-1])
    for view, a, b in zip(flat_y.split([b.shape[1] for b in bs], dim=-1), as_, bs):
        lora.lora_add_reference(view, flat_x, a, b, row_slot, scaling)
    return y


def takes_rows(rows: int) -> bool:
    """Whether ``rows`` is a count the op is for: ``MIN_ROWS`` or more, and the tile kernels' (above
    the row kernels')."""
    return ENABLED and lora.TILES_ENABLED and rows > lora.KERNEL_MAX_ROWS and rows >= MIN_ROWS


def unserved_reason(x: torch.Tensor, weight: torch.Tensor, as_: list[torch.Tensor], bs: list[torch.Tensor],
                    row_slot: torch.Tensor | None) -> str | None:
    """Why the kernels cannot take this call (None: they can)."""
    rows = x.numel() // x.shape[-1]
    if weight.dim() != 2 or weight.dtype != x.dtype or weight.shape[1] != x.shape[-1] or weight.stride(-1) != 1:
        return f"a weight {tuple(weight.shape)} {weight.dtype} for activations {tuple(x.shape)} {x.dtype}"
    return (lora_groups.linear_reason(as_, bs, weight.shape[0], rows, row_slot, lora.MAX_RANK)
            or lora_tiles.unserved_reason(x, as_[0], bs[0]))


def served(x, weight, as_, bs, row_slot) -> bool:
    return serves("dense_lora_linear", takes_rows(x.numel() // x.shape[-1]), x,
                  lambda: unserved_reason(x, weight, as_, bs, row_slot))


def launch(x: torch.Tensor, weight: torch.Tensor, as_: list[torch.Tensor], bs: list[torch.Tensor],
           row_slot: torch.Tensor | None, scaling: float) -> torch.Tensor:
    """The three kernels (no dispatch checks: tests call it directly, also under the Triton interpreter)."""
    flat = x.reshape(-1, x.shape[-1]).contiguous()
    y = torch.empty((flat.shape[0], weight.shape[0]), dtype=x.dtype, device=x.device)
    lora_tiles.launch_tile_groups(list(y.split([b.shape[1] for b in bs], dim=1)), flat, as_, bs, row_slot, scaling,
                                  write=True)
    y.addmm_(flat, weight.t())
    return y.view(*x.shape[:-1], weight.shape[0])


@torch.library.custom_op("orbit::dense_lora_linear", mutates_args=())
def dense_lora_linear(x: torch.Tensor, weight: torch.Tensor, as_: list[torch.Tensor], bs: list[torch.Tensor],
                      row_slot: torch.Tensor | None, scaling: float) -> torch.Tensor:
    """``x W^T`` plus ``scaling * (x @ as_[g][s]^T) @ bs[g][s]^T`` on the output columns of linear
    ``g`` (laid end to end) for each row's slot ``s`` (inference only)."""
    if served(x, weight, as_, bs, row_slot):
        return launch(x, weight, as_, bs, row_slot, scaling)
    return dense_lora_reference(x, weight, as_, bs, row_slot, scaling)


@dense_lora_linear.register_fake
def _(x, weight, as_, bs, row_slot, scaling):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))
