"""A frozen linear whose weight stays packed in memory and is dequantized on the fly."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from orbit_core.models.dequant_ahead import dense_for
from orbit_kernels.fp_formats import fp_linear
from orbit_kernels.int4 import int4_linear
from orbit_kernels.packed_grad import dense_weight, packed_input_grad


TENSOR_NAMES = {"int4": ("weight_packed", "weight_scale"), "fp8": ("weight", "weight_scale"),
                "nvfp4": ("weight_packed", "weight_scale", "weight_global_scale")}
"""The checkpoint tensors each format's ops take, in order."""


def packed_linear(fmt_name: str, in_features: int, x: torch.Tensor, bias: torch.Tensor | None,
                  *tensors: torch.Tensor) -> torch.Tensor:
    """``x W^T + b`` through the format's op (fused kernels for decode-sized inputs on a GPU).
    ``tensors`` are the checkpoint's, in ``TENSOR_NAMES`` order."""
    if fmt_name == "int4":
        y = int4_linear(x, tensors[0], tensors[1], in_features)
    elif fmt_name == "fp8":
        y = fp_linear(x, tensors[0], tensors[1], None, "fp8", in_features)
    else:
        y = fp_linear(x, tensors[0], tensors[1], tensors[2], "nvfp4", in_features)
    return y if bias is None else y + bias


def inference_linear(fmt_name: str, in_features: int, x: torch.Tensor, bias: torch.Tensor | None,
                     *tensors: torch.Tensor) -> torch.Tensor:
    """``packed_linear``, or in an engine forward that dequantized this weight ahead
    (``models.dequant_ahead``), cuBLAS on that dense weight. The lookup reads a context variable,
    so a forward with grad on (what ``torch.compile`` traces) stops before it."""
    dense = None if torch.is_grad_enabled() else dense_for(tensors[0], x.dtype)
    if dense is not None:
        y = F.linear(x, dense)
        return y if bias is None else y + bias
    return packed_linear(fmt_name, in_features, x, bias, *tensors)


def _with_global(tensors: tuple[torch.Tensor, ...]) -> tuple:
    """(weight, scale, global scale or None) from a format's tensors in ``TENSOR_NAMES`` order."""
    return tensors[0], tensors[1], tensors[2] if len(tensors) > 2 else None


def dequantize(fmt_name: str, in_features: int, dtype: torch.dtype, *tensors: torch.Tensor) -> torch.Tensor:
    return dense_weight(fmt_name, *_with_global(tensors), in_features, dtype)


class _PackedLinear(torch.autograd.Function):
    """``y = x W^T + b`` with ``W`` dequantized in forward and again in backward.

    Autograd would otherwise keep every layer's dequantized ``[out, in]`` weight alive until the
    backward pass, so a packed base would cost as much training memory as a bf16 one. Nothing
    dequantized is saved here; the base is frozen, so only ``dX = dY W`` is computed, by the
    packed GEMM on a GPU (``orbit::packed_input_grad``). It takes
    tensors and constants only (not the module), so one ``torch.compile`` graph serves every layer.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, bias: torch.Tensor | None, fmt_name: str, in_features: int,
                *tensors: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(*tensors)
        ctx.fmt_name, ctx.in_features = fmt_name, in_features
        return packed_linear(fmt_name, in_features, x, bias, *tensors)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        tensors = ctx.saved_tensors  # once: under activation checkpointing a second unpack is an error
        grad_in = packed_input_grad(grad_out, *_with_global(tensors), ctx.fmt_name, ctx.in_features)
        return (grad_in, None, None, None) + (None,) * len(tensors)


class QuantLinear(nn.Module):
    """Holds the checkpoint's compressed tensors as buffers (never parameters: the base is frozen).

    ``forward`` dequantizes to the activation dtype with the plain-torch references; the GPU issue
    swaps in fused Triton kernels behind the same module.
    """

    def __init__(self, fmt_name: str, in_features: int, out_features: int, tensors: dict[str, torch.Tensor],
                 bias: torch.Tensor | None = None, compute_dtype: torch.dtype = torch.float32):
        super().__init__()
        self.fmt_name, self.in_features, self.out_features = fmt_name, in_features, out_features
        self.compute_dtype = compute_dtype
        for name, tensor in tensors.items():
            if name != "weight_shape":
                self.register_buffer(name, tensor)
        self.bias = nn.Parameter(bias, requires_grad=False) if bias is not None else None

    @property
    def tensor_names(self) -> tuple[str, ...]:
        return TENSOR_NAMES[self.fmt_name]

    def _tensors(self) -> tuple[torch.Tensor, ...]:
        return tuple(getattr(self, name) for name in self.tensor_names)

    def dequantized(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        return dequantize(self.fmt_name, self.in_features, dtype or self.compute_dtype, *self._tensors())

    @property
    def device(self) -> torch.device:
        return next(self.buffers()).device

    def packed_linear(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """``x W^T + b`` through the format's kernel (fused for decode-sized inputs)."""
        return inference_linear(self.fmt_name, self.in_features, x, bias, *self._tensors())

    def linear_with(self, tensors: tuple) -> Callable[[torch.Tensor], torch.Tensor]:
        """``x -> x W^T + b`` in this linear's format for other tensors of it (``tensor_names``
        order, then the bias or None): a fused group's (``models.projections``)."""
        fmt_name, in_features, bias = self.fmt_name, self.in_features, tensors[-1]
        return lambda x: inference_linear(fmt_name, in_features, x, None if bias is None else bias.to(x.dtype),
                                          *tensors[:-1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        if torch.is_grad_enabled() and x.requires_grad:
            return _PackedLinear.apply(x, bias, self.fmt_name, self.in_features, *self._tensors())
        return self.packed_linear(x, bias)

    def extra_repr(self) -> str:
        return f"{self.fmt_name}, in_features={self.in_features}, out_features={self.out_features}"


def fake_quantize(weight: torch.Tensor, fmt) -> torch.Tensor:
    """Quantize-dequantize ``weight`` in ``fmt`` with a straight-through gradient (QAT)."""
    from orbit_core.quant.quantize import quantize_weight
    from compressed_tensors.compressors import BaseCompressor

    with torch.no_grad():
        compressed = quantize_weight(weight.detach(), fmt, "fake-quant")
        restored = BaseCompressor.get_value_from_registry(fmt.storage).decompress(compressed, fmt.scheme)["weight"]
    return weight + (restored.to(weight.dtype) - weight).detach()
