"""GPU check: megatron-core's GPTModel, loaded from `orbit convert hf-to-megatron` through
megatron-core's own path, gives transformers' logits.

Builds a random Qwen3 checkpoint, converts it, builds a GPTModel (local layer spec) from the HF
config and loads the torch_dist checkpoint with
``dist_checkpointing.load(model.sharded_state_dict(), dir)`` (``orbit_core.models.megatron_gpt``,
the path the CPU tests and ``train.backend=megatron`` use), then compares logits with
transformers. One JSON line.
"""

from __future__ import annotations

import json
import os
import tempfile

import torch


def main() -> None:
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from orbit_core.convert.megatron import hf_to_megatron, resolve_iteration_dir
    from orbit_core.models.checkpoint import read_hf_config
    from orbit_core.models.config import DecoderConfig
    from orbit_core.models.megatron_gpt import build_gpt, cpu_shims, ensure_model_parallel, load_gpt

    device = torch.device("cuda")
    torch.cuda.set_device(0)
    ensure_model_parallel(device)
    root = tempfile.mkdtemp()
    hf_config = Qwen3Config(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=8,
                            num_key_value_heads=2, head_dim=32, vocab_size=1000, max_position_embeddings=512)
    torch.manual_seed(0)
    hf = Qwen3ForCausalLM(hf_config).eval()
    hf.save_pretrained(os.path.join(root, "hf"))
    hf_to_megatron(os.path.join(root, "hf"), os.path.join(root, "mg"))
    gpt = build_gpt(DecoderConfig.from_hf(read_hf_config(os.path.join(root, "hf"))), torch.float32)
    load_gpt(gpt, str(resolve_iteration_dir(os.path.join(root, "mg"))))
    gpt = gpt.to(device).eval()
    ids = torch.randint(0, 1000, (2, 64), device=device)
    positions = torch.arange(64, device=device)[None].expand(2, -1)
    mask = torch.triu(torch.ones(1, 1, 64, 64, dtype=torch.bool, device=device), diagonal=1)
    with torch.no_grad(), cpu_shims():
        ours = gpt(ids, positions, mask).float()
        reference = hf.to(device)(ids).logits.float()
    print(json.dumps({"bench": "megatron_logits", "max_abs_diff": (ours - reference).abs().max().item(),
                      "loading": "dist_checkpointing.load(model.sharded_state_dict(), dir)",
                      "reference": "transformers Qwen3ForCausalLM", "device": torch.cuda.get_device_name()}))


if __name__ == "__main__":
    main()
