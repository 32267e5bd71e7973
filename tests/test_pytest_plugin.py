"""The pytest plugin, used as another project would: a test file, a bundle, one test per case."""

import subprocess
import sys
import textwrap

import pytest

from reference.oracle.bundle import default_cases, write_bundle

USER_TEST = '''
import numpy as np
import pytest

from reference.io.checkpoint import load_weights
from reference.io.fetch import resolve_model
from reference.asl.generate import generate
from reference.asl.params import Params
from reference.oracle.trace import make_trace

WEIGHTS = load_weights(resolve_model(MODEL), "float32")


def my_implementation(case, shift=0):
    """Stands for another project's ASL; shift > 0 plants a bug (the window shifted left by `shift`)."""
    params = Params(**case["params"])
    gen = generate(WEIGHTS, case["prompt_ids"], case["max_new_tokens"], tuple(case["eos_token_ids"]),
                   method=case["method"], params=params)
    if shift and gen.prefill.kept_positions is not None:
        gen.prefill.kept_positions = np.sort(np.unique(np.maximum(gen.prefill.kept_positions - shift, 0)))
    return make_trace(gen, model_name="mine", model_sha256=case["model"]["sha256"], config=WEIGHTS.config,
                      dtype="float32")


@pytest.mark.asl_oracle(bundle=BUNDLE)
def test_good(asl_case):
    return my_implementation(asl_case)


@pytest.mark.asl_oracle(bundle=BUNDLE)
def test_buggy(asl_case):
    return my_implementation(asl_case, shift=1)


@pytest.mark.asl_oracle(bundle=BUNDLE, methods=("full",))
def test_full_only(asl_case):
    return my_implementation(asl_case)


@pytest.mark.asl_oracle(bundle=BUNDLE)
def test_no_arrays(asl_case):
    return my_implementation(asl_case)[0]


@pytest.mark.asl_oracle(bundle=BUNDLE, decisions_only=True)
def test_no_arrays_decisions_only(asl_case):
    return my_implementation(asl_case)[0]
'''


def test_plugin_parametrizes_over_the_bundle_and_reports_the_diagnosis(tmp_path):
    cases = [c for c in default_cases("tiny-llama") if c.name in ("tiny-llama-asl", "tiny-llama-full")]
    bundle = write_bundle("tiny-llama", cases, tmp_path / "bundle", progress=False)
    test_file = tmp_path / "test_user.py"
    test_file.write_text(USER_TEST.replace("BUNDLE", repr(str(bundle))).replace("MODEL", repr("tiny-llama")))
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(test_file)],
                          capture_output=True, text=True, cwd=tmp_path, timeout=600)
    out = done.stdout
    assert "3 failed, 6 passed, 1 skipped" in out, out  # the bug shows only where a selection happens
    assert "test_buggy[tiny-llama-asl]" in out and "kept_positions" in out, textwrap.shorten(out, 2000)
    assert "FAILED test_user.py::test_no_arrays[tiny-llama-asl]" in out and "INCOMPLETE" in out
    assert "FAILED test_user.py::test_full_only" not in out and "FAILED test_user.py::test_no_arrays_decisions" not in out
    skipped = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider",
                              f"{test_file}::test_full_only"], capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert "not checked: method asl is not among methods=('full',)" in skipped.stdout, skipped.stdout


@pytest.mark.parametrize("model, names", [("tiny-qwen3", ("tiny-qwen3-asl", "tiny-qwen3-full")),
                                          ("tiny-phi3", ("tiny-phi3-asl-crossing", "tiny-phi3-full"))])
def test_plugin_judges_the_newer_families(tmp_path, model, names):
    """Qwen3 and Phi-3 bundles through the plugin (Phi-3's ASL case recomputes its prefill while decoding): the
    good implementation passes every case, the planted window shift fails where a selection happens."""
    bundle = write_bundle(model, [c for c in default_cases(model) if c.name in names], tmp_path / "bundle",
                          progress=False)
    test_file = tmp_path / "test_user.py"
    test_file.write_text(USER_TEST.replace("BUNDLE", repr(str(bundle))).replace("MODEL", repr(model)))
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", "test_good or test_buggy",
                           str(test_file)], capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert "1 failed, 3 passed" in done.stdout, done.stdout
    assert f"FAILED test_user.py::test_buggy[{names[0]}]" in done.stdout and "kept_positions" in done.stdout
