"""The tolerance policy: when do two runs of the same case agree? (docs/conformance.md)

Both sides are *records*: a trace trimmed to what a comparison needs
(`record_from_trace`). The expected record (the oracle's) carries the margin of
every decision, so a difference can be told apart from a floating-point
near-tie:

0. the candidate's decisions follow from its OWN numbers, exactly: ranks from
   its scores (ties: the earlier position first), the criterion from its ranks
   (`ratio < τ` on exact fractions), kept sets and SnapKV caches from its ranks
   and scores (`reference/oracle/consistency.py`);
1. selection layer: equal, or the expected run's criterion margin at the
   layer where the two part ways is within `margin` of zero and the two runs'
   ranks differ there (identical ranks give the identical exact ratio: no
   near-tie to excuse);
2. kept set (same selection layer): equal, or every token in one set but not
   the other scores within `score` (relative to the layer's largest score) of
   the expected top-k' boundary; never a window token;
3. per-layer cache sizes: equal; SnapKV's cached positions per head: equal,
   or every position cached by one side only is a prefix token whose expected
   score_g lies within `score` (relative) of that head's boundary;
   then where decoding starts (`next_position`);
4. next-token logits: max abs difference within `logits`;
5. greedy tokens: equal, up to the first step whose expected top-2 logit gap
   is within 2·`logits` (a near-tie there ends the comparison); before each
   token after the first, the logits it was chosen from (`step_logits/t`)
   within `logits` of the oracle's: a wrong decoding position, cache or rotary
   fails at the first step whose logits differ, whatever the margins;
6. scores: every score the candidate reports (token scores, first-pass scores,
   SnapKV's score_g) within `score` of the oracle's at every layer both runs
   scored on the same positions, a FAIL beyond it even when no decision
   changed; an exact constant factor across every compared layer is a NOTE.
Once a near-tie changes a decision, what depends on it is not compared.

Verdicts: PASS (no difference beyond the tolerances), PASS-within-tolerance
(a decision differs, but only on near-ties), FAIL (a real divergence; the first
one is described with layer, field, the positions each side alone kept, and
margin). Findings of kind NOTE change no verdict: they say what differs without
changing a decision (scores scaled by a constant, e.g. a mean for a sum).
`reference.oracle.goldens` and the port's agreement tests call this same code.

(Length: rules 1-5 of one policy, kept in one file to be read in the order they are applied.)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from reference.asl.params import METHOD
from reference.asl.selection import boundary_score
from reference.oracle import pyramid_rules
from reference.oracle.consistency import (
    check_own_decisions,
    check_scored,
    layer_positions,
)
from reference.oracle.verdicts import FAIL, NEAR, NOTE, PASS, VERDICTS, Finding, apart  # noqa: F401 (re-exported)

ORACLE_VS_CANDIDATE = ("only the oracle's", "only the candidate's")


@dataclass(frozen=True)
class Tolerance:
    logits: float  # max abs difference of next-token logits
    margin: float  # |ratio - tau| below which the criterion's decision is a near-tie
    score: float  # distance from the top-k boundary, relative to the layer's largest score
    criterion: float  # relative difference of v and ratio while decisions agree
    step_logits: float  # max abs difference of a decoding step's logits (its cache carries every earlier step's error)


# A decoding step reads a cache whose entries carry float16's rounding of every earlier step, so its logits drift
# further than the prefill's: up to 1.69 on the float16 port's golden runs (benchmarks/float16_drift.py; tiny-qwen2's
# logits reach ±25, and SnapKV's trimmed caches drift most), reproduced by the float64 reference with only its
# cache rounded to float16 (`benchmarks/float16_drift.py --cache-only`). Decoding bugs are judged at float32 and float64, where the port agrees exactly.
STEP_LOGITS_FLOAT16 = 2.0
# By the dtype of the less precise side. float16 is the GPU port's weight dtype.
TOLERANCES = {
    "float64": Tolerance(logits=1e-6, margin=1e-9, score=1e-9, criterion=1e-9, step_logits=1e-6),
    "float32": Tolerance(logits=1e-3, margin=1e-3, score=1e-4, criterion=1e-3, step_logits=1e-3),
    "float16": Tolerance(logits=0.25, margin=0.1, score=0.15, criterion=0.3, step_logits=STEP_LOGITS_FLOAT16),
}


LAYER_KEYS = ("layer", "scored", "prefill_tokens", "kv_tokens", "union_size", "v", "ratio", "margin", "boundary_gap",
              "kv_boundary_gaps")


def record_from_trace(trace: dict, arrays: dict, score_layers=None) -> dict:
    """What a comparison reads: decisions, margins, and the arrays that judge near-ties.

    score_layers limits the ranks and scores kept to those layers (goldens keep a few)."""

    def shown(entries) -> list[int]:
        scored = [e["layer"] for e in entries or [] if e["scored"]]
        return scored if score_layers is None else [l for l in scored if l in score_layers]

    def by_layer(name: str, layers, dtype=None) -> dict:
        return {str(l): np.asarray(arrays[f"{name}/{l}"], dtype=dtype).tolist() for l in layers
                if f"{name}/{l}" in arrays}

    first = trace["first_pass"]
    # two-pass methods decide in their first pass: the scores of its selection layer always judge their kept set
    first_shown = sorted(set(shown(first)) | ({trace["select_layer"]} if first else set()))
    n_heads = {e["layer"]: len(e["kv_tokens"]) for e in trace["layers"]}
    keys = LAYER_KEYS + (("kept_tokens", "keep_ratio") if METHOD[trace["method"]].per_layer else ())
    per_layer = {} if not METHOD[trace["method"]].per_layer else {  # PyramidInfer's decisions (schema 2)
        "kept": by_layer("kept", [e["layer"] for e in trace["layers"] if e["kept_tokens"] is not None]),
        "decode_compressions": trace["decode_compressions"],
        "decode_scores": {str(i): np.asarray(arrays[f"decode_scores/{i}"], dtype=np.float64).tolist()
                          for i in range(len(trace["decode_compressions"] or [])) if f"decode_scores/{i}" in arrays},
    }
    return per_layer | {
        "method": trace["method"],
        "params": trace["params"],
        "num_prompt_tokens": trace["num_prompt_tokens"],
        "arrays": bool(arrays),
        "select_layer": trace["select_layer"],
        "kept_positions": trace["kept_positions"],
        "next_position": trace["next_position"],
        "generated_ids": trace["generated_ids"],
        "generated_gaps": trace["generated_gaps"],
        "notes": trace["notes"],
        "recomputed_at": trace["recomputed_at"],
        "layers": [{k: e[k] for k in keys} for e in trace["layers"]],
        "first_pass": None if first is None else [{k: e[k] for k in LAYER_KEYS} for e in first],
        "ranks": by_layer("ranks", shown(trace["layers"])),
        "scores": by_layer("scores", shown(trace["layers"]), np.float64),
        "first_pass_ranks": by_layer("first_pass/ranks", shown(first)),
        "first_pass_scores": by_layer("first_pass/scores", first_shown, np.float64),
        "kv_positions": {str(l): [np.asarray(arrays[f"kv_positions/{l}/{g}"]).tolist() for g in range(h)]
                         for l, h in n_heads.items() if f"kv_positions/{l}/0" in arrays},
        "kv_scores": {str(l): [np.asarray(arrays[f"kv_scores/{l}/{g}"], dtype=np.float64).tolist() for g in range(h)]
                      for l, h in n_heads.items() if f"kv_scores/{l}/0" in arrays},
        "logits": np.asarray(arrays["logits"], dtype=np.float64).tolist() if "logits" in arrays else None,
        "step_logits": {str(t): np.asarray(arrays[f"step_logits/{t}"], dtype=np.float64).tolist()
                        for t in range(1, len(trace["generated_ids"])) if f"step_logits/{t}" in arrays},
        "dtype": trace["dtype"],
        "arrays_dtype": str(arrays["logits"].dtype) if "logits" in arrays else None,
    }


def unchecked(got: dict) -> list[str]:
    """What the comparison could not check for want of the candidate's arrays (its .npz)."""
    if got.get("arrays"):
        return unchecked_decoding(got)
    missing = ["rule 0, the candidate's decisions from its own ranks and scores (arrays ranks/, scores/, kv_scores/)",
               "SnapKV's cached positions per KV head (kv_positions/)", "the next-token logits (logits)"]
    if METHOD[got["method"]].per_layer:
        missing += ["PyramidInfer's kept positions per layer (kept/) and decode-stage scores (decode_scores/)"]
    return missing + unchecked_decoding(got)


def unchecked_decoding(got: dict) -> list[str]:
    """Decoding cannot be judged without the logits of every step after the first (they may be left out)."""
    if len(got["generated_ids"]) > 1 and not got.get("step_logits"):
        return ["decoding: the logits each generated token after the first was chosen from (step_logits/t)"]
    return []


# ---------------------------------------------------------------- rules 1 and 2


def _criterion_entries(rec: dict) -> list[dict]:
    """The pass in which ASL's criterion ran: the first pass of a two-pass run, else the layers."""
    return rec.get("first_pass") or rec["layers"]


def _criterion_ranks(rec: dict) -> dict:
    return (rec.get("first_pass_ranks") if rec.get("first_pass") else rec.get("ranks")) or {}


def _margin_at(entries: list[dict], layer: int) -> float | None:
    if layer is None or layer >= len(entries):
        return None
    m = entries[layer]["margin"]
    return None if m is None or isinstance(m, str) else float(m)


def _observed_ranks_agree(exp: dict, got: dict, layer: int) -> bool | None:
    """Whether both runs report the same ranks for every layer the criterion observes at `layer`; None where
    either run lacks some of them (or the method has no L_obs)."""
    l_obs = exp["params"].get("l_obs") if "params" in exp else None
    if l_obs is None:
        return None
    er, gr = _criterion_ranks(exp), _criterion_ranks(got)
    window = [str(m) for m in range(layer - l_obs + 1, layer + 1)]
    if not all(m in er and m in gr for m in window):
        return None
    return all(er[m] == gr[m] for m in window)


def _check_select_layer(exp: dict, got: dict, tol: Tolerance) -> Finding | None:
    e, g = exp["select_layer"], got["select_layer"]
    if e == g:
        return None
    if METHOD[exp["method"]].two_pass and None in (e, g):  # two-pass ASL always selects once N > w
        return Finding(FAIL, "select_layer", f"expected {e}, got {g}: two-pass ASL selects even when its criterion "
                       "never fires (it falls back to the last layer's ranks and runs the second pass on them), "
                       "so no near-tie makes it run as full", e if e is not None else g)
    # where the two runs part: the earlier of the two selection layers (None = never)
    parting = min(x for x in (e, g) if x is not None)
    margin = _margin_at(_criterion_entries(exp), parting)
    if margin == 0.0:
        return Finding(FAIL, "select_layer", f"expected {e}, got {g}: the expected ratio at layer {parting} equals tau "
                       f"(margin 0), and SPEC fires only when ratio < tau, strictly; firing there is comparing with "
                       "<=, not a near-tie", parting, None, margin)
    if margin is not None and abs(margin) <= tol.margin:
        if _observed_ranks_agree(exp, got, parting) is True:
            return Finding(FAIL, "select_layer", f"expected {e}, got {g}: both runs rank every observed layer up to "
                           f"{parting} identically, so the exact ratio there is the same number (margin "
                           f"{margin:+.3g}); with ratio < tau decided exactly there is no near-tie to excuse",
                           parting, None, margin)
        return Finding(NEAR, "select_layer", f"expected {e}, got {g}: the criterion's margin at layer {parting} is "
                       f"{margin:+.3g}, within ±{tol.margin} (a near-tie)", parting, None, margin)
    why = "" if margin is None else f"; the expected margin at layer {parting} is {margin:+.3g}, beyond ±{tol.margin}"
    return Finding(FAIL, "select_layer", f"expected {e}, got {g}{why}", parting, None, margin)


def _positions_apart(field: str, expected: list, got: list, scores, rows: np.ndarray, n_prefix: int, count: int,
                     tol: Tolerance, layer: int, what: str) -> Finding:
    """Judge two kept/cached position sets that differ: NEAR only when every position held by one side alone
    is a prefix token whose expected score lies within `score` (relative) of the top-`count` boundary."""
    only_e, only_g = sorted(set(expected) - set(got)), sorted(set(got) - set(expected))
    lists = f"{what} only by the oracle {only_e[:8]}, only by the candidate {only_g[:8]}"
    row_of = {int(q): r for r, q in enumerate(rows)}
    window = [q for q in only_e + only_g if row_of.get(q, n_prefix) >= n_prefix]
    if window:
        return Finding(FAIL, field, f"window position(s) {window[:8]} {what} by one side only (the window is always "
                       f"{what}): {lists}", layer, window[0])
    if scores is None:
        return Finding(FAIL, field, f"{lists} (no expected scores to judge near-ties)", layer, (only_e + only_g)[0])
    scores = np.asarray(scores)
    boundary = boundary_score(scores, count)
    scale = float(np.max(np.abs(scores))) or 1.0
    far = [(abs(float(scores[row_of[q]]) - boundary) / scale, q) for q in only_e + only_g]
    worst, q = max(far)
    detail = ", ".join(f"{p} (score {scores[row_of[p]]:.6g}, {d:.3g} from the boundary)"
                       for d, p in sorted(far, key=lambda t: t[1])[:6])
    if worst > tol.score:
        return Finding(FAIL, field, f"{lists}: {detail}; boundary score {boundary:.6g}, relative tolerance "
                       f"{tol.score}", layer, q, worst)
    return Finding(NEAR, field, f"{lists}: every one within {tol.score} (relative) of the boundary "
                   f"{boundary:.6g}: {detail}", layer, q, worst)


def _check_kept(exp: dict, got: dict, tol: Tolerance) -> Finding | None:
    e, g = exp["kept_positions"], got["kept_positions"]
    if e == g:
        return None
    layer = exp["select_layer"]
    if e is None or g is None or len(e) != len(g):
        return Finding(FAIL, "kept_positions", f"expected {len(e or [])} kept positions, got {len(g or [])}: "
                       f"{apart(e or [], g or [], *ORACLE_VS_CANDIDATE)}", layer)
    N, p = exp["num_prompt_tokens"], exp["params"]
    two_pass = bool(exp.get("first_pass"))
    scores = ((exp.get("first_pass_scores") if two_pass else exp.get("scores")) or {}).get(str(layer))
    if METHOD[exp["method"]].decides == "last-query":  # GemFilter: every position scored, the best min(k, N) kept
        n_prefix, count = N, min(p["select_k"], N)
    else:
        n_prefix = N - p["window"]
        count = min(p["select_k"] - p["window"], n_prefix)
    return _positions_apart("kept_positions", e, g, scores, np.arange(N), n_prefix, count, tol, layer, "kept")


# ---------------------------------------------------------------- rule 3


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
            if el is _criterion_entries(exp) and _observed_ranks_agree(exp, got, a["layer"]) is False:
                continue  # |U|, v, ratio follow from ranks that differ: those are judged themselves (near-ties or
                # not), and rule 0 re-derives the candidate's |U|, v and ratio from its own ranks
            for key in ("union_size", "v", "ratio"):  # continuous in near-tied ranks: compared within `criterion`
                x, y = a[key], b[key]
                if isinstance(x, str) or isinstance(y, str) or x is None or y is None:
                    if x != y:
                        return findings + [Finding(FAIL, f"{at}.{key}", f"expected {x}, got {y}", a["layer"])]
                elif abs(x - y) > tol.criterion * max(abs(x), 1e-12) + tol.margin:
                    findings.append(Finding(FAIL, f"{at}.{key}", f"expected {x:.9g}, got {y:.9g}", a["layer"]))
    B, w = exp["params"]["kv_budget"], exp["params"]["window"]
    for layer, heads in exp["kv_positions"].items():
        other = got["kv_positions"].get(layer)
        if other is None:
            continue
        rows = layer_positions(exp, int(layer))
        n_prefix = len(rows) - w
        decided = exp["layers"][int(layer)]["kv_boundary_gaps"] is not None
        for g, (pa, pb) in enumerate(zip(heads, other)):
            if pa == pb:
                continue
            field = f"kv_positions[{layer}][{g}]"
            if not decided:
                findings.append(Finding(FAIL, field, f"no SnapKV decision at this layer, so no near-tie: "
                                        f"{apart(pa, pb, *ORACLE_VS_CANDIDATE)}", int(layer)))
                continue
            scores = (exp.get("kv_scores") or {}).get(layer)
            findings.append(_positions_apart(field, pa, pb, None if scores is None else scores[g], rows, n_prefix,
                                             B - w, tol, int(layer), "cached"))
    return findings


# ---------------------------------------------------------------- rules 4 and 5


NOT_JUDGED = "not judged:"  # a finding of what could not be judged: the case is INCOMPLETE, never a PASS


def _check_logits_and_tokens(exp: dict, got: dict, tol: Tolerance) -> list[Finding]:
    findings = []
    # from a LongRoPE recomputation on, a pruning method's tokens rest on a second prefill whose decisions (and
    # their margins) the trace does not hold: a difference there cannot be told from a near-tie
    again = exp["recomputed_at"] if exp["method"] != "full" else None
    if exp["logits"] is not None and got["logits"] is not None:
        a, b = np.asarray(exp["logits"]), np.asarray(got["logits"])
        if a.shape != b.shape:
            return [Finding(FAIL, "logits", f"expected {a.size} logits (the vocabulary), got {b.size}")]
        diff = np.abs(a - b)
        if diff.size and diff.max() > tol.logits:
            worst = int(diff.argmax())
            findings.append(Finding(FAIL, "logits", f"max abs difference {diff.max():.3g} at vocabulary id {worst}, "
                                    f"beyond {tol.logits}", None, None, float(diff.max())))
    prefill_agrees = not findings
    for t, (a, b) in enumerate(zip(exp["generated_ids"], got["generated_ids"])):
        step = _check_step_logits(exp, got, t, tol, prefill_agrees)
        if again is not None and t >= again and (step is not None or a != b):
            return findings + [Finding(NOTE, f"step_logits[{t}]", f"{NOT_JUDGED} at step {again} the {exp['method']} "
                                       "prefill ran again on the whole sequence (LongRoPE, docs/semantics.md §5) and "
                                       "its decisions are not in the trace, so this difference cannot be told from a "
                                       "near-tie there", step=t)]
        if step is not None:
            return findings + [step]
        gap = exp["generated_gaps"][t]
        if a != b:
            verdict = NEAR if gap <= 2 * tol.logits else FAIL
            findings.append(Finding(verdict, "generated_ids", f"step {t}: expected token {a}, got {b}; the expected "
                                    f"top-2 logit gap was {gap:.3g}", None, None, gap, step=t))
            return findings
        if gap <= 2 * tol.logits:  # a near-tie step: what follows may legitimately differ
            return findings
    if len(exp["generated_ids"]) != len(got["generated_ids"]):
        findings.append(Finding(FAIL, "generated_ids", f"expected {len(exp['generated_ids'])} tokens, "
                                f"got {len(got['generated_ids'])}"))
    return findings


def _check_step_logits(exp: dict, got: dict, t: int, tol: Tolerance, prefill_agrees: bool) -> Finding | None:
    """Rule 5a: the logits generated token t (t ≥ 1) was chosen from, within `logits` of the oracle's. Both runs
    fed the same tokens before it (the caller stops at the first differing or near-tied token)."""
    e, g = (exp.get("step_logits") or {}).get(str(t)), (got.get("step_logits") or {}).get(str(t))
    if t == 0 or e is None or g is None:
        return None
    a, b = np.asarray(e), np.asarray(g)
    if a.shape != b.shape:
        return Finding(FAIL, f"step_logits[{t}]", f"expected {a.size} logits (the vocabulary), got {b.size}", step=t)
    diff = np.abs(a - b)
    if diff.max() <= tol.step_logits:
        return None
    worst = int(diff.argmax())
    why = ("the prefill logits agree, so the prompt's caches are right: look at what decoding adds, the positions "
           f"of the generated tokens (they continue at next_position = {exp['next_position']}), the cache each step "
           "appends to and attends over, rotary at those positions" if prefill_agrees else
           "the prefill logits differ too: look at the prefill first")
    return Finding(FAIL, f"step_logits[{t}]", f"step {t} logits differ from SPEC's by up to {diff.max():.3g} "
                   f"(vocabulary id {worst}), beyond {tol.step_logits}; {why}", None, None, float(diff.max()), step=t)


# ---------------------------------------------------------------- rule 6: the scores themselves


def _held(rec: dict, part: str, layer: int) -> np.ndarray:
    """The prompt positions a layer of a pass held, row by row: scores of two runs are comparable only where
    both layers held the same positions."""
    if part == "first_pass":
        return np.arange(rec["num_prompt_tokens"])
    if METHOD[rec["method"]].per_layer:
        return pyramid_rules.held_positions(rec)[layer]
    if rec.get("first_pass") is not None:  # a second pass runs on the kept ids
        return np.asarray(rec["kept_positions"], dtype=np.int64)
    return layer_positions(rec, layer)


def _score_pairs(exp: dict, got: dict, key: str) -> list[tuple]:
    """(field, layer, expected, candidate, held positions) for every layer (and KV head) both runs scored while
    holding the same positions."""
    part = "first_pass" if key == "first_pass_scores" else "layers"
    pairs = []
    for layer, e in sorted((exp.get(key) or {}).items(), key=lambda kv: int(kv[0])):
        g = (got.get(key) or {}).get(layer)
        if g is None or np.shape(e) != np.shape(g):
            continue
        held_e, held_g = _held(exp, part, int(layer)), _held(got, part, int(layer))
        if not np.array_equal(held_e, held_g):
            continue  # an earlier decision (a near-tie) gave the layers other tokens
        if key == "kv_scores":
            pairs += [(f"kv_scores[{layer}][{h}]", int(layer), np.asarray(a), np.asarray(b), held_e)
                      for h, (a, b) in enumerate(zip(e, g))]
        else:
            pairs.append((f"{key}[{layer}]", int(layer), np.asarray(e), np.asarray(g), held_e))
    return pairs


def _check_scores(exp: dict, got: dict, tol: Tolerance) -> list[Finding]:
    """Rule 6: every score the candidate reports, against SPEC's, within `score` × the layer's (KV head's)
    largest |score|. Beyond it is a FAIL even when no compared decision changed: this prompt's decisions
    survived, the next prompt's will not. The one exception is an exact constant factor over every compared
    layer (a mean for a sum), which cannot change any decision on any prompt: a NOTE naming the factor."""
    findings = []
    for key, what in (("scores", "token scores"), ("first_pass_scores", "first-pass scores"),
                      ("kv_scores", "SnapKV scores")):
        pairs = _score_pairs(exp, got, key)
        if not pairs:
            continue
        e_all = np.concatenate([p[2].ravel() for p in pairs])
        g_all = np.concatenate([p[3].ravel() for p in pairs])
        far = [(f, l, e, g, held) for f, l, e, g, held in pairs
               if np.max(np.abs(e - g), initial=0.0) > tol.score * (float(np.max(np.abs(e), initial=0.0)) or 1.0)]
        if not far:
            continue
        c = float(e_all @ g_all / (e_all @ e_all)) if e_all @ e_all else 0.0
        if c and all(np.max(np.abs(g - c * e), initial=0.0) <= tol.score * abs(c) * (float(np.max(np.abs(e))) or 1.0)
                     for _, _, e, g, _ in pairs):
            findings.append(Finding(NOTE, key, f"the candidate's {what} are {c:.6g} × SPEC's at every layer compared "
                                    f"(a mean instead of a sum, or another constant factor): no decision changes on "
                                    f"any prompt, but these are not SPEC's scores, so its boundary gaps are not "
                                    f"comparable either"))
            continue
        scaled = c and abs(c - 1.0) > tol.score  # a constant factor explains most of it: judge what it leaves
        if scaled:
            far = [p for p in pairs if np.max(np.abs(p[3] - c * p[2]), initial=0.0)
                   > tol.score * abs(c) * (float(np.max(np.abs(p[2]), initial=0.0)) or 1.0)]
        field, layer, e, g, held = far[0]
        scale = float(np.max(np.abs(e))) or 1.0
        ref = c * e if scaled else e
        row = int(np.argmax(np.abs(ref - g)))
        position = int(held[row]) if row < len(held) else row
        apart_by = abs(g[row] - ref[row]) / (abs(c) * scale if scaled else scale)
        factor = (f"the candidate's {what} are {c:.6g} × SPEC's (a constant factor, which alone changes no decision) "
                  f"up to a residual: at position {position} {g[row]:.6g} against {c:.6g} × {e[row]:.6g}, "
                  if scaled else f"the candidate's score at position {position} is {g[row]:.6g}, SPEC's {e[row]:.6g}: ")
        findings.append(Finding(FAIL, field, f"{factor}{apart_by:.3g} of the layer's largest score apart, beyond "
                                f"{tol.score}. Wrong scores are a wrong implementation even where this prompt's "
                                f"decisions survive (look at the window attention: its causal mask, softmax and its "
                                f"precision, pooling, the head sums)", layer, position, apart_by))
    return findings


# ---------------------------------------------------------------- the verdict


def compare(expected: dict, got: dict, tol: Tolerance) -> tuple[str, list[Finding]]:
    """The verdict and every finding, in the order the rules above are applied."""
    own = check_own_decisions(got, tol)
    if own:
        return FAIL, own
    findings: list[Finding] = []
    f = _check_select_layer(expected, got, tol)
    if f is not None:
        return f.verdict, [f]
    hidden = check_scored(got)  # a layer SPEC scores must carry its scores: no decision left out of rule 0
    if hidden:
        return FAIL, hidden
    f = _check_kept(expected, got, tol) if not METHOD[expected["method"]].per_layer else \
        pyramid_rules.compare_prefill(expected, got, tol)
    if f is not None:  # later layers ran on other tokens: stop here
        return f.verdict, [f]
    findings += _check_layers(expected, got, tol)
    if any(x.verdict == FAIL for x in findings):
        return FAIL, findings
    if expected["next_position"] != got["next_position"]:
        e, g = expected["next_position"], got["next_position"]
        rule = ("after a second pass decoding continues at the number of kept tokens" if expected.get("first_pass")
                else "a one-pass method keeps original positions, so the first generated token is at N")
        hint = (" = the number of tokens cached after the selection: positions restarted at the cache length"
                if expected.get("kept_positions") and g == len(expected["kept_positions"]) else "")
        return FAIL, findings + [Finding(FAIL, "next_position", f"decoding starts at position {g}{hint}; SPEC's "
                                         f"{e}: {rule}")]
    f = pyramid_rules.compare_decode(expected, got, tol) if METHOD[expected["method"]].per_layer else None
    if f is not None:  # the caches part after a decode step: the logits before it are still comparable
        findings.append(f)
    scores = _check_scores(expected, got, tol)
    if any(x.verdict == FAIL for x in scores):
        return FAIL, findings + scores
    if not any(x.verdict == NEAR for x in findings):  # caches equal: logits and tokens are comparable
        findings += _check_logits_and_tokens(expected, got, tol)
    findings += scores
    verdict = FAIL if any(x.verdict == FAIL for x in findings) else NEAR if any(x.verdict == NEAR for x in findings) \
        else PASS
    return verdict, findings
