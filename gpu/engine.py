"""PortEngine: the reference's arithmetic at size, on CuPy or NumPy.

It answers the same questions as `reference.asl.engine.ReferenceEngine` (layers,
window scores, cache compaction, logits, decoding), so `reference.asl.methods`
makes exactly the same decisions on top of it. Differences from the
reference are in how, never in what:

- weights in float16 on a GPU (float32 on NumPy by default), activations,
  softmax and accumulation in float32;
- attention in query × key blocks with a fixed softmax shift per row (`gpu/attention.py`);
- on NumPy, its own CPU threads: token-wise work in row slices, attention in
  units, with BLAS held at one thread in every engine call;
- the MLP in token chunks;
- KV caches preallocated per layer, each KV head with its own length, grown
  by doubling when decoding runs past the reserve; whether the heads hold the
  same positions is kept with the cache, not compared per decoding step;
- on a device, host syncs once per layer or step, never per block: a prefill
  layer takes three (the shift's quiet heads, the fallback check, the
  finiteness check), a decoding step one (its logits), and PyramidInfer one
  more for each: its window's attention rows (`recent_attention`) per deciding
  layer, every layer's attention row of a decoding step (`decode(attention=True)`)
  gathered on the device and fetched together;
- window scores computed per KV group from the last w queries only, PyramidInfer's
  attention rows per KV group and block of window rows (never (H, W, n) at once).
Scores and logits come back to the host as float32 NumPy arrays.

(Length: one engine: the Engine protocol's methods plus the port's preallocated caches and CPU threads; splitting it would scatter one engine's state.)
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass

import numpy as np

from gpu import threads as cpu_threads
from gpu.attention import flash_attention, flash_group_attention
from gpu.backend import matmul_f32, on_device, row_sums_of_squares, to_host
from reference.asl.scoring import causal_window_softmax, last_query_scores, pool
from reference.model.rope import apply_rope, rope_tables
from reference.model.weights import Weights

F32 = np.float32
MIN_ROWS_PER_THREAD = 64  # fewer rows than this per thread: run token-wise work in one piece
DEVICE_DECODE_BLOCK_K = 1 << 19
WINDOW_SCORES_PER_BLOCK = 1 << 24  # PyramidInfer's window rows: at most this many float32 scores (64 MB) per block


def blas_single_threaded(method):
    """An engine entry point that, on NumPy with several threads, runs with BLAS held at one thread.
    The engine spreads its work over the cores itself (`PortEngine.by_rows`, the attention units);
    BLAS threads started by a call in between keep spinning after it and take cores from the
    engine's threads (measured: docs/benchmarks.md)."""

    @functools.wraps(method)
    def wrapped(self, *args, **kwargs):
        if self.threads <= 1:
            return method(self, *args, **kwargs)
        with cpu_threads.blas_threads(1):
            return method(self, *args, **kwargs)

    return wrapped


def rotate_into(out, x, cos, sin):
    """out = x·cos + rotate_half(x)·sin (the reference's `apply_rope`, the same roundings) for x and out
    (heads, T, hd), without the rotated copy: out1 = x1·cos1 - x2·sin1, out2 = x2·cos2 + x1·sin2.
    An out of another dtype than x (a float16 cache) gets the rotation in x's dtype, rounded once."""
    if out.dtype != x.dtype:
        out[...] = apply_rope(x, cos, sin)
        return
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    out[...] = x * cos
    out[..., :half] -= x2 * sin[..., :half]
    out[..., half:] += x1 * sin[..., half:]


def silu_times(xp, gate, up):
    """silu(gate) · up = gate / (1 + e^-gate) · up, as the reference computes it, in place in `gate`."""
    t = xp.negative(gate)
    with np.errstate(over="ignore", under="ignore"):  # e^-x overflows to inf for x < -88: the right -0
        xp.exp(t, out=t)
    t += F32(1)
    xp.divide(gate, t, out=gate)
    gate *= up
    return gate


@dataclass
class PortLayerCache:
    """One layer's KV cache: preallocated buffers, a length per KV head."""

    k: object  # (H_kv, capacity, hd) cache dtype
    v: object  # (H_kv, capacity, hd)
    pos: np.ndarray  # (H_kv, capacity) int64 on the host
    lengths: list[int]  # per KV head
    aligned: bool = True  # every KV head holds the same positions (set by compress, kept by append)
    shared: bool = False  # another cache reads the same storage (decode's new caches and their old ones): compress
    # must not compact it in place (`PortEngine.compress`)

    def head(self, g: int):
        n = self.lengths[g]
        return self.k[g, :n], self.v[g, :n], self.pos[g, :n]


class PortEngine:
    def __init__(self, weights: Weights, xp, *, block_q: int | None = None, block_k: int | None = None,
                 mlp_chunk: int = 4096, decode_reserve: int = 256, threads: int | None = None, row_slice: int = 1024):
        self.weights, self.xp, self.config = weights, xp, weights.config
        gpu = on_device(xp)
        self.block_q = block_q or (512 if gpu else 128)
        self.block_k = block_k or (4096 if gpu else 8192)
        # decoding on a device: a few query rows, so one key block of the whole cache (64 MB of scores at most
        # for 32 rows) instead of kernel launches per 4096 keys; blocks given explicitly (the tests) are kept
        self.decode_block_k = max(self.block_k, DEVICE_DECODE_BLOCK_K) if gpu and block_k is None else self.block_k
        self.threads = 1 if gpu else (threads or cpu_threads.available_cores())  # CPU threads (NumPy)
        self.row_slice = row_slice  # rows per slice of token-wise work on those threads
        self.mlp_chunk, self.decode_reserve = mlp_chunk, decode_reserve
        self.cache_dtype = weights.layers[0].wk.dtype
        self.dtype = np.dtype(F32)
        self._rope_positions, self._rope = None, None

    # ------------------------------------------------------------ pieces

    def linear(self, x, w, b=None):
        """x (T, in) float32, rounded to the weight dtype, @ W^T, accumulated and written in float32."""
        y = matmul_f32(self.xp, x.astype(w.dtype, copy=False), w.T)
        return y if b is None else y + b.astype(F32, copy=False)

    def rms_norm(self, x, weight):
        """x / sqrt(mean(x²) + eps) * weight, the reference's formula in three passes over x instead of
        five: the mean square without an x² temporary on NumPy, the weight applied in place (float32 result)."""
        mean_square = row_sums_of_squares(self.xp, x)[:, None] / F32(x.shape[-1])  # (T, 1)
        h = x / self.xp.sqrt(mean_square + F32(self.config.rms_norm_eps))
        h *= weight
        return h

    def rope_tables(self, positions: np.ndarray):
        """cos, sin (T, hd) for `positions`, on the device: the reference's tables, kept for the next
        call with the same positions (every layer of a pass, every layer of a decoding step)."""
        if self._rope_positions is None or not np.array_equal(self._rope_positions, positions):
            cos, sin = rope_tables(self.config, positions, F32)  # host
            self._rope = self.xp.asarray(cos), self.xp.asarray(sin)
            self._rope_positions = np.array(positions, copy=True)
        return self._rope

    def qkv(self, x, lw, cos, sin, out=None):
        """Projections of x (T, D), q and k rotated by the tables' rows: (H, T, hd), (H_kv, T, hd) ×2,
        written into `out` = (q, k, v) when given (prefill writes K and V straight into the cache)."""
        cfg, xp = self.config, self.xp
        T = x.shape[0]
        if out is None:
            out = tuple(xp.empty((n, T, cfg.head_dim), dtype=F32) for n in
                        (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.num_key_value_heads))
        q, k, v = out
        h = self.rms_norm(x, lw.attn_norm)
        heads = lambda y: y.reshape(T, -1, cfg.head_dim).transpose(1, 0, 2)  # (T, n·hd) -> (n, T, hd) view
        rotate_into(q, heads(self.project(h, lw.wq, lw.bq, lw.q_norm)), cos, sin)
        rotate_into(k, heads(self.project(h, lw.wk, lw.bk, lw.k_norm)), cos, sin)
        v[...] = heads(self.linear(h, lw.wv, lw.bv))
        return q, k, v

    def project(self, h, w, b, head_norm):
        """h @ W^T (+ b), (T, n·hd); Qwen3's `head_norm` (hd,) RMS-normalises each head's hd values first (the
        reference's q_norm / k_norm: the port's rms_norm over rows of hd, the same eps), before any rotation."""
        y = self.linear(h, w, b)
        if head_norm is None:
            return y
        hd = self.config.head_dim
        return self.rms_norm(y.reshape(-1, hd), head_norm).reshape(y.shape)

    def by_rows(self, T: int, work) -> None:
        """work(rows) for slices of rows covering 0..T: token-wise work (norms, projections, MLP) has
        no dependence between rows. On NumPy with several cores the slices go to the CPU threads
        (`each`), so elementwise passes use every core too; slices are at most `mlp_chunk` rows in
        one piece, `row_slice` rows on threads: that bounds the MLP's temporaries (docs/benchmarks.md)."""
        parallel = self.threads > 1 and T >= MIN_ROWS_PER_THREAD * self.threads
        size = min(self.row_slice, -(-T // self.threads)) if parallel else self.mlp_chunk
        self.each([slice(a, min(a + size, T)) for a in range(0, T, size)], work)

    def each(self, items, work) -> None:
        """work(item) for independent items, on the engine's CPU threads (`gpu.threads.each`)."""
        cpu_threads.each(work, items, self.threads)

    def new_cache(self, n: int, positions: np.ndarray) -> PortLayerCache:
        """An empty cache for n tokens at `positions` (filled by the caller), with room to decode."""
        xp, H_kv, hd = self.xp, self.config.num_key_value_heads, self.config.head_dim
        cap = n + self.decode_reserve
        pos = np.zeros((H_kv, cap), dtype=np.int64)
        pos[:, :n] = positions
        return PortLayerCache(xp.empty((H_kv, cap, hd), dtype=self.cache_dtype),
                              xp.empty((H_kv, cap, hd), dtype=self.cache_dtype), pos, [n] * H_kv)

    def append(self, cache: PortLayerCache, k, v, position: int) -> None:
        """k, v (H_kv, 1, hd) at `position`, after each head's last entry: one assignment for all heads."""
        xp = self.xp
        if max(cache.lengths) >= cache.k.shape[1]:  # grow by doubling
            H_kv, cap, hd = cache.k.shape
            for name in ("k", "v"):
                old = getattr(cache, name)
                new = xp.empty((H_kv, 2 * cap, hd), dtype=old.dtype)
                new[:, :cap] = old
                setattr(cache, name, new)
            cache.pos = np.concatenate([cache.pos, np.zeros_like(cache.pos)], axis=1)
            cache.shared = False  # new buffers, its own: the old ones stay with the caches that read them
        n = cache.lengths[0]
        if all(m == n for m in cache.lengths):
            cache.k[:, n], cache.v[:, n], cache.pos[:, n] = k[:, 0], v[:, 0], position
        else:  # heads of different lengths (SnapKV's per-head budgets): one scatter
            heads, ends = np.arange(len(cache.lengths)), np.array(cache.lengths)
            cache.k[xp.asarray(heads), xp.asarray(ends)] = k[:, 0]
            cache.v[xp.asarray(heads), xp.asarray(ends)] = v[:, 0]
            cache.pos[heads, ends] = position
        cache.lengths[:] = [m + 1 for m in cache.lengths]

    def attend(self, q, cache: PortLayerCache, positions: np.ndarray):
        """Query head h reads KV head h // G; q (H, T, hd) -> (T, H·hd).

        All KV heads at once while they hold the same positions (prefill, or
        decoding without SnapKV: `cache.aligned`); head by head otherwise.
        """
        H_kv, G = self.config.num_key_value_heads, self.config.group_size
        H, T, hd = q.shape
        n, block_k = cache.lengths[0], self.decode_block_k if T == 1 else self.block_k
        if cache.aligned:
            out = flash_attention(self.xp, q.reshape(H_kv, G, T, hd), cache.k[:, :n], cache.v[:, :n], positions,
                                  cache.pos[0, :n], self.block_q, block_k, self.threads).reshape(H, T, hd)
        else:
            out = self.xp.empty((T, H, hd), dtype=F32).transpose(1, 0, 2)  # token-major, as flash_attention's
            for g in range(H_kv):
                k, v, pos = cache.head(g)
                out[g * G:(g + 1) * G] = flash_group_attention(self.xp, q[g * G:(g + 1) * G], k, v, positions, pos,
                                                               self.block_q, block_k, self.threads)
        return out.transpose(1, 0, 2).reshape(T, -1)

    def mlp(self, x, lw):
        """mlp(norm(x)) for x (T, D)."""
        h = self.rms_norm(x, lw.mlp_norm)
        return self.linear(silu_times(self.xp, self.linear(h, lw.w_gate), self.linear(h, lw.w_up)), lw.w_down)

    # ------------------------------------------------------------ the engine interface

    def embed(self, ids: np.ndarray):
        return self.weights.embed[self.xp.asarray(ids)].astype(F32)  # (N, D)

    @blas_single_threaded
    def layer(self, i: int, x, positions: np.ndarray, q_rows: int):
        lw, cfg, xp = self.weights.layers[i], self.config, self.xp
        T = x.shape[0]
        cos, sin = self.rope_tables(positions)
        cache = self.new_cache(T, positions)
        q = xp.empty((cfg.num_attention_heads, T, cfg.head_dim), dtype=F32)

        def project(rows):  # K and V straight into the cache
            self.qkv(x[rows], lw, cos[rows], sin[rows], out=(q[:, rows], cache.k[:, rows], cache.v[:, rows]))

        self.by_rows(T, project)
        attended = self.attend(q, cache, positions)  # (T, H·hd)
        out = xp.empty_like(x)

        def finish(rows):  # residual, MLP, residual
            out[rows] = x[rows] + self.linear(attended[rows], lw.wo, lw.bo)
            out[rows] += self.mlp(out[rows], lw)

        self.by_rows(T, finish)
        return out, cache, q[:, -q_rows:]

    @blas_single_threaded
    def head_scores(self, q_window, cache: PortLayerCache, kernel: int, pooling: str) -> np.ndarray:
        """docs/semantics.md §1, steps 1-3, one KV group at a time (on the CPU threads): (H, n-w) on the host."""
        xp, G = self.xp, self.config.group_size
        H, w, hd = q_window.shape
        n = cache.lengths[0]
        scale = F32(1.0 / float(np.sqrt(hd)))
        u = xp.empty((H, n - w), dtype=F32)

        def group(g):  # the port's own part: one KV group at a time, on the CPU threads (no (H, n, hd) repeat),
            # its G·w rows in one 2-D GEMM (CuPy's batched matmul has no tensor cores)
            s = ((q_window[g * G:(g + 1) * G] * scale).reshape(G * w, hd)
                 @ cache.k[g, :n].astype(F32, copy=False).T).reshape(G, w, n)
            u[g * G:(g + 1) * G] = causal_window_softmax(s, xp)[:, :, : n - w].sum(axis=1)

        self.each(range(self.config.num_key_value_heads), group)
        return to_host(pool(u, kernel, pooling, xp=xp))

    def attention_rows(self, q_rows, cache: PortLayerCache):
        """The attention probabilities of the last W queries q_rows (H, W, hd) over the cache's n keys, causal
        inside the window (query n-W+i sees keys 0 .. n-W+i), averaged over the H query heads: (W, n) float32 on
        the device. The reference's `window_attention(q, keys, G).mean(axis=0)` without its (H, W, n), which
        PyramidInfer's window (a fifth of the prompt) would make as large as the prompt's whole attention.

        One KV group and one block of window rows at a time (`block_q` rows, fewer when that would be more than
        WINDOW_SCORES_PER_BLOCK scores), the blocks of a group on the CPU threads (they write disjoint rows).
        Rows a..b-1 see keys 0 .. n-W+b-1 only, so a block's scores are (G, b-a, n-W+b) with the block as its
        own window, `causal_window_softmax`'s layout; the keys after stay 0. The heads are added in the
        reference's order (head 0 first) and the sum divided by H, as NumPy's mean of axis 0 does."""
        if not cache.aligned:
            raise ValueError("attention rows need a cache whose KV heads hold the same positions (PyramidInfer's); "
                             "this one's differ (SnapKV's per-head budgets)")
        xp, G = self.xp, self.config.group_size
        H, W, hd = q_rows.shape
        n = cache.lengths[0]
        scale = F32(1.0 / float(np.sqrt(hd)))
        out = xp.zeros((W, n), dtype=F32)  # the sum over heads, then the mean
        size = max(1, min(self.block_q, WINDOW_SCORES_PER_BLOCK // (G * n)))  # window rows per block

        for g in range(self.config.num_key_value_heads):
            k, q = cache.k[g, :n].astype(F32, copy=False), q_rows[g * G:(g + 1) * G]  # (n, hd), (G, W, hd)

            def block(a, k=k, q=q):
                b = min(a + size, W)
                m = n - W + b  # the keys rows a..b-1 see
                s = (q[:, a:b].reshape(G * (b - a), hd) @ k[:m].T).reshape(G, b - a, m)  # one 2-D GEMM
                s *= scale
                causal_window_softmax(s, xp)
                total = out[a:b, :m]  # a view: the sum is kept in `out`
                for h in range(G):
                    total += s[h]

            self.each(range(0, W, size), block)
        out /= F32(H)
        return out

    @blas_single_threaded
    def recent_attention(self, q_rows, cache: PortLayerCache) -> np.ndarray:
        """PyramidInfer's window rows (`attention_rows`): (W, n) float32 on the host, one transfer."""
        return to_host(self.attention_rows(q_rows, cache))

    @blas_single_threaded
    def gemfilter_scores(self, i: int, x, positions: np.ndarray, kernel: int) -> np.ndarray:
        """GemFilter's score (reference.asl.scoring.last_query_scores) at layer i: (N,) on the host. The projection
        is the port's own because it needs q of the last row only (qkv would project every row)."""
        lw, cfg = self.weights.layers[i], self.config
        h = self.rms_norm(x, lw.attn_norm)
        cos, sin = self.rope_tables(positions)
        q_last = apply_rope(self.project(h[-1:], lw.wq, lw.bq, lw.q_norm).reshape(1, cfg.num_attention_heads, -1)
                            .transpose(1, 0, 2), cos[-1:], sin[-1:])[:, 0]  # (H, hd)
        k = apply_rope(self.project(h, lw.wk, lw.bk, lw.k_norm).reshape(len(positions), cfg.num_key_value_heads, -1)
                       .transpose(1, 0, 2), cos, sin)  # (H_kv, N, hd)
        return to_host(last_query_scores(q_last, k, cfg.group_size, kernel, xp=self.xp))

    def compress(self, cache: PortLayerCache, keep: list[np.ndarray]) -> PortLayerCache:
        """Keep, for each KV head g, the cache rows keep[g] (ascending).

        A cache with storage of its own (prefill's, SnapKV) is compacted in place. A decoding step's cache
        shares its storage with the caches before it (`decode`), `prefill.cache` among them, which must still
        read as it did after prefill (the Engine protocol); compacted in place, its rows would overwrite theirs.
        So a shared cache's kept rows are gathered into new buffers, sized as a prefill's are (the rows plus
        `decode_reserve`), and it is the returned cache that holds them; the old storage goes once no cache reads
        it. The same rows in every KV head (PyramidInfer's) are one gather for all heads."""
        xp, source = self.xp, cache
        if cache.shared:
            H_kv, _, hd = source.k.shape
            cap = max(len(rows) for rows in keep) + self.decode_reserve
            cache = PortLayerCache(xp.empty((H_kv, cap, hd), dtype=source.k.dtype),
                                   xp.empty((H_kv, cap, hd), dtype=source.v.dtype), np.zeros((H_kv, cap), np.int64),
                                   list(source.lengths))
        if all(np.array_equal(rows, keep[0]) for rows in keep[1:]):
            rows = np.asarray(keep[0])
            idx = xp.asarray(rows)
            cache.k[:, : len(rows)] = source.k[:, idx]  # the gather copies first: no overlap
            cache.v[:, : len(rows)] = source.v[:, idx]
            cache.pos[:, : len(rows)] = source.pos[:, rows]
            cache.lengths[:] = [len(rows)] * len(keep)
        else:
            for g, rows in enumerate(keep):
                idx = xp.asarray(rows)
                cache.k[g, : len(rows)] = source.k[g][idx]
                cache.v[g, : len(rows)] = source.v[g][idx]
                cache.pos[g, : len(rows)] = source.pos[g][rows]
                cache.lengths[g] = len(rows)
        first = cache.pos[0, : cache.lengths[0]]  # compared once here, not at every decoding step
        cache.aligned = all(np.array_equal(cache.pos[g, :n], first) for g, n in enumerate(cache.lengths))
        return cache

    def copy_cache(self, cache: PortLayerCache) -> PortLayerCache:
        """A copy with storage of its own (its capacity too), which compress may compact in place and decode append
        to without touching `cache`: how `reference.asl.sharing.SharedPrefill` hands a remembered layer to a method."""
        return dataclasses.replace(cache, k=cache.k.copy(), v=cache.v.copy(), pos=cache.pos.copy(),
                                   lengths=list(cache.lengths), shared=False)

    def positions(self, cache: PortLayerCache) -> list[np.ndarray]:
        return [cache.pos[g, :n].copy() for g, n in enumerate(cache.lengths)]

    def all_finite(self, x) -> bool:
        """Every row's Σ x² is finite, as in the reference's: `mlp_chunk` rows at a time (no (T, D) temporary
        on a device), one host sync per call (once a layer in prefill)."""
        xp = self.xp
        finite = [xp.isfinite(row_sums_of_squares(xp, x[a:a + self.mlp_chunk])).all()
                  for a in range(0, x.shape[0], self.mlp_chunk)]
        return bool(xp.stack(finite).all()) if finite else True

    def select_rows(self, x, rows: np.ndarray):
        return x[self.xp.asarray(rows)]

    @blas_single_threaded
    def logits(self, x) -> np.ndarray:
        h = self.rms_norm(x[-1:], self.weights.norm)
        return to_host(self.linear(h, self.weights.lm_head))[0]  # (V,)

    @blas_single_threaded
    def decode(self, caches, token: int, position: int, attention: bool = False):
        """One generated token at `position`: its logits (V,) on the host and the new caches, which append past
        the old ones' lengths into the same storage (both are marked `shared`). With attention=True (PyramidInfer's
        decode stage) also, per layer, the new query's attention over that layer's cache, the new token included,
        averaged over the query heads (len + 1,): the rows stay on the device until the last layer and come to
        the host in one transfer, the step's one host sync more."""
        positions = np.array([position], dtype=np.int64)
        x = self.embed(np.array([token]))
        for old in caches:
            old.shared = True
        caches = tuple(dataclasses.replace(c, lengths=list(c.lengths)) for c in caches)  # new caches, shared storage
        rows = []  # attention=True: per layer (len + 1,) on the device
        for i, cache in enumerate(caches):
            lw = self.weights.layers[i]
            q, k, v = self.qkv(x, lw, *self.rope_tables(positions))
            self.append(cache, k, v, position)
            x = x + self.linear(self.attend(q, cache, positions), lw.wo, lw.bo)
            x = x + self.mlp(x, lw)
            if attention:
                rows.append(self.attention_rows(q, cache)[0])
        logits = self.logits(x)
        if not attention:
            return logits, caches
        flat = to_host(self.xp.concatenate(rows))  # every layer's row in one transfer
        return logits, caches, np.split(flat, np.cumsum([c.lengths[0] for c in caches])[:-1])
