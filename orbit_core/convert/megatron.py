"""HF <-> Megatron torch_dist checkpoints, written and read by megatron-core's dist_checkpointing.

Parameter names are those of megatron-core's GPTModel with the Transformer-Engine layer spec
(what Megatron-Bridge builds, and what ``sharded_state_dict()`` asks for even with the local spec):
input norms fused into ``linear_qkv`` / ``linear_fc1`` as ``layer_norm_weight``, Q/K/V fused per
query group, gate and up stacked in ``linear_fc1``. Per-layer tensors are stored layer-stacked
(``decoder.layers.self_attention.linear_qkv.weight`` is ``[num_layers, ...]``), so
``dist_checkpointing.load(model.sharded_state_dict(), dir)`` reads the checkpoint directly.
Layout: ``OUT/iter_0000000/`` plus ``OUT/latest_checkpointed_iteration.txt``. Tensors keep their
dtype, so HF -> Megatron -> HF is bit-exact.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from unittest import mock

import torch

from orbit_core.atomic import atomic_output_dir
from orbit_core.errors import OrbitError, require_path
from orbit_core.models.checkpoint import iter_tensors, read_hf_config, weight_files
from orbit_core.models.config import DecoderConfig

TRACKER = "latest_checkpointed_iteration.txt"


LAYER_PREFIX = "decoder.layers."
EXTRA_STATE = ("self_attention.linear_qkv", "self_attention.linear_proj", "mlp.linear_fc1", "mlp.linear_fc2")
"""Modules whose ``_extra_state`` a megatron-core GPTModel asks for (empty for the local spec)."""


def _megatron():
    try:
        from megatron.core import dist_checkpointing
        from megatron.core.dist_checkpointing import ShardedTensor
    except ImportError as err:
        raise OrbitError("megatron-core is not installed", "pip install 'orbit-rl[megatron]'") from err
    return dist_checkpointing, ShardedTensor


def sharded_layout(state: dict[str, torch.Tensor], num_layers: int) -> dict:
    """The sharded state dict a megatron-core GPTModel (TP=PP=1) saves and asks for: per-layer tensors
    under one layer-stacked key (``decoder.layers.<param>``, layer axis prepended), and an empty
    ``_extra_state`` object per linear and layer."""
    from megatron.core.dist_checkpointing import ShardedObject, ShardedTensor

    out: dict = {}
    for name, tensor in state.items():
        if name.startswith(LAYER_PREFIX):
            index, rest = name[len(LAYER_PREFIX):].split(".", 1)
            out[name] = ShardedTensor.from_rank_offsets(LAYER_PREFIX + rest, tensor.contiguous(), (0, int(index), num_layers),
                                                        replica_id=0, prepend_axis_num=1)
        else:
            out[name] = ShardedTensor.from_rank_offsets(name, tensor.contiguous(), replica_id=0)
    for index in range(num_layers):
        for module in EXTRA_STATE:
            out[f"{LAYER_PREFIX}{index}.{module}._extra_state"] = ShardedObject(
                f"{LAYER_PREFIX}{module}._extra_state", None, (num_layers,), (index,), replica_id=0)
    return out


def unstack_layers(plain: dict[str, torch.Tensor], num_layers: int) -> dict[str, torch.Tensor]:
    """Layer-stacked tensors back to per-layer names (``decoder.layers.N.<param>``)."""
    out = {}
    for name, value in plain.items():
        if not isinstance(value, torch.Tensor):
            continue
        name = name.removeprefix("model.")
        rest = name[len(LAYER_PREFIX):] if name.startswith(LAYER_PREFIX) else ""
        if rest and not rest.split(".", 1)[0].isdigit():  # stacked: [num_layers, ...]
            if value.shape[0] != num_layers:
                raise OrbitError(f"Megatron tensor {name} stacks {value.shape[0]} layers, the config has {num_layers}",
                                 "pass the HF config of the model this checkpoint was converted from")
            out.update({f"{LAYER_PREFIX}{i}.{rest}": value[i] for i in range(num_layers)})
        else:
            out[name] = value
    return out


@contextlib.contextmanager
def _process_group():
    """dist_checkpointing needs a process group; a one-rank gloo group when none exists."""
    import torch.distributed as dist

    if dist.is_initialized():
        yield
        return
    init_file = tempfile.mktemp(prefix="orbit-pg-")
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()
        with contextlib.suppress(FileNotFoundError):
            os.remove(init_file)


@contextlib.contextmanager
def _cpu_shims():
    # megatron-core's torch_dist writer calls torch.cuda.synchronize() and allocates a status
    # flag on torch.cuda.current_device() unconditionally; on a CPU-only torch both are routed
    # to the CPU (the sync has nothing to wait for). On a GPU machine nothing is patched.
    if torch.cuda.is_available():
        yield
        return
    with mock.patch.object(torch.cuda, "synchronize", lambda *a, **k: None), \
            mock.patch.object(torch.cuda, "current_device", lambda: "cpu"):
        yield


def _qkv_order(c: DecoderConfig, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """[q of group g; k of g; v of g] for each query group g, megatron-core's fused layout."""
    per_group = c.num_heads // c.num_kv_heads
    tail = q.shape[1:]
    q = q.reshape(c.num_kv_heads, per_group * c.head_dim, *tail)
    k = k.reshape(c.num_kv_heads, c.head_dim, *tail)
    v = v.reshape(c.num_kv_heads, c.head_dim, *tail)
    return torch.cat([q, k, v], dim=1).reshape(-1, *tail)


def _qkv_split(c: DecoderConfig, fused: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    per_group = c.num_heads // c.num_kv_heads
    tail = fused.shape[1:]
    grouped = fused.reshape(c.num_kv_heads, (per_group + 2) * c.head_dim, *tail)
    q, k, v = grouped.split([per_group * c.head_dim, c.head_dim, c.head_dim], dim=1)
    return q.reshape(-1, *tail), k.reshape(-1, *tail), v.reshape(-1, *tail)


def hf_to_megatron_state(c: DecoderConfig, hf: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {"embedding.word_embeddings.weight": hf["model.embed_tokens.weight"],
           "decoder.final_layernorm.weight": hf["model.norm.weight"]}
    if not c.tie_word_embeddings:
        out["output_layer.weight"] = hf["lm_head.weight"]
    for i in range(c.num_layers):
        h, m = f"model.layers.{i}.", f"decoder.layers.{i}."
        attn = h + "self_attn."
        out[m + "self_attention.linear_qkv.layer_norm_weight"] = hf[h + "input_layernorm.weight"]
        out[m + "self_attention.linear_qkv.weight"] = _qkv_order(c, hf[attn + "q_proj.weight"], hf[attn + "k_proj.weight"], hf[attn + "v_proj.weight"])
        if attn + "q_proj.bias" in hf:
            out[m + "self_attention.linear_qkv.bias"] = _qkv_order(c, hf[attn + "q_proj.bias"], hf[attn + "k_proj.bias"], hf[attn + "v_proj.bias"])
        out[m + "self_attention.linear_proj.weight"] = hf[attn + "o_proj.weight"]
        if attn + "o_proj.bias" in hf:
            out[m + "self_attention.linear_proj.bias"] = hf[attn + "o_proj.bias"]
        if c.qk_norm:
            out[m + "self_attention.q_layernorm.weight"] = hf[attn + "q_norm.weight"]
            out[m + "self_attention.k_layernorm.weight"] = hf[attn + "k_norm.weight"]
        out[m + "mlp.linear_fc1.layer_norm_weight"] = hf[h + "post_attention_layernorm.weight"]
        out[m + "mlp.linear_fc1.weight"] = torch.cat([hf[h + "mlp.gate_proj.weight"], hf[h + "mlp.up_proj.weight"]], dim=0)
        out[m + "mlp.linear_fc2.weight"] = hf[h + "mlp.down_proj.weight"]
    return out


def megatron_to_hf_state(c: DecoderConfig, mg: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {"model.embed_tokens.weight": mg["embedding.word_embeddings.weight"],
           "model.norm.weight": mg["decoder.final_layernorm.weight"]}
    if not c.tie_word_embeddings:
        out["lm_head.weight"] = mg["output_layer.weight"]
    for i in range(c.num_layers):
        h, m = f"model.layers.{i}.", f"decoder.layers.{i}."
        attn = h + "self_attn."
        out[h + "input_layernorm.weight"] = mg[m + "self_attention.linear_qkv.layer_norm_weight"]
        q, k, v = _qkv_split(c, mg[m + "self_attention.linear_qkv.weight"])
        out.update({attn + "q_proj.weight": q, attn + "k_proj.weight": k, attn + "v_proj.weight": v})
        if m + "self_attention.linear_qkv.bias" in mg:
            q, k, v = _qkv_split(c, mg[m + "self_attention.linear_qkv.bias"])
            out.update({attn + "q_proj.bias": q, attn + "k_proj.bias": k, attn + "v_proj.bias": v})
        out[attn + "o_proj.weight"] = mg[m + "self_attention.linear_proj.weight"]
        if m + "self_attention.linear_proj.bias" in mg:
            out[attn + "o_proj.bias"] = mg[m + "self_attention.linear_proj.bias"]
        if c.qk_norm:
            out[attn + "q_norm.weight"] = mg[m + "self_attention.q_layernorm.weight"]
            out[attn + "k_norm.weight"] = mg[m + "self_attention.k_layernorm.weight"]
        out[h + "post_attention_layernorm.weight"] = mg[m + "mlp.linear_fc1.layer_norm_weight"]
        gate, up = mg[m + "mlp.linear_fc1.weight"].chunk(2, dim=0)
        out.update({h + "mlp.gate_proj.weight": gate, h + "mlp.up_proj.weight": up})
        out[h + "mlp.down_proj.weight"] = mg[m + "mlp.linear_fc2.weight"]
    return {k: v.contiguous() for k, v in out.items()}


def hf_to_megatron(src: str, out: str) -> Path:
    hf_config = read_hf_config(src)  # a wrong path is refused before megatron-core's slow, chatty import
    dist_checkpointing, ShardedTensor = _megatron()
    if hf_config.get("quantization_config"):
        raise OrbitError(f"{src} is a quantized checkpoint", "convert the bf16 source; the base is quantized on the HF side")
    config = DecoderConfig.from_hf(hf_config, os.path.join(src, "config.json"))
    hf = dict(iter_tensors(weight_files(src)))
    try:
        megatron = hf_to_megatron_state(config, hf)
    except KeyError as err:
        raise OrbitError(f"{src}: tensor {err.args[0]} is missing", "the checkpoint does not match its config.json") from err
    with atomic_output_dir(out) as tmp:
        iteration_dir = tmp / "iter_0000000"
        iteration_dir.mkdir()
        sharded = {"model": sharded_layout(megatron, config.num_layers), "checkpoint_version": 3.0, "iteration": 0,
                   "hf_config": json.dumps(hf_config)}
        with _process_group(), _cpu_shims():
            dist_checkpointing.save(sharded, str(iteration_dir))
        (tmp / TRACKER).write_text("0")
    return Path(out)


def resolve_iteration_dir(root: str) -> Path:
    """``root/latest_checkpointed_iteration.txt`` -> ``root/iter_NNNNNNN`` (or ``release``)."""
    require_path(root, "Megatron checkpoint root", is_dir=True)
    tracker = Path(root) / TRACKER
    if not tracker.is_file():
        raise OrbitError(f"{tracker} not found", "point at a Megatron checkpoint root (the directory holding iter_* and the tracker file)")
    value = tracker.read_text().strip()
    name = "release" if value == "release" else f"iter_{int(value):07d}" if value.isdigit() else None
    if name is None:
        raise OrbitError(f"{tracker} holds {value!r}, not an iteration number", "write the iteration (e.g. 0) or 'release'")
    path = Path(root) / name
    if not path.is_dir():
        raise OrbitError(f"{tracker} names {name}, which does not exist", "restore that iteration or fix the tracker file")
    return path


def megatron_to_hf(src: str, out: str, hf_config_dir: str | None = None) -> Path:
    iteration = resolve_iteration_dir(src)
    dist_checkpointing, _ = _megatron()
    with _process_group():
        common = dist_checkpointing.load_common_state_dict(str(iteration))
        plain = dist_checkpointing.load_plain_tensors(str(iteration))
    if hf_config_dir:
        hf_config = read_hf_config(hf_config_dir)
    elif isinstance(common, dict) and "hf_config" in common:
        hf_config = json.loads(common["hf_config"])
    else:
        raise OrbitError(f"{iteration} carries no HF config", "pass --hf-config with the HF checkpoint the model came from")
    config = DecoderConfig.from_hf(hf_config)
    tensors = unstack_layers(plain, config.num_layers)
    try:
        hf = megatron_to_hf_state(config, tensors)
    except KeyError as err:
        raise OrbitError(f"{iteration}: tensor {err.args[0]} is missing", "the checkpoint does not match the HF config") from err
    from safetensors.torch import save_file

    with atomic_output_dir(out) as tmp:
        save_file(hf, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(hf_config, indent=2))
        if hf_config_dir:
            from orbit_core.quant.quantize import COPY_FILES

            for name in COPY_FILES:
                if os.path.isfile(os.path.join(hf_config_dir, name)):
                    shutil.copy2(os.path.join(hf_config_dir, name), tmp / name)
    return Path(out)
