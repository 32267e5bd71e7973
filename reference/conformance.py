"""The tolerance policy: when do two runs of the same case agree? (docs/conformance.md)

Both sides are *records*: a trace trimmed to what a comparison needs
(`record_from_trace`). The expected record (the oracle's) carries the margin of
every decision, so a difference can be told apart from a floating-point
near-tie:

0. the candidate's ranks follow SPEC's rule on its own scores (ties: the
   earlier position first);
1. selection layer: equal, or the expected run's criterion margin at the
   layer where the two part ways is within `margin` of zero;
2. kept set (same selection layer): equal, or every token in one set but not
   the other scores within `score` (relative to the layer's largest score) of
   the expected top-k' boundary;
3. per-layer cache sizes: equal; SnapKV's cached positions per head: equal,
   or that head's boundary gap is within `score` (relative);
4. next-token logits: max abs difference within `logits`;
5. greedy tokens: equal, up to the first step whose expected top-2 logit gap
   is within 2·`logits` (a near-tie there ends the comparison).
Once a near-tie changes a decision, what depends on it is not compared.

Verdicts: PASS (no difference beyond the tolerances), PASS-within-tolerance
(a decision differs, but only on near-ties),
FAIL (a real divergence; the first one is described with layer, field,
position, expected, got and margin). `reference.goldens` and the port's
agreement tests call this same code.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

PASS, NEAR, FAIL = "PASS", "PASS-within-tolerance", "FAIL"


@dataclass(frozen=True)
class Tolerance:
    logits: float  # max abs difference of next-token logits
    margin: float  # |ratio - tau| below which the criterion's decision is a near-tie
    score: float  # distance from the top-k boundary, relative to the layer's largest score
    criterion: float  # relative difference of v and ratio while decisions agree


# By the dtype of the less precise side. float16 is the GPU port's weight dtype.
TOLERANCES = {
    "float64": Tolerance(logits=1e-6, margin=1e-9, score=1e-9, criterion=1e-9),
    "float32": Tolerance(logits=1e-3, margin=1e-3, score=1e-4, criterion=1e-3),
    "float16": Tolerance(logits=0.25, margin=0.1, score=5e-2, criterion=0.2),
}


@dataclass(frozen=True)
class Finding:
    verdict: str  # NEAR or FAIL
    field: str  # e.g. "select_layer", "kept_positions", "layers[12].kv_tokens", "logits"
    message: str
    layer: int | None = None
    position: int | None = None
    margin: float | None = None


def record_from_trace(trace: dict, arrays: dict, score_layers=None) -> dict:
    """What a comparison reads: decisions, margins, and the arrays that judge near-ties."""
    scored = [e["layer"] for e in trace["layers"] if e["scored"]]
    shown = scored if score_layers is None else [l for l in scored if l in score_layers]
    return {
        "select_layer": trace["select_layer"],
        "kept_positions": trace["kept_positions"],
        "next_position": trace["next_position"],
        "generated_ids": trace["generated_ids"],
        "generated_gaps": trace["generated_gaps"],
        "notes": trace["notes"],
        "layers": [{k: e[k] for k in ("layer", "prefill_tokens", "kv_tokens", "union_size", "v", "ratio", "margin",
                                      "boundary_gap", "kv_boundary_gaps")} for e in trace["layers"]],
        "first_pass": None if trace["first_pass"] is None else [
            {k: e[k] for k in ("layer", "prefill_tokens", "kv_tokens", "union_size", "v", "ratio", "margin",
                               "boundary_gap", "kv_boundary_gaps")} for e in trace["first_pass"]],
        "ranks": {str(l): np.asarray(arrays[f"ranks/{l}"]).tolist() for l in shown if f"ranks/{l}" in arrays},
        "scores": {str(l): np.asarray(arrays[f"scores/{l}"], dtype=np.float64).tolist() for l in shown
                   if f"scores/{l}" in arrays},
        # two-pass methods decide in their first pass: the scores that judge their kept set
        "first_pass_scores": {str(l): np.asarray(arrays[f"first_pass/scores/{l}"], dtype=np.float64).tolist()
                              for l in ([trace["select_layer"]] if trace["first_pass"] else [])
                              if f"first_pass/scores/{l}" in arrays},
        "kv_positions": {str(l): [np.asarray(arrays[f"kv_positions/{l}/{g}"]).tolist() for g in range(len(e["kv_tokens"]))]
                         for l, e in enumerate(trace["layers"]) if f"kv_positions/{l}/0" in arrays},
        "logits": np.asarray(arrays["logits"], dtype=np.float64).tolist() if "logits" in arrays else None,
    }


def _criterion_passes(exp: dict, got: dict) -> list[dict]:
    """The pass in which ASL's criterion ran: the first pass of a two-pass run, else the layers."""
    return [exp.get("first_pass") or exp["layers"], got.get("first_pass") or got["layers"]]


def _margin_at(entries: list[dict], layer: int) -> float | None:
    if layer is None or layer >= len(entries):
        return None
    m = entries[layer]["margin"]
    return None if m is None or isinstance(m, str) else float(m)


def _check_select_layer(exp: dict, got: dict, tol: Tolerance) -> Finding | None:
    e, g = exp["select_layer"], got["select_layer"]
    if e == g:
        return None
    entries, _ = _criterion_passes(exp, got)
    # where the two runs part: the earlier of the two selection layers (None = never)
    parting = min(x for x in (e, g) if x is not None)
    margin = _margin_at(entries, parting)
    if margin is not None and abs(margin) <= tol.margin:
        return Finding(NEAR, "select_layer", f"expected {e}, got {g}: the criterion's margin at layer {parting} is "
                       f"{margin:+.3g}, within ±{tol.margin} (a near-tie)", parting, None, margin)
    why = "" if margin is None else f"; the expected margin at layer {parting} is {margin:+.3g}, beyond ±{tol.margin}"
    return Finding(FAIL, "select_layer", f"expected {e}, got {g}{why}", parting, None, margin)


def _check_kept(exp: dict, got: dict, tol: Tolerance) -> Finding | None:
    e, g = exp["kept_positions"], got["kept_positions"]
    if e == g:
        return None
    if e is None or g is None or len(e) != len(g):
        return Finding(FAIL, "kept_positions", f"expected {_short(e)}, got {_short(g)}", exp["select_layer"])
    layer = exp["select_layer"]
    only = sorted(set(e) ^ set(g))
    decided_in = exp.get("first_pass_scores") if exp.get("first_pass") else exp["scores"]
    scores = (decided_in or {}).get(str(layer)) if layer is not None else None
    if scores is None:
        return Finding(FAIL, "kept_positions", f"differ at positions {only[:8]} (no scores to judge near-ties)",
                       layer, only[0])
    scores = np.asarray(scores)
    kept_prefix = [p for p in e if p < len(scores)]
    boundary = float(np.min(scores[kept_prefix])) if kept_prefix else float(np.max(scores))
    scale = float(np.max(np.abs(scores))) or 1.0
    worst = 0.0
    for p in only:
        if p >= len(scores):  # a window token: always kept, never a near-tie
            return Finding(FAIL, "kept_positions", f"window position {p} kept by one side only", layer, p)
        distance = abs(float(scores[p]) - boundary) / scale
        worst = max(worst, distance)
        if distance > tol.score:
            side = "expected only" if p in e else "got only"
            return Finding(FAIL, "kept_positions", f"position {p} ({side}) scores {scores[p]:.6g}, "
                           f"{distance:.3g} (relative) from the boundary {boundary:.6g}, beyond {tol.score}", layer, p,
                           distance)
    return Finding(NEAR, "kept_positions", f"{len(only)} token(s) swapped at the top-k' boundary of layer {layer} "
                   f"(positions {only[:8]}), at most {worst:.3g} (relative) from it, within {tol.score}", layer,
                   only[0], worst)


def _check_layers(exp: dict, got: dict, tol: Tolerance) -> list[Finding]:
    findings = []
    for part in ("first_pass", "layers"):
        el, gl = exp.get(part), got.get(part)
        if (el is None) != (gl is None) or (el and len(el) != len(gl)):
            return [Finding(FAIL, part, f"expected {len(el or [])} entries, got {len(gl or [])}")]
        for a, b in zip(el or [], gl or []):
            at = f"{part}[{a['layer']}]"
            for key in ("prefill_tokens", "kv_tokens"):
                if a[key] != b[key]:
                    return findings + [Finding(FAIL, f"{at}.{key}", f"expected {a[key]}, got {b[key]}", a["layer"])]
            for key in ("union_size", "v", "ratio"):  # continuous in near-tied ranks: compared within `criterion`
                x, y = a[key], b[key]
                if isinstance(x, str) or isinstance(y, str) or x is None or y is None:
                    if x != y:
                        return findings + [Finding(FAIL, f"{at}.{key}", f"expected {x}, got {y}", a["layer"])]
                elif abs(x - y) > tol.criterion * max(abs(x), 1e-12) + tol.margin:
                    findings.append(Finding(FAIL, f"{at}.{key}", f"expected {x:.9g}, got {y:.9g}", a["layer"]))
    for layer, heads in exp["kv_positions"].items():
        other = got["kv_positions"].get(layer)
        if other is None:
            continue
        gaps = exp["layers"][int(layer)]["kv_boundary_gaps"] or [None] * len(heads)
        scale = max((abs(s) for v in exp["scores"].values() for s in v), default=1.0)
        for g, (pa, pb) in enumerate(zip(heads, other)):
            if pa != pb:
                gap = gaps[g]
                verdict = NEAR if gap is not None and gap <= tol.score * scale else FAIL
                first = next(i for i, (x, y) in enumerate(zip(pa + [None], pb + [None])) if x != y)
                why = "no SnapKV decision at this layer, so no near-tie" if gap is None else f"SnapKV boundary gap {gap:.3g}"
                findings.append(Finding(verdict, f"kv_positions[{layer}][{g}]",
                                        f"cached positions differ from entry {first} (expected "
                                        f"{pa[first] if first < len(pa) else None}, got "
                                        f"{pb[first] if first < len(pb) else None}; {why})", int(layer),
                                        pa[first] if first < len(pa) else None, gap))
    return findings


def _check_logits_and_tokens(exp: dict, got: dict, tol: Tolerance) -> list[Finding]:
    findings = []
    if exp["logits"] is not None and got["logits"] is not None:
        diff = np.abs(np.asarray(exp["logits"]) - np.asarray(got["logits"]))
        if diff.size and diff.max() > tol.logits:
            worst = int(diff.argmax())
            findings.append(Finding(FAIL, "logits", f"max abs difference {diff.max():.3g} at token id {worst}, "
                                    f"beyond {tol.logits}", None, worst, float(diff.max())))
    for t, (a, b) in enumerate(zip(exp["generated_ids"], got["generated_ids"])):
        gap = exp["generated_gaps"][t]
        if a != b:
            verdict = NEAR if gap <= 2 * tol.logits else FAIL
            findings.append(Finding(verdict, "generated_ids", f"step {t}: expected token {a}, got {b}; the expected "
                                    f"top-2 logit gap was {gap:.3g}", None, t, gap))
            return findings
        if gap <= 2 * tol.logits:  # a near-tie step: what follows may legitimately differ
            return findings
    if len(exp["generated_ids"]) != len(got["generated_ids"]):
        findings.append(Finding(FAIL, "generated_ids", f"expected {len(exp['generated_ids'])} tokens, "
                                f"got {len(got['generated_ids'])}"))
    return findings


def _check_rank_rule(got: dict) -> Finding | None:
    """The candidate's ranks must follow SPEC's rule on its OWN scores: higher score first, equal scores by
    earlier position. Exact ties (max pooling makes many) are where an unstable sort shows."""
    from reference.selection import ranks as oracle_ranks

    for key in ("first_pass_scores", "scores"):
        for layer, scores in (got.get(key) or {}).items():
            ranks = got["ranks"].get(layer) if key == "scores" else None
            if ranks is None:
                continue
            expected = oracle_ranks(np.asarray(scores))
            bad = np.flatnonzero(expected != np.asarray(ranks))
            if bad.size:
                j = int(bad[0])
                tied = np.flatnonzero(np.asarray(scores) == scores[j])
                why = (f"positions {tied[:6].tolist()} have equal scores and the earlier must rank first"
                       if tied.size > 1 else "ranks do not sort the scores from highest to lowest")
                return Finding(FAIL, f"ranks[{layer}]", f"position {j}: rank {ranks[j]}, SPEC's rule gives "
                               f"{int(expected[j])} from the candidate's own scores; {why}", int(layer), j)
    return None


def compare(expected: dict, got: dict, tol: Tolerance) -> tuple[str, list[Finding]]:
    """The verdict and every finding, in the order the rules above are applied."""
    findings: list[Finding] = []
    f = _check_rank_rule(got)
    if f is not None:
        return FAIL, [f]
    f = _check_select_layer(expected, got, tol)
    if f is not None:
        return f.verdict, [f]
    f = _check_kept(expected, got, tol)
    if f is not None:
        findings.append(f)
        if f.verdict == FAIL or f.verdict == NEAR:  # later layers ran on other tokens: stop here
            return f.verdict, findings
    findings += _check_layers(expected, got, tol)
    if any(x.verdict == FAIL for x in findings):
        return FAIL, findings
    if expected["next_position"] != got["next_position"]:
        return FAIL, findings + [Finding(FAIL, "next_position", f"expected {expected['next_position']}, "
                                         f"got {got['next_position']}")]
    if not any(x.verdict == NEAR for x in findings):  # caches equal: logits and tokens are comparable
        findings += _check_logits_and_tokens(expected, got, tol)
    verdict = FAIL if any(x.verdict == FAIL for x in findings) else NEAR if findings else PASS
    return verdict, findings


def _short(x, limit: int = 100) -> str:
    text = str(x)
    return text if len(text) <= limit else text[: limit - 3] + "..."
