"""Architecture hyper-parameters read from a HF ``config.json`` (Llama / Qwen2 / Qwen3, and the
mixture-of-experts Qwen3-MoE / Qwen2-MoE)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from orbit_core.errors import OrbitError

SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "qwen3", "qwen2_moe", "qwen3_moe")
QWEN2_FAMILY = ("qwen2", "qwen2_moe")
"""q/k/v biases always, none on o_proj."""
QK_NORM = ("qwen3", "qwen3_moe")


@dataclass(frozen=True)
class MoEConfig:
    num_experts: int
    experts_per_token: int
    expert_intermediate_size: int
    norm_topk_prob: bool
    decoder_sparse_step: int = 1
    mlp_only_layers: tuple[int, ...] = ()
    shared_expert_intermediate_size: int = 0
    """Qwen2-MoE's always-on expert, gated by a sigmoid; 0 = none."""

    def is_sparse(self, layer_idx: int) -> bool:
        """Which layers hold an MoE block (the rest keep a dense MLP), as transformers decides it."""
        return layer_idx not in self.mlp_only_layers and self.num_experts > 0 and (layer_idx + 1) % self.decoder_sparse_step == 0

    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> "MoEConfig":
        # released Qwen MoE configs say num_experts; transformers >= 5 writes num_local_experts
        experts = hf["num_experts"] if "num_experts" in hf else hf["num_local_experts"]
        return cls(num_experts=int(experts), experts_per_token=int(hf["num_experts_per_tok"]),
                   expert_intermediate_size=int(hf["moe_intermediate_size"]),
                   norm_topk_prob=bool(hf.get("norm_topk_prob", False)),
                   decoder_sparse_step=int(hf.get("decoder_sparse_step", 1) or 1),
                   mlp_only_layers=tuple(int(i) for i in hf.get("mlp_only_layers") or ()),
                   shared_expert_intermediate_size=int(hf.get("shared_expert_intermediate_size") or 0))


@dataclass(frozen=True)
class DecoderConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] = field(default_factory=dict)
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    eos_token_ids: tuple[int, ...] = ()
    moe: MoEConfig | None = None

    @classmethod
    def from_hf(cls, hf: dict[str, Any], source: str = "config.json") -> "DecoderConfig":
        model_type = hf.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise OrbitError(
                f"{source}: unsupported architecture model_type={model_type!r}",
                f"Orbit's native model supports {', '.join(SUPPORTED_MODEL_TYPES)}",
            )
        try:
            hidden = int(hf["hidden_size"])
            heads = int(hf["num_attention_heads"])
            # transformers >= 5 keeps rope settings in rope_parameters; older files use rope_theta/rope_scaling.
            rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
            theta = float(rope.pop("rope_theta", hf.get("rope_theta", 10000.0)))
            if rope.get("rope_type", rope.get("type")) in (None, "default"):
                rope = {}
            eos = hf.get("eos_token_id")
            eos_ids = tuple(eos) if isinstance(eos, list) else ((eos,) if eos is not None else ())
            return cls(
                model_type=model_type,
                vocab_size=int(hf["vocab_size"]),
                hidden_size=hidden,
                intermediate_size=int(hf["intermediate_size"]),
                num_layers=int(hf["num_hidden_layers"]),
                num_heads=heads,
                num_kv_heads=int(hf.get("num_key_value_heads") or heads),
                head_dim=int(hf.get("head_dim") or hidden // heads),
                rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
                rope_theta=theta,
                rope_scaling=rope,
                max_position_embeddings=int(hf.get("max_position_embeddings", 2048)),
                tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
                # Qwen2 always has q/k/v biases (Qwen2-MoE says so in qkv_bias); Llama and Qwen3 declare it.
                attention_bias=(bool(hf.get("qkv_bias", True)) if model_type == "qwen2_moe" else model_type == "qwen2"
                                or bool(hf.get("attention_bias", False))),
                mlp_bias=bool(hf.get("mlp_bias", False)),
                qk_norm=model_type in QK_NORM,
                eos_token_ids=eos_ids,
                moe=MoEConfig.from_hf(hf) if model_type.endswith("_moe") else None,
            )
        except KeyError as err:
            raise OrbitError(f"{source}: missing field {err.args[0]!r}", "the checkpoint's config.json is incomplete") from err
