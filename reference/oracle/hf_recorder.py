"""Which prompt positions did a Hugging Face cache keep? Read back from the keys themselves.

Cache-compression libraries (kvpress's presses, `transformers.Cache`
subclasses that evict inside `update`) keep no record of positions: after
prefill a layer's cache holds some rows of keys, in whatever order the library
left them (kvpress: top-k order). The keys of a prompt are distinct rows
(rotary embedding makes even repeated tokens differ), and every library
copies the rows it keeps bit for bit. So:

1. `CacheRecorder(cache)` wraps the cache's `update` (the call every
   attention layer makes with its new keys, before any press acts on them)
   and records, per layer, each new key row with its position;
2. after the forward pass, `kept_positions()` matches every row the cache
   holds, per layer and KV head, to the recorded row with the same bytes.

A row that matches no recorded key (the library changed the keys: quantized,
merged, re-rotated) or more than one is an OracleError: positions are then not
recoverable from the keys, and the message says which layer and head.
`ScoreRecorder(press)` records what a kvpress ScorerPress's `score` returns
per layer, for the candidate's `kv_scores`. Neither needs kvpress to be
importable; torch is imported by the caller's objects only.

    cache = DynamicCache()
    with CacheRecorder(cache) as rec, ScoreRecorder(press) as scores, press(model):
        out = model(input_ids, past_key_values=cache)
    positions = rec.kept_positions()      # {layer: [(S_g,) int64 per KV head]}, in the cache's row order
"""

from __future__ import annotations

import numpy as np

from reference.errors import OracleError


def _numpy(t) -> np.ndarray:
    return t.detach().to("cpu").numpy()


def _layer_keys(cache, layer: int):
    """The keys a transformers cache holds for one layer: (batch, H_kv, S, d)."""
    if hasattr(cache, "layers"):  # transformers ≥ 4.56: one CacheLayer per layer
        return cache.layers[layer].keys
    return cache.key_cache[layer]  # older DynamicCache


class CacheRecorder:
    """Records every key row a transformers Cache receives, with its position, and maps stored rows back."""

    def __init__(self, cache):
        self.cache = cache
        self.recorded: dict[int, list[tuple[np.ndarray, np.ndarray]]] = {}  # layer -> [(positions (n,), keys (H_kv, n, d))]

    def __enter__(self):
        original = self.cache.update

        def update(key_states, value_states, layer_idx, cache_kwargs=None, *args, **kwargs):
            keys = _numpy(key_states)  # (batch, H_kv, n, d)
            if keys.shape[0] != 1:
                raise OracleError(f"CacheRecorder: batch size {keys.shape[0]}; record one sequence at a time")
            seen = sum(len(p) for p, _ in self.recorded.get(layer_idx, []))
            where = (cache_kwargs or {}).get("cache_position")
            positions = np.arange(seen, seen + keys.shape[2]) if where is None else _numpy(where).astype(np.int64)
            self.recorded.setdefault(layer_idx, []).append((positions, keys[0].copy()))
            return original(key_states, value_states, layer_idx, cache_kwargs, *args, **kwargs)

        self._restore = shadow(self.cache, "update", update)
        return self

    def __exit__(self, *exc):
        self._restore()
        return False

    def kept_positions(self, layers=None) -> dict[int, list[np.ndarray]]:
        """Per layer, per KV head: the position of every key row the cache holds now, in row order."""
        found = {}
        for layer in sorted(self.recorded) if layers is None else layers:
            if layer not in self.recorded:
                raise OracleError(f"CacheRecorder: layer {layer} never updated the cache; was the forward pass run "
                                  "inside `with CacheRecorder(cache)` and with past_key_values=cache?")
            positions = np.concatenate([p for p, _ in self.recorded[layer]])  # (n,)
            keys = np.concatenate([k for _, k in self.recorded[layer]], axis=1)  # (H_kv, n, d)
            stored = _numpy(_layer_keys(self.cache, layer))[0]  # (H_kv, S, d)
            heads = []
            for g in range(stored.shape[0]):
                row_of: dict[bytes, int] = {}
                for j, row in enumerate(keys[g]):
                    b = row.tobytes()
                    if b in row_of:
                        raise OracleError(f"CacheRecorder: layer {layer}, KV head {g}: positions "
                                          f"{positions[row_of[b]]} and {positions[j]} have identical keys, so a kept "
                                          "row cannot be told apart; use another prompt")
                    row_of[b] = j
                rows = []
                for i, row in enumerate(stored[g]):
                    j = row_of.get(row.tobytes())
                    if j is None:
                        raise OracleError(f"CacheRecorder: layer {layer}, KV head {g}: cache row {i} matches no key "
                                          "the layer received; the library changed the keys (quantized or merged "
                                          "them), so positions cannot be read back from them")
                    rows.append(positions[j])
                heads.append(np.asarray(rows, dtype=np.int64))  # (S_g,) in the cache's row order
            found[layer] = heads
        return found


def shadow(obj, name: str, replacement):
    """Set obj.name = replacement on the instance (shadowing its class's method) and return the undo: the
    instance attribute there before (another recorder's, say) comes back, or the class's method shows through."""
    before = obj.__dict__.get(name, _ABSENT)
    setattr(obj, name, replacement)

    def restore():
        if before is _ABSENT:
            delattr(obj, name)
        else:
            setattr(obj, name, before)

    return restore


_ABSENT = object()


class ScoreRecorder:
    """Records the scores a kvpress ScorerPress computes, per layer: (H_kv, n) as `score` returned them."""

    def __init__(self, press):
        self.press = press
        self.scores: dict[int, np.ndarray] = {}

    def __enter__(self):
        original = self.press.score

        def score(module, *args, **kwargs):
            s = original(module, *args, **kwargs)  # (batch, H_kv, n)
            self.scores[module.layer_idx] = _numpy(s)[0].copy()
            return s

        self._restore = shadow(self.press, "score", score)
        return self

    def __exit__(self, *exc):
        self._restore()
        return False
