"""Decode throughput of the builtin engine by base precision, adapter and batch size, one JSON line each.

Random weights in the given shape, 128-token prompts, 128 sampled new tokens, EOS off. Baselines in
the same process: transformers ``generate`` on the bf16 weights (after a warm-up run at the
measured length: its first run there is 2-2.7x slower, the allocator growing its pool; results
before ``decode_throughput_prefill_graphs_h200.jsonl`` timed that cold run), and for packed bases the same
engine with the Triton kernels off (``--kernels both``). Rooflines: batch / (bytes read per decode
step / the measured device-to-device copy bandwidth, read and written bytes counted: 3.0 TB/s on an
H100, as in issue 10), once for the resident weights alone and once
for the weights plus the KV cache a step reads (the mean context over the run).
    python -m bench.decode_throughput --shape qwen3-1.7b --bases bf16 int4 --batches 1 32 256
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import itertools
import json
import tempfile
import time
from pathlib import Path

import torch

from bench.base_memory import write_random_checkpoint
from bench.int4_linear import replay_ms
from bench.rollout_throughput import SHAPES, NoEosTokenizer, timed
from orbit_core.models import dequant_ahead, projections
from orbit_core.peft.lora import apply_lora
from orbit_core.peft.oft import apply_oft
from orbit_core.policy import load_base
from orbit_core.quant import quantize_checkpoint
from orbit_core.rollout import cuda_graphs, decode_loop
from orbit_core.rollout import engine as engine_module
from orbit_core.rollout.engine import BuiltinEngine
from orbit_core.rollout.types import SamplingParams
from orbit_kernels import decode_attention as attention_kernels
from orbit_kernels import decode_record, dense_gemv, dense_lora
from orbit_kernels import int4 as int4_kernels
from orbit_kernels import lora as lora_kernels
from orbit_kernels import norm_shrink, packed_gemm, packed_gemv, packed_lora
from orbit_kernels import qk_rope as qk_kernels
from orbit_kernels import rmsnorm, silu_shrink
from orbit_kernels import rope as rope_kernels
from orbit_kernels import silu_mul
from orbit_kernels import _triton as triton_support
from orbit_kernels import sampling as sampling_kernel


ROUND_KERNELS = {
    "lora_tiles": (lora_kernels, "TILES_ENABLED"),  # LoRA above 32 rows on tensor cores (else the reference)
    "sample_kernel": (sampling_kernel, "ENABLED"),  # one-pass sampling (else the torch race)
    "kv_write_kernel": (rope_kernels, "KV_WRITE_ENABLED"),  # key rope + KV write in one kernel
    "lora_groups": (projections, "GROUPED"),  # q/k/v and gate/up share LoRA launches
    "shared_counters": (packed_gemv, "SHARED_COUNTERS"),  # split GEMV counters reset in-kernel (else a memset)
    "fused_projections": (projections, "FUSED"),  # one base call per q/k/v and gate/up group (else one per linear)
    "silu_mul_kernel": (silu_mul, "ENABLED"),  # silu(gate) * up in one kernel (else two)
    "add_norm_kernel": (rmsnorm, "ADD_FUSED"),  # residual add joined to the next norm (else an add, then the norm)
    "attention_tuned": (attention_kernels, "TUNED"),  # attention launch by rows (else chunks of 256, 4 warps)
    "philox_four": (sampling_kernel, "FOUR_PER_CALL"),  # four uniforms per Philox call (else one)
    "norm_rows": (rmsnorm, "MULTI_ROW"),  # several short rows per norm program (else one)
    "rope_rows": (rope_kernels, "MULTI_ROW"),  # several rows per rope program (else one)
    "prefill_graphs": (cuda_graphs, "PREFILL_GRAPHS"),  # small prefills replay captured graphs (else eager)
    "qk_fused": (qk_kernels, "ENABLED"),  # decode q/k norms, rope and KV write in one kernel (else four)
    "packed_lora": (packed_lora, "ENABLED"),  # packed GEMV with the LoRA expand in its epilogue (else apart)
    "lora_few_rows": (lora_kernels, "FEW_ROWS"),  # up to 4 rows: expand over all groups' columns (else 16-row tiles)
    "wide_shrink": (lora_kernels, "WIDE_SHRINK"),  # LoRA shrink in 2,048-column steps (else 512)
    "x_split": (packed_gemv, "X_SPLIT"),  # packed GEMV: a step's activations in one load, split in registers
    "gemm_x_split": (packed_gemm, "X_SPLIT"),  # packed GEMM to 32 rows: a dot per code position (else 16 rows, unfolded)
    "gemm_narrow_tiles": (packed_gemm, "NARROW_TILES"),  # x-split GEMM: 64-column tiles, 4 programs per SM
    "dequant_ahead": (dequant_ahead, "ENABLED"),  # above the packed kernels' rows: next layer dequantized aside
    "gemv_stride_unspecialized": (packed_gemv, "STRIDE_UNSPECIALIZED"),  # GEMV built without the stride's divisibility
    "gemv_one_row_words": (packed_gemv, "ONE_ROW_BLOCK_W"),  # GEMV at one row: 256 words a K step (else 128)
    "pdl": (triton_support, "PDL"),  # decode kernels under programmatic dependent launch (else plain launches)
    "gemv_in_place": (packed_gemv, "IN_PLACE_NIBBLES"),  # GEMV decodes int4 nibbles where they lie (else shifted)
    "gemv_prefetch": (packed_gemv, "PREFETCH"),  # GEMV below 1,024 tiles: a step ahead, a program a tile
    "gemv_one_step": (packed_gemv, "ONE_STEP"),  # GEMV below 1,024 tiles: a program a K step (before PREFETCH)
    "early_reads": (triton_support, "EARLY_READS"),  # GEMV and shrink read frozen weights before the PDL wait
    "lora_pdl_above_few_rows": (lora_kernels, "PDL_ABOVE_FEW_ROWS"),  # LoRA row kernels under PDL above 4 rows
    "lora_shrink_pdl": (lora_kernels, "SHRINK_PDL"),  # the LoRA shrink under PDL at every row count
    "lora_expand_after_pdl": (lora_kernels, "EXPAND_AFTER_PDL"),  # the expand under PDL behind a packed GEMM
    "norm_shrink": (norm_shrink, "ENABLED"),  # up to 4 rows: add, norm and the q/k/v or gate/up shrink in one kernel
    "silu_shrink": (silu_shrink, "ENABLED"),  # up to 4 rows: the SwiGLU product and down's shrink in one kernel
    "silu_shrink_one_step": (silu_shrink, "ONE_STEP"),  # that kernel reads a row in one K step (else 2,048 columns)
    "record_kernel": (decode_record, "ENABLED"),  # a step's token records, counters and finish flags in one kernel
    "gemv_one_row_tiles": (packed_gemv, "ONE_ROW_TILES"),  # int4 GEMV at one row: gate/up and down in their own tiles
    "merge_unrolled": (attention_kernels, "MERGE_UNROLLED"),  # attention merge reads every chunk at once (else a loop)
    "probed_checks": (decode_loop, "PROBED_CHECKS"),  # host syncs only when a probe shows a finished row
    "int4_pairs": (packed_gemm, "INT4_PAIRS"),  # x-split GEMM: int4 codes to bf16 pairs, scale after the dot
    "one_pass_attention": (attention_kernels, "ONE_PASS"),  # attention of one chunk writes its output (no merge)
    "gemv_lora_ahead": (packed_gemv, "LORA_AHEAD"),  # GEMV reads the LoRA expand's B and t up top (else after K)
    "qk_early_tables": (qk_kernels, "EARLY_TABLES"),  # q/k kernel reads norm weights, rope rows before the wait
    "norm_early_gamma": (norm_shrink, "EARLY_GAMMA"),  # norm + shrink reads its norm weight with A (before the wait)
    "async_admit": (decode_loop, "ASYNC_ADMIT"),  # an admit's host copies pinned, not waiting for the prefill
    "counted_seed": (sampling_kernel, "COUNTED"),  # sampling keyed by a device counter (else a generator draw a step)
    "qk_gather_tables": (qk_kernels, "GATHER_TABLES"),  # the q/k kernel reads the rope tables at each position
    "norm_embed": (norm_shrink, "EMBED"),  # up to 4 rows: embedding lookup, layer 0's norm and shrink in one kernel
    "graph_priority": (cuda_graphs, "HIGH_PRIORITY"),  # graphs captured at high priority, above the dequant stream
    "lm_head_kernel": (dense_gemv, "ENABLED"),  # one row: the lm_head as a Triton GEMV under PDL (else cuBLAS)
    "one_read": (decode_loop, "ONE_READ"),  # a completion's records read back in one wait (else one per kind)
    "admit_probe": (decode_loop, "ADMIT_PROBE"),  # an admit sends the flags' probe (else the first check syncs)
    "lm_head_late_release": (dense_gemv, "LATE_RELEASE"),  # the lm_head kernel releases the next kernel at its end
    "lm_head_early": (dense_gemv, "EARLY"),  # the lm_head kernel reads its first weight step before the PDL wait
    "quick_modes": (engine_module, "QUICK_MODES"),  # generate flips module modes by its own walk (else modules())
    "lm_head_evict_first": (dense_gemv, "EVICT_FIRST"),  # the lm_head kernel's weight loads evict first from L2
    "prefill_qk": (qk_kernels, "PREFILL"),  # a prefill's q/k norms, rope and cache writes in one kernel (else six)
    "prefill_qk_tiles": (qk_kernels, "PREFILL_TILES"),  # that kernel over blocks of tokens (else one token a program)
    "dense_lora": (dense_lora, "ENABLED"),  # many rows: LoRA update written, then the GEMM adds onto it (else after)
    "shrink_beside": (lora_kernels, "SHRINK_BESIDE"),  # above 32 rows the LoRA shrink beside the base GEMM (else after)
}
"""The decode changes of the last ten rounds (the first five from nine rounds ago, the next three
from the round after, the next six from the round after that, the next four from the round after
that, ``gemm_x_split`` and ``gemm_narrow_tiles`` from the round after that, the next three from the
round after that, ``pdl`` from the round after, the next five from the round after that, the next
five from the round before that, the next two from the round after, the next two from the round
after that, ``one_pass_attention`` the round before, ``gemv_lora_ahead``, ``qk_early_tables`` and
``norm_early_gamma`` the round after, the next five the round after that, the next eight the round
before the latest, the last three the latest), each switchable for ``--ablate``
(``decode_throughput_gemm_x_split_h200.jsonl``: int4 at batch 8-32;
``decode_throughput_dequant_ahead_h200.jsonl``: int4 and fp8 at 64 and 256;
``decode_throughput_gemv_layouts_h200.jsonl``: the packed bases at 1 and 4;
``decode_throughput_pdl_h100.jsonl``: int4 and bf16 + LoRA at 1 and 4;
``decode_throughput_gemv_in_place_h100.jsonl``, ``decode_throughput_gemv_prefetch_h100.jsonl``,
``decode_throughput_early_reads_h100.jsonl``, ``decode_throughput_gemv_plans_h100.jsonl``: int4 at
1 and 4, the last with LoRA and bare; ``decode_throughput_shrink_fusions_h100.jsonl``: int4 and
bf16 + LoRA at 1 and 4; ``decode_throughput_record_kernel_h100.jsonl``: int4 and bf16 + LoRA at 1,
4 and 32; ``decode_throughput_gemv_one_row_tiles_h100.jsonl``: int4 at 1, with LoRA and bare;
``decode_throughput_int4_pairs_h100.jsonl``: ``int4_pairs``, int4 + LoRA at 8-32;
``decode_throughput_one_pass_attention_h100.jsonl``: every base, bare and LoRA, at 1-16;
``decode_throughput_gemv_lora_ahead_h100.jsonl``: int4 + LoRA at 1 and 4;
``decode_throughput_early_tables_gamma_h100.jsonl``: those two, int4 + LoRA at 1 and 4;
``decode_throughput_step_edges_h100.jsonl``: ``async_admit``, ``counted_seed`` and
``qk_gather_tables``, int4 + LoRA at 1 and 4; ``decode_throughput_embed_priority_h100.jsonl``:
``graph_priority`` and ``norm_embed``, the same; ``decode_throughput_graph_priority_256_h100.jsonl``:
``graph_priority`` and ``counted_seed`` at 256).
Switches tried and removed with their code: ``weight_prefetch`` (packed weights asked into L2
ahead of their GEMVs, commit a54547b; ``decode_throughput_weight_prefetch_h100.jsonl``) and
``l2_prefetch`` (the same from a side stream, commit 734e041;
``decode_throughput_l2_prefetch_h100.jsonl`` and its ``_chunks`` and ``_loads`` files),
``attention_shrink`` (the attention's merge computing o_proj's LoRA shrink, commit ce1db3d;
``decode_throughput_attention_shrink_h100.jsonl``) and ``attention_step`` (the q/k path, the KV
write, the attention and its merge in one kernel, commit e8ddfa7;
``decode_throughput_attention_step_h100.jsonl``) and ``attention_early_kv`` (each chunk's first
block of older keys and values read before the PDL wait, commit 56a3d28;
``decode_throughput_attention_early_kv_h100.jsonl``), all slower; and ``attention_early_length``
(the row's length alone read before the wait, commit 52dad08;
``decode_throughput_attention_early_length_h100.jsonl``), within noise.
``decode_throughput_masked_int4_h200.jsonl`` switched ``masked_int4``: the GEMV and the x-split GEMM
decoding an int4 nibble by masking it in place and one FMA (two instructions a code against four;
26.38 against 27.49 us summed over the GEMV's shapes at one row). End to end it was within the
noise (int4 + LoRA 552.0 against 553.1 tok/s at batch 1, 9,531 against 9,404 at 32; bare 7,774
against 7,872 at 16), so it was removed. ``decode_throughput_round3_h200.jsonl``
also switched ``lora_gemm_prefill``: LoRA of 2,048 rows or more (a prefill) through two cuBLAS GEMMs,
the expand accumulated in the GEMM's epilogue. It gained nothing (cuBLAS ran the rank-16 expand at
about half the memory bound, no better than the tile kernels), so it was removed.
``decode_throughput_lora_concat_h100.jsonl`` (one H100) switched ``lora_concat``: above the packed
kernels' rows, each LoRA call folded into the base GEMM of the weight dequantized ahead, as
``[x | t] @ [W | scaling B]^T`` (the ahead stream writing ``scaling B`` as extra weight columns, and
one split shrink kernel writing ``[x | t]``): no expand kernel, the update accumulated in fp32 with
the base. int4 + LoRA ran 28,022 against 29,066 tok/s at batch 256 and 11,529 against 12,104 at 64.
Per call (``lora_concat_calls_h100.jsonl``, ten calls a graph) the tile kernels' shrink and expand
together take 5.1-7.5 us, the floor of two launches; the concat shrink alone took 5.4-9.7 us at its
best tiles, and the wider GEMM from 3.8 us less to 1.2 us more. It was removed (commit b5d9627 holds it)."""


def copy_bandwidth() -> float:
    """Bytes/s of a large device-to-device copy (read + write counted)."""
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    dst.copy_(src)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(10):
        dst.copy_(src)
    torch.cuda.synchronize()
    return 2 * src.numel() * 10 / (time.perf_counter() - start)


def resident_bytes(model) -> int:
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


def decode_seconds(model, prompts: list[list[int]], new: int, batch: int, cuda_graph: bool,
                   repeats: int = 1) -> list[float]:
    """Seconds of each of ``repeats`` timed generates, after one warm-up generate."""
    engine = BuiltinEngine(model, NoEosTokenizer(), max_running=batch, seed=0, cuda_graph=cuda_graph)
    params = SamplingParams(max_new_tokens=new, temperature=1.0)
    # warm-up at the measured length: graph capture, autotuning, and every Triton specialization the
    # growing context reaches (a 4-token warm-up left them to the measured run of the first config);
    # twice, since a prefill shape is captured the second time it comes
    for _ in range(2):
        engine.generate(prompts[:batch], params)
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        start = time.perf_counter()
        out = engine.generate(prompts[:batch], params)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
        assert all(len(c.token_ids) == new for c in out)
    return times


def build_model(path: str, adapter: str):
    """The base with no adapter, LoRA r16 or OFT with blocks of 32, on every linear (non-zero
    adapter weights, so nothing is skipped as an identity)."""
    model = load_base(path, "bfloat16", "cuda")
    if adapter == "lora":
        apply_lora(model, 16, 32, 0.0, ["all-linear"])
    elif adapter == "oft":
        apply_oft(model, 32, False, 6e-5, False, ["all-linear"])
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name or "oft_skew" in name:
                p.normal_(0.0, 0.01)
    return model.eval()


def profile_decode(model, prompts: list[list[int]], batch: int, new: int, context: int) -> None:
    """The GPU time and kernels of one graphed decode step at ``batch`` rows: the engine's captured
    graph replayed alone (no prefill, no host work) with every row's context at ``context`` keys,
    timed with CUDA events over 20 replays and profiled over 10; and the wall time of a 1-token
    generate (the prefill, eager, and one sampled token)."""
    engine = BuiltinEngine(model, NoEosTokenizer(), max_running=batch, seed=0)
    one = SamplingParams(max_new_tokens=1, temperature=1.0)  # the prefill and its one sampled token
    for _ in range(2):  # a prefill shape is captured the second time it comes
        engine.generate(prompts[:batch], one)
    prefill = timed(lambda: engine.generate(prompts[:batch], one))
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        engine.generate(prompts[:batch], one)
        torch.cuda.synchronize()
    print_kernels("the 1-token generate (the prefill)", prof, 1, 8)
    # then the measured length (new sampling parameters: a new cache, so its graphs come after)
    params = SamplingParams(max_new_tokens=new, temperature=1.0)
    for _ in range(2):  # captures the decode graphs, then the prefill's
        engine.generate(prompts[:batch], params)
    wall = timed(lambda: engine.generate(prompts[:batch], params)) / new
    loop = engine.loop
    graph = next(g for (rows, _), g in loop.graphed.graphs.items() if rows == batch)
    loop.lengths[:batch] = context  # every row finished: replays recompute the step, record nothing
    for _ in range(3):
        graph.replay()
    step_ms = replay_ms(graph, 20)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(10):
            graph.replay()
        torch.cuda.synchronize()
    print(f"batch {batch}: engine {1e3 * wall:.2f} ms a step (prefill included; a 1-token generate, the prefill "
          f"alone, takes {1e3 * prefill:.1f} ms), graph replay {step_ms:.2f} ms at {context} keys")
    print_kernels("a replayed step", prof, 10, 22)


def print_kernels(what: str, prof, runs: int, top: int) -> None:
    """The GPU time, kernel count and ``top`` kernels of ``runs`` runs of ``what`` under ``prof``, per run."""
    totals: dict[str, list[float]] = {}
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            entry = totals.setdefault(event.name, [0.0, 0])
            entry[0] += event.time_range.elapsed_us()
            entry[1] += 1
    busy = sum(us for us, _ in totals.values()) / runs
    print(f"{what}: kernels busy {busy / 1e3:.2f} ms, {sum(c for _, c in totals.values()) / runs:.0f} kernels")
    for name, (us, calls) in sorted(totals.items(), key=lambda item: -item[1][0])[:top]:
        print(f"{us / runs:9.1f} us {calls / runs:6.1f}x  {name[:100]}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shape", default="qwen3-1.7b", choices=sorted(SHAPES))
    parser.add_argument("--bases", nargs="+", default=["bf16", "int4"])
    parser.add_argument("--adapters", nargs="+", default=["none", "lora", "oft"], choices=["none", "lora", "oft"])
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 32, 256])
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new", type=int, default=128)
    parser.add_argument("--kernels", choices=["on", "both"], default="both")
    parser.add_argument("--attention-kernel", choices=["on", "both"], default="on",
                        help="both: also attend through masked SDPA over the whole capacity (the reference)")
    parser.add_argument("--lora-kernel", choices=["on", "both"], default="both",
                        help="both: also run LoRA through the torch reference (six kernels a linear) in the engine")
    parser.add_argument("--repeats", type=int, default=1,
                        help="timed generates per configuration (transformers generate too); tokens_per_s is their median")
    parser.add_argument("--ablate", nargs="*", choices=sorted(ROUND_KERNELS),
                        help="also run with each of these ROUND_KERNELS (none named: all) flipped from the "
                             "library's setting in turn, then all of them flipped")
    parser.add_argument("--attention-configs", nargs="*", default=[],
                        help="CHUNK:BLOCK_N:WARPS:STAGES ...: also run with each attention launch in place of "
                             "launch_config's (decode_attention.OVERRIDE)")
    parser.add_argument("--packed-gemv", choices=["on", "both"], default="on",
                        help="both: also run int4 decode rows through the split-K tl.dot GEMV (the few-row GEMV off)")
    parser.add_argument("--graphs", choices=["on", "both"], default="both",
                        help="both: also decode eagerly (rollout.cuda_graph=false), the launch-bound baseline")
    parser.add_argument("--hf", action="store_true", help="also time transformers generate (bf16)")
    parser.add_argument("--profile", nargs="+", help="BASE:ADAPTER:BATCH ..., e.g. int4:lora:1: time and list the kernels of one replayed decode step instead")
    args = parser.parse_args()
    # each run starts from the library's own settings (one, ``lora_pdl_above_few_rows``, defaults to
    # off); ``--ablate`` flips a setting from there
    defaults = {name: getattr(module, attr) for name, (module, attr) in ROUND_KERNELS.items()}
    shape = SHAPES[args.shape]
    root = Path(tempfile.mkdtemp())
    write_random_checkpoint(root / "bf16", shape)
    paths = {"bf16": str(root / "bf16")}
    for fmt in args.bases:
        if fmt != "bf16":
            quantize_checkpoint(paths["bf16"], str(root / fmt), fmt, group_size=128, device="cuda")
            paths[fmt] = str(root / fmt)
    # HBM moves this many bytes a second in either direction; a decode step's bytes are nearly all
    # reads, so they take bytes / bandwidth at best (the roofline: H100 copies at ~3.0 TB/s)
    bandwidth = copy_bandwidth()
    gen = torch.Generator().manual_seed(1)
    prompts = torch.randint(10, shape["vocab_size"], (max(args.batches), args.prompt_len), generator=gen).tolist()
    kv_per_token = 2 * shape["num_hidden_layers"] * shape["num_key_value_heads"] * shape["head_dim"] * 2
    mean_context = args.prompt_len + args.new / 2

    def report(row: dict, tokens_per_s: float, weight_bytes: int, batch: int) -> None:
        step_bytes = weight_bytes + batch * mean_context * kv_per_token
        print(json.dumps({
            "bench": "decode_throughput", "shape": args.shape, **row, "batch": batch, "prompt_len": args.prompt_len,
            "new_tokens": args.new, "tokens_per_s": round(tokens_per_s, 1),
            "ms_per_step": round(1e3 * batch / tokens_per_s, 2),
            "roofline_weights_tokens_per_s": round(batch * bandwidth / weight_bytes, 1),
            "roofline_weights_kv_tokens_per_s": round(batch * bandwidth / step_bytes, 1),
            "fraction_of_weights_kv_roofline": round(tokens_per_s * step_bytes / (batch * bandwidth), 4),
            "resident_weight_bytes": weight_bytes, "copy_bandwidth_gb_s": round(bandwidth / 1e9),
            "device": torch.cuda.get_device_name(), "torch": torch.__version__,
        }), flush=True)

    if args.profile:
        for spec in args.profile:
            base, adapter, batch = spec.split(":")
            print(f"== {spec}")
            profile_decode(build_model(paths[base], adapter), prompts, int(batch), args.new,
                           int(mean_context))
            gc.collect()
            torch.cuda.empty_cache()
        return
    for base in args.bases:
        for adapter in args.adapters:
            model = build_model(paths[base], adapter)
            weight_bytes = resident_bytes(model)
            kernel_modes = [True, False] if base != "bf16" and args.kernels == "both" else [True]
            graph_modes = [True, False] if args.graphs == "both" else [True]
            lora_modes = [True, False] if adapter == "lora" and args.lora_kernel == "both" else [True]
            attention_modes = [True, False] if args.attention_kernel == "both" else [True]
            gemv_modes = [True, False] if base == "int4" and args.packed_gemv == "both" else [True]
            ablations = [{}]
            if args.ablate is not None:
                names = [n for n in args.ablate or ROUND_KERNELS
                         if adapter == "lora" or n not in ("lora_tiles", "lora_groups", "packed_lora", "lora_few_rows", "wide_shrink")]
                ablations += [{n: not defaults[n]} for n in names] + (
                    [{n: not defaults[n] for n in names}] if len(names) > 1 else [])
                ablations.append({})  # everything on again, last: shows whether the order of runs matters
            configs = [None] + [attention_kernels.Config(*map(int, c.split(":"))) for c in args.attention_configs]
            for order, (kernels_on, lora_on, attention_on, gemv_on, off, config) in enumerate(itertools.product(
                    kernel_modes, lora_modes, attention_modes, gemv_modes, ablations, configs)):
                if gemv_on is False and kernels_on is False or config is not None and off:
                    continue
                attention_kernels.OVERRIDE = config
                int4_kernels.ENABLED, packed_gemv.ENABLED = kernels_on, kernels_on and gemv_on
                lora_kernels.ENABLED, attention_kernels.ENABLED = lora_on, attention_on
                for name, (module, attr) in ROUND_KERNELS.items():
                    setattr(module, attr, off.get(name, defaults[name]))
                for graphs in graph_modes:
                    for batch in args.batches:
                        times = decode_seconds(model, prompts, args.new, batch, graphs, args.repeats)
                        seconds = sorted(times)[len(times) // 2]
                        report({"impl": "orbit_builtin", "base": base, "adapter": adapter, "run_order": order,
                                "cuda_graph": graphs,
                                "kernels": "triton" if kernels_on and base != "bf16" else "torch reference",
                                "lora_kernel": lora_on if adapter == "lora" else None,
                                **{name: off.get(name, defaults[name]) for name in ROUND_KERNELS},
                                "attention_kernel": attention_on, "packed_gemv": kernels_on and gemv_on,
                                "attention_config": None if config is None else list(dataclasses.astuple(config)),
                                "repeats_tokens_per_s": [round(batch * args.new / t, 1) for t in times]},
                               batch * args.new / seconds, weight_bytes, batch)
            int4_kernels.ENABLED = packed_gemv.ENABLED = lora_kernels.ENABLED = attention_kernels.ENABLED = True
            attention_kernels.OVERRIDE = None
            for name, (module, attr) in ROUND_KERNELS.items():
                setattr(module, attr, defaults[name])
            del model
            gc.collect()
            torch.cuda.empty_cache()
    if args.hf:
        from transformers import AutoModelForCausalLM

        hf = AutoModelForCausalLM.from_pretrained(paths["bf16"], dtype=torch.bfloat16).cuda().eval()
        weight_bytes = resident_bytes(hf)
        for batch in args.batches:
            ids = torch.tensor(prompts[:batch], device="cuda")
            run = lambda n: hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True, top_k=0, top_p=1.0,
                                        max_new_tokens=n, min_new_tokens=n, eos_token_id=None, pad_token_id=0)
            with torch.no_grad():
                run(args.new)  # warm-up at the measured length: a first run grows the allocator's pool
                times = [timed(lambda: run(args.new)) for _ in range(args.repeats)]
            seconds = sorted(times)[len(times) // 2]
            report({"impl": "hf_generate", "base": "bf16", "adapter": "none", "kernels": "-",
                    "repeats_tokens_per_s": [round(batch * args.new / t, 1) for t in times]},
                   batch * args.new / seconds, weight_bytes, batch)


if __name__ == "__main__":
    main()
