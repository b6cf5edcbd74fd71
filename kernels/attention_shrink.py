"""Decode attention whose merge also computes the o_proj's LoRA shrink, beside its reference.

A decode layer runs the attention's merge kernel and then the shrink ``t = out @ A[s]^T`` of the
o_proj that reads ``out``: two dependent launches of a few microseconds each. Here each merge
program (a row and a KV head) takes the dot of the heads it just merged, rounded as stored, with
their columns of A, and the row's KV heads add their shares in the same launch: the last program to
arrive sums them in a fixed order (``packed_gemv.finish_split``), so ``t`` does not depend on timing.
It differs from the shrink kernel's ``t`` only in fp32 summation order. The engine hands ``t`` to
the o_proj through ``lora.offer_shrink`` (``models.shrink_fusion.attention_for``).
"""

from __future__ import annotations

import torch

from orbit_kernels import decode_attention, lora
from orbit_kernels._triton import serves

ENABLED = True
"""Set False to run the attention and the shrink apart (benchmarks compare)."""
MAX_ROWS = 4
"""Rows a call may have (the few-row decode steps whose chain of small kernels this shortens)."""


def decode_attention_shrink_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lengths: torch.Tensor,
                                      a: torch.Tensor, row_slot: torch.Tensor | None):
    out = decode_attention.decode_attention_reference(q, k, v, lengths)
    return out, lora.shrink_reference(out.reshape(out.shape[0], -1), [a], row_slot)


def unserved_reason(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, a: torch.Tensor) -> str | None:
    """Why the kernels cannot take this call (None: they can)."""
    why = decode_attention.unserved_reason(q, k, v)
    if why is not None:
        return why
    if q.shape[0] > MAX_ROWS:
        return f"{q.shape[0]} rows over {MAX_ROWS}"
    if a.dim() != 3 or a.shape[2] != q.shape[1] * q.shape[2] or a.shape[1] > lora.MAX_RANK or a.stride(-1) != 1:
        return f"A {tuple(a.shape)} for attention outputs of {q.shape[1]} x {q.shape[2]}"
    return None


@torch.library.custom_op("orbit::decode_attention_shrink", mutates_args=())
def decode_attention_shrink(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lengths: torch.Tensor,
                            a: torch.Tensor, row_slot: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out, t)``: ``orbit::decode_attention``'s output and fp32 ``t [rows, r] = out_row @ a[s]^T``
    for each row's slot ``s`` (slot 0 without ``row_slot``; inference only)."""
    if serves("decode_attention_shrink", ENABLED and decode_attention.ENABLED, q,
              lambda: unserved_reason(q, k, v, a)):
        return decode_attention.launch(q, k, v, lengths, shrink=(a, row_slot))
    return decode_attention_shrink_reference(q, k, v, lengths, a, row_slot)


@decode_attention_shrink.register_fake
def _(q, k, v, lengths, a, row_slot):
    return torch.empty_like(q), q.new_empty((q.shape[0], a.shape[1]), dtype=torch.float32)
