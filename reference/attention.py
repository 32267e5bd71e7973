"""Causal grouped-query attention over keys that carry their own positions.

Keys and queries carry explicit token positions, and key j is visible to query
i exactly when pos_k[j] <= pos_q[i]. This is ordinary causal attention for a
whole prompt, and it stays right when a cache holds only some of the prompt's
tokens (ASL keeps original positions) or when decoding appends new ones.

Queries are processed in blocks: a block needs only the keys up to its last
query's position, and only keys past its first query's position need masking,
so no (H, T, T) tensor is ever built and fully masked key blocks are skipped.
"""

from __future__ import annotations

import numpy as np

QUERY_BLOCK = 1024


def softmax_(s: np.ndarray) -> np.ndarray:
    """Softmax over the last axis, in place (s is overwritten and returned)."""
    s -= s.max(axis=-1, keepdims=True)
    np.exp(s, out=s)
    s /= s.sum(axis=-1, keepdims=True)
    return s


def group_attention(
    q: np.ndarray,  # (G, T, hd) the query heads that share one KV head
    k: np.ndarray,  # (S, hd)
    v: np.ndarray,  # (S, hd)
    q_pos: np.ndarray,  # (T,) ascending
    k_pos: np.ndarray,  # (S,) ascending
    block: int = QUERY_BLOCK,
) -> np.ndarray:
    """softmax(q k^T / sqrt(hd) + causal mask) v for one group of heads; returns (G, T, hd)."""
    G, T, hd = q.shape
    scale = 1.0 / float(np.sqrt(hd))
    out = np.empty_like(q)  # (G, T, hd)
    for a in range(0, T, block):
        b = min(a + block, T)
        last = int(np.searchsorted(k_pos, q_pos[b - 1], side="right"))  # keys [0, last) may be visible
        first = int(np.searchsorted(k_pos, q_pos[a], side="right"))  # keys [0, first) are visible to all
        s = (q[:, a:b] @ k[:last].T) * scale  # (G, bq, last)
        hidden = k_pos[None, first:last] > q_pos[a:b, None]  # (bq, last - first)
        np.copyto(s[:, :, first:last], -np.inf, where=hidden)
        out[:, a:b] = softmax_(s) @ v[:last]
    return out
