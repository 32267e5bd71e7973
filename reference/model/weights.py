"""Weights: the arrays of one checkpoint, and the one table of tensor names and shapes a config implies.

Names are Hugging Face's (`model.layers.{i}.self_attn.q_proj.weight`, ...); the loader
(`reference.io.checkpoint`) and the GGUF importer (`reference.io.gguf`) both read this table.
It lists the tensors as the checkpoint stores them: Phi-3's fused `qkv_proj` and
`gate_up_proj` are two entries, and `FUSED` says which rows of each become which
`LayerWeights` field; the loader splits them once, when it loads them, never at run time.
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
    q_norm: np.ndarray | None = None  # (hd,) Qwen3: RMSNorm weight of every query head, before rope
    k_norm: np.ndarray | None = None  # (hd,) Qwen3: the same for every key head


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
        axes[p + "input_layernorm.weight"] = ("D",)
        if cfg.fused_projections:
            axes[p + "self_attn.qkv_proj.weight"] = ("QKV", "D")
        else:
            axes |= {
                p + "self_attn.q_proj.weight": ("Q", "D"),
                p + "self_attn.k_proj.weight": ("KV", "D"),
                p + "self_attn.v_proj.weight": ("KV", "D"),
            }
        axes |= {
            p + "self_attn.o_proj.weight": ("D", "Q"),
            p + "post_attention_layernorm.weight": ("D",),
        }
        if cfg.fused_projections:
            axes[p + "mlp.gate_up_proj.weight"] = ("F2", "D")
        else:
            axes |= {p + "mlp.gate_proj.weight": ("F", "D"), p + "mlp.up_proj.weight": ("F", "D")}
        axes[p + "mlp.down_proj.weight"] = ("D", "F")
        if cfg.qk_norm:
            axes |= {p + "self_attn.q_norm.weight": ("d",), p + "self_attn.k_norm.weight": ("d",)}
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
    H, H_kv, hd, F = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.intermediate_size
    return {
        "V": (cfg.vocab_size, f"vocab_size = {cfg.vocab_size}", "vocab_size"),
        "D": (cfg.hidden_size, f"hidden_size = {cfg.hidden_size}", "hidden_size"),
        "F": (F, f"intermediate_size = {F}", "intermediate_size"),
        "Q": (H * hd, f"num_attention_heads × head_dim = {H} × {hd} = {H * hd}", "num_attention_heads or head_dim"),
        "KV": (H_kv * hd, f"num_key_value_heads × head_dim = {H_kv} × {hd} = {H_kv * hd}",
               "num_key_value_heads or head_dim"),
        "d": (hd, f"head_dim = {hd}", "head_dim"),
        "QKV": ((H + 2 * H_kv) * hd,
                f"(num_attention_heads + 2 × num_key_value_heads) × head_dim = ({H} + 2 × {H_kv}) × {hd} "
                f"= {(H + 2 * H_kv) * hd}, the rows of q, k and v", "num_attention_heads, num_key_value_heads or head_dim"),
        "F2": (2 * F, f"2 × intermediate_size = 2 × {F} = {2 * F}, the rows of gate and up", "intermediate_size"),
    }


def expected_tensors(cfg: Config) -> dict[str, tuple[int, ...]]:
    """Every tensor name the config implies, with its shape."""
    sizes = axis_sizes(cfg)
    return {name: tuple(sizes[x][0] for x in a) for name, a in axes(cfg).items()}


def fused_parts(cfg: Config) -> dict[str, tuple[tuple[str, int, int], ...]]:
    """Phi-3: a fused tensor's name within a layer -> (LayerWeights field, first row, end row) of each part.

    qkv_proj holds q's H·hd rows, then k's H_kv·hd, then v's H_kv·hd (transformers' Phi3Attention slices it so);
    gate_up_proj holds gate's F rows, then up's F (Phi3MLP's `chunk(2)`: the first half goes through silu).
    Empty for families that store the parts separately.
    """
    if not cfg.fused_projections:
        return {}
    Q, KV, F = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim, cfg.intermediate_size
    return {
        "self_attn.qkv_proj.weight": (("wq", 0, Q), ("wk", Q, Q + KV), ("wv", Q + KV, Q + 2 * KV)),
        "mlp.gate_up_proj.weight": (("w_gate", 0, F), ("w_up", F, 2 * F)),
    }
