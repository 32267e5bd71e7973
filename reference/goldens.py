"""Golden outputs: the reference's decisions on the tiny checkpoints, stored for review as diffs.

    python -m reference.goldens            # regenerate tests/goldens/*.json, print a diff of every change
    python -m reference.goldens --check    # exit 1 (with the diff) if any golden would change

A golden is a trimmed trace (docs/trace.md) of one case: token ids, the
selection layer, kept positions, per-layer cache sizes and criterion values,
the ranks of a few scored layers, per-head cached positions of the last layer,
and the next-token logits rounded to 4 decimals. Cases run in float64, so a
golden does not depend on the BLAS that made it. `compare` is what
tests/test_goldens.py applies: integers and decisions exactly, floats within
GOLDEN_TOLERANCE.
"""

from __future__ import annotations

import argparse
import difflib
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from reference.params import Params

GOLDEN_DIR = Path(__file__).resolve().parent.parent / "tests" / "goldens"
GOLDEN_TOLERANCE = {"logits": 2e-4, "criterion": 1e-9, "boundary_gap": 1e-9}  # abs; relative 1e-9 for v/ratio
LOGIT_DECIMALS = 4
BASE = Params(window=4, kernel=3, select_k=24, tau=0.5, l_min=6, l_obs=4, select_layer=8, filter_layer=5)


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


def default_cases() -> list[Case]:
    cases = []
    for model in ("tiny-llama", "tiny-qwen2"):
        cases += [
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
        ]
    return cases


def _rounded(x) -> float | str | None:
    if x is None or isinstance(x, str):
        return x
    return float(x)


def run_case(case: Case) -> dict:
    """Run one case with the reference (float64) and return its golden record."""
    from reference.checkpoint import load_weights
    from reference.fetch import resolve_model
    from reference.generate import generate
    from reference.trace import make_trace

    model_dir = resolve_model(case.model)
    weights = load_weights(model_dir, "float64")
    params = case.full_params()
    gen = generate(weights, case.prompt_ids(), case.max_new_tokens, (), method=case.method, params=params)
    trace, arrays = make_trace(gen, model_name=case.model, model_sha256="", config=weights.config, dtype="float64")
    keep = ("layer", "prefill_tokens", "kv_tokens", "union_size", "v", "ratio", "margin", "boundary_gap",
            "kv_boundary_gaps")
    scored = [e["layer"] for e in trace["layers"] if e["scored"]]
    shown = sorted({scored[0], scored[-1], *([trace["select_layer"]] if trace["select_layer"] in scored else [])}) if scored else []
    last = weights.config.num_hidden_layers - 1
    return {
        "case": case.name,
        "model": case.model,
        "dtype": "float64",
        "method": case.method,
        "params": params.to_dict(),
        "prompt_ids": case.prompt_ids(),
        "max_new_tokens": case.max_new_tokens,
        "expected": {
            "select_layer": trace["select_layer"],
            "kept_positions": trace["kept_positions"],
            "next_position": trace["next_position"],
            "generated_ids": trace["generated_ids"],
            "notes": trace["notes"],
            "layers": [{k: e.get(k) for k in keep} for e in trace["layers"]],
            "first_pass": None if trace["first_pass"] is None else [{k: e.get(k) for k in keep} for e in trace["first_pass"]],
            "ranks": {str(l): arrays[f"ranks/{l}"].tolist() for l in shown},
            "last_layer_kv_positions": [arrays[f"kv_positions/{last}/{g}"].tolist()
                                        for g in range(weights.config.num_key_value_heads)],
            "logits": np.round(arrays["logits"].astype(np.float64), LOGIT_DECIMALS).tolist(),
        },
    }


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
            elif isinstance(value, dict) and key in ("expected", "ranks"):
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


def _close(a, b, abs_tol: float, rel_tol: float = 0.0) -> bool:
    if a is None or b is None or isinstance(a, str) or isinstance(b, str):
        return a == b
    return abs(a - b) <= abs_tol + rel_tol * abs(b)


def compare(expected: dict, got: dict) -> list[str]:
    """Differences between a golden's `expected` and a fresh record's, each one line; [] when equal."""
    problems = []
    for key in ("select_layer", "kept_positions", "next_position", "generated_ids", "notes", "ranks",
                "last_layer_kv_positions"):
        if expected[key] != got[key]:
            problems.append(f"{key}: expected {_short(expected[key])}, got {_short(got[key])}")
    for part in ("layers", "first_pass"):
        exp_layers, got_layers = expected[part], got[part]
        if (exp_layers is None) != (got_layers is None) or (exp_layers and len(exp_layers) != len(got_layers)):
            problems.append(f"{part}: expected {_short(exp_layers)}, got {_short(got_layers)}")
            continue
        for e, g in zip(exp_layers or [], got_layers or []):
            for key in ("prefill_tokens", "kv_tokens", "union_size"):
                if e[key] != g[key]:
                    problems.append(f"{part}[{e['layer']}].{key}: expected {e[key]}, got {g[key]}")
            for key in ("v", "ratio", "margin"):
                if not _close(e[key], g[key], GOLDEN_TOLERANCE["criterion"], 1e-9):
                    problems.append(f"{part}[{e['layer']}].{key}: expected {e[key]}, got {g[key]}")
            if not _close(e["boundary_gap"], g["boundary_gap"], GOLDEN_TOLERANCE["boundary_gap"], 1e-9):
                problems.append(f"{part}[{e['layer']}].boundary_gap: expected {e['boundary_gap']}, got {g['boundary_gap']}")
            e_gaps, g_gaps = e["kv_boundary_gaps"] or [], g["kv_boundary_gaps"] or []
            if (e["kv_boundary_gaps"] is None) != (g["kv_boundary_gaps"] is None) or len(e_gaps) != len(g_gaps) or \
                    not all(_close(a, b, GOLDEN_TOLERANCE["boundary_gap"], 1e-9) for a, b in zip(e_gaps, g_gaps)):
                problems.append(f"{part}[{e['layer']}].kv_boundary_gaps: expected {e_gaps}, got {g_gaps}")
    diff = np.abs(np.asarray(expected["logits"]) - np.asarray(got["logits"]))
    if diff.size != len(got["logits"]) or diff.max() > GOLDEN_TOLERANCE["logits"]:
        worst = int(diff.argmax())
        problems.append(f"logits: max abs difference {diff.max():.3g} at token id {worst} "
                        f"(tolerance {GOLDEN_TOLERANCE['logits']})")
    return problems


def _short(x, limit: int = 120) -> str:
    text = json.dumps(x)
    return text if len(text) <= limit else text[: limit - 3] + "..."


# ---------------------------------------------------------------- command line


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m reference.goldens", description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="only report differences; write nothing")
    parser.add_argument("--out", type=Path, default=GOLDEN_DIR, help=f"golden directory (default {GOLDEN_DIR})")
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
