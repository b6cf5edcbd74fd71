"""Rotary position embeddings: inverse frequencies for default, linear, llama3 and yarn scaling."""

from __future__ import annotations

import math
from typing import Any

import torch

from orbit_core.errors import OrbitError
from orbit_core.models.engine_forward import use_engine_kernels
from orbit_kernels.rope import apply_rope_reference, rope


def _llama3(inv_freq: torch.Tensor, rope: dict[str, Any]) -> torch.Tensor:
    # Llama 3.1 frequency-dependent interpolation: long wavelengths are divided by factor,
    # short ones kept, a smooth blend in between.
    factor = float(rope["factor"])
    low, high = float(rope.get("low_freq_factor", 1.0)), float(rope.get("high_freq_factor", 4.0))
    old_ctx = float(rope["original_max_position_embeddings"])
    low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_ctx / wavelen - low) / (high - low)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(medium, blended, scaled)


def _yarn(head_dim: int, base: float, rope: dict[str, Any], max_pos: int) -> tuple[torch.Tensor, float]:
    # YaRN (Peng et al. 2023): NTK-by-parts interpolation plus an attention temperature.
    orig = int(rope.get("original_max_position_embeddings") or max_pos)
    factor = rope.get("factor") or max_pos / orig
    factor = float(factor)

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attn = rope.get("attention_factor")
    if attn is None:
        m, m_all = rope.get("mscale"), rope.get("mscale_all_dim")
        attn = mscale(factor, m) / mscale(factor, m_all) if m and m_all else mscale(factor)
    beta_fast, beta_slow = rope.get("beta_fast") or 32, rope.get("beta_slow") or 1

    def correction_dim(rotations: float) -> float:
        return head_dim * math.log(orig / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if rope.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    if low == high:
        high += 0.001
    pos_freqs = base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    ramp = torch.clamp((torch.arange(head_dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    extrapolation = 1 - ramp
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation
    return inv_freq, float(attn)


def rope_inv_freq(head_dim: int, base: float, rope: dict[str, Any], max_pos: int) -> tuple[torch.Tensor, float]:
    """Return ``(inv_freq [head_dim/2], attention_scaling)`` for a rope_parameters dict."""
    kind = rope.get("rope_type", rope.get("type", "default")) if rope else "default"
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    if kind == "default":
        return inv_freq, 1.0
    if kind == "linear":
        return inv_freq / float(rope["factor"]), 1.0
    if kind == "llama3":
        return _llama3(inv_freq, rope), 1.0
    if kind == "yarn":
        return _yarn(head_dim, base, rope, max_pos)
    raise OrbitError(f"unsupported rope_type {kind!r}", "Orbit supports default, linear, llama3 and yarn RoPE")


def rope_tables(
    head_dim: int, base: float, rope: dict[str, Any], max_pos: int, length: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables ``[length, head_dim]`` in fp32, HF's rotate-half layout."""
    inv_freq, scaling = rope_inv_freq(head_dim, base, rope, max_pos)
    positions = torch.arange(length, dtype=torch.float32)
    freqs = torch.outer(positions, inv_freq)
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos() * scaling, emb.sin() * scaling


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [batch, heads, seq, head_dim]; cos/sin: [batch, seq, head_dim]."""
    if use_engine_kernels(x):
        return rope(x, cos, sin)  # one kernel in the rollout engine
    return apply_rope_reference(x, cos, sin)
