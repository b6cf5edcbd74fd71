"""Rollout throughput: Orbit's builtin engine vs transformers' generate on the same weights.

One JSON line per result. Random weights in a Qwen3-0.6B shape (bf16); every sequence decodes
exactly ``--new`` tokens (EOS disabled) so both sides do the same work. Run on a GPU:
    python bench/rollout_throughput.py --prompts 64 --samples 8 --prompt-len 128 --new 256
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from orbit_core.models.config import DecoderConfig
from orbit_core.models.transformer import DecoderLM
from orbit_core.rollout import BuiltinEngine, SamplingParams

SHAPES = {
    "qwen3-0.6b": dict(hidden_size=1024, intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16,
                       num_key_value_heads=8, head_dim=128, vocab_size=151936, tie_word_embeddings=True),
    "qwen3-1.7b": dict(hidden_size=2048, intermediate_size=6144, num_hidden_layers=28, num_attention_heads=16,
                       num_key_value_heads=8, head_dim=128, vocab_size=151936, tie_word_embeddings=True),
}


class NoEosTokenizer:
    """Just enough tokenizer for the engine: no EOS, so every sequence runs to max_new_tokens."""

    eos_token_id = None
    pad_token_id = 0

    def decode(self, ids, skip_special_tokens=False):
        return ""


def timed(fn) -> float:
    torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shape", default="qwen3-0.6b", choices=sorted(SHAPES))
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()

    from transformers import Qwen3Config, Qwen3ForCausalLM

    hf_config = Qwen3Config(max_position_embeddings=4096, **SHAPES[args.shape])
    torch.manual_seed(0)
    with torch.device("cuda"):
        hf = Qwen3ForCausalLM(hf_config).to(torch.bfloat16).eval()
    config = DecoderConfig.from_hf({**hf_config.to_dict(), "eos_token_id": None})
    with torch.device("cuda"):
        ours = DecoderLM(config).to(torch.bfloat16).eval()
    ours.load_state_dict(hf.state_dict(), strict=False)
    ours.lm_head.weight = ours.model.embed_tokens.weight

    gen = torch.Generator().manual_seed(1)
    prompts = torch.randint(10, hf_config.vocab_size, (args.prompts, args.prompt_len), generator=gen)
    new_tokens = args.prompts * args.samples * args.new
    engine = BuiltinEngine(ours, NoEosTokenizer(), max_running=args.prompts * args.samples, seed=0)
    params = SamplingParams(max_new_tokens=args.new, temperature=1.0, n=args.samples)
    prompt_lists = prompts.tolist()

    def run_orbit():
        out = engine.generate(prompt_lists, params)
        assert all(len(c.token_ids) == args.new for c in out)

    batch = prompts.repeat_interleave(args.samples, 0).cuda()

    def run_hf():
        with torch.no_grad():
            out = hf.generate(batch, attention_mask=torch.ones_like(batch), do_sample=True, temperature=1.0, top_k=0,
                              top_p=1.0, max_new_tokens=args.new, min_new_tokens=args.new, eos_token_id=None,
                              pad_token_id=0)
        assert out.shape[1] == args.prompt_len + args.new

    results = {}
    for name, fn in (("orbit_builtin", run_orbit), ("hf_generate", run_hf)):
        fn()  # warm-up: allocator, kernels, rope tables, KV cache
        times = sorted(timed(fn) for _ in range(args.repeats))
        results[name] = times[len(times) // 2]
    base = results["hf_generate"]
    for name, seconds in results.items():
        print(json.dumps({
            "bench": "rollout_throughput", "impl": name, "shape": args.shape, "device": torch.cuda.get_device_name(),
            "sequences": args.prompts * args.samples, "prompt_len": args.prompt_len, "new_tokens": args.new,
            "seconds": round(seconds, 3), "new_tokens_per_s": round(new_tokens / seconds),
            "baseline": "hf_generate", "speedup_vs_baseline": round(base / seconds, 2),
        }))


if __name__ == "__main__":
    main()
