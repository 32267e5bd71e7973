"""The implementer's kit: from what an implementation decided to a candidate trace `asl check` judges.

An implementation knows its decisions: per layer the positions each KV head
cached (and the scores it chose them by), the selection layer and kept
positions, the next-token logits, the generated ids. Everything else in a
trace (docs/trace.md) follows from those and the model's shape: token counts,
FLOPs, totals, ranks of the scores (SPEC's tie rule), boundary gaps, ASL's
margins, the standard notes, the second-pass numbering of two-pass caches.
`build_candidate` fills it, refuses decisions that cannot be right with a
one-line OracleError naming the layer and KV head, and validates the result;
`write_candidate` saves it where `asl check` looks.

    case = read_case("bundles/tiny-llama", "tiny-llama-snapkv")
    layers = [LayerDecision(kv_positions=[...per KV head...], kv_scores=[...]) for each layer]
    trace, arrays = build_candidate(case, model_shape(case.model_dir()), layers=layers, logits=logits,
                                    generated_ids=ids, step_logits=per_step_logits)
    write_candidate("cand", case, trace, arrays)

Decisions are taken as given: what the kit derives never replaces a decision,
so the checker still re-derives every decision from the candidate's own
numbers (rule 0, docs/conformance.md). Ranks derived here follow SPEC's tie
rule; an implementation whose own ranks differ (an unstable sort) passes
`ranks=` and is judged on them.

(Length: one builder per trace part, each with the refusals its decisions need.)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from reference.asl import pyramid
from reference.asl.criterion import Criterion
from reference.asl.methods import (
    NEVER_FIRED_TWO_PASS,
    NOTHING_SELECTED,
    layer_flops,
    qk_flops,
    short_prompt_notes,
)
from reference.asl.params import METHOD
from reference.asl.selection import boundary_gap, ranks, select_k_prime
from reference.errors import OracleError
from reference.io.fetch import resolve_model
from reference.model.config import load_config
from reference.oracle.bundle import plain_case_name, read_inputs, read_manifest
from reference.oracle.consistency import scored_layers
from reference.oracle.trace import (
    BYTES_PER_ELEMENT,
    DTYPE_INFERRED,
    INF,
    SCHEMA_VERSION,
    json_number,
    save_trace,
    validate_trace,
)

SHAPE_KEYS = ("model_type", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
              "hidden_size", "intermediate_size", "vocab_size")


# ---------------------------------------------------------------- a case's inputs


@dataclass(frozen=True)
class CaseInputs:
    """What one bundle case asks an implementation to run (the bundle's CASE.inputs.json)."""

    name: str
    model: str  # the checkpoint alias (tiny-llama, tiny-qwen2, smollm2) or directory given to `asl golden`
    model_sha256: str
    prompt_ids: list[int]
    method: str
    params: dict  # every parameter, resolved (window, kernel, pooling, select_k, tau, ..., kv_budget)
    max_new_tokens: int
    eos_token_ids: list[int]
    dtype: str  # the oracle's dtype

    def model_dir(self) -> Path:
        """The checkpoint directory of `model` (never touches the network)."""
        return resolve_model(self.model)


def read_case(bundle: str | Path, name: str) -> CaseInputs:
    """One case of a bundle written by `asl golden`."""
    return case_from_inputs(read_inputs(Path(bundle), name), f"{Path(bundle) / f'{name}.inputs.json'}")


def case_from_inputs(raw: dict, source: str = "inputs") -> CaseInputs:
    """A CaseInputs from the dict of a CASE.inputs.json (its `case` key names it)."""
    name = raw.get("case", "case") if isinstance(raw, dict) else "case"
    try:
        return CaseInputs(name=name, model=str(raw["model"]["name"]), model_sha256=str(raw["model"]["sha256"]),
                          prompt_ids=[int(t) for t in raw["prompt_ids"]], method=raw["method"],
                          params=dict(raw["params"]), max_new_tokens=int(raw["max_new_tokens"]),
                          eos_token_ids=[int(t) for t in raw["eos_token_ids"]], dtype=str(raw["dtype"]))
    except (KeyError, TypeError, ValueError) as e:
        raise OracleError(f"{source}: missing or malformed {e}; rewrite the bundle with `asl golden`") from None


def read_cases(bundle: str | Path, methods=None) -> list[CaseInputs]:
    """Every case of a bundle, in manifest order (only those of `methods` when given)."""
    names = read_manifest(Path(bundle))["cases"]
    cases = [read_case(bundle, name) for name in names]
    return [c for c in cases if methods is None or c.method in methods]


def model_shape(source) -> dict:
    """The eight shape fields of a trace's `model`, from a checkpoint directory, a dict, or a config object
    (reference.model.config.Config, transformers' PretrainedConfig)."""
    if isinstance(source, (str, Path)):
        source = load_config(Path(source))
    get = source.get if isinstance(source, dict) else lambda k, default=None: getattr(source, k, default)
    shape = {k: get(k) for k in SHAPE_KEYS}
    if shape["head_dim"] is None and shape["hidden_size"] and shape["num_attention_heads"]:
        shape["head_dim"] = shape["hidden_size"] // shape["num_attention_heads"]
    missing = [k for k, v in shape.items() if v is None]
    if missing:
        raise OracleError(f"model shape: {', '.join(missing)} missing; pass the checkpoint directory, its config, "
                          f"or a dict with {', '.join(SHAPE_KEYS)}")
    return shape


# ---------------------------------------------------------------- decisions


@dataclass
class LayerDecision:
    """What one layer of an implementation decided during prefill.

    kv_positions: REQUIRED on every layer of the pass decoding uses: per KV head, the PROMPT positions its cache
                  holds after prefill, in any order (two-pass
                  methods: prompt positions too; the kit renumbers them to the second pass's 0 .. |kept|-1).
                  In a first pass (`first_pass=`) it may be left None: the scoring pass's cache is thrown away.
    kv_scores:    SnapKV's score_g per KV head over the layer's prefix rows (prefill_tokens - w,), in row order;
                  required exactly where SnapKV decides (kv_budget set and the layer holds more than B tokens).
    scores:       the token scores of a layer the method scores (ASL, FastKV: (n - w,); GemFilter's filter
                  layer: (N,)); required exactly at the layers SPEC's method scores.
    ranks:        your own ranks of `scores` (1 = best); default: SPEC's (ties: the earlier position first).
    union_size, v, ratio: ASL's criterion at ℓ ≥ L_min, if you computed it; default: replayed on the ranks.
    kept:         PyramidInfer: the prompt positions that go on to the next layer, where this layer pruned (None
                  where every token goes on). Its `scores` are the layer's context scores (c,), before the sinks
                  are forced; its kv_positions are the positions the layer held, the same in every KV head.
    """

    kv_positions: list | None = None  # [H_kv] of (S_g,) prompt positions
    kv_scores: list | None = None  # [H_kv] of (n - w,) or None
    scores: object = None  # (n - w,) or (N,)
    ranks: object = None  # as scores, int
    union_size: int | None = None
    v: float | None = None
    ratio: float | str | None = None
    kept: list | None = None  # PyramidInfer: (kept_tokens,) prompt positions


@dataclass
class _Pass:
    """One pass being built: its token positions (prompt positions of its rows) and the layer entries."""

    rows: np.ndarray  # (n,) prompt positions of this pass's tokens
    first: bool
    entries: list = field(default_factory=list)
    arrays: dict = field(default_factory=dict)
    fired: bool = False  # ASL's criterion fired in this pass (replayed on its ranks)


def _bad(case: CaseInputs, where: str, what: str) -> OracleError:
    return OracleError(f"case {case.name}: {where}: {what}")


def _distinct_prompt_positions(case, at: str, pos: np.ndarray, N: int, twice: str) -> np.ndarray:
    """pos, sorted, after refusing a position outside [0, N) or one given twice ("position q is <twice>")."""
    outside = [int(q) for q in pos if not 0 <= q < N]
    if outside:
        raise _bad(case, at, f"position {outside[0]} is outside the prompt [0, {N})")
    uniq, counts = np.unique(pos, return_counts=True)
    if (counts > 1).any():
        raise _bad(case, at, f"position {int(uniq[counts > 1][0])} is {twice}")
    return uniq


def _float_array(a, dtype: str) -> np.ndarray:
    a = np.asarray(a)
    return a if a.dtype.kind == "f" else a.astype(dtype)


def _positions_of_layer(n_rows: np.ndarray, select_layer, kept, layer: int, first: bool, method) -> np.ndarray:
    """The prompt positions a layer held, in row order (one-shot: all of them up to ℓ*, the kept ones after)."""
    if not first and not method.two_pass and select_layer is not None and layer > select_layer:
        return kept
    return n_rows


def _check_kv(case, where: str, given, held: np.ndarray, H_kv: int) -> list[np.ndarray]:
    """Each KV head's cached prompt positions: inside the prompt, among the rows the layer held, no duplicates."""
    if given is None or len(given) != H_kv:
        count = "none" if given is None else len(given)
        raise _bad(case, where, f"kv_positions has {count} KV heads; the model has {H_kv} (one list of cached "
                   "prompt positions per KV head)")
    N, out = len(case.prompt_ids), []
    held_set = set(held.tolist())
    for g, pos in enumerate(given):
        pos = np.asarray(pos)
        at = f"{where}, KV head {g}"
        if pos.ndim != 1 or (pos.size and pos.dtype.kind not in "iu"):
            raise _bad(case, at, f"kv_positions must be a 1-D list of integer positions, got shape {pos.shape} "
                       f"{pos.dtype}")
        pos = pos.astype(np.int64)
        if len(pos) > len(held):
            raise _bad(case, at, f"{len(pos)} positions cached, but the layer held {len(held)} tokens")
        _distinct_prompt_positions(case, at, pos, N, "cached twice (each position once)")
        foreign = [int(p) for p in pos if int(p) not in held_set]
        if foreign:
            raise _bad(case, at, f"position {foreign[0]} was not among the {len(held)} tokens this layer held "
                       "(after a one-shot selection a layer holds only the kept positions)")
        out.append(np.sort(pos))
    return out


def _build_pass(case, shape, p: dict, decisions: list, part: _Pass, select_layer, kept, dtype: str) -> _Pass:
    method = METHOD[case.method]
    H_kv, N, w, B = shape["num_key_value_heads"], len(case.prompt_ids), p["window"], p["kv_budget"]
    flop_shape = SimpleNamespace(**shape)
    scored = set() if method.per_layer else scored_layers({
        "method": case.method, "params": p, "num_prompt_tokens": N, "select_layer": select_layer,
        "layers": [None] * shape["num_hidden_layers"],
        "first_pass": [None] if method.two_pass and select_layer is not None else None})[1 if part.first else 0]
    gemfilter = method.decides == "last-query"
    criterion = None
    if method.decides == "criterion" and (part.first or not method.two_pass):
        n0 = len(part.rows)
        criterion = Criterion(p["tau"], p["l_min"], p["l_obs"], select_k_prime(p["select_k"], n0, w))
    prefix = "first_pass/" if part.first else ""
    name = "first_pass" if part.first else "layers"
    held = part.rows
    W = pyramid.recent_length(N, p["recent_ratio"]) + 1 if method.per_layer else None  # PyramidInfer's window
    for layer, d in enumerate(decisions):
        where = f"{name}[{layer}]"
        if not method.per_layer:
            held = _positions_of_layer(part.rows, select_layer, kept, layer, part.first, method)
        elif layer % p["layerwise_downsample_interval"] == 0 and len(held) > W:
            scored.add(layer)  # PyramidInfer scores its deciding layers that hold a context
        n = len(held)
        filter_layer = part.first and gemfilter and layer == len(decisions) - 1
        entry = {"layer": layer, "prefill_tokens": n, "flops": qk_flops(flop_shape, n) if filter_layer
                 else layer_flops(flop_shape, n), "scored": layer in scored, "union_size": None, "v": None,
                 "ratio": None, "margin": None, "boundary_gap": None, "kv_boundary_gaps": None}
        # the layer's token scores (SPEC 1), where its method scores
        if (d.scores is not None) != (layer in scored):
            lo_hi = f"{min(scored)}-{max(scored)}" if scored else "none"
            raise _bad(case, where, f"scores {'given' if d.scores is not None else 'missing'}; SPEC's {case.method} "
                       f"scores layers {lo_hi} of this pass (given select_layer {select_layer}), so scores are "
                       f"{'required there' if layer in scored else 'not expected here'}")
        score = None if d.scores is None else _float_array(d.scores, dtype)
        if score is not None and not method.per_layer:
            want = n if filter_layer else n - w
            if score.shape != (want,):
                raise _bad(case, where, f"scores has shape {score.shape}; expected ({want},), one per "
                           f"{'prompt token' if filter_layer else 'prefix token (n - w)'}")
        if score is not None and method.per_layer:  # PyramidInfer: the context scores (c,), sinks ranked first
            if score.shape != (n - W,):
                raise _bad(case, where, f"scores has shape {score.shape}; expected ({n - W},), one per context "
                           f"token (n − W, W = int(N · recent_ratio) + 1 = {W})")
            forced = pyramid.sink_forced(score, p["streamingllm_sink_len"])
            rank = ranks(forced) if d.ranks is None else np.asarray(d.ranks, dtype=np.int64)
            entry["boundary_gap"] = json_number(None if d.kept is None else boundary_gap(forced, len(d.kept) - W))
            part.arrays[f"ranks/{layer}"], part.arrays[f"scores/{layer}"] = rank, score
            score = None  # recorded: the one-shot methods' bookkeeping below does not apply
        if score is not None:
            rank = ranks(score) if d.ranks is None else np.asarray(d.ranks, dtype=np.int64)
            count = min(p["select_k"], n) if filter_layer else select_k_prime(p["select_k"], n, w)
            entry["boundary_gap"] = json_number(boundary_gap(score, count))
            part.arrays[f"{prefix}ranks/{layer}"] = rank  # (n-w,) or (N,)
            part.arrays[f"{prefix}scores/{layer}"] = score
            if criterion is not None:
                seen = criterion.observe(layer, rank)
                if seen is not None:
                    part.fired |= seen.fires
                    given = (d.union_size, d.v, d.ratio)
                    entry["union_size"] = int(seen.variance.union_size if d.union_size is None else d.union_size)
                    entry["v"] = json_number(seen.variance.v if d.v is None else d.v)
                    entry["ratio"] = json_number(float(seen.ratio) if d.ratio is None else d.ratio)
                    entry["margin"] = INF if entry["ratio"] == INF else entry["ratio"] - p["tau"]
                    if any(x is not None for x in given) and None in given:
                        raise _bad(case, where, "give union_size, v and ratio together, or none (the kit replays "
                                   "them on the ranks)")
        # the cache after prefill, per KV head (SPEC 5: SnapKV decides where B is set and n > B)
        snapkv = B is not None and n > B and not (part.first and gemfilter)
        if filter_layer:
            kv = []  # GemFilter's filter layer computes q and k only, and caches nothing
        elif d.kv_positions is None and part.first:
            kv = [np.arange(min(n, B) if snapkv else n)] * H_kv  # the scoring pass's cache, thrown away
        else:
            kv = _check_kv(case, where, d.kv_positions, held, H_kv)
        entry["kv_tokens"] = [len(x) for x in kv]
        if (d.kv_scores is not None) != snapkv:
            rule = f"kv_budget B = {B} and this layer holds {n} tokens"
            raise _bad(case, where, f"kv_scores {'given' if d.kv_scores is not None else 'missing'}; SnapKV "
                       f"{'decides' if snapkv else 'does not decide'} here ({rule}), so its scores are "
                       f"{'required' if snapkv else 'not expected'}")
        if snapkv:
            if len(d.kv_scores) != H_kv:
                raise _bad(case, where, f"kv_scores has {len(d.kv_scores)} KV heads; the model has {H_kv}")
            gaps = []
            for g, s in enumerate(d.kv_scores):
                s = _float_array(s, dtype)
                if s.shape != (n - w,):
                    raise _bad(case, f"{where}, KV head {g}", f"kv_scores has shape {s.shape}; expected ({n - w},), "
                               "one per prefix row of the layer, in row order")
                if not part.first and len(kv[g]) != B:
                    raise _bad(case, f"{where}, KV head {g}", f"{len(kv[g])} positions cached where SnapKV decides; "
                               f"it keeps exactly B = {B}")
                gaps.append(json_number(boundary_gap(s, B - w)))
                if not part.first:
                    part.arrays[f"kv_scores/{layer}/{g}"] = s  # (n-w,): score_g by the layer's rows
            entry["kv_boundary_gaps"] = gaps
        if not part.first:
            for g, pos in enumerate(kv):
                if method.two_pass:  # second pass: position i is prompt position kept[i]
                    pos = np.searchsorted(kept, pos)
                part.arrays[f"kv_positions/{layer}/{g}"] = np.asarray(pos, dtype=np.int64)  # (S_g,) ascending
        entry["kept_tokens"], entry["keep_ratio"] = None, None
        selecting = kept is not None and layer == select_layer and (part.first or not method.two_pass)
        if selecting:
            entry["kept_tokens"] = len(kept)
        if method.per_layer:
            if pyramid.decides(layer, SimpleNamespace(**p)):
                entry["keep_ratio"] = pyramid.schedule(layer, len(decisions), p["prefill_decay_ratio"],
                                                       p["prefill_decay_strategy"])
            if d.kept is not None:
                pruned = _distinct_prompt_positions(case, f"{where}.kept", np.asarray(d.kept).astype(np.int64), N,
                                                    "kept twice")
                foreign = sorted(set(pruned.tolist()) - set(held.tolist()))
                if foreign:
                    raise _bad(case, f"{where}.kept", f"position {foreign[0]} was not among the {n} tokens this "
                               "layer held (a layer holds what the one before it kept)")
                entry["kept_tokens"] = len(pruned)
                part.arrays[f"kept/{layer}"] = pruned
                held = pruned
        elif d.kept is not None:
            raise _bad(case, f"{where}.kept", f"{case.method} selects once (select_layer, kept_positions); "
                       "LayerDecision.kept is PyramidInfer's per-layer kept set")
        part.entries.append({k: entry[k] for k in ("layer", "prefill_tokens", "kv_tokens", "flops", "scored",
                                                   "union_size", "v", "ratio", "margin", "boundary_gap",
                                                   "kv_boundary_gaps", "kept_tokens", "keep_ratio")})
    return part


def _check_kept(case, p: dict, select_layer, kept_positions, L: int):
    method, N, w = METHOD[case.method], len(case.prompt_ids), p["window"]
    if (select_layer is None) != (kept_positions is None):
        raise _bad(case, "kept_positions", "give select_layer and kept_positions together (both None when nothing "
                   "was selected)")
    if select_layer is None:
        if method.two_pass and N > w:
            raise _bad(case, "select_layer", f"{case.method} always selects (two-pass ASL falls back to the last "
                       "layer when its criterion never fires); give select_layer and kept_positions")
        return None
    if not method.selects:
        raise _bad(case, "select_layer", f"{case.method} selects nothing; pass select_layer=None")
    if not 0 <= int(select_layer) < L:
        raise _bad(case, "select_layer", f"is {select_layer}; expected a layer in [0, {L})")
    kept = np.asarray(kept_positions).astype(np.int64)
    at = f"kept_positions (selection layer {select_layer})"
    uniq = _distinct_prompt_positions(case, at, kept, N, "kept twice")
    if method.decides != "last-query" and N - 1 not in uniq:
        raise _bad(case, at, f"the last prompt token ({N - 1}) is not kept; {case.method} always keeps the window "
                   f"{N - w} .. {N - 1}")
    return uniq  # ascending


def _notes(case, p: dict, select_layer) -> list[str]:
    """The reference's notes (reference.asl.methods.run_prefill), in its words: notes are never compared."""
    method, N = METHOD[case.method], len(case.prompt_ids)
    notes = short_prompt_notes(method, N, SimpleNamespace(window=p["window"], select_k=p["select_k"]))
    if method.scores and N <= p["window"]:
        return notes
    if method.decides == "criterion" and not method.two_pass and select_layer is None:
        notes.append(NOTHING_SELECTED)
    return notes


def _greedy(case, generated_ids, generated_gaps, step_logits) -> list[float]:
    if generated_gaps is not None:
        if len(generated_gaps) != len(generated_ids):
            raise _bad(case, "generated_gaps", f"has {len(generated_gaps)} entries; expected one per generated token "
                       f"({len(generated_ids)})")
        return [float(g) for g in generated_gaps]
    if step_logits is None:
        raise _bad(case, "generated_gaps", "give generated_gaps (best minus second-best logit per step) or "
                   "step_logits (the logits each generated token was chosen from)")
    if len(step_logits) != len(generated_ids):
        raise _bad(case, "step_logits", f"has {len(step_logits)} steps; expected one per generated token "
                   f"({len(generated_ids)})")
    gaps = []
    for i, (token, logits) in enumerate(zip(generated_ids, step_logits)):
        logits = np.asarray(logits, dtype=np.float64)
        if int(np.argmax(logits)) != token:
            raise _bad(case, f"generated_ids[{i}]", f"is {token}, but the arg-max of step_logits[{i}] is "
                       f"{int(np.argmax(logits))} (greedy decoding, lowest id on exact ties)")
        top2 = np.sort(logits)[-2:]
        gaps.append(float(top2[1] - top2[0]))
    return gaps


def _next_position(case, given, contract: int) -> int:
    if given is None:
        return contract
    N = len(case.prompt_ids)
    if isinstance(given, bool) or not isinstance(given, (int, np.integer)) or not 1 <= int(given) <= N:
        raise _bad(case, "next_position", f"is {given!r}; expected the position of the first generated token, an "
                   f"integer in [1, N = {N}] (the contract's is {contract})")
    return int(given)


def _step_logits(case, step_logits, V: int, dtype: str) -> dict:
    """step_logits/t for t ≥ 1, each (V,) and finite: generated id t was chosen from them."""
    arrays = {}
    for t, logits in enumerate(step_logits or []):
        a = _float_array(logits, dtype)
        if a.shape != (V,):
            raise _bad(case, f"step_logits[{t}]", f"has shape {a.shape}; expected ({V},), the logits over the vocabulary")
        if not np.isfinite(a).all():
            raise _bad(case, f"step_logits[{t}]", "holds NaN or an infinity; logits are finite numbers")
        if t:
            arrays[f"step_logits/{t}"] = a.astype(dtype)
    return arrays


def build_candidate(case: CaseInputs, shape: dict, *, layers: list[LayerDecision], logits, generated_ids,
                    generated_gaps=None, step_logits=None, select_layer: int | None = None, kept_positions=None,
                    first_pass: list[LayerDecision] | None = None, dtype: str | None = None,
                    notes: list[str] | None = None, model_sha256: str | None = None,
                    decode_compressions: list[dict] | None = None,
                    next_position: int | None = None, recomputed_at: int | None = None) -> tuple[dict, dict]:
    """A candidate trace and its arrays (docs/trace.md) from an implementation's decisions on one case.

    shape: model_shape(...). dtype: what you computed in; it sets the tolerances. Left out, it is inferred from the
    logits' dtype and the trace says so in its notes (float32 logits of a float64 run would be judged 1000×
    too loosely: state it).
    layers: one LayerDecision per layer of the pass decoding uses; each needs its kv_positions.
    step_logits: one (V,) array per generated id, the logits it was chosen from (step 0's are the prefill's
    `logits`); they are stored as step_logits/t for t ≥ 1 and the checker judges decoding with them. Given only
    generated_gaps, decoding is not judged and the verdict is INCOMPLETE.
    next_position: where YOUR decoding put the first generated token (default: the contract's, N or |kept|);
    the checker judges it. A position outside [1, N] is refused.
    recomputed_at: LongRoPE (Phi-3) only: the generation step at which YOUR run dropped its cache and ran the
    prefill again on the whole sequence, having passed original_max_position_embeddings (docs/semantics.md §5).
    select_layer / kept_positions: ASL's ℓ*, FastKV's ℓ_f, GemFilter's ℓ_g and the prompt positions kept there.
    first_pass: two-pass methods, the scoring pass's layers 0 .. select_layer (ASL two-pass) or filter_layer
    (GemFilter). notes: default, the reference's notes (never compared).
    decode_compressions: PyramidInfer with gen_compress, every decode-stage compression in the order made (step,
    then layer): dicts with step, layer, scored_positions, kept_positions and scores (the scored positions'
    scores); the kit fills R of each step and the boundary gaps."""
    p = dict(case.params)
    L, H_kv, d, V = (shape[k] for k in ("num_hidden_layers", "num_key_value_heads", "head_dim", "vocab_size"))
    N = len(case.prompt_ids)
    logits = np.asarray(logits)
    inferred = dtype is None
    dtype = dtype or logits.dtype.name
    if dtype not in BYTES_PER_ELEMENT:
        raise _bad(case, "dtype", f"is {dtype!r}; a trace declares float32 or float64 (pass dtype= the precision you "
                   "computed in; `asl check --dtype float16` judges a half-precision run)")
    if logits.shape != (V,):
        raise _bad(case, "logits", f"has shape {logits.shape}; expected ({V},), the next-token logits after the prompt")
    if len(layers) != L:
        raise _bad(case, "layers", f"{len(layers)} layer decisions; the model has {L} layers")
    method = METHOD[case.method]
    kept = _check_kept(case, p, select_layer, kept_positions, L)
    generated_ids = [int(t) for t in generated_ids]
    gaps = _greedy(case, generated_ids, generated_gaps, step_logits)
    step_arrays = _step_logits(case, step_logits, V, dtype)
    first = None
    if method.two_pass and kept is not None:
        want = select_layer + 1
        if first_pass is None or len(first_pass) != want:
            raise _bad(case, "first_pass", f"{case.method} needs its scoring pass's layers 0 .. {select_layer} "
                       f"({want} decisions), got {0 if first_pass is None else len(first_pass)}")
        first = _build_pass(case, shape, p, first_pass, _Pass(np.arange(N), True), select_layer, kept, dtype)
        second = _build_pass(case, shape, p, layers, _Pass(kept, False), select_layer, kept, dtype)
    else:
        if first_pass is not None:
            raise _bad(case, "first_pass", f"{case.method} runs one pass; pass first_pass=None")
        second = _build_pass(case, shape, p, layers, _Pass(np.arange(N), False), select_layer, kept, dtype)
    bpe = BYTES_PER_ELEMENT[dtype]
    entries = second.entries
    compressions, decode_arrays = _compressions(case, p, method, entries, decode_compressions, dtype)
    kv_bytes = sum(2 * t * d * bpe for e in entries for t in e["kv_tokens"])
    kv_bytes_full = 2 * L * H_kv * N * d * bpe
    trace = {
        "schema_version": SCHEMA_VERSION,
        "method": case.method,
        "params": p,
        "model": {"name": case.model, "sha256": model_sha256 or case.model_sha256, **shape},
        "dtype": dtype,
        "prompt_ids": list(case.prompt_ids),
        "num_prompt_tokens": N,
        "select_layer": None if select_layer is None else int(select_layer),
        "kept_positions": None if kept is None else kept.tolist(),
        "next_position": _next_position(case, next_position, N if first is None else len(kept)),
        "generated_ids": generated_ids,
        "generated_gaps": gaps,
        "notes": _notes(case, p, select_layer) if notes is None else list(notes),
        "layers": entries,
        "first_pass": None if first is None else first.entries,
        "decode_compressions": compressions,
        "recomputed_at": recomputed_at,
        "totals": {"bytes_per_element": bpe, "kv_bytes": kv_bytes, "kv_bytes_full": kv_bytes_full,
                   "kv_fraction": kv_bytes / kv_bytes_full,
                   "prefill_flops": sum(e["flops"] for e in (first.entries if first else []) + entries),
                   "prefill_flops_full": L * layer_flops(SimpleNamespace(**shape), N)},
        "arrays_file": None,
    }
    if notes is None and first is not None and method.decides == "criterion" and not first.fired:
        trace["notes"].append(NEVER_FIRED_TWO_PASS.format(layer=select_layer))
    arrays = {"logits": logits.astype(dtype)}  # (V,)
    arrays |= (first.arrays if first else {}) | second.arrays | decode_arrays | step_arrays
    if inferred:
        trace["notes"].append(f"{DTYPE_INFERRED} {dtype} from the logits array (pass dtype= to state it)")
    validate_trace(trace, arrays, f"candidate trace of {case.name} (built by reference.oracle.candidate)")
    return trace, arrays


def _compressions(case, p: dict, method, entries: list, given, dtype: str):
    """PyramidInfer's decode-stage compressions as a trace lists them, with R of each step (replayed from
    layer 0's cache length) and boundary gaps, and their scores as arrays."""
    on = method.per_layer and p["gen_compress"]
    if not on:
        if given:
            raise _bad(case, "decode_compressions", f"given, but {case.method} "
                       f"{'runs with gen_compress false' if method.per_layer else 'never compresses in decoding'}")
        return None, {}
    out, arrays, length0, step = [], {}, entries[0]["prefill_tokens"], 0
    recent = {}
    for i, c in enumerate(given or []):
        try:
            t, layer = int(c["step"]), int(c["layer"])
            scored = [int(q) for q in c["scored_positions"]]
            kept = [int(q) for q in c["kept_positions"]]
            scores = _float_array(c["scores"], dtype)
        except (KeyError, TypeError, ValueError) as e:
            raise _bad(case, f"decode_compressions[{i}]", f"needs step, layer, scored_positions, kept_positions and "
                       f"scores ({e!r})") from None
        if scores.shape != (len(scored),):
            raise _bad(case, f"decode_compressions[{i}].scores", f"has shape {scores.shape}; expected "
                       f"({len(scored)},), one per scored position")
        if t < step:
            raise _bad(case, f"decode_compressions[{i}]", "compressions must come in the order made: step, then layer")
        while step < t:  # R of each step: int((1 + layer 0's cache length before it) · recent_ratio)
            step += 1
            recent[step] = pyramid.recent_length(1 + length0, p["recent_ratio"])
            length0 += 1
        if layer == 0:
            length0 -= len(scored) - len(kept)
        forced_order = np.sort(scores)[::-1]
        gap = None if len(kept) >= len(scored) else float(forced_order[len(kept) - 1] - forced_order[len(kept)])
        out.append({"step": t, "layer": layer, "recent": recent[t], "scored_positions": scored,
                    "kept_positions": kept, "boundary_gap": gap})
        arrays[f"decode_scores/{i}"] = scores
    return out, arrays


def write_candidate(out_dir: str | Path, case: CaseInputs, trace: dict, arrays: dict) -> Path:
    """Save the trace as OUT_DIR/CASE.trace.json + .npz, the names `asl check OUT_DIR --golden BUNDLE` reads."""
    if not plain_case_name(case.name):
        raise OracleError(f"case name {case.name!r} is not a plain file name")
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OracleError(f"{out}: cannot create the candidate directory ({e.strerror or e})") from None
    path = out / f"{case.name}.trace.json"
    save_trace(trace, arrays, path, with_arrays=True)
    return path
