"""Load and save HF safetensors checkpoints (single file or sharded with an index) and tokenizers."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from orbit_core.errors import OrbitError, require_path
from orbit_core.models.config import DecoderConfig
from orbit_core.models.transformer import DecoderLM

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def read_hf_config(path: str) -> dict[str, Any]:
    require_path(path, "model checkpoint directory", is_dir=True)
    config_file = os.path.join(path, "config.json")
    require_path(config_file, "checkpoint config.json")
    try:
        return json.loads(Path(config_file).read_text())
    except json.JSONDecodeError as err:
        raise OrbitError(f"{config_file} is not valid JSON ({err.msg} at line {err.lineno})", "restore the file from the source checkpoint") from err


def weight_files(path: str) -> list[str]:
    """The safetensors files of a checkpoint, from its index when sharded."""
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
        try:
            weight_map = json.loads(Path(index).read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as err:
            raise OrbitError(f"{index} is corrupted (no weight_map)", "restore the index from the source checkpoint") from err
        files = sorted(set(weight_map.values()))
        for name in files:
            require_path(os.path.join(path, name), f"shard listed in {index}")
        return [os.path.join(path, name) for name in files]
    single = os.path.join(path, "model.safetensors")
    if os.path.isfile(single):
        return [single]
    raise OrbitError(f"no model.safetensors or model.safetensors.index.json in {path}", "point model.path at a HF safetensors checkpoint")


def iter_tensors(files: list[str]):
    """Yield ``(name, tensor)`` one at a time, so memory holds one tensor beyond the model."""
    for file in files:
        try:
            with safe_open(file, framework="pt") as handle:
                for name in handle.keys():
                    yield name, handle.get_tensor(name)
        except OrbitError:
            raise
        except Exception as err:  # safetensors raises its own error types for truncated headers/data
            raise OrbitError(f"{file} is corrupted or truncated ({err})", "re-download or re-save the checkpoint") from err


def load_model(path: str, dtype: str = "float32", device: str | torch.device = "cpu") -> DecoderLM:
    """Build the native model from a HF checkpoint directory and load its weights by name.

    A compressed-tensors checkpoint keeps its quantized linears packed (``QuantLinear``).
    """
    hf = read_hf_config(path)
    config = DecoderConfig.from_hf(hf, source=os.path.join(path, "config.json"))
    if hf.get("quantization_config"):
        from orbit_core.quant.load import load_quantized_model

        return load_quantized_model(path, hf, config, dtype, device)
    with torch.device("meta"):
        model = DecoderLM(config)
    expected = dict(model.state_dict())
    if config.tie_word_embeddings:
        expected.pop("lm_head.weight", None)
    loaded: dict[str, torch.Tensor] = {}
    for name, tensor in iter_tensors(weight_files(path)):
        if name == "lm_head.weight" and config.tie_word_embeddings:
            continue
        if name not in expected:
            if name.endswith("rotary_emb.inv_freq"):
                continue
            raise OrbitError(f"{path}: unexpected tensor {name!r} for model_type={config.model_type}", "the checkpoint does not match its config.json")
        if tuple(tensor.shape) != tuple(expected[name].shape):
            raise OrbitError(
                f"{path}: tensor {name} has shape {tuple(tensor.shape)}, config.json implies {tuple(expected[name].shape)}",
                "the checkpoint does not match its config.json",
            )
        loaded[name] = tensor.to(device=device, dtype=DTYPES[dtype])
    missing = sorted(set(expected) - set(loaded))
    if missing:
        raise OrbitError(f"{path}: missing {len(missing)} tensors, first {missing[0]!r}", "the checkpoint is incomplete; re-save it")
    model.load_state_dict(loaded, strict=False, assign=True)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.rope_cos, model.rope_sin = torch.empty(0, device=device), torch.empty(0, device=device)
    model.requires_grad_(False)
    return model.eval()


class ShardWriter:
    """Fills safetensors shards up to ``max_shard_bytes`` and writes the index at the end."""

    def __init__(self, directory: Path, max_shard_bytes: int):
        self.directory, self.max_bytes = directory, max_shard_bytes
        self.current: dict[str, torch.Tensor] = {}
        self.current_bytes = 0
        self.files: list[dict[str, torch.Tensor]] = []
        self.weight_map: dict[str, int] = {}
        self.total = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        if self.current and self.current_bytes + size > self.max_bytes:
            self._flush()
        self.current[name] = tensor.contiguous()
        self.current_bytes += size
        self.total += size

    def _flush(self) -> None:
        index = len(self.files)
        save_file(self.current, str(self.directory / f"shard-{index:05d}.tmp"), metadata={"format": "pt"})
        self.weight_map.update({name: index for name in self.current})
        self.files.append({})
        self.current, self.current_bytes = {}, 0

    def close(self) -> None:
        if self.current or not self.files:
            self._flush()
        count = len(self.files)
        names = [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]
        if count == 1:
            names = ["model.safetensors"]
        for i, name in enumerate(names):
            os.rename(self.directory / f"shard-{i:05d}.tmp", self.directory / name)
        if count > 1:
            index = {"metadata": {"total_size": self.total}, "weight_map": {k: names[v] for k, v in self.weight_map.items()}}
            (self.directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def save_model(model: DecoderLM, path: str, hf_config: dict[str, Any], max_shard_bytes: int = 2 << 30) -> None:
    """Write ``config.json`` + safetensors (sharded with an index past ``max_shard_bytes``)."""
    os.makedirs(path, exist_ok=True)
    Path(path, "config.json").write_text(json.dumps(hf_config, indent=2))
    writer = ShardWriter(Path(path), max_shard_bytes)
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight" and model.config.tie_word_embeddings:
            continue
        writer.add(name, tensor.detach().cpu())
    writer.close()


def load_tokenizer(path: str):
    """The checkpoint's tokenizer through transformers (offline)."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path, local_files_only=True)
    except Exception as err:
        raise OrbitError(f"cannot load a tokenizer from {path} ({type(err).__name__})", "the checkpoint needs tokenizer.json / tokenizer_config.json") from err
