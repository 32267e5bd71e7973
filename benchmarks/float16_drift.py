"""How far the port's float16 weights move scores and the criterion from the float64 goldens.

    python benchmarks/float16_drift.py              # every golden case, the port with float16 weights
    python benchmarks/float16_drift.py --cache-only # the float64 reference with only its KV cache in float16

The float16 row of the tolerance table (reference/oracle/conformance.py, docs/conformance.md)
rests on these numbers: per case, the largest difference of any recorded score
(token scores, first-pass scores, SnapKV's per-KV-head scores) relative to that
layer's largest score, and the largest relative difference of v and ratio where
both runs computed them; and the largest difference of a decoding step's
logits (step 1 on: steps that read the cache) in the cases whose every decision
agrees (a PASS with the step tolerance lifted), up to the first near-tied token.
Runs the port on NumPy (float16 weights, float32 arithmetic), so any machine
reproduces it. --cache-only runs the float64 reference with every key and value
rounded to float16 as it enters the cache (nothing else), and prints each
decoding step's logit difference from the goldens: where it grows step by step
as the port's does, the drift is the cache's rounding compounding, not the port.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
from pathlib import Path

import numpy as np

from gpu.backend import get_xp
from gpu.engine import PortEngine
from gpu.loader import load_device_weights
from reference.model import transformer
from reference.oracle.conformance import PASS, TOLERANCES, compare
from reference.oracle.goldens import default_cases, run_case

GOLDEN_DIR = Path(__file__).resolve().parent.parent / "tests" / "goldens"  # made by `make goldens`


def score_drift(golden: dict, fresh: dict) -> float:
    worst = 0.0
    for key in ("scores", "first_pass_scores", "kv_scores"):
        for layer, expected in golden.get(key, {}).items():
            got = fresh.get(key, {}).get(layer)
            if got is None or np.shape(got) != np.shape(expected):
                continue
            e, g = np.atleast_2d(expected), np.atleast_2d(got)
            scale = np.abs(e).max(axis=-1, keepdims=True)
            worst = max(worst, float((np.abs(e - g) / np.where(scale > 0, scale, 1.0)).max()))
    return worst


def criterion_drift(golden: dict, fresh: dict) -> float:
    worst = 0.0
    for a, b in zip(golden["layers"], fresh["layers"]):
        for key in ("v", "ratio"):
            x, y = a[key], b[key]
            if isinstance(x, (int, float)) and isinstance(y, (int, float)) and x:
                worst = max(worst, abs(x - y) / abs(x))
    return worst


def step_differences(golden: dict, fresh: dict) -> list[float] | None:
    """|Δ| of step logits t = 1, 2, ... while every decision agrees and no earlier token was a near-tie;
    None where a decision differs (the comparison stops there, nothing later is judged)."""
    lifted = dataclasses.replace(TOLERANCES["float16"], step_logits=float("inf"))
    if compare(golden, fresh, lifted)[0] != PASS:
        return None
    found = []
    for t in range(1, len(golden["generated_ids"])):
        if golden["generated_gaps"][t - 1] <= 2 * lifted.logits or golden["generated_ids"][:t] != fresh["generated_ids"][:t]:
            break
        e, g = (golden.get("step_logits") or {}).get(str(t)), (fresh.get("step_logits") or {}).get(str(t))
        if e is None or g is None:
            break
        found.append(float(np.abs(np.asarray(e) - np.asarray(g)).max()))
    return found


def step_drift(golden: dict, fresh: dict) -> float | None:
    """The largest of step_differences (0 when no step was compared)."""
    found = step_differences(golden, fresh)
    return None if found is None else max(found, default=0.0)


@contextlib.contextmanager
def float16_cache():
    """The reference with every key and value rounded to float16 as it enters the cache, nothing else."""
    original = transformer.extend_cache

    def rounded(cache, k, v, positions):
        return original(cache, k.astype(np.float16).astype(k.dtype), v.astype(np.float16).astype(v.dtype), positions)

    transformer.extend_cache = rounded
    try:
        yield
    finally:
        transformer.extend_cache = original


def cache_only() -> None:
    print(f"{'case':<36} decoding steps' logits against the golden, |Δ| at t = 1, 2, ...")
    for case in default_cases():
        golden = json.loads((GOLDEN_DIR / f"{case.name}.json").read_text())["expected"]
        with float16_cache():
            fresh = run_case(case)["expected"]
        found = step_differences(golden, fresh)
        print(f"{case.name:<36} " + ("a decision differs" if found is None else " ".join(f"{d:.3f}" for d in found)))
    print("the float64 reference with only its KV cache rounded to float16, against the float64 goldens")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache-only", action="store_true",
                        help="the float64 reference with only its KV cache rounded to float16, step by step")
    if parser.parse_args(argv).cache_only:
        cache_only()
        return
    xp = get_xp("numpy")

    def engine(model_dir):
        return PortEngine(load_device_weights(model_dir, xp, "float16", progress=False)[0], xp)

    print(f"{'case':<36} {'score drift':>12} {'v/ratio drift':>14} {'step logits':>12}   same decisions")
    rows = []
    for case in default_cases():
        golden = json.loads((GOLDEN_DIR / f"{case.name}.json").read_text())["expected"]
        fresh = run_case(case, engine)["expected"]
        same = golden["select_layer"] == fresh["select_layer"] and golden["kept_positions"] == fresh["kept_positions"]
        steps = step_drift(golden, fresh)
        rows.append((case.name, score_drift(golden, fresh), criterion_drift(golden, fresh), steps or 0.0))
        shown = "-" if steps is None else f"{steps:.4f}"
        print(f"{case.name:<36} {rows[-1][1]:>12.4f} {rows[-1][2]:>14.4f} {shown:>12}   {'yes' if same else 'no'}")
    worst_score, worst_v = max(rows, key=lambda r: r[1]), max(rows, key=lambda r: r[2])
    worst_step = max(rows, key=lambda r: r[3])
    print(f"largest score drift {worst_score[1]:.4f} ({worst_score[0]}); "
          f"largest v/ratio drift {worst_v[2]:.4f} ({worst_v[0]}); "
          f"largest step-logit drift {worst_step[3]:.4f} ({worst_step[0]})")
    print("float16 weights on NumPy (float32 arithmetic) against the float64 goldens")


if __name__ == "__main__":
    main()
