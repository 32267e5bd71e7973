"""Rule 0 of the tolerance policy: a candidate's decisions must follow from its OWN numbers.

Ranks are a function of scores, the criterion a function of ranks, every kept
set a function of ranks or scores: SPEC fixes each step exactly (ties: the
earlier position first; `ratio < τ` on exact fractions). So the oracle can
re-derive every decision of a candidate from the arrays the candidate itself
reports, and no floating-point tolerance is needed: a difference here is a
bug (an unstable sort, `≤` for `<`, a window left out), never a near-tie.
The comparison with the oracle's own numbers (rules 1-5) comes after, in
`reference/oracle/conformance.py`.

Every function takes a *record* (`conformance.record_from_trace`) and returns
a list of FAIL findings; what it cannot check for want of arrays is skipped
here and listed by `conformance.unchecked`.
"""

from __future__ import annotations

from fractions import Fraction

import numpy as np

from reference.asl.criterion import replay
from reference.asl.params import METHOD, Params
from reference.asl.selection import (
    best,
    boundary_score,
    kept_with_window,
    ranks,
    select_k_prime,
    top_from_ranks,
)
from reference.oracle import pyramid_rules
from reference.oracle.verdicts import FAIL, Finding, apart

CANDIDATE_VS_RULE = ("kept only by the candidate", "kept by the rule only")


def layer_positions(rec: dict, layer: int) -> np.ndarray:
    """The prompt positions of the rows a layer of the decoding pass held, in row order."""
    N, select, kept = rec["num_prompt_tokens"], rec["select_layer"], rec["kept_positions"]
    if rec["first_pass"] is not None:  # a second pass: fresh positions 0 .. |kept|-1
        return np.arange(rec["next_position"])
    if select is not None and layer > select:
        return np.asarray(kept, dtype=np.int64)
    return np.arange(N)


def _finding(field: str, message: str, layer=None, position=None):
    return Finding(FAIL, field, message, layer, position)


def scored_layers(rec: dict) -> tuple[set, set]:
    """The layers SPEC's method scores, from its method, parameters and selection layer alone:
    (layers of the decoding pass, layers of the first pass)."""
    m, p, N, select = METHOD[rec["method"]], rec["params"], rec["num_prompt_tokens"], rec["select_layer"]
    L = len(rec["layers"])
    if m.per_layer:
        return pyramid_rules.scored_layers(rec), set()
    if not m.selects or N <= p["window"]:  # N ≤ w: ran as full
        return set(), set()
    first = m.first_scored(Params(**p), L)
    if m.decides == "fixed":
        return {first}, set()
    if m.decides == "last-query":
        return set(), {first}
    if m.two_pass and rec["first_pass"]:
        return set(), set(range(first, select + 1))
    return set(range(first, (L - 1 if select is None else select) + 1)), set()


def check_scored(got: dict) -> list:
    """Every layer the method scores says so (and carries its ranks and scores), and no other: a candidate
    cannot leave a decision out of the record."""
    for part, layers in zip(("layers", "first_pass"), scored_layers(got)):
        for e in got[part] or []:
            if e["scored"] == (e["layer"] in layers):
                continue
            return [_finding(f"{part}[{e['layer']}].scored", f"is {str(e['scored']).lower()}; SPEC's {got['method']} "
                             f"scores layer(s) {_span(layers)} of this pass, given its selection layer "
                             f"{got['select_layer']}", e["layer"])]
    return []


def _span(layers: set) -> str:
    if not layers:
        return "none"
    lo, hi = min(layers), max(layers)
    return str(lo) if lo == hi else f"{lo}-{hi}"


def check_ranks(got: dict) -> list:
    """Each reported ranks array is SPEC's rank of the reported scores (higher first, ties: earlier first)."""
    for ranks_key, scores_key in (("ranks", "scores"), ("first_pass_ranks", "first_pass_scores")):
        for layer, rank in (got.get(ranks_key) or {}).items():
            scores = (got.get(scores_key) or {}).get(layer)
            if scores is None:
                continue
            scores, rank = np.asarray(scores), np.asarray(rank)
            if METHOD[got["method"]].per_layer:  # PyramidInfer ranks its sinks first (their score: the largest float)
                scores = pyramid_rules.pyramid.sink_forced(scores, got["params"]["streamingllm_sink_len"])
            bad = np.flatnonzero(ranks(scores) != rank)
            if bad.size:
                j = int(bad[0])
                tied = np.flatnonzero(scores == scores[j])
                why = (f"positions {tied[:6].tolist()} have equal scores ({scores[j]:.6g}) and the earlier must rank "
                       "first" if tied.size > 1 else "the ranks do not order the scores from highest to lowest")
                where = "first_pass." if ranks_key == "first_pass_ranks" else ""
                return [_finding(f"{where}ranks[{layer}]", f"position {j}: rank {int(rank[j])}, SPEC's rule gives "
                                 f"{int(ranks(scores)[j])} from the candidate's own scores; {why}", int(layer), j)]
    return []


def _criterion_ranks(got: dict) -> dict:
    return got.get("first_pass_ranks") if METHOD[got["method"]].two_pass and got["first_pass"] else got.get("ranks")


def check_criterion(got: dict, tolerance) -> list:
    """ASL's selection layer, v and ratio, replayed exactly on the candidate's own ranks."""
    p = got["params"]
    if METHOD[got["method"]].decides != "criterion":
        return []
    by_layer = _criterion_ranks(got) or {}
    first = p["l_min"] - p["l_obs"] + 1
    last = got["select_layer"] if got["select_layer"] is not None else max((int(l) for l in by_layer), default=-1)
    if last < p["l_min"] or any(str(l) not in by_layer for l in range(first, last + 1)):
        return []  # not every observed layer's ranks are here (a trimmed record): nothing to replay
    k_prime = select_k_prime(p["select_k"], got["num_prompt_tokens"], p["window"])
    stored = [None] * first + [np.asarray(by_layer[str(l)]) for l in range(first, last + 1)]
    selected, ratios = replay(stored, p["tau"], p["l_min"], p["l_obs"], k_prime)
    if selected is None and METHOD[got["method"]].two_pass and got["first_pass"]:
        selected = len(got["layers"]) - 1  # never fired: two-pass ASL falls back to the last layer's ranks
    if selected != got["select_layer"]:
        at = got["select_layer"] if selected is None else min(x for x in (selected, got["select_layer"]) if x is not None)
        ratio = ratios.get(at)
        exact = ratio is not None and ratio == Fraction(p["tau"])
        why = (f"the ratio there is exactly tau ({p['tau']!r}) and SPEC fires only when ratio < tau, strictly"
               if exact else f"the ratio at layer {at} is {float(ratio) if ratio is not None else None!r}, tau is "
               f"{p['tau']!r}")
        return [_finding("select_layer", f"the candidate selects {got['select_layer']}, but its own ranks give "
                         f"{selected}: {why}", at)]
    entries = got["first_pass"] if METHOD[got["method"]].two_pass and got["first_pass"] else got["layers"]
    for layer, ratio in ratios.items():
        reported = entries[layer]["ratio"]
        value = float(ratio)
        if reported is None:
            return [_finding(f"layers[{layer}].ratio", f"is null, but SPEC's criterion computes it at every layer from "
                             f"L_min = {p['l_min']} on; its own ranks give {value!r}", layer)]
        if isinstance(reported, str) or value == float("inf"):
            if str(reported) != str(value):
                return [_finding(f"layers[{layer}].ratio", f"reported {reported}, its own ranks give {value}", layer)]
        elif abs(reported - value) > tolerance.criterion * max(abs(value), 1e-12):
            return [_finding(f"layers[{layer}].ratio", f"reported {reported:.9g}, but the candidate's own ranks give "
                             f"{value:.9g} (v over the last L_obs = {p['l_obs']} layers' top-k' union)", layer)]
    return []


def check_kept(got: dict) -> list:
    """The kept set is what SPEC's rule gives on the candidate's own ranks (one-shot, two-pass ASL) or
    scores (GemFilter)."""
    method, layer, kept, p = got["method"], got["select_layer"], got["kept_positions"], got["params"]
    if layer is None or kept is None:
        return []
    N = got["num_prompt_tokens"]
    m = METHOD[method]
    if m.decides == "last-query":  # GemFilter: by its own scores, no window
        scores = (got.get("first_pass_scores") or {}).get(str(layer))
        if scores is None:
            return []
        derived = best(np.asarray(scores), min(p["select_k"], N)).tolist()
        rule = f"the min(k, N) = {min(p['select_k'], N)} best of its own GemFilter scores (ties: earlier first)"
    else:
        rank = ((got.get("first_pass_ranks") if m.two_pass else got.get("ranks")) or {}).get(str(layer))
        if rank is None:
            return []
        w = p["window"]
        derived = kept_with_window(top_from_ranks(np.asarray(rank), select_k_prime(p["select_k"], N, w)), N, w).tolist()
        rule = "top(k') of its own ranks plus the window"
    if list(kept) == derived:
        return []
    window_lost = [q for q in range(N - p["window"], N) if m.decides != "last-query" and q not in kept]
    why = f"; window position(s) {window_lost[:8]} are missing (the window is always kept)" if window_lost else ""
    return [_finding("kept_positions", f"{len(kept)} kept at layer {layer}, but {rule} gives {len(derived)}: "
                     f"{apart(kept, derived, *CANDIDATE_VS_RULE)}{why}", layer)]


def check_snapkv(got: dict) -> list:
    """Each SnapKV cache holds the B - w best prefix rows by the candidate's own score_g, plus the window."""
    B, w = got["params"]["kv_budget"], got["params"]["window"]
    for layer, heads in (got.get("kv_scores") or {}).items():
        cached = (got.get("kv_positions") or {}).get(layer)
        if cached is None:
            continue
        pos = layer_positions(got, int(layer))
        for g, (score, have) in enumerate(zip(heads, cached)):
            score = np.asarray(score)
            n = len(score) + w
            rows = kept_with_window(best(score, B - w), n, w)
            derived = pos[rows].tolist()
            if list(have) == derived:
                continue
            field = f"kv_positions[{layer}][{g}]"
            window = pos[n - w:].tolist()
            lost = [q for q in window if q not in have]
            if lost:
                return [_finding(field, f"window position(s) {lost[:8]} not cached; SPEC caches the window at every "
                                 f"SnapKV layer ({len(have)} cached, B = {B})", int(layer), lost[0])]
            if len(have) != len(derived):
                return [_finding(field, f"{len(have)} positions cached; SnapKV keeps B = {B} (B - w = {B - w} best "
                                 f"prefix tokens plus the w = {w} window)", int(layer))]
            boundary = boundary_score(score, B - w)
            row_of = {int(q): r for r, q in enumerate(pos[:n])}
            swapped = sorted(set(have) ^ set(derived))
            if all(float(score[row_of[q]]) == boundary for q in swapped if q in row_of):
                return [_finding(field, f"positions {swapped[:8]} have equal scores ({boundary:.6g}) at the top-(B-w) "
                                 f"boundary, and SPEC keeps the earlier ones: expected {sorted(set(derived) - set(have))[:8]}"
                                 f", got {sorted(set(have) - set(derived))[:8]} (an unstable top-k?)", int(layer),
                                 swapped[0])]
            return [_finding(field, f"the cache is not the B - w best prefix positions by the candidate's own scores "
                             f"plus the window: {apart(have, derived, *CANDIDATE_VS_RULE)}", int(layer), swapped[0])]
    return []


def check_own_decisions(got: dict, tolerance) -> list:
    """Rule 0 in order: ranks from scores, the criterion from ranks, the kept set, SnapKV's caches, PyramidInfer's
    kept sets per layer and its decode-stage compressions (pyramid_rules). Each needs
    the candidate's arrays and skips what is not there; `check_scored` (JSON only) makes sure nothing was left
    out of them."""
    for rule in (check_ranks, lambda r: check_criterion(r, tolerance), check_kept, check_snapkv,
                 pyramid_rules.check_own):
        found = rule(got)
        if found:
            return found
    return []
