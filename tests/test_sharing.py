"""Many methods, one prefill (issue 25): methods run together on a `SharedPrefill` give exactly what each gives alone.

Every comparison is exact: the trace (JSON and arrays), every step's logits and the generated ids of a method run
on a fresh engine against the same method run after others on one shared engine, in both orders; on the reference,
the port (NumPy) and the port on the CPU stand-in for CuPy; with ASL firing and never firing, SnapKV alone and
combined with other methods; under a memory bound that stops remembering, and after an out-of-memory error.
`asl eval` rows and `asl golden` bundles are the same with and without sharing, and a killed shared evaluation
resumes without losing or repeating a row.
"""

from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from gpu.engine import PortEngine
from gpu.loader import load_device_weights
from reference.asl.engine import ReferenceEngine
from reference.asl.generate import generate
from reference.asl.params import METHODS, SMOLLM2_PARAMS, Params
from reference.asl import sharing
from reference.asl.sharing import QUERY_ROWS, SharedPrefill, held_bytes
from reference.eval import runner
from reference.eval.runner import RESULTS, read_results, run_eval
from reference.io.checkpoint import load_reference, load_weights
from reference.io.fetch import resolve_model
from reference.oracle.bundle import write_bundle
from reference.oracle.goldens import Case
from reference.oracle.trace import make_trace
from tests.conftest import TINY
from tests.standin import standin

P = Params(window=4, kernel=3, select_k=24, tau=0.5, l_min=6, l_obs=4, select_layer=8, filter_layer=5)
NEVER = replace(P, tau=1e-9)  # ASL's criterion never fires
CASES = [(m, replace(P, kv_budget=40) if m == "snapkv" else P) for m in METHODS] + [
    ("asl", NEVER), ("asl-2pass", NEVER),  # never fires: ASL runs every layer unpruned, two-pass falls back to L-1
    ("full", replace(P, kv_budget=40)), ("fastkv", replace(P, kv_budget=40)),  # SnapKV with other methods
    ("asl", replace(P, kv_budget=40)), ("gemfilter", replace(P, kv_budget=60)),
]
TIMINGS = ("prefill_seconds", "decode_seconds")


def make_engine(model: str, kind: str):
    model_dir = resolve_model(model)
    if kind == "reference":
        return ReferenceEngine(load_weights(model_dir, "float32"))
    xp, dtype = (np, "float32") if kind == "port" else (standin(), "float16")
    return PortEngine(load_device_weights(model_dir, xp, dtype, progress=False)[0], xp)


def record(gen, cfg) -> tuple:
    """Everything a run leaves that sharing must not change."""
    trace, arrays = make_trace(gen, model_name="m", model_sha256="", config=cfg, dtype="float32")
    return trace, arrays, gen.generated_ids, gen.step_logits


def assert_same(alone: tuple, shared: tuple, what: str) -> None:
    (t1, a1, ids1, logits1), (t2, a2, ids2, logits2) = alone, shared
    assert t1 == t2, what
    assert a1.keys() == a2.keys(), what
    for key in a1:
        assert a1[key].dtype == a2[key].dtype and np.array_equal(a1[key], a2[key], equal_nan=True), (what, key)
    assert ids1 == ids2, what
    assert len(logits1) == len(logits2) and all(np.array_equal(x, y) for x, y in zip(logits1, logits2)), what


def each_alone(model, kind, ids, cases, new_tokens=4):
    """Every case on its own fresh engine, as without sharing."""
    out = []
    for method, params in cases:
        engine = make_engine(model, kind)
        out.append(record(generate(engine, ids, new_tokens, (), method=method, params=params), engine.config))
    return out


def all_shared(engine, ids, cases, new_tokens=4, **kwargs):
    shared = SharedPrefill(engine, **kwargs)
    with shared.sharing(ids):
        out = [record(generate(shared, ids, new_tokens, (), method=m, params=p), engine.config) for m, p in cases]
    return out, shared


@pytest.mark.parametrize("model", TINY)
@pytest.mark.parametrize("kind", ["reference", "port", "port on the CPU stand-in for CuPy"])
def test_every_method_shared_is_bit_identical_to_running_it_alone_in_either_order(model, kind):
    kind = kind.split()[0] if kind != "port on the CPU stand-in for CuPy" else "standin"
    ids = np.random.default_rng(3).integers(3, 259, 150)
    cases = {"reference": CASES, "port": CASES[:len(METHODS) + 3], "standin": CASES[:len(METHODS)]}[kind]
    alone = each_alone(model, kind, ids, cases)
    for order in (cases, cases[::-1]) if kind != "standin" else (cases[::-1],):
        got, shared = all_shared(make_engine(model, kind), ids, order)
        if order is not cases:
            got = got[::-1]
        for (method, params), a, b in zip(cases, alone, got):
            assert_same(a, b, f"{model} {kind} {method} {params.tau} {params.kv_budget}")
        L = shared.config.num_hidden_layers
        assert shared.layers_served >= L  # full's or SnapKV's, whichever runs second, all from memory
        assert shared.layers_computed <= L + 2  # each once; PyramidInfer's wider window again at its first two


def test_asl_that_never_fires_shares_every_layer_with_full():
    engine = make_engine("tiny-llama", "reference")
    ids = np.random.default_rng(8).integers(3, 259, 120)
    (full, never), shared = all_shared(engine, ids, [("full", P), ("asl", NEVER)])
    assert never[0]["select_layer"] is None
    assert shared.layers_computed == engine.config.num_hidden_layers == shared.layers_served  # ASL: all remembered
    assert_same(each_alone("tiny-llama", "reference", ids, [("asl", NEVER)])[0], never, "asl never fires")


@pytest.mark.parametrize("n_tokens", [3, 20])  # N ≤ w (runs as full), N ≤ k (the second pass is the whole prompt)
def test_short_prompts_share_and_match(n_tokens):
    ids = np.random.default_rng(4).integers(3, 259, n_tokens)
    cases = [(m, replace(P, kv_budget=8) if m == "snapkv" else P) for m in METHODS]
    alone = each_alone("tiny-qwen2", "reference", ids, cases)
    got, shared = all_shared(make_engine("tiny-qwen2", "reference"), ids, cases)
    for (method, _), a, b in zip(cases, alone, got):
        assert_same(a, b, f"N={n_tokens} {method}")
    assert shared.layers_served > 0


@pytest.mark.parametrize("layers_that_fit", [0, 3])
def test_past_the_memory_bound_it_recomputes_with_one_line(layers_that_fit):
    engine = make_engine("tiny-llama", "port")
    ids = np.random.default_rng(5).integers(3, 259, 150)
    x = engine.embed(ids)
    _, cache, q = engine.layer(0, x, np.arange(150), QUERY_ROWS)  # what is remembered of a layer
    bound = held_bytes(x) + layers_that_fit * held_bytes(x, cache, q.copy()) + 64
    said = []
    cases = [(m, P) for m in ("full", "asl", "fastkv", "gemfilter")] + [("snapkv", replace(P, kv_budget=40))]
    got, shared = all_shared(engine, ids, cases, bound_bytes=bound, say=said.append)
    assert len(said) == 1 and "bound" in said[0] and f"{layers_that_fit} of" in said[0], said
    assert shared.layers_served == layers_that_fit * (len(cases) - 1)
    for (method, _), a, b in zip(cases, each_alone("tiny-llama", "port", ids, cases), got):
        assert_same(a, b, f"bound {method}")


class RunsOutOfMemoryOnce(ReferenceEngine):
    """Raises MemoryError the first time it runs layer 5, as a machine out of memory would."""

    failed = False

    def layer(self, i, x, positions, q_rows):
        if i == 5 and not self.failed:
            self.failed = True
            raise MemoryError("planted")
        return super().layer(i, x, positions, q_rows)


class CopiesOutOfMemoryOnce(PortEngine):
    """Raises MemoryError at its 30th cache copy (the second method's), as a machine out of memory would."""

    copies = 0

    def copy_cache(self, cache):
        self.copies += 1
        if self.copies == 30:
            raise MemoryError("planted")
        return super().copy_cache(cache)


@pytest.mark.parametrize("kind", ["reference", "port"])
def test_an_out_of_memory_error_drops_the_remembered_layers_and_the_run_goes_on(kind):
    model_dir = resolve_model("tiny-llama")
    if kind == "reference":  # running a layer
        engine = RunsOutOfMemoryOnce(load_weights(model_dir, "float32"))
    else:  # copying a remembered cache for a method
        engine = CopiesOutOfMemoryOnce(load_device_weights(model_dir, np, "float32", progress=False)[0], np)
    ids = np.random.default_rng(6).integers(3, 259, 150)
    said = []
    cases = [("full", P), ("asl", P), ("snapkv", replace(P, kv_budget=40)), ("asl-2pass", P)]
    got, shared = all_shared(engine, ids, cases, say=said.append)
    assert len(said) == 1 and "out of memory" in said[0]
    for (method, _), a, b in zip(cases, each_alone("tiny-llama", kind, ids, cases), got):
        assert_same(a, b, f"after MemoryError {method}")


def test_outside_sharing_and_on_an_engine_without_copy_cache_nothing_is_remembered():
    engine = make_engine("tiny-llama", "reference")
    ids = np.random.default_rng(7).integers(3, 259, 60)
    outside = SharedPrefill(engine)
    for method in ("full", "asl"):
        generate(outside, ids, 2, (), method=method, params=P)
    assert outside.layers_served == 0

    class Plain:  # an engine that does not say how to hand a cache to a second owner
        def __init__(self, inner):
            self.inner, self.config = inner, inner.config

        def __getattr__(self, name):
            if name == "copy_cache":
                raise AttributeError(name)
            return getattr(self.inner, name)

    got, shared = all_shared(Plain(engine), ids, [("full", P), ("asl", P)])
    assert shared.layers_served == 0
    assert_same(each_alone("tiny-llama", "reference", ids, [("asl", P)])[0], got[1], "plain engine")


def test_the_methods_read_as_before():
    source = (Path(__file__).resolve().parent.parent / "reference" / "asl" / "methods.py").read_text()
    assert "SharedPrefill" not in source and "sharing" not in source  # the definition knows nothing of it


# ---------------------------------------------------------------- asl eval and asl golden

SMALL = Params(window=8, kernel=3, select_k=64, tau=0.5, l_min=6, l_obs=4, select_layer=8, filter_layer=5, kv_budget=96)


def rows_without_timings(out: Path) -> list[dict]:
    return [{k: v for k, v in row.items() if k not in TIMINGS} for row in read_results(out)]


def test_eval_rows_with_sharing_equal_those_without(tmp_path):
    args = ("tiny-llama", ["passkey", "niah_single"], [400], 1, list(METHODS), SMALL)
    run_eval(*args, tmp_path / "shared", max_new_tokens=3, progress=False)
    run_eval(*args, tmp_path / "alone", max_new_tokens=3, progress=False, share=False)
    shared = rows_without_timings(tmp_path / "shared")
    assert shared == rows_without_timings(tmp_path / "alone") and len(shared) == 2 * len(METHODS)


def test_an_eval_past_the_memory_bound_says_so_once_and_its_rows_are_the_same(tmp_path, monkeypatch, capsys):
    engine = make_engine("tiny-llama", "reference")
    x = engine.embed(np.arange(300) % 250 + 3)
    layer_bytes = held_bytes(engine.layer(0, x, np.arange(300), QUERY_ROWS))  # about: the prompts are ~300 tokens
    monkeypatch.setattr(sharing, "available_bytes", lambda engine: int(5 * layer_bytes / sharing.MEMORY_FRACTION))
    args = ("tiny-llama", ["passkey"], [300], 2, ["full", "asl", "snapkv"], SMALL)
    run_eval(*args, tmp_path / "bounded", max_new_tokens=2, progress=False)
    lines = [line for line in capsys.readouterr().err.splitlines() if "sharing the unpruned layers" in line]
    L = engine.config.num_hidden_layers
    assert len(lines) == 1 and lines[0].startswith("asl: ") and f" of {L} layers are shared" in lines[0], lines
    run_eval(*args, tmp_path / "alone", max_new_tokens=2, progress=False, share=False)
    assert rows_without_timings(tmp_path / "bounded") == rows_without_timings(tmp_path / "alone")


class SlowLayers(ReferenceEngine):
    """Every layer takes at least 20 ms: long enough to see in a row's prefill_seconds."""

    def layer(self, i, x, positions, q_rows):
        time.sleep(0.02)
        return super().layer(i, x, positions, q_rows)


def test_a_shared_rows_prefill_seconds_counts_the_layers_it_was_served(tmp_path):
    def load(model, dtype, backend):
        model_dir, weights, tok, eos, _ = load_reference(model, dtype, backend)
        return model_dir, weights, tok, eos, SlowLayers(weights)

    run_eval("tiny-llama", ["passkey"], [300], 1, ["full", "snapkv"], SMALL, tmp_path / "out", max_new_tokens=1,
             progress=False, load=load)
    L = load_weights(resolve_model("tiny-llama"), "float32").config.num_hidden_layers
    assert all(row["prefill_seconds"] >= 0.02 * L for row in read_results(tmp_path / "out"))  # snapkv's too


def test_a_killed_shared_eval_resumes_without_lost_or_repeated_rows(tmp_path, monkeypatch):
    args = ("tiny-qwen2", ["passkey"], [300], 2, ["full", "snapkv", "asl", "gemfilter"], SMALL)
    run_eval(*args, tmp_path / "whole", max_new_tokens=2, progress=False)
    calls = []
    real = runner.generate

    def killed_at_the_sixth(*a, **k):  # sample 1's second method
        calls.append(k["method"])
        if len(calls) == 6:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(runner, "generate", killed_at_the_sixth)
    with pytest.raises(KeyboardInterrupt):
        run_eval(*args, tmp_path / "killed", max_new_tokens=2, progress=False)
    assert len(read_results(tmp_path / "killed")) == 5
    monkeypatch.setattr(runner, "generate", real)
    run_eval(*args, tmp_path / "killed", max_new_tokens=2, progress=False)
    lines = (tmp_path / "killed" / RESULTS).read_text().splitlines()
    keys = [(r["task"], r["length"], r["sample"], r["method"]) for r in map(json.loads, lines)]
    assert len(keys) == len(set(keys)) == 8
    key = lambda r: (r["sample"], r["method"])
    assert sorted(rows_without_timings(tmp_path / "killed"), key=key) == \
        sorted(rows_without_timings(tmp_path / "whole"), key=key)


def test_a_bundle_with_sharing_is_the_bundle_without(tmp_path):
    cases = [Case("full", "tiny-llama", "full", 150), Case("asl", "tiny-llama", "asl", 150),
             Case("short", "tiny-llama", "asl", 20), Case("snapkv", "tiny-llama", "snapkv", 150, {"kv_budget": 40}),
             Case("gemfilter", "tiny-llama", "gemfilter", 150), Case("pyramid", "tiny-llama", "pyramidinfer", 150)]
    shared = write_bundle("tiny-llama", cases, tmp_path / "shared", progress=False)
    alone = write_bundle("tiny-llama", cases, tmp_path / "alone", progress=False, share=False)
    names = sorted(p.name for p in alone.iterdir())
    assert names == sorted(p.name for p in shared.iterdir())
    for name in names:
        if name.endswith(".npz"):
            a, b = np.load(alone / name), np.load(shared / name)
            assert a.files == b.files and all(np.array_equal(a[k], b[k], equal_nan=True) for k in a.files), name
        else:
            assert (alone / name).read_bytes() == (shared / name).read_bytes(), name


# ---------------------------------------------------------------- SmolLM2


@pytest.mark.smollm2
def test_smollm2_every_method_shared_is_bit_identical_to_alone(smollm2_dir):
    from reference.eval.tasks import passkey_ids

    ids = np.asarray(passkey_ids(smollm2_dir, 200, 0))
    params = replace(SMOLLM2_PARAMS, select_k=96)
    cases = [(m, replace(params, kv_budget=64) if m == "snapkv" else params) for m in METHODS]
    cases += [("asl", replace(params, tau=1e-9)), ("fastkv", replace(params, kv_budget=64))]
    weights = load_weights(smollm2_dir, "float32")
    alone = [record(generate(ReferenceEngine(weights), ids, 2, (), method=m, params=p), weights.config)
             for m, p in cases]
    got, shared = all_shared(ReferenceEngine(weights), ids, cases, new_tokens=2)
    for (method, p), a, b in zip(cases, alone, got):
        assert_same(a, b, f"smollm2 {method} tau={p.tau} B={p.kv_budget}")
    assert got[len(METHODS)][0]["select_layer"] is None  # ASL that never fires ran every layer from memory
    assert shared.layers_computed <= 30 + 2 and shared.layers_served >= 4 * 30  # 2: PyramidInfer widens two


def test_the_cli_no_share_flag_reaches_eval_and_golden(tmp_path, monkeypatch):
    from reference import cli

    seen = []
    monkeypatch.setattr(cli, "run_eval", lambda *a, **kw: seen.append(("eval", kw["share"])) or tmp_path)
    monkeypatch.setattr(cli, "write_bundle", lambda *a, **kw: seen.append(("golden", kw["share"])) or tmp_path)
    for flag in ([], ["--no-share"]):
        cli.main(["eval", "--model", "tiny-llama", "--out", str(tmp_path / "e"), *flag])
        cli.main(["golden", "--model", "tiny-llama", "--out", str(tmp_path / "g"), *flag])
    assert seen == [("eval", True), ("golden", True), ("eval", False), ("golden", False)]
