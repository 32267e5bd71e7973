"""The transformer's parts against the definitions, and decoding against re-running prefill."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from reference.io.checkpoint import load_weights
from reference.model.attention import group_attention
from reference.model.config import parse_config
from reference.model.rope import apply_rope, inverse_frequencies, rope_tables
from reference.model.transformer import decode_step, prefill, rms_norm, silu
from tests.conftest import CHECKPOINTS

CFG = parse_config(dict(
    model_type="llama", vocab_size=10, hidden_size=16, intermediate_size=8, num_hidden_layers=1,
    num_attention_heads=2, num_key_value_heads=1, rms_norm_eps=1e-6, max_position_embeddings=64,
))


def naive_attention(q, k, v, q_pos, k_pos):
    """Every score computed, masked where the key's position is after the query's."""
    s = np.einsum("gtd,sd->gts", q, k) / np.sqrt(q.shape[-1])
    s = np.where(k_pos[None, None, :] > q_pos[None, :, None], -np.inf, s)
    p = np.exp(s - s.max(-1, keepdims=True))
    return (p / p.sum(-1, keepdims=True)) @ v


@settings(max_examples=60, deadline=None)
@given(
    T=st.integers(1, 40), extra=st.integers(0, 30), G=st.integers(1, 3), block=st.integers(1, 16),
    seed=st.integers(0, 2**31), data=st.data(),
)
def test_blocked_attention_equals_naive_attention(T, extra, G, block, seed, data):
    """Any ascending subset of key positions (a pruned cache) and query positions after some keys."""
    rng = np.random.default_rng(seed)
    n = T + extra
    k_pos = np.sort(rng.choice(np.arange(2 * n), size=n, replace=False)).astype(np.int64)
    # queries: the last T keys' positions (prefill of a pruned prompt) or fresh positions after all keys
    q_pos = k_pos[-T:] if data.draw(st.booleans()) else k_pos[-1] + 1 + np.arange(T)
    if q_pos[0] < k_pos[0]:
        q_pos = q_pos + (k_pos[0] - q_pos[0])
    q = rng.standard_normal((G, T, 8))
    k, v = rng.standard_normal((n, 8)), rng.standard_normal((n, 8))
    got = group_attention(q, k, v, q_pos, k_pos, block=block)
    np.testing.assert_allclose(got, naive_attention(q, k, v, q_pos, k_pos), rtol=1e-12, atol=1e-12)


def test_query_sees_only_itself_at_position_zero():
    q, k, v = np.ones((1, 1, 4)), np.ones((3, 4)), np.arange(12.0).reshape(3, 4)
    out = group_attention(q, k, v, np.array([0]), np.array([0, 1, 2]))
    np.testing.assert_array_equal(out[0, 0], v[0])


def test_rms_norm_by_hand():
    x = np.array([[3.0, 4.0]])  # mean square 12.5
    np.testing.assert_allclose(rms_norm(x, np.array([1.0, 2.0]), 0.0), [[3 / 12.5**0.5, 8 / 12.5**0.5]])


def test_silu_is_stable_and_right():
    x = np.array([-1.0, 0.0, 2.0, 30.0])
    np.testing.assert_allclose(silu(x), x / (1 + np.exp(-x)), rtol=1e-15)
    with np.errstate(all="raise"):  # no overflow where exp(-x) would overflow
        np.testing.assert_allclose(silu(np.array([-1000.0, 1000.0])), [0.0, 1000.0], atol=1e-300)


def test_rope_frequencies_by_hand():
    # head_dim 8, theta 10000: 1 / 10000^(i/8) for i = 0, 2, 4, 6
    np.testing.assert_allclose(inverse_frequencies(CFG), [1.0, 0.1, 0.01, 0.001], rtol=1e-15)


def test_rope_scores_depend_only_on_relative_position():
    rng = np.random.default_rng(1)
    q, k = rng.standard_normal((1, 1, 8)), rng.standard_normal((1, 1, 8))

    def score(m, n):
        cm, sm = rope_tables(CFG, np.array([m]), np.float64)
        cn, sn = rope_tables(CFG, np.array([n]), np.float64)
        return float((apply_rope(q, cm, sm) * apply_rope(k, cn, sn)).sum())

    assert score(7, 3) == pytest.approx(score(104, 100), rel=1e-12)
    assert score(7, 3) != pytest.approx(score(7, 4), rel=1e-6)


def test_rope_rotates_the_half_split_pairs():
    # x = e_0 at position 1: pair (x[0], x[4]) turns by angle 1 rad: (cos 1, sin 1)
    x = np.zeros((1, 1, 8))
    x[0, 0, 0] = 1.0
    cos, sin = rope_tables(CFG, np.array([1]), np.float64)
    y = apply_rope(x, cos, sin)[0, 0]
    np.testing.assert_allclose(y, [np.cos(1), 0, 0, 0, np.sin(1), 0, 0, 0], atol=1e-15)


@pytest.mark.parametrize("dtype,tol", [("float64", 1e-10), ("float32", 2e-4)])
def test_decoding_with_the_cache_equals_rerunning_prefill(tiny_dir, dtype, tol):
    w = load_weights(tiny_dir, dtype)
    ids = list(np.random.default_rng(3).integers(0, w.config.vocab_size, 40))
    logits, cache = prefill(w, ids[:30])
    for t in range(30, 40):
        full, _ = prefill(w, ids[: t + 1])
        logits, cache = decode_step(w, cache, ids[t], t)
        np.testing.assert_allclose(logits, full, rtol=0, atol=tol)
    assert all(h.k.shape[0] == 40 for layer in cache for h in layer)


def test_prefill_all_logits_last_row_equals_last_token_logits():
    w = load_weights(CHECKPOINTS / "tiny-llama", "float64")
    ids = [5, 9, 200, 31, 7]
    all_logits, _ = prefill(w, ids, all_logits=True)
    last, _ = prefill(w, ids)
    assert all_logits.shape == (5, w.config.vocab_size)
    np.testing.assert_allclose(all_logits[-1], last, rtol=0, atol=1e-12)


def test_layers_may_hold_different_numbers_of_tokens():
    """Drop tokens from one layer's cache: decoding then attends over what is left, by position."""
    from reference.model.transformer import HeadCache

    w = load_weights(CHECKPOINTS / "tiny-llama", "float64")
    ids = list(range(10, 30))
    _, cache = prefill(w, ids)
    keep = np.array([0, 3, 4, 11, 19])
    pruned = tuple(
        tuple(HeadCache(h.k[keep], h.v[keep], h.pos[keep]) for h in layer) if i == 5 else layer
        for i, layer in enumerate(cache)
    )
    logits_pruned, new_cache = decode_step(w, pruned, 42, 20)
    logits_full, _ = decode_step(w, cache, 42, 20)
    assert [h.k.shape[0] for h in new_cache[5]] == [6, 6]
    assert [h.k.shape[0] for h in new_cache[4]] == [21, 21]
    assert new_cache[5][0].pos.tolist() == [0, 3, 4, 11, 19, 20]
    assert not np.allclose(logits_pruned, logits_full)
