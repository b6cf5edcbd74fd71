"""Load and save HF safetensors checkpoints (single file or sharded with an index) and tokenizers."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterable

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from orbit_core.errors import OrbitError, require_path
from orbit_core.models.config import DecoderConfig
from orbit_core.models.transformer import DecoderLM

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")
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
    """Build the native model from a dense HF checkpoint directory and load its weights by name.

    Quantized checkpoints go through ``orbit_core.policy.load.load_base``, which dispatches on format.
    """
    hf = read_hf_config(path)
    config = DecoderConfig.from_hf(hf, source=os.path.join(path, "config.json"))
    if hf.get("quantization_config"):
        raise OrbitError(f"{path} is a quantized checkpoint", "load it with orbit_core.policy.load_base")
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


DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
               "F8_E4M3": 1, "F8_E5M2": 1}


def tensor_specs(files: list[str]) -> dict[str, tuple[tuple[int, ...], str]]:
    """``name -> (shape, safetensors dtype)`` from the files' headers (reads no data)."""
    specs = {}
    for file in files:
        try:
            with safe_open(file, framework="pt") as handle:
                for name in handle.keys():
                    view = handle.get_slice(name)
                    specs[name] = (tuple(view.get_shape()), view.get_dtype())
        except Exception as err:  # safetensors raises its own error types for truncated headers
            raise OrbitError(f"{file} is corrupted or truncated ({err})", "re-download or re-save the checkpoint") from err
    return specs


def write_shards(directory: Path, sizes: dict[str, int], tensors: Iterable[tuple[str, torch.Tensor]],
                 max_shard_bytes: int) -> None:
    """Write streamed tensors as HF safetensors shards (plus the index when there are several).

    huggingface_hub plans the shards from ``sizes`` (bytes per tensor name, in the order they will
    arrive); a shard file is written as soon as all its tensors have arrived, so memory holds about
    one shard, never the whole model.
    """
    from huggingface_hub import split_state_dict_into_shards_factory

    plan = split_state_dict_into_shards_factory(sizes, get_storage_size=lambda size: size, max_shard_size=max_shard_bytes,
                                                filename_pattern="model{suffix}.safetensors")
    pending: dict[str, dict[str, torch.Tensor]] = {}
    for name, tensor in tensors:
        if name not in plan.tensor_to_filename:
            raise ValueError(f"tensor {name!r} was not planned")
        file = plan.tensor_to_filename[name]
        pending.setdefault(file, {})[name] = tensor.contiguous()
        if len(pending[file]) == len(plan.filename_to_tensors[file]):
            save_file(pending.pop(file), str(directory / file), metadata={"format": "pt"})
    if pending:
        raise ValueError(f"tensors never arrived for {sorted(pending)}")
    if plan.is_sharded:
        index = {"metadata": {**plan.metadata, "total_size": sum(sizes.values())}, "weight_map": plan.tensor_to_filename}
        (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def save_model(model: DecoderLM, path: str, hf_config: dict[str, Any], max_shard_bytes: int = 2 << 30) -> None:
    """Write ``config.json`` + safetensors (sharded with an index past ``max_shard_bytes``)."""
    os.makedirs(path, exist_ok=True)
    Path(path, "config.json").write_text(json.dumps(hf_config, indent=2))
    state = {name: tensor.detach().cpu() for name, tensor in model.state_dict().items()
             if not (name == "lm_head.weight" and model.config.tie_word_embeddings)}
    write_shards(Path(path), {name: t.numel() * t.element_size() for name, t in state.items()}, state.items(),
                 max_shard_bytes)


def load_tokenizer(path: str):
    """The checkpoint's tokenizer through transformers (offline)."""
    from transformers import AutoTokenizer

    # without its files, transformers builds an empty tokenizer from config.json instead of failing
    if not any(os.path.isfile(os.path.join(path, name)) for name in TOKENIZER_FILES):
        raise OrbitError(f"cannot load a tokenizer from {path}: none of {', '.join(TOKENIZER_FILES)} is there",
                         "copy the tokenizer files of the model into the checkpoint directory")
    try:
        return AutoTokenizer.from_pretrained(path, local_files_only=True)
    except Exception as err:
        raise OrbitError(f"cannot load a tokenizer from {path} ({type(err).__name__})", "the checkpoint needs tokenizer.json / tokenizer_config.json") from err
