"""From scores to decisions: ranks, top-k sets, kept positions (docs/semantics.md §2, §4, §6).

Every ordering is a stable sort on the negated score, so equal scores keep
position order: the earlier token wins. Kept indices are returned ascending.
"""

from __future__ import annotations

import numpy as np


def order_by_score(score: np.ndarray) -> np.ndarray:
    """Token indices from the highest score down; ties: the earlier index first."""
    return np.argsort(-score, kind="stable")


def ranks(score: np.ndarray) -> np.ndarray:
    """rank[j] = 1 + #(higher scores) + #(earlier equal scores): a permutation of 1 .. len(score)."""
    r = np.empty(len(score), dtype=np.int64)
    r[order_by_score(score)] = np.arange(1, len(score) + 1)
    return r


def top_from_ranks(rank: np.ndarray, k_prime: int) -> np.ndarray:
    """top(k'): the indices of the k' smallest ranks, ascending."""
    return np.flatnonzero(rank <= k_prime)


def best(score: np.ndarray, count: int) -> np.ndarray:
    """The `count` highest-scoring indices (ties: earlier first), ascending."""
    return np.sort(order_by_score(score)[:count])


def boundary_gap(score: np.ndarray, count: int) -> float | None:
    """Score of the last token kept minus that of the first left out; None when all are kept."""
    if count <= 0 or count >= len(score):
        return None
    order = order_by_score(score)
    return float(score[order[count - 1]] - score[order[count]])


def boundary_score(score: np.ndarray, count: int) -> float:
    """The score of the last of the `count` best (ties: earlier first): where a top-count decision sits."""
    return float(score[order_by_score(score)[max(count, 1) - 1]])


def kept_with_window(prefix_kept: np.ndarray, n: int, window: int) -> np.ndarray:
    """Chosen prefix indices plus the window n-w .. n-1, ascending."""
    return np.concatenate([prefix_kept, np.arange(n - window, n)]).astype(np.int64)


def select_k_prime(select_k: int, n: int, window: int) -> int:
    """k' = min(k - w, n - w): how many prefix tokens join the window."""
    return min(select_k - window, n - window)
