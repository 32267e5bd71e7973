"""Token scores (docs/semantics.md §1): how much the last w prompt queries attend to each earlier token.

Scoring only computes numbers; turning them into kept positions is
`selection.py`'s job. Symbols: n tokens in the layer, w window, s kernel,
H query heads, H_kv KV heads, G = H / H_kv; docs/shapes.md.

One arithmetic for both engines: `causal_window_softmax`, `pool` and
`last_query_scores` take the array module (`xp`, NumPy or CuPy) the way
scikit-learn's array-API code does, and the port (gpu/engine.py) calls them
on its device arrays; only its per-KV-group, threaded loop around them is its own.
"""

from __future__ import annotations

import numpy as np


def window_attention(q_window: np.ndarray, k: np.ndarray, group_size: int) -> np.ndarray:
    """Softmax attention of the last w queries over all n keys, causal inside the window.

    q_window (H, w, hd): queries of tokens n-w .. n-1; k (H_kv, n, hd). Query
    n-w+i sees keys 0 .. n-w+i. Computed in at least float32. Returns (H, w, n).
    """
    H, w, hd = q_window.shape
    dtype = np.promote_types(q_window.dtype, np.float32)
    k_per_head = np.repeat(k, group_size, axis=0).astype(dtype, copy=False)  # (H, n, hd): head h reads KV head h // G
    logits = (q_window.astype(dtype, copy=False) @ k_per_head.transpose(0, 2, 1)) * (1.0 / float(np.sqrt(hd)))  # (H, w, n)
    return causal_window_softmax(logits)  # (H, w, n)


def causal_window_softmax(logits, xp=np):
    """Softmax over the keys of the window queries' scaled logits (heads, w, n), in place: query n-w+i does
    not see the window keys after it (every prefix key is visible). Returns the same array."""
    w, n = logits.shape[-2:]
    hidden = xp.asarray(np.triu(np.ones((w, w), dtype=bool), 1))  # (w, w): key n-w+j hidden from query n-w+i, j > i
    xp.copyto(logits[..., n - w:], logits.dtype.type(-np.inf), where=hidden)
    logits -= logits.max(axis=-1, keepdims=True)
    xp.exp(logits, out=logits)
    logits /= logits.sum(axis=-1, keepdims=True)
    return logits


def prefix_attention(q_window: np.ndarray, k: np.ndarray, group_size: int) -> np.ndarray:
    """u[h, j] = Σ_i attn[h, i, j] over the w window queries, for prefix tokens j < n - w. (H, n-w)."""
    w = q_window.shape[1]
    attn = window_attention(q_window, k, group_size)  # (H, w, n)
    return attn[:, :, : k.shape[1] - w].sum(axis=1)  # (H, n-w)


def pool(u, kernel: int, kind: str = "avg", xp=np):
    """1-D pooling along the last axis: width s, stride 1, s//2 padding on each side.

    avg: the padding counts as zeros and the divisor is always s (also at the
    edges). max: the padding never wins. Output has u's shape.

    The window sums add the s shifted copies of the padded row in order, so
    every window adds its elements left to right: two windows holding the same
    values (e.g. the whole row plus different amounts of zero padding) get the
    same bits, and SPEC's tie rule (earlier position wins) decides between them,
    not rounding.
    """
    half, n = kernel // 2, u.shape[-1]
    pad_value = 0.0 if kind == "avg" else -np.inf
    padded = xp.pad(u, [(0, 0)] * (u.ndim - 1) + [(half, half)], constant_values=pad_value)  # (..., n + 2·half)
    if kind == "avg":
        total = xp.zeros_like(u)
        for t in range(kernel):
            total += padded[..., t : t + n]
        return total / float(kernel)
    best = padded[..., 0:n].copy()
    for t in range(1, kernel):
        xp.maximum(best, padded[..., t : t + n], out=best)
    return best


def pooled_head_scores(q_window, k, group_size: int, kernel: int, pooling: str) -> np.ndarray:
    """p[h, j] = pool(u[h, :])[j]: steps 1-3 of docs/semantics.md §1. (H, n-w)."""
    return pool(prefix_attention(q_window, k, group_size), kernel, pooling)


def token_scores(p: np.ndarray) -> np.ndarray:
    """score[j] = Σ_h p[h, j], summed over every query head (ASL, FastKV). (n-w,)."""
    return p.sum(axis=0)


def group_scores(p: np.ndarray, group_size: int) -> np.ndarray:
    """score_g[j] = Σ over the heads h of KV group g of p[h, j] (SnapKV). (H_kv, n-w)."""
    H, n = p.shape
    return p.reshape(H // group_size, group_size, n).sum(axis=1)


def last_query_scores(q_last, k, group_size: int, kernel: int = 5, xp=np):
    """GemFilter: Σ_h Q[h, N-1] · K[h//G, j] (raw dot products: no scaling, no softmax), avg-pooled. (N,).

    q_last (H, hd); k (H_kv, N, hd). The dot products are an elementwise product and sums, not an einsum
    (CuPy turns that einsum into millions of 1x1 batched GEMMs).
    """
    H, hd = q_last.shape
    q_groups = q_last.reshape(H // group_size, group_size, hd).sum(axis=1)  # (H_kv, hd): Σ over the group's heads
    dots = (k * q_groups[:, None, :]).sum(axis=-1).sum(axis=0)  # (N,)
    return pool(dots[None, :], kernel, "avg", xp=xp)[0]
