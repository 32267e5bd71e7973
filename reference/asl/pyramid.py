"""PyramidInfer (docs/semantics.md, "PyramidInfer"): the authors' fourth baseline, as their code runs it.

The kept set shrinks at every deciding layer instead of once. For a prompt of N tokens the recent window is
the last W = R + 1 tokens, R = int(N · recent_ratio); their queries score the context (everything before the
window) with the head-averaged attention probabilities, rows weighted by linspace(1, distance_weight, W).
During decoding each layer's cache is compressed again, slice by slice (`decode_compress`).

Every function here is host NumPy on numbers an engine computed (`Engine.recent_attention` in prefill, the
attention row `Engine.decode(..., attention=True)` returns in decoding), so the reference and the port share
every decision. The authors' quirks are kept and named where they happen (docs/semantics.md lists them):
"linear" strategies are the constant d; in decoding R is recomputed from layer 0's cache length; the in-place
distance weighting stays in the rows kept for decoding; the initial cache counts P_i are 0 but for the last layer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from reference.asl.selection import best, boundary_gap

STRATEGIES = ("cosine", "linear")


def schedule(i: int, n_layers: int, d: float, strategy: str) -> float:
    """Keep ratio at layer i: (1 − d)(cos(π i / L) + 1) / 2 + d for "cosine".

    The authors' `if linear: ...; if cosine: ... else: d` overwrites their linear value with d, so "linear"
    is the constant d (as every name but "cosine" is in their code; the oracle accepts only these two)."""
    if strategy == "cosine":
        return (1.0 - d) * (math.cos(math.pi * i / n_layers) + 1) / 2 + d
    return d


def recent_length(n: int, recent_ratio: float) -> int:
    """R = int(n · recent_ratio): the window is the last R + 1 tokens."""
    return int(n * recent_ratio)


def distance_weights(rows: int, distance_weight: float, dtype) -> np.ndarray:
    """linspace(1, distance_weight, rows): the oldest window query weighs 1, the newest distance_weight. (rows,)"""
    return np.linspace(1.0, distance_weight, rows).astype(dtype)


def sink_forced(s: np.ndarray, sinks: int) -> np.ndarray:
    """The scores a deciding layer ranks: the first `sinks` context tokens set to the largest float, as the
    authors do, so they tie among themselves above every other token (ties: the earlier first)."""
    forced = np.asarray(s).copy()
    forced[:sinks] = np.finfo(forced.dtype).max
    return forced


@dataclass
class PrefillDecision:
    """What a deciding layer computed: the context scores s (c,), the ratio r(i), the budget and what goes on."""

    scores: np.ndarray  # (c,) distance-weighted mean attention of the window rows, before the sinks are forced
    ratio: float  # r(i)
    keep: int | None  # int(c · r(i)) (c when that is not above m); None when the layer keeps everything
    kept: np.ndarray | None  # indices into the layer's n tokens that go on (ascending); None: all go on
    gap: float | None  # boundary gap of the forced scores at `keep`


def weighted_rows(rows: np.ndarray, context: int, distance_weight: float) -> np.ndarray:
    """The window rows (W, n) with the context columns [0, c) weighted by distance, as the authors' in-place
    `*=` leaves them (the window columns keep their plain probabilities)."""
    out = rows.copy()
    out[:, :context] *= distance_weights(len(rows), distance_weight, rows.dtype)[:, None]
    return out


def prefill_keep_count(c: int, layer: int, n_layers: int, N: int, p) -> int | None:
    """How many of the c context tokens a deciding layer keeps: int(c · r(i)), or all c when that is not above
    m = min(min_context_length, N − 1 − R); None (no decision) unless c > m and r(i) < 1."""
    m = min(p.min_context_length, N - 1 - recent_length(N, p.recent_ratio))
    r = schedule(layer, n_layers, p.prefill_decay_ratio, p.prefill_decay_strategy)
    if not (c > m and r < 1.0):
        return None
    k = int(c * r)
    return c if k <= m else k


def prefill_decision(rows: np.ndarray, layer: int, n_layers: int, N: int, p) -> tuple[PrefillDecision, np.ndarray]:
    """Layer `layer`'s decision from the head-averaged attention rows of its last W queries (W, n).

    Returns the decision and the weighted rows the layer keeps for decoding (`weighted_rows`)."""
    W, n = rows.shape
    c = n - W
    weighted = weighted_rows(rows, c, p.distance_weight)
    s = weighted[:, :c].mean(axis=0)  # (c,)
    r = schedule(layer, n_layers, p.prefill_decay_ratio, p.prefill_decay_strategy)
    k = prefill_keep_count(c, layer, n_layers, N, p)
    if k is None:
        return PrefillDecision(s, r, None, None, None), weighted
    forced = sink_forced(s, p.streamingllm_sink_len)
    kept = np.concatenate([best(forced, k), np.arange(c, n)]).astype(np.int64)
    return PrefillDecision(s, r, k, kept if k < c else None, boundary_gap(forced, k)), weighted


def decides(layer: int, p) -> bool:
    """Layer i decides when i is a multiple of the downsample interval (the last layer too, as in the
    authors' code: its kept set changes nothing, since only the last token, always kept, reaches the logits)."""
    return layer % p.layerwise_downsample_interval == 0


# ---------------------------------------------------------------- decoding


@dataclass
class DecodeState:
    """Per layer: the attention rows of its most recent queries over its cache (the authors'
    `recent_attn_weights`), and P_i (their `past_kv_seq_lens`)."""

    rows: list[np.ndarray]  # per layer (rows, cache length)
    counts: list[int]  # P_i
    prompt_tokens: int  # N: their cache counts the whole prompt as seen (layer 0 processes all of it)


@dataclass
class Compression:
    """One decode-stage compression of one layer's cache."""

    step: int  # t = 1 for the first generated token fed back
    layer: int
    recent: int  # R at this step
    scored: np.ndarray  # positions of the scored slice of the cache (ascending)
    scores: np.ndarray  # their distance-weighted mean attention (len(scored),)
    kept: np.ndarray  # positions of the slice that stay (ascending)
    gap: float | None  # boundary gap at len(kept)


def initial_state(stored_rows: list[np.ndarray], cache_lengths: list[int], N: int) -> DecodeState:
    """After prefill. P_i is 0 for every layer but the last, whose P is its cache length: the authors record
    `get_seq_length(-1)` while prefilling, the length of the last layer's pre-sized, still empty cache slot."""
    counts = [0] * len(cache_lengths)
    counts[-1] = cache_lengths[-1]
    return DecodeState(list(stored_rows), counts, N)


def scored_slice(seen: int, recent: int, count: int, total: int, E: int) -> tuple[int, int] | None:
    """The cache rows [a, b) a decode-stage compression scores, or None when the layer does not compress now.

    seen: N + t, what the authors' cache counts as seen; recent: R of this step; count: P_i; total: the cache
    length with the new token. The slice is their [-(R + 1 + E) : -(R + 1)], with Python's clipping: the E
    entries before the last R + 1, fewer when fewer exist; an empty slice compresses nothing (theirs fails)."""
    a, b, _ = slice(-(recent + 1 + E), -(recent + 1)).indices(total)
    return (a, b) if seen - recent - count >= E and b > a else None


def decode_keep_count(n_scored: int, layer: int, n_layers: int, p) -> int:
    """max(int(E' · gen_compress_ratio · g(i)), 1) of the E' scored entries stay (the product in their order)."""
    g = schedule(layer, n_layers, p.gen_decay_ratio, p.gen_decay_strategy)
    return max(int(n_scored * p.gen_compress_ratio * g), 1)


def decode_compress(state: DecodeState, attention: list[np.ndarray], positions: list[np.ndarray], step: int,
                    layer0_before: int, p, n_layers: int
                    ) -> tuple[DecodeState, list[np.ndarray | None], list[Compression]]:
    """After decode step `step` (the step-th token fed back): every layer's rows, and what each cache keeps.

    attention[i]: layer i's head-averaged attention row of the new query over its cache, the new token
    included (len_i + 1,); positions[i]: that cache's positions (len_i + 1,). layer0_before: layer 0's cache
    length before this step (their R is recomputed from it). Returns the new state, per layer the cache rows
    to keep (None: all) and the compressions."""
    R = recent_length(1 + layer0_before, p.recent_ratio)
    W, E = 1 + R, p.exceed_length_to_compress
    seen = state.prompt_tokens + step
    rows_out, counts, keeps, events = [], list(state.counts), [], []
    for i, row in enumerate(attention):
        old = state.rows[i]  # (r, len_i)
        rows = np.zeros((len(old) + 1, len(row)), dtype=np.result_type(old.dtype, row.dtype))
        rows[:-1, :-1] = old  # older rows see a 0 for the new key
        rows[-1] = row
        keep = None
        total = len(row)
        where = scored_slice(seen, R, counts[i], total, E)
        if where is not None:
            a, b = where
            recent = rows[-W:]  # Python slicing: every row when fewer exist
            recent[:, a:b] *= distance_weights(len(recent), p.distance_weight, rows.dtype)[:, None]  # in place
            s = recent[:, a:b].mean(axis=0)  # (b - a,)
            k = decode_keep_count(b - a, i, n_layers, p)
            chosen = best(s, k)
            keep = np.concatenate([np.arange(a), a + chosen, np.arange(b, total)]).astype(np.int64)
            rows = rows[:, keep]
            counts[i] = len(keep) - R
            events.append(Compression(step, i, R, positions[i][a:b], s, positions[i][a + chosen], boundary_gap(s, k)))
        keeps.append(keep)
        rows_out.append(rows[-W:])
    return DecodeState(rows_out, counts, state.prompt_tokens), keeps, events

