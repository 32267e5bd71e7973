"""Causal grouped-query attention over keys that carry their own positions.

Keys and queries carry explicit token positions, and key j is visible to query
i exactly when pos_k[j] <= pos_q[i]. This is ordinary causal attention for a
whole prompt, and it stays right when a cache holds only some of the prompt's
tokens (ASL keeps original positions) or when decoding appends new ones.

Queries are processed in blocks: a block needs only the keys up to its last
query's position, and only keys past its first query's position need masking,
so no (H, T, T) tensor is ever built: the keys past a block's last query are
never multiplied (there are no key blocks here; the port's blocked attention,
gpu/attention.py, has them).
"""

from __future__ import annotations

import numpy as np

QUERY_BLOCK = 128  # small enough that a block's scores stay in cache (see benchmarks/)


def group_attention(
    q: np.ndarray,  # (G, T, hd) the query heads that share one KV head
    k: np.ndarray,  # (S, hd)
    v: np.ndarray,  # (S, hd)
    q_pos: np.ndarray,  # (T,) ascending
    k_pos: np.ndarray,  # (S,) ascending
    block: int = QUERY_BLOCK,
) -> np.ndarray:
    """softmax(q k^T / sqrt(hd) + causal mask) v for one group of heads; returns (G, T, hd).

    Per query block: scores of the visible keys, masked where pos_k > pos_q,
    exp(scores - row max), then (exp @ v) / row sum. Dividing the (bq, hd)
    output instead of the (bq, S) weights, and scaling q instead of the scores,
    saves two passes over the scores; one buffer serves every block.
    """
    G, T, hd = q.shape
    q = q * (1.0 / float(np.sqrt(hd)))  # (G, T, hd), pre-scaled
    out = np.empty_like(q)  # (G, T, hd)
    visible_end = np.searchsorted(k_pos, q_pos, side="right")  # (T,) keys [0, end) are visible to query t
    buffer = np.empty(G * min(block, T) * int(visible_end[-1]), dtype=q.dtype)
    for a in range(0, T, block):
        b = min(a + block, T)
        first, last = int(visible_end[a]), int(visible_end[b - 1])  # keys < first: visible to the whole block
        s = buffer[: G * (b - a) * last].reshape(G, b - a, last)  # (G, bq, last)
        np.matmul(q[:, a:b], k[:last].T, out=s)
        hidden = k_pos[None, first:last] > q_pos[a:b, None]  # (bq, last - first)
        np.copyto(s[:, :, first:last], -np.inf, where=hidden)
        s -= s.max(axis=-1, keepdims=True)
        np.exp(s, out=s)
        out[:, a:b] = (s @ v[:last]) / s.sum(axis=-1, keepdims=True)
    return out
