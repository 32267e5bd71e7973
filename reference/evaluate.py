"""The evaluation runner: tasks × lengths × samples × methods, one JSONL line each, resumable.

    asl eval --model smollm2 --tasks niah_single,passkey --lengths 512,1024 --samples 5 \
             --methods full,fastkv,asl --select-k 256 --out results/

Every method sees the same prompts (a sample's seed is its index). Each
finished (task, length, sample, method) is appended to OUT/results.jsonl and
flushed at once, so a killed run loses at most the sample in flight, and a
rerun with the same settings skips what is done. OUT/settings.json pins the
settings; a rerun with other settings into the same folder is refused rather
than mixing results. `--kv-budget` applies to the snapkv method only, so
every other method is measured on its own; `--max-new-tokens` replaces the
tasks' published answer limits (those count the original models' tokens; a
chat model that restates the question, or one that splits digits, needs more).
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import replace
from pathlib import Path

from reference.errors import OracleError
from reference.methods import NEVER_FIRED
from reference.params import Params, check_params

RESULTS, SETTINGS = "results.jsonl", "settings.json"


def _key(row: dict) -> tuple:
    return row["task"], row["length"], row["sample"], row["method"]


def read_results(out: Path) -> list[dict]:
    """Finished rows; a last line cut short by a killed run is dropped (and removed from the file)."""
    path = out / RESULTS
    if not path.is_file():
        return []
    lines = path.read_text().splitlines()
    rows = []
    for line in lines:
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            break  # only the line in flight can be incomplete
    if len(rows) != len(lines):
        path.write_text("".join(line + "\n" for line in lines[: len(rows)]))
    return rows


def method_params(method: str, params: Params) -> Params:
    """The KV budget B belongs to the snapkv method here, so that every other method is measured alone."""
    return params if method == "snapkv" else replace(params, kv_budget=None)


def _check_settings(out: Path, settings: dict) -> None:
    path = out / SETTINGS
    if path.is_file():
        old = json.loads(path.read_text())
        if old != settings:
            differ = sorted(k for k in set(old) | set(settings) if old.get(k) != settings.get(k))
            raise OracleError(f"{out} holds results of other settings ({', '.join(differ)} differ); "
                              "choose another --out, or delete the folder to start over")
    else:
        out.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(settings, indent=1) + "\n")


def run_eval(model: str, tasks: list[str], lengths: list[int], samples: int, methods: list[str], params: Params,
             out: Path, backend: str | None = None, max_new_tokens: int | None = None, progress: bool = True) -> Path:
    """Run (or resume) an evaluation into `out`; returns the results file."""
    from tqdm import tqdm

    from reference.cli import load_model
    from reference.generate import generate
    from reference.tasks import MAX_ANSWER_TOKENS, TASKS, make_sample, score
    from reference.trace import make_trace

    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise OracleError(f"unknown task(s) {', '.join(unknown)}; known: {', '.join(TASKS)}")
    if samples < 1:
        raise OracleError(f"--samples must be ≥ 1, got {samples}")
    model_dir, weights, tok, eos, engine = load_model(model, "float32", backend)
    if tok is None:
        raise OracleError(f"{model_dir}: no tokenizer.json; the tasks need the model's tokenizer")
    cfg = weights.config
    for method in methods:
        check_params(method, method_params(method, params), cfg.num_hidden_layers)
    for length in lengths:
        need = length + max(MAX_ANSWER_TOKENS[t] for t in tasks) + 64
        if need > cfg.max_position_embeddings:
            raise OracleError(f"length {length} (+ answer) exceeds the model's max_position_embeddings "
                              f"({cfg.max_position_embeddings}); use shorter --lengths")
    for task in tasks:  # every (task, length) can be built: refuse before any work, not half-way
        for length in lengths:
            make_sample(task, tok, length, seed=0)
    settings = {"model": model, "tasks": tasks, "lengths": lengths, "samples": samples, "methods": methods,
                "params": params.to_dict(), "backend": backend, "max_new_tokens": max_new_tokens}
    _check_settings(out, settings)
    done = {_key(r) for r in read_results(out)}
    todo = [(t, n, i) for t in tasks for n in lengths for i in range(samples)]
    bar = tqdm(total=len(todo) * len(methods), initial=len(done), desc="eval", unit="run", disable=not progress,
               file=sys.stderr)
    with open(out / RESULTS, "a") as results:
        for task, length, i in todo:
            pending = [m for m in methods if (task, length, i, m) not in done]
            if not pending:
                continue
            sample = make_sample(task, tok, length, seed=i)  # the same prompt for every method
            limit = sample.max_answer_tokens if max_new_tokens is None else max_new_tokens
            for method in pending:
                gen = generate(weights, sample.ids, limit, eos, method=method, params=method_params(method, params),
                               engine=engine)
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
                       "prefill_flops_fraction": trace["totals"]["prefill_flops"] / trace["totals"]["prefill_flops_full"],
                       "prefill_seconds": gen.prefill_seconds, "decode_seconds": gen.decode_seconds}
                results.write(json.dumps(row) + "\n")
                results.flush()
                os.fsync(results.fileno())
                bar.update(1)
    bar.close()
    return out / RESULTS
