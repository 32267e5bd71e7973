"""The independent PyTorch + transformers client (examples/torch_client/asl_torch.py) against the oracle.

The client re-derives every formula from the contract, docs/semantics.md, on torch (it imports no
reference scoring, selection, criterion, method, model or engine code). Each
test writes a golden bundle with the reference, runs the client on every
case's inputs and judges its trace with the bundle checker: the two
implementations must agree on every decision (selection layer, kept
positions, cached positions, ranks, generated ids) and on every float within
the tolerance of the client's dtype.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from reference.asl.params import SMOLLM2_PARAMS
from reference.eval.tasks import passkey_ids
from reference.io.fetch import resolve_model
from reference.oracle.bundle import (
    check_trace,
    default_cases,
    read_inputs,
    write_bundle,
)
from reference.oracle.goldens import Case
from reference.oracle.trace import validate_trace

pytestmark = pytest.mark.crosscheck

CLIENT = Path(__file__).resolve().parent.parent / "examples" / "torch_client" / "asl_torch.py"
PASSING = ("PASS", "PASS-within-tolerance")
# Every tiny case whose method the client runs (it has no two-pass methods: gemfilter, asl-2pass).
TINY_CASES = ["full", "snapkv", "snapkv-max", "fastkv", "fastkv-kv-budget", "asl", "asl-max-pooling",
              "asl-kv-budget", "asl-defaults", "edge-n-le-w", "edge-n-le-k", "edge-never-fires",
              "edge-tau-above-1", "edge-v0-zero"]
FORBIDDEN = {"reference.asl.scoring", "reference.asl.selection", "reference.asl.criterion", "reference.asl.methods",
             "reference.model.transformer", "reference.asl.engine"}


def load_client():
    spec = importlib.util.spec_from_file_location("asl_torch", CLIENT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def client():
    # Tiny matrices: torch's thread pool costs more than it gains (20x slower on 2 busy cores).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield load_client()
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny_bundles(tmp_path_factory):
    made = {}

    def bundle(model: str) -> Path:
        if model not in made:
            cases = [c for c in default_cases(model) if c.name.removeprefix(f"{model}-") in TINY_CASES]
            assert len(cases) == len(TINY_CASES)
            made[model] = write_bundle(model, cases, tmp_path_factory.mktemp(model), progress=False)
        return made[model]

    return bundle


def run_and_check(client, bundle: Path, case: str, dtype=torch.float64):
    inputs = read_inputs(bundle, case)
    trace, arrays = client.run_case(resolve_model(inputs["model"]["name"]), inputs, dtype)
    validate_trace(trace, arrays, f"torch client trace of {case}")
    return trace, check_trace(bundle / f"{case}.trace.json", (trace, arrays))


def test_the_client_does_not_import_the_reference_maths():
    tree = ast.parse(CLIENT.read_text())
    imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    imported |= {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    assert not imported & FORBIDDEN, imported & FORBIDDEN


@pytest.mark.parametrize("model", ["tiny-llama", "tiny-qwen2"])
@pytest.mark.parametrize("case", TINY_CASES)
def test_client_agrees_with_the_oracle_on_tiny_models(client, tiny_bundles, model, case):
    _, result = run_and_check(client, tiny_bundles(model), f"{model}-{case}")
    assert result.verdict in PASSING, result.line()


def test_float32_client_passes_a_float64_bundle(client, tiny_bundles):
    trace, result = run_and_check(client, tiny_bundles("tiny-llama"), "tiny-llama-asl", torch.float32)
    assert trace["dtype"] == "float32"
    assert result.verdict in PASSING, result.line()


def test_unsupported_methods_are_refused(client, tiny_bundles):
    inputs = read_inputs(tiny_bundles("tiny-llama"), "tiny-llama-asl") | {"method": "gemfilter"}
    with pytest.raises(NotImplementedError, match="gemfilter"):
        client.run_case(resolve_model("tiny-llama"), inputs)


@pytest.mark.smollm2
def test_client_agrees_with_the_oracle_on_smollm2(client, smollm2_dir, tmp_path):
    # τ = 0.65 makes the criterion fire (at layer 17 for this prompt) and k = 256 < N = 300 drops
    # tokens, so the one-shot propagation is exercised; SMOLLM2_PARAMS' τ = 0.3 never fires at 300.
    # float32 on both sides keeps the reference's bundle (the slow half) near 25 s on 2 cores.
    case = Case("smollm2-asl-300", "smollm2", "asl", 300, dict(SMOLLM2_PARAMS.to_dict(), kv_budget=None, tau=0.65), seed=0, max_new_tokens=4)
    bundle = write_bundle("smollm2", [case], tmp_path / "b", dtype="float32", progress=False, prompt=passkey_ids)
    trace, result = run_and_check(client, bundle, case.name, torch.float32)
    expected = json.loads((bundle / f"{case.name}.trace.json").read_text())
    assert expected["select_layer"] is not None and len(expected["kept_positions"]) == 256
    assert trace["select_layer"] == expected["select_layer"]
    assert result.verdict in PASSING, result.line()


def test_short_prompts_with_wide_pooling_tie_exactly_on_both_sides(client, tmp_path):
    """n - w ≤ s: every pooling window holds the whole prefix, so the scores are mathematically equal.
    The client's torch pooling and the reference must both see exact ties and apply SPEC's tie rule;
    before the reference summed windows in a fixed order, rounding decided these ranks (and V0 = 0 cliffs)."""
    from reference.oracle.goldens import Case

    cases = [Case(f"tiny-qwen2-n{n}-s{s}", "tiny-qwen2", "asl", n, dict(window=32, kernel=s, select_k=64),
                  max_new_tokens=1) for s in (9, 11) for n in (34, 36, 38)]
    bundle = write_bundle("tiny-qwen2", cases, tmp_path / "ties", progress=False)
    for case in cases:
        _, result = run_and_check(client, bundle, case.name)
        assert result.verdict in PASSING, result.line()
