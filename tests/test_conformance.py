"""The tolerance policy on hand-made disagreements: near-ties pass with their margin, real divergences fail."""

import copy
import json

import numpy as np
import pytest

from reference.asl.selection import ranks
from reference.oracle.conformance import FAIL, NEAR, PASS, TOLERANCES, compare
from tests.conftest import GOLDEN_DIR

F32 = TOLERANCES["float32"]


def golden(name):
    return json.loads((GOLDEN_DIR / f"{name}.json").read_text())["expected"]


def boundary_pair(record, scores_key="scores"):
    """The last kept prefix position and the best left-out one at the selection layer, by the record's scores."""
    scores = np.asarray(record[scores_key][str(record["select_layer"])])
    kept = [p for p in record["kept_positions"] if p < len(scores)]
    left_out = [p for p in range(len(scores)) if p not in kept]
    return min(kept, key=lambda p: scores[p]), max(left_out, key=lambda p: scores[p]), scores


def swapped(record, scores_key, inside, outside):
    """A candidate whose OWN scores put `outside` above `inside`: its kept set swaps the two, consistently with its
    scores and ranks (rule 0), as a float-noise near-tie would."""
    got = copy.deepcopy(record)
    layer = str(record["select_layer"])
    scores = got[scores_key][layer]
    scores[inside], scores[outside] = scores[outside], scores[inside]
    ranks_key = scores_key.replace("scores", "ranks")
    if layer in got.get(ranks_key, {}):
        got[ranks_key][layer] = ranks(np.asarray(scores)).tolist()
    got["kept_positions"] = sorted(set(got["kept_positions"]) - {inside} | {outside})
    return got


@pytest.mark.parametrize("name, key", [("tiny-llama-asl", "scores"), ("tiny-llama-asl-2pass", "first_pass_scores"),
                                       ("tiny-qwen2-gemfilter", "first_pass_scores")])
def test_a_swap_at_the_boundary_is_judged_by_its_distance(name, key):
    exp = golden(name)
    inside, outside, scores = boundary_pair(exp, key)
    got = swapped(exp, key, inside, outside)
    distance = abs(scores[outside] - scores[inside]) / np.abs(scores).max()
    loose = TOLERANCES["float32"].__class__(**(vars(F32) | {"score": distance * 2}))
    tight = TOLERANCES["float32"].__class__(**(vars(F32) | {"score": distance / 2}))
    verdict, findings = compare(exp, got, loose)
    assert verdict == NEAR and findings[0].field == "kept_positions" and findings[0].margin == pytest.approx(distance)
    verdict, findings = compare(exp, got, tight)
    assert verdict == FAIL and findings[0].position in (inside, outside)


def test_a_window_token_dropped_is_always_a_failure():
    exp = golden("tiny-llama-asl")
    _, outside, _ = boundary_pair(exp)  # a swap-in that is itself a near-tie: only the window can fail
    got = copy.deepcopy(exp)
    got["kept_positions"] = sorted(set(exp["kept_positions"]) - {exp["kept_positions"][-1]} | {outside})
    loose = F32.__class__(**(vars(F32) | {"score": 1.0}))
    verdict, findings = compare(exp, got, loose)
    assert verdict == FAIL and "window position" in findings[0].message


def test_a_different_selection_layer_is_a_near_tie_only_within_the_margin():
    exp = golden("tiny-llama-asl")
    got = copy.deepcopy(exp)
    got["select_layer"] = exp["select_layer"] + 1
    margin = exp["layers"][exp["select_layer"]]["margin"]  # where the runs part
    assert compare(exp, got, F32)[0] == FAIL  # |margin| is far above 1e-3 on this golden
    wide = F32.__class__(**(vars(F32) | {"margin": abs(margin) * 1.01}))
    verdict, findings = compare(exp, got, wide)
    assert verdict == NEAR and findings[0].margin == pytest.approx(margin)


def test_greedy_tokens_diverging_after_a_clear_gap_fail_and_after_a_near_tie_pass():
    exp = golden("tiny-llama-full")
    got = copy.deepcopy(exp)
    got["generated_ids"][1] = (exp["generated_ids"][1] + 1) % 259
    verdict, findings = compare(exp, got, F32)
    assert verdict == FAIL and findings[-1].field == "generated_ids" and findings[-1].step == 1
    exp_tie = copy.deepcopy(exp)
    exp_tie["generated_gaps"][1] = 1e-4  # the oracle itself was torn at step 1
    verdict, _ = compare(exp_tie, got, F32)
    assert verdict == NEAR


def test_identical_records_pass():
    for name in ("tiny-qwen2-snapkv", "tiny-qwen2-asl-2pass", "tiny-llama-edge-v0-zero"):
        assert compare(golden(name), golden(name), TOLERANCES["float64"]) == (PASS, [])
