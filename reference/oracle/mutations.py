"""The checker's own test: a catalogue of planted bugs, each of which the checker must catch.

    asl check --self-test          # plant every bug, run both tiny default bundles, print the score

Each entry is one small, realistic change to an implementation of ASL (here:
to the reference, by patching one function or one engine method for the
duration of a run) and the field the checker must name when it catches it.
A decision-changing bug must FAIL at least one default case of BOTH tiny
bundles, with its first FAIL naming that field; a decision-neutral one (scores
scaled by a constant) must PASS with a NOTE on that field. The score,
caught / planted, must stay 100%: a bug the checker lets through is a false
PASS, the worst defect an oracle can have. docs/conformance.md lists the
catalogue.

`rebind(f, name=value)` is how a bug is planted inside one function and not
its neighbours: a copy of f whose global `name` is `value`.

(Length: the catalogue itself: each planted bug is a few lines, and they belong in one list.)
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
import sys
import tempfile
import types
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path

import numpy as np

import reference.asl.criterion as criterion
import reference.asl.generate as generate_module
import reference.asl.methods as methods
import reference.asl.pyramid as pyramid
import reference.asl.scoring as scoring
import reference.model.transformer as transformer
from reference.asl.engine import ReferenceEngine
from reference.asl.params import Params
from reference.io.checkpoint import load_weights
from reference.io.fetch import resolve_model
from reference.model.rope import inverse_frequencies
from reference.model.transformer import HeadCache, decoder_layer, project_qkv, rms_norm
from reference.oracle.bundle import (
    check_trace,
    default_cases,
    read_inputs,
    read_manifest,
    write_bundle,
)
from reference.oracle.trace import make_trace
from reference.oracle.verdicts import PASS

MODELS = ("tiny-llama", "tiny-qwen2")


@dataclass(frozen=True)
class Mutation:
    name: str
    bug: str  # what the planted implementation does wrong, in one line
    field: str  # regular expression the first FAIL's field (or, neutral, the NOTE's field) must match
    patches: tuple = ()  # (module, attribute, replacement) for the duration of a run
    engine: type = ReferenceEngine
    neutral: bool = False  # changes no decision: must PASS with a NOTE
    cases: tuple = ()  # case-name suffixes tried first (the rest follow)


def rebind(f: types.FunctionType, **names) -> types.FunctionType:
    """A copy of f that sees `names` in place of its module's globals of the same names."""
    g = types.FunctionType(f.__code__, {**f.__globals__, **names}, f.__name__, f.__defaults__, f.__closure__)
    g.__kwdefaults__ = f.__kwdefaults__
    return g


@contextlib.contextmanager
def planted(m: Mutation):
    saved = [(mod, attr, getattr(mod, attr)) for mod, attr, _ in m.patches]
    try:
        for mod, attr, value in m.patches:
            setattr(mod, attr, value)
        yield m.engine
    finally:
        for mod, attr, value in saved:
            setattr(mod, attr, value)


# ---------------------------------------------------------------- the bugs


def _later_first(score: np.ndarray) -> np.ndarray:
    """Indices from the highest score down, equal scores LATER first (what an unstable top-k may do)."""
    return np.lexsort((-np.arange(len(score)), -score))


def later_wins_ranks(score):
    r = np.empty(len(score), dtype=np.int64)
    r[_later_first(score)] = np.arange(1, len(score) + 1)
    return r


def later_wins_best(score, count):
    return np.sort(_later_first(score)[:count])


def pool_without_zero_padding(u, kernel, kind="avg", xp=np):
    """avg pooling that divides by the number of in-range values at the edges (PyTorch count_include_pad=False)."""
    if kind != "avg":
        return _pool(u, kernel, kind)
    return _pool(u, kernel, "avg") / _pool(np.ones_like(u), kernel, "avg")


def pool_wrapping_around(u, kernel, kind="avg", xp=np):
    """max pooling by np.roll: the 'padding' wraps around, so values from the other end can win at the edges."""
    if kind != "max":
        return _pool(u, kernel, kind)
    out = u.copy()
    for t in range(1, kernel // 2 + 1):
        np.maximum(out, np.roll(u, t, axis=-1), out=out)
        np.maximum(out, np.roll(u, -t, axis=-1), out=out)
    return out


_pool = scoring.pool
_window_attention = scoring.window_attention


def window_attention_prefix_softmax(q_window, k, group_size):
    """Softmax over the prefix keys only: the window's own keys are left out of the normalisation."""
    H, w, hd = q_window.shape
    n = k.shape[1]
    logits = (q_window @ np.repeat(k, group_size, axis=0).transpose(0, 2, 1)) * (1.0 / float(np.sqrt(hd)))
    logits[:, :, n - w:] = -np.inf
    logits -= logits.max(axis=-1, keepdims=True)
    e = np.exp(logits)
    return e / e.sum(axis=-1, keepdims=True)


def window_attention_no_causal_mask(q_window, k, group_size):
    """Every window query sees the whole window (no causal mask inside it)."""
    H, w, hd = q_window.shape
    logits = (q_window @ np.repeat(k, group_size, axis=0).transpose(0, 2, 1)) * (1.0 / float(np.sqrt(hd)))
    logits -= logits.max(axis=-1, keepdims=True)
    e = np.exp(logits)
    return e / e.sum(axis=-1, keepdims=True)


def _tiled(k, group_size):
    return np.tile(k, (group_size, 1, 1))  # (H, n, hd): head h is KV head h mod H_kv


class OneHeadPerGroup(ReferenceEngine):
    """Scores read only the first query head of each KV group (the others are dropped)."""

    def head_scores(self, q_window, cache, kernel, pooling):
        p = super().head_scores(q_window, cache, kernel, pooling)
        p[np.arange(p.shape[0]) % self.config.group_size != 0] = 0.0
        return p


class RenumberedAfterSelection(ReferenceEngine):
    """After a one-shot selection the kept tokens get fresh positions 0 .. k-1 (rope, mask and cache)."""

    renumber = False
    rope_only = False

    def select_rows(self, x, rows):
        self.renumber = True
        return x[rows]

    def layer(self, i, x, positions, q_rows):
        if not self.renumber:
            return super().layer(i, x, positions, q_rows)
        x, cache, q = decoder_layer(x, self.weights.layers[i], self.config, np.arange(len(positions)), None)
        if self.rope_only:  # the cache still records the original positions
            cache = tuple(HeadCache(h.k, h.v, positions) for h in cache)
        return x, cache, q[:, -q_rows:]


class RenumberedRopeOnly(RenumberedAfterSelection):
    """After a one-shot selection rope uses fresh positions 0 .. k-1; the cache keeps the original ones."""

    rope_only = True


class SecondPassAtOriginalPositions(ReferenceEngine):
    """A two-pass method whose second pass ropes its tokens at their ORIGINAL positions, not 0 .. |kept|-1."""

    original = None  # set by the patched run_prefill: the kept positions of the first pass

    def layer(self, i, x, positions, q_rows):
        if self.original is None:
            return super().layer(i, x, positions, q_rows)
        x, cache, q = decoder_layer(x, self.weights.layers[i], self.config, self.original[positions], None)
        return x, tuple(HeadCache(h.k, h.v, positions) for h in cache), q[:, -q_rows:]


def _recording_second_pass():
    """run_prefill whose first passes tell the engine which positions the second pass re-runs."""

    def first_gemfilter(engine, ids, p):
        kept, records = methods.gemfilter_first_pass(engine, ids, p)
        engine.pending = kept
        return kept, records

    def one_pass(engine, ids, p, selector, stop_at_selection=False):
        if selector is None and getattr(engine, "pending", None) is not None:
            engine.original, engine.pending = engine.pending, None
        run = methods.one_pass(engine, ids, p, selector, stop_at_selection)
        if stop_at_selection:
            engine.pending = run.kept
        return run

    return rebind(methods.run_prefill, gemfilter_first_pass=first_gemfilter, one_pass=one_pass)


class GemFilterSoftmax(ReferenceEngine):
    """GemFilter scored by each head's softmax attention of the last query (scaled), summed over heads."""

    def gemfilter_scores(self, i, x, positions, kernel):
        lw, cfg = self.weights.layers[i], self.config
        q, k, _ = project_qkv(rms_norm(x, lw.attn_norm, cfg.rms_norm_eps), lw, cfg, positions)
        logits = np.einsum("hd,hnd->hn", q[:, -1], np.repeat(k, cfg.group_size, axis=0)) / float(np.sqrt(cfg.head_dim))
        a = np.exp(logits - logits.max(axis=-1, keepdims=True))
        return scoring.pool((a / a.sum(axis=-1, keepdims=True)).sum(axis=0)[None, :], kernel, "avg")[0]


class GemFilterScaled(ReferenceEngine):
    """GemFilter's dot products divided by √d: a constant factor, so no decision changes."""

    def gemfilter_scores(self, i, x, positions, kernel):
        return super().gemfilter_scores(i, x, positions, kernel) / float(np.sqrt(self.config.head_dim))


def _snapkv_keep_no_window(p_heads, group_size, budget, window):
    """SnapKV that keeps the B best prefix tokens and does not force the window into the cache."""
    score_g = scoring.group_scores(p_heads, group_size)
    keep = [methods.best(s, budget) for s in score_g]
    return keep, [methods.boundary_gap(s, budget) for s in score_g], score_g


def _snapkv_keep_b_prefix(p_heads, group_size, budget, window):
    """SnapKV that keeps the B best prefix tokens plus the window: B + w entries instead of B."""
    score_g = scoring.group_scores(p_heads, group_size)
    n = score_g.shape[1] + window
    keep = [methods.kept_with_window(methods.best(s, budget), n, window) for s in score_g]
    return keep, [methods.boundary_gap(s, budget) for s in score_g], score_g


def _two_pass_as_full_when_never_fired(engine, prompt_ids, method="full", params=None):
    """Two-pass ASL that runs as full when its criterion never fires (no fallback to the last layer)."""
    if method == "asl-2pass":
        one_shot = methods.run_prefill(engine, prompt_ids, "asl", params)
        if one_shot.select_layer is None:
            return dataclasses.replace(one_shot, method="asl-2pass")
    return methods.run_prefill(engine, prompt_ids, method, params)


class RenumberedAfterPruning(ReferenceEngine):
    """After each PyramidInfer pruning the survivors get fresh positions 0 .. n-1 (rope and cache)."""

    def layer(self, i, x, positions, q_rows):
        fresh = np.arange(len(positions))
        x, cache, q = decoder_layer(x, self.weights.layers[i], self.config, fresh, None)
        return x, cache, q[:, -q_rows:]


def _pyramid_keep_count_of_n(c, layer, n_layers, N, p):
    """PyramidInfer's budget int(N · r(i)) from the prompt length instead of the layer's context c."""
    k = _keep_count(c, layer, n_layers, N, p)
    return None if k is None else min(int(N * pyramid.schedule(layer, n_layers, p.prefill_decay_ratio,
                                                                p.prefill_decay_strategy)), c)


def _pyramid_keep_count_no_minimum(c, layer, n_layers, N, p):
    """PyramidInfer's budget without the min_context_length floor: int(c · r(i)) even when it is not above m."""
    r = pyramid.schedule(layer, n_layers, p.prefill_decay_ratio, p.prefill_decay_strategy)
    return int(c * r) if r < 1.0 and c > 0 and int(c * r) > 0 else None


def _linear_for_cosine(i, n_layers, d, strategy):
    """The schedule (1 - d) · i / L + d (linear) where the method says cosine."""
    return (1.0 - d) * (i / n_layers) + d if strategy == "cosine" else d


def _initial_counts_of_every_layer(stored_rows, cache_lengths, N):
    """Decoding bookkeeping that starts every P_i at its layer's cache length (the authors' code does so for
    the last layer only)."""
    state = _initial_state(stored_rows, cache_lengths, N)
    return dataclasses.replace(state, counts=list(cache_lengths))


def causal_window_softmax_self_masked(logits, xp=np):
    """The window's causal mask written j >= i: each window query is hidden from its OWN key as well."""
    w, n = logits.shape[-2:]
    hidden = xp.asarray(np.triu(np.ones((w, w), dtype=bool), 0))  # the diagonal too
    xp.copyto(logits[..., n - w:], logits.dtype.type(-np.inf), where=hidden)
    logits -= logits.max(axis=-1, keepdims=True)
    xp.exp(logits, out=logits)
    logits /= logits.sum(axis=-1, keepdims=True)
    return logits


def rope_tables_float32_angles(cfg, positions, dtype):
    """Rotary angles p · θ_i computed in float32 (then widened), in a float64 run."""
    angles = positions.astype(np.float32)[:, None] * inverse_frequencies(cfg).astype(np.float32)[None, :]
    angles = np.concatenate([angles, angles], axis=-1)
    return np.cos(angles).astype(dtype), np.sin(angles).astype(dtype)


class DecodesAtCacheLength(ReferenceEngine):
    """After a one-shot selection, generated tokens are rotated at len(kept) + t (the cache length: the classic
    "position = cache length") instead of N + t; they still attend over the whole cache, and the trace says N."""

    shift = 0  # N - len(kept), set by the patched run_prefill

    def decode(self, cache, token, position, attention=False):
        rope, shift = transformer.rope_tables, self.shift
        transformer.rope_tables = lambda cfg, positions, dtype: rope(cfg, positions - shift, dtype)
        try:
            return super().decode(cache, token, position, attention)
        finally:
            transformer.rope_tables = rope


def _decode_at_cache_length(engine, prompt_ids, method="full", params=None):
    run = methods.run_prefill(engine, prompt_ids, method, params)
    if run.kept_positions is not None and run.first_pass is None:
        engine.shift = len(prompt_ids) - len(run.kept_positions)
    return run


def _steps_one_late(engine, prompt_ids, max_new_tokens, eos_ids=(), on_token=None, method="full", params=None):
    """Each step reports the logits of the step before it (an off-by-one in the logits it records)."""
    gen = _generate(engine, prompt_ids, max_new_tokens, eos_ids, on_token, method, params)
    gen.step_logits = gen.step_logits[:1] + gen.step_logits[:-1]
    return gen


_generate = generate_module.generate
_keep_count = pyramid.prefill_keep_count
_initial_state = pyramid.initial_state
_variance = criterion.rank_variance
PYRAMID_FIELD = r"kept\[\d+\]|layers\[\d+\]\.(kept_tokens|prefill_tokens)"
CATALOGUE = (
    Mutation("criterion-le", "the criterion fires at ratio <= tau instead of ratio < tau", r"select_layer",
             ((criterion, "fires", lambda ratio, tau: ratio != float("inf") and ratio <= Fraction(tau)),),
             cases=("edge-tau-at-ratio",)),
    Mutation("avg-pool-no-zero-padding", "average pooling divides by the in-range count at the edges",
             r"layers\[\d+\]\.(v|ratio)|kept_positions|kv_positions|select_layer|first_pass",
             ((scoring, "pool", pool_without_zero_padding),), cases=("asl", "fastkv", "snapkv")),
    Mutation("max-pool-wraps", "max pooling by np.roll: values from the other end of the row win at the edges",
             r"layers\[\d+\]\.(v|ratio)|kept_positions|kv_positions|select_layer",
             ((scoring, "pool", pool_wrapping_around),), cases=("asl-max-pooling", "snapkv-max", "snapkv-ties")),
    Mutation("gqa-one-head-per-group", "scores read only the first query head of each KV group",
             r"layers\[\d+\]\.(v|ratio)|kept_positions|kv_positions|select_layer", engine=OneHeadPerGroup,
             cases=("fastkv", "asl", "snapkv")),
    Mutation("gqa-tiled", "query head h reads KV head h mod H_kv (np.tile) instead of h // G",
             r"layers\[\d+\]\.(v|ratio)|kept_positions|kv_positions|select_layer",
             ((scoring, "window_attention", lambda q, k, G: _window_attention(q, _tiled(k, G), 1)),),
             cases=("fastkv", "asl", "snapkv")),
    Mutation("softmax-prefix-only", "the window attention's softmax runs over the prefix keys only",
             r"layers\[\d+\]\.(v|ratio)|kept_positions|kv_positions|select_layer",
             ((scoring, "window_attention", window_attention_prefix_softmax),), cases=("fastkv", "asl", "snapkv")),
    Mutation("window-not-causal", "every window query sees the whole window (no causal mask inside it)",
             r"layers\[\d+\]\.(v|ratio)|kept_positions|kv_positions|select_layer",
             ((scoring, "window_attention", window_attention_no_causal_mask),), cases=("fastkv", "asl", "snapkv")),
    Mutation("window-not-kept", "the one-shot kept set is top(k') without the window", r"kept_positions",
             ((methods, "one_pass", rebind(methods.one_pass, kept_with_window=lambda prefix, n, w: prefix)),),
             cases=("fastkv", "asl")),
    Mutation("window-not-cached", "SnapKV caches the B best prefix tokens and does not force the window",
             r"kv_positions\[\d+\]\[\d+\]", ((methods, "snapkv_keep", _snapkv_keep_no_window),),
             cases=("snapkv", "snapkv-ties")),
    Mutation("renumbered-positions", "after a one-shot selection the kept tokens get fresh positions (cache too)",
             r"kv_positions\[\d+\]\[\d+\]", engine=RenumberedAfterSelection, cases=("fastkv", "asl")),
    Mutation("renumbered-rope", "after a one-shot selection rope uses fresh positions; the cache keeps the original",
             r"logits", engine=RenumberedRopeOnly, cases=("fastkv", "asl")),
    Mutation("unstable-ranks", "ranks break exact ties by LATER position", r"ranks\[\d+\]",
             ((methods, "ranks", later_wins_ranks),), cases=("asl-max-pooling",)),
    Mutation("unstable-snapkv", "SnapKV's top-(B-w) keeps later positions on exact ties (torch.topk)",
             r"kv_positions\[\d+\]\[\d+\]",
             ((methods, "snapkv_keep", rebind(methods.snapkv_keep, best=later_wins_best)),),
             cases=("snapkv-ties", "snapkv-max", "asl-kv-budget-ties")),
    Mutation("unstable-gemfilter", "GemFilter's top-k keeps later positions on exact ties", r"kept_positions",
             ((methods, "gemfilter_first_pass", rebind(methods.gemfilter_first_pass, best=later_wins_best)),),
             cases=("edge-gemfilter-ties",)),
    Mutation("variance-fewer-layers", "the rank variance looks at L_obs - 1 layers, not L_obs",
             r"layers\[\d+\]\.(v|ratio|union_size)|select_layer|first_pass\[\d+\]\.(v|ratio)",
             ((criterion, "rank_variance", lambda ranks, k: _variance(ranks[1:], k)),), cases=("asl",)),
    Mutation("k-not-k-minus-w", "k' = min(k, n - w): k prefix tokens join the window instead of k - w",
             r"kept_positions", ((methods, "select_k_prime", lambda k, n, w: min(k, n - w)),),
             cases=("fastkv", "asl")),
    Mutation("b-not-b-minus-w", "SnapKV keeps B prefix tokens plus the window (B + w entries)",
             r"kv_positions\[\d+\]\[\d+\]|layers\[\d+\]\.kv_tokens",
             ((methods, "snapkv_keep", _snapkv_keep_b_prefix),),
             cases=("snapkv",)),
    Mutation("gemfilter-softmax", "GemFilter scores by softmax attention instead of raw dot products",
             r"kept_positions", engine=GemFilterSoftmax, cases=("gemfilter",)),
    Mutation("second-pass-original-positions", "the second pass of a two-pass method ropes at original positions",
             r"logits", ((generate_module, "run_prefill", _recording_second_pass()),),
             engine=SecondPassAtOriginalPositions, cases=("gemfilter", "asl-2pass")),
    Mutation("two-pass-never-fired-as-full", "two-pass ASL runs as full when its criterion never fires",
             r"select_layer", ((generate_module, "run_prefill", _two_pass_as_full_when_never_fired),),
             cases=("edge-2pass-never-fires",)),
    Mutation("scores-mean-over-heads", "token scores are the mean over query heads, not the sum", r"^scores$",
             ((methods, "token_scores", lambda p: p.mean(axis=0)),), neutral=True, cases=("fastkv", "asl")),
    Mutation("snapkv-mean-over-group", "SnapKV's score_g is the mean over the group's heads (kvpress)",
             r"^kv_scores$", ((methods, "snapkv_keep", rebind(
                 methods.snapkv_keep, group_scores=lambda p, G: scoring.group_scores(p, G) / float(G))),),
             neutral=True, cases=("snapkv",)),
    Mutation("gemfilter-scaled", "GemFilter's dot products divided by sqrt(d)", r"^first_pass_scores$",
             engine=GemFilterScaled, neutral=True, cases=("gemfilter",)),
    # PyramidInfer
    Mutation("pyramid-no-distance-weight", "PyramidInfer's window rows are averaged without the distance weights",
             PYRAMID_FIELD + r"|decode_compressions", ((pyramid, "distance_weights",
                                                        lambda rows, dw, dtype: np.ones(rows, dtype=dtype)),),
             cases=("pyramidinfer", "pyramidinfer-aggressive")),
    Mutation("pyramid-sinks-not-forced", "PyramidInfer does not force its first streamingllm_sink_len context tokens",
             PYRAMID_FIELD, ((pyramid, "prefill_decision", rebind(pyramid.prefill_decision,
                                                                   sink_forced=lambda s, k: np.asarray(s).copy())),),
             cases=("pyramidinfer-aggressive", "pyramidinfer")),
    Mutation("pyramid-linear-for-cosine", "PyramidInfer's cosine schedule computed as the linear one",
             PYRAMID_FIELD + r"|decode_compressions", ((pyramid, "schedule", _linear_for_cosine),),
             cases=("pyramidinfer",)),
    Mutation("pyramid-ratio-of-n", "PyramidInfer's budget int(N · r(i)) instead of int(c · r(i)) of the context",
             PYRAMID_FIELD, ((pyramid, "prefill_keep_count", _pyramid_keep_count_of_n),), cases=("pyramidinfer",)),
    Mutation("pyramid-window-without-plus-one", "PyramidInfer's window is int(N · ratio) tokens, not 1 + int(N · ratio)",
             PYRAMID_FIELD + r"|decode_compressions",
             ((pyramid, "recent_length", lambda n, ratio: int(n * ratio) - 1),
              (methods, "recent_length", lambda n, ratio: int(n * ratio) - 1)), cases=("pyramidinfer",)),
    Mutation("pyramid-no-min-context", "PyramidInfer ignores min_context_length (prunes to int(c · r) however short)",
             PYRAMID_FIELD, ((pyramid, "prefill_keep_count", _pyramid_keep_count_no_minimum),),
             cases=("pyramidinfer", "pyramidinfer-linear")),
    Mutation("pyramid-renumbered-positions", "after a PyramidInfer pruning the survivors get fresh positions",
             PYRAMID_FIELD + r"|kv_positions\[\d+\]\[\d+\]|decode_compressions|logits", engine=RenumberedAfterPruning,
             cases=("pyramidinfer",)),
    # numbers that are wrong where this prompt's decisions may survive
    Mutation("decode-at-cache-length", "after a one-shot selection generated tokens are rotated at len(kept) + t, "
             "not N + t", r"step_logits|next_position", ((generate_module, "run_prefill", _decode_at_cache_length),),
             engine=DecodesAtCacheLength, cases=("fastkv", "asl")),
    Mutation("window-self-masked", "the window's causal mask is j >= i: each window query is hidden from its own key",
             r"^(scores|kv_scores|first_pass_scores)\[|kept_positions|kv_positions|select_layer|layers\[\d+\]",
             ((scoring, "causal_window_softmax", causal_window_softmax_self_masked),),
             cases=("fastkv", "snapkv", "asl")),
    Mutation("rope-float32-angles", "rotary angles computed in float32 in a float64 run",
             r"^(scores|kv_scores|first_pass_scores)\[|logits|step_logits",
             ((transformer, "rope_tables", rope_tables_float32_angles),), cases=("full", "fastkv")),
    Mutation("step-logits-one-late", "each decoding step reports the logits of the step before it",
             r"step_logits", ((generate_module, "generate", _steps_one_late),), cases=("full",)),
    Mutation("pyramid-decode-counts", "PyramidInfer's decode bookkeeping starts every P_i at the layer's cache "
             "length (the authors' code: 0 but for the last layer)", r"decode_compressions",
             ((pyramid, "initial_state", _initial_counts_of_every_layer),), cases=("pyramidinfer",)),
)


# ---------------------------------------------------------------- running the catalogue


@dataclass
class Caught:
    mutation: Mutation
    by_model: dict = field(default_factory=dict)  # model -> (case, field, line) or None

    @property
    def ok(self) -> bool:
        return all(v is not None for v in self.by_model.values()) and len(self.by_model) == len(MODELS)


def _ordered(cases: list[str], model: str, hints: tuple) -> list[str]:
    first = [f"{model}-{h}" for h in hints if f"{model}-{h}" in cases]
    return first + [c for c in cases if c not in first]


def run_case(weights, bundle: Path, case: str, engine_class):
    """The planted implementation's trace of one case, as a (trace, arrays) candidate."""

    inputs = read_inputs(bundle, case)
    gen = generate_module.generate(engine_class(weights), inputs["prompt_ids"], inputs["max_new_tokens"],
                                   tuple(inputs["eos_token_ids"]), method=inputs["method"],
                                   params=Params(**inputs["params"]))
    return make_trace(gen, model_name="planted", model_sha256=inputs["model"]["sha256"], config=weights.config,
                      dtype=inputs["dtype"])


def judge(m: Mutation, model: str, bundle: Path, weights):
    """(case, field, line) of the first default case that catches m as the catalogue says, else None."""

    for case in _ordered(read_manifest(bundle)["cases"], model, m.cases):
        with planted(m) as engine_class:
            candidate = run_case(weights, bundle, case, engine_class)
        result = check_trace(bundle / f"{case}.trace.json", candidate)
        if m.neutral:
            hit = [f for f in result.notes if re.search(m.field, f.field)]
            if result.verdict == PASS and hit:
                return case, hit[0].field, result.line()
            continue
        fails = [f for f in result.findings if f.verdict == "FAIL"]
        if result.verdict == "FAIL" and re.search(m.field, fails[0].field):
            return case, fails[0].field, result.line()
    return None


def bundles(out: Path, progress: bool = False) -> dict:
    return {model: write_bundle(model, default_cases(model), out / model, "float64", progress=progress)
            for model in MODELS}


def run_catalogue(out: Path, catalogue=CATALOGUE, progress: bool = False) -> list[Caught]:
    from tqdm import tqdm


    where = bundles(out, progress)
    weights = {model: load_weights(resolve_model(model), "float64") for model in MODELS}
    results = []
    for m in tqdm(catalogue, desc="planted bugs", unit="bug", disable=not progress, file=sys.stderr):
        results.append(Caught(m, {model: judge(m, model, where[model], weights[model]) for model in MODELS}))
    return results


def self_test(progress: bool = True) -> int:
    """`asl check --self-test`: the catalogue's table and score; exit 0 only at 100%."""
    with tempfile.TemporaryDirectory(prefix="asl-self-test-") as tmp:
        results = run_catalogue(Path(tmp), progress=progress)
    print(f"{'planted bug':<32} {'kind':<8} " + " ".join(f"{m:<44}" for m in MODELS))
    for r in results:
        cells = []
        for model in MODELS:
            hit = r.by_model[model]
            cells.append(f"{'NOT CAUGHT' if hit is None else hit[0].removeprefix(model + '-') + ': ' + hit[1]:<44}")
        kind = "note" if r.mutation.neutral else "FAIL"
        print(f"{r.mutation.name:<32} {kind:<8} " + " ".join(cells))
    caught = sum(r.ok for r in results)
    print(f"caught {caught} / {len(results)} planted bugs ({100 * caught // len(results)}%)")
    return 0 if caught == len(results) else 1
