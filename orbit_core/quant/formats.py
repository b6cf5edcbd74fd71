"""The three weight formats, described through the compressed-tensors library itself."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from orbit_core.errors import OrbitError

FORMATS = ("int4", "fp8", "nvfp4")
# compressed-tensors preset (weights only) and on-disk format per Orbit format name
_PRESETS = {"int4": ("W4A16", "pack-quantized"), "fp8": ("FP8_BLOCK", "float-quantized"),
            "nvfp4": ("NVFP4A16", "nvfp4-pack-quantized")}
DEFAULT_IGNORE = ("embed_tokens", "lm_head", "norm", "mlp.gate", "router", "shared_expert_gate")


def require_compressed_tensors() -> None:
    try:
        import compressed_tensors  # noqa: F401
    except ImportError as err:
        raise OrbitError(f"compressed-tensors is not importable ({err}); quantized checkpoints need it",
                         "pip install 'orbit-rl[quant]'") from err


@dataclass(frozen=True)
class WeightFormat:
    name: str
    scheme: object  # compressed_tensors QuantizationScheme
    storage: str  # compressed-tensors format string

    @property
    def args(self):
        return self.scheme.weights

    @property
    def group_size(self) -> int | None:
        return self.args.group_size

    @property
    def block(self) -> tuple[int, int] | None:
        return tuple(self.args.block_structure) if self.args.block_structure else None


def weight_format(name: str, group_size: int | None = None) -> WeightFormat:
    """int4 (W4A16 symmetric group-wise), fp8 (e4m3, 128x128 blocks) or nvfp4 (e2m1, e4m3 per 16, global)."""
    require_compressed_tensors()
    from compressed_tensors.quantization import QuantizationScheme, preset_name_to_scheme

    if name not in _PRESETS:
        raise OrbitError(f"unknown quantization format {name!r}", f"use one of {', '.join(FORMATS)}")
    preset, storage = _PRESETS[name]
    weights = preset_name_to_scheme(preset, ["Linear"]).weights
    if name == "int4" and group_size is not None:
        weights = weights.model_copy(update={"group_size": group_size})
    # weights only: the base is served as W4A16 / W8A16 / W4A16, activations stay bf16
    return WeightFormat(name, QuantizationScheme(targets=["Linear"], weights=weights, format=storage), storage)


def format_from_config(quant_config: dict, source: str) -> tuple[WeightFormat, list[str]]:
    """Parse a checkpoint's ``quantization_config`` into (format, ignored module names), or fail clearly."""
    if quant_config.get("quant_method") != "compressed-tensors":
        raise OrbitError(f"{source}: quant_method={quant_config.get('quant_method')!r} is not supported",
                         "Orbit loads compressed-tensors checkpoints (orbit quantize writes them)")
    require_compressed_tensors()
    from compressed_tensors.quantization import QuantizationConfig

    try:
        parsed = QuantizationConfig.model_validate(quant_config)
    except Exception as err:
        raise OrbitError(f"{source}: quantization_config is invalid ({type(err).__name__})", "re-run orbit quantize") from err
    if len(parsed.config_groups) != 1:
        raise OrbitError(f"{source}: {len(parsed.config_groups)} quantization groups", "Orbit supports one weight scheme per model")
    scheme = next(iter(parsed.config_groups.values()))
    storage = scheme.format or parsed.format
    by_storage = {v[1]: k for k, v in _PRESETS.items()}
    name = by_storage.get(storage)
    if name is None or scheme.input_activations is not None:
        raise OrbitError(f"{source}: unsupported compressed-tensors scheme (format={storage})",
                         "supported: pack-quantized int4 W4A16, float-quantized fp8 block, nvfp4-pack-quantized, weights only")
    expected = weight_format(name, scheme.weights.group_size if name == "int4" else None)
    if scheme.weights != expected.args:
        raise OrbitError(f"{source}: {name} weight args differ from what Orbit supports ({scheme.weights})",
                         "re-quantize with orbit quantize")
    return WeightFormat(name, scheme, storage), list(parsed.ignore or [])


def is_ignored(module_name: str, ignore: list[str]) -> bool:
    leaf_path = module_name.split(".")
    return any(pattern == module_name or pattern in leaf_path or module_name.endswith("." + pattern) for pattern in ignore)


def packed_bytes(tensors: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


def packed_nbytes(fmt: WeightFormat, out_features: int, in_features: int) -> dict[str, int]:
    """Bytes of each tensor ``orbit quantize`` writes for one ``[out, in]`` linear (fp32 scales)."""
    if fmt.name == "int4":
        return {"weight_scale": 4 * out_features * (in_features // fmt.group_size),
                "weight_packed": 4 * out_features * -(-in_features // 8), "weight_shape": 16}
    if fmt.name == "fp8":
        rows, cols = fmt.block
        return {"weight_scale": 4 * -(-out_features // rows) * -(-in_features // cols), "weight": out_features * in_features}
    return {"weight_global_scale": 4, "weight_packed": out_features * in_features // 2,
            "weight_scale": out_features * in_features // 16}
