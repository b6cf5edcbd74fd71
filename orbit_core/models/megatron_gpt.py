"""A megatron-core ``GPTModel`` holding the frozen base, for ``train.backend=megatron``.

Built from the HF config with the local layer spec, loaded through megatron-core's own path
(``dist_checkpointing.load(model.sharded_state_dict(), dir)``) from an ``orbit convert``
checkpoint, then seen by the trainer like Orbit's ``DecoderLM``: ``model(ids, hidden_only=True)``
gives the final hidden states ``[batch, seq, hidden]`` and ``model.lm_head.weight`` the output weight.

Megatron's fused linears are split into their HF parts so adapters have HF names:
``linear_qkv`` -> ``q_proj``, ``k_proj``, ``v_proj`` (outputs re-interleaved per query group),
``linear_fc1`` -> ``gate_proj``, ``up_proj``; ``linear_proj`` is ``o_proj``, ``linear_fc2``
``down_proj``. Under TP each rank holds its shard of the parts (``split_fused_linears``) and of
the adapter (``shard_adapter``), as the README's design says (``orbit_core.train.megatron_tp`` runs
the ranks). MoE bases keep megatron-core's router and experts (``megatron_moe.py``).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from unittest import mock

import torch
from torch import nn

from orbit_core.errors import OrbitError
from orbit_core.models.config import DecoderConfig
from orbit_core.models.megatron_moe import is_moe_layer, load_moe_from_hf, moe_config_fields


def require_megatron() -> None:
    try:
        import megatron.core  # noqa: F401
    except ImportError:
        raise OrbitError("train.backend=megatron needs megatron-core, which is not installed",
                         "pip install 'orbit-rl[megatron]', or use train.backend=torch") from None


@contextlib.contextmanager
def cpu_shims():
    """megatron-core asks CUDA for the current device (rope, checkpoint writer), syncs it, and forks
    the CUDA RNG tracker around attention dropout; on a CPU-only torch these go to the CPU (dropout is 0,
    so no random stream is used). On a GPU machine nothing is patched."""
    if torch.cuda.is_available():
        yield
        return
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    tracker = type(get_cuda_rng_tracker())
    with mock.patch.object(torch.cuda, "current_device", lambda: "cpu"), \
            mock.patch.object(torch.cuda, "synchronize", lambda *a, **k: None), \
            mock.patch.object(tracker, "fork", lambda self, name=None: contextlib.nullcontext()):
        yield


def ensure_model_parallel(device: torch.device, training: bool = True) -> None:
    """A one-rank process group (gloo on CPU, nccl on CUDA) and TP = PP = 1, unless already set up
    (``train.tensor_parallel > 1`` sets up its ranks first, ``orbit_core.train.megatron_tp``).
    ``training`` is kept for callers that only run the model."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    if not dist.is_initialized():
        init = tempfile.mktemp(prefix="orbit-megatron-pg-")
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", init_method=f"file://{init}", rank=0,
                                world_size=1)
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(1, 1)
    if device.type == "cuda":
        from megatron.core.tensor_parallel import random as mp_random

        # attention forks megatron's model-parallel CUDA RNG in training even at dropout 0, and the
        # fork fails unless the tracker holds that state (TP ranks reach here after their own setup)
        if "model-parallel-rng" not in mp_random.get_cuda_rng_tracker().get_states():
            state = torch.cuda.get_rng_state()  # it reseeds torch's CUDA generator, which is not its to set
            mp_random.model_parallel_cuda_manual_seed(1234)
            torch.cuda.set_rng_state(state)


def transformer_config(c: DecoderConfig, dtype: torch.dtype):
    from megatron.core.transformer.transformer_config import TransformerConfig

    if c.rope_scaling and c.rope_scaling.get("rope_type", c.rope_scaling.get("type", "default")) != "default":
        raise OrbitError(f"train.backend=megatron does not build rope scaling {c.rope_scaling}",
                         "use train.backend=torch for this model")
    if c.mlp_bias or (c.attention_bias and c.model_type != "qwen2"):
        raise OrbitError(f"train.backend=megatron builds q/k/v biases only (Qwen2); {c.model_type} has biases on "
                         "o_proj or the MLP", "use train.backend=torch for this model")
    return TransformerConfig(
        num_layers=c.num_layers, hidden_size=c.hidden_size, num_attention_heads=c.num_heads,
        num_query_groups=c.num_kv_heads, ffn_hidden_size=c.intermediate_size, kv_channels=c.head_dim,
        gated_linear_unit=True, activation_func=torch.nn.functional.silu, normalization="RMSNorm",
        layernorm_epsilon=c.rms_norm_eps, add_bias_linear=False, add_qkv_bias=c.attention_bias, qk_layernorm=c.qk_norm,
        bias_activation_fusion=False, hidden_dropout=0.0, attention_dropout=0.0, apply_rope_fusion=False,
        masked_softmax_fusion=False, params_dtype=dtype, bf16=dtype == torch.bfloat16, fp16=dtype == torch.float16,
        use_cpu_initialization=True, perform_initialization=False, **moe_config_fields(c))


def build_gpt(c: DecoderConfig, dtype: torch.dtype):
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    with cpu_shims():
        spec = get_gpt_layer_local_spec(num_experts=c.moe.num_experts if c.moe else None, qk_layernorm=c.qk_norm,
                                        normalization="RMSNorm")
        return GPTModel(transformer_config(c, dtype), spec,
                        vocab_size=c.vocab_size, max_sequence_length=c.max_position_embeddings,
                        share_embeddings_and_output_weights=c.tie_word_embeddings, position_embedding_type="rope",
                        rotary_base=int(c.rope_theta))


def load_gpt(gpt, iteration_dir: str) -> None:
    """megatron-core's own loading path; every tensor the model asks for must be in the checkpoint."""
    from megatron.core import dist_checkpointing

    wanted = gpt.sharded_state_dict()
    available = dist_checkpointing.load_tensors_metadata(iteration_dir)
    for name, sharded in wanted.items():
        key = getattr(sharded, "key", name)
        if hasattr(sharded, "local_shape") and key in available:
            have = tuple(available[key].global_shape)
            if have != tuple(sharded.global_shape):
                raise OrbitError(f"Megatron checkpoint {iteration_dir}: {key} is {have}, this model's config asks for "
                                 f"{tuple(sharded.global_shape)}", "convert the checkpoint of this architecture")
        elif hasattr(sharded, "local_shape"):
            raise OrbitError(f"Megatron checkpoint {iteration_dir} has no tensor {key}",
                             "it holds another architecture; convert the model with `orbit convert hf-to-megatron`")
    with cpu_shims():
        state = dist_checkpointing.load(wanted, iteration_dir)
    result = gpt.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if not k.endswith("_extra_state")]
    if missing:
        raise OrbitError(f"Megatron checkpoint {iteration_dir} did not fill {missing[0]}", "convert the model again")


class FusedParts(nn.Module):
    """A megatron fused linear replaced by its HF parts (this rank's shard of them under TP);
    ``forward`` returns megatron's ``(out, bias)``.

    ``parallel="column"``: the input is replicated and each part's output rows are this rank's
    (the input's gradient is all-reduced in backward). ``"row"``: the input columns are this rank's
    and the output is all-reduced, adapter included. A LoRA B applied to the partial
    ``A_i x_i`` before the sum gives ``B sum_i A_i x_i``, because B is linear and replicated."""

    def __init__(self, parts: dict[str, nn.Module], groups: int = 0, parallel: str = "column"):
        super().__init__()
        for name, part in parts.items():
            self.add_module(name, part)
        self.names = list(parts)
        self.groups = groups  # >0: q/k/v re-interleaved per query group
        self.parallel = parallel

    def forward(self, x: torch.Tensor):
        from megatron.core import parallel_state, tensor_parallel

        tp = parallel_state.get_tensor_model_parallel_world_size()
        if tp > 1 and self.parallel == "column":
            x = tensor_parallel.copy_to_tensor_model_parallel_region(x)
        outs = [getattr(self, name)(x) for name in self.names]
        if self.groups:
            q, k, v = (o.reshape(*o.shape[:-1], self.groups, -1) for o in outs)
            return torch.cat([q, k, v], dim=-1).flatten(-2), None
        out = torch.cat(outs, dim=-1) if len(outs) > 1 else outs[0]
        if tp > 1 and self.parallel == "row":
            out = tensor_parallel.reduce_from_tensor_model_parallel_region(out)
        return out, None


def _linear(weight: torch.Tensor, bias: torch.Tensor | None = None) -> nn.Linear:
    layer = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
    layer.weight = nn.Parameter(weight.detach().clone(), requires_grad=False)
    if bias is not None:
        layer.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)
    return layer


def split_fused_linears(gpt, c: DecoderConfig) -> None:
    """This rank's shard of each fused linear -> its HF parts (under TP, the rank's query groups of
    ``linear_qkv``, its rows of ``linear_fc1``, its input columns of ``linear_proj`` / ``linear_fc2``)."""
    import dataclasses

    from megatron.core import parallel_state

    from orbit_core.convert.megatron import _qkv_split

    tp = parallel_state.get_tensor_model_parallel_world_size()
    local = dataclasses.replace(c, num_heads=c.num_heads // tp, num_kv_heads=c.num_kv_heads // tp)
    for layer in gpt.decoder.layers:
        attn, mlp = layer.self_attention, layer.mlp
        qkv = attn.linear_qkv
        q, k, v = _qkv_split(local, qkv.weight)
        biases = _qkv_split(local, qkv.bias) if getattr(qkv, "bias", None) is not None else (None, None, None)
        attn.linear_qkv = FusedParts({"q_proj": _linear(q, biases[0]), "k_proj": _linear(k, biases[1]),
                                      "v_proj": _linear(v, biases[2])}, groups=local.num_kv_heads)
        attn.linear_proj = FusedParts({"o_proj": _linear(attn.linear_proj.weight)}, parallel="row")
        if is_moe_layer(mlp):  # megatron's router and experts run as they are (frozen, not adapted)
            continue
        gate, up = mlp.linear_fc1.weight.chunk(2, dim=0)
        mlp.linear_fc1 = FusedParts({"gate_proj": _linear(gate), "up_proj": _linear(up)})
        mlp.linear_fc2 = FusedParts({"down_proj": _linear(mlp.linear_fc2.weight)}, parallel="row")


ROW_PARALLEL = ("o_proj", "down_proj")


def shard_adapter(state: dict[str, torch.Tensor], rank: int, size: int) -> dict[str, torch.Tensor]:
    """A full (HF-named) adapter -> this TP rank's share, as the README's sharding design says:
    column-parallel parts (q/k/v, gate/up) keep A (and OFT's rotation) whole and take their rows of
    B; row-parallel parts (o_proj, down_proj) take their input columns of A (OFT: their rotation
    blocks) and keep B whole. q/k/v rows follow query groups, which HF lays out contiguously."""
    out = {}
    for name, tensor in state.items():
        module, leaf = name.rsplit(".", 1)
        row = module.rsplit(".", 1)[-1] in ROW_PARALLEL
        if leaf == "lora_B" and not row:
            tensor = tensor.chunk(size, dim=0)[rank]
        elif leaf == "lora_A" and row:
            tensor = tensor.chunk(size, dim=1)[rank]
        elif leaf == "oft_skew" and row and tensor.shape[0] > 1:
            tensor = tensor.chunk(size, dim=0)[rank]
        out[name] = tensor.contiguous()
    return out


class _Head(nn.Module):
    def __init__(self, gpt):
        super().__init__()
        self._gpt = [gpt]  # not a submodule: the weight belongs to the GPTModel
        self._whole: torch.Tensor | None = None

    @property
    def weight(self) -> torch.Tensor:
        """The whole ``[vocab, hidden]`` head. Under TP each rank holds a vocab shard; the head is
        frozen, so the shards are gathered once, and every rank then computes the same logprobs from
        the replicated final hidden state, with no collective in the loss."""
        gpt = self._gpt[0]
        local = gpt.shared_embedding_or_output_weight() if gpt.share_embeddings_and_output_weights else gpt.output_layer.weight
        import torch.distributed as dist
        from megatron.core import parallel_state

        size = parallel_state.get_tensor_model_parallel_world_size()
        if size == 1:
            return local
        if self._whole is None or self._whole.device != local.device:
            shards = [torch.empty_like(local) for _ in range(size)]  # list form: gloo has no all_gather_into_tensor
            dist.all_gather(shards, local.detach().contiguous(), group=parallel_state.get_tensor_model_parallel_group())
            self._whole = torch.cat(shards)[: gpt.vocab_size].contiguous()
        return self._whole

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden @ self.weight.t().to(hidden.dtype)


class MegatronLM(nn.Module):
    """The GPTModel as the trainer and the runtime preflight call it."""

    implementation = "megatron-core GPTModel"

    def __init__(self, gpt, config: DecoderConfig):
        super().__init__()
        self.gpt, self.config = gpt, config
        self.lm_head = _Head(gpt)
        self.activation_checkpointing = "none"

    def forward(self, input_ids: torch.Tensor, hidden_only: bool = False) -> torch.Tensor:
        batch, seq = input_ids.shape
        positions = torch.arange(seq, device=input_ids.device)[None].expand(batch, -1)
        causal = torch.triu(torch.ones(1, 1, seq, seq, dtype=torch.bool, device=input_ids.device), diagonal=1)
        with cpu_shims():
            pre = self.gpt._preprocess(input_ids=input_ids, position_ids=positions)
            hidden = self.gpt.decoder(hidden_states=pre[0], attention_mask=causal, rotary_pos_emb=pre[1])
        hidden = hidden.transpose(0, 1)  # megatron is sequence-first
        return hidden if hidden_only else self.lm_head(hidden).float()


def hf_names(model: MegatronLM) -> dict[str, str]:
    """Megatron-side module name of every adapted part -> the HF name Orbit's files and engine use."""
    out = {}
    for i in range(len(model.gpt.decoder.layers)):
        m, h = f"gpt.decoder.layers.{i}.", f"model.layers.{i}."
        for part in ("q_proj", "k_proj", "v_proj"):
            out[f"{m}self_attention.linear_qkv.{part}"] = f"{h}self_attn.{part}"
        out[f"{m}self_attention.linear_proj.o_proj"] = f"{h}self_attn.o_proj"
        if is_moe_layer(model.gpt.decoder.layers[i].mlp):
            continue
        for part in ("gate_proj", "up_proj"):
            out[f"{m}mlp.linear_fc1.{part}"] = f"{h}mlp.{part}"
        out[f"{m}mlp.linear_fc2.down_proj"] = f"{h}mlp.down_proj"
    return out


def load_megatron_policy(base_path: str, dtype: str, device: torch.device, training: bool = True,
                         megatron_dir: str | None = None) -> MegatronLM:
    """The base in a GPTModel. A dense HF base is converted to a temporary Megatron checkpoint and
    loaded through dist_checkpointing, its fused linears then split into HF parts. A packed
    (compressed-tensors) base keeps Orbit's quantized linears as those parts."""
    from orbit_core.convert.megatron import hf_to_megatron, resolve_iteration_dir
    from orbit_core.models.checkpoint import read_hf_config

    require_megatron()
    hf = read_hf_config(base_path)
    config = DecoderConfig.from_hf({k: v for k, v in hf.items() if k != "quantization_config"},
                                   source=os.path.join(base_path, "config.json"))
    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    ensure_model_parallel(device, training)
    from megatron.core import parallel_state

    tp = parallel_state.get_tensor_model_parallel_world_size()
    gpt = build_gpt(config, torch_dtype)
    if config.moe is not None:
        if hf.get("quantization_config"):
            raise OrbitError("train.backend=megatron builds MoE models from bf16/fp32 bases; this one is packed",
                             "use train.backend=torch for a packed MoE base")
        load_moe_from_hf(gpt, config, base_path)
        split_fused_linears(gpt, config)
    elif hf.get("quantization_config"):
        if tp > 1:
            raise OrbitError("a packed base runs at tensor-parallel size 1 only", "use a bf16 base for TP > 1")
        from orbit_core.policy.load import load_base

        adopt_packed_base(gpt, config, load_base(base_path, dtype, "cpu"))
    elif megatron_dir is not None:  # converted once, before the ranks started; each loads its shard
        load_gpt(gpt, str(resolve_iteration_dir(megatron_dir)))
        split_fused_linears(gpt, config)
    elif tp > 1:
        raise OrbitError("at tensor-parallel size > 1 the base must already be a Megatron checkpoint",
                         "run `orbit convert hf-to-megatron` once and pass its directory")
    else:
        with tempfile.TemporaryDirectory(prefix="orbit-megatron-base-") as root:
            hf_to_megatron(base_path, os.path.join(root, "mg"))
            load_gpt(gpt, str(resolve_iteration_dir(os.path.join(root, "mg"))))
        split_fused_linears(gpt, config)
    model = MegatronLM(gpt.to(device=device), config)
    model.requires_grad_(False)
    return model.eval()


def adopt_packed_base(gpt, c: DecoderConfig, base: nn.Module) -> None:
    """Give the GPTModel the packed base's linears as its parts, and its embeddings and norms."""
    dense = {"embedding.word_embeddings.weight": base.model.embed_tokens.weight,
             "decoder.final_layernorm.weight": base.model.norm.weight}
    if not c.tie_word_embeddings:
        dense["output_layer.weight"] = base.lm_head.weight
    for i, (layer, ours) in enumerate(zip(gpt.decoder.layers, base.model.layers)):
        m = f"decoder.layers.{i}."
        dense[m + "input_layernorm.weight"] = ours.input_layernorm.weight
        dense[m + "pre_mlp_layernorm.weight"] = ours.post_attention_layernorm.weight
        if c.qk_norm:
            dense[m + "self_attention.q_layernorm.weight"] = ours.self_attn.q_norm.weight
            dense[m + "self_attention.k_layernorm.weight"] = ours.self_attn.k_norm.weight
        attn, mlp = ours.self_attn, ours.mlp
        layer.self_attention.linear_qkv = FusedParts({"q_proj": attn.q_proj, "k_proj": attn.k_proj, "v_proj": attn.v_proj},
                                                     groups=c.num_kv_heads)
        layer.self_attention.linear_proj = FusedParts({"o_proj": attn.o_proj})
        layer.mlp.linear_fc1 = FusedParts({"gate_proj": mlp.gate_proj, "up_proj": mlp.up_proj})
        layer.mlp.linear_fc2 = FusedParts({"down_proj": mlp.down_proj})
    with torch.no_grad():
        params = dict(gpt.named_parameters())
        for name, tensor in dense.items():
            params[name].copy_(tensor)
