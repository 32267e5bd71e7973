"""Prefill with a pruning method: full, snapkv, fastkv, gemfilter, asl, asl-2pass, pyramidinfer (SPEC 2-6, 5b).

All methods share one layer loop (`one_pass`) and the scoring of
`scoring.py`; they differ only in when they score and what they keep. A layer
that selects records the positions that go on (`LayerRecord.kept`): the
one-shot methods at one layer, PyramidInfer at every deciding layer.

- full:      every layer holds all N tokens.
- snapkv:    full, but each layer's cache keeps B - w best prefix tokens per KV
             head plus the window (`--kv-budget`, combinable with every method).
- fastkv:    at the fixed layer ℓ_f, keep top(k') ∪ window for deeper layers.
- asl:       score from L_min - L_obs + 1 on; at the first ℓ ≥ L_min whose
             relative rank variance is < τ, keep top(k') ∪ window (one shot,
             original positions).
- gemfilter: run layers 0 .. ℓ_g, score by the last query's raw dot products,
             then run the model again on the kept token ids at positions 0 ..
- asl-2pass: ASL's layer and kept set, then GemFilter's second pass.
- pyramidinfer: after every deciding layer, keep the int(c · r(i)) context tokens its window attends to most
             (sinks first) plus the window (`pyramid.py`); decoding compresses caches again (`generate.py`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from reference.asl import pyramid
from reference.asl.criterion import Criterion
from reference.asl.engine import Engine, as_engine
from reference.asl.params import GEMFILTER_KERNEL, METHOD, Method, Params, check_params
from reference.asl.pyramid import recent_length
from reference.asl.scoring import group_scores, token_scores
from reference.asl.selection import (
    best,
    boundary_gap,
    kept_with_window,
    ranks,
    select_k_prime,
    top_from_ranks,
)
from reference.errors import OracleError
from reference.model.config import Config
from reference.model.weights import Weights


@dataclass
class LayerRecord:
    """What one layer did during prefill (docs/semantics.md §7); `trace.py` writes it out."""

    layer: int
    prefill_tokens: int  # tokens this layer processed
    flops: int  # analytic prefill FLOPs of this layer (`layer_flops`)
    kv_positions: list[np.ndarray] = field(default_factory=list)  # per KV head: cached positions after prefill
    scores: np.ndarray | None = None  # scored layers: token scores (n-w,) or GemFilter's (N,)
    ranks: np.ndarray | None = None  # scored layers: ranks (n-w,)
    boundary_gap: float | None = None  # score of the last kept minus the first left out
    union_size: int | None = None  # ASL, ℓ ≥ L_min: |U|
    v: float | None = None
    ratio: float | None = None
    margin: float | None = None  # ratio - τ
    kv_boundary_gaps: list[float | None] | None = None  # SnapKV at this layer: per KV head, its boundary gap
    kv_scores: np.ndarray | None = None  # SnapKV at this layer: score_g per KV head over the prefix rows (H_kv, n-w)
    kept: np.ndarray | None = None  # positions that go on to the next layer when this layer selects (ascending)
    keep_ratio: float | None = None  # PyramidInfer's r(i) at a deciding layer

    @property
    def kv_tokens(self) -> list[int]:
        return [len(p) for p in self.kv_positions]


@dataclass
class PrefillResult:
    method: str
    params: Params
    logits: np.ndarray  # (V,) next-token logits after the prompt
    cache: object  # the engine's KV cache (reference: a tuple per layer of HeadCache per KV head)
    next_position: int  # position of the first generated token
    select_layer: int | None  # ASL's ℓ*, FastKV's ℓ_f, GemFilter's ℓ_g; None when nothing was selected
    kept_positions: np.ndarray | None  # prompt positions that continue (one-shot) or are re-run (two-pass)
    layers: list[LayerRecord]  # the pass whose cache decoding uses
    first_pass: list[LayerRecord] | None = None  # two-pass methods: the scoring pass
    notes: list[str] = field(default_factory=list)
    decode_state: pyramid.DecodeState | None = None  # PyramidInfer with decode-stage compression


# ---------------------------------------------------------------- cost model


def layer_flops(cfg: Config, n: int) -> int:
    """Multiply-adds × 2 of one layer over n tokens with causal attention.

    Projections q, k, v, o; attention q·k and p·v over the n(n+1)/2 visible
    pairs; the SwiGLU MLP. Norms, rotary, softmax and scoring are left out.
    """
    D, F, hd = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    H, H_kv = cfg.num_attention_heads, cfg.num_key_value_heads
    projections = 2 * n * D * (2 * H * hd + 2 * H_kv * hd)
    attention = 2 * 2 * H * hd * (n * (n + 1) // 2)
    mlp = 2 * n * 3 * D * F
    return projections + attention + mlp


def qk_flops(cfg: Config, n: int) -> int:
    """GemFilter's filter layer: k for all n tokens, q for the last token only."""
    return 2 * cfg.hidden_size * cfg.head_dim * (cfg.num_attention_heads + n * cfg.num_key_value_heads)


# ---------------------------------------------------------------- SnapKV


def snapkv_keep(p_heads: np.ndarray, group_size: int, budget: int, window: int):
    """Per KV head: its B - w best prefix tokens by score_g plus the window (used when n > B).

    Returns the kept rows per head, ascending, each head's boundary gap (the
    margin of its keep/drop decision) and the scores score_g (H_kv, n-w) it decided on.
    """
    score_g = group_scores(p_heads, group_size)  # (H_kv, n-w)
    n = score_g.shape[1] + window
    keep = [kept_with_window(best(s, budget - window), n, window) for s in score_g]  # each (B,)
    return keep, [boundary_gap(s, budget - window) for s in score_g], score_g


# ---------------------------------------------------------------- the layer loop


def check_finite(engine, x, where: str):
    """Stop at the first place activations stop being finite, instead of returning a confident wrong answer."""
    if not engine.all_finite(x):
        raise OracleError(f"non-finite activations (inf or NaN, or squares that overflow the next RMSNorm) {where}, "
                          "the first place they appear: the checkpoint's numbers overflow the run's dtype there "
                          "(weights or embeddings near its limit, a bad rope_theta or norm eps); check the checkpoint, "
                          "or try --dtype float64")
    return x


@dataclass
class PassResult:
    logits: np.ndarray | None
    cache: object
    layers: list[LayerRecord]
    select_layer: int | None
    kept: np.ndarray | None  # indices into this pass's tokens (= positions for a first pass)
    decode_rows: list[np.ndarray] | None = None  # PyramidInfer: per layer, the window's rows decoding compresses with


def one_pass(engine, ids: np.ndarray, p: Params, selector: Method | None, stop_at_selection: bool = False) -> PassResult:
    """Run the prompt through the layers at positions 0 .. N-1.

    selector: the method whose selections this pass makes (its `decides`: "fixed", FastKV's ℓ_f,
    "criterion", ASL's, or "pyramid", PyramidInfer's at every deciding layer), or None for no selection.
    A layer that selects records the positions that go on (`LayerRecord.kept`); the next layer holds only
    those, at their original positions. SnapKV applies at every layer when p.kv_budget is set.
    """
    cfg = engine.config
    N, w, G, L = len(ids), p.window, cfg.group_size, cfg.num_hidden_layers
    positions = np.arange(N, dtype=np.int64)
    k_prime = select_k_prime(p.select_k, N, w)
    first_scored = selector.first_scored(p, L) if selector else L
    pyramidal = selector is not None and selector.decides == "pyramid"
    x = check_finite(engine, engine.embed(ids), "in the token embeddings")  # (N, D)
    records, caches, decode_rows = [], [], []
    criterion = Criterion(p.tau, p.l_min, p.l_obs, k_prime) if selector and selector.decides == "criterion" else None
    select_layer = None
    for layer in range(L):
        n = len(positions)
        q_rows = min(recent_length(N, p.recent_ratio) + 1 if pyramidal else w, n)
        x, cache, q = engine.layer(layer, x, positions, q_rows=q_rows)  # q (H, q_rows, hd): the window's queries
        check_finite(engine, x, f"after layer {layer} of the prefill")
        record = LayerRecord(layer, n, layer_flops(cfg, n))
        p_heads = kept_rows = None
        if pyramidal:
            kept_rows = pyramid_layer(engine, q, cache, record, decode_rows, N, p)
        elif selector is not None and select_layer is None and layer >= first_scored:
            p_heads = engine.head_scores(q, cache, p.kernel, p.pooling)  # (H, n-w), on the host
            score = token_scores(p_heads)  # (n-w,)
            rank = ranks(score)  # (n-w,)
            record.scores, record.ranks, record.boundary_gap = score, rank, boundary_gap(score, k_prime)
            decide = selector.decides == "fixed" and layer == p.select_layer
            seen = criterion.observe(layer, rank) if criterion is not None else None
            if seen is not None:  # ASL at ℓ ≥ L_min
                record.union_size, record.v = seen.variance.union_size, seen.variance.v
                record.ratio, record.margin = float(seen.ratio), float(seen.ratio) - p.tau
                decide = seen.fires
            if decide:
                select_layer = layer
                kept_rows = kept_with_window(top_from_ranks(rank, k_prime), n, w)  # (min(k, N),)
        if p.kv_budget is not None and n > p.kv_budget:
            if p_heads is None:
                p_heads = engine.head_scores(q, cache, p.kernel, p.pooling)
            keep, record.kv_boundary_gaps, record.kv_scores = snapkv_keep(p_heads, G, p.kv_budget, w)
            cache = engine.compress(cache, keep)
        record.kv_positions = engine.positions(cache)
        records.append(record)
        caches.append(cache)
        if kept_rows is not None:
            record.kept = positions[kept_rows]
            if stop_at_selection:
                return PassResult(None, tuple(caches), records, select_layer, kept_rows)
            x, positions = engine.select_rows(x, kept_rows), positions[kept_rows]
    logits = engine.logits(x)  # (V,) from the last prompt token
    kept = records[select_layer].kept if select_layer is not None else None
    return PassResult(logits, tuple(caches), records, select_layer, kept, decode_rows if pyramidal else None)


def pyramid_layer(engine, q, cache, record: LayerRecord, decode_rows: list, N: int, p: Params):
    """PyramidInfer at one layer (docs/semantics.md, "PyramidInfer"): decide from the head-averaged attention
    of the last W queries, and keep the rows decoding will compress with. Returns the kept rows or None."""
    L = engine.config.num_hidden_layers
    if not pyramid.decides(record.layer, p):
        if p.gen_compress:  # the authors keep the last deciding layer's rows; where its width is not this
            last = decode_rows[-1]  # layer's cache (it pruned: their code stops there), the layer's own
            if last.shape[1] != record.prefill_tokens:
                rows = engine.recent_attention(q, cache)  # (W, n)
                last = pyramid.weighted_rows(rows, rows.shape[1] - rows.shape[0], p.distance_weight)
            decode_rows.append(last)
        return None
    rows = engine.recent_attention(q, cache)  # (W, n): head-averaged probabilities of the last W queries
    decision, weighted = pyramid.prefill_decision(rows, record.layer, L, N, p)  # the last layer decides too
    decode_rows.append(weighted)
    record.keep_ratio = decision.ratio
    if len(decision.scores):
        record.scores, record.ranks = decision.scores, ranks(pyramid.sink_forced(decision.scores,
                                                                                  p.streamingllm_sink_len))
        record.boundary_gap = decision.gap
    return decision.kept


def gemfilter_first_pass(engine, ids: np.ndarray, p: Params) -> tuple[np.ndarray, list[LayerRecord]]:
    """Layers 0 .. ℓ_g-1 in full, then at ℓ_g only q and k: the kept token indices, ascending."""
    cfg = engine.config
    N = len(ids)
    positions = np.arange(N, dtype=np.int64)
    x = check_finite(engine, engine.embed(ids), "in the token embeddings")
    records = []
    for layer in range(p.filter_layer):
        x, cache, _ = engine.layer(layer, x, positions, q_rows=1)
        check_finite(engine, x, f"after layer {layer} of GemFilter's first pass")
        records.append(LayerRecord(layer, N, layer_flops(cfg, N), engine.positions(cache)))
    score = engine.gemfilter_scores(p.filter_layer, x, positions, GEMFILTER_KERNEL)  # (N,)
    count = min(p.select_k, N)
    record = LayerRecord(p.filter_layer, N, qk_flops(cfg, N), scores=score, ranks=ranks(score),
                         boundary_gap=boundary_gap(score, count), kept=best(score, count))
    records.append(record)
    return record.kept, records


# ---------------------------------------------------------------- entry point

NEVER_FIRED = "the criterion never fired"  # how every note about a criterion that never fired begins
NOTHING_SELECTED = NEVER_FIRED + ": nothing was selected; ran as full"  # a one-shot criterion that never fired


def short_prompt_notes(run: Method, N: int, p: Params) -> list[str]:
    """The notes of a prompt too short for the method: N ≤ w (nothing scored, run as full), or N ≤ k."""
    if run.window_scored and N <= p.window:
        return [f"N ≤ w ({N} ≤ {p.window}): no token can be scored; ran as full"]
    if "select_k" in run.uses and N <= p.select_k:
        return [f"N ≤ k ({N} ≤ {p.select_k}): the kept set is the whole prompt"]
    return []
NEVER_FIRED_TWO_PASS = (NEVER_FIRED + ": fell back to the last layer's ranks (select_layer = {layer}, as "
                        "the authors' code does) and ran the second pass on its top(k') and the window")


def run_prefill(
    engine: Engine | Weights, prompt_ids, method: str = "full", params: Params | None = None
) -> PrefillResult:
    """Prefill the prompt with `method` on `engine` (an Engine, or Weights for the reference's own);
    the result holds logits, cache and every decision."""
    engine = as_engine(engine)
    p = params or Params()
    check_params(method, p, engine.config.num_hidden_layers)
    ids = np.asarray(prompt_ids, dtype=np.int64)
    N = len(ids)
    run = METHOD[method]
    notes = short_prompt_notes(run, N, p)
    if run.window_scored and N <= p.window:
        run = METHOD["full"]

    def result(pass_: PassResult, next_position, select_layer, kept, first_pass=None, state=None) -> PrefillResult:
        return PrefillResult(method=method, params=p, logits=pass_.logits, cache=pass_.cache,
                             next_position=next_position, select_layer=select_layer, kept_positions=kept,
                             layers=pass_.layers, first_pass=first_pass, notes=notes, decode_state=state)

    if run.decides is None:  # full, snapkv
        one = one_pass(engine, ids, p, None)
        return result(one, N, None, None)
    if run.decides == "pyramid":  # a kept set at every deciding layer, original positions
        one = one_pass(engine, ids, p, run)
        state = None
        if p.gen_compress:
            lengths = [len(rec.kv_positions[0]) for rec in one.layers]
            state = pyramid.initial_state(one.decode_rows, lengths, N)
        return result(one, N, None, None, state=state)
    if not run.two_pass:  # fastkv, asl: one shot, original positions
        one = one_pass(engine, ids, p, run)
        if one.select_layer is None:
            notes.append(NOTHING_SELECTED)
        return result(one, N, one.select_layer, one.kept)
    if run.decides == "last-query":  # gemfilter
        kept, first = gemfilter_first_pass(engine, ids, p)
        second = one_pass(engine, ids[kept], p, None)
        return result(second, len(kept), p.filter_layer, kept, first)
    # asl-2pass: ASL's criterion and kept set, then a fresh pass on the kept ids. When the criterion
    # never fires, the first pass has run every layer and, as the authors' code does, the selection
    # falls back to the last layer L-1: its top(k') ∪ window go to the second pass (SPEC, oracle decisions).
    first = one_pass(engine, ids, p, run, stop_at_selection=True)
    select_layer, kept = first.select_layer, first.kept
    if select_layer is None:
        select_layer = engine.config.num_hidden_layers - 1
        rank = first.layers[select_layer].ranks  # (N-w,): the last layer was scored
        kept = kept_with_window(top_from_ranks(rank, select_k_prime(p.select_k, N, p.window)), N, p.window)
        first.layers[select_layer].kept = kept
        notes.append(NEVER_FIRED_TWO_PASS.format(layer=select_layer))
    second = one_pass(engine, ids[kept], p, None)
    return result(second, len(kept), select_layer, kept, first.layers)
