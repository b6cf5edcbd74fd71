"""LoRA on a frozen base: ``y = W x + (alpha / r) * B A dropout(x)`` (Hu et al. 2021)."""

from __future__ import annotations

import math

import torch
from torch import nn

from orbit_core.models.engine_forward import use_engine_kernels
from orbit_core.models.projections import base_outputs, dense_base_weight, packed_parts
from orbit_core.peft.base import AdapterLayer, base_device, base_weight, replace_module, target_linears
from orbit_kernels import dense_lora, packed_gemm, packed_lora
from orbit_kernels.lora import KERNEL_MAX_ROWS, add_beside, lora_add_, lora_add_group_


class LoRALinear(AdapterLayer):
    """Only ``lora_A`` / ``lora_B`` train; B starts at zero so the model starts unchanged."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float):
        super().__init__(base)
        self.rank, self.alpha = rank, alpha
        self.scaling = alpha / rank
        device = base_device(base)
        # Adapter weights live in fp32 even on a low-precision base, so updates are not lost to rounding.
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, device=device, dtype=torch.float32))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, device=device, dtype=torch.float32))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.enabled and self.fake_quant is not None:
            return self.fake_quant_forward(x)
        engine = self.enabled and not self.training and use_engine_kernels(x)
        if engine:
            fused = self._engine_packed(x, [self])
            if fused is None:
                fused = self._engine_dense(x, [self])
            if fused is None:
                fused = self._engine_beside(x, [self])
            if fused is not None:
                return fused[0]
        out = self.base(x)
        if not self.enabled:
            return out
        if engine:
            served = self._engine_add(x, out)
            if served is not None:
                return served
        if self.slot_bank is not None:
            delta = self.slot_bank.route(lambda s: self.low_rank(x, self.slot_A[s], self.slot_B[s]))
            return out + delta.to(out.dtype)
        return out + self.low_rank(self.dropout(x), self.lora_A, self.lora_B).to(out.dtype)

    def _engine_factors(self, rows: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None] | None:
        """(A [slots, r, in], B [slots, out, r], each row's slot or None) for the engine's kernels."""
        if self.slot_bank is None:
            return self.lora_A[None], self.lora_B[None], None
        if len(self.slot_bank.used) == 1:
            slot = self.slot_bank.used[0]
            return self.slot_A[slot : slot + 1], self.slot_B[slot : slot + 1], None
        row_slot = self.slot_bank.row_slot
        if row_slot is None or row_slot.numel() != rows:
            return None
        return self.slot_A, self.slot_B, row_slot

    def _engine_add(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor | None:
        """The rollout engine's path: both LoRA GEMMs in two kernels, each row reading its own slot."""
        if not out.is_contiguous():  # the kernel adds into the output in place, through a flat view
            return None
        flat_x, flat_out = x.reshape(-1, x.shape[-1]), out.view(-1, out.shape[-1])
        factors = self._engine_factors(flat_x.shape[0])
        if factors is None:
            return None
        a, b, row_slot = factors
        lora_add_(flat_out, flat_x.contiguous(), a, b, row_slot, self.scaling,
                  _base_under_pdl(self.base, flat_x.shape[0]))
        return out

    @staticmethod
    def engine_group_forward(x: torch.Tensor, linears) -> list[torch.Tensor] | None:
        """The engine's path for LoRA linears that read the same ``x`` (``models.projections``): the
        base outputs, then one launch of each LoRA kernel for all of them. None: not applicable
        (outside the engine, other modules, or settings the linears do not share)."""
        first = linears[0]
        factors = LoRALinear._group_factors(x, linears)
        if factors is None:
            return None
        flat_x = x.reshape(-1, x.shape[-1]).contiguous()
        fused = LoRALinear._engine_packed(x, linears, factors)
        if fused is None:
            fused = LoRALinear._engine_dense(x, linears, factors)
        if fused is None:
            fused = LoRALinear._engine_beside(x, linears, factors)
        if fused is not None:
            return fused
        # the kernels add in place, through flat views: of one fused base call, or of each base's output
        outs = base_outputs(x, [m.base for m in linears]) or [m.base(x).contiguous() for m in linears]
        flat_outs = [o.view(-1, o.shape[-1]) for o in outs]
        lora_add_group_(flat_outs, flat_x, [f[0] for f in factors], [f[1] for f in factors], factors[0][2],
                        first.scaling, _base_under_pdl(first.base, flat_x.shape[0]))
        return outs

    @staticmethod
    def _group_factors(x: torch.Tensor, linears) -> list | None:
        """Each linear's ``_engine_factors`` when ``engine_group_forward`` serves them (None: it does not)."""
        first = linears[0]
        if not use_engine_kernels(x) or any(
                type(m) is not LoRALinear or m.training or not m.enabled or m.fake_quant is not None
                or m.scaling != first.scaling or m.slot_bank is not first.slot_bank for m in linears):
            return None
        factors = [m._engine_factors(x.numel() // x.shape[-1]) for m in linears]
        return None if any(f is None for f in factors) else factors

    @staticmethod
    def engine_shrink_factors(x: torch.Tensor, linears) -> tuple[list[torch.Tensor], torch.Tensor | None] | None:
        """(each linear's A, the rows' slots) that the linears' engine forward will shrink ``x`` by
        (``engine_group_forward``, or one linear's own), for a kernel before it to compute the
        shrink (``orbit_kernels.norm_shrink``, ``silu_shrink``); None: no such shrink."""
        factors = LoRALinear._group_factors(x, linears)
        return None if factors is None else ([f[0] for f in factors], factors[0][2])

    @staticmethod
    def _factor_lists(linears, rows: int, factors: list | None) -> tuple[list, list, torch.Tensor | None] | None:
        """(each linear's A, each one's B, the rows' slots) from ``factors`` (the linears'
        ``_engine_factors``, or None to ask them); None when one has none for ``rows``."""
        factors = factors or [m._engine_factors(rows) for m in linears]
        if any(f is None for f in factors):
            return None
        return [f[0] for f in factors], [f[1] for f in factors], factors[0][2]

    @staticmethod
    def _engine_packed(x: torch.Tensor, linears, factors: list | None = None) -> list[torch.Tensor] | None:
        """Decode rows through packed bases: the base GEMV or GEMM with the LoRA expand in its epilogue
        (``orbit::packed_lora_linear``), each linear's output a column view. None: not served.
        ``factors``: the linears' ``_engine_factors``, when the caller has them."""
        rows = x.numel() // x.shape[-1]
        fmt = getattr(linears[0].base, "fmt_name", None)  # packed bases name their format
        if fmt is None or rows > packed_lora.max_rows(fmt):
            return None
        parts = packed_parts([m.base for m in linears])
        lists = None if parts is None else LoRALinear._factor_lists(linears, rows, factors)
        if lists is None:
            return None
        as_, bs, row_slot = lists
        if not packed_lora.served(x, parts.weight, parts.scale, parts.bias, parts.fmt, parts.in_features, as_, bs,
                                  row_slot):
            return None
        y = packed_lora.packed_lora_linear(x, parts.weight, parts.scale, parts.global_scale, parts.bias, parts.fmt,
                                           parts.in_features, as_, bs, row_slot, linears[0].scaling)
        return list(y.split([m.base.out_features for m in linears], dim=-1))

    @staticmethod
    def _engine_dense(x: torch.Tensor, linears, factors: list | None = None) -> list[torch.Tensor] | None:
        """Many rows through a dense base call (bf16, or a packed weight dequantized ahead): the update
        written first and the GEMM adding the base product onto it (``orbit::dense_lora_linear``),
        each linear's output a column view. None: not served. ``factors`` as ``_engine_packed``'s."""
        rows = x.numel() // x.shape[-1]
        if not dense_lora.takes_rows(rows):
            return None
        weight = dense_base_weight([m.base for m in linears], x.dtype)
        lists = None if weight is None else LoRALinear._factor_lists(linears, rows, factors)
        if lists is None:
            return None
        as_, bs, row_slot = lists
        if not dense_lora.served(x, weight, as_, bs, row_slot):
            return None
        y = dense_lora.dense_lora_linear(x, weight, as_, bs, row_slot, linears[0].scaling)
        return list(y.split([m.base.out_features for m in linears], dim=-1))

    @staticmethod
    def _engine_beside(x: torch.Tensor, linears, factors: list | None = None) -> list[torch.Tensor] | None:
        """Many rows through the base's own call (``nn.Linear``, or a packed weight's dequantize +
        cuBLAS): the LoRA shrink on a side stream beside it, then the expand into its outputs
        (``lora.add_beside``). None, with nothing run: not served. ``factors`` as ``_engine_packed``'s."""
        rows = x.numel() // x.shape[-1]
        lists = None if rows <= KERNEL_MAX_ROWS else LoRALinear._factor_lists(linears, rows, factors)
        if lists is None:
            return None
        outs: list[torch.Tensor] = []

        def base_call() -> list[torch.Tensor]:
            outs.extend(base_outputs(x, [m.base for m in linears]) or [m.base(x).contiguous() for m in linears])
            return [o.view(-1, o.shape[-1]) for o in outs]

        flat_x = x.reshape(-1, x.shape[-1]).contiguous()
        if add_beside(base_call, flat_x, *lists, linears[0].scaling) is None:
            return None
        return outs

    def low_rank(self, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        # computed in the activation dtype (bf16 on a GPU base); A and B stay fp32 master weights
        return ((x @ a.to(x.dtype).t()) @ b.to(x.dtype).t()) * self.scaling

    def delta_weight(self) -> torch.Tensor:
        """``[out, in]`` update this adapter adds to the base weight."""
        return (self.lora_B @ self.lora_A) * self.scaling

    def merged_weight(self) -> torch.Tensor:
        return base_weight(self.base) + self.delta_weight()


def _base_under_pdl(base: nn.Module, rows: int) -> bool:
    """Whether ``base`` computes ``rows`` rows in one of our kernels launched under PDL (a packed
    format's GEMV or GEMM), not in cuBLAS: the LoRA expand after it may then go under PDL too."""
    fmt = getattr(base, "fmt_name", None)
    return fmt is not None and rows <= packed_gemm.dense_above(fmt)


def apply_lora(model: nn.Module, rank: int, alpha: float, dropout: float, target_modules: list[str]) -> list[str]:
    """Freeze every base parameter and wrap the targeted linears. Returns the wrapped names."""
    model.requires_grad_(False)
    targets = target_linears(model, target_modules)
    for name in targets:
        replace_module(model, name, LoRALinear(model.get_submodule(name), rank, alpha, dropout))
    return targets
