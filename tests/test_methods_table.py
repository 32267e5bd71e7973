"""The methods table (reference.asl.params.METHOD) says what each method does, and the runs agree with it."""

from __future__ import annotations

import numpy as np
import pytest

from reference.asl.methods import run_prefill
from reference.asl.params import METHOD, METHODS, Params
from reference.io.checkpoint import load_weights
from reference.io.fetch import resolve_model

P = Params(window=4, kernel=3, select_k=24, tau=1.5, l_min=6, l_obs=4, select_layer=8, filter_layer=5, kv_budget=40)


@pytest.fixture(scope="module")
def weights():
    return load_weights(resolve_model("tiny-llama"), "float64")


@pytest.mark.parametrize("name", METHODS)
def test_each_run_does_what_its_row_says(weights, name):
    m = METHOD[name]
    ids = np.random.default_rng(3).integers(3, 259, 120)
    r = run_prefill(weights, ids, name, P if not m.per_layer else Params())
    assert (r.select_layer is not None) == m.selects
    assert (r.first_pass is not None) == m.two_pass
    scored = [rec.layer for rec in (r.first_pass or r.layers) if rec.scores is not None]
    if m.selects:
        assert scored[0] == m.first_scored(P, weights.config.num_hidden_layers)
        assert len(r.kept_positions) == P.select_k and r.next_position == (P.select_k if m.two_pass else len(ids))
    elif m.per_layer:  # a kept set at every deciding layer: each layer holds what the one before kept
        assert scored[0] == 0 and r.select_layer is None and r.next_position == len(ids)
        for a, b in zip(r.layers, r.layers[1:]):
            assert b.prefill_tokens == (len(a.kept) if a.kept is not None else a.prefill_tokens)
        assert any(rec.kept is not None for rec in r.layers)
    else:
        assert not scored and r.next_position == len(ids)
    if m.decides == "fixed":
        assert r.select_layer == P.select_layer
    if m.decides == "criterion":
        assert r.select_layer == P.l_min  # tau > 1 fires at L_min, where the ratio is exactly 1


def test_the_table_holds_what_the_contract_says_of_each_method():
    assert [n for n, m in METHOD.items() if m.needs_budget] == ["snapkv"]
    assert {n for n, m in METHOD.items() if m.two_pass} == {"gemfilter", "asl-2pass"}
