"""Adapter gradients of ``train.compile`` (inductor) against the eager layers, on the GPU in bf16.

The Qwen3-1.7B shape cut to 4 layers, LoRA r16 on every linear, 4 x 512 tokens, bf16 and int4
bases, activation checkpointing none and full. The loss projects the final hidden states on a
fixed random direction (|hidden|^2 would be constant after the final RMSNorm, and its gradient
pure rounding noise). One JSON line per (base, checkpointing): the eager gradient's norm, the
relative L2 difference and the cosine between the two gradient vectors.
    python -m bench.compiled_grads
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch

from bench.base_memory import write_random_checkpoint
from bench.rollout_throughput import SHAPES
from orbit_core.peft.lora import apply_lora
from orbit_core.policy import load_base
from orbit_core.quant import quantize_checkpoint


def adapter_grad(path: str, ids: torch.Tensor, checkpointing: str, compiled: bool) -> torch.Tensor:
    torch.manual_seed(0)
    model = load_base(path, "bfloat16", "cuda")
    apply_lora(model, 16, 32, 0.0, ["all-linear"])
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.01)
    model.train()
    model.activation_checkpointing = checkpointing
    if compiled:
        model.compile_training_layers()
    hidden = model(ids, hidden_only=True)
    direction = torch.randn(hidden.shape, generator=torch.Generator("cuda").manual_seed(5), device="cuda")
    (hidden.float() * direction).mean().backward()
    return torch.cat([p.grad.flatten().float() for p in model.parameters() if p.requires_grad])


def main() -> None:
    root = Path(tempfile.mkdtemp())
    shape = dict(SHAPES["qwen3-1.7b"], num_hidden_layers=4)
    write_random_checkpoint(root / "bf16", shape)
    quantize_checkpoint(str(root / "bf16"), str(root / "int4"), "int4", group_size=128, device="cuda")
    ids = torch.randint(0, shape["vocab_size"], (4, 512), device="cuda")
    for base in ("bf16", "int4"):
        for checkpointing in ("none", "full"):
            eager, compiled = (adapter_grad(str(root / base), ids, checkpointing, c) for c in (False, True))
            print(json.dumps({"base": base, "checkpointing": checkpointing, "grad_norm": eager.norm().item(),
                              "rel_diff": ((eager - compiled).norm() / eager.norm()).item(),
                              "cosine": torch.nn.functional.cosine_similarity(eager, compiled, dim=0).item()}), flush=True)


if __name__ == "__main__":
    main()
