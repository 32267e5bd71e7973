"""Rotary position embedding, in Hugging Face's half-split layout.

Each head vector x of size d is seen as two halves (x1, x2); position p turns
pair (x1[i], x2[i]) by the angle p * inv_freq[i]:

    rope(x, p) = x * cos(p θ) + rotate_half(x) * sin(p θ),   rotate_half(x) = (-x2, x1)

Angles are computed in float64 and rounded once to the compute dtype.

LongRoPE (Phi-3) divides frequency i by short_factor[i] or long_factor[i] and
multiplies cos and sin by the attention factor. Which set: as transformers'
`dynamic_rope_update` decides it, per forward call, from that call's last
position: long_factor iff max(position) + 1 > original_max_position_embeddings,
for every position of the call (docs/models.md).
"""

from __future__ import annotations

import math

import numpy as np

from reference.model.config import Config


def uses_long_factors(cfg: Config, positions: np.ndarray) -> bool:
    """LongRoPE: whether a forward call over `positions` uses long_factor (its length max(pos) + 1 exceeds
    original_max_position_embeddings); False for every other rope type."""
    rs = cfg.rope_scaling
    return rs.rope_type == "longrope" and len(positions) > 0 and int(np.max(positions)) + 1 > rs.original_max_position_embeddings


def longrope_switch_position(cfg: Config) -> int | None:
    """LongRoPE: the first position whose forward call uses long_factor (original_max_position_embeddings);
    keys cached by calls before it were rotated with short_factor. None for other rope types."""
    rs = cfg.rope_scaling
    return rs.original_max_position_embeddings if rs.rope_type == "longrope" else None


def inverse_frequencies(cfg: Config, long: bool = False) -> np.ndarray:
    """θ_i = 1 / theta^(2i/d), i = 0 .. d/2-1, rescaled as the config's rope_scaling says
    (`long`: LongRoPE's long_factor set instead of short_factor)."""
    d = cfg.head_dim
    inv_freq = 1.0 / cfg.rope_theta ** (np.arange(0, d, 2, dtype=np.float64) / d)  # (d/2,)
    rs = cfg.rope_scaling
    if rs.rope_type == "linear":
        return inv_freq / rs.factor
    if rs.rope_type == "llama3":
        return _llama3_scaling(inv_freq, rs)
    if rs.rope_type == "longrope":
        # transformers: 1 / (ext_factors * base ** (2i / d))
        factors = np.asarray(rs.long_factor if long else rs.short_factor, dtype=np.float64)
        return 1.0 / (factors * cfg.rope_theta ** (np.arange(0, d, 2, dtype=np.float64) / d))
    return inv_freq


def attention_scaling(cfg: Config) -> float:
    """The factor on cos and sin: LongRoPE's attention factor, 1 for every other rope type."""
    rs = cfg.rope_scaling
    return rs.attention_factor if rs.rope_type == "longrope" else 1.0


def _llama3_scaling(inv_freq: np.ndarray, rs) -> np.ndarray:
    """Llama 3.1: slow long wavelengths by `factor`, keep short ones, blend in between."""
    wavelen = 2.0 * math.pi / inv_freq
    low_freq_wavelen = rs.original_max_position_embeddings / rs.low_freq_factor
    high_freq_wavelen = rs.original_max_position_embeddings / rs.high_freq_factor
    smooth = (rs.original_max_position_embeddings / wavelen - rs.low_freq_factor) / (
        rs.high_freq_factor - rs.low_freq_factor
    )
    blended = (1.0 - smooth) * inv_freq / rs.factor + smooth * inv_freq
    return np.where(
        wavelen > low_freq_wavelen,
        inv_freq / rs.factor,  # long wavelengths: scaled
        np.where(wavelen < high_freq_wavelen, inv_freq, blended),  # short: kept; medium: blended
    )


def rope_tables(cfg: Config, positions: np.ndarray, dtype) -> tuple[np.ndarray, np.ndarray]:
    """cos and sin of every angle, each (T, d): the half-size table repeated twice, times the attention
    scaling (LongRoPE); the frequencies are the set one forward call over `positions` uses."""
    inv_freq = inverse_frequencies(cfg, uses_long_factors(cfg, positions))
    angles = positions.astype(np.float64)[:, None] * inv_freq[None, :]  # (T, d/2)
    angles = np.concatenate([angles, angles], axis=-1)  # (T, d)
    cos, sin = np.cos(angles), np.sin(angles)
    scale = attention_scaling(cfg)
    if scale != 1.0:
        cos, sin = cos * scale, sin * scale
    return cos.astype(dtype), sin.astype(dtype)


def rotate_half(x: np.ndarray) -> np.ndarray:
    """(x1, x2) -> (-x2, x1) along the last axis."""
    x1, x2 = np.split(x, 2, axis=-1)
    return np.concatenate([-x2, x1], axis=-1)


def apply_rope(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """x (n_heads, T, d) rotated by the angles of its T positions."""
    return x * cos + rotate_half(x) * sin
