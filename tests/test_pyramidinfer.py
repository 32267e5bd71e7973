"""PyramidInfer (docs/semantics.md, "PyramidInfer"): each rule checked on numbers worked out by hand.

The decisions are host functions (reference/asl/pyramid.py) that the reference and the port both call on the
numbers their engine computed; tests/test_port_agreement.py checks that the port's numbers lead to the same
decisions end to end.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pytest

from reference.asl import pyramid
from reference.asl.generate import generate
from reference.asl.methods import run_prefill
from reference.asl.params import Params, check_params
from reference.errors import OracleError
from reference.io.checkpoint import load_weights
from reference.io.fetch import resolve_model


def test_the_schedule_is_cosine_and_linear_is_the_constant_d():
    L, d = 24, 0.9
    assert pyramid.schedule(0, L, d, "cosine") == 1.0  # layer 0 never prunes
    assert math.isclose(pyramid.schedule(12, L, d, "cosine"), 0.95)  # cos(π/2) = 0: (1 - d)/2 + d
    assert math.isclose(pyramid.schedule(24, L, d, "cosine"), d)  # cos(π) = -1
    for i in (0, 5, 23):  # the authors' if/if/else: "linear" is overwritten by the constant d
        assert pyramid.schedule(i, L, d, "linear") == d


def test_the_window_is_one_plus_int_n_times_ratio():
    assert pyramid.recent_length(783, 0.2) == 156  # 156.6 truncated: the window is 157 tokens
    assert pyramid.recent_length(150, 0.2) == 30
    assert pyramid.recent_length(4, 0.2) == 0  # the last token alone


def hand_rows() -> np.ndarray:
    """W = 3 window rows over n = 8 tokens (c = 5 context tokens, then the window 5, 6, 7).

    Unweighted, context token 1 (0.5 from the oldest row) beats token 2 (0.4 from the newest): means 0.167
    and 0.133. With distance weights linspace(1, 2, 3) = 1, 1.5, 2 the newest row counts twice: token 1 stays
    0.167, token 2 becomes 0.267. Token 0 gets nothing: only the sink rule keeps it."""
    rows = np.zeros((3, 8))
    rows[0, 1] = 0.5
    rows[2, 2] = 0.4
    rows[:, 5:] = 0.1  # window columns: never scored
    return rows


HAND = dict(recent_ratio=0.25, distance_weight=2.0, prefill_decay_ratio=0.5, prefill_decay_strategy="linear",
            streamingllm_sink_len=1, min_context_length=1)  # N = 8: R = 2, W = 3, m = min(1, 8 - 1 - 2) = 1


def test_a_deciding_layer_keeps_the_sinks_the_distance_weighted_best_and_the_window():
    p = Params(**HAND)
    decision, weighted = pyramid.prefill_decision(hand_rows(), layer=1, n_layers=4, N=8, p=p)
    assert decision.ratio == 0.5 and decision.keep == 2  # int(5 · 0.5) = 2 > m = 1
    assert np.allclose(decision.scores, [0, 0.5 / 3, 0.8 / 3, 0, 0])
    assert decision.kept.tolist() == [0, 2, 5, 6, 7]  # sink 0, token 2 (weighted), the window 5-7
    assert np.allclose(weighted[:, :5], hand_rows()[:, :5] * np.array([1, 1.5, 2])[:, None])  # kept for decoding
    assert np.array_equal(weighted[:, 5:], hand_rows()[:, 5:])  # window columns unweighted


def test_without_sinks_the_best_two_win():
    p = Params(**(HAND | {"streamingllm_sink_len": 0}))
    decision, _ = pyramid.prefill_decision(hand_rows(), 1, 4, 8, p)
    assert decision.kept.tolist() == [1, 2, 5, 6, 7]


def test_a_budget_not_above_the_minimum_keeps_the_whole_context():
    p = Params(**(HAND | {"min_context_length": 2}))  # int(5 · 0.5) = 2 ≤ m = 2: k = c
    decision, _ = pyramid.prefill_decision(hand_rows(), 1, 4, 8, p)
    assert decision.keep == 5 and decision.kept is None


def test_a_context_not_longer_than_the_minimum_is_not_pruned():
    p = Params(**(HAND | {"min_context_length": 5}))  # m = min(5, 5) = 5, c = 5: not c > m
    decision, _ = pyramid.prefill_decision(hand_rows(), 1, 4, 8, p)
    assert decision.keep is None and decision.kept is None
    p = Params(**(HAND | {"min_context_length": 4}))  # c = 5 > m = 4; int(2.5) = 2 ≤ 4: k = c
    assert pyramid.prefill_decision(hand_rows(), 1, 4, 8, p)[0].kept is None


def test_ties_keep_the_earlier_context_token():
    rows = np.zeros((3, 8))
    rows[:, 5:] = 0.1
    rows[1, [1, 2, 3, 4]] = 0.3  # four equal scores: k = 2 keeps sink 0 and token 1
    decision, _ = pyramid.prefill_decision(rows, 1, 4, 8, Params(**HAND))
    assert decision.kept.tolist() == [0, 1, 5, 6, 7]


def test_only_multiples_of_the_interval_decide():
    p = Params(layerwise_downsample_interval=3)
    assert [i for i in range(10) if pyramid.decides(i, p)] == [0, 3, 6, 9]


def decode_setup():
    """Two layers of 10 cached tokens each, W_prefill = 3 stored rows of zeros; R at step 1 = int(11 · 0.2) = 2."""
    p = Params(recent_ratio=0.2, exceed_length_to_compress=3, gen_compress_ratio=0.5, gen_decay_ratio=0.1,
               distance_weight=1.0)
    state = pyramid.initial_state([np.zeros((3, 10)), np.zeros((3, 10))], [10, 10], N=10)
    return p, state


def test_the_initial_counts_are_zero_but_for_the_last_layer():
    _, state = decode_setup()
    assert state.counts == [0, 10]  # the authors read the last layer's empty cache slot while prefilling


def test_a_decode_stage_compression_by_hand():
    """Step 1: layer 0 compresses (seen 11 − R 2 − P 0 = 9 ≥ E = 3), the last layer does not (11 − 2 − 10 < 3).
    Its cache of 11 (positions 0 .. 10) scores rows [11 − 6, 11 − 3) = positions 5, 6, 7 by its last 3 rows;
    g(0) = 1, so max(int(3 · 0.5 · 1), 1) = 1 stays: position 6, where the new query looks."""
    p, state = decode_setup()
    row = np.zeros(11)
    row[6] = 0.9  # the new query (position 10) attends to position 6
    positions = [np.arange(11), np.arange(11)]
    state, keeps, events = pyramid.decode_compress(state, [row, row.copy()], positions, 1, 10, p, n_layers=2)
    assert keeps[1] is None and [(e.step, e.layer, e.recent) for e in events] == [(1, 0, 2)]
    assert events[0].scored.tolist() == [5, 6, 7] and events[0].kept.tolist() == [6]
    assert keeps[0].tolist() == [0, 1, 2, 3, 4, 6, 8, 9, 10]
    assert state.counts == [9 - 2, 10]  # P_0 = cache length − R
    assert state.rows[0].shape == (3, 9)  # the last R + 1 rows, over the compressed cache
    # step 2: R = int((1 + 9) · 0.2) = 2; layer 0: 12 − 2 − 7 = 3 ≥ 3 compresses again; the last: 12 − 2 − 10 = 0
    row2 = np.zeros(10)
    row2[1] = 1.0
    state, keeps, events = pyramid.decode_compress(state, [row2, np.zeros(12)],
                                                   [np.array([0, 1, 2, 3, 4, 6, 8, 9, 10, 11]), np.arange(12)],
                                                   2, 9, p, n_layers=2)
    assert [(e.step, e.layer, e.recent) for e in events] == [(2, 0, 2)]
    assert events[0].scored.tolist() == [4, 6, 8]  # cache rows 10 − 6 .. 10 − 3 = 4, 5, 6
    assert keeps[1] is None


def test_an_empty_scored_slice_compresses_nothing():
    assert pyramid.scored_slice(seen=100, recent=5, count=0, total=6, E=16) is None  # the window covers it all
    assert pyramid.scored_slice(seen=100, recent=5, count=0, total=10, E=16) == (0, 4)  # fewer than E exist


# ---------------------------------------------------------------- end to end on a tiny checkpoint


@pytest.fixture(scope="module")
def weights():
    return load_weights(resolve_model("tiny-llama"), "float64")


def expected_counts(N: int, L: int, p: Params) -> list[int]:
    """Tokens per layer from the rule, written out independently: W = int(N · ratio) + 1, m = min(mcl, N − 1 − R),
    r(i) cosine; a deciding layer keeps int(c · r) context tokens when c > m, r < 1 and that is above m."""
    R = int(N * p.recent_ratio)
    W, m = R + 1, min(p.min_context_length, N - 1 - R)
    counts, n = [], N
    for i in range(L):
        counts.append(n)
        r = (1 - p.prefill_decay_ratio) * (math.cos(math.pi * i / L) + 1) / 2 + p.prefill_decay_ratio
        c = n - W
        if i % p.layerwise_downsample_interval == 0 and c > m and r < 1 and int(c * r) > m:
            n = W + int(c * r)
    return counts


@pytest.mark.parametrize("extra", [{}, {"min_context_length": 8, "streamingllm_sink_len": 2},
                                   {"layerwise_downsample_interval": 3, "min_context_length": 8},
                                   {"recent_ratio": 0.05, "prefill_decay_ratio": 0.5, "min_context_length": 0}])
def test_each_layer_holds_what_the_rule_says(weights, extra):
    p = Params(**extra)
    ids = np.random.default_rng(5).integers(3, 259, 150)
    r = run_prefill(weights, ids, "pyramidinfer", p)
    assert [rec.prefill_tokens for rec in r.layers] == expected_counts(150, 24, p)
    W = int(150 * p.recent_ratio) + 1
    for rec, nxt in zip(r.layers, r.layers[1:]):
        held = rec.kv_positions[0]
        assert all(np.array_equal(h, held) for h in rec.kv_positions)  # every KV head caches what the layer held
        if rec.kept is not None:
            assert np.array_equal(rec.kept[-W:], np.arange(150 - W, 150))  # the window always goes on
            sinks = min(p.streamingllm_sink_len, len(rec.kept) - W)  # a budget below the sink count keeps the first
            assert np.array_equal(rec.kept[:sinks], held[:sinks])  # the sinks go on (ties among them: earlier first)
            assert np.array_equal(nxt.kv_positions[0], rec.kept)  # original positions, no renumbering


def test_decoding_compresses_and_the_switch_turns_it_off(weights):
    ids = np.random.default_rng(5).integers(3, 259, 150)
    on = generate(weights, ids, 6, (), method="pyramidinfer", params=Params())
    off = generate(weights, ids, 6, (), method="pyramidinfer", params=Params(gen_compress=False))
    assert {c.step for c in on.compressions} == set(range(1, 6))  # 5 tokens fed back
    assert {c.layer for c in on.compressions if c.step == 1} == set(range(24))  # P_i = 0: every layer at step 1
    assert off.compressions == [] and off.prefill.decode_state is None
    assert np.array_equal(on.prefill.logits, off.prefill.logits)  # the prefill is the same


@pytest.mark.parametrize("name, value, fragment", [
    ("recent_ratio", 1.0, "recent-ratio must be a number in [0, 1)"),
    ("recent_ratio", -0.1, "recent-ratio"),
    ("prefill_decay_ratio", 1.5, "prefill-decay-ratio must be a number in [0, 1]"),
    ("prefill_decay_strategy", "exponential", "prefill-decay-strategy must be one of cosine, linear"),
    ("gen_decay_strategy", "cos", "gen-decay-strategy must be one of cosine, linear"),
    ("streamingllm_sink_len", -1, "streamingllm-sink-len must be an integer ≥ 0"),
    ("min_context_length", 2.5, "min-context-length must be an integer ≥ 0"),
    ("layerwise_downsample_interval", 0, "layerwise-downsample-interval must be an integer ≥ 1"),
    ("exceed_length_to_compress", 0, "exceed-length-to-compress must be an integer ≥ 1"),
    ("gen_compress_ratio", 0.0, "gen-compress-ratio must be a number in (0, 1]"),
    ("distance_weight", float("nan"), "distance-weight must be a finite number > 0"),
])
def test_parameters_out_of_range_are_refused_by_name(name, value, fragment):
    with pytest.raises(OracleError, match=fragment.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        check_params("pyramidinfer", Params(**{name: value}), 24)


def test_kv_budget_does_not_combine_with_pyramidinfer():
    with pytest.raises(OracleError, match="kv-budget does not combine with pyramidinfer"):
        check_params("pyramidinfer", Params(kv_budget=64), 24)


def run_asl(*args):
    return subprocess.run([sys.executable, "-m", "reference", *args], capture_output=True, text=True, timeout=300)


def test_the_command_line_takes_the_authors_config_keys(tmp_path):
    ids = tmp_path / "ids.json"
    ids.write_text(json.dumps(np.random.default_rng(1).integers(3, 259, 150).tolist()))
    ok = run_asl("run", "--model", "tiny-llama", "--prompt-ids", str(ids), "--method", "pyramidinfer",
                 "--max-new-tokens", "3", "--recent-ratio", "0.3", "--min-context-length", "8",
                 "--streamingllm-sink-len", "2", "--trace", str(tmp_path / "t.json"))
    assert ok.returncode == 0, ok.stderr
    trace = json.loads((tmp_path / "t.json").read_text())
    assert trace["params"]["recent_ratio"] == 0.3 and trace["params"]["min_context_length"] == 8
    assert "[pyramidinfer: pruned at" in ok.stderr + ok.stdout
    bad = run_asl("run", "--model", "tiny-llama", "--prompt-ids", str(ids), "--method", "pyramidinfer",
                  "--prefill-decay-strategy", "exp")
    lines = bad.stderr.strip().splitlines()
    assert bad.returncode == 2 and len(lines) == 1 and "prefill-decay-strategy" in lines[0], bad.stderr
