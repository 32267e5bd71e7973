"""The checker never passes a wrong implementation: each hole found by judging outside implementations, closed.

1. `<=` for `<` in the criterion fails (the ratio at L_min is exactly 1 under tau = 1);
2. a candidate without arrays is INCOMPLETE, never a PASS, unless a decisions-only check was asked for;
3. SnapKV excuses positions near a head's boundary, never whole heads, and never a window position;
4. SnapKV's tie rule is judged on the candidate's own per-KV-head scores;
5. diagnoses name set differences, vocabulary ids, and constant score scaling;
6. a method filter checks part of a bundle, listing the rest as not checked.
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest

import reference.asl.criterion as criterion
from reference.asl.generate import generate
from reference.asl.params import Params
from reference.errors import OracleError
from reference.io.checkpoint import load_weights
from reference.io.fetch import resolve_model
from reference.oracle.bundle import (
    NOT_CHECKED,
    check,
    check_trace,
    default_cases,
    read_inputs,
    read_manifest,
    write_bundle,
)
from reference.oracle.conformance import (
    FAIL,
    NEAR,
    NOTE,
    TOLERANCES,
    compare,
    record_from_trace,
)
from reference.oracle.mutations import CATALOGUE, planted
from reference.oracle.trace import load_trace, make_trace, save_trace

CASES = ["tiny-llama-asl", "tiny-llama-edge-tau-at-ratio", "tiny-llama-edge-tau-above-ratio", "tiny-llama-snapkv",
         "tiny-llama-snapkv-ties", "tiny-llama-asl-kv-budget-ties", "tiny-llama-fastkv", "tiny-llama-gemfilter",
         "tiny-llama-edge-gemfilter-ties"]
F64 = TOLERANCES["float64"]


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    cases = [c for c in default_cases("tiny-llama") if c.name in CASES]
    return write_bundle("tiny-llama", cases, tmp_path_factory.mktemp("bundle"), "float64", progress=False)


@pytest.fixture(scope="module")
def weights():
    return load_weights(resolve_model("tiny-llama"), "float64")


def candidate(bundle: Path, case: str, weights, engine=None):
    """The reference's own (trace, arrays) for one case: the implementation under test."""
    inputs = read_inputs(bundle, case)
    gen = generate(engine or weights, inputs["prompt_ids"], inputs["max_new_tokens"], tuple(inputs["eos_token_ids"]),
                   method=inputs["method"], params=Params(**inputs["params"]))
    return make_trace(gen, model_name="candidate", model_sha256=inputs["model"]["sha256"], config=weights.config,
                      dtype="float64")


def judged(bundle: Path, case: str, cand, **kw):
    return check_trace(bundle / f"{case}.trace.json", cand, **kw)


def mutation(name: str):
    return next(m for m in CATALOGUE if m.name == name)


# ---------------------------------------------------------------- 1. <= for <


def test_the_ratio_at_l_min_is_exactly_one_so_tau_one_does_not_fire_there(bundle):
    expected, _ = load_trace(bundle / "tiny-llama-edge-tau-at-ratio.trace.json")
    l_min = expected["params"]["l_min"]
    assert expected["layers"][l_min]["ratio"] == 1.0 and expected["layers"][l_min]["margin"] == 0.0
    assert expected["select_layer"] is not None and expected["select_layer"] > l_min
    above, _ = load_trace(bundle / "tiny-llama-edge-tau-above-ratio.trace.json")
    assert above["select_layer"] == l_min  # 1 < the next float above 1


def le_candidate(bundle, weights, monkeypatch):
    """The real bug: ratio <= tau. Planted only while the candidate runs; the checker runs unpatched."""
    with monkeypatch.context() as m:
        m.setattr(criterion, "fires", lambda ratio, tau: ratio != float("inf") and ratio <= Fraction(tau))
        return candidate(bundle, "tiny-llama-edge-tau-at-ratio", weights)


def test_criterion_with_le_fails_with_the_exact_reason(bundle, weights, monkeypatch):
    cand = le_candidate(bundle, weights, monkeypatch)
    assert cand[0]["select_layer"] == cand[0]["params"]["l_min"]  # the bug acts: it fires at ratio == tau
    result = judged(bundle, "tiny-llama-edge-tau-at-ratio", cand)
    assert result.verdict == FAIL and result.findings[0].field == "select_layer", result.line()
    assert "exactly tau" in result.findings[0].message
    # without arrays (a decisions-only check) the expected margin of exactly 0 still refuses the excuse
    result = judged(bundle, "tiny-llama-edge-tau-at-ratio", cand[0], decisions_only=True)
    assert result.verdict == FAIL and result.findings[0].field == "select_layer" and "margin 0" in result.line()


def test_identical_ranks_are_never_a_near_tie_whatever_the_margin_tolerance(bundle, weights, monkeypatch):
    """Rule 1 on its own: both runs rank every observed layer alike, so their exact ratios are equal and a different
    decision cannot be a near-tie, even where the expected margin is tiny and the tolerance wide."""
    got = record_from_trace(*le_candidate(bundle, weights, monkeypatch))
    exp = record_from_trace(*load_trace(bundle / "tiny-llama-edge-tau-at-ratio.trace.json"))
    l_min = exp["params"]["l_min"]
    got["params"] = dict(got["params"], tau=float(np.nextafter(1.0, 2.0)))  # its own replay agrees: rule 0 is quiet
    exp["layers"][l_min]["margin"] = 1e-12  # not exactly 0 either
    wide = F64.__class__(**(vars(F64) | {"margin": 0.5}))
    verdict, findings = compare(exp, got, wide)
    assert verdict == FAIL and findings[0].field == "select_layer" and "identically" in findings[0].message
    got["ranks"], got["scores"] = {}, {}  # ranks unknown: only then may the margin rule excuse a tiny margin
    assert compare(exp, got, wide)[0] == NEAR


# ---------------------------------------------------------------- 2. no arrays


def test_a_candidate_without_arrays_is_incomplete_not_passed(bundle, weights, tmp_path):
    out = tmp_path / "cand"
    out.mkdir()
    with planted(mutation("avg-pool-no-zero-padding")) as engine:  # a real bug that no JSON field shows here
        trace, arrays = candidate(bundle, "tiny-llama-snapkv", weights, engine(weights))
    save_trace(trace, arrays, out / "tiny-llama-snapkv.trace.json", with_arrays=False)
    result = judged(bundle, "tiny-llama-snapkv", out / "tiny-llama-snapkv.trace.json")
    assert result.verdict == "INCOMPLETE" and any("kv_positions" in u for u in result.unchecked), result.line()
    assert "not checked" in result.line() and "--decisions-only" in result.line()
    asked = judged(bundle, "tiny-llama-snapkv", out / "tiny-llama-snapkv.trace.json", decisions_only=True)
    assert asked.verdict in ("PASS", NEAR) and asked.unchecked and "decisions only" in asked.line()
    # with its arrays the same candidate fails
    assert judged(bundle, "tiny-llama-snapkv", (trace, arrays)).verdict == FAIL


def test_cli_exit_status_for_incomplete_and_decisions_only(bundle, weights, tmp_path):
    out = tmp_path / "cand"
    out.mkdir()
    for case in read_manifest(bundle)["cases"]:
        trace, arrays = candidate(bundle, case, weights)
        save_trace(trace, arrays, out / f"{case}.trace.json", with_arrays=False)
    cmd = [sys.executable, "-m", "reference", "check", str(out), "--golden", str(bundle)]
    plain = subprocess.run(cmd, capture_output=True, text=True)
    assert plain.returncode == 1 and "INCOMPLETE" in plain.stdout and "0 PASS," in plain.stdout, plain.stdout
    asked = subprocess.run(cmd + ["--decisions-only"], capture_output=True, text=True)
    assert asked.returncode == 0 and "not checked (decisions only" in asked.stdout, asked.stdout


# ---------------------------------------------------------------- 3. SnapKV per position


def _snapkv_records(bundle, weights, case="tiny-llama-snapkv-ties"):
    exp = record_from_trace(*load_trace(bundle / f"{case}.trace.json"))
    got = record_from_trace(*candidate(bundle, case, weights))
    return exp, got


def test_a_window_position_missing_from_a_snapkv_cache_always_fails(bundle, weights):
    exp, got = _snapkv_records(bundle, weights)
    layer = next(l for l, e in enumerate(exp["layers"]) if e["kv_boundary_gaps"] is not None)
    scores = np.asarray(exp["kv_scores"][str(layer)][0])
    kept = got["kv_positions"][str(layer)][0]
    tied = [j for j in range(len(scores)) if j not in kept and scores[j] == max(scores[q] for q in range(len(scores))
                                                                                if q not in kept)]
    window_last = kept[-1]
    got["kv_positions"][str(layer)][0] = sorted(set(kept) - {window_last} | {tied[0]})
    got["kv_scores"] = {}  # no own-score check: rule 3 alone judges it
    loose = F64.__class__(**(vars(F64) | {"score": 1.0}))
    verdict, findings = compare(exp, got, loose)
    fail = next(f for f in findings if f.verdict == FAIL)
    assert verdict == FAIL and fail.field == f"kv_positions[{layer}][0]" and "window position" in fail.message


def test_snapkv_excuses_positions_at_the_boundary_not_whole_heads(bundle, weights):
    exp, got = _snapkv_records(bundle, weights, "tiny-llama-snapkv")
    layer = next(l for l, e in enumerate(exp["layers"]) if e["kv_boundary_gaps"] is not None)
    scores = np.asarray(exp["kv_scores"][str(layer)][0])
    n_prefix = len(scores)
    kept = [q for q in got["kv_positions"][str(layer)][0] if q < n_prefix]
    order = np.argsort(-scores, kind="stable")
    last_in, first_out, worst_out = int(order[len(kept) - 1]), int(order[len(kept)]), int(order[-1])
    gap = (scores[last_in] - scores[first_out]) / np.abs(scores).max()
    tol = F64.__class__(**(vars(F64) | {"score": gap * 2}))
    got["kv_scores"] = {}  # rule 3 alone
    near = copy.deepcopy(got)
    near["kv_positions"][str(layer)][0] = sorted(set(got["kv_positions"][str(layer)][0]) - {last_in} | {first_out})
    verdict, findings = compare(exp, near, tol)
    assert verdict == NEAR and findings[0].field == f"kv_positions[{layer}][0]", findings
    far = copy.deepcopy(near)  # one more swap, with the worst-scored prefix position: the head is not excused
    far["kv_positions"][str(layer)][0] = sorted(set(near["kv_positions"][str(layer)][0]) - {kept[0]} | {worst_out})
    verdict, findings = compare(exp, far, tol)
    assert verdict == FAIL and findings[0].position in (kept[0], worst_out), findings


# ---------------------------------------------------------------- 4. SnapKV's tie rule


def test_a_kvpress_style_topk_fails_the_tie_rule_on_its_own_scores(bundle, weights):
    with planted(mutation("unstable-snapkv")) as engine:
        cand = candidate(bundle, "tiny-llama-snapkv-ties", weights, engine(weights))
    result = judged(bundle, "tiny-llama-snapkv-ties", cand)
    f = result.findings[0]
    assert result.verdict == FAIL and f.field.startswith("kv_positions[") and "equal scores" in f.message
    assert "keeps the earlier" in f.message


def test_the_trace_records_snapkv_scores_per_kv_head(bundle):
    trace, arrays = load_trace(bundle / "tiny-llama-snapkv.trace.json")
    decided = [e for e in trace["layers"] if e["kv_boundary_gaps"] is not None]
    assert decided and all(f"kv_scores/{e['layer']}/{g}" in arrays for e in decided for g in range(len(e["kv_tokens"])))
    e = decided[0]
    assert len(arrays[f"kv_scores/{e['layer']}/0"]) == e["prefill_tokens"] - trace["params"]["window"]


# ---------------------------------------------------------------- 5. diagnoses


def test_kept_differences_are_reported_as_sets(bundle, weights):
    exp = record_from_trace(*load_trace(bundle / "tiny-llama-fastkv.trace.json"))
    got = copy.deepcopy(exp)
    got["ranks"], got["scores"] = {}, {}  # rule 2 alone
    scores = np.asarray(exp["scores"][str(exp["select_layer"])])
    prefix = [q for q in exp["kept_positions"] if q < len(scores)]
    out = [q for q in range(len(scores)) if q not in prefix]
    dropped, added = prefix[0], max(out)  # not neighbours: an entry-by-entry diff would misname both
    got["kept_positions"] = sorted(set(exp["kept_positions"]) - {dropped} | {added})
    verdict, findings = compare(exp, got, F64)
    msg = findings[0].message
    assert verdict == FAIL and f"only by the oracle [{dropped}]" in msg and f"only by the candidate [{added}]" in msg


def test_logits_are_named_by_vocabulary_id_and_scaled_scores_get_a_note(bundle, weights):
    exp = record_from_trace(*load_trace(bundle / "tiny-llama-asl.trace.json"))
    got = copy.deepcopy(exp)
    got["logits"][140] += 1.0
    verdict, findings = compare(exp, got, F64)
    f = next(x for x in findings if x.field == "logits")
    assert verdict == FAIL and "vocabulary id 140" in f.message and f.position is None
    with planted(mutation("scores-mean-over-heads")) as engine:
        result = judged(bundle, "tiny-llama-fastkv", candidate(bundle, "tiny-llama-fastkv", weights, engine(weights)))
    H = weights.config.num_attention_heads
    assert result.verdict == "PASS" and [n.field for n in result.notes] == ["scores"]
    assert f"{1 / H:.6g} ×" in result.notes[0].message and result.notes[0].verdict == NOTE


# ---------------------------------------------------------------- 6. method filter


def test_a_method_filter_checks_part_of_a_bundle(bundle, weights, tmp_path):
    out = tmp_path / "cand"
    out.mkdir()
    for case in ("tiny-llama-snapkv", "tiny-llama-snapkv-ties"):  # a SnapKV-only implementation
        trace, arrays = candidate(bundle, case, weights)
        save_trace(trace, arrays, out / f"{case}.trace.json", with_arrays=True)
    results = check(out, bundle, methods=["snapkv"])
    by = {r.case: r.verdict for r in results}
    assert by["tiny-llama-snapkv"] == "PASS" and by["tiny-llama-snapkv-ties"] == "PASS"
    assert {v for c, v in by.items() if "snapkv" not in c or "asl" in c} == {NOT_CHECKED}
    run = subprocess.run([sys.executable, "-m", "reference", "check", str(out), "--golden", str(bundle), "--methods",
                          "snapkv"], capture_output=True, text=True)
    assert run.returncode == 0 and "NOT-CHECKED" in run.stdout and "2 PASS" in run.stdout, run.stdout
    unfiltered = subprocess.run([sys.executable, "-m", "reference", "check", str(out), "--golden", str(bundle)],
                                capture_output=True, text=True)
    assert unfiltered.returncode == 1  # the missing cases are errors without the filter
    with pytest.raises(OracleError, match="unknown method"):
        check(out, bundle, methods=["snapkvv"])
    with pytest.raises(OracleError, match="no case"):
        check(out, write_bundle("tiny-llama", [c for c in default_cases("tiny-llama") if c.name == "tiny-llama-full"],
                                tmp_path / "b2", progress=False), methods=["snapkv"])


def test_hidden_scores_are_a_failure(bundle, weights):
    """A candidate that marks a scored layer unscored (so no ranks are checked) fails on `scored`."""
    trace, arrays = candidate(bundle, "tiny-llama-fastkv", weights)
    layer = trace["select_layer"]
    trace["layers"][layer].update(scored=False, boundary_gap=None)
    arrays = {k: v for k, v in arrays.items() if k not in (f"ranks/{layer}", f"scores/{layer}")}
    result = judged(bundle, "tiny-llama-fastkv", (trace, arrays))
    assert result.verdict == FAIL and result.findings[0].field == f"layers[{layer}].scored", result.line()


def test_a_case_file_and_json_output_round_trip(bundle, weights, tmp_path):
    out = tmp_path / "cand"
    out.mkdir()
    trace, arrays = candidate(bundle, "tiny-llama-asl", weights)
    save_trace(trace, arrays, out / "tiny-llama-asl.trace.json", with_arrays=True)
    run = subprocess.run([sys.executable, "-m", "reference", "check", str(out), "--golden", str(bundle), "--json",
                          "--methods", "asl"], capture_output=True, text=True)
    rows = {r["case"]: r for r in json.loads(run.stdout)}
    assert rows["tiny-llama-asl"]["verdict"] == "PASS" and rows["tiny-llama-asl"]["unchecked"] == []


# ---------------------------------------------------------------- bad input stays one-line errors


@pytest.mark.parametrize("cases, fragment", [
    (["../outside"], "not a plain file name"),
    (["/etc/passwd"], "not a plain file name"),
    (["tiny-llama-asl", "tiny-llama-asl"], "listed twice"),
    ("tiny-llama-asl", "must be a list"),
])
def test_manifests_naming_paths_or_duplicates_are_refused(bundle, tmp_path, cases, fragment):
    import shutil

    copy_dir = tmp_path / "b"
    shutil.copytree(bundle, copy_dir)
    manifest = json.loads((copy_dir / "manifest.json").read_text())
    (copy_dir / "manifest.json").write_text(json.dumps(manifest | {"cases": cases}))
    run = subprocess.run([sys.executable, "-m", "reference", "check", str(tmp_path), "--golden", str(copy_dir)],
                         capture_output=True, text=True)
    assert run.returncode == 2 and fragment in run.stderr and "Traceback" not in run.stderr, run.stderr


@pytest.mark.parametrize("cases, fragment", [
    ([{"name": "../../x", "method": "full", "n_tokens": 10}], "not a plain file name"),
    ([{"name": "a", "method": "full", "n_tokens": 10}, {"name": "a", "method": "asl", "n_tokens": 10}], "twice"),
    ([{"method": "full", "n_tokens": 10}], "must be a JSON list of cases"),
    # a value of the wrong type is refused with its key, never converted
    ([{"name": "a", "method": "full", "n_tokens": 12.9}], "$[0].n_tokens: 12.9 is not of type 'integer'"),
    ([{"name": "a", "method": "full", "n_tokens": 12, "seed": True}], "$[0].seed: True is not of type 'integer'"),
    ([{"name": "a", "method": "full", "n_tokens": 12, "max_new_tokens": "4"}],
     "$[0].max_new_tokens: '4' is not of type 'integer'"),
    ([{"name": "a", "method": "asl", "n_tokens": 12, "params": {"tau": -1}}], "tau must be a finite number > 0"),
    ([{"name": "a", "method": "pyramidinfer", "n_tokens": 12, "params": {"recent_ratio": 1}}],
     "recent-ratio must be a number in [0, 1)"),
])
def test_cases_files_that_would_write_outside_out_are_refused(tmp_path, cases, fragment):
    path = tmp_path / "cases.json"
    path.write_text(json.dumps(cases))
    run = subprocess.run([sys.executable, "-m", "reference", "golden", "--model", "tiny-llama", "--cases", str(path),
                          "--out", str(tmp_path / "out")], capture_output=True, text=True)
    assert run.returncode == 2 and fragment in run.stderr and "Traceback" not in run.stderr, run.stderr
    assert not (tmp_path / "x.inputs.json").exists() and not (tmp_path.parent / "x.inputs.json").exists()


def test_a_missing_inputs_file_is_a_one_line_error(bundle, tmp_path):
    import shutil

    copy_dir = tmp_path / "b"
    shutil.copytree(bundle, copy_dir)
    (copy_dir / "tiny-llama-asl.inputs.json").unlink()
    run = subprocess.run([sys.executable, "-m", "reference", "check", str(tmp_path), "--golden", str(copy_dir)],
                         capture_output=True, text=True)
    assert run.returncode == 2 and "tiny-llama-asl.inputs.json: missing" in run.stderr, run.stderr
