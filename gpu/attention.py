"""Attention at size: query blocks × key blocks, so no score matrix larger than one block pair is held.

Same contract as `reference.model.attention.group_attention` (key j is visible to
query i iff pos_k[j] <= pos_q[i]); written for any array module `xp`. The G
query heads of one KV head are stacked into one (G·bq, hd) operand, so each
block pair is a single GEMM per KV head. Scores, softmax and accumulation are
float32 whatever the cache dtype.

The softmax across key blocks. Any shift c gives the same weights,
softmax(s) = e^(s-c) / Σ e^(s-c); the shift only has to keep e^(s-c) finite.
So in prefill each query row first gets a fixed shift from a bound on its
scores (`KeyBounds`: zero for most rows of real models), and every key block
is then just

    l += Σ e^(s-c),   acc += e^(s-c) v

with no pass to find the block's maximum and nothing to rescale. A row whose
bound was so loose that its largest weight underflowed is redone with the
running maximum of the classic online softmax (`online_softmax`):

    m' = max(m, rowmax(s)),   l' = l·e^(m-m') + Σ e^(s-m'),   acc' = acc·e^(m-m') + e^(s-m') v

Work is cut into units (KV heads, query block) that never share an output
row. On a GPU one unit covers all KV heads and the units run in order (the
device is parallel inside each kernel); each product is one 2-D GEMM per KV
head, since CuPy's batched (3-D) matmul takes an FP32 CUDA-core path and only
its 2-D one reaches cuBLAS's tensor cores (TF32 with CUPY_TF32=1). The units
to redo with the running maximum are found by one device-to-host copy per
call, after every unit, not one per block; the causal mask is made on the
device; a row's sum counts as having lost precision below S·2^-96, so that S
terms flushed to zero (CuPy's kernels flush float32 below 2^-126) cost it at
most 2^-30 of itself. On NumPy each unit is one KV head, and the units run on the port's CPU threads (`gpu/threads.py`) with BLAS held
at one thread inside them: NumPy's elementwise passes (exp, sum) are single-threaded, so
this is what puts every core to work on them. A unit's arithmetic does not
depend on which thread runs it, so any number of threads above one gives the
same bits (one thread: BLAS may split its GEMMs, the same values to rounding).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, replace

import numpy as np

from gpu.backend import on_device, row_sums_of_squares, to_host
from gpu.threads import each

F32 = np.float32
MIN_THREADED_SCORES = 1 << 16  # below this many scores per call, threads cost more than they save
FLT_MIN = 2.0**-126  # the smallest normal float32: CuPy's kernels (-ftz=true) give 0 below it


def flash_group_attention(xp, q, k, v, q_pos: np.ndarray, k_pos: np.ndarray, block_q: int, block_k: int,
                          threads: int = 1):
    """One KV group: q (G, T, hd) float32; k, v (S, hd) -> (G, T, hd)."""
    return flash_attention(xp, q[None], k[None], v[None], q_pos, k_pos, block_q, block_k, threads)[0]


def flash_attention(
    xp,
    q,  # (B, G, T, hd) float32 xp array: B KV heads, G query heads each
    k,  # (B, S, hd) cache dtype; all B heads hold the same positions
    v,  # (B, S, hd)
    q_pos: np.ndarray,  # (T,) ascending, host
    k_pos: np.ndarray,  # (S,) ascending, host
    block_q: int,
    block_k: int,
    threads: int = 1,  # NumPy only: CPU threads for the units (1: run them in order)
    per_head: bool | None = None,  # one KV head per unit (default on NumPy) or all of them (default on a device)
):
    """Causal-by-position attention of every KV head's query group at once; returns (B, G, T, hd)."""
    B, G, T, hd = q.shape
    visible_end = np.searchsorted(k_pos, q_pos, side="right")  # (T,) on the host: block bounds are Python ints
    out = xp.empty((T, B, G, hd), dtype=F32).transpose(1, 2, 0, 3)  # (B, G, T, hd) over token-major memory:
    # the caller's (T, H·hd) layout for the output projection is then a view, not a copy
    per_head = (not on_device(xp)) if per_head is None else per_head  # CPU: one KV head per unit, for the threads
    heads = [slice(b, b + 1) for b in range(B)] if per_head else [slice(0, B)]
    blocks = [(a, min(a + block_q, T)) for a in range(0, T, block_q)]
    units = [(h, a, b) for a, b in reversed(blocks) for h in heads]  # largest first: later queries see more keys
    if len(blocks) > 1 and k.dtype != F32:  # widened once per call, not once per query block (exact)
        k, v = k.astype(F32), v.astype(F32)
    positions = xp.asarray(q_pos), xp.asarray(k_pos)  # the causal mask is made where the scores are
    scratch = threading.local()  # one score buffer per thread, reused by its units
    # the fixed shift costs one pass over the keys: worth it when the scores outnumber the key entries
    # (prefill), not for a few queries against a long cache (decoding), which take the running maximum
    bounds = KeyBounds.of(xp, k, v).for_queries(xp, q, F32(1.0 / float(np.sqrt(hd)))) if G * T >= hd else None
    # In the CPU layout the row sums Σ e^(s - shift) come out of the value GEMM: with a column of ones after v,
    # the product's last column is that sum, and no pass over the scores is needed for it (docs/benchmarks.md).
    # Not in the GPU layout: a hd+1-wide operand costs a GPU GEMM a partial tile, likely more than the sum saves.
    v_ones = (xp.concatenate([v, xp.ones(v.shape[:-1] + (1,), dtype=v.dtype)], axis=-1)
              if bounds is not None and per_head else None)
    head_bounds = {h.start: bounds and bounds.heads(h) for h in heads}  # once per head, not once per unit
    precise = [None] * len(units)  # per unit: a device flag, every row's sum kept float32 precision

    def buffer(n_heads):
        if getattr(scratch, "buffer", None) is None:
            scratch.buffer = xp.empty(n_heads * G * min(block_q, T) * min(block_k, int(visible_end[-1])), dtype=F32)
        return scratch.buffer

    def run(i):
        h, a, b = units[i]
        out[h, :, a:b], precise[i] = query_block(
            xp, q[h, :, a:b], k[h], v[h], (positions[0][a:b], positions[1]), visible_end[a:b], block_k,
            buffer(h.stop - h.start), head_bounds[h.start], None if v_ones is None else v_ones[h])

    def redo(i):  # a unit whose bound was so loose that a largest weight underflowed: the running maximum
        h, a, b = units[i]
        qb = (q[h, :, a:b] * F32(1.0 / float(np.sqrt(hd)))).reshape(h.stop - h.start, G * (b - a), hd)
        out[h, :, a:b] = online_softmax(xp, qb, k[h], v[h], (positions[0][a:b], positions[1]), visible_end[a:b],
                                        block_k, buffer(h.stop - h.start)).reshape(h.stop - h.start, G, b - a, hd)

    n_threads = threads if per_head and B * G * T * int(visible_end[-1]) >= MIN_THREADED_SCORES else 1
    each(run, range(len(units)), n_threads)
    checked = [i for i, flag in enumerate(precise) if flag is not None]
    if checked:  # the call's one host sync for the fallback, not one per block
        ok = to_host(xp.stack([precise[i] for i in checked]))
        each(redo, [i for i, good in zip(checked, ok) if not good], n_threads)
    return out


def query_block(xp, q, k, v, positions, visible_end: np.ndarray, block_k: int, buffer, bounds: KeyBounds | None,
                v_ones=None):
    """q (B, G, n, hd) float32 of queries at positions[0] (device); k, v (B, S, hd) at positions[1]
    -> ((B, G, n, hd), flag): flag a device bool, false where a row must be redone (`flash_attention`), or None.

    With one fixed shift per row (`KeyBounds.shift`): every key block is then just
    l += Σ e^(s - shift), acc += e^(s - shift) v, with no running maximum, no rescaling and
    no pass to find a block's maximum; given `v_ones` = [v | 1] (B, S, hd + 1), l is the last
    column of the one product e^(s - shift) [v | 1]. The shift only guards against overflow, so a row whose
    largest weight underflowed (l too small to carry float32 precision) comes back flagged, for the
    running maximum (`online_softmax`); rows whose bound is small need no shift at all. Without
    bounds (decoding) the running maximum is used throughout.
    """
    B, G, n, hd = q.shape
    qb = (q * F32(1.0 / float(np.sqrt(hd)))).reshape(B, G * n, hd)  # the G heads stacked: one GEMM per KV head
    if bounds is None:
        return online_softmax(xp, qb, k, v, positions, visible_end, block_k, buffer).reshape(B, G, n, hd), None
    shift = bounds.shift(xp, qb)  # (B, G·n, 1), or None when no row needs one
    values = v if v_ones is None else v_ones  # (B, S, hd), or (B, S, hd + 1) with the column of ones
    acc = xp.zeros((B, G * n, values.shape[-1]), dtype=F32)  # Σ e^(s - shift) v (and Σ e^(s - shift))
    l = acc[..., hd:] if v_ones is not None else xp.zeros((B, G * n, 1), dtype=F32)  # Σ e^(s - shift)
    for c, d, s in key_blocks(xp, qb, k, positions, visible_end, block_k, buffer):
        if shift is not None:
            s -= shift
        xp.exp(s, out=s)
        if v_ones is None:
            l += s.sum(axis=-1, keepdims=True)
        for b in range(B):  # 2-D GEMMs (module docstring)
            if c == 0:  # the first key block: straight into acc, no temporary
                xp.matmul(s[b], values[b, c:d].astype(F32, copy=False), out=acc[b])
            else:
                acc[b] += s[b] @ values[b, c:d].astype(F32, copy=False)
    with np.errstate(divide="ignore", invalid="ignore"):  # rows of l = 0 are flagged, redone by the caller
        result = acc[..., :hd] / l
    return result.reshape(B, G, n, hd), (l >= bounds.least_sum).all()


def online_softmax(xp, qb, k, v, positions, visible_end, block_k, buffer):
    """qb (B, R, hd) scaled queries -> (B, R, hd), with a running row maximum (the module docstring's update)."""
    B, R, hd = qb.shape
    m = xp.full((B, R, 1), -np.inf, dtype=F32)  # running row maximum
    l = xp.zeros((B, R, 1), dtype=F32)  # running normaliser
    acc = xp.zeros((B, R, hd), dtype=F32)  # running weighted sum of values
    for c, d, s in key_blocks(xp, qb, k, positions, visible_end, block_k, buffer):
        m_new = xp.maximum(m, s.max(axis=-1, keepdims=True))
        s -= m_new
        xp.exp(s, out=s)  # the block's unnormalised weights
        rescale = xp.exp(m - m_new)
        l *= rescale
        l += s.sum(axis=-1, keepdims=True)
        acc *= rescale
        for b in range(B):  # 2-D GEMMs (module docstring)
            acc[b] += s[b] @ v[b, c:d].astype(F32, copy=False)
        m = m_new
    return acc / l


def key_blocks(xp, qb, k, positions, visible_end, block_k, buffer):
    """Yields (c, d, s): keys c..d-1 and their scores s (B, R, d - c) = qb · k^T, -inf where hidden.
    Rows of qb are G heads × n queries (head-major); s lives in `buffer`, reused by the next block.
    positions = (q_pos (n,), k_pos (S,)) on the device, for the mask; visible_end (n,) on the host."""
    B, R, _ = qb.shape
    q_pos, k_pos = positions
    n = len(visible_end)
    first, last = int(visible_end[0]), int(visible_end[-1])  # keys < first are visible to every row; >= last to none
    for c in range(0, last, block_k):
        d = min(c + block_k, last)
        s = buffer[: B * R * (d - c)].reshape(B, R, d - c)
        for b in range(B):  # 2-D GEMMs (module docstring)
            xp.matmul(qb[b], k[b, c:d].astype(F32, copy=False).T, out=s[b])
        if d > first:  # keys past the block's first query may be hidden from some rows
            e = max(c, first)
            hidden = k_pos[e:d][None, :] > q_pos[:, None]  # (n, d - e)
            xp.copyto(s.reshape(B, R // n, n, d - c)[..., e - c:], F32(-np.inf), where=hidden)
        yield c, d, s


@dataclass(frozen=True)
class KeyBounds:
    """What the fixed shift needs to know of the keys and values of one call.

    For a query row q (already scaled by 1/sqrt(hd)) every score q·k_j is at most
    bound = min(|q|·max_j |k_j|, Σ_d max(q_d·max_j k_jd, q_d·min_j k_jd)) (Cauchy-Schwarz and
    the per-dimension box). With shift = max(0, bound - E), every e^(s - shift) <= e^E, and E is
    chosen so that neither Σ_j e^(s - shift) nor Σ_j e^(s - shift)·|v_j| can overflow float32
    for S keys: E = ln(FLT_MAX) - ln S - ln max(1, max|v|) - 1 (a device scalar: no host sync).
    """

    k_max: object  # (B, 1, hd) float32: max_j k_jd
    k_min: object  # (B, 1, hd) float32: min_j k_jd
    k_norm: object  # (B, 1, 1) float32: max_j |k_j|
    exponent: object  # E, a 0-d float32 array
    least_sum: np.float32  # below this row sum the largest weight may have lost precision to underflow
    quiet: np.ndarray | None = None  # (B,) host bools: KV heads where no query of the call can need a shift

    @classmethod
    def of(cls, xp, k, v, chunk: int = 8192) -> KeyBounds:  # k, v (B, S, hd)
        B, S, hd = k.shape
        if S == 0:  # no visible key: nothing to bound (the rows come out 0/0, as in the reference)
            k = xp.zeros((B, 1, hd), dtype=F32)
        ln_v_abs = (xp.log(xp.maximum(xp.maximum(v.max().astype(F32), -v.min().astype(F32)), F32(1)))
                    if v.size else F32(0))  # ln max(1, max|v|) without a |v| copy
        # |k_j|² in float32, `chunk` keys at a time: a float16 cache is never copied whole to float32
        # (8 KV heads × 128K keys × 128 would be 0.5 GB); max and min of float16 values are exact as they are
        def largest_squared_norm(c):  # (B, 1): max |k_j|² over keys c .. c+chunk-1
            return row_sums_of_squares(xp, k[:, c:c + chunk].astype(F32, copy=False)).max(axis=1, keepdims=True)

        squared_norm = xp.concatenate([largest_squared_norm(c) for c in range(0, k.shape[1], chunk)], axis=1)
        S = max(S, 1)
        # S terms below FLT_MIN each are lost at most (flushed to 0 on CuPy): 2^-30 of a sum of S·2^-96
        return cls(k_max=k.max(axis=1).astype(F32)[:, None, :], k_min=k.min(axis=1).astype(F32)[:, None, :],
                   k_norm=xp.sqrt(squared_norm.max(axis=1))[:, None, None],
                   exponent=F32(float(np.log(np.finfo(F32).max)) - float(np.log(S)) - 1.0) - ln_v_abs,
                   least_sum=F32(S * FLT_MIN * 2.0**30))

    def for_queries(self, xp, q, scale) -> KeyBounds:
        """The bounds for a call whose queries are q (B, G, T, hd), scaled by `scale` in the scores. A KV
        head whose largest query norm times its largest key norm (Cauchy-Schwarz over all of its rows at
        once) stays a nat below E needs no shift in any row: `shift` then costs nothing there. One pass
        over q and one host sync (`benchmarks/port_breakdown.py --phases` counts the quiet heads)."""
        q_norm = xp.sqrt(row_sums_of_squares(xp, q).reshape(q.shape[0], -1).max(axis=1)) * scale  # (B,)
        bound = q_norm * self.k_norm[:, 0, 0]
        quiet = bound < self.exponent - F32(1.0)  # the nat of slack covers the roundings of the two norms
        return replace(self, quiet=to_host(quiet))

    def heads(self, h: slice) -> KeyBounds:
        return replace(self, k_max=self.k_max[h], k_min=self.k_min[h], k_norm=self.k_norm[h],
                       quiet=None if self.quiet is None else self.quiet[h])

    def shift(self, xp, qb):
        """(B, R, 1) float32 shifts for the rows of qb (B, R, hd), or None when no row of a quiet head needs one."""
        if self.quiet is not None and self.quiet.all():
            return None
        box = xp.maximum(qb * self.k_max, qb * self.k_min).sum(axis=-1, keepdims=True)
        norm = xp.sqrt((qb * qb).sum(axis=-1, keepdims=True)) * self.k_norm
        excess = xp.minimum(box, norm) - self.exponent
        if not on_device(xp) and not (excess > 0).any():  # a free test on the host; on a device it would sync
            return None
        return xp.maximum(excess, F32(0))
