"""The evaluation runner: tasks × lengths × samples × methods, one JSONL line each, resumable.

    asl eval --model smollm2 --tasks niah_single,passkey --lengths 512,1024 --samples 5 \
             --methods full,fastkv,asl --select-k 256 --out results/

Every method sees the same prompts (a sample's seed is its index), and a
sample's methods run on one `SharedPrefill` (reference/asl/sharing.py): the
layers they all start with are computed once, the rows are the same. Each
finished (task, length, sample, method) is appended to OUT/results.jsonl and
flushed at once, so a killed run loses at most the sample in flight, and a
rerun with the same settings skips what is done. OUT/settings.json pins the
settings; a rerun with other settings into the same folder is refused rather
than mixing results. `--kv-budget` applies to the snapkv method only, so
every other method is measured on its own; `--max-new-tokens` replaces the
tasks' published answer limits (those count the original models' tokens; a
chat model that restates the question, or one that splits digits, needs more).

Nothing here deletes a finished row. Every line of results.jsonl is checked
(`check_row`); a bad line anywhere but the end is an error naming its line and
nothing is changed. A last line without its newline is a run killed while
writing it: `read_results` skips it with a warning and leaves the file alone;
`run_eval` moves it to OUT/results.incomplete.jsonl (appended) and removes it
from results.jsonl by an atomic rewrite before resuming. Every argument is
checked before settings.json is written, and files written whole are written
atomically (`atomic_write`).

(Length: the runner together with its one file format: the results-row checks and the crash recovery of results.jsonl.)
"""

from __future__ import annotations

import json
import math
import os
import sys
from contextlib import nullcontext
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

from reference.asl.engine import as_engine
from reference.asl.generate import generate
from reference.asl.methods import NEVER_FIRED
from reference.asl.params import METHOD, METHODS, Params, check_params
from reference.asl.sharing import SharedPrefill
from reference.errors import OracleError
from reference.eval.tasks import (
    MAX_ANSWER_TOKENS,
    TASKS,
    length_tolerance,
    make_sample,
    score,
)
from reference.io.atomic import atomic_write
from reference.io.checkpoint import load_reference
from reference.oracle.trace import make_trace

RESULTS, SETTINGS = "results.jsonl", "settings.json"
INCOMPLETE = "results.incomplete.jsonl"  # half-written last lines that `asl eval` moved aside (appended)


def _key(row: dict) -> tuple:
    return row["task"], row["length"], row["sample"], row["method"]


# --- writing a file whole: a temporary file beside it, fsync, os.replace --------------------------

# --- one results row: the keys `run_eval` writes, their types and ranges ----------------------------

def _int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _unit(v) -> bool:
    return _num(v) and 0 <= v <= 1


ROW_FIELDS: dict[str, tuple[Callable[[object], bool], str]] = {  # key -> (test, what the value must be)
    "task": (lambda v: isinstance(v, str) and v in TASKS, "a known task name"),
    "length": (lambda v: _int(v) and v > 0, "an integer > 0"),
    "sample": (lambda v: _int(v) and v >= 0, "an integer >= 0"),
    "seed": (_int, "an integer"),
    "method": (lambda v: isinstance(v, str) and v in METHODS, f"one of {', '.join(METHODS)}"),
    "n_tokens": (lambda v: _int(v) and v > 0, "an integer > 0"),
    "depth": (lambda v: v is None or _unit(v), "null or a number in [0, 1]"),
    "prediction": (lambda v: isinstance(v, str), "a string"),
    "answers": (lambda v: isinstance(v, list) and all(isinstance(a, str) for a in v), "a list of strings"),
    "score": (_unit, "a number in [0, 1]"),
    "select_layer": (lambda v: v is None or _int(v) and v >= 0, "null or an integer >= 0"),
    "fired": (lambda v: isinstance(v, bool), "true or false"),
    "kept_tokens": (lambda v: v is None or _int(v) and v >= 0, "null or an integer >= 0"),
    "kv_bytes": (lambda v: _int(v) and v >= 0, "an integer >= 0"),
    "kv_fraction": (_unit, "a number in [0, 1]"),
    "prefill_flops_fraction": (lambda v: _num(v) and v >= 0, "a number >= 0"),
    "prefill_seconds": (lambda v: _num(v) and v >= 0, "a number >= 0"),
    "decode_seconds": (lambda v: _num(v) and v >= 0, "a number >= 0"),
}
OPTIONAL_FIELDS = {"fired"}  # rows written before it was added lack it


def _short(v) -> str:
    text = json.dumps(v)
    return text if len(text) <= 60 else text[:57] + "..."


def check_row(row) -> str | None:
    """What is wrong with one parsed results line, or None when it is a valid row (extra keys are ignored)."""
    if not isinstance(row, dict):
        kind = {list: "a list", str: "a string", bool: "a boolean", type(None): "null"}.get(type(row), "a number")
        return f"is {kind}, not a JSON object (one run's row)"
    missing = [k for k in ROW_FIELDS if k not in row and k not in OPTIONAL_FIELDS]
    if missing:
        return f"lacks {', '.join(missing)}"
    for key, (test, what) in ROW_FIELDS.items():
        if key in row and not test(row[key]):
            return f"{key} must be {what}, got {_short(row[key])}"
    return None


@dataclass
class _Scan:
    path: Path
    data: bytes  # the whole file
    rows: list[dict]
    line_of: list[int]  # the line number of each row
    partial: int | None  # the line number of a half-written last line, or None
    intact: int  # bytes before that line (len(data) when there is none)


def _bad(path: Path, n: int, what: str) -> OracleError:
    return OracleError(f"{path} line {n}: {what}; nothing was changed: fix or remove that line")


def _scan(path: Path) -> _Scan:
    """Read and check every line, changing nothing. A last line without its newline that is not JSON is a
    run killed while writing it (reported in `partial`); any other bad line is an error naming it."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise OracleError(f"{path}: cannot read ({e.strerror})") from None
    lines = data.split(b"\n")
    tail = lines.pop()  # b"" when the file ends with a newline
    scan = _Scan(path, data, [], [], None, len(data))
    seen: dict[tuple, int] = {}
    for n, raw in enumerate(lines + ([tail] if tail else []), 1):
        last = tail and n == len(lines) + 1
        try:
            row = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError:
            if last:
                scan.partial, scan.intact = n, len(data) - len(tail)
                break
            raise _bad(path, n, "not UTF-8 text") from None
        except json.JSONDecodeError as e:
            if last:
                scan.partial, scan.intact = n, len(data) - len(tail)
                break
            what = "empty line" if not raw.strip() else f"not valid JSON ({e.msg}, column {e.colno})"
            raise _bad(path, n, what) from None
        wrong = check_row(row)
        if wrong:
            raise _bad(path, n, wrong)
        if _key(row) in seen:
            task, length, sample, method = _key(row)
            raise _bad(path, n, f"repeats the run of line {seen[_key(row)]} (task {task}, length {length}, "
                                f"sample {sample}, method {method})")
        seen[_key(row)] = n
        scan.rows.append(row)
        scan.line_of.append(n)
    return scan


def _warn(message: str) -> None:
    print(f"asl: warning: {message}", file=sys.stderr)


def read_results(out: Path, warn: Callable[[str], None] | None = _warn) -> list[dict]:
    """The finished rows of OUT/results.jsonl, every line checked; the file is only read.

    A bad line is an OracleError naming it; a half-written last line (no newline at the end, not JSON: a run
    killed while writing it) is skipped, with a message to `warn`."""
    path = Path(out) / RESULTS
    if not path.is_file():
        return []
    scan = _scan(path)
    if scan.partial is not None and warn is not None:
        warn(f"{path} line {scan.partial}: half-written last line (a run killed while writing it) skipped; "
             f"the file is left as it is (`asl eval` with the same settings moves it aside and runs it again)")
    return scan.rows


def _resume_results(scan: _Scan) -> None:
    """Make results.jsonl end in a whole line before appending: a half-written last line goes to
    results.incomplete.jsonl (appended, never overwritten), then the file is rewritten atomically without it."""
    path = scan.path
    if scan.partial is not None:
        side = path.parent / INCOMPLETE
        with open(side, "ab") as f:
            f.write(scan.data[scan.intact:] + b"\n")
            f.flush()
            os.fsync(f.fileno())
        atomic_write(path, scan.data[:scan.intact])
        _warn(f"{path} line {scan.partial}: half-written last line (a run killed while writing it) moved to "
              f"{side}; its run is done again")
    elif scan.data and not scan.data.endswith(b"\n"):  # a whole row that lacks only its newline
        atomic_write(path, scan.data + b"\n")


def method_params(method: str, params: Params) -> Params:
    """The KV budget B belongs to the snapkv method here, so that every other method is measured alone."""
    return params if METHOD[method].needs_budget else replace(params, kv_budget=None)


def _check_lists(tasks, lengths, samples, methods, max_new_tokens) -> None:
    """The arguments that need no model: non-empty lists of known names without repeats, counts in range."""
    for flag, xs, hint in (("--tasks", tasks, f"one of {', '.join(TASKS)}, or 'all'"),
                           ("--lengths", lengths, "prompt lengths in tokens"),
                           ("--methods", methods, f"one of {', '.join(METHODS)}")):
        if not isinstance(xs, (list, tuple)) or not xs:
            raise OracleError(f"{flag} is empty: give a comma-separated list ({hint})")
        repeated = sorted({str(x) for x in xs if list(xs).count(x) > 1})
        if repeated:
            raise OracleError(f"{flag} names {', '.join(repeated)} more than once")
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise OracleError(f"unknown task(s) {', '.join(map(str, unknown))}; known: {', '.join(TASKS)}")
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise OracleError(f"method must be one of {', '.join(METHODS)}, got {', '.join(map(repr, unknown))}")
    bad = [n for n in lengths if not _int(n) or n < 1]
    if bad:
        raise OracleError(f"--lengths must be positive integers (tokens), got {', '.join(map(str, bad))}")
    if not _int(samples) or samples < 1:
        raise OracleError(f"--samples must be >= 1, got {samples}")
    if max_new_tokens is not None and (not _int(max_new_tokens) or max_new_tokens < 0):
        raise OracleError(f"--max-new-tokens must be >= 0, got {max_new_tokens}")


def _read_settings(out: Path, settings: dict) -> bool:
    """Whether OUT/settings.json exists (then it equals `settings`, or this is refused); changes nothing."""
    path = out / SETTINGS
    if out.exists() and not out.is_dir():
        raise OracleError(f"--out {out} is a file, not a folder")
    if not path.is_file():
        if (out / RESULTS).is_file() and (out / RESULTS).stat().st_size:
            raise OracleError(f"{out} holds {RESULTS} but no {SETTINGS}, so its rows' settings are unknown; "
                              "choose another --out, or delete the folder to start over")
        return False
    try:
        old = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise OracleError(f"{path} cannot be read as JSON ({e}); choose another --out, or delete the folder "
                          "to start over") from None
    if not isinstance(old, dict):
        raise OracleError(f"{path} is not a JSON object; choose another --out, or delete the folder to start over")
    if old != settings:
        differ = sorted(k for k in set(old) | set(settings) if old.get(k) != settings.get(k))
        raise OracleError(f"{out} holds results of other settings ({', '.join(differ)} differ); "
                          "choose another --out, or delete the folder to start over")
    return True


def run_eval(model: str, tasks: list[str], lengths: list[int], samples: int, methods: list[str], params: Params,
             out: Path, backend: str | None = None, max_new_tokens: int | None = None, progress: bool = True,
             load=None, share: bool = True) -> Path:
    """Run (or resume) an evaluation into `out`; returns the results file.

    Everything is checked before anything is written: the arguments, settings.json against these settings,
    and every line of results.jsonl. With `share` (the default) a sample's methods run on one
    `SharedPrefill`: the layers they share are computed once, the rows are the same. A row's prefill_seconds
    stays the method's own prefill time: the time it spent plus the time the layers it was served took when
    they ran (so `asl report`'s time vs full means what it meant without sharing)."""
    from tqdm import tqdm


    out = Path(out)
    _check_lists(tasks, lengths, samples, methods, max_new_tokens)
    if load is None:  # the reference; the CLI passes its loader, which also builds the port (--backend)
        if backend is not None:
            raise OracleError(f"backend {backend!r} needs a loader that builds the port: run it through `asl eval`")
        load = load_reference
    model_dir, weights, tok, eos, engine = load(model, "float32", backend)
    if tok is None:
        raise OracleError(f"{model_dir}: no tokenizer.json; the tasks need the model's tokenizer")
    cfg = weights.config
    for method in methods:
        check_params(method, method_params(method, params), cfg.num_hidden_layers)
    answer = max(MAX_ANSWER_TOKENS[t] for t in tasks) if max_new_tokens is None else max_new_tokens
    for length in lengths:
        need = length + length_tolerance(length) + answer  # the longest prompt a task may build, plus its answer
        if need > cfg.max_position_embeddings:
            raise OracleError(f"length {length} (+ answer) exceeds the model's max_position_embeddings "
                              f"({cfg.max_position_embeddings}); use shorter --lengths")
    for task in tasks:  # every (task, length) can be built: refuse before any work, not half-way
        for length in lengths:
            make_sample(task, tok, length, seed=0)
    settings = {"model": model, "tasks": tasks, "lengths": lengths, "samples": samples, "methods": methods,
                "params": params.to_dict("pyramidinfer" if "pyramidinfer" in methods else None), "backend": backend,
                "max_new_tokens": max_new_tokens}
    pinned = _read_settings(out, settings)
    scan = _scan(out / RESULTS) if (out / RESULTS).is_file() else None
    planned = {(t, n, i, m) for t in tasks for n in lengths for i in range(samples) for m in methods}
    for row, n in zip(scan.rows if scan else [], scan.line_of if scan else []):
        if _key(row) not in planned:
            raise _bad(out / RESULTS, n, "is a run outside these settings (task, length, sample or method)")
    # checked: from here on files are written
    try:
        out.mkdir(parents=True, exist_ok=True)
        if not pinned:
            atomic_write(out / SETTINGS, json.dumps(settings, indent=1) + "\n")
        if scan is not None:
            _resume_results(scan)
    except OSError as e:
        raise OracleError(f"{out}: cannot write ({e.strerror})") from None
    done = {_key(r) for r in scan.rows} if scan else set()
    todo = [(t, n, i) for t in tasks for n in lengths for i in range(samples)]
    bar = tqdm(total=len(todo) * len(methods), initial=len(done), desc="eval", unit="run", disable=not progress,
               file=sys.stderr)
    shared = SharedPrefill(as_engine(engine or weights)) if share else None
    run_on = shared if shared is not None else engine or weights
    with open(out / RESULTS, "a") as results:
        for task, length, i in todo:
            pending = [m for m in methods if (task, length, i, m) not in done]
            if not pending:
                continue
            sample = make_sample(task, tok, length, seed=i)  # the same prompt for every method
            limit = sample.max_answer_tokens if max_new_tokens is None else max_new_tokens
            with shared.sharing(sample.ids) if shared is not None else nullcontext():  # shared layers: once
                for method in pending:
                    reused = shared.reused_seconds if shared is not None else 0.0
                    gen = generate(run_on, sample.ids, limit, eos, method=method,
                                   params=method_params(method, params))
                    if shared is not None:  # the method's own prefill time: with the layers it was served
                        gen.prefill_seconds += shared.reused_seconds - reused
                    trace, _ = make_trace(gen, model_name=model, model_sha256="", config=cfg, dtype="float32")
                    prediction = tok.decode(gen.generated_ids)
                    row = {"task": task, "length": length, "sample": i, "seed": sample.seed, "method": method,
                           "n_tokens": len(sample.ids), "depth": sample.depth, "prediction": prediction,
                           "answers": sample.answers, "score": score(task, prediction, sample.answers),
                           "select_layer": trace["select_layer"],
                           # False where ASL's criterion never fired (two-pass ASL still reports L-1, its fallback)
                           "fired": trace["select_layer"] is not None and not any(n.startswith(NEVER_FIRED)
                                                                                   for n in trace["notes"]),
                           "kept_tokens": None if trace["kept_positions"] is None else len(trace["kept_positions"]),
                           "kv_bytes": trace["totals"]["kv_bytes"], "kv_fraction": trace["totals"]["kv_fraction"],
                           "prefill_flops_fraction":
                               trace["totals"]["prefill_flops"] / trace["totals"]["prefill_flops_full"],
                           "prefill_seconds": gen.prefill_seconds, "decode_seconds": gen.decode_seconds}
                    wrong = check_row(row)
                    if wrong:  # a row that a rerun would refuse is not written
                        raise OracleError(f"task {task}, length {length}, sample {i}, method {method}: the run's row "
                                          f"{wrong}; not written")
                    results.write(json.dumps(row) + "\n")
                    results.flush()
                    os.fsync(results.fileno())
                    bar.update(1)
    bar.close()
    return out / RESULTS
