"""pytest plugin: check an implementation of ASL against a golden bundle, one test per case.

Installed with asl-oracle (entry point `pytest11`). In your test file:

    import pytest

    @pytest.mark.asl_oracle(bundle="tests/asl-bundle")       # a directory written by `asl golden`
    def test_my_asl(asl_case):
        # asl_case: the case's inputs: prompt_ids, method, params, max_new_tokens, eos_token_ids, model, dtype
        return my_trace(asl_case)        # a trace dict, a (trace, arrays) pair, or the path of a trace file

Each case of the bundle becomes one test (its id is the case name). The
returned trace is checked with `reference.oracle.bundle.check_trace`, i.e. the
tolerance policy of docs/conformance.md at the trace's dtype (or the marker's
`dtype=`); a FAIL, a malformed trace, or a trace without its arrays (INCOMPLETE)
fails the test with the checker's diagnosis. `methods=("snapkv",)` checks only
the cases of those methods: the others are SKIPPED as not checked, never passed;
`decisions_only=True` accepts traces without arrays (what could not be checked
is printed with the result). A function without the marker, or without an
`asl_case` argument, is left alone.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from reference.asl.params import METHODS
from reference.oracle.bundle import PASSING, check_trace, read_inputs, read_manifest


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "asl_oracle(bundle, dtype=None, methods=None, decisions_only=False): parametrize over a golden "
                   "bundle's cases (arg asl_case) and check the returned trace against each")


def _bundle(marker) -> Path:
    bundle = marker.kwargs.get("bundle") or (marker.args[0] if marker.args else None)
    if bundle is None:
        raise pytest.UsageError("@pytest.mark.asl_oracle needs bundle='path/to/bundle'")
    return Path(bundle)


def pytest_generate_tests(metafunc):
    marker = metafunc.definition.get_closest_marker("asl_oracle")
    if marker is None or "asl_case" not in metafunc.fixturenames:
        return
    bundle = _bundle(marker)
    if not bundle.is_absolute():
        bundle = Path(metafunc.config.rootpath) / bundle
    names = read_manifest(bundle)["cases"]
    methods = marker.kwargs.get("methods")
    unknown = sorted(set(methods or ()) - set(METHODS))
    if unknown:
        raise pytest.UsageError(f"@pytest.mark.asl_oracle(methods=...): unknown method(s) {', '.join(unknown)}; "
                                f"choose from {', '.join(METHODS)}")
    cases = []
    for name in names:
        case = dict(read_inputs(bundle, name), bundle=str(bundle))
        skip = methods is not None and case["method"] not in methods
        marks = [pytest.mark.skip(reason=f"not checked: method {case['method']} is not among methods={tuple(methods)}")
                 ] if skip else []
        cases.append(pytest.param(case, id=name, marks=marks))
    metafunc.parametrize("asl_case", cases)


@pytest.hookimpl(tryfirst=True)
def pytest_pyfunc_call(pyfuncitem):
    marker = pyfuncitem.get_closest_marker("asl_oracle")
    if marker is None or "asl_case" not in pyfuncitem.funcargs:
        return None
    args = {name: pyfuncitem.funcargs[name] for name in pyfuncitem._fixtureinfo.argnames}
    candidate = pyfuncitem.obj(**args)
    if candidate is None:
        pytest.fail("the test returned nothing: return the implementation's trace for this case "
                    "(a dict, a (trace, arrays) pair, or a trace file path)", pytrace=False)
    case = pyfuncitem.funcargs["asl_case"]
    expected = Path(case["bundle"]) / f"{case['case']}.trace.json"
    result = check_trace(expected, candidate, marker.kwargs.get("dtype"), bool(marker.kwargs.get("decisions_only")))
    if result.verdict not in PASSING:
        pytest.fail(result.line(), pytrace=False)
    if result.unchecked or result.notes:
        print(result.line())  # shown with -rP / -s: what was not checked, and the notes
    return True
