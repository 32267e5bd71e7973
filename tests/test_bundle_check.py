"""Golden bundles and the checker: float32 candidates pass, planted bugs fail with the right diagnosis,
malformed candidates give clear errors."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from reference.asl.generate import generate
from reference.asl.params import Params
from reference.errors import OracleError
from reference.io.checkpoint import load_weights
from reference.io.fetch import resolve_model
from reference.oracle.bundle import (
    check,
    default_cases,
    read_inputs,
    read_manifest,
    write_bundle,
)
from reference.oracle.trace import make_trace, save_trace

CASES = ["tiny-llama-asl", "tiny-llama-fastkv", "tiny-llama-snapkv", "tiny-llama-asl-2pass", "tiny-llama-gemfilter",
         "tiny-llama-edge-n-le-w", "tiny-llama-asl-max-pooling", "tiny-llama-edge-tau-at-ratio"]


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("bundle")
    cases = [c for c in default_cases("tiny-llama") if c.name in CASES]
    return write_bundle("tiny-llama", cases, out, "float64", progress=False)


def write_candidate(bundle: Path, out: Path, dtype: str = "float32", engine_factory=None) -> Path:
    """An implementation under test: here the reference itself (optionally a planted-bug engine) in `dtype`."""
    out.mkdir(parents=True, exist_ok=True)
    weights = load_weights(resolve_model("tiny-llama"), dtype)
    for case in read_manifest(bundle)["cases"]:
        inputs = read_inputs(bundle, case)
        engine = engine_factory(weights) if engine_factory else None
        gen = generate(engine or weights, inputs["prompt_ids"], inputs["max_new_tokens"], tuple(inputs["eos_token_ids"]),
                       method=inputs["method"], params=Params(**inputs["params"]))
        trace, arrays = make_trace(gen, model_name="candidate", model_sha256=inputs["model"]["sha256"],
                                   config=weights.config, dtype=dtype)
        save_trace(trace, arrays, out / f"{case}.trace.json", with_arrays=True)
    return out


def test_bundle_layout(bundle):
    manifest = read_manifest(bundle)
    assert manifest["cases"] == CASES or sorted(manifest["cases"]) == sorted(CASES)
    for case in manifest["cases"]:
        inputs = read_inputs(bundle, case)
        assert len(inputs["model"]["sha256"]) == 64 and inputs["prompt_ids"]
        assert (bundle / f"{case}.trace.json").is_file() and (bundle / f"{case}.trace.npz").is_file()


def test_a_float32_candidate_passes_every_case(bundle, tmp_path):
    results = check(write_candidate(bundle, tmp_path / "cand"), bundle)
    assert all(r.verdict in ("PASS", "PASS-within-tolerance") for r in results), [r.line() for r in results]


@pytest.mark.parametrize("model", ["tiny-llama", "tiny-qwen2", "tiny-qwen3", "tiny-phi3"])
def test_float32_arithmetic_passes_every_default_case_of_a_float64_bundle(model, tmp_path):
    full = write_bundle(model, default_cases(model), tmp_path / "bundle", "float64", progress=False)
    out = tmp_path / "cand"
    out.mkdir()
    weights = load_weights(resolve_model(model), "float32")
    for case in read_manifest(full)["cases"]:
        inputs = read_inputs(full, case)
        gen = generate(weights, inputs["prompt_ids"], inputs["max_new_tokens"], tuple(inputs["eos_token_ids"]),
                       method=inputs["method"], params=Params(**inputs["params"]))
        trace, arrays = make_trace(gen, model_name=model, model_sha256=inputs["model"]["sha256"], config=weights.config,
                                   dtype="float32")
        save_trace(trace, arrays, out / f"{case}.trace.json", with_arrays=True)
    results = check(out, full)
    assert len(results) == len(default_cases(model))
    assert all(r.verdict in ("PASS", "PASS-within-tolerance") for r in results), [r.line() for r in results]


def test_cli_check_reports_and_exits(bundle, tmp_path):
    cand = write_candidate(bundle, tmp_path / "cand")
    ok = subprocess.run([sys.executable, "-m", "reference", "check", str(cand), "--golden", str(bundle)],
                        capture_output=True, text=True)
    assert ok.returncode == 0 and "summary:" in ok.stdout and "FAIL" not in ok.stdout.replace("0 FAIL", "")
    (cand / "tiny-llama-asl.trace.json").unlink()
    missing = subprocess.run([sys.executable, "-m", "reference", "check", str(cand), "--golden", str(bundle), "--json"],
                             capture_output=True, text=True)
    assert missing.returncode == 1
    rows = {r["case"]: r for r in json.loads(missing.stdout)}
    assert rows["tiny-llama-asl"]["verdict"] == "ERROR" and "missing" in rows["tiny-llama-asl"]["error"]


@pytest.mark.parametrize("tamper, fragment", [
    (lambda d: d.update(schema_version=7), "schema_version"),
    (lambda d: d.pop("layers"), "'layers' is a required property"),
    (lambda d: d["layers"][2]["kv_tokens"].append(5), "kv_tokens"),
    (lambda d: d["layers"][10].update(v=float("nan")), "NaN"),
])
def test_malformed_candidates_are_errors_not_crashes(bundle, tmp_path, tamper, fragment):
    cand = write_candidate(bundle, tmp_path / "cand")
    path = cand / "tiny-llama-asl.trace.json"
    doc = json.loads(path.read_text())
    tamper(doc)
    path.write_text(json.dumps(doc).replace("NaN", "NaN"))
    result = next(r for r in check(cand, bundle) if r.case == "tiny-llama-asl")
    assert result.verdict == "ERROR" and fragment in result.error


# ---------------------------------------------------------------- planted bugs


def planted(bug: str):
    """A reference engine (or monkeypatch) with one known bug; returns (engine factory, patch context)."""
    import numpy as np

    from reference.asl.engine import ReferenceEngine
    from reference.asl.scoring import pool

    class NoZeroPadding(ReferenceEngine):  # avg pooling divides by the in-range count at the edges
        def head_scores(self, q_window, cache, kernel, pooling):
            p = super().head_scores(q_window, cache, 1, pooling)
            ones = np.ones_like(p)
            return pool(p, kernel, "avg") / pool(ones, kernel, "avg") if pooling == "avg" else pool(p, kernel, pooling)

    class GqaPerGroupOnly(ReferenceEngine):  # sums only the first query head of each group
        def head_scores(self, q_window, cache, kernel, pooling):
            p = super().head_scores(q_window, cache, kernel, pooling)
            G = self.config.group_size
            p[np.arange(p.shape[0]) % G != 0] = 0.0
            return p

    class RenumberedPositions(ReferenceEngine):  # after one-shot selection the kept tokens get fresh positions
        def select_rows(self, x, rows):
            self.renumber = True
            return x[rows]

        def layer(self, i, x, positions, q_rows):
            if getattr(self, "renumber", False):
                positions = np.arange(len(positions))
            return super().layer(i, x, positions, q_rows)

    return {"no-zero-padding": NoZeroPadding, "gqa-per-group": GqaPerGroupOnly,
            "renumbered-positions": RenumberedPositions}[bug]


@pytest.mark.parametrize("bug, case, field", [
    # the first scored layer, at position 0: the prompt's edge, where the padding acts (its v at L_min moves too,
    # but follows from ranks that differ and is not compared: scores are judged first, rule 6)
    ("no-zero-padding", "tiny-llama-asl", "scores[3]"),
    ("gqa-per-group", "tiny-llama-fastkv", "kept_positions"),
    ("renumbered-positions", "tiny-llama-fastkv", "kv_positions[9][0]"),  # the first layer after ℓ_f = 8
])
def test_planted_engine_bugs_are_caught_where_they_act(bundle, tmp_path, bug, case, field):
    cand = write_candidate(bundle, tmp_path / "cand", "float64", engine_factory=planted(bug))
    result = next(r for r in check(cand, bundle) if r.case == case)
    fails = [f for f in result.findings if f.verdict == "FAIL"]
    assert result.verdict == "FAIL" and fails[0].field == field, result.line()


@pytest.mark.parametrize("bug, case, field", [
    ("criterion-le", "tiny-llama-edge-tau-at-ratio", "select_layer"),  # τ = 1: the ratio at L_min is exactly τ
    ("variance-last-layer-only", "tiny-llama-asl", "select_layer"),
    ("window-not-kept", "tiny-llama-fastkv", "kept_positions"),
    ("unstable-ties", "tiny-llama-asl-max-pooling", "ranks[3]"),  # max pooling: plateaus of equal scores
])
def test_planted_decision_bugs_are_caught(bundle, tmp_path, monkeypatch, bug, case, field):
    from fractions import Fraction

    import reference.asl.criterion as criterion
    import reference.asl.methods as methods

    if bug == "criterion-le":  # the real bug: ≤ instead of <, on a case whose ratio at L_min is exactly τ
        monkeypatch.setattr(criterion, "fires", lambda ratio, tau: ratio != float("inf") and ratio <= Fraction(tau))
    elif bug == "variance-last-layer-only":
        original = criterion.rank_variance
        monkeypatch.setattr(criterion, "rank_variance", lambda ranks, k: original(ranks[-2:], k))
    elif bug == "window-not-kept":
        monkeypatch.setattr(methods, "kept_with_window", lambda prefix, n, w: prefix.astype("int64"))
    else:  # ties broken by LATER position, as an unstable GPU sort may do
        import numpy as np

        def later_wins(score):
            r = np.empty(len(score), dtype=np.int64)
            r[np.lexsort((-np.arange(len(score)), -score))] = np.arange(1, len(score) + 1)
            return r

        monkeypatch.setattr(methods, "ranks", later_wins)
    cand = write_candidate(bundle, tmp_path / "cand", "float64")
    monkeypatch.undo()  # the bug lives in the candidate, not in the checker
    result = next(r for r in check(cand, bundle) if r.case == case)
    fails = [f for f in result.findings if f.verdict == "FAIL"]
    assert result.verdict == "FAIL" and fails[0].field == field, result.line()


@pytest.mark.parametrize("old, fragment", [(1, "kept_tokens"), (2, "recomputed_at")])
def test_an_older_bundle_is_told_what_changed_in_one_line(bundle, tmp_path, old, fragment):
    """A bundle's version is its traces' schema_version: an older one is refused with what changed and the fix."""
    copy = tmp_path / "old"
    shutil.copytree(bundle, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    (copy / "manifest.json").write_text(json.dumps(manifest | {"bundle_version": old}))
    with pytest.raises(OracleError) as err:
        read_manifest(copy)
    message = str(err.value)
    assert "\n" not in message and f"bundle_version {old}" in message and fragment in message
    assert "asl golden" in message
