"""PyramidInfer's decisions judged: rule 0 on the candidate's own numbers, then against the oracle's.

PyramidInfer selects at every deciding layer and compresses caches while decoding, so its decisions are a
kept set per layer and a list of decode-stage compressions (docs/trace.md). Both follow exactly from the
candidate's own scores and SPEC's bookkeeping (docs/semantics.md, "PyramidInfer"):

- rule 0, prefill: at each deciding layer the kept set is the int(c · r(i)) best context tokens by the
  candidate's own scores (the sinks first, ties: the earlier position) plus the window, mapped to the positions
  the layer held; a layer that must not prune keeps everything;
- rule 0, decoding: replaying the caches from the prefill's kept sets step by step says which layers compress
  after which step and which positions they score; the kept ones are the best by the candidate's own scores;
- against the oracle: the first layer whose kept set differs is judged like any kept set (a near-tie only when
  every position kept by one side alone lies within the score tolerance of the oracle's boundary); then the
  first compression that differs, the same way. Later layers and steps depend on it and are not compared.
"""

from __future__ import annotations

import numpy as np

from reference.asl import pyramid
from reference.asl.params import METHOD, Params
from reference.asl.selection import best, boundary_score, ranks
from reference.oracle.verdicts import FAIL, NEAR, Finding, apart

CANDIDATE_VS_RULE = ("kept only by the candidate", "kept by the rule only")
ORACLE_VS_CANDIDATE = ("only the oracle's", "only the candidate's")


def params_of(rec: dict) -> Params:
    return Params(**rec["params"])


def window_size(rec: dict) -> int:
    """W = R + 1 = int(N · recent_ratio) + 1."""
    return pyramid.recent_length(rec["num_prompt_tokens"], rec["params"]["recent_ratio"]) + 1


def scored_layers(rec: dict) -> set:
    """The deciding layers (i % interval == 0) whose layer held a context (c = prefill_tokens − W > 0)."""
    W, k = window_size(rec), rec["params"]["layerwise_downsample_interval"]
    return {e["layer"] for e in rec["layers"] if e["layer"] % k == 0 and e["prefill_tokens"] > W}


def held_positions(rec: dict) -> list[np.ndarray]:
    """The positions each layer held, from the record's kept sets: all N at layer 0, then what the layer before
    kept (PyramidInfer's layers hold the same positions in every KV head)."""
    held, out = np.arange(rec["num_prompt_tokens"]), []
    kept = rec.get("kept") or {}
    for e in rec["layers"]:
        out.append(held)
        if e["kept_tokens"] is not None and str(e["layer"]) in kept:
            held = np.asarray(kept[str(e["layer"])], dtype=np.int64)
    return out


def _finding(field: str, message: str, layer=None, position=None, margin=None, step=None) -> Finding:
    return Finding(FAIL, field, message, layer, position, margin, step=step)


def forced_ranks(scores, sinks: int) -> np.ndarray:
    """Ranks of a deciding layer's scores with the sinks first (ties: earlier first)."""
    return ranks(pyramid.sink_forced(np.asarray(scores), sinks))


# ---------------------------------------------------------------- rule 0


def check_own_prefill(got: dict) -> list:
    """Each layer's kept set from the candidate's own scores, exactly."""
    p, L, N = params_of(got), len(got["layers"]), got["num_prompt_tokens"]
    W = window_size(got)
    scores, kept = got.get("scores") or {}, got.get("kept") or {}
    for e, held in zip(got["layers"], held_positions(got)):
        layer, n = e["layer"], e["prefill_tokens"]
        c = n - W
        k = pyramid.prefill_keep_count(c, layer, L, N, p) if pyramid.decides(layer, p) else None
        prunes = k is not None and k < c
        if not prunes:
            if e["kept_tokens"] is not None:
                why = ("it does not decide (layer % layerwise_downsample_interval ≠ 0)" if not pyramid.decides(layer, p)
                       else f"its context c = {c} is not longer than m, or r({layer}) = 1, or int(c · r) ≤ m")
                return [_finding(f"layers[{layer}].kept_tokens", f"is {e['kept_tokens']}; PyramidInfer keeps every "
                                 f"token of this layer: {why}", layer)]
            continue
        if e["kept_tokens"] != k + W:
            return [_finding(f"layers[{layer}].kept_tokens", f"is {e['kept_tokens']}; expected int(c · r(i)) + W = "
                             f"{k} + {W} = {k + W} (c = {c} context tokens, r({layer}) = "
                             f"{pyramid.schedule(layer, L, p.prefill_decay_ratio, p.prefill_decay_strategy):.6g})", layer)]
        own, have = scores.get(str(layer)), kept.get(str(layer))
        if own is None or have is None:
            continue  # no arrays: listed as unchecked
        forced = pyramid.sink_forced(np.asarray(own), p.streamingllm_sink_len)
        rows = np.concatenate([best(forced, k), np.arange(c, n)])
        derived = held[rows].tolist()
        if list(have) == derived:
            continue
        lost = [q for q in held[c:].tolist() if q not in have]
        if lost:
            return [_finding(f"kept[{layer}]", f"window position(s) {lost[:8]} not kept; the last W = {W} tokens "
                             "always go on", layer, lost[0])]
        sinks = [q for q in held[:min(p.streamingllm_sink_len, c)].tolist() if q not in have]
        if sinks:
            return [_finding(f"kept[{layer}]", f"sink position(s) {sinks[:8]} not kept; the first "
                             f"streamingllm_sink_len = {p.streamingllm_sink_len} context tokens always go on", layer,
                             sinks[0])]
        boundary = boundary_score(forced, k)
        row_of = {int(q): r for r, q in enumerate(held)}
        swapped = sorted(set(have) ^ set(derived))
        if all(float(forced[row_of[q]]) == boundary for q in swapped if q in row_of):
            return [_finding(f"kept[{layer}]", f"positions {swapped[:8]} have equal scores ({boundary:.6g}) at the "
                             f"top-{k} boundary and SPEC keeps the earlier ones (an unstable top-k?)", layer, swapped[0])]
        return [_finding(f"kept[{layer}]", f"the kept set is not the {k} best context tokens by the candidate's own "
                         f"scores (sinks first) plus the window: {apart(have, derived, *CANDIDATE_VS_RULE)}", layer,
                         swapped[0])]
    return []


def replay_decode(rec: dict, own_kept) -> tuple[list[dict], list]:
    """The compressions SPEC's bookkeeping makes, step by step, from the record's prefill kept sets.

    own_kept(step, layer, scored positions) -> the positions that stay (the candidate's or the oracle's),
    or a list of findings to stop at. Returns the expected entries (step, layer, recent, scored_positions)
    and findings."""
    p, L, N = params_of(rec), len(rec["layers"]), rec["num_prompt_tokens"]
    held = held_positions(rec)
    caches = [list(h.tolist()) for h in held]
    counts = [0] * L
    counts[-1] = len(caches[-1])  # the authors' P_{L-1}: the last layer's cache length (docs/semantics.md)
    fed = max(len(rec["generated_ids"]) - 1, 0)
    expected = []
    for t in range(1, fed + 1):
        R = pyramid.recent_length(1 + len(caches[0]), p.recent_ratio)
        for i in range(L):
            caches[i].append(N + t - 1)
            where = pyramid.scored_slice(N + t, R, counts[i], len(caches[i]), p.exceed_length_to_compress)
            if where is None:
                continue
            a, b = where
            scored = caches[i][a:b]
            expected.append({"step": t, "layer": i, "recent": R, "scored_positions": scored})
            stay = own_kept(t, i, scored)
            if isinstance(stay, list) and stay and isinstance(stay[0], Finding):
                return expected, stay
            caches[i] = caches[i][:a] + list(stay) + caches[i][b:]
            counts[i] = len(caches[i]) - R
    return expected, []


def check_own_decode(got: dict) -> list:
    """The candidate's compressions are where SPEC's bookkeeping puts them, and keep the best by its own scores."""
    events = got.get("decode_compressions")
    if events is None:
        return []
    p, L = params_of(got), len(got["layers"])
    scores = got.get("decode_scores") or {}
    by_key = {(e["step"], e["layer"]): (i, e) for i, e in enumerate(events)}

    def own_kept(t, i, scored):
        if (t, i) not in by_key:
            return [_finding("decode_compressions", f"step {t}, layer {i}: SPEC's bookkeeping compresses here "
                             f"(scoring positions {scored[0]}..{scored[-1]}), the candidate does not", i, step=t)]
        j, e = by_key.pop((t, i))
        at = f"decode_compressions[{j}]"
        if e["scored_positions"] != scored:
            return [_finding(f"{at}.scored_positions", f"step {t}, layer {i}: scored {apart(e['scored_positions'], scored, 'by the candidate only', 'by the rule only')}; SPEC scores the E = {p.exceed_length_to_compress} entries before the last R + 1 of the cache", i, step=t)]
        k = pyramid.decode_keep_count(len(scored), i, L, p)
        if len(e["kept_positions"]) != k:
            return [_finding(f"{at}.kept_positions", f"step {t}, layer {i}: {len(e['kept_positions'])} kept; "
                             f"max(int(E' · gen_compress_ratio · g(i)), 1) = {k} (E' = {len(scored)})", i, step=t)]
        own = scores.get(str(j))
        if own is not None:
            derived = np.asarray(scored)[best(np.asarray(own), k)].tolist()
            if derived != e["kept_positions"]:
                return [_finding(f"{at}.kept_positions", f"step {t}, layer {i}: not the {k} best of the scored "
                                 f"positions by the candidate's own scores: "
                                 f"{apart(e['kept_positions'], derived, *CANDIDATE_VS_RULE)}", i, step=t)]
        return e["kept_positions"]

    _, found = replay_decode(got, own_kept)
    if found:
        return found
    if by_key:
        (t, i), (j, _) = min(by_key.items())
        return [_finding(f"decode_compressions[{j}]", f"step {t}, layer {i}: the candidate compresses where SPEC's "
                         "bookkeeping does not (the count seen − R − P_i is below E there, or the slice is empty)",
                         i, step=t)]
    return []


def check_own(got: dict) -> list:
    """Rule 0 for PyramidInfer (nothing for the other methods)."""
    if not METHOD[got["method"]].per_layer:
        return []
    return check_own_prefill(got) or check_own_decode(got)


# ---------------------------------------------------------------- against the oracle


def _apart(field: str, e_pos, g_pos, scored_pos, scores, count: int, tol, layer: int, step=None,
           protected=(), sinks: int = 0) -> Finding:
    """Two kept sets that differ: NEAR only when every position kept by one side alone scores within `score`
    (relative to the largest score) of the oracle's top-`count` boundary, the first `sinks` ranked first (they
    are protected: never a near-tie, and never the scale); never a window or sink position."""
    only_e, only_g = sorted(set(e_pos) - set(g_pos)), sorted(set(g_pos) - set(e_pos))
    lists = f"kept only by the oracle {only_e[:8]}, only by the candidate {only_g[:8]}"
    fixed = [q for q in only_e + only_g if q in set(protected)]
    if fixed:
        return Finding(FAIL, field, f"position(s) {fixed[:8]} always stay (window or sinks): {lists}", layer, fixed[0],
                       step=step)
    row_of = {int(q): r for r, q in enumerate(scored_pos)}
    if scores is None or any(q not in row_of for q in only_e + only_g):
        return Finding(FAIL, field, f"{lists} (no expected scores to judge near-ties)", layer, (only_e + only_g)[0],
                       step=step)
    scores = np.asarray(scores, dtype=np.float64)
    scale = float(np.max(np.abs(scores[sinks:]), initial=0.0)) or 1.0  # the sinks' forced score is no scale
    boundary = boundary_score(pyramid.sink_forced(scores, sinks), count)
    far = [(abs(float(scores[row_of[q]]) - boundary) / scale, q) for q in only_e + only_g]
    worst, q = max(far)
    where = "" if step is None else f"step {step}: "
    if worst > tol.score:
        return Finding(FAIL, field, f"{where}{lists}; the farthest is {worst:.3g} (relative) from the oracle's "
                       f"boundary {boundary:.6g}, beyond {tol.score}", layer, q, worst, step=step)
    return Finding(NEAR, field, f"{where}{lists}: every one within {tol.score} (relative) of the oracle's boundary "
                   f"{boundary:.6g}", layer, q, worst, step=step)


def compare_prefill(exp: dict, got: dict, tol) -> Finding | None:
    """The first layer whose kept set differs, judged with the oracle's scores at that layer."""
    p, L, N = params_of(exp), len(exp["layers"]), exp["num_prompt_tokens"]
    W = window_size(exp)
    held = held_positions(exp)
    for a, b in zip(exp["layers"], got["layers"]):
        layer = a["layer"]
        if a["prefill_tokens"] != b["prefill_tokens"]:
            return Finding(FAIL, f"layers[{layer}].prefill_tokens", f"expected {a['prefill_tokens']}, got "
                           f"{b['prefill_tokens']}: the kept sets first differ at layer {layer - 1}", layer)
        ek, gk = (exp.get("kept") or {}).get(str(layer)), (got.get("kept") or {}).get(str(layer))
        if a["kept_tokens"] != b["kept_tokens"]:
            return Finding(FAIL, f"layers[{layer}].kept_tokens", f"expected {a['kept_tokens']}, got {b['kept_tokens']}: "
                           f"the kept sets first differ at layer {layer}", layer)
        if ek is None or gk is None or ek == gk:
            continue
        c = a["prefill_tokens"] - W
        k = pyramid.prefill_keep_count(c, layer, L, N, p)
        s = (exp.get("scores") or {}).get(str(layer))
        protected = held[layer][c:].tolist() + held[layer][:min(p.streamingllm_sink_len, c)].tolist()
        return _apart(f"kept[{layer}]", ek, gk, held[layer][:c], s, k, tol, layer, protected=protected,
                      sinks=p.streamingllm_sink_len)
    return None


def compare_decode(exp: dict, got: dict, tol) -> Finding | None:
    """The first decode-stage compression that differs (step, then layer), judged with the oracle's scores."""
    e_events, g_events = exp.get("decode_compressions"), got.get("decode_compressions")
    if e_events is None or g_events is None:
        return None if e_events == g_events else Finding(FAIL, "decode_compressions", "expected "
                                                         f"{'none' if e_events is None else 'a list'}, got "
                                                         f"{'none' if g_events is None else 'a list'}")
    L = len(exp["layers"])
    p = params_of(exp)
    fed = min(len(exp["generated_ids"]), len(got["generated_ids"])) - 1  # steps both runs fed the same tokens
    for j, (a, b) in enumerate(zip(e_events, g_events)):
        if a["step"] > fed or b["step"] > fed:
            return None
        if (a["step"], a["layer"]) != (b["step"], b["layer"]):
            first = min((a["step"], a["layer"]), (b["step"], b["layer"]))
            return Finding(FAIL, f"decode_compressions[{j}]", f"the oracle compresses layer {a['layer']} after step "
                           f"{a['step']}, the candidate layer {b['layer']} after step {b['step']}: the compression "
                           "schedules part here (look at R, the count P_i and the cache lengths)", first[1],
                           step=first[0])
        if a["scored_positions"] != b["scored_positions"]:
            return Finding(FAIL, f"decode_compressions[{j}].scored_positions", f"step {a['step']}, layer "
                           f"{a['layer']}: {apart(a['scored_positions'], b['scored_positions'], *ORACLE_VS_CANDIDATE)}",
                           a["layer"], step=a["step"])
        if a["kept_positions"] != b["kept_positions"]:
            s = (exp.get("decode_scores") or {}).get(str(j))
            k = pyramid.decode_keep_count(len(a["scored_positions"]), a["layer"], L, p)
            return _apart(f"decode_compressions[{j}].kept_positions", a["kept_positions"], b["kept_positions"],
                          a["scored_positions"], s, k, tol, a["layer"], step=a["step"])
    if len(e_events) != len(g_events):
        shorter = min(len(e_events), len(g_events))
        extra = (e_events if len(e_events) > shorter else g_events)[shorter]
        if extra["step"] <= fed:
            return Finding(FAIL, "decode_compressions", f"expected {len(e_events)} compressions, got {len(g_events)}; "
                           f"the first unmatched is layer {extra['layer']} after step {extra['step']}", extra["layer"],
                           step=extra["step"])
    return None
