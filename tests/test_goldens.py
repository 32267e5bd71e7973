"""The reference against its stored goldens (tests/goldens/, made by `python -m reference.oracle.goldens`)."""

import json

import pytest

from reference.oracle.conformance import FAIL, PASS
from reference.oracle.goldens import compare, default_cases, run_case
from tests.conftest import GOLDEN_DIR

CASES = default_cases()


def test_every_case_has_a_golden_and_every_golden_a_case():
    on_disk = {p.stem for p in GOLDEN_DIR.glob("*.json")}
    assert on_disk == {c.name for c in CASES}, "run `python -m reference.oracle.goldens` and review the diff"


def test_goldens_cover_every_method_and_the_spec_edge_cases():
    goldens = [json.loads((GOLDEN_DIR / f"{c.name}.json").read_text()) for c in CASES]
    assert {g["method"] for g in goldens} == {"full", "snapkv", "fastkv", "gemfilter", "asl", "asl-2pass",
                                              "pyramidinfer"}
    notes = " ".join(n for g in goldens for n in g["expected"]["notes"])
    assert "N ≤ w" in notes and "N ≤ k" in notes and "never fired" in notes and "fell back to the last layer" in notes
    two_pass_fallback = [g for g in goldens if g["case"].endswith("edge-2pass-never-fires")]
    assert two_pass_fallback and all(g["expected"]["select_layer"] == len(g["expected"]["layers"]) - 1
                                     for g in two_pass_fallback)
    fired_at_l_min = [g for g in goldens if g["method"] == "asl" and g["params"]["tau"] > 1]
    assert fired_at_l_min and all(g["expected"]["select_layer"] == g["params"]["l_min"] for g in fired_at_l_min)
    v0_zero = [g for g in goldens if g["case"].endswith("v0-zero")]
    assert v0_zero and all(g["expected"]["layers"][g["params"]["l_min"]]["v"] == 0.0 for g in v0_zero)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_reference_reproduces_its_golden(case):
    golden = json.loads((GOLDEN_DIR / f"{case.name}.json").read_text())
    fresh = run_case(case)
    assert golden["prompt_ids"] == fresh["prompt_ids"] and golden["params"] == fresh["params"]
    verdict, findings = compare(golden, fresh)
    assert verdict == PASS, f"{case.name}: {verdict}: " + "; ".join(f"{f.field}: {f.message}" for f in findings[:5])


def test_compare_reports_a_changed_decision():
    """The comparison can fail: a moved selection layer, a swapped kept token, a changed logit are reported."""
    golden = json.loads((GOLDEN_DIR / "tiny-llama-asl.json").read_text())
    fresh = json.loads(json.dumps(golden))

    def verdict_of(change):
        changed = json.loads(json.dumps(golden))
        change(changed["expected"])
        return compare(golden, changed | {"dtype": "float64"})

    def move_layer(e):
        e["select_layer"] += 1

    def swap_kept(e):
        e["kept_positions"][0] += 1

    def nudge_logit(e):
        e["logits"][5] += 1e-3

    for change, field in ((move_layer, "select_layer"), (swap_kept, "kept_positions"), (nudge_logit, "logits")):
        verdict, findings = verdict_of(change)
        assert verdict == FAIL and findings[0].field == field, (field, findings)
    assert compare(golden, fresh)[0] == PASS
