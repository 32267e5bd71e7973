"""The mutation suite: every planted bug of the catalogue is caught on both tiny default bundles, with its field."""

from __future__ import annotations

import subprocess
import sys

import pytest

from reference.io.checkpoint import load_weights
from reference.io.fetch import resolve_model
from reference.oracle.mutations import (
    CATALOGUE,
    MODELS,
    Mutation,
    bundles,
    judge,
    run_catalogue,
)

REQUIRED = {"criterion-le", "avg-pool-no-zero-padding", "max-pool-wraps", "gqa-one-head-per-group",
            "softmax-prefix-only", "window-not-causal", "window-not-kept", "window-not-cached", "renumbered-positions",
            "renumbered-rope", "unstable-ranks", "unstable-snapkv", "unstable-gemfilter", "variance-fewer-layers",
            "k-not-k-minus-w", "b-not-b-minus-w", "gemfilter-softmax", "gemfilter-scaled",
            "second-pass-original-positions"}


@pytest.fixture(scope="module")
def caught(tmp_path_factory):
    return {r.mutation.name: r for r in run_catalogue(tmp_path_factory.mktemp("bundles"))}


def test_the_catalogue_holds_what_the_issue_lists():
    names = [m.name for m in CATALOGUE]
    assert len(names) >= 15 and len(set(names)) == len(names) and REQUIRED <= set(names)


@pytest.mark.parametrize("m", CATALOGUE, ids=lambda m: m.name)
def test_every_planted_bug_is_caught_on_both_tiny_bundles(caught, m):
    r = caught[m.name]
    assert set(r.by_model) == set(MODELS)
    for model, hit in r.by_model.items():
        assert hit is not None, f"{m.name} ({m.bug}) passes every default case of {model}"
        case, field, line = hit
        assert case.startswith(model) and (("PASS" in line and "note:" in line) if m.neutral else " FAIL " in line)


def test_a_bug_that_changes_nothing_is_not_counted_as_caught(tmp_path):
    """The score can fail: a 'bug' that plants nothing is reported NOT caught."""
    model = MODELS[0]
    where = bundles(tmp_path)
    weights = load_weights(resolve_model(model), "float64")
    nothing = Mutation("nothing", "plants nothing", r".*", cases=("asl",))
    assert judge(nothing, model, where[model], weights) is None


def test_self_test_command_prints_the_score():
    run = subprocess.run([sys.executable, "-m", "reference", "check", "--self-test"], capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr
    assert f"caught {len(CATALOGUE)} / {len(CATALOGUE)} planted bugs (100%)" in run.stdout
    assert "NOT CAUGHT" not in run.stdout


def test_docs_list_the_whole_catalogue():
    from pathlib import Path

    text = (Path(__file__).resolve().parent.parent / "docs" / "conformance.md").read_text()
    for m in CATALOGUE:
        assert f"| `{m.name}` | {m.bug} |" in text, f"docs/conformance.md's catalogue table lacks {m.name}"
