"""Typed recipe sections. Each component is built from its own section only."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal


@dataclass(frozen=True)
class ModelSection:
    path: str = "embedded:tiny-arith"
    """Local HF checkpoint directory (bf16/fp32 or compressed-tensors int4/fp8/nvfp4), or
    ``embedded:tiny-arith`` / ``embedded:tiny-arith-int4`` (built on first use, cached)."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    device: str = "auto"
    """``auto`` picks cuda when available, else cpu."""
    warmstart_steps: int = 1500
    """Supervised steps used to warm-start the embedded model (ignored for real checkpoints)."""


@dataclass(frozen=True)
class DataSection:
    train_path: str = "embedded:tiny-arith/train.jsonl"
    """Prompt JSONL; ``path@[:N]`` / ``path@[A:B]`` slice it."""
    prompt_key: str = "prompt"
    label_key: str = "label"
    apply_chat_template: Literal["auto", "true", "false"] = "auto"
    """``auto`` uses the tokenizer's chat template when it has one."""
    max_prompt_len: int = 1024
    """Longer prompts keep their last ``max_prompt_len`` tokens (counted and reported)."""
    max_truncated_fraction: float = 0.0
    """The most prompts that may be cut to ``max_prompt_len``; a dataset with more is refused."""
    shuffle: bool = True


@dataclass(frozen=True)
class RolloutSection:
    backend: Literal["builtin", "sglang"] = "builtin"
    """``builtin``: Orbit's engine. ``sglang``: SGLang-API servers at ``sglang_urls`` (SGLang with LoRA
    on the same base, or ``orbit serve``); LoRA only, sync mode only."""
    sglang_urls: list[str] = field(default_factory=list)
    """Base URLs of running servers for ``backend=sglang``, e.g. ``[http://127.0.0.1:30000]``."""
    batch_size: int = 16
    """Prompts sampled per rollout step."""
    n_samples_per_prompt: int = 8
    max_new_tokens: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    """0 disables top-k. Training refuses top_p < 1 and top_k > 0: the trainer's ratios use the full
    softmax, so samples from a truncated one would be off-policy in a way no ratio corrects."""
    stop: list[str] = field(default_factory=list)
    max_running: int = 256
    """KV-cache slots: sequences decoded together; finished ones free their slot."""
    placement: Literal["colocated", "non-colocated"] = "colocated"
    """``colocated``: the engine runs in the trainer's process on its device, time-sliced
    (``keep_cache`` says whether its KV cache stays while the trainer runs). ``non-colocated``: the
    engine runs in its own process (``engine_device``) and receives adapter-only syncs; required
    by ``train.mode=async``."""
    keep_cache: Literal["auto", "true", "false"] = "auto"
    """Colocated engine on CUDA: keep the KV cache and the captured decode graphs while the trainer
    runs, so that the next rollout recaptures nothing. Releasing made a 128-row rollout (Qwen3-1.7B
    shape, LoRA r16, 64 + 128 tokens, one H200) take 0.96 s instead of 0.52 s on bf16 and 1.11 s
    instead of 0.69 s on int4, for 3.1 GiB kept (``bench/results/colocated_release_h200.jsonl``).
    ``auto``: the first step releases; later steps keep it once a training phase has left room for
    it (the device's free memory after training at least the cache plus a tenth of the device).
    ``false``: always give it back (the most memory for training)."""
    adapter_double_buffer: bool = False
    """Two adapter slots in the engine: a sync writes the idle slot while decoding continues, then
    flips between decode steps (async, non-colocated only)."""
    adapter_transport: Literal["auto", "pipe", "shared"] = "auto"
    """How a non-colocated engine process receives each sync. ``pipe``: safetensors bytes through
    its pipe. ``shared``: a shared buffer, CUDA IPC between GPUs of this node or shared memory on
    the CPU, with only a small message in the pipe. ``auto``: ``shared`` when the trainer is on
    CUDA, else ``pipe``."""
    engine_device: str = "auto"
    """Device of a non-colocated engine; ``auto`` = cuda:1 when the trainer is on cuda and a
    second GPU is visible, else the trainer's device."""
    engine_threads: int = 0
    """CPU threads of a non-colocated engine process; 0 = half the cores (the trainer keeps the rest)."""
    cuda_graph: bool = True
    """On CUDA, replay the decode forward as CUDA graphs (one per row bucket); false decodes eagerly,
    for debugging. Engines with two adapter slots (double buffering) decode eagerly for now."""
    engine_timeout_s: float = 600.0
    """A non-colocated engine that sends nothing for this long is treated as crashed. The engine
    reports at least every min(10 s, a quarter of this) while it runs, so a generation longer than
    this is not silence."""
    engine_start_timeout_s: float = 1800.0
    """How long a non-colocated engine process may take to load its base and report ready (loading
    sends nothing, and a large base takes minutes); past it the process is stopped."""
    num_engines: int = 1
    """Rollout engines (``train.orchestrator=ray``): each is a Ray actor holding the frozen base, and
    prompts go to the least-loaded one. With ``backend=sglang`` there is one actor per URL."""


@dataclass(frozen=True)
class RLSection:
    advantage_estimator: Literal[
        "grpo", "gspo", "ppo", "reinforce_plus_plus", "reinforce_plus_plus_baseline", "on_policy_distillation"
    ] = "grpo"
    std_normalization: bool = True
    """Divide GRPO/GSPO advantages by the group std (false = Dr. GRPO / DISABLE_GRPO_STD_NORMALIZATION)."""
    eps_clip: float = 0.2
    eps_clip_high: float = 0.28
    loss_agg: Literal["token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm"] = "token-mean"
    use_kl_loss: bool = False
    """true: KL to the base is a loss term; false with kl_coef > 0: a per-token reward penalty."""
    kl_coef: float = 0.0
    kl_type: Literal["auto", "kl", "mse", "low_var_kl"] = "auto"
    """``auto``: k2 (``mse``) as a loss, whose gradient is that of KL(policy || base); k1 (``kl``) as a
    reward penalty, whose value is unbiased. ``low_var_kl`` (k3) as a loss follows KL(base || policy)."""
    entropy_coef: float = 0.0
    gamma: float = 1.0
    lambd: float = 1.0
    """GAE lambda (ppo)."""
    value_head: bool = False
    """Train a value head with the adapter (required by ppo)."""
    value_loss_coef: float = 0.5
    value_clip: float = 0.2
    teacher_path: str = ""
    """Teacher checkpoint for on_policy_distillation (same tokenizer)."""
    tis_cap: float = 0.0
    """Truncated importance sampling: each token's loss is weighted by min(pi_proximal / pi_behaviour,
    tis_cap), the trainer's recomputed logprob over the engine's recorded one; it corrects async
    staleness and engine/trainer mismatch (decoupled PPO). 0 = off."""
    routing_replay: bool = False
    """MoE models: the trainer routes each token to the experts the engine chose for it (recorded at
    sampling), so both sides compute the same experts; ``moe/routing_mismatch_fraction`` is logged either way."""
    filter_zero_signal_groups: bool = False
    """Drop groups whose rewards are all equal and sample more prompts to refill (DAPO dynamic sampling)."""
    dynamic_sampling_max_rounds: int = 4
    reward: str = "math"
    """``math`` (math-verify, \\boxed{} extraction), ``module:function`` or ``file.py:function``."""
    reward_timeout_s: float = 10.0
    """A sample whose reward takes longer scores 0 and counts as a timeout."""
    reward_workers: int = -1
    """Reward worker processes, started once per run: -1 = one per CPU core; 0 = score on threads
    in the calling process (for debugging; a timed-out call keeps its thread until it returns)."""


@dataclass(frozen=True)
class PeftSection:
    method: Literal["lora", "oft"] = "lora"
    rank: int = 16
    alpha: float = 32.0
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: ["all-linear"])
    oft_block_size: int = 32
    """Rotation block size; must divide every target layer's input dimension."""
    oft_coft: bool = False
    """Constrained OFT: keep each skew block within oft_eps of zero."""
    oft_eps: float = 6e-5
    oft_block_share: bool = False


@dataclass(frozen=True)
class TrainSection:
    backend: Literal["torch", "megatron"] = "torch"
    """``torch``: Orbit's own model. ``megatron``: the base in a megatron-core GPTModel loaded through
    dist_checkpointing (the ``megatron`` extra; dense bf16/fp32 bases, or packed ones at TP=1)."""
    tensor_parallel: int = 1
    """``backend=megatron``: tensor-parallel ranks for the trainer. This process is rank 0; it starts
    the others on this node (``cuda:0..N-1``, or CPU processes) and sends each its share of every step."""
    expert_parallel: int = 1
    """``backend=megatron``, MoE bases: ranks the routed experts are split over (megatron-core's EP, at
    ``tensor_parallel=1``). Each rank holds ``num_experts / N`` experts; attention and the adapter are
    whole on every rank, and the ranks see the same batch."""
    orchestrator: Literal["local", "ray"] = "local"
    """``local``: everything in this process (and its engine process). ``ray``: the trainer and
    ``rollout.num_engines`` engines run as Ray actors in one placement group (see the ``ray`` section)."""
    mode: Literal["sync", "async"] = "sync"
    """``async``: the engine generates step t+1's batch while the trainer updates on step t."""
    max_staleness: int = 1
    """async: the most optimizer steps a sample's adapter version may trail the trainer's."""
    steps: int = 20
    """Rollout steps (each: generate, score, update)."""
    global_batch_size: int = 64
    """Samples per optimizer step."""
    micro_batch_size: int = 16
    """Samples per forward/backward; global / micro = gradient accumulation steps."""
    lr: float = 1e-4
    lr_schedule: Literal["constant", "linear", "cosine"] = "constant"
    warmup_steps: int = 0
    min_lr: float = 0.0
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    activation_checkpointing: Literal["none", "full", "selective"] = "none"
    """Recompute activations in backward instead of keeping them: ``full`` keeps only each decoder
    layer's input, ``selective`` recomputes only the MLPs (the largest activations)."""
    compile: Literal["auto", "on", "off"] = "auto"
    """torch.compile each decoder layer for the training forward and backward (one graph serves
    every layer; sequence lengths are dynamic, so new lengths do not recompile). Fuses the norms,
    rope, SwiGLU, LoRA scaling and casts between the GEMMs. ``auto`` is on for CUDA, off on the CPU.
    The rollout engine never runs the compiled layers (it has its own kernels and CUDA graphs)."""
    max_tokens_per_micro_batch: int = 0
    """Size micro-batches by padded tokens instead of ``micro_batch_size`` sequences: samples are
    grouped by length so short ones share a micro-batch (0 = off)."""
    grad_clip: float = 1.0
    seed: int = 1234
    output_dir: str = "runs/orbit"
    save_interval: int = 10
    keep_last: int = 2
    resume: str = "auto"
    """``auto`` continues from the newest usable checkpoint, ``never`` starts fresh (refused when
    ``output_dir`` already holds files), or a step_* checkpoint path."""
    overwrite: bool = False
    """Start fresh in a non-empty ``output_dir``: its old contents are moved aside to ``<dir>.old-<time>``."""
    eval_interval: int = 0
    """0 evaluates only before and after training."""
    save_rollouts: bool = False
    """Write every step's samples (tokens, logprobs, adapter version, reward) to rollouts/step_N.jsonl."""
    wandb: Literal["auto", "true", "false", "offline"] = "auto"
    wandb_project: str = "orbit"


@dataclass(frozen=True)
class EvalSection:
    test_path: str = "embedded:tiny-arith/test.jsonl"
    n_samples: int = 4
    k: list[int] = field(default_factory=lambda: [1, 4])
    temperature: float = 1.0
    max_new_tokens: int = 64
    before_train: bool = True
    enabled: bool = True


@dataclass(frozen=True)
class MoESection:
    dequant_chunk_experts: int = 16
    """Packed MoE experts: the active experts (those some token routes to) are dequantized this many
    at a time into one reused buffer, in forward and again in backward; must be at least top-k.
    0 runs each active expert's own modules instead."""
    grouped_gemm: Literal["auto", "triton", "cutlass", "loop"] = "auto"
    """The GPU's grouped GEMM over a chunk's experts: ``triton`` (Orbit's kernels, with the SwiGLU
    fused), ``cutlass`` (torch's ``_grouped_mm``, bf16 on sm90+), ``loop`` (one matmul per expert),
    or ``auto``: cutlass where it runs (faster on an H100), else triton. The CPU always loops."""


@dataclass(frozen=True)
class QuantSection:
    fake_qat: bool = False
    """Train against fake-quantized merged weights with a straight-through estimator (needs a quantized base)."""


@dataclass(frozen=True)
class PreflightSection:
    runtime: bool = False
    """Run the runtime logprob parity check at step 0 of `orbit train`; refuse to start when it fails."""
    max_logprob_mean_abs_diff: float = 0.05
    """The main gate: a wrong rope theta gave a mean of 0.93-0.95 on the GPU, a healthy bf16 or int4
    engine 0.019-0.022 (Qwen3-1.7B shape, bench/results/preflight_parity_h200.jsonl)."""
    max_logprob_abs_diff: float = 1.0
    """A loose bound on the single worst token: a healthy bf16 engine reached 0.08-0.11 there."""
    min_topk_agreement: float = 0.9
    topk: int = 5
    num_prompts: int = 8
    max_new_tokens: int = 16
    source_path: str = ""
    """Unquantized checkpoint the quantized one came from: enables the dequantization error check."""
    skip_checkpoint: bool = False
    skip_runtime: bool = False


@dataclass(frozen=True)
class RaySection:
    address: str = ""
    """Empty: start a Ray instance on this machine for the run. ``auto``: join the cluster this machine
    is part of (``ray start --head`` / ``ray start --address=...``); or ``ray://head:10001``."""
    trainer_cpus: float = 1.0
    engine_cpus: float = 1.0
    """CPUs each actor reserves in the placement group (and the torch threads it uses)."""
    gpus_per_engine: float = -1.0
    """-1: one GPU each with ``rollout.placement=non-colocated``, a share of the trainer's GPU with
    ``colocated``; 0 on a CPU model. The trainer reserves one GPU when the model runs on CUDA."""
    max_engine_restarts: int = 3
    """An engine actor that dies is replaced and its prompts resubmitted, at most this many times
    per engine; then the run saves and stops with the actor's last error."""
    start_timeout_s: float = 300.0
    """How long to wait for the placement group and the actors to come up."""


@dataclass(frozen=True)
class RecipeConfig:
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    rollout: RolloutSection = field(default_factory=RolloutSection)
    rl: RLSection = field(default_factory=RLSection)
    peft: PeftSection = field(default_factory=PeftSection)
    train: TrainSection = field(default_factory=TrainSection)
    eval: EvalSection = field(default_factory=EvalSection)
    quant: QuantSection = field(default_factory=QuantSection)
    preflight: PreflightSection = field(default_factory=PreflightSection)
    ray: RaySection = field(default_factory=RaySection)
    moe: MoESection = field(default_factory=MoESection)


SECTIONS = ("model", "data", "rollout", "rl", "peft", "train", "eval", "quant", "preflight", "ray", "moe")
