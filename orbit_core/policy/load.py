"""One loader for every base checkpoint: dense HF safetensors or packed compressed-tensors.

It sits above ``models`` and ``quant`` so that neither has to know the other: the format is read
from ``config.json``'s ``quantization_config`` and the matching loader is called.
"""

from __future__ import annotations

import os

import torch

from orbit_core.models.checkpoint import load_model, read_hf_config
from orbit_core.models.config import DecoderConfig
from orbit_core.models.transformer import DecoderLM
from orbit_core.quant.load import load_quantized_model


def load_base(path: str, dtype: str = "float32", device: str | torch.device = "cpu") -> DecoderLM:
    """The frozen base model of ``path``; quantized linears stay packed (``QuantLinear``)."""
    hf = read_hf_config(path)
    if not hf.get("quantization_config"):
        return load_model(path, dtype, device)
    config = DecoderConfig.from_hf(hf, source=os.path.join(path, "config.json"))
    return load_quantized_model(path, hf, config, dtype, device)
