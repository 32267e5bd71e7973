"""The trace: a versioned record of every decision of one run (docs/semantics.md §7).

A trace is a JSON document (fields: `trace_schema.json`, docs/trace.md) and,
optionally, a sibling `.npz` with its arrays (logits, per-layer scores and
ranks, cached positions). `make_trace` builds both from a `Generation`;
`save_trace` writes them; `load_trace` reads them back and refuses, with an
OracleError that names the file and the JSON path, anything that does not
follow the schema or whose fields disagree with each other.

+inf is a legal ratio (V0 = 0 < v_ℓ, docs/semantics.md §8); JSON has no
infinity, so it is written as the string "inf". NaN is never valid.

(Length: the format's writer and its validator, which must agree field by field.)
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import math
import zipfile
import zlib
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from reference.asl.generate import Generation
from reference.asl.methods import LayerRecord, layer_flops
from reference.asl.params import METHOD, Params, check_params
from reference.errors import OracleError
from reference.io.atomic import atomic_write
from reference.io.checkpoint import shard_files
from reference.model.config import Config

SCHEMA_VERSION = 3
RECOMPUTED_AT = ("version 3 added recomputed_at, the generation step at which a LongRoPE (Phi-3) run ran its prefill "
                 "again once prompt + generated tokens passed original_max_position_embeddings (null for every other "
                 "run; version 2 decoded on there, so remake such a Phi-3 trace)")
UPGRADE = {  # what each older version lacks, in one line, and how to upgrade
    1: "version 2 added PyramidInfer: every layer entry gains kept_tokens (null, or len(kept_positions) at "
       "select_layer) and keep_ratio (null), and the trace gains decode_compressions (null) and the optional "
       f"step_logits/t arrays that judge decoding; {RECOMPUTED_AT}; make the trace again with this asl-oracle, or "
       "upgrade it with `asl trace FILE --upgrade OUT`",
    2: f"{RECOMPUTED_AT}; make the trace again with this asl-oracle, or upgrade any other with "
       "`asl trace FILE --upgrade OUT` (recomputed_at: null)",
}
SCHEMA_PATH = Path(__file__).with_name("trace_schema.json")
BYTES_PER_ELEMENT = {"float32": 4, "float64": 8}
INF = "inf"  # JSON spelling of ratio = +inf (and margin = +inf)
DTYPE_INFERRED = "dtype inferred:"  # how the kit's note begins when a candidate did not state its dtype


# ---------------------------------------------------------------- the model's identity


def weight_files(model_dir: str | Path) -> list[Path]:
    """model.safetensors, or the shards named in model.safetensors.index.json, in sorted name order."""

    return sorted(set(shard_files(Path(model_dir)).values()))


def model_sha256(model_dir: str | Path) -> str:
    """sha256 (hex) over the bytes of the weight files, concatenated in sorted name order."""
    digest = hashlib.sha256()
    for path in weight_files(model_dir):
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


# ---------------------------------------------------------------- making a trace


def json_number(x: float | str | None) -> float | str | None:
    """A record's float as JSON: None stays null, +inf (or the string "inf") becomes "inf"."""
    if x is None:
        return None
    if isinstance(x, str):
        return INF if x == INF else float(x)
    return INF if float(x) == math.inf else float(x)


def _layer_entry(rec: LayerRecord) -> dict:
    return {
        "layer": rec.layer,
        "prefill_tokens": rec.prefill_tokens,
        "kv_tokens": rec.kv_tokens,
        "flops": rec.flops,
        "scored": rec.scores is not None,
        "union_size": rec.union_size,
        "v": json_number(rec.v),
        "ratio": json_number(rec.ratio),
        "margin": json_number(rec.margin),
        "boundary_gap": json_number(rec.boundary_gap),
        "kv_boundary_gaps": None if rec.kv_boundary_gaps is None else [json_number(g) for g in rec.kv_boundary_gaps],
        "kept_tokens": None if rec.kept is None else len(rec.kept),
        "keep_ratio": json_number(rec.keep_ratio),
    }


def _scored_arrays(records: list[LayerRecord], prefix: str) -> dict[str, np.ndarray]:
    arrays = {}
    for rec in records:
        if rec.scores is not None:
            arrays[f"{prefix}ranks/{rec.layer}"] = np.asarray(rec.ranks, dtype=np.int64)  # (n-w,) or (N,)
            arrays[f"{prefix}scores/{rec.layer}"] = np.asarray(rec.scores)  # (n-w,) or (N,)
    return arrays


def make_trace(
    gen: Generation, *, model_name: str, model_sha256: str, config: Config, dtype: str
) -> tuple[dict, dict[str, np.ndarray]]:
    """The JSON-ready record of a run and its arrays (for the sibling .npz)."""
    run = gen.prefill
    if run is None:
        raise OracleError("the Generation carries no prefill record; make it with reference.asl.generate.generate")
    if dtype not in BYTES_PER_ELEMENT:
        raise OracleError(f"dtype must be one of {', '.join(BYTES_PER_ELEMENT)}, got {dtype!r}")
    if run.logits.dtype != np.dtype(dtype):
        raise OracleError(f"the run computed in {run.logits.dtype}, but dtype={dtype!r} was given; pass the run's dtype")
    L, H_kv, hd = config.num_hidden_layers, config.num_key_value_heads, config.head_dim
    if len(run.layers) != L or any(len(rec.kv_positions) != H_kv for rec in run.layers):
        raise OracleError(f"the config ({L} layers, {H_kv} KV heads) is not the one this run used; pass weights.config")
    N = len(gen.prompt_ids)
    bpe = BYTES_PER_ELEMENT[dtype]
    layers = [_layer_entry(rec) for rec in run.layers]
    first_pass = None if run.first_pass is None else [_layer_entry(rec) for rec in run.first_pass]
    kv_bytes = sum(2 * t * hd * bpe for entry in layers for t in entry["kv_tokens"])
    kv_bytes_full = 2 * L * H_kv * N * hd * bpe
    trace = {
        "schema_version": SCHEMA_VERSION,
        "method": run.method,
        "params": run.params.to_dict(run.method),
        "model": {
            "name": model_name,
            "sha256": model_sha256,
            "model_type": config.model_type,
            "num_hidden_layers": L,
            "num_attention_heads": config.num_attention_heads,
            "num_key_value_heads": H_kv,
            "head_dim": hd,
            "hidden_size": config.hidden_size,
            "intermediate_size": config.intermediate_size,
            "vocab_size": config.vocab_size,
        },
        "dtype": dtype,
        "prompt_ids": [int(t) for t in gen.prompt_ids],
        "num_prompt_tokens": N,
        "select_layer": run.select_layer,
        "kept_positions": None if run.kept_positions is None else [int(p) for p in run.kept_positions],
        "next_position": int(run.next_position),
        "generated_ids": [int(t) for t in gen.generated_ids],
        "generated_gaps": [float(g) for g in gen.generated_gaps],
        "notes": list(run.notes) + list(gen.notes),
        "layers": layers,
        "first_pass": first_pass,
        "recomputed_at": gen.recomputed_at,
        "decode_compressions": None if run.decode_state is None else [
            {"step": c.step, "layer": c.layer, "recent": c.recent, "scored_positions": [int(q) for q in c.scored],
             "kept_positions": [int(q) for q in c.kept], "boundary_gap": json_number(c.gap)}
            for c in gen.compressions],
        "totals": {
            "bytes_per_element": bpe,
            "kv_bytes": kv_bytes,
            "kv_bytes_full": kv_bytes_full,
            "kv_fraction": kv_bytes / kv_bytes_full,
            "prefill_flops": sum(e["flops"] for e in (first_pass or []) + layers),
            "prefill_flops_full": L * layer_flops(config, N),
        },
        "arrays_file": None,
    }
    arrays = {"logits": np.asarray(run.logits)}  # (V,)
    arrays |= _scored_arrays(run.layers, "")
    arrays |= _scored_arrays(run.first_pass or [], "first_pass/")
    for rec in run.layers:
        for g, pos in enumerate(rec.kv_positions):
            arrays[f"kv_positions/{rec.layer}/{g}"] = np.asarray(pos, dtype=np.int64)  # (S,)
        for g, score in enumerate(rec.kv_scores if rec.kv_scores is not None else []):
            arrays[f"kv_scores/{rec.layer}/{g}"] = np.asarray(score)  # (n-w,): SnapKV's score_g, by the layer's rows
        if rec.kept is not None and METHOD[run.method].per_layer:
            arrays[f"kept/{rec.layer}"] = np.asarray(rec.kept, dtype=np.int64)  # (kept_tokens,)
    for i, c in enumerate(gen.compressions):
        arrays[f"decode_scores/{i}"] = np.asarray(c.scores)  # (len(scored_positions),)
    for t, logits in enumerate(gen.step_logits[1:], start=1):
        arrays[f"step_logits/{t}"] = np.asarray(logits)  # (V,): generated id t was chosen from them
    return trace, arrays


def upgrade(doc: dict) -> dict:
    """A trace of an older schema_version brought to this one (UPGRADE says what each version added)."""
    version = doc.get("schema_version") if isinstance(doc, dict) else None
    if version == SCHEMA_VERSION:
        return doc
    if version not in UPGRADE:
        raise OracleError(f"schema_version {version!r}: no upgrade known (this reader understands {SCHEMA_VERSION})")
    doc = json.loads(json.dumps(doc))
    if version == 1:
        _upgrade_1_to_2(doc)
    doc["recomputed_at"] = None  # 2 -> 3: no LongRoPE recomputation known (UPGRADE[2] says which traces to remake)
    doc["schema_version"] = SCHEMA_VERSION
    return doc


def _upgrade_1_to_2(doc: dict) -> None:
    for part in ("layers", "first_pass"):
        for e in doc.get(part) or []:
            if isinstance(e, dict):
                selected = e.get("layer") == doc.get("select_layer") and doc.get("kept_positions") is not None
                own_pass = part == "first_pass" or not doc.get("first_pass")
                e["kept_tokens"] = len(doc["kept_positions"]) if selected and own_pass else None
                e["keep_ratio"] = None
    doc["decode_compressions"] = None


# ---------------------------------------------------------------- validation


class _Invalid(Exception):
    """A rule broken at a JSON path (or array name); turned into an OracleError naming the file."""

    def __init__(self, where: str, what: str):
        super().__init__(f"{where}: {what}")


@functools.lru_cache(maxsize=1)
def _validator():
    from jsonschema import Draft202012Validator

    return Draft202012Validator(json.loads(SCHEMA_PATH.read_text()))


def _check_finite(value, where: str = "$") -> None:
    """NaN is never valid, and +inf only as the string "inf"."""
    if isinstance(value, float) and not math.isfinite(value):
        what = "NaN" if math.isnan(value) else f"the number {value}"
        raise _Invalid(where, f"{what} is not valid; expected a finite number (an infinite ratio is written \"inf\")")
    if isinstance(value, dict):
        for key, item in value.items():
            _check_finite(item, f"{where}.{key}")
    elif isinstance(value, list):
        for i, item in enumerate(value):
            _check_finite(item, f"{where}[{i}]")


def _check_schema(doc: dict) -> None:
    from jsonschema.exceptions import best_match

    error = best_match(_validator().iter_errors(doc))
    if error is None:
        return
    if error.validator == "required":  # describe the missing field, not the object holding it
        missing = next(name for name in error.schema["required"] if name not in error.instance)
        field = error.schema["properties"][missing]
        raise _Invalid(error.json_path, f"{error.message} (expected: {missing}, {field['description']})")
    described = error  # an error inside anyOf: its parent carries the field's description
    while described is not None and "description" not in described.schema:
        described = described.parent
    expected = f" (expected: {described.schema['description']})" if described is not None else ""
    raise _Invalid(error.json_path, error.message + expected)


def _check_layers(entries: list[dict], where: str, doc: dict, max_tokens: int, first_pass: bool) -> None:
    model, budget = doc["model"], doc["params"]["kv_budget"]
    H_kv = model["num_key_value_heads"]
    for i, e in enumerate(entries):
        at = f"{where}[{i}]"
        if e["layer"] != i:
            raise _Invalid(f"{at}.layer", f"is {e['layer']}; expected {i} (entries are layers 0, 1, ... in order)")
        may_be_empty = first_pass and i == len(entries) - 1
        if len(e["kv_tokens"]) != H_kv and not (may_be_empty and not e["kv_tokens"]):
            raise _Invalid(f"{at}.kv_tokens", f"has {len(e['kv_tokens'])} entries; expected one per KV head ({H_kv})")
        if e["prefill_tokens"] > max_tokens:
            raise _Invalid(f"{at}.prefill_tokens", f"is {e['prefill_tokens']}; expected at most {max_tokens}")
        for g, t in enumerate(e["kv_tokens"]):
            if t > e["prefill_tokens"]:
                raise _Invalid(f"{at}.kv_tokens[{g}]", f"is {t}; expected at most prefill_tokens ({e['prefill_tokens']})")
        gaps = e["kv_boundary_gaps"]
        if gaps is not None and len(gaps) != H_kv:
            raise _Invalid(f"{at}.kv_boundary_gaps", f"has {len(gaps)} entries; expected one per KV head ({H_kv})")
        decides = budget is not None and e["prefill_tokens"] > budget and not (first_pass and METHOD[doc["method"]].decides == "last-query")
        if (gaps is not None) != decides:
            rule = (f"SnapKV decides exactly at the layers holding more than kv_budget ({budget}) tokens"
                    if budget is not None else "without a kv_budget SnapKV never decides")
            raise _Invalid(f"{at}.kv_boundary_gaps", f"is {'set' if gaps is not None else 'null'}; {rule} "
                           f"(this layer holds {e['prefill_tokens']}), so expected {'a list' if decides else 'null'}")
        asl = ("union_size", "v", "ratio", "margin")
        if not e["scored"] and any(e[k] is not None for k in asl + ("boundary_gap",)):
            raise _Invalid(at, "an unscored layer has a union_size, v, ratio, margin or boundary_gap; expected all null")
        if len({e[k] is None for k in asl}) > 1:
            raise _Invalid(at, "union_size, v, ratio and margin are partly null; "
                           "expected all four (ASL, ℓ ≥ L_min) or none")


def _check_margin(entries: list[dict], where: str, tau: float) -> None:
    for i, e in enumerate(entries):
        ratio, margin = e["ratio"], e["margin"]
        if ratio is None:
            continue
        if (ratio == INF) != (margin == INF):
            raise _Invalid(f"{where}[{i}].margin", f"is {margin!r} with ratio {ratio!r}; expected ratio - tau")
        if ratio != INF and not math.isclose(margin, ratio - tau, rel_tol=1e-9, abs_tol=1e-12):
            raise _Invalid(f"{where}[{i}].margin", f"is {margin}; expected ratio - tau = {ratio - tau}")


def _check_consistency(doc: dict) -> None:
    """The cross-field rules of docs/trace.md that the schema cannot express."""
    model, N = doc["model"], doc["num_prompt_tokens"]
    L, V = model["num_hidden_layers"], model["vocab_size"]
    if len(doc["prompt_ids"]) != N:
        raise _Invalid("$.num_prompt_tokens", f"is {N}; expected len(prompt_ids) = {len(doc['prompt_ids'])}")
    for field in ("prompt_ids", "generated_ids"):
        for i, t in enumerate(doc[field]):
            if t >= V:
                raise _Invalid(f"$.{field}[{i}]", f"is {t}; expected a token id in [0, {V}) (vocab_size)")
    if len(doc["generated_gaps"]) != len(doc["generated_ids"]):
        raise _Invalid("$.generated_gaps", f"has {len(doc['generated_gaps'])} entries; expected one per generated token "
                                           f"({len(doc['generated_ids'])})")
    again = doc["recomputed_at"]
    if again is not None and again >= len(doc["generated_ids"]):
        raise _Invalid("$.recomputed_at", f"is {again}; expected a generation step in [1, {len(doc['generated_ids'])}) "
                                          "(the step whose token the second prefill chose), or null")
    bpe = BYTES_PER_ELEMENT[doc["dtype"]]
    if doc["totals"]["bytes_per_element"] != bpe:
        got = doc["totals"]["bytes_per_element"]
        raise _Invalid("$.totals.bytes_per_element", f"is {got}; expected {bpe} for {doc['dtype']}")
    select, kept = doc["select_layer"], doc["kept_positions"]
    if (select is None) != (kept is None):
        raise _Invalid("$.kept_positions", "expected null exactly when select_layer is null")
    if select is not None and select >= L:
        raise _Invalid("$.select_layer", f"is {select}; expected a layer in [0, {L})")
    if kept is not None:
        if not kept or kept[0] < 0 or kept[-1] >= N or any(a >= b for a, b in zip(kept, kept[1:])):
            raise _Invalid("$.kept_positions", f"expected a non-empty, strictly ascending list of positions in [0, {N})")
    first = doc["first_pass"]
    expected_next = N if first is None else (len(kept) if kept is not None else None)
    if expected_next is None:
        raise _Invalid("$.first_pass", "a two-pass trace needs kept_positions (the tokens of the second pass)")
    if not 1 <= doc["next_position"] <= N:  # where decoding starts is judged (conformance), not assumed
        raise _Invalid("$.next_position", f"is {doc['next_position']}; expected a position in [1, N = {N}] (N for "
                                          "one-pass methods, len(kept_positions) after a second pass)")
    if len(doc["layers"]) != L:
        raise _Invalid("$.layers", f"has {len(doc['layers'])} entries; expected one per layer ({L})")
    _check_params(doc)
    if METHOD[doc["method"]].per_layer and (select is not None or first is not None):
        raise _Invalid("$.select_layer", "expected null (and first_pass null): pyramidinfer selects at every deciding "
                                         "layer (layers[].kept_tokens), never once")
    _check_layers(doc["layers"], "$.layers", doc, expected_next, first_pass=False)
    tau = doc["params"]["tau"]
    _check_margin(doc["layers"], "$.layers", tau)
    if first is not None:
        if not 1 <= len(first) <= L:
            raise _Invalid("$.first_pass", f"has {len(first)} entries; expected 1 to {L}")
        _check_layers(first, "$.first_pass", doc, N, first_pass=True)
        _check_margin(first, "$.first_pass", tau)
    _check_kept_tokens(doc, first)
    _check_totals(doc, bpe)


def _check_params(doc: dict) -> None:
    """The parameters in the ranges the method itself checks (the same words `asl run` says)."""
    try:
        check_params(doc["method"], Params(**doc["params"]), doc["model"]["num_hidden_layers"])
    except OracleError as e:
        raise _Invalid("$.params", str(e)) from None


def _check_kept_tokens(doc: dict, first) -> None:
    """Each layer of a pass holds what the layer before it kept; a one-shot selection keeps at select_layer only."""
    m, select, kept = METHOD[doc["method"]], doc["select_layer"], doc["kept_positions"]
    for part, entries in (("layers", doc["layers"]), ("first_pass", first or [])):
        for a, b in zip(entries, entries[1:]):
            held = a["prefill_tokens"] if a["kept_tokens"] is None else a["kept_tokens"]
            if b["prefill_tokens"] != held:
                raise _Invalid(f"$.{part}[{b['layer']}].prefill_tokens", f"is {b['prefill_tokens']}; expected {held}, "
                               f"what layer {a['layer']} {'kept' if a['kept_tokens'] is not None else 'held'}")
        for e in entries:
            at = f"$.{part}[{e['layer']}]"
            if e["kept_tokens"] is not None and e["kept_tokens"] > e["prefill_tokens"]:
                raise _Invalid(f"{at}.kept_tokens", f"is {e['kept_tokens']}; expected at most prefill_tokens "
                               f"({e['prefill_tokens']})")
            if not m.per_layer:
                selecting = kept is not None and e["layer"] == select and (part == "first_pass") == (first is not None)
                want = len(kept) if selecting else None
                if e["kept_tokens"] != want:
                    raise _Invalid(f"{at}.kept_tokens", f"is {e['kept_tokens']}; expected {want} ({doc['method']} "
                                   "selects once, at select_layer, keeping len(kept_positions))")
            if (e["keep_ratio"] is not None) and not (m.per_layer and e["layer"] % doc["params"][
                    "layerwise_downsample_interval"] == 0):
                raise _Invalid(f"{at}.keep_ratio", "is set; expected null (only PyramidInfer's deciding layers have one)")
    compressions = doc["decode_compressions"]
    on = m.per_layer and doc["params"]["gen_compress"]
    if (compressions is not None) != on:
        raise _Invalid("$.decode_compressions", f"is {'a list' if compressions is not None else 'null'}; expected "
                       f"{'a list (possibly empty)' if on else 'null'}: only PyramidInfer with gen_compress compresses "
                       "in decoding")
    L, fed = doc["model"]["num_hidden_layers"], max(len(doc["generated_ids"]) - 1, 0)
    for i, c in enumerate(compressions or []):
        at = f"$.decode_compressions[{i}]"
        if c["layer"] >= L or c["step"] > fed:
            raise _Invalid(at, f"step {c['step']}, layer {c['layer']}: expected a layer < {L} and a step ≤ {fed} "
                               "(the tokens fed back: every generated token but the last)")
        scored, kept_here = c["scored_positions"], c["kept_positions"]
        for name, pos in (("scored_positions", scored), ("kept_positions", kept_here)):
            if any(a >= b for a, b in zip(pos, pos[1:])):
                raise _Invalid(f"{at}.{name}", "expected strictly ascending positions")
        if not set(kept_here) <= set(scored):
            raise _Invalid(f"{at}.kept_positions", "expected a subset of scored_positions")


def _check_totals(doc: dict, bpe: int) -> None:
    model, totals, N = doc["model"], doc["totals"], doc["num_prompt_tokens"]
    L, H_kv, hd = model["num_hidden_layers"], model["num_key_value_heads"], model["head_dim"]
    shape = SimpleNamespace(**{k: model[k] for k in ("hidden_size", "intermediate_size", "head_dim",
                                                      "num_attention_heads", "num_key_value_heads")})
    kv_bytes = sum(2 * t * hd * bpe for e in doc["layers"] for t in e["kv_tokens"])
    expected = {
        "kv_bytes": kv_bytes,
        "kv_bytes_full": 2 * L * H_kv * N * hd * bpe,
        "prefill_flops": sum(e["flops"] for e in (doc["first_pass"] or []) + doc["layers"]),
        "prefill_flops_full": L * layer_flops(shape, N),
    }
    for key, value in expected.items():
        if totals[key] != value:
            raise _Invalid(f"$.totals.{key}", f"is {totals[key]}; expected {value} (docs/trace.md gives the formula)")
    fraction = expected["kv_bytes"] / expected["kv_bytes_full"]
    if not math.isclose(totals["kv_fraction"], fraction, rel_tol=1e-12):
        raise _Invalid("$.totals.kv_fraction", f"is {totals['kv_fraction']}; expected kv_bytes / kv_bytes_full = {fraction}")


def _expected_arrays(doc: dict) -> dict[str, int | None]:
    """Array name -> its length (None: checked against its partner or the vocabulary)."""
    names: dict[str, int | None] = {"logits": doc["model"]["vocab_size"]}
    for prefix, entries in (("", doc["layers"]), ("first_pass/", doc["first_pass"] or [])):
        for e in entries:
            if e["scored"]:
                names[f"{prefix}ranks/{e['layer']}"] = None
                names[f"{prefix}scores/{e['layer']}"] = None
    for e in doc["layers"]:
        for g, t in enumerate(e["kv_tokens"]):
            names[f"kv_positions/{e['layer']}/{g}"] = t
        if e["kv_boundary_gaps"] is not None:  # SnapKV decided here: the scores it decided on, per KV head
            for g in range(len(e["kv_tokens"])):
                names[f"kv_scores/{e['layer']}/{g}"] = e["prefill_tokens"] - doc["params"]["window"]
        if e["kept_tokens"] is not None and METHOD[doc["method"]].per_layer:
            names[f"kept/{e['layer']}"] = e["kept_tokens"]
    for i, c in enumerate(doc["decode_compressions"] or []):
        names[f"decode_scores/{i}"] = len(c["scored_positions"])
    return names


def _pass_length(doc: dict) -> int:
    """How many positions the decoding pass numbers: N, or len(kept_positions) after a second pass."""
    return doc["num_prompt_tokens"] if doc["first_pass"] is None else len(doc["kept_positions"])


def _check_arrays(doc: dict, arrays: dict[str, np.ndarray]) -> None:
    expected = _expected_arrays(doc)
    steps = [n for n in arrays if n.startswith("step_logits/")]  # optional: all of them, or none
    if steps:
        expected |= {f"step_logits/{t}": doc["model"]["vocab_size"] for t in range(1, len(doc["generated_ids"]))}
    missing = [name for name in expected if name not in arrays]
    if missing:
        raise _Invalid(f"array '{missing[0]}'", f"is missing ({len(missing)} missing in all); the JSON fields imply it")
    extra = sorted(set(arrays) - set(expected))
    if extra:
        raise _Invalid(f"array '{extra[0]}'", "is not implied by the JSON fields (no such scored layer or KV head)")
    for name, a in arrays.items():
        kind = "f" if name == "logits" or "scores/" in name or "logits/" in name else "i"  # scores, step logits
        if a.ndim != 1 or a.dtype.kind != kind:
            want = "floating" if kind == "f" else "integer"
            raise _Invalid(f"array '{name}'", f"has shape {a.shape} and dtype {a.dtype}; expected a 1-D {want} array")
        if kind == "f" and not np.isfinite(a).all():
            raise _Invalid(f"array '{name}'", "holds NaN or an infinity; scores and logits are finite numbers")
        if expected[name] is not None and len(a) != expected[name]:
            raise _Invalid(f"array '{name}'", f"has length {len(a)}; expected {expected[name]}")
    for name in expected:
        if "ranks/" in name:
            rank, score = arrays[name], arrays[name.replace("ranks/", "scores/")]
            if len(rank) != len(score) or not np.array_equal(np.sort(rank), np.arange(1, len(rank) + 1)):
                raise _Invalid(f"array '{name}'", "expected a permutation of 1 .. len(scores)")
        if name.startswith("kept/"):
            pos, N = arrays[name], doc["num_prompt_tokens"]
            if len(pos) and (pos[0] < 0 or pos[-1] >= N or (np.diff(pos) <= 0).any()):
                raise _Invalid(f"array '{name}'", f"expected strictly ascending prompt positions in [0, {N})")
        if name.startswith("kv_positions/"):
            pos, bound = arrays[name], _pass_length(doc)
            if len(pos) and (pos[0] < 0 or pos[-1] >= bound or (np.diff(pos) <= 0).any()):
                raise _Invalid(f"array '{name}'", f"expected strictly ascending positions in [0, {bound})")


def _validate(doc, arrays: dict[str, np.ndarray] | None) -> None:
    if not isinstance(doc, dict):
        raise _Invalid("$", f"is a JSON {type(doc).__name__}; expected an object")
    version = doc.get("schema_version")
    if version in UPGRADE:
        raise _Invalid("$.schema_version", f"is {version}, this reader's is {SCHEMA_VERSION}: {UPGRADE[version]}")
    if version != SCHEMA_VERSION:
        raise _Invalid("$.schema_version", f"is {version!r}; this reader understands {SCHEMA_VERSION} only "
                       "(re-make the trace with this version of asl-oracle)")
    _check_finite(doc)
    _check_schema(doc)
    _check_consistency(doc)
    if arrays is not None:
        _check_arrays(doc, arrays)


# ---------------------------------------------------------------- saving and loading


def save_trace(trace: dict, arrays: dict[str, np.ndarray], path: str | Path, *, with_arrays: bool) -> None:
    """Write the JSON to `path` and, with_arrays, the arrays to `path` with suffix .npz; both are validated first."""
    path = Path(path)
    npz = path.with_suffix(".npz")
    if npz == path:
        raise OracleError(f"{path}: a trace's JSON file cannot end in .npz (its arrays go there); use .json")
    doc = {**trace, "arrays_file": npz.name if with_arrays else None}
    try:
        _validate(doc, arrays if with_arrays else None)
    except _Invalid as e:
        raise OracleError(f"refusing to write {path}: {e}") from None
    try:  # each file atomically: a crash never leaves half a trace
        if with_arrays:
            buffer = io.BytesIO()
            np.savez_compressed(buffer, **arrays)
            atomic_write(npz, buffer.getvalue())
        atomic_write(path, json.dumps(doc, indent=1, sort_keys=True, allow_nan=False, ensure_ascii=False) + "\n")
    except OSError as e:
        raise OracleError(f"cannot write the trace to {path}: {e.strerror or e}") from None


def read_npz(path: Path, trace_name: str) -> dict[str, np.ndarray]:
    if not path.is_file():
        raise OracleError(f"{path}: missing, but {trace_name} names it in arrays_file; copy it next to "
                          "the JSON, or set arrays_file to null")
    try:
        npz = np.load(path, allow_pickle=False)
        if not isinstance(npz, np.lib.npyio.NpzFile):
            raise ValueError("a single .npy array, not an .npz archive")
        with npz:
            arrays = {name: npz[name] for name in npz.files}
        for name, a in arrays.items():
            if not isinstance(a, np.ndarray):  # NpzFile hands back a member that is not .npy as raw bytes
                raise ValueError(f"member {name!r} is not a .npy array")
        return arrays
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile, zlib.error) as e:
        raise OracleError(f"{path}: not a readable .npz archive ({e}); re-save the trace with its arrays") from None


def load_trace(path: str | Path) -> tuple[dict, dict[str, np.ndarray]]:
    """Read and validate a trace; its arrays too when arrays_file names them (else {})."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise OracleError(f"{path}: no such trace file") from None
    except UnicodeDecodeError as e:
        raise OracleError(f"{path}: not valid JSON (not UTF-8 text: {e.reason})") from None
    except OSError as e:
        raise OracleError(f"{path}: cannot read the trace ({e.strerror or e})") from None
    try:
        doc = json.loads(text)
    except (ValueError, RecursionError) as e:
        raise OracleError(f"{path}: not valid JSON ({e}); a trace is the JSON file save_trace writes") from None
    try:
        _validate(doc, None)
    except _Invalid as e:
        raise OracleError(f"{path}: {e}") from None
    if doc["arrays_file"] is None:
        return doc, {}
    npz = path.parent / doc["arrays_file"]
    arrays = read_npz(npz, path.name)
    try:
        _check_arrays(doc, arrays)
    except _Invalid as e:
        raise OracleError(f"{npz} (arrays of {path.name}): {e}") from None
    return doc, arrays


def validate_trace(trace: dict, arrays: dict[str, np.ndarray] | None = None, source: str = "trace") -> None:
    """Check an in-memory trace (and its arrays) as load_trace checks a file; OracleError names the field."""
    try:
        _validate(trace, arrays)
    except _Invalid as e:
        raise OracleError(f"{source}: {e}") from None
