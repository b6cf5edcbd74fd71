"""Orbit adapter -> PEFT adapter directory (``adapter_config.json`` + ``adapter_model.safetensors``).

LoRA maps one to one. OFT maps to PEFT's OFT with exact Cayley (``use_cayley_neumann: false``):
PEFT rotates row vectors by ``(I - S)(I + S)^-1`` with ``S`` built from its upper-triangle vector;
Orbit rotates column vectors by ``(I + Q)^-1 (I - Q)``. The two agree when ``S = -Q``, so the
exported vector is the upper triangle of ``-Q``. COFT is exported off: the rotation is already
inside the constraint, and PEFT's own projection uses a different eps scaling.
A PPO value head is not part of the policy and is not exported.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from orbit_core.atomic import atomic_output_dir
from orbit_core.errors import OrbitError
from orbit_core.policy.adapter_files import load_adapter, resolve_adapter_dir


def _peft_config(peft: dict, targets: list[str], base_model: str) -> dict:
    common = {"base_model_name_or_path": base_model, "bias": "none", "fan_in_fan_out": False, "inference_mode": True,
              "layers_pattern": None, "layers_to_transform": None, "modules_to_save": None,
              "revision": None, "target_modules": targets, "task_type": "CAUSAL_LM"}
    if peft["method"] == "lora":
        return {**common, "peft_type": "LORA", "r": peft["rank"], "lora_alpha": peft["alpha"], "lora_dropout": peft["dropout"],
                "use_rslora": False, "use_dora": False}
    if peft["method"] == "oft":
        return {**common, "peft_type": "OFT", "r": 0, "init_weights": True, "oft_block_size": peft["oft_block_size"], "coft": False,
                "eps": peft["oft_eps"], "block_share": peft["oft_block_share"], "module_dropout": 0.0,
                "use_cayley_neumann": False, "num_cayley_neumann_terms": 5}
    raise OrbitError(f"cannot export peft.method={peft['method']!r}", "export supports lora and oft")


def _oft_vector(skew_param: torch.Tensor) -> torch.Tensor:
    q = 0.5 * (skew_param - skew_param.transpose(1, 2))
    rows, cols = torch.triu_indices(q.shape[1], q.shape[1], 1)
    return (-q)[:, rows, cols].contiguous()


def export_peft_adapter(source: str, out: str) -> Path:
    """Write the PEFT adapter of a run or checkpoint directory to ``out`` (atomically)."""
    state, meta = load_adapter(resolve_adapter_dir(source))
    with atomic_output_dir(out) as tmp:
        write_peft_adapter(tmp, state, meta["peft"], meta.get("target_layers") or [], meta.get("base_model", ""))
    return Path(out)


def write_peft_adapter(directory: Path, state: dict[str, torch.Tensor], peft: dict, targets: list[str], base_model: str) -> int:
    """PEFT's two files for an Orbit adapter state in ``directory``; returns the weight file's bytes."""
    tensors: dict[str, torch.Tensor] = {}
    for name in targets:
        prefix = f"base_model.model.{name}"
        if peft["method"] == "lora":
            tensors[f"{prefix}.lora_A.weight"] = state[f"{name}.lora_A"].float().contiguous()
            tensors[f"{prefix}.lora_B.weight"] = state[f"{name}.lora_B"].float().contiguous()
        else:
            tensors[f"{prefix}.oft_R.weight"] = _oft_vector(state[f"{name}.oft_skew"].float())
    save_file(tensors, str(directory / "adapter_model.safetensors"), metadata={"format": "pt"})
    (directory / "adapter_config.json").write_text(json.dumps(_peft_config(peft, targets, base_model), indent=2))
    return (directory / "adapter_model.safetensors").stat().st_size


def read_peft_lora(directory: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """A PEFT LoRA directory -> (Orbit adapter state, Orbit peft section), the inverse of the export."""
    from safetensors.torch import load_file

    directory = Path(directory)
    try:
        config = json.loads((directory / "adapter_config.json").read_text())
        tensors = load_file(str(directory / "adapter_model.safetensors"))
    except Exception as err:
        raise OrbitError(f"{directory} is not a readable PEFT adapter ({type(err).__name__})", "point at a PEFT adapter dir") from err
    if config.get("peft_type") != "LORA":
        raise OrbitError(f"{directory}: PEFT type {config.get('peft_type')!r} is not served", "serve LoRA adapters")
    # base_model.model.<module>.lora_A.weight -> <module>.lora_A
    state = {name.removeprefix("base_model.model.").removesuffix(".weight"): tensor for name, tensor in tensors.items()}
    targets = sorted({k.rsplit(".", 1)[0] for k in state})
    peft = {"method": "lora", "rank": int(config["r"]), "alpha": float(config["lora_alpha"]),
            "dropout": float(config.get("lora_dropout", 0.0)), "target_modules": targets}
    return state, peft
