"""``embedded:tiny-arith``: a small Qwen3-architecture model, built and warm-started offline on first use.

The warm-started checkpoint is cached once per ``warmstart_steps`` beside the task's data
(``orbit_core.data.embedded``), built in a temp dir and renamed into place.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch

from orbit_core.data.arith import ALPHABET, target_text
from orbit_core.data.embedded import PREFIX, TASK, TASK_SEED, atomic_build, cache_root, data_dir, is_embedded
from orbit_core.errors import OrbitError

TINY_SHAPE = dict(hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=32, max_position_embeddings=64, tie_word_embeddings=True)
TEACHER = f"{TASK}-teacher"
TEACHER_STEPS = 3000
MOE = f"{TASK}-moe"
TINY_MOE = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=192, norm_topk_prob=True)
"""The MoE variant: every MLP is 4 experts (top 2) of half the dense width, so a token computes as much."""


def resolve_model_path(spec: str, warmstart_steps: int, log: Callable[[str], None] = print) -> str:
    """``embedded:tiny-arith`` (noisy warm-start) or ``embedded:tiny-arith-teacher`` (clean, longer:
    a stronger model of the same tokenizer, the teacher of the distillation recipes)."""
    if not is_embedded(spec):
        return spec
    name = spec[len(PREFIX):]
    if name == f"{TASK}-int4":
        return quantized_embedded(warmstart_steps, "int4", log)
    if name not in (TASK, TEACHER, MOE):
        raise OrbitError(f"unknown embedded model {spec!r}",
                         f"use embedded:{TASK}, embedded:{TASK}-int4, embedded:{MOE} or embedded:{TEACHER}")
    clean, moe = name == TEACHER, name == MOE
    steps = TEACHER_STEPS if clean else warmstart_steps
    target = cache_root() / TASK / (f"teacher-w{steps}" if clean else f"model-moe-w{steps}" if moe else f"model-w{steps}")
    if not target.exists():
        log(f"building {spec} (first use, cached at {target})")
    return str(atomic_build(target, lambda tmp: build_tiny_model(tmp, steps, log, clean=clean, moe=moe)))


INT4_GROUP = 32


def quantized_embedded(warmstart_steps: int, fmt: str, log: Callable[[str], None] = print) -> str:
    """The warm-started embedded model quantized by ``orbit quantize`` (int4: group size 32)."""
    from orbit_core.quant.quantize import quantize_checkpoint

    source = resolve_model_path(f"{PREFIX}{TASK}", warmstart_steps, log)
    target = cache_root() / TASK / f"model-w{warmstart_steps}-{fmt}"
    if not target.exists():
        log(f"quantizing embedded:{TASK} to {fmt} (cached at {target})")
        quantize_checkpoint(source, str(target), fmt, group_size=INT4_GROUP)
    return str(target)


def embedded_hf_config(vocab_size: int | None = None, moe: bool = False) -> dict:
    """The embedded model's config.json contents, known without building it."""
    from transformers import Qwen3Config, Qwen3MoeConfig

    from orbit_core.models.char_tokenizer import PIECES, SPECIAL_TOKENS

    vocab = vocab_size or len(SPECIAL_TOKENS) + len(PIECES) + len(dict.fromkeys(ALPHABET))
    common = dict(vocab_size=vocab, bos_token_id=1, eos_token_id=2, pad_token_id=0, **TINY_SHAPE)
    if moe:
        return Qwen3MoeConfig(architectures=["Qwen3MoeForCausalLM"], **common, **TINY_MOE).to_dict()
    return Qwen3Config(architectures=["Qwen3ForCausalLM"], **common).to_dict()


def embedded_spec_config(spec: str) -> dict:
    """config.json of an ``embedded:`` model spec (the int4 one shares the dense shape)."""
    return embedded_hf_config(moe=spec[len(PREFIX):] == MOE)


def build_tiny_model(path: Path, warmstart_steps: int, log: Callable[[str], None] = print, clean: bool = False,
                     moe: bool = False) -> None:
    """Random Qwen3-shaped model + char tokenizer, warm-started on the task's SFT split, saved as HF.

    ``clean`` trains on the true labels instead of the noisy targets; ``moe`` builds Qwen3-MoE.
    """
    import json

    from orbit_core.models.char_tokenizer import build_char_tokenizer
    from orbit_core.models.checkpoint import save_model
    from orbit_core.models.config import DecoderConfig
    from orbit_core.models.transformer import DecoderLM
    from orbit_core.policy.warmstart import supervised_warmstart

    tokenizer = build_char_tokenizer(ALPHABET, str(path))
    hf = embedded_hf_config(len(tokenizer), moe=moe)
    assert (tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id) == (0, 1, 2)
    torch.manual_seed(TASK_SEED)
    model = DecoderLM(DecoderConfig.from_hf(hf))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() == 2:
                param.normal_(0.0, 0.02)
    rows = [json.loads(line) for line in open(data_dir() / "sft.jsonl")]
    if clean:
        rows = [{**row, "target": row["label"]} for row in rows]
    every = max(1, warmstart_steps // 5)

    def report(step: int, loss: float) -> None:
        if (step + 1) % every == 0:
            log(f"  warm-start step {step + 1}/{warmstart_steps}  loss {loss:.3f}")

    supervised_warmstart(model, tokenizer, rows, target_text, warmstart_steps, seed=TASK_SEED, on_step=report)
    save_model(model, str(path), hf)
