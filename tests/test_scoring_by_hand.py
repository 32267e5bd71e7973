"""Each scoring and selection step against numbers worked out by hand.

Every expected value below is written out in the test (as a literal, or as
plain arithmetic with `math.exp` and `fractions.Fraction`), never produced by
the code under test. The symbols are SPEC's: n tokens in the layer, w window,
s kernel, k select_k, k' = min(k - w, n - w), H query heads, H_kv KV heads,
G = H / H_kv, d head dimension, L_obs, L_min, τ.

`test_semantics_doc_worked_example` pins every number of the worked example
in docs/semantics.md; if you change one there, change it here.
"""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest

from reference.asl.criterion import RankVariance, fires, rank_variance, relative_ratio
from reference.asl.params import GEMFILTER_KERNEL, METHOD, METHODS, Params, check_params
from reference.asl.scoring import (
    group_scores,
    last_query_scores,
    pool,
    pooled_head_scores,
    prefix_attention,
    token_scores,
    window_attention,
)
from reference.asl.selection import (
    best,
    boundary_gap,
    kept_with_window,
    ranks,
    select_k_prime,
    top_from_ranks,
)
from reference.errors import OracleError

E = math.exp


def softmax_of(logits: list[float]) -> list[float]:
    """The textbook softmax, written out: e^x_j / Σ e^x."""
    total = sum(E(x) for x in logits)
    return [E(x) / total for x in logits]


# ------------------------------------------------------------ step 1-2: window softmax


def test_window_softmax_n4_w2_hd1_causal_inside_the_window():
    # n = 4 tokens, w = 2: the window queries are tokens 2 and 3. d = 1, so
    # 1/sqrt(d) = 1 and logit[i, j] = q_i * k_j. Keys k_j = j.
    # query 2 (q = 1): sees keys 0, 1, 2 -> logits 0, 1, 2; key 3 is masked.
    # query 3 (q = -1): sees keys 0..3 -> logits 0, -1, -2, -3.
    q = np.array([[[1.0], [-1.0]]])  # (H=1, w=2, d=1)
    k = np.array([[[0.0], [1.0], [2.0], [3.0]]])  # (H_kv=1, n=4, d=1)
    attn = window_attention(q, k, group_size=1)
    assert attn.shape == (1, 2, 4)
    row2 = [1 / (1 + E(1) + E(2)), E(1) / (1 + E(1) + E(2)), E(2) / (1 + E(1) + E(2)), 0.0]
    row3 = [1 / (1 + E(-1) + E(-2) + E(-3)), E(-1) / (1 + E(-1) + E(-2) + E(-3)),
            E(-2) / (1 + E(-1) + E(-2) + E(-3)), E(-3) / (1 + E(-1) + E(-2) + E(-3))]
    np.testing.assert_allclose(attn[0, 0], row2, rtol=1e-6, atol=0)
    np.testing.assert_allclose(attn[0, 1], row3, rtol=1e-6, atol=0)
    assert attn[0, 0, 3] == 0.0  # the masked key is exactly 0, not merely small
    np.testing.assert_allclose(attn.sum(axis=-1), 1.0, rtol=1e-6)


def test_window_softmax_divides_by_sqrt_d():
    # d = 4, sqrt(d) = 2. q = (2, 0, 0, 0) and k_j = (j, 0, 0, 0): q·k_j = 2j,
    # scaled logit = 2j / 2 = j. Without the scaling the logits would be 2j.
    q = np.array([[[2.0, 0, 0, 0], [2.0, 0, 0, 0]]])  # (1, w=2, 4)
    k = np.array([[[j, 0, 0, 0] for j in (0.0, 1.0, 2.0, 3.0)]])  # (1, 4, 4)
    attn = window_attention(q, k, group_size=1)
    np.testing.assert_allclose(attn[0, 0], softmax_of([0, 1, 2]) + [0.0], rtol=1e-6)
    np.testing.assert_allclose(attn[0, 1], softmax_of([0, 1, 2, 3]), rtol=1e-6)
    assert attn[0, 0, 3] == 0.0


def test_window_softmax_in_at_least_float32():
    q = np.array([[[1.0], [-1.0]]], dtype=np.float16)
    k = np.array([[[0.0], [1.0], [2.0], [3.0]]], dtype=np.float16)
    assert window_attention(q, k, 1).dtype == np.float32
    assert window_attention(q.astype(np.float64), k.astype(np.float64), 1).dtype == np.float64


def test_window_softmax_gqa_head_h_reads_kv_head_h_div_g():
    # H = 4 query heads, H_kv = 2, G = 2: heads 0, 1 read KV head 0; heads 2, 3
    # read KV head 1. Every head has the same queries q = 1 (d = 1, n = 3, w = 1),
    # so each head's row is the softmax of its KV head's keys:
    #   KV head 0 keys (0, 1, 2) -> softmax(0, 1, 2)
    #   KV head 1 keys (2, 0, 0) -> softmax(2, 0, 0)
    # A wrong mapping h % H_kv would give head 1 the row softmax(2, 0, 0) and
    # head 2 the row softmax(0, 1, 2).
    q = np.ones((4, 1, 1))  # (H=4, w=1, d=1)
    k = np.array([[[0.0], [1.0], [2.0]], [[2.0], [0.0], [0.0]]])  # (H_kv=2, n=3, 1)
    attn = window_attention(q, k, group_size=2)
    kv0, kv1 = softmax_of([0, 1, 2]), softmax_of([2, 0, 0])
    for h, expected in enumerate([kv0, kv0, kv1, kv1]):
        np.testing.assert_allclose(attn[h, 0], expected, rtol=1e-6, err_msg=f"head {h}")
    assert not np.allclose(kv0, kv1)  # the test can tell the mappings apart


# ------------------------------------------------------------ step 3: prefix sums


def test_prefix_attention_sums_the_window_queries_over_prefix_tokens_only():
    # Same set-up as the n = 4, w = 2, d = 1 test: prefix tokens are j = 0, 1.
    # u[j] = attn[query 2, j] + attn[query 3, j].
    q = np.array([[[1.0], [-1.0]]])
    k = np.array([[[0.0], [1.0], [2.0], [3.0]]])
    z2 = 1 + E(1) + E(2)
    z3 = 1 + E(-1) + E(-2) + E(-3)
    u = prefix_attention(q, k, group_size=1)
    assert u.shape == (1, 2)  # (H, n - w): the window's own columns are dropped
    np.testing.assert_allclose(u[0], [1 / z2 + 1 / z3, E(1) / z2 + E(-1) / z3], rtol=1e-6)


# ------------------------------------------------------------ step 4: pooling


@pytest.mark.parametrize(
    "u, s, expected",
    [
        ([3, 0, 0, 6], 3, [1, 1, 2, 2]),  # (0+3+0)/3, (3+0+0)/3, (0+0+6)/3, (0+6+0)/3
        ([5, 0, 0, 0, 10], 5, [1, 1, 3, 2, 2]),  # 5/5, 5/5, 15/5, 10/5, 10/5
        ([4, 6], 5, [2, 2]),  # the kernel is wider than u: (0+0+4+6+0)/5 twice
        ([3, 0, 0, 6], 1, [3, 0, 0, 6]),  # s = 1 is the identity
    ],
)
def test_avg_pooling_is_zero_padded_with_divisor_s(u, s, expected):
    out = pool(np.array([u], dtype=np.float64), s, "avg")
    np.testing.assert_allclose(out[0], expected, rtol=1e-12)


def test_avg_pooling_acts_on_the_last_axis_per_head():
    u = np.array([[3.0, 0, 0, 6], [0, 0, 9, 0]])  # (H=2, 4)
    np.testing.assert_allclose(pool(u, 3, "avg"), [[1, 1, 2, 2], [0, 3, 3, 3]], rtol=1e-12)


def test_max_pooling_padding_never_wins():
    # All negative: zero padding would put 0 at both edges. Width 3:
    # j0 max(-3, -1) = -1; j1 max(-3, -1, -4) = -1; j2 max(-1, -4, -2) = -1; j3 max(-4, -2) = -2.
    u = np.array([[-3.0, -1.0, -4.0, -2.0]])
    np.testing.assert_array_equal(pool(u, 3, "max"), [[-1, -1, -1, -2]])
    # width 5 on 4 tokens: j0 max(-3,-1,-4) = -1, j1..j2 -1, j3 max(-1,-4,-2) = -1
    np.testing.assert_array_equal(pool(u, 5, "max"), [[-1, -1, -1, -1]])
    np.testing.assert_array_equal(pool(u, 1, "max"), u)  # s = 1 is the identity


# ------------------------------------------------------------ step 5: summing heads


def test_token_scores_sum_every_query_head():
    p = np.array([[1.0, 2.0], [10.0, 20.0], [100.0, 200.0]])  # (H=3, n-w=2)
    np.testing.assert_array_equal(token_scores(p), [111, 222])


def test_group_scores_sum_the_heads_of_each_kv_group():
    # H = 4, G = 2: group 0 = heads {0, 1}, group 1 = heads {2, 3}.
    # (A wrong grouping h % H_kv would give {0, 2} -> [101, 202] and {1, 3} -> [1010, 2020].)
    p = np.array([[1.0, 2.0], [10.0, 20.0], [100.0, 200.0], [1000.0, 2000.0]])
    np.testing.assert_array_equal(group_scores(p, group_size=2), [[11, 22], [1100, 2200]])
    np.testing.assert_array_equal(group_scores(p, group_size=1), p)  # MHA: one head per group
    np.testing.assert_array_equal(group_scores(p, group_size=4), [[1111, 2222]])  # MQA


# ------------------------------------------------------------ step 6-7: ranks and top(k')


def test_ranks_ties_go_to_the_earlier_token():
    # score 2 5 5 1 5: the three 5s take ranks 1, 2, 3 in position order, then 2, then 1.
    np.testing.assert_array_equal(ranks(np.array([2.0, 5, 5, 1, 5])), [4, 1, 2, 5, 3])
    np.testing.assert_array_equal(ranks(np.array([7.0, 7, 7, 7])), [1, 2, 3, 4])
    np.testing.assert_array_equal(ranks(np.array([1.0, 2, 3, 4])), [4, 3, 2, 1])


def test_ranks_match_the_counting_definition_and_are_a_permutation():
    # rank[j] = 1 + #(higher) + #(earlier equal), counted with plain Python.
    rng = np.random.default_rng(0)
    for _ in range(50):
        score = rng.integers(0, 4, size=int(rng.integers(1, 12))).astype(np.float64)  # many ties
        expected = [1 + sum(1 for x in score if x > score[j]) + sum(1 for i in range(j) if score[i] == score[j])
                    for j in range(len(score))]
        r = ranks(score)
        assert list(r) == expected
        assert sorted(r) == list(range(1, len(score) + 1))


def test_top_from_ranks_returns_the_k_prime_smallest_ranks_ascending():
    r = np.array([4, 1, 2, 5, 3])
    np.testing.assert_array_equal(top_from_ranks(r, 2), [1, 2])
    np.testing.assert_array_equal(top_from_ranks(r, 3), [1, 2, 4])
    np.testing.assert_array_equal(top_from_ranks(r, 5), [0, 1, 2, 3, 4])


def test_best_breaks_ties_by_position_and_returns_ascending():
    score = np.array([2.0, 5, 5, 1, 5])
    np.testing.assert_array_equal(best(score, 2), [1, 2])  # token 4 (also 5) loses the tie
    np.testing.assert_array_equal(best(score, 3), [1, 2, 4])
    np.testing.assert_array_equal(best(score, 4), [0, 1, 2, 4])
    np.testing.assert_array_equal(best(np.array([1.0, 9, 3, 9]), 2), [1, 3])
    np.testing.assert_array_equal(best(np.array([0.0, 1, 2, 3]), 2), [2, 3])  # ascending, not by score
    np.testing.assert_array_equal(best(np.array([7.0, 7, 7, 7]), 2), [0, 1])


def test_boundary_gap_is_last_kept_minus_first_left_out():
    score = np.array([2.0, 5, 5, 1, 5])  # by rank: 5 (j1), 5 (j2), 5 (j4), 2 (j0), 1 (j3)
    assert boundary_gap(score, 1) == 0.0  # 5 - 5
    assert boundary_gap(score, 3) == 3.0  # 5 - 2
    assert boundary_gap(score, 4) == 1.0  # 2 - 1
    assert boundary_gap(score, 5) is None  # all kept
    assert boundary_gap(score, 0) is None


def test_kept_with_window_appends_the_last_w_positions():
    kept = kept_with_window(np.array([0, 3]), n=8, window=2)
    np.testing.assert_array_equal(kept, [0, 3, 6, 7])
    assert kept.dtype == np.int64


@pytest.mark.parametrize(
    "k, n, w, expected",
    [(5, 12, 2, 3), (2048, 100, 32, 68), (40, 40, 32, 8), (2048, 33, 32, 1), (33, 1000, 32, 1)],
)
def test_select_k_prime_is_min_of_k_minus_w_and_n_minus_w(k, n, w, expected):
    assert select_k_prime(k, n, w) == expected


# ------------------------------------------------------------ the ASL criterion


def test_rank_variance_two_layers_by_hand():
    # L_obs = 2, k' = 1. Layer a ranks (1, 2, 3, 4), layer b (2, 1, 3, 4).
    # U = top_a(1) ∪ top_b(1) = {0} ∪ {1} = {0, 1}.
    # μ_0 = (1 + 2)/2 = 3/2, μ_1 = (2 + 1)/2 = 3/2; the four deviations are ±1/2.
    # v = (4 · 1/4) / (L_obs · |U|) = 1 / 4.
    var = rank_variance([np.array([1, 2, 3, 4]), np.array([2, 1, 3, 4])], k_prime=1)
    assert var.union_size == 2
    assert var.exact == Fraction(1, 4)
    assert var.v == 0.25


def test_rank_variance_three_layers_by_hand():
    # L_obs = 3, k' = 1, ranks per layer (tokens 0, 1, 2):
    #   (1, 2, 3), (2, 1, 3), (3, 2, 1)  ->  U = {0} ∪ {1} ∪ {2} = {0, 1, 2}
    # token 0: ranks 1, 2, 3  μ = 2     Σ(r-μ)² = 1 + 0 + 1        = 2
    # token 1: ranks 2, 1, 2  μ = 5/3   Σ(r-μ)² = 1/9 + 4/9 + 1/9  = 2/3
    # token 2: ranks 3, 3, 1  μ = 7/3   Σ(r-μ)² = 4/9 + 4/9 + 16/9 = 8/3
    # v = (2 + 2/3 + 8/3) / (3 · 3) = (16/3) / 9 = 16/27
    var = rank_variance([np.array([1, 2, 3]), np.array([2, 1, 3]), np.array([3, 2, 1])], k_prime=1)
    assert var.union_size == 3
    assert var.exact == Fraction(16, 27)


def test_rank_variance_counts_only_the_union():
    # Tokens 2 and 3 swap, but only token 0 is ever in top(1): v = 0.
    var = rank_variance([np.array([1, 2, 3, 4]), np.array([1, 2, 4, 3])], k_prime=1)
    assert var.union_size == 1
    assert var.exact == 0
    # with k' = 3 the union is everything: tokens 2, 3 each deviate ±1/2 twice
    # -> v = (4 · 1/4) / (2 · 4) = 1/8
    var = rank_variance([np.array([1, 2, 3, 4]), np.array([1, 2, 4, 3])], k_prime=3)
    assert var.union_size == 4
    assert var.exact == Fraction(1, 8)


def test_relative_ratio_is_exact():
    v = rank_variance([np.array([1, 2, 3, 4]), np.array([2, 1, 3, 4])], 1)  # 1/4
    v0 = rank_variance([np.array([1, 2, 3]), np.array([2, 1, 3]), np.array([3, 2, 1])], 1)  # 16/27
    assert relative_ratio(v, v0) == Fraction(1, 4) / Fraction(16, 27) == Fraction(27, 64)
    assert relative_ratio(v0, v0) == 1  # the ratio at L_min is exactly 1


def test_relative_ratio_with_v0_zero():
    zero = rank_variance([np.array([1, 2, 3]), np.array([1, 2, 3])], 1)  # identical ranks: v = 0
    positive = rank_variance([np.array([1, 2, 3]), np.array([2, 1, 3])], 1)
    assert zero.exact == 0 and positive.exact > 0
    assert relative_ratio(zero, zero) == 0  # 0 / 0 -> 0 (SPEC's decision)
    assert relative_ratio(positive, zero) == math.inf  # v > 0 over V0 = 0 -> +inf
    assert relative_ratio(RankVariance(5, 0, 3), zero) == 0


def test_fires_is_strict():
    assert fires(Fraction(1, 2), 0.5) is False  # equal to τ: no
    assert fires(Fraction(49, 100), 0.5) is True
    assert fires(Fraction(51, 100), 0.5) is False
    assert fires(Fraction(1), 0.3) is False  # the ratio at L_min never fires for τ ≤ 1
    assert fires(Fraction(0), 0.3) is True  # V0 = 0 and v = 0
    assert fires(math.inf, 0.3) is False  # V0 = 0 and v > 0
    assert fires(math.inf, 1e300) is False


def test_fires_compares_with_the_exact_value_of_tau():
    # float 0.3 is 0.299999999999999988897769753748...; a ratio of exactly
    # that value does not fire, one just below it does.
    tau = 0.3
    exact_tau = Fraction(5404319552844595, 18014398509481984)  # 0.3 as a binary64, by hand: round(0.3 · 2^54) / 2^54
    assert Fraction(tau) == exact_tau
    assert fires(exact_tau, tau) is False
    assert fires(exact_tau - Fraction(1, 10**30), tau) is True
    assert fires(Fraction(3, 10), tau) is False  # 3/10 is above the float 0.3
    assert fires(Fraction(29, 100), tau) is True


# ------------------------------------------------------------ GemFilter's scores


def test_last_query_scores_raw_dot_products_summed_over_heads_then_pooled_5():
    # H = 2, H_kv = 1, d = 2, N = 5.
    # head 0 q = (1, 2):  q·k_j = 1, 2, 6, 1, 0
    # head 1 q = (3, -1): q·k_j = 3, -1, 4, -4, 0
    # summed:                     4, 1, 10, -3, 0   (no 1/sqrt(2), no softmax: negatives stay)
    # avg pool width 5, zero padded, divisor 5:
    #   j0 (0+0+4+1+10)/5 = 3;  j1 (0+4+1+10-3)/5 = 12/5;  j2 (4+1+10-3+0)/5 = 12/5
    #   j3 (1+10-3+0+0)/5 = 8/5;  j4 (10-3+0+0+0)/5 = 7/5
    q_last = np.array([[1.0, 2.0], [3.0, -1.0]])  # (H, d)
    k = np.array([[[1.0, 0], [0, 1], [2, 2], [-1, 1], [0, 0]]])  # (H_kv, N, d)
    np.testing.assert_allclose(last_query_scores(q_last, k, 2, kernel=1), [4, 1, 10, -3, 0], rtol=1e-12)
    expected = [3, 12 / 5, 12 / 5, 8 / 5, 7 / 5]
    np.testing.assert_allclose(last_query_scores(q_last, k, 2), expected, rtol=1e-12)  # default width
    np.testing.assert_allclose(last_query_scores(q_last, k, 2, kernel=GEMFILTER_KERNEL), expected, rtol=1e-12)
    assert GEMFILTER_KERNEL == 5


def test_last_query_scores_gqa_mapping():
    # H = 4, H_kv = 2, G = 2, d = 2, N = 3. Only heads 0 and 2 have a non-zero query:
    # head 0 q = (1, 0) reads KV head 0 -> first coordinate of K0;
    # head 2 q = (0, 1) reads KV head 1 -> second coordinate of K1.
    # K0 = (1, 5), (2, 6), (3, 7); K1 = (0, 10), (0, 20), (0, 30)
    # correct: (1 + 10, 2 + 20, 3 + 30) = (11, 22, 33)
    # with h % H_kv head 2 would read K0: (1 + 5, 2 + 6, 3 + 7) = (6, 8, 10)
    q_last = np.array([[1.0, 0], [0, 0], [0, 1], [0, 0]])
    k = np.array([[[1.0, 5], [2, 6], [3, 7]], [[0.0, 10], [0, 20], [0, 30]]])
    np.testing.assert_allclose(last_query_scores(q_last, k, 2, kernel=1), [11, 22, 33], rtol=1e-12)


# ------------------------------------------------------------ parameter ranges


L = 24  # layers of the model the parameters are checked against


def assert_refused(method: str, params: Params, name: str, allowed: str) -> None:
    with pytest.raises(OracleError) as info:
        check_params(method, params, L)
    message = str(info.value)
    assert name in message, message
    assert allowed in message, message


@pytest.mark.parametrize("method", METHODS)
def test_defaults_are_valid_for_every_method(method):
    check_params(method, Params(kv_budget=64) if method == "snapkv" else Params(), L)


@pytest.mark.parametrize("method", ["fastkv", "asl", "asl-2pass", "snapkv"])
@pytest.mark.parametrize("window", [0, -1])
def test_window_at_least_one(method, window):
    assert_refused(method, Params(window=window, select_k=8, kv_budget=64), "window", "≥ 1")


@pytest.mark.parametrize("kernel", [0, 2, 4, -1, -3])
def test_kernel_odd_and_at_least_one(kernel):
    assert_refused("asl", Params(kernel=kernel), "kernel", "odd and ≥ 1")
    assert_refused("snapkv", Params(kernel=kernel, kv_budget=64), "kernel", "odd and ≥ 1")


@pytest.mark.parametrize("kernel", [1, 3, 5, 7, 9])
def test_odd_kernels_accepted(kernel):
    check_params("asl", Params(kernel=kernel), L)


@pytest.mark.parametrize("method", ["fastkv", "asl", "asl-2pass"])
def test_select_k_greater_than_window(method):
    assert_refused(method, Params(window=32, select_k=32), "select-k", "> window")
    assert_refused(method, Params(window=32, select_k=5), "select-k", "> window")
    check_params(method, Params(window=32, select_k=33), L)


def test_l_obs_between_2_and_l_min_plus_1():
    assert_refused("asl", Params(l_min=10, l_obs=1), "l-obs", "[2, l-min + 1 = 11]")
    assert_refused("asl", Params(l_min=10, l_obs=12), "l-obs", "[2, l-min + 1 = 11]")
    assert_refused("asl-2pass", Params(l_min=10, l_obs=0), "l-obs", "[2, ")
    check_params("asl", Params(l_min=10, l_obs=2), L)
    check_params("asl", Params(l_min=10, l_obs=11), L)  # scoring starts at layer L_min - L_obs + 1 = 0


def test_l_min_below_the_layer_count():
    assert_refused("asl", Params(l_min=24), "l-min", "[1, 24)")
    assert_refused("asl", Params(l_min=30), "l-min", "[1, 24)")
    assert_refused("asl", Params(l_min=-1), "l-min", "[1, 24)")
    assert_refused("asl", Params(l_min=0, l_obs=2), "l-min", "[1, 24)")  # L_obs ≥ 2 needs L_min ≥ 1
    check_params("asl", Params(l_min=23, l_obs=8), L)


@pytest.mark.parametrize("tau", [0, 0.0, -0.1, float("nan"), True])
def test_tau_positive(tau):
    assert_refused("asl", Params(tau=tau), "tau", "> 0")


@pytest.mark.parametrize("method", [m for m in METHODS if not METHOD[m].per_layer])  # PyramidInfer refuses B
def test_kv_budget_greater_than_window(method):
    assert_refused(method, Params(window=32, kv_budget=32), "kv-budget", "> window")
    assert_refused(method, Params(window=32, kv_budget=8), "kv-budget", "> window")
    check_params(method, Params(window=32, kv_budget=33), L)


@pytest.mark.parametrize("layer", [24, 25, -1])
def test_fixed_layers_inside_the_model(layer):
    assert_refused("fastkv", Params(select_layer=layer), "select-layer", "in [0, 24)")
    assert_refused("gemfilter", Params(filter_layer=layer), "filter-layer", "in [0, 24)")


def test_fixed_layers_at_the_edges_accepted():
    check_params("fastkv", Params(select_layer=0), L)
    check_params("fastkv", Params(select_layer=23), L)
    check_params("gemfilter", Params(filter_layer=0), L)
    check_params("gemfilter", Params(filter_layer=23), L)


def test_unknown_method():
    with pytest.raises(OracleError) as info:
        check_params("h2o", Params(), L)
    message = str(info.value)
    assert "method" in message and "h2o" in message
    assert all(m in message for m in METHODS)  # the allowed values are listed


def test_snapkv_needs_a_kv_budget():
    assert_refused("snapkv", Params(), "kv-budget", "")


@pytest.mark.parametrize("method", ["snapkv", "fastkv", "asl", "asl-2pass"])
def test_pooling_avg_or_max(method):
    assert_refused(method, Params(pooling="median", kv_budget=64), "pooling", "avg, max")
    assert_refused(method, Params(pooling="AVG", kv_budget=64), "pooling", "avg, max")


@pytest.mark.parametrize("method", ["full", "gemfilter"])
def test_pooling_checked_whenever_snapkv_runs(method):
    assert_refused(method, Params(pooling="median", kv_budget=64), "pooling", "avg, max")


@pytest.mark.parametrize("field, value, name", [("window", 1.5, "window"), ("kernel", 3.0, "kernel")])
def test_window_and_kernel_integers_whenever_snapkv_runs(field, value, name):
    assert_refused("full", Params(kv_budget=64, **{field: value}), name, "integer")


# ------------------------------------------------------------ docs/semantics.md, worked example

# N = n = 12 tokens, w = 2, s = 3 (avg), H = 2 query heads, H_kv = 1, k = 5.
# u[h, j] for the 10 prefix tokens, in units of 0.05 ("ticks"), as in the doc.
DOC_U_TICKS = [
    [9, 5, 2, 1, 2, 0, 2, 5, 2, 1],  # head 0: Σ = 29 ticks = 1.45
    [10, 3, 2, 2, 4, 0, 0, 3, 2, 2],  # head 1: Σ = 28 ticks = 1.40
]
# 3 · p[h, j] in ticks (u_{j-1} + u_j + u_{j+1}, zero outside), so p = ticks / 60
DOC_P_SIXTIETHS = [
    [14, 16, 8, 5, 3, 4, 7, 9, 8, 3],
    [13, 15, 7, 8, 6, 4, 3, 5, 7, 4],
]
DOC_SCORE_SIXTIETHS = [27, 31, 15, 13, 9, 8, 10, 14, 15, 7]
DOC_RANKS_L11 = [2, 1, 3, 6, 8, 9, 7, 5, 4, 10]  # tokens 2 and 8 tie at 15/60: token 2 gets rank 3
DOC_K_PRIME = 3  # min(5 - 2, 12 - 2)
DOC_TOP = [0, 1, 2]
DOC_KEPT = [0, 1, 2, 10, 11]
DOC_GAP = 0.0  # score of token 2 (last kept) minus token 8 (first left out)
# the rank table, L_min = 10, L_obs = 3: scoring starts at layer 8
DOC_RANK_TABLE = {
    8: [5, 3, 9, 1, 8, 2, 7, 6, 4, 10],
    9: [2, 1, 4, 6, 7, 9, 8, 5, 3, 10],
    10: [1, 2, 3, 5, 8, 9, 7, 6, 4, 10],
    11: DOC_RANKS_L11,
}
DOC_TOPS = {8: [1, 3, 5], 9: [0, 1, 8], 10: [0, 1, 2], 11: [0, 1, 2]}
DOC_U_10, DOC_U_11 = [0, 1, 2, 3, 5, 8], [0, 1, 2, 8]
DOC_MU_10 = {0: Fraction(8, 3), 1: Fraction(2), 2: Fraction(16, 3), 3: Fraction(4), 5: Fraction(20, 3), 8: Fraction(11, 3)}
DOC_SQDEV_10 = {0: Fraction(26, 3), 1: Fraction(2), 2: Fraction(62, 3), 3: Fraction(14), 5: Fraction(98, 3),
                8: Fraction(2, 3)}
DOC_MU_11 = {0: Fraction(5, 3), 1: Fraction(4, 3), 2: Fraction(10, 3), 8: Fraction(11, 3)}
DOC_SQDEV_11 = {0: Fraction(2, 3), 1: Fraction(2, 3), 2: Fraction(2, 3), 8: Fraction(2, 3)}
DOC_V0 = Fraction(118, 27)  # v_10 = (236/3) / (3 · 6)
DOC_V11 = Fraction(2, 9)  # (8/3) / (3 · 4)
DOC_RATIO_11 = Fraction(3, 59)
DOC_TAU = 0.3
# section 6 of the example: a 16-layer model, d = 8, float32, one KV head
DOC_L, DOC_D, DOC_BYTES = 16, 8, 4
DOC_KV_BYTES = {"full": 12288, "asl": 10496, "asl-2pass": 5120, "asl+B4": 4096}
DOC_B = 4
DOC_SNAPKV_L11 = [0, 1, 10, 11]


def test_semantics_doc_worked_example():
    n, w, s, k, tau = 12, 2, 3, 5, DOC_TAU
    u = np.array(DOC_U_TICKS, dtype=np.float64) * 0.05  # (H=2, n-w=10)
    assert u.shape == (2, n - w)
    assert [sum(row) for row in DOC_U_TICKS] == [29, 28]  # each head's prefix mass ≤ w = 2 (40 ticks)

    # pooled p and the summed score
    p = pool(u, s, "avg")
    np.testing.assert_allclose(p, np.array(DOC_P_SIXTIETHS) / 60, rtol=1e-12)
    score = token_scores(p)
    np.testing.assert_allclose(score, np.array(DOC_SCORE_SIXTIETHS) / 60, rtol=1e-12)
    assert score[2] == score[8]  # the tie is exact in floats too (same neighbourhoods in each head)

    # ranks, k', top(k'), kept set, boundary gap
    rank = ranks(score)
    np.testing.assert_array_equal(rank, DOC_RANKS_L11)
    assert select_k_prime(k, n, w) == DOC_K_PRIME
    np.testing.assert_array_equal(top_from_ranks(rank, DOC_K_PRIME), DOC_TOP)
    kept = kept_with_window(top_from_ranks(rank, DOC_K_PRIME), n, w)
    np.testing.assert_array_equal(kept, DOC_KEPT)
    assert len(kept) == min(k, n)
    assert boundary_gap(score, DOC_K_PRIME) == DOC_GAP

    # the rank table: top sets, U, μ_j, Σ_m (r - μ_j)², v, ratio, decision
    for layer, r in DOC_RANK_TABLE.items():
        assert sorted(r) == list(range(1, 11))
        np.testing.assert_array_equal(top_from_ranks(np.array(r), DOC_K_PRIME), DOC_TOPS[layer])
    for layers, union, mu, sqdev, v in [((8, 9, 10), DOC_U_10, DOC_MU_10, DOC_SQDEV_10, DOC_V0),
                                        ((9, 10, 11), DOC_U_11, DOC_MU_11, DOC_SQDEV_11, DOC_V11)]:
        table = [DOC_RANK_TABLE[m] for m in layers]
        assert sorted(set().union(*(DOC_TOPS[m] for m in layers))) == union
        for j in union:  # the doc's μ_j and squared deviations, by plain arithmetic
            assert Fraction(sum(row[j] for row in table), 3) == mu[j]
            assert sum((row[j] - mu[j]) ** 2 for row in table) == sqdev[j]
        assert sum(sqdev.values()) / (3 * len(union)) == v
        var = rank_variance([np.array(row) for row in table], DOC_K_PRIME)  # the project's function
        assert var.union_size == len(union)
        assert var.exact == v
    v0 = rank_variance([np.array(DOC_RANK_TABLE[m]) for m in (8, 9, 10)], DOC_K_PRIME)
    v11 = rank_variance([np.array(DOC_RANK_TABLE[m]) for m in (9, 10, 11)], DOC_K_PRIME)
    assert relative_ratio(v0, v0) == 1 and not fires(relative_ratio(v0, v0), tau)  # layer 10 = L_min
    assert round(1 - tau, 4) == 0.7  # its margin
    assert relative_ratio(v11, v0) == DOC_RATIO_11
    assert fires(relative_ratio(v11, v0), tau)  # ℓ* = 11
    assert round(float(DOC_RATIO_11) - tau, 4) == -0.2492  # the margin the trace reports
    assert round(float(DOC_V0), 4) == 4.3704 and round(float(DOC_V11), 4) == 0.2222
    assert round(float(DOC_RATIO_11), 4) == 0.0508
    assert Fraction(3, 10) * DOC_V0 == Fraction(59, 45)  # v_11 would have had to be ≥ 59/45 ≈ 1.311 not to fire

    # decoding positions and cache sizes (section 6) for ℓ* = 11
    assert n == 12 and len(kept) == 5  # one-shot decodes at position 12, two-pass at |kept| = 5
    cached = {"full": [n] * DOC_L,
              "asl": [n] * 12 + [len(kept)] * (DOC_L - 12),  # layers 0..11 hold 12, 12..15 hold 5
              "asl-2pass": [len(kept)] * DOC_L,
              "asl+B4": [min(c, DOC_B) for c in [n] * 12 + [len(kept)] * (DOC_L - 12)]}
    for method, per_layer in cached.items():
        assert sum(2 * c * DOC_D * DOC_BYTES for c in per_layer) == DOC_KV_BYTES[method]
    # SnapKV with B = 4 at layer 11: one KV head, so score_0 = score; B - w = 2 best plus the window
    score_g = group_scores(p, group_size=2)  # (H_kv=1, 10)
    np.testing.assert_allclose(score_g[0], score, rtol=1e-12)
    np.testing.assert_array_equal(kept_with_window(best(score_g[0], DOC_B - w), n, w), DOC_SNAPKV_L11)


def test_semantics_doc_worked_example_in_float32():
    # The example's decisions do not depend on the dtype.
    u = (np.array(DOC_U_TICKS) * 0.05).astype(np.float32)
    score = token_scores(pool(u, 3, "avg"))
    assert score.dtype == np.float32
    np.testing.assert_array_equal(ranks(score), DOC_RANKS_L11)


def test_pooled_head_scores_chains_steps_1_to_4():
    # The same pipeline from q and k (steps 1-4 in one call), on a layer built so
    # that the window softmax gives exactly one-hot rows: pooled_head_scores must
    # equal pool(prefix_attention(...)). n = 5, w = 2, d = 1, one head.
    # Huge logits make each window query attend to one key: query 3 (q = 1000)
    # with keys (0, 0, 1, ...) picks key 2; query 4 (q = -1000) picks the key with
    # the most negative k, key 0. u = (1, 0, 1); avg pool s = 3: (1/3, 2/3, 1/3).
    q = np.array([[[1000.0], [-1000.0]]])
    k = np.array([[[-1.0], [0.0], [1.0], [0.0], [0.0]]])
    np.testing.assert_allclose(prefix_attention(q, k, 1), [[1, 0, 1]], atol=1e-12)
    np.testing.assert_allclose(pooled_head_scores(q, k, 1, 3, "avg"), [[1 / 3, 2 / 3, 1 / 3]], atol=1e-12)


def test_windows_holding_the_same_values_pool_to_the_same_bits():
    """n ≤ s: every window covers the whole row plus zeros, so all scores are mathematically equal; they must be
    bitwise equal too, so that SPEC's tie rule (earlier wins) decides the ranks, not rounding."""
    rng = np.random.default_rng(0)
    for n, s in ((4, 9), (6, 11), (3, 15)):
        u = rng.random((2, n)) * 1e-3 + rng.random((2, n))
        p = pool(u, s, "avg")
        assert all((p[h] == p[h, 0]).all() for h in range(2))
        np.testing.assert_array_equal(ranks(p[0]), np.arange(1, n + 1))


def test_two_pass_asl_that_never_fires_falls_back_to_the_last_layers_ranks():
    """The authors' fallback, derived here from other code paths: one-shot ASL that never fires is a full run whose
    trace holds every scored layer's ranks; top(k') of layer L-1's ranks plus the window, re-run from scratch as a
    full prompt, must be exactly what two-pass ASL decodes from."""
    from reference.asl.generate import generate
    from reference.asl.params import Params
    from reference.io.checkpoint import load_weights
    from reference.io.fetch import resolve_model

    weights = load_weights(resolve_model("tiny-llama"), "float64")
    L = weights.config.num_hidden_layers
    ids = np.random.default_rng(7).integers(3, 259, 90).tolist()
    p = Params(window=4, kernel=3, select_k=20, tau=1e-9, l_min=6, l_obs=4)
    one_shot = generate(weights, ids, 4, (), method="asl", params=p).prefill
    assert one_shot.select_layer is None  # τ = 1e-9: the criterion never fires
    last_ranks = one_shot.layers[L - 1].ranks  # (N - w,)
    N, w, k_prime = len(ids), p.window, p.select_k - p.window
    by_hand = sorted([j for j in range(N - w) if last_ranks[j] <= k_prime] + list(range(N - w, N)))
    assert len(by_hand) == p.select_k
    two_pass = generate(weights, ids, 4, (), method="asl-2pass", params=p)
    assert two_pass.prefill.select_layer == L - 1 and two_pass.prefill.kept_positions.tolist() == by_hand
    assert len(two_pass.prefill.first_pass) == L and two_pass.prefill.next_position == len(by_hand)
    rerun = generate(weights, [ids[j] for j in by_hand], 4, (), method="full", params=p)
    np.testing.assert_array_equal(two_pass.prefill.logits, rerun.prefill.logits)
    assert two_pass.generated_ids == rerun.generated_ids
