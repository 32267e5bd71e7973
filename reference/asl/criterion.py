"""ASL's criterion (docs/semantics.md §3): does the ranking still move between recent layers?

Over the last L_obs layers' ranks, U is the union of their top-k' sets and

    v = mean over layers m and tokens j in U of (rank_m[j] - μ_j)²,   μ_j = mean_m rank_m[j].

Ranks are integers, so v is an exact rational:
    v = Σ_j (L_obs · Σ_m r_mj² - (Σ_m r_mj)²) / (L_obs² · |U|),
and the decision ratio = v / V0 < τ is taken on exact fractions, never on
rounded floats. The float values go into the trace.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction

import numpy as np


@dataclass(frozen=True)
class RankVariance:
    union_size: int  # |U|
    numerator: int  # Σ_j (L_obs Σ_m r² - (Σ_m r)²), an exact integer
    l_obs: int

    @property
    def exact(self) -> Fraction:
        return Fraction(self.numerator, self.l_obs**2 * self.union_size)

    @property
    def v(self) -> float:
        return float(self.exact)


def rank_variance(recent_ranks: list[np.ndarray], k_prime: int) -> RankVariance:
    """v over the given layers' ranks (each a permutation of 1 .. n-w)."""
    R = np.stack(recent_ranks).astype(np.int64)  # (L_obs, n-w)
    in_union = (R <= k_prime).any(axis=0)  # (n-w,)
    R_U = R[:, in_union]  # (L_obs, |U|)
    l_obs = R.shape[0]
    S = R_U.sum(axis=0)  # (|U|,)
    Q = (R_U * R_U).sum(axis=0)  # (|U|,)
    numerator = sum(int(t) for t in l_obs * Q - S * S)  # Python ints: no overflow
    return RankVariance(int(in_union.sum()), numerator, l_obs)


def relative_ratio(v: RankVariance, v0: RankVariance) -> Fraction | float:
    """ratio = v / V0, exact; V0 = 0 gives 0 when v = 0 and +inf otherwise (SPEC's decision)."""
    if v0.numerator == 0:
        return Fraction(0) if v.numerator == 0 else math.inf
    return v.exact / v0.exact


def fires(ratio: Fraction | float, tau: float) -> bool:
    """ratio < τ, strictly, compared exactly (τ as the exact value of its float)."""
    return ratio != math.inf and ratio < Fraction(tau)


@dataclass(frozen=True)
class Observation:
    """What the criterion saw at one layer ℓ ≥ L_min."""

    variance: RankVariance
    ratio: Fraction | float  # exact v_ℓ / V0 (or inf)
    fires: bool


class Criterion:
    """ASL's decision, fed one scored layer's ranks at a time, from layer L_min - L_obs + 1 on."""

    def __init__(self, tau: float, l_min: int, l_obs: int, k_prime: int):
        self.tau, self.l_min, self.l_obs, self.k_prime = tau, l_min, l_obs, k_prime
        self.history: list[np.ndarray] = []
        self.v0: RankVariance | None = None

    def observe(self, layer: int, rank: np.ndarray) -> Observation | None:
        """Record layer ℓ's ranks; from L_min on, return v_ℓ, ratio_ℓ and whether ratio_ℓ < τ."""
        self.history.append(rank)
        if layer < self.l_min:
            return None
        var = rank_variance(self.history[-self.l_obs :], self.k_prime)
        if layer == self.l_min:
            self.v0 = var
        ratio = relative_ratio(var, self.v0)
        return Observation(var, ratio, fires(ratio, self.tau))


def replay(ranks_by_layer, tau: float, l_min: int, l_obs: int, k_prime: int, stop_at_fire: bool = True):
    """ASL's decision from stored ranks (list indexed by layer, layers from L_min - L_obs + 1 filled):
    (ℓ* or None, {layer: exact ratio}). With stop_at_fire=False the ratios go on past ℓ*."""
    criterion = Criterion(tau, l_min, l_obs, k_prime)
    selected, ratios = None, {}
    for layer in range(l_min - l_obs + 1, len(ranks_by_layer)):
        seen = criterion.observe(layer, ranks_by_layer[layer])
        if seen is None:
            continue
        ratios[layer] = seen.ratio
        if selected is None and seen.fires:
            selected = layer
            if stop_at_fire:
                break
    return selected, ratios
