"""Judge NVIDIA kvpress's SnapKVPress with the oracle: bundles, candidates by the kit, verdicts, planted bugs.

    python examples/kvpress/kvpress_check.py --work out/kvpress          # what `make check-kvpress` runs

1. writes the oracle's bundles (`write_bundle`, float64) of the cases in `cases.json`: SnapKV under the
   kvpress-compatible profile (avg pooling, B > w, N > w) on tiny-llama, tiny-qwen2, tiny-qwen3 and SmolLM2;
2. runs each case through kvpress: `SnapKVPress(compression_ratio=1 - (B + 0.5) / N, window_size=w,
   kernel_size=s)` on transformers (float32; the `float64` class in float64), greedy decoding as kvpress's
   pipeline does it; `reference.oracle.hf_recorder` reads back which positions each layer and KV head kept,
   and the scores the press chose them by;
3. writes each candidate with the implementer's kit (`reference.oracle.candidate`) and judges it as
   `asl check CAND --golden BUNDLE --methods snapkv` does (`reference.oracle.bundle.check`);
4. runs the same adapter with each planted bug (the window not force-kept; average pooling without zero
   padding; on tiny-qwen3, the window queries recomputed without Qwen3's q_norm), which must FAIL on the
   field named in `expected.json` (`_plants`);
5. prints the verdict table and exits 0 only when every verdict is the documented one (`expected.json`,
   docs/integrations.md) and every planted bug was caught. A run that could not happen is NOT RUN, never a pass.

    python examples/kvpress/kvpress_check.py --stable-topk                # SPEC's tie rule patched in: all PASS
    python examples/kvpress/kvpress_check.py --cases examples/kvpress/sweep.json --expected examples/kvpress/sweep-expected.json

--stable-topk replaces the one selection kvpress makes (`scores.topk(n_kept, dim=-1).indices` in
`ScorerPress.compress`) by a stable sort, earlier positions first among equal scores (SPEC's tie rule); it
runs every float32 case of --cases, no float64 run and no planted bug, and its rule replaces --expected:
every verdict must be PASS. `_plants_on` in a cases file names the model every planted bug runs on, or one
per bug ({bug: model}); a --cases file without it runs no planted bug. --work defaults to
out/kvpress for cases.json and to out/kvpress-STEM for any other cases file, so that the bundles of one
never overwrite the other's (they are rewritten whenever a model's cases, or the bundle version, differ from the
stamp).

Needs its own environment (requirements.txt: kvpress pins transformers<5.3); `make check-kvpress` makes it.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from kvpress import SnapKVPress
from kvpress.presses import snapkv_press
from transformers import AutoModelForCausalLM, DynamicCache
from transformers.utils import logging as hf_logging

from reference.errors import OracleError
from reference.eval.tasks import passkey_ids
from reference.oracle.bundle import BUNDLE_VERSION, Case, check, write_bundle
from reference.oracle.candidate import (
    LayerDecision,
    build_candidate,
    model_shape,
    read_cases,
    write_candidate,
)
from reference.oracle.hf_recorder import CacheRecorder, ScoreRecorder, shadow

HERE = Path(__file__).resolve().parent
DTYPES = {"float32": torch.float32, "float64": torch.float64}
PLANTS = {
    "window-not-force-kept": "the window's keys get score 0 instead of max + 1 (F.pad value), so nothing keeps them",
    "pooling-without-zero-padding": "avg_pool1d with count_include_pad=False: edge windows divide by the in-range count",
    "window-queries-without-q-norm": "SnapKV's window queries recomputed without Qwen3's q_norm (q_proj, heads, "
                                     "rotary; the suspected cause of kvpress issue #134): a no-op on models without q_norm",
}


# ---------------------------------------------------------------- kvpress on one case


def compression_ratio(N: int, B: int) -> float:
    """kvpress keeps int(N · (1 - ratio)) rows; 1 - B/N rounds to B - 1 for some N, 1 - (B + 0.5)/N gives B."""
    return 1.0 - (B + 0.5) / N


class _StableTopk(torch.Tensor):
    """kvpress's scores, whose `topk` is a stable sort: among equal scores the earlier position first (SPEC)."""

    def topk(self, n_kept, dim=-1, *args, **kwargs):
        if dim != -1 or args or kwargs:
            raise OracleError(f"--stable-topk: kvpress called topk({n_kept}, dim={dim}, {args}, {kwargs}); "
                              "the patch knows only scores.topk(n_kept, dim=-1)")
        scores = self.as_subclass(torch.Tensor)
        indices = torch.sort(-scores, stable=True).indices[..., :n_kept]  # the one-line replacement of topk
        return argparse.Namespace(values=scores.gather(-1, indices), indices=indices)


@contextlib.contextmanager
def stable_topk(press, on: bool):
    """For the duration of a run, the scores `press.score` returns select by a stable sort, not `topk`.

    kvpress 0.5.5 selects in one place, `ScorerPress.compress`: `indices = scores.topk(n_kept, dim=-1).indices`
    on the tensor `score` returned. Only that tensor's `topk` changes (this instance's `score` shadowed, as
    `ScoreRecorder` does); kvpress's code, torch's `topk` and every other tensor stay as they are."""
    if not on:
        yield
        return
    original = press.score
    restore = shadow(press, "score", lambda *a, **k: original(*a, **k).as_subclass(_StableTopk))
    try:
        yield
    finally:
        restore()


def _queries_without_q_norm(module, hidden_states):
    """kvpress's `get_prerope_query_states` without its Qwen3/Gemma3 branch: q_proj split into heads, no q_norm."""
    if not hasattr(module, "q_norm"):  # the plant would change nothing: never a MISSED that means nothing
        raise OracleError(f"--plant window-queries-without-q-norm: {type(module).__name__} has no q_norm; "
                          "plant it on a Qwen3 model (_plants_on)")
    bsz, q_len, _ = hidden_states.shape
    heads = module.q_proj(hidden_states).view(bsz, q_len, module.config.num_attention_heads, module.head_dim)
    return heads.transpose(1, 2)


@contextlib.contextmanager
def planted(bug: str | None):
    """Plant one bug in kvpress's SnapKVPress for the duration of a run: one name of its module
    (`F`, or `get_prerope_query_states` as snapkv_press imported it), nothing else."""
    if bug is None:
        yield
        return
    if bug == "window-not-force-kept":
        name, bugged = "F", argparse.Namespace(avg_pool1d=F.avg_pool1d, pad=lambda x, pad, value=0.0: F.pad(x, pad, value=0.0))
    elif bug == "pooling-without-zero-padding":
        name, bugged = "F", argparse.Namespace(pad=F.pad, avg_pool1d=lambda *a, **k: F.avg_pool1d(*a, **k, count_include_pad=False))
    elif bug == "window-queries-without-q-norm":
        name, bugged = "get_prerope_query_states", _queries_without_q_norm
    else:
        raise OracleError(f"--plant {bug}: unknown; choose from {', '.join(PLANTS)}")
    original = getattr(snapkv_press, name)
    setattr(snapkv_press, name, bugged)
    try:
        yield
    finally:
        setattr(snapkv_press, name, original)


def plant_models(spec: dict, source: Path) -> dict[str, str]:
    """`_plants_on` of a cases file: one model for every planted bug, or {bug: model}; {} when absent."""
    on = spec.get("_plants_on")
    if on is None:
        return {}
    if isinstance(on, str):
        on = {bug: on for bug in PLANTS}
    if not (isinstance(on, dict) and all(isinstance(m, str) for m in on.values())):
        raise OracleError(f"{source}: _plants_on must be a model name or an object {{bug: model}}; got {on!r}")
    unknown = sorted(set(on) - set(PLANTS))
    if unknown:
        raise OracleError(f"{source}: _plants_on names unknown planted bug(s) {', '.join(unknown)}; "
                          f"choose from {', '.join(PLANTS)}")
    missing = sorted(m for m in set(on.values()) if m.startswith("_") or not isinstance(spec.get(m), list))
    if missing:
        raise OracleError(f"{source}: _plants_on plants on {', '.join(missing)}, which has no cases there")
    return dict(on)


@functools.lru_cache(maxsize=None)
def load_model(model_dir: str, dtype: str):
    """Each checkpoint once per dtype for the whole check (the planted bugs patch kvpress, not the model)."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=DTYPES[dtype], attn_implementation="sdpa")
    return model.eval()


def run_kvpress(model, case, stable: bool = False) -> dict:
    """One case through SnapKVPress: the decisions the kit needs."""
    p, N = case.params, len(case.prompt_ids)
    w, s, B = p["window"], p["kernel"], p["kv_budget"]
    if p["pooling"] != "avg" or not (w < B < N):
        raise OracleError(f"case {case.name}: outside kvpress's profile (avg pooling, w < B < N); "
                          f"got pooling {p['pooling']}, w {w}, B {B}, N {N}")
    press = SnapKVPress(compression_ratio=compression_ratio(N, B), window_size=w, kernel_size=s)
    cache = DynamicCache()
    L = model.config.num_hidden_layers
    with torch.no_grad():
        with CacheRecorder(cache) as rec, ScoreRecorder(press) as scored, stable_topk(press, stable), press(model):
            out = model(torch.tensor([case.prompt_ids]), past_key_values=cache)
        kept = rec.kept_positions(range(L))  # {layer: [(B,) per KV head]}, in kvpress's top-k order
        generated, steps, logits = [], [], out.logits[0, -1]
        for t in range(case.max_new_tokens):  # greedy, as kvpress's pipeline decodes: explicit position ids
            token = int(torch.nonzero(logits == logits.max())[0, 0])
            generated.append(token)
            steps.append(logits.numpy().copy())
            if token in case.eos_token_ids or len(generated) == case.max_new_tokens:
                break
            logits = model(torch.tensor([[token]]), past_key_values=cache, position_ids=torch.tensor([[N + t]])).logits[0, -1]
    layers = [LayerDecision(kv_positions=kept[l],
                            kv_scores=list(scored.scores[l][:, : N - w]))  # (H_kv, N - w): the prefix rows' scores
              for l in range(L)]
    return dict(layers=layers, logits=steps[0] if steps else out.logits[0, -1].numpy(), generated_ids=generated,
                step_logits=steps)


def candidates(bundle: Path, out: Path, dtype: str, bug: str | None, stable: bool = False) -> list[str]:
    """kvpress on every SnapKV case of the bundle; the kit writes each candidate. Returns the cases written."""
    written = []
    for case in read_cases(bundle, methods=("snapkv",)):
        model = load_model(str(case.model_dir()), dtype)
        with planted(bug):
            decided = run_kvpress(model, case, stable)
        trace, arrays = build_candidate(case, model_shape(model.config), dtype=dtype, **decided)
        write_candidate(out, case, trace, arrays)
        written.append(case.name)
    return written


# ---------------------------------------------------------------- the whole check


def cases_for(model: str, spec: dict) -> list[Case]:
    return [Case(f"{model}-{c['name']}", model, "snapkv", c["n_tokens"], dict(c["params"], pooling="avg"),
                 c.get("seed", 0), c.get("max_new_tokens", 4)) for c in spec[model]]


def bundle_for(model: str, spec: dict, work: Path) -> Path:
    """The oracle's bundle of the model's cases; rewritten when cases.json or the bundle format changed."""
    path = work / "bundles" / model
    stamp = path / "cases.json"
    wanted = json.dumps({"bundle_version": BUNDLE_VERSION, "cases": spec[model]}, sort_keys=True)
    if (path / "manifest.json").is_file() and stamp.is_file() and stamp.read_text() == wanted:
        return path
    write_bundle(model, cases_for(model, spec), path, dtype="float64", progress=False,
                 prompt=None if model.startswith("tiny-") else passkey_ids)
    stamp.write_text(wanted)
    return path


NEAR_TIE = "PASS-within-tolerance"


def classify(result) -> dict:
    f = next((x for x in result.findings if x.verdict == "FAIL"), None) or next(
        (x for x in result.findings if x.verdict != "NOTE"), None)
    return {"verdict": result.verdict, "field": None if f is None else f.field.split("[")[0],
            "detail": result.line().split("\n")[0][35:]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="The verdicts and their causes: docs/integrations.md.")
    ap.add_argument("--work", type=Path, help="bundles and candidates go here (default: out/kvpress for "
                    "cases.json, out/kvpress-STEM for another --cases file)")
    ap.add_argument("--cases", type=Path, default=HERE / "cases.json", help="the kvpress-profile cases per model")
    ap.add_argument("--expected", type=Path, help="the documented verdicts (default: expected.json)")
    ap.add_argument("--models", nargs="*", help="only these models (default: every model in --cases)")
    ap.add_argument("--plant", choices=sorted(PLANTS), help="one run with this bug planted, judged, nothing else")
    ap.add_argument("--stable-topk", action="store_true",
                    help="kvpress selects by a stable sort (SPEC's tie rule) in place of topk; every float32 "
                    "case of --cases runs and must PASS (no float64, no planted bug, no --expected)")
    args = ap.parse_args(argv)
    if args.stable_topk and (args.expected or args.plant):
        ap.error("--stable-topk has its own rule (every float32 verdict PASS): no --expected, no --plant")
    hf_logging.disable_progress_bar()
    torch.set_num_threads(1)  # tiny matrices: torch's thread pool costs more than it gains
    spec = json.loads(args.cases.read_text())
    if args.work is None:
        default_cases = args.cases.resolve() == (HERE / "cases.json").resolve()
        args.work = Path("out/kvpress" if default_cases else f"out/kvpress-{args.cases.stem}")
    models = args.models or [m for m in spec if not m.startswith("_")]
    try:
        plants_on = plant_models(spec, args.cases)
    except OracleError as e:
        ap.error(str(e))
    if args.stable_topk:  # the rule: every float32 case of every model run, PASS
        expected = {f"{m}-{c['name']}@float32": {"verdict": "PASS", "field": None} for m in models for c in spec[m]}
        runs = [(m, "float32", None) for m in models]
    else:
        expected = json.loads((args.expected or HERE / "expected.json").read_text())
        runs = [(m, dt, None) for m in models for dt in spec["_dtypes"].get(m, ["float32"])]
        runs += [(model, "float32", bug) for bug, model in plants_on.items()]
    if args.plant:
        if args.plant not in plants_on:
            ap.error(f"--plant: {args.cases} names no model to plant {args.plant} on (_plants_on)")
        runs = [(plants_on[args.plant], "float32", args.plant)]
    undocumented = sorted({bug for _, _, bug in runs if bug} - set(expected.get("_plants", {})))
    if undocumented:
        ap.error(f"{args.expected or 'expected.json'}: _plants names no field for planted bug(s) {', '.join(undocumented)}")
    rows, ok = [], True
    for model, dtype, bug in runs:
        started = time.time()
        label = f"{model} {dtype}" + (f" planted:{bug}" if bug else "") + (" stable-topk" if args.stable_topk else "")
        try:
            bundle = bundle_for(model, spec, args.work)
            cand = args.work / "candidates" / (label.replace(" ", "_").replace(":", "-"))
            candidates(bundle, cand, dtype, bug, args.stable_topk)
            results = check(cand, bundle, methods=("snapkv",))
        except (OracleError, RuntimeError, AssertionError, ValueError, KeyError) as e:
            rows.append((label, "*", "NOT RUN", str(e).split("\n")[0], False))
            ok = False
            continue
        if bug:
            failed = [r for r in results if (got := classify(r))["verdict"] == "FAIL"
                      and got["field"] == expected["_plants"][bug]]
            caught = bool(failed)
            detail = (f"caught by {failed[0].case}: {classify(failed[0])['detail']}" if caught else
                      f"NOT caught: expected a FAIL on {expected['_plants'][bug]}; got "
                      + ", ".join(f"{r.case} {r.verdict}" for r in results))
            rows.append((label, "(all)", "FAIL" if caught else "MISSED", detail, caught))
            ok &= caught
            continue
        judged = {f"{r.case}@{dtype}" for r in results}
        for key in sorted(k for k in expected if k.startswith(f"{model}-") and k.endswith(f"@{dtype}")):
            if key not in judged:  # documented, but never judged: not a pass
                rows.append((label, key.split("@")[0].removeprefix(f"{model}-"), "NOT RUN", "no verdict", False))
                ok = False
        for r in results:
            got = classify(r)
            want = expected.get(f"{r.case}@{dtype}")
            match = want is not None and ((want["verdict"] == got["verdict"] and want.get("field") == got["field"])
                                          or (want["verdict"] == NEAR_TIE and got["verdict"] == "PASS"))
            # a documented near-tie (float32 kvpress against float64 scores ~1e-6 from a boundary) may also fall
            # the oracle's way: torch's float32 sums vary with its thread count and the machine's load
            ok &= match
            mark = "" if match else f"   <-- documented: {want['verdict'] + ' ' + str(want.get('field')) if want else 'nothing'}"
            rows.append((label, r.case.removeprefix(f"{model}-"), got["verdict"], got["detail"] + mark, match))
        print(f"[{label}: {len(results)} cases in {time.time() - started:.0f} s]", file=sys.stderr)
    print(f"\n{'run':<56} {'case':<14} {'verdict':<22} detail")
    for label, case, verdict, detail, match in rows:
        print(f"{label:<56} {case:<14} {verdict:<22} {detail[:160]}")
    documented = ("every float32 verdict PASS, as --stable-topk requires" if args.stable_topk else
                  f"every verdict as documented ({args.expected or 'expected.json'}, docs/integrations.md)")
    print(f"\nkvpress check: {documented if ok else 'DIFFERS from the documented verdicts, or a run did not happen'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
