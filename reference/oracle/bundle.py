"""Golden bundles for other implementations, and the checker that compares their traces with them.

A bundle is a directory readable from any language:

    manifest.json               {"bundle_version", "cases": [names], "model": {...}, "tolerance_policy"}
    CASE.inputs.json            the inputs: model (name, sha256), prompt_ids, method, params, max_new_tokens
    CASE.trace.json (+ .npz)    the expected trace (docs/trace.md; its JSON Schema is reference/oracle/trace_schema.json)

A candidate is a directory holding CASE.trace.json (+ .npz) for each case,
named as the bundle names them. `check` judges each case with the tolerance
policy of reference/oracle/conformance.py (docs/conformance.md).

(Length: one format: writing bundles, reading their manifests and inputs safely, and the checker's per-case results.)
"""

from __future__ import annotations

import json
import sys
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

from reference.asl.engine import ReferenceEngine
from reference.asl.generate import generate
from reference.asl.params import METHODS, SMOLLM2_PARAMS, Params, check_params
from reference.asl.sharing import SharedPrefill
from reference.errors import OracleError
from reference.io.atomic import atomic_write
from reference.io.checkpoint import eos_token_ids, load_weights
from reference.io.fetch import TINY_ALIASES, resolve_model
from reference.model.config import read_json
from reference.oracle.conformance import (
    FAIL,
    NOT_JUDGED,
    TOLERANCES,
    compare,
    record_from_trace,
    unchecked,
)
from reference.oracle.goldens import Case
from reference.oracle.goldens import default_cases as tiny_cases
from reference.oracle.trace import (
    DTYPE_INFERRED,
    SCHEMA_VERSION,
    UPGRADE,
    load_trace,
    make_trace,
    model_sha256,
    save_trace,
    validate_trace,
)
from reference.oracle.verdicts import NEAR, NOTE, PASS, Finding

BUNDLE_VERSION = SCHEMA_VERSION  # a bundle changes with its traces only (2: PyramidInfer's fields; 3: recomputed_at)


def default_cases(model: str):
    """The default case matrix for a model: every method, the contract's edge cases, a few prompt lengths."""

    if model in TINY_ALIASES:
        return [c for c in tiny_cases() if c.model == model]
    p = {k: v for k, v in SMOLLM2_PARAMS.to_dict().items() if k != "kv_budget"}
    cases = [Case(f"{m}-{n}", model, m, n, dict(p), seed=0, max_new_tokens=8)
             for n in (300, 1000) for m in ("full", "fastkv", "gemfilter", "asl", "asl-2pass")]
    cases += [
        Case("snapkv-1000", model, "snapkv", 1000, dict(p, kv_budget=256), max_new_tokens=8),
        Case("asl-snapkv-1000", model, "asl", 1000, dict(p, kv_budget=256), max_new_tokens=8),
        Case("edge-n-le-w", model, "asl", 20, dict(p), max_new_tokens=4),
        Case("edge-n-le-k", model, "asl", 200, dict(p), max_new_tokens=4),
        Case("edge-tau-above-1", model, "asl", 300, dict(p, tau=1.5), max_new_tokens=4),
        Case("edge-never-fires", model, "asl", 300, dict(p, tau=1e-9), max_new_tokens=4),
        Case("pyramidinfer-1000", model, "pyramidinfer", 1000, {}, max_new_tokens=8),  # the authors' config
    ]
    return cases


CASES_SCHEMA = {  # what a --cases file may hold; each value's type is checked here, its range by case_params
    "type": "array",
    "items": {
        "type": "object",
        "additionalProperties": False,
        "required": ["name", "method", "n_tokens"],
        "properties": {
            "name": {"type": "string", "description": "a plain file name (letters, digits, - _ . +)"},
            "method": {"type": "string", "description": "one of the methods (asl run --help)"},
            "n_tokens": {"type": "integer", "description": "an integer (the prompt length)"},
            "params": {"type": "object", "description": "an object of parameter values (docs/semantics.md)"},
            "seed": {"type": "integer", "description": "an integer"},
            "max_new_tokens": {"type": "integer", "description": "an integer"},
        },
    },
}


def _schema_error(doc, schema) -> str | None:
    """The first way `doc` breaks `schema`, as "$[2].n_tokens: 12.9 is not of type 'integer' (expected: ...)"."""
    from jsonschema import Draft202012Validator
    from jsonschema.exceptions import best_match

    error = best_match(Draft202012Validator(schema).iter_errors(doc))
    if error is None:
        return None
    expected = f" (expected: {error.schema['description']})" if "description" in error.schema else ""
    return f"{error.json_path}: {error.message}{expected}"


def read_cases(path: Path, model: str):
    """Cases from a JSON file: [{"name", "method", "n_tokens", "params": {...}, "seed", "max_new_tokens"}, ...].
    A value of the wrong type is refused with its key (12.9 tokens, a seed of true, "4" new tokens), never
    converted; ranges and parameters are checked by case_params as for every other case."""

    raw = _read_json(Path(path), "--cases takes a JSON list of cases with name, method, n_tokens") \
        if Path(path).exists() else None
    if raw is None:
        raise OracleError(f"--cases: {path} not found")
    wrong = _schema_error(raw, CASES_SCHEMA)
    if wrong is not None:
        raise OracleError(f"--cases: {path} must be a JSON list of cases with name, method, n_tokens (and optional "
                          f"params, seed, max_new_tokens): {wrong}")
    cases = [Case(c["name"], model, c["method"], c["n_tokens"], dict(c.get("params", {})), c.get("seed", 0),
                  c.get("max_new_tokens", 8)) for c in raw]
    names = [c.name for c in cases]
    bad = [n for n in names if not plain_case_name(n)]
    if bad:
        raise OracleError(f"--cases: {path}: case name {bad[0]!r} is not a plain file name (letters, digits, - _ . +); "
                          "the case's files are written inside --out under that name")
    if len(set(names)) != len(names):
        raise OracleError(f"--cases: {path}: case name {next(n for n in names if names.count(n) > 1)!r} is used "
                          "twice; each case needs its own name (its files would overwrite each other)")
    return cases


def write_bundle(model: str, cases, out: Path, dtype: str = "float64", progress: bool = True, prompt=None,
                 share: bool = True) -> Path:
    """Run every case on the reference and write the bundle into `out`. Cases with the same prompt run one after
    another on one `SharedPrefill` (with `share`): the layers they share are computed once, the traces are the same."""
    from tqdm import tqdm


    out = Path(out)
    if out.exists() and not out.is_dir():
        raise OracleError(f"--out {out} is a file; a bundle is a directory: name a new or existing directory")
    model_dir = resolve_model(model)
    weights = load_weights(model_dir, dtype)
    params_of = {case.name: case_params(case, weights.config) for case in cases}  # every case, before any work
    sha = model_sha256(model_dir)
    eos = eos_token_ids(model_dir, weights.config)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OracleError(f"--out {out}: cannot create the bundle directory ({e.strerror or e})") from None
    by_prompt: dict[tuple, list] = {}  # prompt -> its cases, in the order of the first case of each prompt
    for case in cases:
        ids = prompt_for(case, model_dir, prompt)
        by_prompt.setdefault(tuple(int(i) for i in ids), []).append(case)
    shared = SharedPrefill(ReferenceEngine(weights)) if share else None
    run_on = shared if shared is not None else weights
    bar = tqdm(total=len(cases), desc="golden bundle", unit="case", disable=not progress, file=sys.stderr)
    for ids, group in by_prompt.items():
        with shared.sharing(ids) if shared is not None else nullcontext():
            for case in group:
                params = params_of[case.name]
                gen = generate(run_on, list(ids), case.max_new_tokens, eos, method=case.method, params=params)
                trace, arrays = make_trace(gen, model_name=model, model_sha256=sha, config=weights.config, dtype=dtype)
                save_trace(trace, arrays, out / f"{case.name}.trace.json", with_arrays=True)
                inputs = {"case": case.name, "model": {"name": model, "sha256": sha}, "prompt_ids": list(ids),
                          "method": case.method, "params": params.to_dict(case.method),
                          "max_new_tokens": case.max_new_tokens, "eos_token_ids": list(eos), "dtype": dtype}
                atomic_write(out / f"{case.name}.inputs.json", json.dumps(inputs, indent=1) + "\n")
                bar.update(1)
    bar.close()
    manifest = {"bundle_version": BUNDLE_VERSION, "cases": [c.name for c in cases],
                "model": {"name": model, "sha256": sha}, "dtype": dtype,
                "tolerance_policy": "docs/conformance.md (reference/oracle/conformance.py)"}
    atomic_write(out / "manifest.json", json.dumps(manifest, indent=1) + "\n")  # last: a bundle is whole or absent
    return out


def case_params(case, cfg) -> Params:
    """A case's resolved parameters, refused (naming the case) when unknown, out of range, or too long."""

    def bad(why: str) -> OracleError:
        return OracleError(f"case {case.name!r}: {why}")

    known = set(Params.__dataclass_fields__)
    unknown = sorted(set(case.params) - known)
    if unknown:
        raise bad(f"unknown parameter(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    params = case.full_params() if case.model.startswith("tiny-") else Params(**case.params)
    try:
        check_params(case.method, params, cfg.num_hidden_layers)
    except OracleError as e:
        raise bad(str(e)) from None
    if not 1 <= case.n_tokens <= cfg.max_position_embeddings - max(case.max_new_tokens, 0):
        raise bad(f"n_tokens must be in [1, {cfg.max_position_embeddings - max(case.max_new_tokens, 0)}] (the model's "
                  f"context less max_new_tokens), got {case.n_tokens}")
    if case.seed < 0 or case.max_new_tokens < 0:
        raise bad(f"seed and max_new_tokens must be ≥ 0, got {case.seed} and {case.max_new_tokens}")
    return params


def prompt_for(case, model_dir, prompt=None) -> list[int]:
    """Tiny models: seeded random ids; real models: prompt(model_dir, n_tokens, seed), e.g.
    `reference.eval.tasks.passkey_ids` (the CLI's choice: the passkey haystack in the chat template)."""
    if case.model.startswith("tiny-"):
        return case.prompt_ids()
    if prompt is None:
        raise OracleError(f"case {case.name!r} runs a real model: write_bundle needs prompt=(model_dir, n_tokens, seed) "
                          "-> ids, e.g. reference.eval.tasks.passkey_ids")
    return prompt(model_dir, case.n_tokens, case.seed)


def _read_json(path: Path, what: str):
    """The project's one reader of untrusted JSON (reference.model.config.read_json), with "missing" said plainly."""
    if not path.exists():
        raise OracleError(f"{path}: missing; {what}")
    return read_json(path, what)


def plain_case_name(name) -> bool:
    """A case name is a plain file name: it can never point outside its directory."""
    return (isinstance(name, str) and 0 < len(name) <= 200 and name not in (".", "..")
            and all(c.isalnum() or c in "-_.+" for c in name))


def read_manifest(bundle: Path) -> dict:
    path = Path(bundle) / "manifest.json"
    if not path.is_file():
        raise OracleError(f"{bundle}: no manifest.json; is this a bundle written by `asl golden`?")
    manifest = _read_json(path, "rewrite the bundle with `asl golden`")
    version = manifest.get("bundle_version") if isinstance(manifest, dict) else None
    if version in UPGRADE:  # a bundle's version is its traces' schema_version
        raise OracleError(f"{path}: bundle_version {version}, this reader's is {BUNDLE_VERSION}: its traces are "
                          f"schema_version {version} ({UPGRADE[version]}); rewrite the bundle with `asl golden` of this "
                          "asl-oracle")
    if version != BUNDLE_VERSION:
        raise OracleError(f"{path}: bundle_version must be {BUNDLE_VERSION}; rewrite the bundle with this asl-oracle")
    cases = manifest.get("cases")
    if not isinstance(cases, list):
        raise OracleError(f"{path}: 'cases' must be a list of case names")
    bad = [c for c in cases if not plain_case_name(c)]
    if bad:
        raise OracleError(f"{path}: case name {bad[0]!r} is not a plain file name (letters, digits, - _ . +); "
                          "case files must stay inside the bundle")
    if len(set(cases)) != len(cases):
        dup = next(c for c in cases if cases.count(c) > 1)
        raise OracleError(f"{path}: case {dup!r} is listed twice; case names must be unique")
    return manifest


def read_inputs(bundle: Path, case: str) -> dict:
    if not plain_case_name(case):
        raise OracleError(f"case name {case!r} is not a plain file name")
    inputs = _read_json(Path(bundle) / f"{case}.inputs.json", "every case of the manifest needs its inputs")
    if not isinstance(inputs, dict) or not isinstance(inputs.get("method"), str):
        raise OracleError(f"{Path(bundle) / f'{case}.inputs.json'}: expected a JSON object with the case's inputs "
                          "(prompt_ids, method, params, ...)")
    return inputs


# ---------------------------------------------------------------- checking


INCOMPLETE = "INCOMPLETE"  # decisions agree, but a check could not run for want of the candidate's arrays
NOT_CHECKED = "NOT-CHECKED"  # left out by a method filter: neither passed nor failed
ERROR = "ERROR"  # missing or malformed candidate
PASSING = (PASS, NEAR)


@dataclass
class CaseResult:
    case: str
    verdict: str  # PASS, PASS-within-tolerance, FAIL, INCOMPLETE, NOT-CHECKED or ERROR
    findings: list = field(default_factory=list)  # FAIL / near-tie findings, then notes (verdict "NOTE")
    error: str | None = None  # ERROR: what is wrong; NOT-CHECKED: why it was left out
    unchecked: list = field(default_factory=list)  # what could not be checked (no arrays)
    tolerance: str | None = None  # which row of the tolerance table judged it, and why

    @property
    def notes(self) -> list:
        return [f for f in self.findings if f.verdict == "NOTE"]

    def line(self) -> str:
        if self.error:
            return f"{self.case:<34} {self.verdict}  {self.error}"
        text = f"{self.case:<34} {self.verdict}"
        decisive = [f for f in self.findings if f.verdict != "NOTE"]
        if decisive:
            f = next((x for x in decisive if x.verdict == "FAIL"), decisive[0])
            where = ", ".join(x for x in (f"layer {f.layer}" if f.layer is not None else "",
                                          f"position {f.position}" if f.position is not None else "",
                                          f"step {f.step}" if f.step is not None else "") if x)
            margin = "" if f.margin is None else f" (margin {f.margin:.3g})"
            text += f"  {f.field}{' at ' + where if where else ''}: {f.message}{margin}"
        if self.tolerance:
            text += f"\n{'':<34}   tolerance: {self.tolerance}"
        if self.unchecked:
            why = ("decisions only, as asked" if self.verdict != INCOMPLETE else
                   "the candidate has no arrays (.npz); supply them, or pass --decisions-only to accept this")
            text += f"\n{'':<34}   not checked ({why}): " + "; ".join(self.unchecked)
        for n in self.notes:
            text += f"\n{'':<34}   note: {n.field}: {n.message}"
        return text

    def to_dict(self) -> dict:
        return {"case": self.case, "verdict": self.verdict, "error": self.error, "unchecked": self.unchecked,
                "tolerance": self.tolerance, "findings": [vars(f) for f in self.findings]}


def check_trace(expected_path: Path, candidate, dtype: str | None = None, decisions_only: bool = False) -> CaseResult:
    """Judge one candidate (a trace path, or a (trace, arrays) pair) against one expected trace,
    with the tolerances of `dtype` (default: the less precise of the two traces' dtypes).

    A candidate without arrays is INCOMPLETE (never a PASS) unless decisions_only: then its decisions
    are judged and the result lists what could not be checked."""

    case = expected_path.name.removesuffix(".trace.json")
    expected, expected_arrays = load_trace(expected_path)
    try:
        if isinstance(candidate, (str, Path)):
            got, got_arrays = load_trace(candidate)
        else:
            got, got_arrays = candidate if isinstance(candidate, tuple) else (candidate, {})
            validate_trace(got, got_arrays or None, f"candidate trace of {case}")
    except OracleError as e:
        return CaseResult(case, ERROR, error=str(e))
    problems = [k for k in ("prompt_ids", "method", "params") if got.get(k) != expected.get(k)]
    if got["model"]["vocab_size"] != expected["model"]["vocab_size"]:
        problems.append("model.vocab_size")
    if problems:
        return CaseResult(case, ERROR, error=f"the candidate ran other inputs ({', '.join(problems)} differ from the "
                                             f"bundle's {case}.inputs.json)")
    looser = max(expected["dtype"], got["dtype"], key=["float64", "float32", "float16"].index)
    tol = TOLERANCES[dtype or looser]  # the less precise side sets the tolerance
    row = dtype or looser
    why = ("--dtype" if dtype else "the candidate's declared dtype, the less precise side" if got["dtype"] == looser
           and got["dtype"] != expected["dtype"] else "both runs' dtype" if got["dtype"] == expected["dtype"]
           else "the bundle's dtype, the less precise side")
    stated = (f"{row} (logits {tol.logits:g}, decoding steps' logits {tol.step_logits:g}, scores {tol.score:g} of "
              f"the largest, criterion margin {tol.margin:g}; chosen by {why})")
    got_record = record_from_trace(got, got_arrays)
    verdict, findings = compare(record_from_trace(expected, expected_arrays), got_record, tol)
    findings += _dtype_notes(got, got_arrays)
    missing = unchecked(got_record) + [f"{f.field} ({f.message.removeprefix(NOT_JUDGED).strip()})" for f in findings
                                        if f.verdict == NOTE and f.message.startswith(NOT_JUDGED)]
    if missing and verdict != FAIL and not decisions_only:
        verdict = INCOMPLETE
    return CaseResult(case, verdict, findings, unchecked=missing, tolerance=stated)


def _dtype_notes(got: dict, arrays: dict) -> list:
    """A candidate whose arrays are of another precision than it declares, or whose dtype the kit inferred."""
    notes = []
    declared = got["dtype"]
    computed = {str(a.dtype) for name, a in arrays.items() if a.dtype.kind == "f"}
    if computed and computed != {declared}:
        notes.append(Finding(NOTE, "dtype", f"the candidate declares {declared}, but its arrays are "
                             f"{', '.join(sorted(computed))}: it was judged with {declared}'s tolerances; declare "
                             "the precision it computed in"))
    for n in got["notes"]:
        if n.startswith(DTYPE_INFERRED):
            notes.append(Finding(NOTE, "dtype", f"{n}: the tolerances follow the declared dtype, so state it"))
    return notes


def check(candidate_dir: Path, bundle: Path, dtype: str | None = None, methods=None,
          decisions_only: bool = False) -> list[CaseResult]:
    """Every case of the bundle against the candidate directory's trace of the same name.

    methods: judge only the cases of these methods; the others are NOT-CHECKED (listed, not passed)."""

    manifest = read_manifest(bundle)
    unknown = sorted(set(methods or ()) - set(METHODS))
    if unknown:
        raise OracleError(f"--methods: unknown method(s) {', '.join(unknown)}; choose from {', '.join(METHODS)}")
    results = []
    for case in manifest["cases"]:
        method = read_inputs(bundle, case).get("method")
        if methods and method not in methods:
            results.append(CaseResult(case, NOT_CHECKED, error=f"method {method} is not among --methods "
                                                                f"{','.join(methods)}"))
            continue
        candidate = Path(candidate_dir) / f"{case}.trace.json"
        if not candidate.is_file():
            results.append(CaseResult(case, ERROR, error=f"missing: {candidate} (name it as the bundle does)"))
            continue
        results.append(check_trace(Path(bundle) / f"{case}.trace.json", candidate, dtype, decisions_only))
    if methods and all(r.verdict == NOT_CHECKED for r in results):
        raise OracleError(f"--methods {','.join(methods)}: no case of {bundle} uses these methods; nothing to check")
    return results
