"""``orbit quantize``: stream a HF checkpoint into a compressed-tensors checkpoint.

One source tensor is in memory at a time plus the shard being filled, so a model larger than
RAM can be converted. Output goes to a temp dir renamed into place at the end: an interrupted
run never leaves an OUT that looks complete.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from orbit_core.atomic import atomic_output_dir
from orbit_core.errors import OrbitError
from orbit_core.models.checkpoint import DTYPE_BYTES, iter_tensors, read_hf_config, tensor_specs, weight_files, write_shards
from orbit_core.models.config import DecoderConfig
from orbit_core.models.transformer import DecoderLM
from orbit_core.quant.formats import DEFAULT_IGNORE, WeightFormat, is_ignored, packed_nbytes, weight_format

COPY_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json",
              "vocab.json", "merges.txt", "tokenizer.model", "chat_template.jinja")


def linear_names(hf_config: dict) -> dict[str, tuple[int, int]]:
    """Every nn.Linear of the architecture -> (out, in), from a weightless model."""
    with torch.device("meta"):
        model = DecoderLM(DecoderConfig.from_hf(hf_config))
    return {n: (m.out_features, m.in_features) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}


def _reduce_blocks(weight: torch.Tensor, rows: int, cols: int) -> tuple[torch.Tensor, torch.Tensor]:
    """min / max per ``[rows, cols]`` tile, zero-padding ragged edges (0 is always representable)."""
    out_f, in_f = weight.shape
    padded = F.pad(weight, (0, -in_f % cols, 0, -out_f % rows))
    tiles = padded.view(padded.shape[0] // rows, rows, padded.shape[1] // cols, cols)
    return tiles.amin(dim=(1, 3)), tiles.amax(dim=(1, 3))


def quantize_weight(weight: torch.Tensor, fmt: WeightFormat, name: str) -> dict[str, torch.Tensor]:
    """One ``[out, in]`` weight -> the compressed-tensors tensors of its module (local names)."""
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization.utils.helpers import calculate_qparams, generate_gparam

    weight = weight.float()
    out_f, in_f = weight.shape
    args = fmt.args
    state: dict[str, torch.Tensor] = {"weight": weight}
    if fmt.block is not None:
        mins, maxs = _reduce_blocks(weight, *fmt.block)
        scale, zero = calculate_qparams(mins, maxs, args)
    else:
        group = fmt.group_size
        if in_f % group:
            raise OrbitError(f"group size {group} does not divide {name} (in_features={in_f})",
                             "choose a group size that divides every quantized layer, or ignore that layer")
        grouped = weight.view(out_f, in_f // group, group)
        global_scale = None
        if fmt.name == "nvfp4":
            global_scale = generate_gparam(weight.min(), weight.max())
            state["weight_global_scale"] = global_scale
        scale, zero = calculate_qparams(grouped.amin(-1), grouped.amax(-1), args, global_scale=global_scale)
    state.update(weight_scale=scale, weight_zero_point=zero)
    return BaseCompressor.get_value_from_registry(fmt.storage).compress(state, fmt.scheme)


def quantize_checkpoint(
    source: str, out: str, fmt_name: str, group_size: int = 128, ignore: list[str] | None = None,
    max_shard_bytes: int = 2 << 30, on_tensor: Callable[[int, int, str], None] | None = None,
    device: str | None = None,
) -> Path:
    """``device`` (e.g. ``cuda``) computes the scales there; the stream still holds one tensor at a time."""
    if fmt_name == "int4" and group_size <= 0:
        raise OrbitError(f"--group-size must be a positive number of input columns, got {group_size}", "use e.g. 128 or 32")
    fmt = weight_format(fmt_name, group_size if fmt_name == "int4" else None)
    hf = read_hf_config(source)
    if hf.get("quantization_config"):
        raise OrbitError(f"{source} is already quantized", "quantize the original bf16/fp32 checkpoint")
    files = weight_files(source)
    if Path(out).exists() and (not Path(out).is_dir() or any(Path(out).iterdir())):
        raise OrbitError(f"output {out} exists and is not an empty directory", "choose a new directory")
    linears = linear_names(hf)
    patterns = list(DEFAULT_IGNORE if ignore is None else ignore)
    quantized = [n for n in linears if not is_ignored(n, patterns)]
    skipped = sorted(n for n in linears if n not in quantized)
    group = fmt.group_size if fmt.block is None else None
    for name in quantized:  # fail before writing anything
        if group and linears[name][1] % group:
            raise OrbitError(f"group size {group} does not divide {name} (in_features={linears[name][1]})",
                             "choose a group size that divides every quantized layer, or --ignore that layer")
    return write_quantized(out, hf, tensor_specs(files), iter_tensors(files), fmt, quantized, skipped, max_shard_bytes,
                           on_tensor, device, source)


def write_quantized(out: str, hf: dict, specs: dict[str, tuple[tuple[int, ...], str]], tensors, fmt: WeightFormat,
                    quantized: list[str], skipped: list[str], max_shard_bytes: int = 2 << 30,
                    on_tensor: Callable[[int, int, str], None] | None = None, device: str | None = None,
                    source: str | None = None) -> Path:
    """Write ``tensors`` (name, tensor) as a compressed-tensors checkpoint, one tensor in memory at a
    time: the linears in ``quantized`` packed, everything else bf16. ``specs`` promises each name's
    shape and dtype up front (the shard plan)."""
    sizes: dict[str, int] = {}
    for name, (shape, dtype) in specs.items():
        module = name[: -len(".weight")] if name.endswith(".weight") else None
        if module in quantized:
            sizes.update({f"{module}.{local}": nbytes for local, nbytes in packed_nbytes(fmt, *shape).items()})
        else:
            per_element = 2 if dtype in ("F64", "F32", "F16", "BF16") else DTYPE_BYTES[dtype]
            sizes[name] = per_element * math.prod(shape)

    def converted():
        for i, (name, tensor) in enumerate(tensors):
            module = name[: -len(".weight")] if name.endswith(".weight") else None
            if module in quantized:
                work = tensor.to(device) if device is not None else tensor
                for local, value in quantize_weight(work, fmt, module).items():
                    yield f"{module}.{local}", value.cpu()
            else:
                yield name, tensor.to(torch.bfloat16) if tensor.is_floating_point() else tensor
            if on_tensor is not None:
                on_tensor(i + 1, len(specs), name)

    with atomic_output_dir(out) as tmp:
        write_shards(tmp, sizes, converted(), max_shard_bytes)
        from compressed_tensors.quantization import QuantizationConfig

        qconfig = QuantizationConfig(config_groups={"group_0": fmt.scheme}, format=fmt.storage, ignore=skipped,
                                     quantization_status="compressed")
        hf_out = {**hf, "torch_dtype": "bfloat16", "quantization_config": qconfig.model_dump(mode="json", exclude_none=True)}
        (tmp / "config.json").write_text(json.dumps(hf_out, indent=2))
        for extra in COPY_FILES if source else ():
            if os.path.isfile(os.path.join(source, extra)):
                shutil.copy2(os.path.join(source, extra), tmp / extra)
    return Path(out)

