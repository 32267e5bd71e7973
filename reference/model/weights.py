"""Weights: the arrays of one checkpoint, and the one table of tensor names and shapes a config implies.

Names are Hugging Face's (`model.layers.{i}.self_attn.q_proj.weight`, ...); the loader
(`reference.io.checkpoint`) and the GGUF importer (`reference.io.gguf`) both read this table.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from reference.model.config import Config


@dataclass(frozen=True)
class LayerWeights:
    """One decoder layer. Projections are stored as in HF: (out, in), used as x @ W.T."""

    attn_norm: np.ndarray  # (D,)
    wq: np.ndarray  # (H*hd, D)
    wk: np.ndarray  # (H_kv*hd, D)
    wv: np.ndarray  # (H_kv*hd, D)
    wo: np.ndarray  # (D, H*hd)
    bq: np.ndarray | None  # (H*hd,)
    bk: np.ndarray | None  # (H_kv*hd,)
    bv: np.ndarray | None  # (H_kv*hd,)
    bo: np.ndarray | None  # (D,)
    mlp_norm: np.ndarray  # (D,)
    w_gate: np.ndarray  # (F, D)
    w_up: np.ndarray  # (F, D)
    w_down: np.ndarray  # (D, F)


@dataclass(frozen=True)
class Weights:
    config: Config
    embed: np.ndarray  # (V, D)
    layers: tuple[LayerWeights, ...]
    norm: np.ndarray  # (D,)
    lm_head: np.ndarray  # (V, D); the embedding itself when tied
    dtype: np.dtype


def axes(cfg: Config) -> dict[str, tuple[str, ...]]:
    """Every tensor name the config implies, with its shape as axis symbols (see axis_sizes)."""
    axes = {"model.embed_tokens.weight": ("V", "D"), "model.norm.weight": ("D",)}
    if not cfg.tie_word_embeddings:
        axes["lm_head.weight"] = ("V", "D")
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        axes |= {
            p + "input_layernorm.weight": ("D",),
            p + "self_attn.q_proj.weight": ("Q", "D"),
            p + "self_attn.k_proj.weight": ("KV", "D"),
            p + "self_attn.v_proj.weight": ("KV", "D"),
            p + "self_attn.o_proj.weight": ("D", "Q"),
            p + "post_attention_layernorm.weight": ("D",),
            p + "mlp.gate_proj.weight": ("F", "D"),
            p + "mlp.up_proj.weight": ("F", "D"),
            p + "mlp.down_proj.weight": ("D", "F"),
        }
        if cfg.attention_bias:
            axes |= {
                p + "self_attn.q_proj.bias": ("Q",),
                p + "self_attn.k_proj.bias": ("KV",),
                p + "self_attn.v_proj.bias": ("KV",),
            }
        if cfg.o_proj_bias:
            axes[p + "self_attn.o_proj.bias"] = ("D",)
    return axes


def axis_sizes(cfg: Config) -> dict[str, tuple[int, str, str]]:
    """axis symbol -> (size, how config.json gives it, the keys to fix)."""
    H, H_kv, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    return {
        "V": (cfg.vocab_size, f"vocab_size = {cfg.vocab_size}", "vocab_size"),
        "D": (cfg.hidden_size, f"hidden_size = {cfg.hidden_size}", "hidden_size"),
        "F": (cfg.intermediate_size, f"intermediate_size = {cfg.intermediate_size}", "intermediate_size"),
        "Q": (H * hd, f"num_attention_heads × head_dim = {H} × {hd} = {H * hd}", "num_attention_heads or head_dim"),
        "KV": (H_kv * hd, f"num_key_value_heads × head_dim = {H_kv} × {hd} = {H_kv * hd}",
               "num_key_value_heads or head_dim"),
    }


def expected_tensors(cfg: Config) -> dict[str, tuple[int, ...]]:
    """Every tensor name the config implies, with its shape."""
    sizes = axis_sizes(cfg)
    return {name: tuple(sizes[x][0] for x in a) for name, a in axes(cfg).items()}
