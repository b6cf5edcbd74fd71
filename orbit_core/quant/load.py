"""Load a compressed-tensors checkpoint into the native model with its linears kept packed."""

from __future__ import annotations

import os

import torch
from torch import nn

from orbit_core.errors import OrbitError
from orbit_core.models.checkpoint import DTYPES, iter_tensors, weight_files
from orbit_core.models.config import DecoderConfig
from orbit_core.models.transformer import DecoderLM
from orbit_core.quant.formats import format_from_config
from orbit_core.quant.experts import attach_expert_banks
from orbit_core.quant.linear import QuantLinear

LOCAL_NAMES = ("weight", "weight_packed", "weight_scale", "weight_global_scale", "weight_shape", "weight_zero_point")


def _expected_shapes(fmt, out_f: int, in_f: int) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """What the quantization config promises for one linear (shape, dtype per tensor)."""
    if fmt.name == "int4":
        group = fmt.group_size
        return {"weight_packed": ((out_f, -(-in_f * 4 // 32)), torch.int32),
                "weight_scale": ((out_f, in_f // group), None), "weight_shape": ((2,), None)}
    if fmt.name == "fp8":
        rows, cols = fmt.block
        return {"weight": ((out_f, in_f), torch.float8_e4m3fn), "weight_scale": ((-(-out_f // rows), -(-in_f // cols)), None)}
    return {"weight_packed": ((out_f, in_f // 2), torch.uint8), "weight_scale": ((out_f, in_f // 16), torch.float8_e4m3fn),
            "weight_global_scale": ((1,), None)}


def load_quantized_model(path: str, hf: dict, config: DecoderConfig, dtype: str, device) -> DecoderLM:
    source = os.path.join(path, "config.json")
    fmt, ignored = format_from_config(hf["quantization_config"], source)
    with torch.device("meta"):
        model = DecoderLM(config)
    linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    quantized = {n for n in linears if n not in ignored}
    if fmt.name == "int4":
        for name in sorted(quantized):
            if linears[name].in_features % fmt.group_size:
                raise OrbitError(f"{source}: group size {fmt.group_size} does not divide {name} (in_features={linears[name].in_features})",
                                 "the checkpoint is inconsistent; re-quantize it")
    packed: dict[str, dict[str, torch.Tensor]] = {n: {} for n in quantized}
    dense: dict[str, torch.Tensor] = {}
    for name, tensor in iter_tensors(weight_files(path)):
        module, _, local = name.rpartition(".")
        if module in quantized and local in LOCAL_NAMES:
            packed[module][local] = tensor
        elif module in quantized and local == "bias":
            packed[module]["bias"] = tensor
        else:
            dense[name] = tensor
    compute = DTYPES[dtype]
    for name in sorted(quantized):
        tensors = packed[name]
        linear = linears[name]
        for local, (shape, want_dtype) in _expected_shapes(fmt, linear.out_features, linear.in_features).items():
            if local not in tensors:
                raise OrbitError(f"{path}: {name}.{local} is missing ({fmt.name} promises it)", "the checkpoint is incomplete; re-quantize it")
            got = tensors[local]
            if tuple(got.shape) != shape or (want_dtype is not None and got.dtype != want_dtype):
                raise OrbitError(f"{path}: {name}.{local} is {tuple(got.shape)} {got.dtype}, {fmt.name} needs {shape} {want_dtype or ''}".rstrip(),
                                 "the checkpoint does not match its quantization_config")
        bias = tensors.pop("bias", None)
        q = QuantLinear(fmt.name, linear.in_features, linear.out_features,
                        {k: v.to(device) for k, v in tensors.items()},
                        None if bias is None else bias.to(device=device, dtype=compute), compute)
        parent, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent), leaf, q)
    expected = {k: v for k, v in model.state_dict().items() if not any(k.startswith(n + ".") for n in quantized)}
    if config.tie_word_embeddings:
        expected.pop("lm_head.weight", None)
        dense.pop("lm_head.weight", None)
    missing = sorted(set(expected) - set(dense))
    if missing:
        raise OrbitError(f"{path}: missing {len(missing)} tensors, first {missing[0]!r}", "the checkpoint is incomplete")
    loaded = {}
    for name, tensor in dense.items():
        if name not in expected:
            raise OrbitError(f"{path}: unexpected tensor {name!r}", "the checkpoint does not match its config.json")
        if tuple(tensor.shape) != tuple(expected[name].shape):
            raise OrbitError(f"{path}: tensor {name} has shape {tuple(tensor.shape)}, expected {tuple(expected[name].shape)}",
                             "the checkpoint does not match its config.json")
        loaded[name] = tensor.to(device=device, dtype=compute)
    model.load_state_dict(loaded, strict=False, assign=True)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.rope_cos, model.rope_sin = torch.empty(0, device=device), torch.empty(0, device=device)
    model.requires_grad_(False)
    model.quant_format = fmt
    attach_expert_banks(model)  # MoE: chunks of int4 experts dequantize in one call (on this device)
    return model.eval()
