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


def flash_group_attention(xp, q, k, v, q_pos: np.ndarray, k_pos: np.ndarray, block_q: int, block_k: int):
    """One KV group: q (G, T, hd) float32; k, v (S, hd) -> (G, T, hd)."""
    return flash_attention(xp, q[None], k[None], v[None], q_pos, k_pos, block_q, block_k)[0]


def flash_attention(
    xp,
    q,  # (B, G, T, hd) float32 xp array: B KV heads, G query heads each
    k,  # (B, S, hd) cache dtype; all B heads hold the same positions
    v,  # (B, S, hd)
    q_pos: np.ndarray,  # (T,) ascending, host
    k_pos: np.ndarray,  # (S,) ascending, host
    block_q: int,
    block_k: int,
):
    """Causal-by-position attention of every KV head's query group at once; returns (B, G, T, hd)."""
    B, G, T, hd = q.shape
    f32 = np.float32
    scale = 1.0 / float(np.sqrt(hd))
    visible_end = np.searchsorted(k_pos, q_pos, side="right")  # (T,) on the host: block bounds are Python ints
    k_pos_dev = xp.asarray(k_pos)
    q_pos_dev = xp.asarray(q_pos)
    out = xp.empty((B, G, T, hd), dtype=f32)
    buffer = xp.empty(B * G * min(block_q, T) * min(block_k, int(visible_end[-1])), dtype=f32)  # one block pair
    for a in range(0, T, block_q):
        b = min(a + block_q, T)
        first, last = int(visible_end[a]), int(visible_end[b - 1])
        qb = q[:, :, a:b] * f32(scale)  # (B, G, bq, hd)
        m = xp.full((B, G, b - a, 1), -np.inf, dtype=f32)  # running row maximum
        l = xp.zeros((B, G, b - a, 1), dtype=f32)  # running normaliser
        acc = xp.zeros((B, G, b - a, hd), dtype=f32)  # running weighted sum of values
        for c in range(0, last, block_k):
            d = min(c + block_k, last)
            s = buffer[: B * G * (b - a) * (d - c)].reshape(B, G, b - a, d - c)  # (B, G, bq, bk)
            xp.matmul(qb, k[:, None, c:d].astype(f32, copy=False).swapaxes(-1, -2), out=s)
            if d > first:  # keys past the block's first query may be hidden from some rows
                hidden = k_pos_dev[None, max(c, first):d] > q_pos_dev[a:b, None]  # (bq, d - max(c, first))
                xp.copyto(s[..., max(c, first) - c:], f32(-np.inf), where=hidden)
            m_new = xp.maximum(m, s.max(axis=-1, keepdims=True))
            s -= m_new
            xp.exp(s, out=s)  # the block's unnormalised weights
            rescale = xp.exp(m - m_new)
            l *= rescale
            l += s.sum(axis=-1, keepdims=True)
            acc *= rescale
            acc += s @ v[:, None, c:d].astype(f32, copy=False)
            m = m_new
        out[:, :, a:b] = acc / l
    return out
