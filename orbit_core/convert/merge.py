"""Base + adapter -> one merged HF checkpoint (bf16 by default) that needs no Orbit or PEFT to serve."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch

from orbit_core.atomic import atomic_output_dir
from orbit_core.config.loader import build_config
from orbit_core.models.checkpoint import DTYPES, read_hf_config, save_model
from orbit_core.peft.base import load_adapter_state_dict, merge_adapters
from orbit_core.quant.quantize import COPY_FILES
from orbit_core.policy.adapter_files import load_adapter, resolve_adapter_dir
from orbit_core.policy.build import apply_adapter
from orbit_core.policy.embedded import resolve_model_path
from orbit_core.policy.load import load_base


def merge_adapter(base: str, adapter: str, out: str, dtype: str = "bfloat16") -> Path:
    base_path = resolve_model_path(base, 0, lambda msg: None) if base.startswith("embedded:") else base
    state, meta = load_adapter(resolve_adapter_dir(adapter))
    peft_cfg = build_config({"peft": meta["peft"]}).peft
    model = load_base(base_path, "float32")
    apply_adapter(model, peft_cfg)
    # a PPO value head is not part of the policy
    state = {k: v for k, v in state.items() if not k.startswith("value_head.")}
    load_adapter_state_dict(model, state, adapter)
    merge_adapters(model)
    model.to(DTYPES[dtype])
    hf = read_hf_config(base_path)
    hf["torch_dtype"] = hf["dtype"] = dtype
    with atomic_output_dir(out) as tmp:
        with torch.no_grad():
            save_model(model, str(tmp), hf)
        for name in COPY_FILES:
            if os.path.isfile(os.path.join(base_path, name)):
                shutil.copy2(os.path.join(base_path, name), tmp / name)
    return Path(out)
