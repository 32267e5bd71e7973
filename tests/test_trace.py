"""The trace (reference/oracle/trace.py, docs/trace.md): schema, budget accounting, round trips, bad files.

Expected values are computed here from the model's shape (tiny-llama: L = 24,
H = 4, H_kv = 2, d = 8, D = 32, F = 64, V = 259, float32 on disk), from the
run's own cache arrays, or with hashlib; none is taken from trace.py.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import re
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from jsonschema import Draft202012Validator

from reference.asl.generate import generate
from reference.asl.params import Params
from reference.errors import OracleError
from reference.io.checkpoint import load_weights
from reference.oracle.trace import (
    SCHEMA_PATH,
    load_trace,
    make_trace,
    model_sha256,
    save_trace,
)

CHECKPOINTS = Path(__file__).resolve().parent.parent / "reference" / "io" / "checkpoints"
TINY = CHECKPOINTS / "tiny-llama"
L, H, H_KV, HD, D, F, V = 24, 4, 2, 8, 32, 64, 259
N = 120
BASE = dict(window=4, kernel=3, select_k=24, l_min=6, l_obs=4, tau=0.5, select_layer=8, filter_layer=5)

# name -> (method, params overrides, dtype, prompt length)
CASES = {
    "full": ("full", {}, "float32", N),
    "snapkv": ("snapkv", {"kv_budget": 40}, "float32", N),
    "fastkv": ("fastkv", {}, "float32", N),
    "gemfilter": ("gemfilter", {}, "float32", N),
    "asl": ("asl", {}, "float32", N),
    "asl-2pass": ("asl-2pass", {}, "float32", N),
    "asl+snapkv": ("asl", {"kv_budget": 40}, "float32", N),
    "asl-2pass-never-fires": ("asl-2pass", {"tau": 1e-6}, "float32", N),
    "fastkv-float64": ("fastkv", {}, "float64", 70),
    "asl-short-prompt": ("asl", {}, "float32", 3),  # N ≤ w: runs as full, with a note
    "pyramidinfer": ("pyramidinfer", {}, "float32", N),
    "pyramidinfer-prefill-only": ("pyramidinfer", {"gen_compress": False}, "float32", N),
}


def prompt(n: int, seed: int = 0) -> list[int]:
    return np.random.default_rng(seed).integers(3, 259, size=n).tolist()


@pytest.fixture(scope="module")
def weights():
    return {dtype: load_weights(TINY, dtype) for dtype in ("float32", "float64")}


@pytest.fixture(scope="module")
def sha():
    return model_sha256(TINY)


@pytest.fixture(scope="module")
def runs(weights, sha):
    """case -> (Generation, trace, arrays)."""
    out = {}
    for name, (method, extra, dtype, n) in CASES.items():
        w = weights[dtype]
        gen = generate(w, prompt(n), 4, eos_ids=(), method=method, params=Params(**(BASE | extra)))
        trace, arrays = make_trace(gen, model_name="tiny-llama", model_sha256=sha, config=w.config, dtype=dtype)
        out[name] = (gen, trace, arrays)
    return out


def schema() -> dict:
    return json.loads(SCHEMA_PATH.read_text())


def layer_flops(n: int) -> int:
    """Projections q, k, v, o + q·k and p·v over n(n+1)/2 causal pairs + SwiGLU, 2 FLOPs per multiply-add."""
    proj = 2 * n * D * (H * HD + H_KV * HD + H_KV * HD + H * HD)
    attn = 2 * (H * HD * n * (n + 1) // 2) * 2
    mlp = 2 * n * D * F * 3
    return proj + attn + mlp


# ---------------------------------------------------------------- schema


def test_schema_is_a_valid_draft_2020_12_schema_and_ships_in_the_package():
    s = schema()
    assert s["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    Draft202012Validator.check_schema(s)
    assert SCHEMA_PATH.parent == Path(__file__).resolve().parent.parent / "reference" / "oracle"


def test_schema_describes_every_field():
    def walk(node, where):
        if isinstance(node, dict):
            for key, sub in node.get("properties", {}).items():
                assert "description" in sub, f"{where}.{key} has no description"
                walk(sub, f"{where}.{key}")
            for key, sub in node.get("$defs", {}).items():
                walk(sub, f"{where}.$defs.{key}")

    walk(schema(), "$")


@pytest.mark.parametrize("case", CASES)
def test_every_method_gives_a_trace_that_validates(runs, case):
    gen, trace, arrays = runs[case]
    Draft202012Validator(schema()).validate(trace)
    json.dumps(trace, allow_nan=False)  # strict JSON: no NaN, no Infinity
    assert trace["schema_version"] == 3 and trace["recomputed_at"] is None  # no LongRoPE model here
    assert trace["method"] == CASES[case][0]
    assert len(trace["layers"]) == L
    assert [e["layer"] for e in trace["layers"]] == list(range(L))
    assert all(len(e["kv_tokens"]) == H_KV for e in trace["layers"])
    assert trace["prompt_ids"] == gen.prompt_ids and trace["num_prompt_tokens"] == CASES[case][3]
    assert trace["generated_ids"] == gen.generated_ids and len(gen.generated_ids) == 4


# ---------------------------------------------------------------- what the trace reports


@pytest.mark.parametrize("case", CASES)
def test_kv_bytes_equals_the_bytes_of_the_cache_arrays(runs, case):
    gen, trace, _ = runs[case]
    cache = gen.prefill.cache
    assert len(cache) == L
    kv_bytes = sum(2 * len(head.pos) * HD * head.k.itemsize for layer in cache for head in layer)
    assert kv_bytes == sum(head.k.nbytes + head.v.nbytes for layer in cache for head in layer)
    itemsize = cache[0][0].k.itemsize
    n = trace["num_prompt_tokens"]
    assert trace["totals"]["kv_bytes"] == kv_bytes
    assert trace["totals"]["bytes_per_element"] == itemsize == np.dtype(CASES[case][2]).itemsize
    assert trace["totals"]["kv_bytes_full"] == 2 * L * H_KV * n * HD * itemsize
    assert trace["totals"]["kv_fraction"] == pytest.approx(kv_bytes / (2 * L * H_KV * n * HD * itemsize), rel=1e-15)
    for layer, entry in zip(cache, trace["layers"]):
        assert entry["kv_tokens"] == [len(head.pos) for head in layer]


def test_full_run_has_kv_fraction_exactly_one_and_full_flops(runs):
    _, trace, _ = runs["full"]
    assert trace["totals"]["kv_fraction"] == 1.0
    assert trace["totals"]["kv_bytes"] == trace["totals"]["kv_bytes_full"]
    assert trace["totals"]["prefill_flops"] == trace["totals"]["prefill_flops_full"] == L * layer_flops(N)
    assert trace["select_layer"] is None and trace["kept_positions"] is None and trace["first_pass"] is None
    assert trace["next_position"] == N and not any(e["scored"] for e in trace["layers"])


def test_budgets_follow_from_the_parameters(runs):
    """kv_bytes and FLOPs predicted from the parameters alone (k = 24, B = 40, ℓ_f = 8, ℓ_g = 5)."""
    k, B, lf, lg = BASE["select_k"], 40, BASE["select_layer"], BASE["filter_layer"]
    per_token = 2 * H_KV * HD * 4  # bytes per token per layer, float32
    _, snap, _ = runs["snapkv"]
    assert all(e["kv_tokens"] == [B, B] for e in snap["layers"])
    assert snap["totals"]["kv_bytes"] == L * B * per_token
    _, fast, _ = runs["fastkv"]
    assert fast["select_layer"] == lf and len(fast["kept_positions"]) == k
    assert fast["totals"]["kv_bytes"] == ((lf + 1) * N + (L - lf - 1) * k) * per_token
    assert fast["totals"]["prefill_flops"] == (lf + 1) * layer_flops(N) + (L - lf - 1) * layer_flops(k)
    _, gem, _ = runs["gemfilter"]
    qk = 2 * D * HD * (H + N * H_KV)  # the filter layer: k of all N tokens, q of the last one
    assert gem["totals"]["kv_bytes"] == L * k * per_token
    assert gem["totals"]["prefill_flops"] == lg * layer_flops(N) + qk + L * layer_flops(k)
    assert [e["layer"] for e in gem["first_pass"]] == list(range(lg + 1))
    assert gem["first_pass"][-1]["kv_tokens"] == [] and gem["first_pass"][-1]["scored"]
    assert gem["next_position"] == k


def test_asl_records_the_criterion(runs):
    _, trace, _ = runs["asl"]
    l_min, l_obs, tau = BASE["l_min"], BASE["l_obs"], BASE["tau"]
    scored = [e["layer"] for e in trace["layers"] if e["scored"]]
    star = trace["select_layer"]
    assert star is not None and scored == list(range(l_min - l_obs + 1, star + 1))
    ratios = {e["layer"]: e for e in trace["layers"] if e["ratio"] is not None}
    assert sorted(ratios) == list(range(l_min, star + 1))
    assert ratios[l_min]["ratio"] == 1.0
    for layer, e in ratios.items():
        assert e["margin"] == pytest.approx(e["ratio"] - tau)
        assert (e["ratio"] < tau) == (layer == star)
    assert len(trace["kept_positions"]) == BASE["select_k"]
    assert trace["kept_positions"][-BASE["window"]:] == list(range(N - BASE["window"], N))


def test_two_pass_that_never_fires_falls_back_to_the_last_layer_and_says_so(runs):
    _, trace, _ = runs["asl-2pass-never-fires"]
    L = trace["model"]["num_hidden_layers"]
    assert trace["select_layer"] == L - 1 and len(trace["first_pass"]) == L
    assert all(e["margin"] > 0 for e in trace["first_pass"] if e["margin"] is not None)  # it really never fired
    assert any("never fired" in n and "fell back" in n for n in trace["notes"])
    assert len(trace["kept_positions"]) == min(trace["params"]["select_k"], trace["num_prompt_tokens"])
    assert trace["next_position"] == len(trace["kept_positions"]) and trace["totals"]["kv_fraction"] < 1.0


def test_short_prompt_notes_why_it_ran_as_full(runs):
    _, trace, _ = runs["asl-short-prompt"]
    assert any("N ≤ w" in note for note in trace["notes"])
    assert trace["totals"]["kv_fraction"] == 1.0 and not any(e["scored"] for e in trace["layers"])


@pytest.mark.parametrize("case", ["asl", "gemfilter", "asl-2pass", "snapkv"])
def test_arrays_hold_the_runs_scores_ranks_and_positions(runs, case):
    gen, trace, arrays = runs[case]
    run = gen.prefill
    np.testing.assert_array_equal(arrays["logits"], run.logits)
    assert arrays["logits"].shape == (V,)
    for prefix, records, entries in (("", run.layers, trace["layers"]),
                                     ("first_pass/", run.first_pass or [], trace["first_pass"] or [])):
        for rec, entry in zip(records, entries):
            if entry["scored"]:
                rank = arrays[f"{prefix}ranks/{rec.layer}"]
                assert rank.dtype == np.int64
                assert sorted(rank.tolist()) == list(range(1, len(rank) + 1))
                np.testing.assert_array_equal(arrays[f"{prefix}scores/{rec.layer}"], rec.scores)
                # rank 1 is the highest score, ties to the earlier token
                order = sorted(range(len(rec.scores)), key=lambda j: (-rec.scores[j], j))
                assert rank[order[0]] == 1 and rank[order[-1]] == len(rank)
            else:
                assert f"{prefix}ranks/{rec.layer}" not in arrays
    for layer, heads in enumerate(run.cache):
        for g, head in enumerate(heads):
            got = arrays[f"kv_positions/{layer}/{g}"]
            assert got.dtype == np.int64
            np.testing.assert_array_equal(got, head.pos)


# ---------------------------------------------------------------- save and load


@pytest.mark.parametrize("case", CASES)
def test_round_trip_with_arrays(runs, case, tmp_path):
    _, trace, arrays = runs[case]
    path = tmp_path / "run.json"
    save_trace(trace, arrays, path, with_arrays=True)
    assert (tmp_path / "run.npz").is_file()
    doc, loaded = load_trace(path)
    assert doc == {**trace, "arrays_file": "run.npz"}
    assert json.loads(path.read_text()) == doc
    assert sorted(loaded) == sorted(arrays)
    for name, a in arrays.items():
        assert loaded[name].dtype == a.dtype, name
        np.testing.assert_array_equal(loaded[name], a, err_msg=name)


def test_round_trip_without_arrays(runs, tmp_path):
    _, trace, arrays = runs["asl"]
    path = tmp_path / "run.json"
    save_trace(trace, arrays, path, with_arrays=False)
    assert not (tmp_path / "run.npz").exists()
    assert json.loads(path.read_text())["arrays_file"] is None
    doc, loaded = load_trace(str(path))
    assert doc == trace and loaded == {}


def test_save_does_not_change_the_callers_dict(runs, tmp_path):
    _, trace, arrays = runs["fastkv"]
    before = copy.deepcopy(trace)
    save_trace(trace, arrays, tmp_path / "t.json", with_arrays=True)
    assert trace == before


def test_infinite_ratio_round_trips_as_the_string_inf(runs, tmp_path):
    _, real, arrays = runs["asl"]
    trace = copy.deepcopy(real)
    layer = BASE["l_min"] + 1
    trace["layers"][layer]["ratio"] = "inf"  # as if V0 = 0 < v_ℓ
    trace["layers"][layer]["margin"] = "inf"
    Draft202012Validator(schema()).validate(trace)
    path = tmp_path / "inf.json"
    save_trace(trace, arrays, path, with_arrays=True)
    text = path.read_text()
    assert '"inf"' in text and "Infinity" not in text
    doc, _ = load_trace(path)
    assert doc["layers"][layer]["ratio"] == "inf" and doc == {**trace, "arrays_file": "inf.npz"}


def test_make_trace_writes_an_infinite_ratio_as_inf(runs, weights, sha, tmp_path):
    """A run whose V0 = 0: the record holds ratio = margin = +inf (float), the trace the string."""
    gen, real, _ = runs["asl"]
    layer = BASE["l_min"] + 1
    records = list(gen.prefill.layers)
    records[layer] = replace(records[layer], ratio=math.inf, margin=math.inf)
    gen_inf = replace(gen, prefill=replace(gen.prefill, layers=records))
    trace, arrays = make_trace(gen_inf, model_name="tiny-llama", model_sha256=sha,
                               config=weights["float32"].config, dtype="float32")
    assert trace["layers"][layer]["ratio"] == "inf" and trace["layers"][layer]["margin"] == "inf"
    assert trace["layers"][layer]["v"] == real["layers"][layer]["v"]
    save_trace(trace, arrays, tmp_path / "t.json", with_arrays=False)
    assert load_trace(tmp_path / "t.json")[0]["layers"][layer]["ratio"] == "inf"


def test_a_float_infinity_is_refused_when_saving(runs, tmp_path):
    _, real, arrays = runs["asl"]
    trace = copy.deepcopy(real)
    trace["layers"][BASE["l_min"]]["ratio"] = float("inf")
    with pytest.raises(OracleError, match=r"\$\.layers\[6\]\.ratio.*\"inf\""):
        save_trace(trace, arrays, tmp_path / "t.json", with_arrays=False)
    assert not (tmp_path / "t.json").exists()


def test_a_json_path_ending_in_npz_is_refused(runs, tmp_path):
    _, trace, arrays = runs["full"]
    with pytest.raises(OracleError, match=r"\.npz"):
        save_trace(trace, arrays, tmp_path / "t.npz", with_arrays=True)


# ---------------------------------------------------------------- bad files


def _set(keys, value):
    def edit(doc):
        target = doc
        for key in keys[:-1]:
            target = target[key]
        target[keys[-1]] = value
    return edit


def _delete(keys):
    def edit(doc):
        target = doc
        for key in keys[:-1]:
            target = target[key]
        del target[keys[-1]]
    return edit


def _swap_kept(doc):
    kept = doc["kept_positions"]
    kept[0], kept[1] = kept[1], kept[0]


def _grow_kv_tokens(doc):
    doc["layers"][3]["kv_tokens"].append(5)


# name -> (edit of the JSON object, pattern the message must contain)
BAD_DOCS = {
    "schema_version": (_set(["schema_version"], 4), r"\$\.schema_version.*4.*3"),
    "recomputed_at past the tokens": (_set(["recomputed_at"], 99), r"\$\.recomputed_at: is 99; expected a generation step"),
    "parameter out of range": (_set(["params", "tau"], -1), r"\$\.params: parameter tau must be a finite number > 0"),
    "parameter of the wrong type": (_set(["params", "l_min"], 6.5), r"\$\.params\.l_min: 6\.5 is not of type"),
    "missing top-level field": (_delete(["totals"]), r"\$.*'totals' is a required property"),
    "missing layer field": (_delete(["layers", 3, "flops"]), r"\$\.layers\[3\].*'flops' is a required"),
    "kv_tokens length": (_grow_kv_tokens, r"\$\.layers\[3\]\.kv_tokens.*3 entries.*KV head \(2\)"),
    "layers length": (lambda d: d["layers"].pop(), r"\$\.layers.*23 entries.*\(24\)"),
    "kept unsorted": (_swap_kept, r"\$\.kept_positions.*ascending"),
    "kept out of range": (lambda d: d["kept_positions"].__setitem__(-1, N), r"\$\.kept_positions.*\[0, 120\)"),
    "wrong type": (_set(["prompt_ids", 0], "a"), r"\$\.prompt_ids\[0\].*'a' is not of type 'integer'"),
    "bad ratio string": (_set(["layers", 7, "ratio"], "big"), r"\$\.layers\[7\]\.ratio.*\"inf\""),
    "unknown field": (_set(["extra"], 1), r"'extra' was unexpected"),
    "bad dtype": (_set(["dtype"], "float16"), r"\$\.dtype.*float16"),
    "kv_bytes off": (lambda d: d["totals"].__setitem__("kv_bytes", d["totals"]["kv_bytes"] + 1),
                     r"\$\.totals\.kv_bytes.*expected"),
    "margin not ratio - tau": (_set(["layers", 7, "margin"], 0.123), r"\$\.layers\[7\]\.margin.*ratio - tau"),
    "layer index": (_set(["layers", 5, "layer"], 4), r"\$\.layers\[5\]\.layer.*expected 5"),
    "not an object": (None, r"\$.*expected an object"),
}


@pytest.mark.parametrize("bad", BAD_DOCS)
def test_malformed_json_is_an_oracle_error_naming_file_and_field(runs, tmp_path, bad):
    _, trace, _ = runs["asl"]
    edit, pattern = BAD_DOCS[bad]
    if edit is None:
        doc = [trace]
    else:
        doc = copy.deepcopy(trace)
        edit(doc)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(doc))
    with pytest.raises(OracleError) as err:
        load_trace(path)
    message = str(err.value)
    assert str(path) in message
    assert re.search(pattern, message), message


def test_nan_is_an_oracle_error_naming_the_field(runs, tmp_path):
    _, trace, _ = runs["asl"]
    doc = copy.deepcopy(trace)
    doc["layers"][6]["v"] = float("nan")
    path = tmp_path / "nan.json"
    path.write_text(json.dumps(doc))  # Python writes the non-standard token NaN
    assert "NaN" in path.read_text()
    with pytest.raises(OracleError, match=r"nan\.json.*\$\.layers\[6\]\.v.*NaN"):
        load_trace(path)


@pytest.mark.parametrize("text", ["{not json", "", "\xff\xfe garbage"])
def test_not_json_is_an_oracle_error(tmp_path, text):
    path = tmp_path / "t.json"
    path.write_bytes(text.encode("latin-1"))
    with pytest.raises(OracleError, match=r"t\.json.*not valid JSON"):
        load_trace(path)


def test_missing_file_is_an_oracle_error(tmp_path):
    with pytest.raises(OracleError, match=r"nothere\.json.*no such"):
        load_trace(tmp_path / "nothere.json")


def _saved(runs, tmp_path, case="asl"):
    _, trace, arrays = runs[case]
    path = tmp_path / "t.json"
    save_trace(trace, arrays, path, with_arrays=True)
    return path, tmp_path / "t.npz", arrays


def test_missing_npz_is_an_oracle_error(runs, tmp_path):
    path, npz, _ = _saved(runs, tmp_path)
    npz.unlink()
    with pytest.raises(OracleError, match=r"t\.npz.*missing"):
        load_trace(path)


@pytest.mark.parametrize("damage", ["truncate", "text", "npy"])
def test_corrupt_npz_is_an_oracle_error(runs, tmp_path, damage):
    path, npz, _ = _saved(runs, tmp_path)
    if damage == "truncate":
        npz.write_bytes(npz.read_bytes()[:200])
    elif damage == "text":
        npz.write_text("hello")
    else:
        with open(npz, "wb") as f:
            np.save(f, np.arange(3))
    with pytest.raises(OracleError, match=r"t\.npz"):
        load_trace(path)


def test_npz_without_an_array_the_json_implies_is_an_oracle_error(runs, tmp_path):
    path, npz, arrays = _saved(runs, tmp_path)
    name = f"ranks/{BASE['l_min']}"
    np.savez_compressed(npz, **{k: v for k, v in arrays.items() if k != name})
    with pytest.raises(OracleError, match=rf"t\.npz.*'{name}'.*missing"):
        load_trace(path)


def test_npz_with_nan_scores_is_an_oracle_error(runs, tmp_path):
    path, npz, arrays = _saved(runs, tmp_path)
    name = f"scores/{BASE['l_min']}"
    bad = dict(arrays)
    bad[name] = arrays[name].copy()
    bad[name][0] = np.nan
    np.savez_compressed(npz, **bad)
    with pytest.raises(OracleError, match=rf"'{name}'.*NaN"):
        load_trace(path)


# ---------------------------------------------------------------- model identity and misuse


def test_model_sha256_of_a_sharded_checkpoint_matches_hashlib():
    shards = sorted(set(json.loads((TINY / "model.safetensors.index.json").read_text())["weight_map"].values()))
    assert len(shards) == 2
    expected = hashlib.sha256(b"".join((TINY / s).read_bytes() for s in shards)).hexdigest()
    assert model_sha256(TINY) == expected


def test_model_sha256_of_a_single_file_checkpoint_matches_hashlib():
    single = CHECKPOINTS / "tiny-qwen2"
    assert model_sha256(single) == hashlib.sha256((single / "model.safetensors").read_bytes()).hexdigest()


def test_model_sha256_without_weights_is_an_oracle_error(tmp_path):
    with pytest.raises(OracleError, match="model.safetensors"):
        model_sha256(tmp_path)


def test_make_trace_refuses_a_wrong_dtype_or_config(runs, weights, sha):
    gen, _, _ = runs["full"]
    cfg = weights["float32"].config
    with pytest.raises(OracleError, match="float64"):
        make_trace(gen, model_name="t", model_sha256=sha, config=cfg, dtype="float64")
    with pytest.raises(OracleError, match="bfloat16"):
        make_trace(gen, model_name="t", model_sha256=sha, config=cfg, dtype="bfloat16")
    with pytest.raises(OracleError, match="config"):
        make_trace(gen, model_name="t", model_sha256=sha, config=replace(cfg, num_hidden_layers=12), dtype="float32")


def test_snapkv_margins_are_recorded_per_kv_head(tmp_path):
    """kv_boundary_gaps: where a cache was compressed, each head's keep/drop margin, recomputed here by hand."""
    from reference.asl.scoring import group_scores, pooled_head_scores
    from reference.model.transformer import decoder_layer, embed

    w = load_weights(TINY)
    ids = np.random.default_rng(5).integers(3, 259, 90).tolist()
    gen = generate(w, ids, 1, (), method="snapkv", params=Params(window=4, kernel=3, kv_budget=30))
    trace, arrays = make_trace(gen, model_name="tiny-llama", model_sha256="0" * 64, config=w.config, dtype="float32")
    assert all(len(e["kv_boundary_gaps"]) == H_KV for e in trace["layers"])
    # layer 0 by hand: its input is the embedding, so its q and k are easy to recompute
    _, cache, q = decoder_layer(embed(w, np.asarray(ids)), w.layers[0], w.config, np.arange(90), None)
    score_g = group_scores(pooled_head_scores(q[:, -4:], np.stack([h.k for h in cache]), 2, 3, "avg"), 2)  # (2, 86)
    for g in range(H_KV):
        s = np.sort(score_g[g])[::-1]  # B - w = 26 kept: the gap is between the 26th and 27th best
        assert trace["layers"][0]["kv_boundary_gaps"][g] == pytest.approx(float(s[25] - s[26]), abs=1e-7)
    path = tmp_path / "t.json"
    save_trace(trace, arrays, path, with_arrays=False)
    doc = json.loads(path.read_text())
    doc["layers"][3]["kv_boundary_gaps"] = [0.1]
    path.write_text(json.dumps(doc))
    with pytest.raises(OracleError, match=r"layers\[3\]\.kv_boundary_gaps"):
        load_trace(path)


def _refusal(doc: dict, path) -> str:
    """load_trace's message for `doc` written to `path` (it must refuse it)."""
    path.write_text(json.dumps(doc))
    with pytest.raises(OracleError) as err:
        load_trace(path)
    return str(err.value)


def test_a_version_1_trace_is_told_what_changed_and_how_to_upgrade(runs, tmp_path):
    """A trace written for schema_version 1 gets one line naming the new fields and the upgrade command,
    and `upgrade` turns it into a valid version 3 trace, field for field what this version writes."""
    from reference.oracle.trace import upgrade, validate_trace

    for case in ("asl", "asl-2pass", "gemfilter", "full"):
        _, trace, arrays = runs[case]
        old = json.loads(json.dumps(trace))
        old["schema_version"] = 1
        del old["decode_compressions"], old["recomputed_at"]
        for part in ("layers", "first_pass"):
            for e in old[part] or []:
                del e["kept_tokens"], e["keep_ratio"]
        message = _refusal(old, tmp_path / f"{case}.json")
        assert "\n" not in message and "kept_tokens" in message and "asl trace FILE --upgrade OUT" in message
        assert "recomputed_at" in message  # what version 3 added too
        assert upgrade(old) == trace
        validate_trace(upgrade(old), arrays)


def test_a_version_2_trace_is_told_about_recomputed_at_and_upgrades(runs, tmp_path):
    """Version 3 added recomputed_at (a LongRoPE run's second prefill): a version-2 trace gets one line saying so and
    which traces must be made again, and `upgrade` sets it to null, giving what this version writes for a run that
    never crossed original_max_position_embeddings."""
    from reference.oracle.trace import upgrade, validate_trace

    for case in ("asl", "full"):
        _, trace, arrays = runs[case]
        old = json.loads(json.dumps(trace))
        old["schema_version"] = 2
        del old["recomputed_at"]
        message = _refusal(old, tmp_path / f"{case}.json")
        assert "\n" not in message and "recomputed_at" in message and "original_max_position_embeddings" in message
        assert "asl trace FILE --upgrade OUT" in message and "remake" in message
        assert upgrade(old) == trace
        validate_trace(upgrade(old), arrays)
