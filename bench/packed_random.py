"""A random checkpoint written directly in compressed-tensors packed form.

Each bf16 weight exists only on the GPU, one tensor at a time, on its way through Orbit's quantizer
into the shards, so a model too large for a bf16 checkpoint on this disk (Qwen3-32B: 65 GB) never
has one. Embeddings and norms are written in bf16, as ``orbit quantize`` writes them.
    python -m bench.packed_random --shape qwen3-32b --out /tmp/q32
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from orbit_core.models.config import DecoderConfig
from orbit_core.models.transformer import DecoderLM
from orbit_core.quant.formats import DEFAULT_IGNORE, is_ignored, weight_format
from orbit_core.quant.quantize import linear_names, write_quantized

BIG_SHAPES = {
    "qwen3-32b": dict(hidden_size=5120, intermediate_size=25600, num_hidden_layers=64, num_attention_heads=64,
                      num_key_value_heads=8, head_dim=128, vocab_size=151936, tie_word_embeddings=False),
    "qwen3-30b-a3b": dict(hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768, num_hidden_layers=48,
                          num_attention_heads=32, num_key_value_heads=4, head_dim=128, num_experts=128,
                          num_experts_per_tok=8, norm_topk_prob=True, vocab_size=151936, tie_word_embeddings=False),
}
"""Shapes with ``num_experts`` are Qwen3-MoE."""


def write_packed_random(out: Path, shape: dict, fmt_name: str = "int4", group_size: int = 128, seed: int = 0,
                        device: str = "cuda") -> Path:
    from transformers import Qwen3Config, Qwen3ForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM

    from bench.base_memory import save_char_tokenizer

    moe = "num_experts" in shape
    config_cls, model_cls = (Qwen3MoeConfig, Qwen3MoeForCausalLM) if moe else (Qwen3Config, Qwen3ForCausalLM)
    config = config_cls(max_position_embeddings=4096, **shape)
    hf = {**config.to_dict(), "architectures": [model_cls.__name__], "model_type": "qwen3_moe" if moe else "qwen3"}
    with torch.device("meta"):  # Orbit's names are the per-expert ones llm-compressor writes
        skeleton = DecoderLM(DecoderConfig.from_hf(hf))
    specs = {name: (tuple(t.shape), "BF16") for name, t in skeleton.named_parameters(remove_duplicate=False)
             if not (config.tie_word_embeddings and name == "lm_head.weight")}
    linears = linear_names(hf)
    quantized = [n for n in linears if not is_ignored(n, list(DEFAULT_IGNORE))]
    skipped = sorted(n for n in linears if n not in quantized)
    gen = torch.Generator(device=device).manual_seed(seed)

    def tensors():
        for name, (size, _) in specs.items():
            if name.endswith("norm.weight"):
                yield name, torch.ones(size, dtype=torch.bfloat16)
            elif name[: -len(".weight")] in quantized:  # quantized where it was drawn
                yield name, torch.randn(size, generator=gen, device=device, dtype=torch.bfloat16) * 0.02
            else:
                yield name, (torch.randn(size, generator=gen, device=device, dtype=torch.bfloat16) * 0.02).cpu()

    write_quantized(str(out), hf, specs, tensors(), weight_format(fmt_name, group_size if fmt_name == "int4" else None),
                    quantized, skipped, device=device)
    save_char_tokenizer(out)
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shape", default="qwen3-32b", choices=sorted(BIG_SHAPES))
    parser.add_argument("--format", default="int4")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    write_packed_random(Path(args.out), BIG_SHAPES[args.shape], args.format)


if __name__ == "__main__":
    main()
