"""Golden outputs: the reference's decisions on the tiny checkpoints, stored for review as diffs.

    python -m reference.oracle.goldens --out tests/goldens          # regenerate, print a diff of every change
    python -m reference.oracle.goldens --out tests/goldens --check  # exit 1 (with the diff) if any would change

A golden is a trimmed trace (docs/trace.md) of one case: token ids, the
selection layer, kept positions, per-layer cache sizes and criterion values,
the ranks of a few scored layers, per-head cached positions of the last layer,
and the logits of every generated token (the prefill's and each decoding
step's) rounded to 8 decimals (every float to 10
significant digits, so last-bit changes do not churn the files). Cases run in float64, so a
golden does not depend on the BLAS that made it. `compare` is what
tests/test_goldens.py applies: the tolerance policy of `reference.oracle.conformance`
(docs/conformance.md) at the dtype of the run being checked.
"""

from __future__ import annotations

import argparse
import difflib
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from reference.asl.generate import generate
from reference.asl.params import METHOD, Params
from reference.io.checkpoint import load_weights
from reference.io.fetch import resolve_model
from reference.oracle.conformance import TOLERANCES, record_from_trace
from reference.oracle.conformance import compare as compare_records
from reference.oracle.trace import make_trace

LOGIT_DECIMALS = 8
SIGNIFICANT_DIGITS = 10  # far inside the float64 tolerances of reference/oracle/conformance.py
BASE = Params(window=4, kernel=3, select_k=24, tau=0.5, l_min=6, l_obs=4, select_layer=8, filter_layer=5)
NEWER_FAMILY_CASES = ("full", "snapkv", "fastkv", "gemfilter", "asl", "asl-kv-budget", "asl-2pass", "pyramidinfer")


@dataclass(frozen=True)
class Case:
    name: str
    model: str  # alias
    method: str
    n_tokens: int
    params: dict = field(default_factory=dict)  # overrides of BASE
    seed: int = 0
    max_new_tokens: int = 5

    def prompt_ids(self) -> list[int]:
        """Seeded ids over the byte range of the tiny tokenizers (3 .. 258)."""
        return np.random.default_rng(1000 + self.seed).integers(3, 259, self.n_tokens).tolist()

    def full_params(self) -> Params:
        return Params(**(BASE.to_dict() | self.params))


def _family_cases(model: str) -> list[Case]:
    """Every method on one tiny checkpoint, with the contract's edge cases."""
    return [
        Case(f"{model}-full", model, "full", 150),
        Case(f"{model}-snapkv", model, "snapkv", 150, {"kv_budget": 40}),
        Case(f"{model}-snapkv-max", model, "snapkv", 150, {"kv_budget": 40, "pooling": "max", "kernel": 5}),
        Case(f"{model}-fastkv", model, "fastkv", 150),
        Case(f"{model}-fastkv-kv-budget", model, "fastkv", 150, {"kv_budget": 60}),
        Case(f"{model}-gemfilter", model, "gemfilter", 150),
        Case(f"{model}-asl", model, "asl", 150),
        Case(f"{model}-asl-max-pooling", model, "asl", 150, {"pooling": "max"}),
        Case(f"{model}-asl-kv-budget", model, "asl", 150, {"kv_budget": 40}),
        Case(f"{model}-asl-defaults", model, "asl", 300, {k: v for k, v in Params().to_dict().items()
                                                          if k in ("tau", "l_min", "l_obs")} | {"window": 8, "select_k": 64}),
        Case(f"{model}-asl-2pass", model, "asl-2pass", 150),
        # SPEC's edge cases
        Case(f"{model}-edge-n-le-w", model, "asl", 3),  # N ≤ w: runs as full
        Case(f"{model}-edge-n-le-k", model, "asl", 20),  # N ≤ k: keeps everything, still reports ℓ*
        Case(f"{model}-edge-never-fires", model, "asl", 150, {"tau": 1e-9}),
        Case(f"{model}-edge-2pass-never-fires", model, "asl-2pass", 150, {"tau": 1e-9}),
        Case(f"{model}-edge-tau-above-1", model, "asl", 150, {"tau": 1.5}),  # fires at L_min
        Case(f"{model}-edge-v0-zero", model, "asl", 5),  # one prefix token: every rank is 1, V0 = v = 0
        # the criterion is exact: the ratio at L_min is exactly 1, so τ = 1 cannot fire there ...
        Case(f"{model}-edge-tau-at-ratio", model, "asl", 150, {"tau": 1.0}),
        # ... and τ = the next float above 1 always does
        Case(f"{model}-edge-tau-above-ratio", model, "asl", 150, {"tau": float(np.nextafter(1.0, 2.0))}),
        # exact ties: wide max pooling makes plateaus at SnapKV's boundary, under a budget too
        Case(f"{model}-snapkv-ties", model, "snapkv", 150, {"kv_budget": 40, "pooling": "max", "kernel": 15}),
        Case(f"{model}-asl-kv-budget-ties", model, "asl", 150, {"kv_budget": 40, "pooling": "max", "kernel": 9}),
        # N = 3 under GemFilter's width-5 pooling: every window holds the whole prompt, all scores tie
        Case(f"{model}-edge-gemfilter-ties", model, "gemfilter", 3, {"window": 1, "select_k": 2}),
        # PyramidInfer: the authors' defaults (a kept set at every layer, then the decode stage), every
        # other layer deciding with a short minimum context, a prefill-only run, aggressive pruning that
        # needs its sinks, and a "linear" schedule (the constant d in the authors' code)
        Case(f"{model}-pyramidinfer", model, "pyramidinfer", 150, max_new_tokens=8),
        Case(f"{model}-pyramidinfer-interval", model, "pyramidinfer", 150,
             {"layerwise_downsample_interval": 3, "min_context_length": 8, "streamingllm_sink_len": 2},
             max_new_tokens=8),
        Case(f"{model}-pyramidinfer-prefill-only", model, "pyramidinfer", 150, {"gen_compress": False}),
        Case(f"{model}-pyramidinfer-aggressive", model, "pyramidinfer", 150,
             {"prefill_decay_ratio": 0.2, "min_context_length": 8, "recent_ratio": 0.1, "gen_decay_ratio": 0.5,
              "exceed_length_to_compress": 6}, max_new_tokens=8),
        Case(f"{model}-pyramidinfer-linear", model, "pyramidinfer", 150,
             {"prefill_decay_strategy": "linear", "gen_decay_strategy": "linear", "min_context_length": 16},
             max_new_tokens=8),
    ]


def default_cases() -> list[Case]:
    cases = _family_cases("tiny-llama") + _family_cases("tiny-qwen2")  # every method, the contract's edge cases
    for model in ("tiny-qwen3", "tiny-phi3"):  # the newer families: every method once (their maths against
        # transformers: tests/test_crosscheck_hf.py); Phi-3's 150 tokens run on the long factor set
        cases += [c for c in _family_cases(model) if c.name.removeprefix(f"{model}-") in NEWER_FAMILY_CASES]
    cases += [  # Phi-3 on both sides of original_max_position_embeddings = 64, and across it while decoding
        Case("tiny-phi3-asl-short-factors", "tiny-phi3", "asl", 40),
        Case("tiny-phi3-full-crossing", "tiny-phi3", "full", 62),  # 62 + 5: the prefill runs again at step 3
        Case("tiny-phi3-asl-crossing", "tiny-phi3", "asl", 62, {"tau": 0.7}),  # τ 0.7: both prefills select
        Case("tiny-phi3-asl-2pass-crossing", "tiny-phi3", "asl-2pass", 62, {"tau": 0.7}),
    ]
    return cases


def run_case(case: Case, engine_factory=None, dtype: str = "float64") -> dict:
    """Run one case and return its golden record.

    engine_factory(model_dir) -> engine runs it on another engine (the port);
    default: the reference in float64.
    """

    model_dir = resolve_model(case.model)
    if engine_factory is None:
        weights = load_weights(model_dir, dtype)
        engine = None
    else:
        engine = engine_factory(model_dir)
        weights = engine.weights
        dtype = "float32"
    params = case.full_params()
    gen = generate(engine or weights, case.prompt_ids(), case.max_new_tokens, (), method=case.method, params=params)
    trace, arrays = make_trace(gen, model_name=case.model, model_sha256="", config=weights.config, dtype=dtype)
    scored = [e["layer"] for e in trace["first_pass"] or trace["layers"] if e["scored"]]  # where the method scored
    shown = {scored[0], scored[-1], trace["select_layer"]} if scored else set()
    if METHOD[case.method].per_layer:  # it decides at every layer: every layer's scores judge its near-ties
        shown = set(scored)
    record = record_from_trace(trace, arrays, score_layers=shown)
    last = str(weights.config.num_hidden_layers - 1)
    record["kv_positions"] = {last: record["kv_positions"][last]}
    record["kv_scores"] = {l: s for l, s in record["kv_scores"].items() if l == last}
    record["logits"] = np.round(np.asarray(record["logits"]), LOGIT_DECIMALS).tolist()
    if record.get("step_logits"):  # every decoding step's logits (issue 26), rounded as the prefill's
        record["step_logits"] = {t: np.round(np.asarray(v), LOGIT_DECIMALS).tolist() for t, v in record["step_logits"].items()}
    record = _significant(record)
    return {
        "case": case.name,
        "model": case.model,
        "dtype": dtype,
        "method": case.method,
        "params": params.to_dict(case.method),
        "prompt_ids": case.prompt_ids(),
        "max_new_tokens": case.max_new_tokens,
        "expected": record,
    }


def _significant(obj, digits: int = SIGNIFICANT_DIGITS):
    """Every float rounded to `digits` significant digits, so last-bit changes do not churn the goldens."""
    if isinstance(obj, float):
        return float(f"{obj:.{digits}g}")
    if isinstance(obj, list):
        return [_significant(x, digits) for x in obj]
    if isinstance(obj, dict):
        return {k: _significant(v, digits) for k, v in obj.items()}
    return obj


def golden_text(record: dict) -> str:
    """JSON laid out for review: one line per field, per layer entry and per ranks row."""

    def one(x) -> str:
        return json.dumps(x, ensure_ascii=False)

    def block(d: dict, indent: str) -> list[str]:
        lines = []
        for key, value in d.items():
            if key in ("layers", "first_pass") and value is not None:
                lines.append(f'{indent}"{key}": [')
                lines += [f"{indent} {one(e)}," for e in value]
                lines[-1] = lines[-1].rstrip(",")
                lines.append(f"{indent}]")
            elif isinstance(value, dict) and key in ("expected", "ranks", "scores", "first_pass_ranks",
                                                     "first_pass_scores", "kv_positions", "kv_scores"):
                lines.append(f'{indent}"{key}": {{')
                lines += block(value, indent + " ")
                lines.append(f"{indent}}}")
            else:
                lines.append(f'{indent}"{key}": {one(value)}')
            lines[-1] += ","
        if lines:
            lines[-1] = lines[-1][:-1]
        return lines

    text = "\n".join(["{", *block(record, " "), "}"]) + "\n"
    assert json.loads(text) == json.loads(json.dumps(record)), "golden layout lost information"
    return text


# ---------------------------------------------------------------- comparison


def compare(golden: dict, fresh: dict):
    """(verdict, findings) of a fresh run against its golden, at the fresh run's dtype's tolerance."""

    return compare_records(golden["expected"], fresh["expected"], TOLERANCES[fresh["dtype"]])


# ---------------------------------------------------------------- command line


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m reference.oracle.goldens", description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="only report differences; write nothing")
    parser.add_argument("--out", type=Path, required=True, help="golden directory (the project's: tests/goldens, as `make goldens` passes)")
    args = parser.parse_args(argv)
    from tqdm import tqdm

    args.out.mkdir(parents=True, exist_ok=True)
    changed = 0
    cases = default_cases()
    for case in tqdm(cases, desc="goldens", unit="case", file=sys.stderr):
        path = args.out / f"{case.name}.json"
        new = golden_text(run_case(case))
        old = path.read_text() if path.is_file() else ""
        if new == old:
            continue
        changed += 1
        sys.stdout.writelines(difflib.unified_diff(old.splitlines(True), new.splitlines(True),
                                                   f"a/{path.name}", f"b/{path.name}", n=2))
        if not args.check:
            path.write_text(new)
    stale = sorted(set(p.stem for p in args.out.glob("*.json")) - {c.name for c in cases})
    for name in stale:
        print(f"stale golden with no case: {name}.json", file=sys.stderr)
    verb = "would change" if args.check else "changed"
    print(f"{len(cases)} cases, {changed} golden(s) {verb}", file=sys.stderr)
    return 1 if args.check and (changed or stale) else 0


if __name__ == "__main__":
    sys.exit(main())
