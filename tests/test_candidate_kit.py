"""The implementer's kit (reference.oracle.candidate): decisions in, a candidate trace `asl check` judges out.

The reference's own runs stand in for an implementation: only their decisions (cached positions per KV
head, scores, selection layer, kept positions, logits, generated ids, step logits) go into the kit, and
what comes out must be the trace make_trace writes, field for field, and must PASS; a wrong decision
must FAIL, and decisions that cannot be right are refused naming the layer and KV head.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from reference.asl.generate import generate
from reference.asl.params import METHOD, Params
from reference.errors import OracleError
from reference.io.checkpoint import load_weights
from reference.io.fetch import resolve_model
from reference.oracle.bundle import check, check_trace, default_cases, write_bundle
from reference.oracle.candidate import (
    LayerDecision,
    build_candidate,
    model_shape,
    read_case,
    read_cases,
    write_candidate,
)
from reference.oracle.trace import make_trace

MODEL = "tiny-llama"


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    """Every default tiny-llama case: every method, with and without kv_budget, and SPEC's edge cases."""
    return write_bundle(MODEL, default_cases(MODEL), tmp_path_factory.mktemp("kit") / "bundle", progress=False)


@pytest.fixture(scope="module")
def weights():
    return load_weights(resolve_model(MODEL), "float64")


def decisions_of(weights, case):
    """Run the reference on a case and keep only what an implementation decides and observes."""
    gen = generate(weights, case.prompt_ids, case.max_new_tokens, case.eos_token_ids, method=case.method,
                   params=Params(**case.params))
    run = gen.prefill
    kept = None if run.kept_positions is None else np.asarray(run.kept_positions)

    def layer(rec, second_pass: bool) -> LayerDecision:
        kv = [np.asarray(p) for p in rec.kv_positions]
        if second_pass and kept is not None:  # the reference numbers a second pass 0 .. |kept|-1; give prompt positions
            kv = [kept[p] for p in kv]
        return LayerDecision(kv_positions=[p[::-1] for p in kv],  # in any order: the kit sorts them
                             kv_scores=None if rec.kv_scores is None else list(rec.kv_scores),
                             scores=rec.scores, kept=rec.kept if METHOD[case.method].per_layer else None)

    two_pass = run.first_pass is not None
    compressions = None if run.decode_state is None else [
        {"step": c.step, "layer": c.layer, "scored_positions": c.scored, "kept_positions": c.kept, "scores": c.scores}
        for c in gen.compressions]
    return gen, dict(layers=[layer(r, two_pass) for r in run.layers], logits=run.logits,
                     decode_compressions=compressions,
                     generated_ids=gen.generated_ids, step_logits=gen.step_logits,
                     select_layer=run.select_layer, kept_positions=run.kept_positions,
                     first_pass=None if not two_pass else [layer(r, False) for r in run.first_pass])


def test_the_kit_rebuilds_every_reference_trace_from_decisions_alone(bundle, weights):
    """Every field the kit derives (counts, FLOPs, totals, ranks, gaps, ASL's v and ratio, notes, second-pass
    numbering) equals the reference's own trace, and asl check passes the result."""
    shape = model_shape(resolve_model(MODEL))
    cases = read_cases(bundle)
    assert {c.method for c in cases} == {"full", "snapkv", "fastkv", "gemfilter", "asl", "asl-2pass", "pyramidinfer"}
    for case in cases:
        gen, decided = decisions_of(weights, case)
        trace, arrays = build_candidate(case, shape, dtype="float64", **decided)
        expected, expected_arrays = make_trace(gen, model_name=case.model, model_sha256=case.model_sha256,
                                               config=weights.config, dtype="float64")
        assert json.dumps(trace, sort_keys=True) == json.dumps(expected, sort_keys=True), case.name
        assert set(arrays) == set(expected_arrays), case.name
        for name, a in expected_arrays.items():
            assert np.array_equal(arrays[name], a) and arrays[name].dtype == a.dtype, (case.name, name)
        result = check_trace(bundle / f"{case.name}.trace.json", (trace, arrays))
        assert result.verdict == "PASS", result.line()


def test_a_written_candidate_passes_asl_check_and_a_wrong_decision_fails(bundle, weights, tmp_path):
    case = read_case(bundle, f"{MODEL}-snapkv")
    _, decided = decisions_of(weights, case)
    write_candidate(tmp_path / "good", case, *build_candidate(case, model_shape(case.model_dir()), **decided))
    [good] = [r for r in check(tmp_path / "good", bundle, methods=("snapkv",)) if r.case == case.name]
    assert good.verdict == "PASS", good.line()
    # one wrong decision: layer 5, KV head 1 caches position 0 in place of its first cached prefix position
    layer = decided["layers"][5]
    held = sorted(int(p) for p in layer.kv_positions[1])
    dropped = next(q for q in range(len(case.prompt_ids)) if q not in held)
    layer.kv_positions[1] = np.asarray([dropped] + held[1:])
    trace, arrays = build_candidate(case, model_shape(case.model_dir()), **decided)
    bad = check_trace(bundle / f"{case.name}.trace.json", (trace, arrays))
    assert bad.verdict == "FAIL" and bad.findings[0].field == "kv_positions[5][1]", bad.line()


def test_derived_ranks_follow_spec_but_an_implementations_own_ranks_are_judged(bundle, weights):
    """ranks= is the implementation's: an unstable order among equal scores is caught by rule 0."""
    case = read_case(bundle, f"{MODEL}-asl-max-pooling")
    _, decided = decisions_of(weights, case)
    for d in decided["layers"]:
        if d.scores is None:
            continue
        score = np.asarray(d.scores)
        order = np.lexsort((-np.arange(len(score)), -score))  # highest first, ties: the LATER position first
        rank = np.empty(len(score), dtype=np.int64)
        rank[order] = np.arange(1, len(score) + 1)
        d.ranks = rank
    trace, arrays = build_candidate(case, model_shape(case.model_dir()), **decided)
    result = check_trace(bundle / f"{case.name}.trace.json", (trace, arrays))
    assert result.verdict == "FAIL" and result.findings[0].field.startswith("ranks["), result.line()
    assert "equal scores" in result.findings[0].message


def test_gaps_from_step_logits_and_a_non_greedy_id_is_refused(bundle, weights):
    case = read_case(bundle, f"{MODEL}-full")
    _, decided = decisions_of(weights, case)
    V = model_shape(case.model_dir())["vocab_size"]
    steps = []
    gen, _ = decisions_of(weights, case)
    decided.pop("step_logits")
    for token, gap in zip(decided["generated_ids"], gen.generated_gaps):
        row = np.zeros(V)
        row[token], row[(token + 1) % V] = 2.0, 2.0 - gap  # best minus second best = the gap
        steps.append(row)
    gaps = [float(g) for g in gen.generated_gaps]
    trace, _ = build_candidate(case, model_shape(case.model_dir()), step_logits=steps, **decided)
    assert trace["generated_gaps"] == pytest.approx(gaps, abs=1e-12)  # read back from the step logits
    steps[0] = np.roll(steps[0], 3)
    with pytest.raises(OracleError, match=r"generated_ids\[0\].*arg-max of step_logits\[0\]"):
        build_candidate(case, model_shape(case.model_dir()), step_logits=steps, **decided)


def test_decoding_is_judged_by_the_step_logits_and_next_position_is_the_implementations(bundle, weights):
    """The kit stores the logits of every step after the first and the implementation's own next_position; a
    candidate whose step-2 logits are off fails at step 2 with the decoding diagnosis; one that reports
    decoding at len(kept) fails on next_position; without step logits the verdict is INCOMPLETE."""
    case = read_case(bundle, f"{MODEL}-fastkv")
    shape = model_shape(case.model_dir())
    _, decided = decisions_of(weights, case)
    good = check_trace(bundle / f"{case.name}.trace.json", build_candidate(case, shape, **decided))
    assert good.verdict == "PASS" and "tolerance: float64" in good.line(), good.line()
    steps = [np.array(s, copy=True) for s in decided["step_logits"]]
    steps[2][steps[2].argmin()] -= 0.01  # the arg-max and its gap stay; the logits do not
    off = check_trace(bundle / f"{case.name}.trace.json", build_candidate(case, shape, **(decided | {"step_logits": steps})))
    assert off.verdict == "FAIL" and off.findings[0].field == "step_logits[2]", off.line()
    assert "prefill logits agree" in off.findings[0].message
    at_k = build_candidate(case, shape, **(decided | {"next_position": len(decided["kept_positions"])}))
    moved = check_trace(bundle / f"{case.name}.trace.json", at_k)
    assert moved.verdict == "FAIL" and moved.findings[0].field == "next_position", moved.line()
    assert "positions restarted at the cache length" in moved.findings[0].message
    for bad in (0, len(case.prompt_ids) + 1, 2.5):
        with pytest.raises(OracleError, match="next_position.*in \\[1, N"):
            build_candidate(case, shape, **(decided | {"next_position": bad}))
    gen, _ = decisions_of(weights, case)
    gaps_only = decided | {"step_logits": None, "generated_gaps": gen.generated_gaps}
    blind = check_trace(bundle / f"{case.name}.trace.json", build_candidate(case, shape, **gaps_only))
    assert blind.verdict == "INCOMPLETE" and any("step_logits" in u for u in blind.unchecked), blind.line()
    with pytest.raises(OracleError, match=r"step_logits\[1\].*shape"):
        build_candidate(case, shape, **(decided | {"step_logits": [steps[0], steps[1][:-1]] + steps[2:]}))


def test_an_inferred_or_mismatched_dtype_is_said(bundle, weights):
    case = read_case(bundle, f"{MODEL}-full")
    shape = model_shape(case.model_dir())
    _, decided = decisions_of(weights, case)
    inferred = check_trace(bundle / f"{case.name}.trace.json", build_candidate(case, shape, **decided))
    assert any(n.field == "dtype" and "inferred" in n.message for n in inferred.notes), inferred.line()
    stated = check_trace(bundle / f"{case.name}.trace.json", build_candidate(case, shape, dtype="float64", **decided))
    assert not stated.notes, stated.line()
    as32 = decided | {"logits": np.asarray(decided["logits"], dtype=np.float32)}
    mixed = check_trace(bundle / f"{case.name}.trace.json", build_candidate(case, shape, dtype="float64", **as32))
    assert not any("declares float64, but its arrays" in n.message for n in mixed.notes)  # the kit casts to float64


@pytest.mark.parametrize("plant, message", [
    ("outside", r"layers\[2\], KV head 1: position 999 is outside the prompt \[0, \d+\)"),
    ("duplicate", r"layers\[2\], KV head 1: position \d+ is cached twice"),
    ("too-many", r"layers\[2\], KV head 1: \d+ positions cached, but the layer held \d+ tokens"),
    ("heads", r"layers\[2\]: kv_positions has 1 KV heads; the model has 2"),
    ("not-held", r"layers\[\d+\], KV head 0: position \d+ was not among the \d+ tokens this layer held"),
    ("no-last", r"kept_positions \(selection layer \d+\): the last prompt token \(\d+\) is not kept"),
    ("no-kv-scores", r"layers\[0\]: kv_scores missing; SnapKV decides here"),
    ("no-scores", r"layers\[\d+\]: scores missing; SPEC's asl scores layers"),
])
def test_decisions_that_cannot_be_right_are_refused_naming_layer_and_head(bundle, weights, plant, message):
    name = {"no-kv-scores": "snapkv"}.get(plant, "asl")
    case = read_case(bundle, f"{MODEL}-{name}")
    _, decided = decisions_of(weights, case)
    layers, N = decided["layers"], len(case.prompt_ids)
    head = layers[2].kv_positions
    if plant == "outside":
        head[1] = np.append(head[1][1:], 999)
    elif plant == "duplicate":
        head[1] = np.append(head[1][1:], head[1][1])
    elif plant == "too-many":
        head[1] = np.arange(N + 1)
    elif plant == "heads":
        layers[2].kv_positions = head[:1]
    elif plant == "not-held":  # after the selection layer only kept positions are held
        after = layers[decided["select_layer"] + 1]
        dropped = next(q for q in range(N) if q not in set(decided["kept_positions"]))
        after.kv_positions[0] = np.append(np.sort(after.kv_positions[0])[1:], dropped)
    elif plant == "no-last":
        decided["kept_positions"] = list(decided["kept_positions"])[:-1]
    elif plant == "no-kv-scores":
        layers[0].kv_scores = None
    elif plant == "no-scores":
        layers[decided["select_layer"]].scores = None
    with pytest.raises(OracleError, match=message) as err:
        build_candidate(case, model_shape(case.model_dir()), **decided)
    assert "\n" not in str(err.value) and str(err.value).startswith(f"case {case.name}: ")


def test_read_case_returns_the_inputs_a_run_needs(bundle):
    case = read_case(bundle, f"{MODEL}-snapkv")
    raw = json.loads((bundle / f"{MODEL}-snapkv.inputs.json").read_text())
    assert (case.prompt_ids, case.method, case.params, case.eos_token_ids, case.dtype, case.model) == (
        raw["prompt_ids"], raw["method"], raw["params"], raw["eos_token_ids"], raw["dtype"], raw["model"]["name"])
    assert case.model_dir() == resolve_model(MODEL)
    with pytest.raises(OracleError, match="missing"):
        read_case(bundle, "no-such-case")


def test_the_cache_recorder_reads_back_what_a_compressor_kept():
    """A compressor that evicts inside the forward pass (here: a hook after layer 3's attention, as kvpress
    does) keeps known rows per KV head in scrambled order; the recorder maps them back to prompt positions."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from reference.oracle.hf_recorder import CacheRecorder

    model = transformers.AutoModelForCausalLM.from_pretrained(str(resolve_model(MODEL)), dtype=torch.float32).eval()
    N, rng = 40, np.random.default_rng(0)
    keep = [rng.permutation(N)[:11], rng.permutation(N)[:11]]  # per KV head, in no particular order
    cache = transformers.DynamicCache()

    def evict(module, args, kwargs, output):
        layer = cache.layers[module.layer_idx]
        index = torch.tensor(np.stack(keep))[None, :, :, None].expand(-1, -1, -1, layer.keys.shape[-1])
        layer.keys, layer.values = layer.keys.gather(2, index), layer.values.gather(2, index)
        return output

    hook = model.model.layers[3].self_attn.register_forward_hook(evict, with_kwargs=True)
    try:
        with torch.no_grad(), CacheRecorder(cache) as rec:
            model(torch.tensor([list(range(5, 5 + N))]), past_key_values=cache)
    finally:
        hook.remove()
    found = rec.kept_positions()
    assert [p.tolist() for p in found[3]] == [k.tolist() for k in keep]
    assert [p.tolist() for p in found[2]] == [list(range(N))] * 2  # an untouched layer holds every position
    assert "update" not in vars(cache)  # the wrapper is gone after the block
    cache.layers[3].keys[0, 1, 4] += 1.0  # a row the library changed can no longer be placed
    with pytest.raises(OracleError, match=r"layer 3, KV head 1: cache row 4 matches no key"):
        rec.kept_positions([3])


def test_recorders_nest_in_any_order_and_undo_only_their_own_shadow():
    """ScoreRecorder records what a press's `score` returned per layer; nested with another shadow of the same
    method (kvpress_check's --stable-topk), each exit restores what was there before it, in either order."""
    torch = pytest.importorskip("torch")
    from types import SimpleNamespace

    from reference.oracle.hf_recorder import ScoreRecorder, shadow

    class Press:
        def score(self, module, x):
            return x * 2

    press, layer = Press(), SimpleNamespace(layer_idx=3)
    x = torch.arange(6.0).reshape(1, 2, 3)
    for outer_first in (True, False):
        if outer_first:
            with ScoreRecorder(press) as rec:
                inner = press.score
                restore = shadow(press, "score", lambda m, t: inner(m, t) + 1)
                assert np.array_equal(press.score(layer, x).numpy(), x.numpy() * 2 + 1)
                restore()
                assert press.score is not None and "score" in press.__dict__  # the recorder's shadow is back
        else:
            outer = press.score
            restore = shadow(press, "score", lambda m, t: outer(m, t) + 1)
            with ScoreRecorder(press) as rec:
                assert np.array_equal(press.score(layer, x).numpy(), x.numpy() * 2 + 1)
            assert "score" in press.__dict__  # the outer shadow survives the recorder's exit
            restore()
        assert "score" not in press.__dict__ and np.array_equal(press.score(layer, x).numpy(), x.numpy() * 2)
        assert set(rec.scores) == {3} and rec.scores[3].shape == (2, 3)
