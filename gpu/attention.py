"""Attention at size: query blocks × key blocks with an online softmax (memory O(G·bq·bk)).

Same contract as `reference.attention.group_attention` (key j is visible to
query i iff pos_k[j] <= pos_q[i]); written for any array module `xp`. Within
a query block, key blocks are visited in order while a running row maximum m,
a running normaliser l and an accumulator carry the softmax across them:

    m' = max(m, rowmax(s)),   l' = l·e^(m-m') + Σ e^(s-m'),   acc' = acc·e^(m-m') + e^(s-m') v

so no score matrix larger than one block pair is ever held. Scores, softmax
and accumulation are float32 whatever the cache dtype.
"""

from __future__ import annotations

import numpy as np


def flash_group_attention(
    xp,
    q: "xp.ndarray",  # (G, T, hd) float32, the query heads of one KV group
    k: "xp.ndarray",  # (S, hd) cache dtype
    v: "xp.ndarray",  # (S, hd)
    q_pos: np.ndarray,  # (T,) ascending, host
    k_pos: np.ndarray,  # (S,) ascending, host
    block_q: int,
    block_k: int,
) -> "xp.ndarray":
    G, T, hd = q.shape
    f32 = np.float32
    scale = 1.0 / float(np.sqrt(hd))
    visible_end = np.searchsorted(k_pos, q_pos, side="right")  # (T,) on the host: block bounds are Python ints
    k_pos_dev = xp.asarray(k_pos)
    q_pos_dev = xp.asarray(q_pos)
    out = xp.empty((G, T, hd), dtype=f32)
    for a in range(0, T, block_q):
        b = min(a + block_q, T)
        first, last = int(visible_end[a]), int(visible_end[b - 1])
        qb = q[:, a:b] * f32(scale)  # (G, bq, hd)
        m = xp.full((G, b - a, 1), -np.inf, dtype=f32)
        l = xp.zeros((G, b - a, 1), dtype=f32)
        acc = xp.zeros((G, b - a, hd), dtype=f32)
        for c in range(0, last, block_k):
            d = min(c + block_k, last)
            s = qb @ k[c:d].astype(f32, copy=False).T  # (G, bq, bk)
            if d > first:  # keys past the block's first query may be hidden from some rows
                hidden = k_pos_dev[None, c:d] > q_pos_dev[a:b, None]  # (bq, bk)
                s = xp.where(hidden[None], f32(-np.inf), s)
            m_new = xp.maximum(m, s.max(axis=-1, keepdims=True))
            s = xp.exp(s - m_new)  # (G, bq, bk), the block's unnormalised weights
            rescale = xp.exp(m - m_new)
            l = l * rescale + s.sum(axis=-1, keepdims=True)
            acc = acc * rescale + s @ v[c:d].astype(f32, copy=False)
            m = m_new
        out[:, a:b] = acc / l
    return out
