"""examples/minimal_candidate: the smallest hand-written trace that `asl check` passes, and nothing more."""

from __future__ import annotations

import ast
import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest

from reference.oracle.bundle import (
    ERROR,
    check,
    check_trace,
    default_cases,
    write_bundle,
)
from reference.oracle.trace import SCHEMA_PATH, load_trace

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "examples" / "minimal_candidate" / "minimal.py"
CASE = "tiny-llama-full"


@pytest.fixture(scope="module")
def dirs(tmp_path_factory) -> tuple[Path, Path]:
    """A bundle holding only tiny-llama-full, and the candidate minimal.py writes for it."""
    tmp = tmp_path_factory.mktemp("minimal")
    bundle = write_bundle("tiny-llama", [c for c in default_cases("tiny-llama") if c.name == CASE], tmp / "bundle",
                          progress=False)
    cand = tmp / "cand"
    run = subprocess.run([sys.executable, str(SCRIPT), str(bundle), str(cand)], cwd=ROOT, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert (cand / f"{CASE}.trace.json").is_file() and (cand / f"{CASE}.trace.npz").is_file()
    return bundle, cand


def _judge(bundle: Path, trace: dict, arrays: dict):
    return check_trace(bundle / f"{CASE}.trace.json", (trace, arrays))


def test_the_minimal_candidate_passes(dirs):
    bundle, cand = dirs
    [result] = check(cand, bundle)
    assert (result.case, result.verdict) == (CASE, "PASS"), result.line()
    assert result.unchecked == []  # the arrays came along: nothing left unjudged


def test_a_wrong_generated_id_fails(dirs):
    bundle, cand = dirs
    trace, arrays = load_trace(cand / f"{CASE}.trace.json")
    assert _judge(bundle, trace, arrays).verdict == "PASS"
    bad = copy.deepcopy(trace)
    bad["generated_ids"][0] = (bad["generated_ids"][0] + 1) % bad["model"]["vocab_size"]
    result = _judge(bundle, bad, arrays)
    assert result.verdict == "FAIL", result.line()
    assert result.findings[0].field == "generated_ids" and result.findings[0].step == 0


def test_wrong_logits_fail(dirs):
    bundle, cand = dirs
    trace, arrays = load_trace(cand / f"{CASE}.trace.json")
    result = _judge(bundle, trace, {**arrays, "logits": arrays["logits"] + 1e-3})
    assert result.verdict == "FAIL" and result.findings[0].field == "logits", result.line()


@pytest.mark.parametrize("field", ["layers", "totals", "generated_gaps", "arrays_file"])
def test_a_missing_required_field_is_an_error_naming_it(dirs, field):
    bundle, cand = dirs
    trace, arrays = load_trace(cand / f"{CASE}.trace.json")
    del trace[field]
    result = _judge(bundle, trace, arrays)
    assert result.verdict == ERROR
    assert f"'{field}' is a required property" in result.error, result.error


def test_the_minimal_trace_has_exactly_the_required_fields(dirs):
    _, cand = dirs
    schema = json.loads(SCHEMA_PATH.read_text())
    doc = json.loads((cand / f"{CASE}.trace.json").read_text())
    assert set(doc) == set(schema["required"])
    layer_schema = schema["$defs"]["layer"]
    assert all(set(e) == set(layer_schema["required"]) for e in doc["layers"])
    for key in ("model", "params", "totals"):
        assert set(doc[key]) == set(schema["properties"][key]["required"]), key


def test_the_builder_imports_nothing_from_reference():
    """The point of the example: minimal_trace is what an implementer writes; only __main__ may use the oracle."""
    tree = ast.parse(SCRIPT.read_text())
    builder = [node for node in tree.body if not isinstance(node, ast.If)]  # all but `if __name__ == "__main__"`
    imported = [alias.name for node in builder for sub in ast.walk(node) if isinstance(sub, ast.Import)
                for alias in sub.names]
    imported += [sub.module or "" for node in builder for sub in ast.walk(node) if isinstance(sub, ast.ImportFrom)]
    assert imported and not [name for name in imported if name.split(".")[0] == "reference"], imported
