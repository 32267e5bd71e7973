"""Random tiny models built in memory, for property tests over many shapes."""

from __future__ import annotations

import dataclasses

import numpy as np

from reference.model.config import parse_config
from reference.model.weights import LayerWeights, Weights


def random_model(
    seed: int, n_layers: int = 8, n_heads: int = 4, n_kv_heads: int = 2, head_dim: int = 8, hidden: int = 16,
    vocab: int = 64, bias: bool = False, tied: bool = False, dtype=np.float64, sharpness: float = 2.0,
    family: str | None = None, original_max: int = 16,
) -> Weights:
    """A Llama (or, with bias, Qwen2) model with seeded random weights; q/k scaled by `sharpness`.

    family="qwen3": per-head q_norm / k_norm weights too (drawn after everything else, so the other weights are
    those of the same seed without them); family="phi3": LongRoPE with `original_max` as the original context
    and seeded factor lists (hidden must be n_heads · head_dim, as Phi-3's config requires).
    """
    model_type = family or ("qwen2" if bias else "llama")
    rng = np.random.default_rng(seed)
    extra = {}
    if model_type == "phi3":
        factors = np.random.default_rng(seed + 1).uniform(1.0, 8.0, (2, head_dim // 2)).round(3)
        extra = dict(original_max_position_embeddings=original_max, rope_scaling=dict(
            rope_type="longrope", short_factor=factors[0].tolist(), long_factor=(factors[1] * 4).tolist()))
    cfg = parse_config(dict(
        model_type=model_type, vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
        num_hidden_layers=n_layers, num_attention_heads=n_heads, num_key_value_heads=n_kv_heads, head_dim=head_dim,
        rms_norm_eps=1e-6, max_position_embeddings=4096, tie_word_embeddings=tied, **extra,
    ))

    def normal(*shape, std=1.0):
        return (std * rng.standard_normal(shape)).astype(dtype)

    D, F, q_out, kv_out = hidden, 2 * hidden, n_heads * head_dim, n_kv_heads * head_dim
    layers = tuple(
        LayerWeights(
            attn_norm=1.0 + normal(D, std=0.1),
            wq=normal(q_out, D, std=sharpness / D**0.5), wk=normal(kv_out, D, std=sharpness / D**0.5),
            wv=normal(kv_out, D, std=1 / D**0.5), wo=normal(D, q_out, std=0.5 / q_out**0.5),
            bq=normal(q_out, std=0.3) if bias else None, bk=normal(kv_out, std=0.3) if bias else None,
            bv=normal(kv_out, std=0.3) if bias else None, bo=None,
            mlp_norm=1.0 + normal(D, std=0.1), w_gate=normal(F, D, std=1 / D**0.5),
            w_up=normal(F, D, std=1 / D**0.5), w_down=normal(D, F, std=0.5 / F**0.5),
        )
        for _ in range(n_layers)
    )
    embed = normal(vocab, D)
    weights = Weights(cfg, embed, layers, 1.0 + normal(D, std=0.1),
                      embed if tied else normal(vocab, D, std=1 / D**0.5), np.dtype(dtype))
    if cfg.qk_norm:
        layers = tuple(dataclasses.replace(lw, q_norm=1.0 + normal(head_dim, std=0.2), k_norm=1.0 + normal(head_dim, std=0.2))
                       for lw in layers)
        weights = dataclasses.replace(weights, layers=layers)
    return weights
