"""Properties of every method on random tiny models and prompts (docs/semantics.md §1-7)."""

from __future__ import annotations

import numpy as np
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from reference.asl.generate import generate
from reference.asl.methods import run_prefill
from reference.asl.params import Params
from tests.model_factory import random_model

SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def cases(draw, n_layers=st.integers(4, 9)):
    """A random model shape, prompt and valid ASL-family parameters."""
    L = draw(n_layers)
    n_kv = draw(st.sampled_from([1, 2]))
    model = dict(seed=draw(st.integers(0, 10**6)), n_layers=L, n_kv_heads=n_kv, n_heads=n_kv * draw(st.sampled_from([1, 2, 3])),
                 bias=draw(st.booleans()), tied=draw(st.booleans()))
    N = draw(st.integers(1, 70))
    w = draw(st.integers(1, 8))
    l_min = draw(st.integers(1, L - 1))
    params = Params(
        window=w, kernel=draw(st.sampled_from([1, 3, 5, 7])), pooling=draw(st.sampled_from(["avg", "max"])),
        select_k=draw(st.integers(w + 1, w + 40)), tau=draw(st.sampled_from([0.05, 0.3, 0.7, 1.5])),
        l_min=l_min, l_obs=draw(st.integers(2, l_min + 1)), select_layer=draw(st.integers(0, L - 1)),
        filter_layer=draw(st.integers(0, L - 1)),
    )
    ids = np.random.default_rng(model["seed"]).integers(0, 64, N)
    return model, ids, params


@SETTINGS
@given(cases(), st.sampled_from(["fastkv", "asl"]))
def test_one_shot_selection_invariants(case, method):
    model, ids, p = case
    w = random_model(**model)
    N = len(ids)
    r = run_prefill(w, ids, method, p)
    if N <= p.window:
        assert r.select_layer is None and any("N ≤ w" in note for note in r.notes)
        return
    for rec in r.layers:
        if rec.ranks is not None:  # ranks are a permutation of 1 .. n-w
            assert sorted(rec.ranks.tolist()) == list(range(1, rec.prefill_tokens - p.window + 1))
    if method == "fastkv":
        assert r.select_layer == p.select_layer
    if r.select_layer is None:
        return
    kept = r.kept_positions
    assert len(kept) == min(p.select_k, N)
    assert np.all(np.diff(kept) > 0)  # ascending, distinct
    assert set(range(N - p.window, N)) <= set(kept.tolist())  # window (and last token) kept
    for rec in r.layers:  # SPEC 6: all N up to ℓ*, exactly the kept set after
        expected = N if rec.layer <= r.select_layer else len(kept)
        assert rec.prefill_tokens == expected and rec.kv_tokens == [expected] * len(rec.kv_tokens)
        if rec.layer > r.select_layer:
            assert all(np.array_equal(pos, kept) for pos in rec.kv_positions)  # original positions


@SETTINGS
@given(cases())
def test_asl_ratio_is_one_at_l_min_and_decision_is_the_first_below_tau(case):
    model, ids, p = case
    assume(len(ids) > p.window)
    r = run_prefill(random_model(**model), ids, "asl", p)
    at_l_min = r.layers[p.l_min]
    assert at_l_min.ratio == 1.0 or at_l_min.v == 0.0  # V0 = 0: ratio 0 by decision
    decided = [rec.layer for rec in r.layers if rec.ratio is not None and rec.ratio < p.tau]
    assert r.select_layer == (decided[0] if decided else None)
    if r.select_layer is not None:  # nothing scored after ℓ*
        assert all(rec.ranks is None for rec in r.layers[r.select_layer + 1 :])


@SETTINGS
@given(cases())
def test_tau_above_one_selects_at_l_min(case):
    model, ids, p = case
    assume(len(ids) > p.window)
    r = run_prefill(random_model(**model), ids, "asl", Params(**(p.to_dict() | {"tau": 1.01})))
    assert r.select_layer == p.l_min


@SETTINGS
@given(cases())
def test_asl_that_never_fires_is_identical_to_full(case):
    model, ids, p = case
    w = random_model(**model)
    # τ below every possible ratio > 0 … and V0 = 0 (ratio 0) cannot happen with a tiny τ unless v = 0 too.
    r = run_prefill(w, ids, "asl", Params(**(p.to_dict() | {"tau": 1e-300})))
    assume(r.select_layer is None)
    full = run_prefill(w, ids, "full", p)
    np.testing.assert_array_equal(r.logits, full.logits)
    assert any("never fired" in n for n in r.notes) or len(ids) <= p.window


@SETTINGS
@given(cases())
def test_fastkv_at_the_last_layer_equals_full(case):
    model, ids, p = case
    w = random_model(**model)
    last = Params(**(p.to_dict() | {"select_layer": w.config.num_hidden_layers - 1}))
    np.testing.assert_array_equal(run_prefill(w, ids, "fastkv", last).logits, run_prefill(w, ids, "full", p).logits)


@SETTINGS
@given(cases(), st.integers(0, 30))
def test_snapkv_with_budget_at_least_n_equals_full(case, extra):
    model, ids, p = case
    w = random_model(**model)
    big = Params(**(p.to_dict() | {"kv_budget": max(len(ids), p.window + 1) + extra}))
    a, b = run_prefill(w, ids, "snapkv", big), run_prefill(w, ids, "full", p)
    np.testing.assert_array_equal(a.logits, b.logits)
    assert [rec.kv_tokens for rec in a.layers] == [rec.kv_tokens for rec in b.layers]


@SETTINGS
@given(cases(), st.sampled_from(["snapkv", "fastkv", "asl", "gemfilter", "asl-2pass"]), st.integers(1, 30))
def test_kv_budget_bounds_every_layer_and_keeps_the_window(case, method, over):
    model, ids, p = case
    B = p.window + over
    r = run_prefill(random_model(**model), ids, method, Params(**(p.to_dict() | {"kv_budget": B})))
    n_final = len(ids) if r.first_pass is None else r.next_position
    for rec in r.layers:
        assert all(t <= B for t in rec.kv_tokens)
        assert all(t == min(B, rec.prefill_tokens) for t in rec.kv_tokens)
        for pos in rec.kv_positions:
            assert np.all(np.diff(pos) > 0)
    assert r.layers[-1].prefill_tokens <= n_final


@SETTINGS
@given(cases(), st.sampled_from(["gemfilter", "asl-2pass"]))
def test_two_pass_methods_rerun_the_kept_ids_at_fresh_positions(case, method):
    model, ids, p = case
    w = random_model(**model)
    r = run_prefill(w, ids, method, p)
    if r.first_pass is None:  # N ≤ w: the full run (a two-pass ASL that never fired still falls back to L-1)
        np.testing.assert_array_equal(r.logits, run_prefill(w, ids, "full", p).logits)
        return
    kept = r.kept_positions
    assert len(kept) == min(p.select_k, len(ids)) and np.all(np.diff(kept) > 0)
    assert r.next_position == len(kept)
    assert all(np.array_equal(pos, np.arange(len(kept))) for rec in r.layers for pos in rec.kv_positions)
    # the second pass is exactly a full run on the kept token ids
    np.testing.assert_array_equal(r.logits, run_prefill(w, ids[kept], "full", p).logits)


@SETTINGS
@given(cases(), st.sampled_from(["gemfilter", "asl-2pass"]))
def test_two_pass_decoding_continues_at_len_kept(case, method):
    """After a second pass on the kept ids, generation is that of a full run on those ids."""
    model, ids, p = case
    w = random_model(**model)
    gen = generate(w, ids, 4, (), method=method, params=p)
    kept = gen.prefill.kept_positions
    if gen.prefill.first_pass is None:
        assert gen.prefill.next_position == len(ids)
        return
    assert gen.prefill.next_position == len(kept)
    assert gen.generated_ids == generate(w, ids[kept], 4, ()).generated_ids


@SETTINGS
@given(cases(), st.sampled_from(["fastkv", "asl"]))
def test_one_shot_decoding_continues_at_n(case, method):
    """One-shot methods keep original positions: generated token t sits at N + t in every layer."""
    from reference.model.transformer import decode_step

    model, ids, p = case
    w = random_model(**model)
    gen = generate(w, ids, 2, (), method=method, params=p)
    assert gen.prefill.next_position == len(ids)
    logits, cache = decode_step(w, gen.prefill.cache, gen.generated_ids[0], gen.prefill.next_position)
    assert all(head.pos[-1] == len(ids) for layer in cache for head in layer)
    assert gen.generated_ids[1] == int(np.argmax(logits))


@SETTINGS
@given(cases())
def test_replaying_the_criterion_from_stored_ranks_selects_the_same_layer(case):
    """criterion.replay over one score-every-layer run decides as run_prefill does for any τ, L_min, L_obs."""
    from reference.asl.criterion import replay
    from reference.asl.selection import select_k_prime

    model, ids, p = case
    assume(len(ids) > p.window)
    w = random_model(**model)
    L = w.config.num_hidden_layers
    every = run_prefill(w, ids, "asl", Params(**(p.to_dict() | {"l_min": L - 1, "l_obs": L, "tau": 1e-300})))
    ranks = [rec.ranks for rec in every.layers]
    assert all(r is not None for r in ranks)
    layer, ratios = replay(ranks, p.tau, p.l_min, p.l_obs, select_k_prime(p.select_k, len(ids), p.window))
    run = run_prefill(w, ids, "asl", p)
    assert layer == run.select_layer
    assert all(float(ratios[rec.layer]) == rec.ratio for rec in run.layers if rec.ratio is not None)
