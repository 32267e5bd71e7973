"""The arithmetic behind the methods: what `methods.py` asks of a model, whoever runs it.

`methods.py` holds every decision (when to score, ranks, the criterion, what
to keep) and runs it on host NumPy arrays. An engine does the heavy work:
layers, window scores, cache compaction, logits, decoding. `ReferenceEngine`
is the plain NumPy transformer of `model.py`; `gpu.engine.PortEngine` is the
blocked CuPy/NumPy port. Both return scores and logits as NumPy arrays, so a
decision can never depend on which engine computed it except through its inputs.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

from reference.asl.scoring import last_query_scores, pooled_head_scores, window_attention
from reference.model.config import Config
from reference.model.transformer import (
    HeadCache,
    LayerCache,
    cached_keys,
    decode_step,
    decoder_layer,
    embed,
    lm_head,
    project_qkv,
    rms_norm,
)
from reference.model.weights import Weights


class Engine(Protocol):
    """What `methods.py` asks of a model: the contract every engine keeps, and who owns a cache.

    - `embed(ids)` -> x (N, D); `layer(i, x, positions, q_rows)` -> (x, the layer's cache, the last q_rows
      rotated queries (H, q_rows, hd)); `logits(x)` -> (V,) host array from the last row.
    - `head_scores(q_window, cache, kernel, pooling)` -> p (H, n-w) and `gemfilter_scores(i, x, positions,
      kernel)` -> (N,): host NumPy arrays, so every decision is taken on the host by the same code.
    - `compress(cache, keep)` -> the cache holding, per KV head g, the rows keep[g]. It TAKES OVER the cache
      it is given: use only the returned one (the port compacts in place, the reference builds a new one).
    - `recent_attention(q_rows, cache)` -> A (W, n): the attention probabilities of the last W queries over the
      layer's n tokens (causal), averaged over the query heads; host NumPy (PyramidInfer decides on it).
    - `decode(caches, token, position, attention=False)` -> (logits, new caches), and with attention=True also
      per layer the new query's head-averaged attention over that layer's cache (len + 1,), host NumPy
      (PyramidInfer's decode stage; its caches hold the same tokens in every KV head). The caches passed in still read as before
      (the reference builds new ones; the port appends past the old lengths into shared storage), so after
      generation `prefill.cache` is the cache after prefill on either engine. Decode from a cache once: a
      second decode from the same old cache would overwrite the port's shared slot.
    - `positions(cache)` -> per KV head, the cached positions (host int64); `select_rows(x, rows)`;
      `all_finite(x)` -> bool.
    - optional, `copy_cache(cache)` -> a cache a second owner may take over (compress, decode) without changing
      this one: what `reference.asl.sharing.SharedPrefill` hands each method of a remembered layer. An engine
      without it is not shared (the methods run on it as they are).
    """

    config: Config

    def embed(self, ids: np.ndarray): ...
    def layer(self, i: int, x, positions: np.ndarray, q_rows: int): ...
    def head_scores(self, q_window, cache, kernel: int, pooling: str) -> np.ndarray: ...
    def gemfilter_scores(self, i: int, x, positions: np.ndarray, kernel: int) -> np.ndarray: ...
    def recent_attention(self, q_rows, cache) -> np.ndarray: ...
    def compress(self, cache, keep: list[np.ndarray]): ...
    def positions(self, cache) -> list[np.ndarray]: ...
    def select_rows(self, x, rows: np.ndarray): ...
    def all_finite(self, x) -> bool: ...
    def logits(self, x) -> np.ndarray: ...
    def decode(self, caches, token: int, position: int, attention: bool = False): ...


def as_engine(model) -> Engine:
    """An Engine as it is, or Weights wrapped in the reference's own."""
    return ReferenceEngine(model) if isinstance(model, Weights) else model


class ReferenceEngine:
    """model.py's functions, one layer at a time."""

    def __init__(self, weights: Weights):
        self.weights = weights
        self.config = weights.config
        self.dtype = weights.dtype

    def embed(self, ids: np.ndarray) -> np.ndarray:
        return embed(self.weights, ids)  # (N, D)

    def layer(
        self, i: int, x: np.ndarray, positions: np.ndarray, q_rows: int
    ) -> tuple[np.ndarray, LayerCache, np.ndarray]:
        """Layer i over x (n, D) at `positions`: new x, the layer's cache, and the
        rotated queries of the last `q_rows` tokens (H, q_rows, hd), which scoring reads."""
        x, cache, q = decoder_layer(x, self.weights.layers[i], self.config, positions, None)
        return x, cache, q[:, -q_rows:]

    def head_scores(self, q_window: np.ndarray, cache: LayerCache, kernel: int, pooling: str) -> np.ndarray:
        """p[h, j] of docs/semantics.md §1, steps 1-3, from the last w queries (H, w, hd). (H, n-w)."""
        return pooled_head_scores(q_window, cached_keys(cache), self.config.group_size, kernel, pooling)

    def gemfilter_scores(self, i: int, x: np.ndarray, positions: np.ndarray, kernel: int) -> np.ndarray:
        """GemFilter at layer i: q and k only, scored by the last query. (N,)."""
        lw = self.weights.layers[i]
        q, k, _ = project_qkv(rms_norm(x, lw.attn_norm, self.config.rms_norm_eps), lw, self.config, positions)
        return last_query_scores(q[:, -1], k, self.config.group_size, kernel)

    def recent_attention(self, q_rows: np.ndarray, cache: LayerCache) -> np.ndarray:
        """Head-averaged attention probabilities of the last W queries (H, W, hd) over the layer's keys,
        causal. (W, n)."""
        return window_attention(q_rows, cached_keys(cache), self.config.group_size).mean(axis=0)

    def compress(self, cache: LayerCache, keep: list[np.ndarray]) -> LayerCache:
        """Keep, for each KV head g, the cache rows keep[g] (ascending)."""
        return tuple(HeadCache(h.k[kg], h.v[kg], h.pos[kg]) for h, kg in zip(cache, keep))

    def positions(self, cache: LayerCache) -> list[np.ndarray]:
        return [h.pos for h in cache]

    def copy_cache(self, cache: LayerCache) -> LayerCache:
        """The cache itself: the reference never writes a cache in place (compress and decode build new ones),
        so every method may hold the same one."""
        return cache

    def all_finite(self, x: np.ndarray) -> bool:
        """Every row's Σ x² is finite: no inf or NaN in x, and no value whose square overflows the next RMSNorm
        (which would silently turn the row into zeros). The run stops at the first layer where this fails."""
        return bool(np.isfinite(np.einsum("td,td->t", x, x)).all())

    def select_rows(self, x: np.ndarray, rows: np.ndarray) -> np.ndarray:
        return x[rows]

    def logits(self, x: np.ndarray) -> np.ndarray:
        """Next-token logits (V,) from the last row of x."""
        return lm_head(self.weights, x[-1:])[0]

    def decode(self, cache, token: int, position: int, attention: bool = False):
        if not attention:
            return decode_step(self.weights, cache, token, position)
        queries = []
        logits, cache = decode_step(self.weights, cache, token, position, queries)
        rows = [self.recent_attention(q, c)[0] for q, c in zip(queries, cache)]  # per layer (len + 1,)
        return logits, cache, rows
