"""Checkpoint parity: the quantized checkpoint holds what its config promises, within error bounds."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from orbit_core.errors import OrbitError
from orbit_core.models.checkpoint import iter_tensors, weight_files
from orbit_core.policy.load import load_base
from orbit_core.quant.linear import QuantLinear


@dataclass
class Check:
    name: str
    passed: bool
    detail: str


@dataclass
class CheckpointReport:
    fmt: str
    checks: list[Check] = field(default_factory=list)
    max_error_ratio: float = 0.0

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.checks)


def error_bound(fmt: str, module: QuantLinear, source: torch.Tensor) -> torch.Tensor:
    """Largest |w - dequant(w)| the format allows, per element ``[out, in]``.

    int4: half a step, ``scale / 2``. fp8 e4m3: 3 mantissa bits, ``2^-4 |w|``, plus the subnormal
    floor ``2^-9 scale``. nvfp4: e2m1's widest half-step (1.0) times the group scale, plus the
    e4m3 rounding of that scale (``2^-4 |w|``).
    """
    out_f, in_f = source.shape
    if fmt == "int4":
        group = in_f // module.weight_scale.shape[1]
        return (module.weight_scale.float() / 2).repeat_interleave(group, 1) + 1e-7
    if fmt == "fp8":
        s = module.weight_scale.float()
        rows, cols = -(-out_f // s.shape[0]), -(-in_f // s.shape[1])
        full = s.repeat_interleave(rows, 0)[:out_f].repeat_interleave(cols, 1)[:, :in_f]
        return source.abs() * 2**-4 + full * 2**-9 + 1e-7
    local = module.weight_scale.float() / module.weight_global_scale.float()
    group = in_f // local.shape[1]
    return local.repeat_interleave(group, 1) * 1.0 + source.abs() * 2**-4 + 1e-7


def check_checkpoint(path: str, source: str | None = None) -> CheckpointReport:
    """Load through the trainer's own path (shape/dtype/group checks), then scales, then error bounds."""
    try:
        model = load_base(path, "float32")
    except OrbitError as err:
        report = CheckpointReport(fmt="?")
        report.checks.append(Check("tensors promised by quantization_config", False, str(err)))
        return report
    fmt = getattr(model, "quant_format", None)
    report = CheckpointReport(fmt=fmt.name if fmt else "bf16")
    quantized = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    report.checks.append(Check("tensors promised by quantization_config", True, f"{len(quantized)} quantized linears, shapes and dtypes match"))
    bad_scales = [n for n, m in quantized.items() if not (torch.isfinite(m.weight_scale.float()).all() and (m.weight_scale.float() > 0).all())]
    bad_scales += [n for n, m in quantized.items() if hasattr(m, "weight_global_scale") and not
                   (torch.isfinite(m.weight_global_scale).all() and (m.weight_global_scale > 0).all())]
    report.checks.append(Check("scales finite and positive", not bad_scales,
                               f"bad in {', '.join(sorted(set(bad_scales))[:3])}" if bad_scales else "all scales ok"))
    if source and quantized:
        worst_name, worst = "", 0.0
        for name, tensor in iter_tensors(weight_files(source)):
            module = name[: -len(".weight")]
            if module not in quantized:
                continue
            q = quantized[module]
            error = (q.dequantized(torch.float32) - tensor.float()).abs()
            ratio = float((error / error_bound(report.fmt, q, tensor.float())).max())
            if ratio > worst:
                worst_name, worst = module, ratio
        report.max_error_ratio = worst
        ok = worst <= 1.0001 and math.isfinite(worst)  # float slack at exact half-steps
        report.checks.append(Check("dequantized weights within the format's error bound", ok,
                                   f"worst {worst_name}: {worst:.2f} x bound"))
    return report
