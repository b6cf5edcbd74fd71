"""The Llama / Qwen2 / Qwen3 dense decoder, one file, shared by the trainer and the rollout engine.

Module names follow the HF checkpoints (``model.layers.N.self_attn.q_proj``) so weights load by name.
Three call modes share the same math:
  * no cache: causal attention over right-padded sequences (training, scoring);
  * prefill: the same, also writing K/V of ``slots`` into the cache at positions ``0..T-1``;
  * decode: one token per cache slot, attending to cached keys ``< kv_len``.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint
from torch import nn

from orbit_core.models import dequant_ahead
from orbit_core.models.config import QWEN2_FAMILY, DecoderConfig
from orbit_core.models.engine_forward import use_engine_kernels
from orbit_core.models.mlp import MLP
from orbit_core.models.moe import SparseMoE
from orbit_core.models.projections import project
from orbit_core.models.rope import apply_rope, rope_tables
from orbit_core.models.shrink_fusion import add_norm, embed_norm
from orbit_kernels import dense_gemv as dense_gemv_kernels
from orbit_kernels import qk_rope as qk_kernels
from orbit_kernels.decode_attention import decode_attention
from orbit_kernels.qk_rope import decode_qk_, prefill_qk_
from orbit_kernels.rmsnorm import add_rms_norm, rms_norm, rms_norm_reference
from orbit_kernels.rope import rope_kv_write_, rope_kv_write_reference, rows_at


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalize in fp32 and cast back before the weight, as the reference implementation does.
        if use_engine_kernels(x):
            return rms_norm(x, self.weight, self.eps)  # one fused kernel in the rollout engine
        return rms_norm_reference(x, self.weight, self.eps)


@dataclass
class KVCache:
    """Preallocated keys/values: ``[layers, slots, kv_heads, capacity, head_dim]``."""

    k: torch.Tensor
    v: torch.Tensor

    @classmethod
    def allocate(cls, config: DecoderConfig, slots: int, capacity: int, dtype: torch.dtype, device: torch.device) -> "KVCache":
        shape = (config.num_layers, slots, config.num_kv_heads, capacity, config.head_dim)
        return cls(torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))

    @property
    def capacity(self) -> int:
        return self.k.shape[3]


class Attention(nn.Module):
    def __init__(self, config: DecoderConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads, self.num_kv_heads, self.head_dim = config.num_heads, config.num_kv_heads, config.head_dim
        bias = config.attention_bias
        self.q_proj = nn.Linear(config.hidden_size, self.num_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=bias)
        # Qwen2 biases q/k/v only; Llama and Qwen3 put attention_bias on o_proj too.
        o_bias = bias and config.model_type not in QWEN2_FAMILY
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=o_bias)
        if config.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
        else:
            self.q_norm = self.k_norm = None

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        cache: KVCache | None,
        slots: torch.Tensor | slice | None,
        decode: tuple[torch.Tensor, int] | None,
    ) -> torch.Tensor:
        """decode: ``(write_pos [slots], kv_len)`` in decode mode: each slot's new token goes to
        ``write_pos`` and attends to its cache positions up to it, of the first ``kv_len``; cos/sin
        are then the whole rope tables, read at ``write_pos`` (or, gathered, each row's rows)."""
        batch, seq, _ = x.shape
        q, k, v = project(x, self.q_proj, self.k_proj, self.v_proj)
        q = q.view(batch, seq, self.num_heads, self.head_dim)
        k = k.view(batch, seq, self.num_kv_heads, self.head_dim)
        v = v.view(batch, seq, self.num_kv_heads, self.head_dim)
        if decode is not None and use_engine_kernels(x):
            out = self._engine_decode(q, k, v, cos, sin, cache, decode[0])
            return self.o_proj(out.view(batch, seq, self.num_heads * self.head_dim))
        if decode is None and self._prefill_kernel(x, cache, slots):
            cache_k, cache_v = cache.k[self.layer_idx, slots], cache.v[self.layer_idx, slots]
            q = prefill_qk_(q, k, v, *self._qk_norms(), cos, sin, cache_k, cache_v)
            out = F.scaled_dot_product_attention(q, cache_k[:, :, :seq], cache_v[:, :, :seq], is_causal=True,
                                                 enable_gqa=self.num_heads != self.num_kv_heads)
            return self.o_proj(out.transpose(1, 2).reshape(batch, seq, self.num_heads * self.head_dim))
        if decode is not None:
            cos, sin = rows_at(cos, sin, decode[0])
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        q = apply_rope(q, cos, sin)
        if decode is None:
            k = apply_rope(k, cos, sin)
            if cache is not None:
                cache.k[self.layer_idx, slots, :, :seq] = k.to(cache.k.dtype)
                cache.v[self.layer_idx, slots, :, :seq] = v.to(cache.v.dtype)
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=self.num_heads != self.num_kv_heads)
        else:
            # decode, the reference: one new token per slot, over a mask of the first kv_len positions
            # (the engine's kernel reads each row's live keys and needs none)
            write_pos, kv_len = decode
            rope_kv_write_reference(k, v, cos, sin, cache.k[self.layer_idx], cache.v[self.layer_idx], write_pos)
            mask = (torch.arange(kv_len, device=q.device)[None, :] <= write_pos[:, None])[:, None, None, :]
            keys = cache.k[self.layer_idx, :, :, :kv_len].to(q.dtype)
            values = cache.v[self.layer_idx, :, :, :kv_len].to(q.dtype)
            # One query token per slot: fold each KV head's query group into the query-length axis,
            # so attention reads the cache once instead of expanding it per query head.
            group = self.num_heads // self.num_kv_heads
            q = q.reshape(batch, self.num_kv_heads, group, self.head_dim)
            out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)
            out = out.reshape(batch, self.num_heads, 1, self.head_dim)
        out = out.transpose(1, 2).reshape(batch, seq, self.num_heads * self.head_dim)
        return self.o_proj(out)

    def _qk_norms(self) -> tuple[torch.Tensor | None, torch.Tensor | None, float]:
        """The q/k kernels' norm arguments: (q weight, k weight, eps), or no weights without qk norms."""
        if self.q_norm is None:
            return None, None, 0.0
        return self.q_norm.weight, self.k_norm.weight, self.q_norm.eps

    def _prefill_kernel(self, x: torch.Tensor, cache: KVCache | None, slots) -> bool:
        """Whether an engine prefill takes ``orbit::prefill_qk_``: consecutive cache rows (a slice) of
        the activations' dtype, whose stored keys and values attention then reads."""
        return (cache is not None and isinstance(slots, slice) and qk_kernels.ENABLED and qk_kernels.PREFILL
                and cache.k.dtype == x.dtype and use_engine_kernels(x))

    def _engine_decode(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor,
                       sin: torch.Tensor, cache: KVCache, write_pos: torch.Tensor) -> torch.Tensor:
        """The rollout engine's decode step from the projected ``[rows, 1, heads, dim]`` q, k, v:
        store the new key and value, attend over each row's live keys only; ``[rows, heads, dim]``."""
        cache_k, cache_v = cache.k[self.layer_idx], cache.v[self.layer_idx]
        if qk_kernels.ENABLED:  # q/k norms, rope (each row's table rows found by the kernel) and the KV write
            q = decode_qk_(q, k, v, *self._qk_norms(), cos, sin, cache_k, cache_v, write_pos)
        else:
            cos, sin = rows_at(cos, sin, write_pos)
            if self.q_norm is not None:
                q, k = self.q_norm(q), self.k_norm(k)
            q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
            q = apply_rope(q, cos, sin)
            rope_kv_write_(k, v, cos, sin, cache_k, cache_v, write_pos)
        return decode_attention(q[:, :, 0], cache_k, cache_v, write_pos)


class DecoderLayer(nn.Module):
    def __init__(self, config: DecoderConfig, layer_idx: int):
        super().__init__()
        self.self_attn = Attention(config, layer_idx)
        if config.moe is not None and config.moe.is_sparse(layer_idx):
            self.mlp = SparseMoE(config)
        else:
            self.mlp = MLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x, cos, sin, cache, slots, decode, checkpoint_mlp: bool = False):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cache, slots, decode)
        if checkpoint_mlp:  # the SwiGLU's [tokens, intermediate] activations are the largest a layer keeps
            return x + checkpoint(self._mlp_block, x, use_reentrant=False)
        return x + self._mlp_block(x)

    def _mlp_block(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.post_attention_layernorm(x))


def _call_layer(layer: DecoderLayer, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                checkpoint_mlp: bool) -> torch.Tensor:
    return layer(x, cos, sin, None, None, None, checkpoint_mlp=checkpoint_mlp)


class DecoderBody(nn.Module):
    def __init__(self, config: DecoderConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class DecoderLM(nn.Module):
    """Causal LM. ``forward`` returns logits ``[batch, seq, vocab]`` (or ``[batch, vocab]`` with ``last_index``)."""

    implementation = "Orbit torch DecoderLM"

    def __init__(self, config: DecoderConfig):
        super().__init__()
        self.config = config
        self.model = DecoderBody(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self._rope_len = 0
        self.activation_checkpointing = "none"
        """``none``, ``full`` (recompute whole layers in backward) or ``selective`` (only the MLPs)."""
        self.training_layer_call = _call_layer
        """How a training forward (grad on, no cache) runs a layer: eager, or ``compile_training_layers``."""
        self.register_buffer("rope_cos", torch.empty(0), persistent=False)
        self.register_buffer("rope_sin", torch.empty(0), persistent=False)

    def _rope(self, positions: torch.Tensor, needed: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin at ``positions``; ``needed`` (the table length they need) when the caller knows it,
        else read back from the device (a sync, which a captured graph cannot hold)."""
        if needed is None:
            needed = int(positions.max().item()) + 1 if positions.numel() else 1
        if needed > self._rope_len:
            length = max(needed, 2 * self._rope_len, 256)
            c = self.config
            cos, sin = rope_tables(c.head_dim, c.rope_theta, c.rope_scaling, c.max_position_embeddings, length)
            self.rope_cos, self.rope_sin = cos.to(positions.device), sin.to(positions.device)
            self._rope_len = length
        return self.rope_cos[positions], self.rope_sin[positions]

    def compile_training_layers(self, backend: str = "inductor") -> None:
        """Run training forwards through one ``torch.compile``d layer call shared by every layer
        (parameters are graph inputs, so 28 layers are one compile, not 28)."""
        self.training_layer_call = torch.compile(_call_layer, dynamic=True, backend=backend)

    def ensure_rope(self, length: int, device: torch.device) -> None:
        """Precompute the rope tables so decode steps do no host-side work."""
        self._rope(torch.tensor([length - 1], device=device))

    def _engine_layers(self, x, cos, sin, cache, slots, decode, final_norm: RMSNorm | None = None, first=None):
        """The layers as the rollout engine runs them: each residual add joined to the norm after it
        (``orbit::add_rms_norm``), the same arithmetic as ``DecoderLayer.forward`` in fewer launches.
        ``(x, final_norm(x))``, or ``(x, None)`` without ``final_norm`` (a prefill norms its last rows
        only). ``first``: layer 0's ``(normed, shrink context)``, when computed with the embedding."""
        layers = self.model.layers
        ahead = dequant_ahead.plan(layers, x)  # packed weights that dequantize: one layer ahead, aside
        with ahead or nullcontext():
            normed, shrunk = first or (layers[0].input_layernorm(x), nullcontext())
            for i, layer in enumerate(layers):
                if ahead is not None:
                    ahead.enter_layer(i)
                with shrunk:
                    attended = layer.self_attn(normed, cos, sin, cache, slots, decode)
                x, normed, shrunk = add_norm(x, attended, layer.post_attention_layernorm, layer.mlp,
                                              ("gate_proj", "up_proj"))
                with shrunk:
                    out = layer.mlp(normed)
                if i + 1 < len(layers):
                    x, normed, shrunk = add_norm(x, out, layers[i + 1].input_layernorm, layers[i + 1].self_attn,
                                                  ("q_proj", "k_proj", "v_proj"))
                elif final_norm is not None:
                    return add_rms_norm(x, out, final_norm.weight, final_norm.eps)
                else:
                    x = x + out
        return x, None

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor | None = None,
        cache: KVCache | None = None,
        slots: torch.Tensor | slice | None = None,
        decode_kv_len: int | None = None,
        last_index: torch.Tensor | None = None,
        return_hidden: bool = False,
        hidden_only: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """input_ids/positions: [batch, seq]; last_index: [batch].

        ``decode_kv_len``: a decode step, one token a row written at ``positions`` into the cache,
        each row attending to its positions up to that one of the first ``decode_kv_len``.

        ``return_hidden`` also returns the final normed hidden states (what a value head reads);
        ``hidden_only`` returns just those, for a trainer that applies the lm_head in chunks.
        """
        known_length = None  # the rope table length positions need, when the host knows it
        if positions is None:
            positions = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
            known_length = input_ids.shape[1]
        decode = None
        if decode_kv_len is not None:  # the layers read the tables at each row's position
            cos, sin = self.rope_cos, self.rope_sin
            if not qk_kernels.GATHER_TABLES:
                cos, sin = cos[positions], sin[positions]
            decode = (positions[:, 0], decode_kv_len)
        else:
            cos, sin = self._rope(positions, known_length)
        training = self.training and torch.is_grad_enabled() and cache is None
        recompute = self.activation_checkpointing if training else "none"
        hidden = None
        if not training and use_engine_kernels(input_ids):
            layer0 = self.model.layers[0]
            x, *first = embed_norm(input_ids, self.model.embed_tokens, layer0.input_layernorm, layer0.self_attn,
                                   ("q_proj", "k_proj", "v_proj"))
            x, hidden = self._engine_layers(x, cos, sin, cache, slots, decode,
                                            self.model.norm if last_index is None else None, first)
        else:
            x = self.model.embed_tokens(input_ids)
            for layer in self.model.layers:
                if recompute == "full":  # keep each layer's input, recompute the rest (compiled or not) in backward
                    x = checkpoint(self.training_layer_call, layer, x, cos, sin, False, use_reentrant=False)
                elif training:
                    x = self.training_layer_call(layer, x, cos, sin, recompute == "selective")
                else:
                    x = layer(x, cos, sin, cache, slots, decode)
        if last_index is not None:
            x = x[torch.arange(x.shape[0], device=x.device), last_index]
        if hidden is None:
            hidden = self.model.norm(x)
        if hidden_only:
            return hidden
        logits = self._logits(hidden)
        return (logits, hidden) if return_hidden else logits

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The lm_head; in the engine, at the rows where it measured faster than cuBLAS, one Triton
        kernel under programmatic dependent launch (``orbit::dense_gemv``)."""
        head = self.lm_head
        if (use_engine_kernels(hidden) and type(head) is nn.Linear and head.bias is None
                and hidden.numel() // hidden.shape[-1] <= dense_gemv_kernels.MAX_ROWS):
            return dense_gemv_kernels.dense_gemv(hidden, head.weight)
        return head(hidden)
