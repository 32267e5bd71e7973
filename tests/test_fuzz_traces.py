"""Fuzzing the checker: any mutation of a valid candidate trace (its JSON or its arrays) is judged or refused with a
clear error, never a traceback.

A mutation replaces one leaf of the trace's JSON by another JSON value, deletes or adds a key, or changes one array
(dtype, length, values). `check_trace` must then return a CaseResult: ERROR (with a message) for what validation
refuses, else a verdict. The default number of examples keeps CI fast; a longer manual pass:

    ASL_FUZZ_EXAMPLES=5000 pytest tests/test_fuzz_traces.py -p no:cacheprovider
"""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from reference.oracle.bundle import CaseResult, check_trace, default_cases, write_bundle
from reference.oracle.trace import load_trace
from tests.conftest import fuzz_examples

EXAMPLES = fuzz_examples(60)
CASES = ["tiny-llama-asl", "tiny-llama-snapkv-ties", "tiny-llama-asl-2pass", "tiny-llama-gemfilter",
         "tiny-llama-asl-kv-budget"]
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    cases = [c for c in default_cases("tiny-llama") if c.name in CASES]
    return write_bundle("tiny-llama", cases, tmp_path_factory.mktemp("bundle"), "float64", progress=False)


@pytest.fixture(scope="module")
def candidates(bundle):
    return {case: load_trace(bundle / f"{case}.trace.json") for case in CASES}


def leaves(doc, path=()):
    """Every (path, value) of a JSON document, containers included."""
    yield path, doc
    if isinstance(doc, dict):
        for k, v in doc.items():
            yield from leaves(v, path + (k,))
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            yield from leaves(v, path + (i,))


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=5) | st.sampled_from(["inf", "-inf", "nan", "", "asl", "float16"]),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
    max_leaves=6)


def set_at(doc, path, value):
    target = doc
    for k in path[:-1]:
        target = target[k]
    target[path[-1]] = value


@st.composite
def json_mutations(draw, candidates):
    case = draw(st.sampled_from(CASES))
    trace, arrays = candidates[case]
    trace = copy.deepcopy(trace)
    paths = [p for p, _ in leaves(trace) if p]
    path = draw(st.sampled_from(paths))
    kind = draw(st.sampled_from(["replace", "delete", "add"]))
    if kind == "replace":
        set_at(trace, path, draw(json_values))
    else:
        parent = trace
        for k in path[:-1]:
            parent = parent[k]
        if kind == "delete":
            del parent[path[-1]]
        elif isinstance(parent, dict):
            parent[draw(st.text(min_size=1, max_size=6))] = draw(json_values)
        else:
            parent.insert(path[-1], draw(json_values))
    return case, trace, arrays


@st.composite
def array_mutations(draw, candidates):
    case = draw(st.sampled_from(CASES))
    trace, arrays = candidates[case]
    arrays = dict(arrays)
    name = draw(st.sampled_from(sorted(arrays)))
    a = arrays[name]
    kind = draw(st.sampled_from(["dtype", "shorter", "longer", "values", "drop", "extra", "2d"]))
    if kind == "dtype":
        arrays[name] = a.astype(draw(st.sampled_from([np.int8, np.float16, np.float32, np.int64, np.bool_, np.uint64])))
    elif kind == "shorter":
        arrays[name] = a[: max(0, len(a) - draw(st.integers(1, 3)))]
    elif kind == "longer":
        arrays[name] = np.concatenate([a, a[:1]])
    elif kind == "values":
        b = a.copy()
        if len(b):
            i = draw(st.integers(0, len(b) - 1))
            choices = [np.nan, np.inf, -np.inf, -1.0, 1e300, 0.0] if b.dtype.kind == "f" else [-1, 0, 2**62, len(b)]
            b[i] = draw(st.sampled_from(choices))
        arrays[name] = b
    elif kind == "drop":
        del arrays[name]
    elif kind == "extra":
        arrays[draw(st.sampled_from(["ranks/99", "kv_scores/0/0", "scores/-1", "junk"]))] = np.arange(3)
    else:
        arrays[name] = np.atleast_2d(a)
    return case, trace, arrays


def judged(bundle, case, trace, arrays) -> CaseResult:
    result = check_trace(bundle / f"{case}.trace.json", (trace, arrays))
    assert isinstance(result, CaseResult)
    if result.verdict == "ERROR":
        assert result.error and "\n" not in result.error.strip()
    json.dumps(result.to_dict(), default=str)  # the --json report can always be written
    result.line()
    return result


def test_the_unmutated_candidates_pass(bundle, candidates):
    for case, (trace, arrays) in candidates.items():
        assert judged(bundle, case, trace, arrays).verdict == "PASS", case


@FUZZ
@given(data=st.data())
def test_any_json_mutation_is_judged_or_refused(bundle, candidates, data):
    case, trace, arrays = data.draw(json_mutations(candidates))
    judged(bundle, case, trace, arrays)


@FUZZ
@given(data=st.data())
def test_any_array_mutation_is_judged_or_refused(bundle, candidates, data):
    case, trace, arrays = data.draw(array_mutations(candidates))
    result = judged(bundle, case, trace, arrays)
    if not np.array_equal(arrays.get("logits", np.zeros(0)), candidates[case][1]["logits"]):
        assert result.verdict != "PASS" or np.allclose(arrays["logits"], candidates[case][1]["logits"], atol=1e-6)
