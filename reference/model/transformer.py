"""The transformer: RMSNorm, rotary GQA attention, SwiGLU MLP, final norm, LM head.

Pure functions over arrays. The KV cache is passed in and returned, never
hidden in an object; each layer, and each KV head within a layer, holds its own
keys, values and token positions, so layers may hold different numbers of
tokens (ASL's pruning needs that). Shape legend: docs/shapes.md.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from reference.model.attention import group_attention
from reference.model.config import Config
from reference.model.rope import apply_rope, rope_tables
from reference.model.weights import LayerWeights, Weights


@dataclass(frozen=True)
class HeadCache:
    """What one KV head of one layer remembers: keys (after rope), values, positions."""

    k: np.ndarray  # (S, hd)
    v: np.ndarray  # (S, hd)
    pos: np.ndarray  # (S,) int64, ascending original positions


LayerCache = tuple[HeadCache, ...]  # one per KV head
KVCache = tuple[LayerCache, ...]  # one per layer


def rms_norm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    """x / sqrt(mean(x^2) + eps) * weight over the last axis: the model dimension of x (T, D), or the head
    dimension of q or k (n, T, hd) for Qwen3's q_norm / k_norm."""
    mean_square = np.mean(x * x, axis=-1, keepdims=True)  # (T, 1)
    return x / np.sqrt(mean_square + eps) * weight


def silu(x: np.ndarray) -> np.ndarray:
    """x * sigmoid(x) = x / (1 + e^-x); for x < -88 (float32) e^-x overflows to inf and gives the right -0."""
    with np.errstate(over="ignore", under="ignore"):
        return x / (1.0 + np.exp(-x))


def linear(x: np.ndarray, w: np.ndarray, b: np.ndarray | None = None) -> np.ndarray:
    """x @ W^T (+ b), W stored (out, in) as in Hugging Face checkpoints."""
    y = x @ w.T
    return y if b is None else y + b


def mlp(x: np.ndarray, lw: LayerWeights) -> np.ndarray:
    """SwiGLU: down(silu(gate(x)) * up(x)); x (T, D) -> (T, D)."""
    return linear(silu(linear(x, lw.w_gate)) * linear(x, lw.w_up), lw.w_down)


def split_heads(x: np.ndarray, n_heads: int) -> np.ndarray:
    """(T, n*hd) -> (n, T, hd)."""
    T = x.shape[0]
    return x.reshape(T, n_heads, -1).transpose(1, 0, 2)


def project_qkv(
    x: np.ndarray, lw: LayerWeights, cfg: Config, positions: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Normed hidden states (T, D) -> q (H, T, hd), k (H_kv, T, hd) after rope, v (H_kv, T, hd).

    Qwen3 (`lw.q_norm`, `lw.k_norm`): every query and key head is RMS-normalised over its hd values, with the
    model's rms_norm_eps, before the rotation (transformers' Qwen3Attention).
    """
    q = split_heads(linear(x, lw.wq, lw.bq), cfg.num_attention_heads)  # (H, T, hd)
    k = split_heads(linear(x, lw.wk, lw.bk), cfg.num_key_value_heads)  # (H_kv, T, hd)
    v = split_heads(linear(x, lw.wv, lw.bv), cfg.num_key_value_heads)  # (H_kv, T, hd)
    if lw.q_norm is not None:
        q = rms_norm(q, lw.q_norm, cfg.rms_norm_eps)
    if lw.k_norm is not None:
        k = rms_norm(k, lw.k_norm, cfg.rms_norm_eps)
    cos, sin = rope_tables(cfg, positions, x.dtype)  # (T, hd) each
    return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v


def extend_cache(
    old: LayerCache | None, k: np.ndarray, v: np.ndarray, positions: np.ndarray
) -> LayerCache:
    """Append the new tokens' keys and values (H_kv, T, hd) to every KV head's cache."""
    if old is None:
        return tuple(HeadCache(k[g], v[g], positions) for g in range(k.shape[0]))
    return tuple(
        HeadCache(
            np.concatenate([h.k, k[g]]), np.concatenate([h.v, v[g]]), np.concatenate([h.pos, positions])
        )
        for g, h in enumerate(old)
    )


def cached_keys(cache: LayerCache) -> np.ndarray:
    """The keys of a cache whose heads hold the same tokens, stacked: (H_kv, S, hd)."""
    return np.stack([h.k for h in cache])


def attend(q: np.ndarray, cache: LayerCache, positions: np.ndarray, cfg: Config) -> np.ndarray:
    """Each query head h attends over the cache of KV head h // G; q (H, T, hd) -> (T, H*hd)."""
    G = cfg.group_size
    out = np.empty_like(q)  # (H, T, hd)
    for g, head in enumerate(cache):
        out[g * G : (g + 1) * G] = group_attention(q[g * G : (g + 1) * G], head.k, head.v, positions, head.pos)
    return out.transpose(1, 0, 2).reshape(q.shape[1], -1)  # (T, H*hd)


def decoder_layer(
    x: np.ndarray, lw: LayerWeights, cfg: Config, positions: np.ndarray, cache: LayerCache | None
) -> tuple[np.ndarray, LayerCache, np.ndarray]:
    """One pre-norm block: x + attn(norm(x)), then + mlp(norm(.)); x (T, D).

    Returns the new hidden states, the layer's extended cache, and the rotated
    queries q (H, T, hd), which token scoring reads.
    """
    q, k, v = project_qkv(rms_norm(x, lw.attn_norm, cfg.rms_norm_eps), lw, cfg, positions)
    cache = extend_cache(cache, k, v, positions)
    x = x + linear(attend(q, cache, positions, cfg), lw.wo, lw.bo)
    x = x + mlp(rms_norm(x, lw.mlp_norm, cfg.rms_norm_eps), lw)
    return x, cache, q


def embed(weights: Weights, token_ids: np.ndarray) -> np.ndarray:
    """Token ids (T,) -> hidden states (T, D) in the weights' dtype."""
    return weights.embed[token_ids].astype(weights.dtype, copy=True)


def lm_head(weights: Weights, x: np.ndarray) -> np.ndarray:
    """Final norm, then logits over the vocabulary; x (T, D) -> (T, V)."""
    return linear(rms_norm(x, weights.norm, weights.config.rms_norm_eps), weights.lm_head)


def forward(
    weights: Weights,
    token_ids: np.ndarray,
    positions: np.ndarray,
    cache: KVCache | None = None,
    all_logits: bool = False,
    queries: list | None = None,
) -> tuple[np.ndarray, KVCache]:
    """Run tokens through every layer, appending to `cache` (None: start empty).

    Returns the logits of the last token (V,), or of every token (T, V) with
    `all_logits`, and the extended cache. A `queries` list receives each layer's rotated queries (H, T, hd).
    """
    x = embed(weights, token_ids)  # (T, D)
    layer_caches = []
    for i, lw in enumerate(weights.layers):
        x, layer_cache, q = decoder_layer(x, lw, weights.config, positions, None if cache is None else cache[i])
        layer_caches.append(layer_cache)
        if queries is not None:
            queries.append(q)
    logits = lm_head(weights, x if all_logits else x[-1:])  # (T, V) or (1, V)
    return (logits if all_logits else logits[0]), tuple(layer_caches)


def prefill(weights: Weights, token_ids, all_logits: bool = False) -> tuple[np.ndarray, KVCache]:
    """The whole prompt at positions 0 .. N-1, from an empty cache."""
    token_ids = np.asarray(token_ids, dtype=np.int64)
    return forward(weights, token_ids, np.arange(len(token_ids), dtype=np.int64), None, all_logits)


def decode_step(
    weights: Weights, cache: KVCache, token: int, position: int, queries: list | None = None
) -> tuple[np.ndarray, KVCache]:
    """One generated token at `position`: its logits (V,) and the cache with it appended
    (`queries`, when given, receives each layer's rotated query (H, 1, hd))."""
    return forward(
        weights, np.array([token], dtype=np.int64), np.array([position], dtype=np.int64), cache, queries=queries
    )
