"""The policy every command works with: the frozen base (dense or packed) with the adapter on top."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from orbit_core.config.schema import ModelSection, PeftSection
from orbit_core.data.embedded import is_embedded
from orbit_core.errors import OrbitError
from orbit_core.models.checkpoint import load_tokenizer, read_hf_config
from orbit_core.models.config import DecoderConfig
from orbit_core.models.transformer import DecoderLM
from orbit_core.peft.lora import apply_lora
from orbit_core.peft.oft import apply_oft
from orbit_core.peft.value_head import attach_value_head
from orbit_core.policy.embedded import embedded_spec_config, resolve_model_path
from orbit_core.policy.load import load_base


def check_device(spec: str, field: str) -> torch.device:
    """``spec`` (not ``auto``) as a device this process can use; one line naming ``field`` if not."""
    try:
        device = torch.device(spec)
    except RuntimeError:
        raise OrbitError(f"{field}={spec} is not a device", f"use {field}=auto, cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise OrbitError(f"{field}={spec}: Orbit runs on cpu or cuda devices", f"use {field}=auto, cpu, cuda or cuda:N")
    if device.type == "cpu":
        return device
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count == 0:
        raise OrbitError(f"{field}={spec} but no CUDA device is visible", f"use {field}=auto or cpu")
    if device.index is not None and device.index >= count:
        raise OrbitError(f"{field}={spec} but only cuda:0 to cuda:{count - 1} are visible" if count > 1 else
                         f"{field}={spec} but only cuda:0 is visible", f"use {field}=auto or a visible cuda:N")
    return device


def pick_device(spec: str) -> torch.device:
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return check_device(spec, "model.device")


@dataclass
class PolicyModel:
    model: DecoderLM
    tokenizer: object
    base_path: str
    adapter_targets: list[str]
    device: torch.device


def apply_adapter(model: DecoderLM, peft_cfg: PeftSection) -> list[str]:
    if peft_cfg.method == "oft":
        return apply_oft(model, peft_cfg.oft_block_size, peft_cfg.oft_coft, peft_cfg.oft_eps, peft_cfg.oft_block_share,
                         peft_cfg.target_modules)
    return apply_lora(model, peft_cfg.rank, peft_cfg.alpha, peft_cfg.dropout, peft_cfg.target_modules)


def check_adapter_fits(model_cfg: ModelSection, peft_cfg: PeftSection) -> None:
    """Apply the adapter to a weightless (meta) copy: shape errors surface before anything loads."""
    hf = embedded_spec_config(model_cfg.path) if is_embedded(model_cfg.path) else read_hf_config(model_cfg.path)
    hf = {k: v for k, v in hf.items() if k != "quantization_config"}
    with torch.device("meta"):
        apply_adapter(DecoderLM(DecoderConfig.from_hf(hf)), peft_cfg)


def enable_fake_qat(model: DecoderLM) -> None:
    """Point every adapter layer at the base's own quantization format (straight-through QAT)."""
    from functools import partial

    from orbit_core.peft.base import adapter_modules
    from orbit_core.quant.linear import fake_quantize

    fmt = getattr(model, "quant_format", None)
    if fmt is None:
        raise OrbitError("quant.fake_qat=true needs a quantized base checkpoint", "point model.path at an orbit quantize output")
    for _, module in adapter_modules(model):
        if getattr(module.base, "dequantized", None) is not None:
            module.fake_quant = partial(fake_quantize, fmt=fmt)


def build_policy(model_cfg: ModelSection, peft_cfg: PeftSection | None, log: Callable[[str], None] = print,
                 value_head: bool = False, fake_qat: bool = False) -> PolicyModel:
    """Frozen base from a checkpoint (or the embedded one) with the adapter on top when ``peft_cfg`` is given."""
    device = pick_device(model_cfg.device)
    path = resolve_model_path(model_cfg.path, model_cfg.warmstart_steps, log)
    model = load_base(path, model_cfg.dtype, device)
    tokenizer = load_tokenizer(path)
    targets: list[str] = []
    if peft_cfg is not None:
        targets = apply_adapter(model, peft_cfg)
        if value_head:
            attach_value_head(model, model.config.hidden_size)
        if fake_qat:
            enable_fake_qat(model)
        model.to(device)
    return PolicyModel(model, tokenizer, path, targets, device)


def load_teacher(spec: str, dtype: str, device: torch.device, vocab_size: int, log: Callable[[str], None] = print) -> DecoderLM:
    path = resolve_model_path(spec, 0, log)
    teacher = load_base(path, dtype, device)
    if teacher.config.vocab_size != vocab_size:
        raise OrbitError(f"teacher {path} has vocab_size {teacher.config.vocab_size}, the student {vocab_size}",
                         "on-policy distillation needs a teacher with the student's tokenizer")
    return teacher
