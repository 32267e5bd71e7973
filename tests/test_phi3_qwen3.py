"""Qwen3 and Phi-3 (issue 23): config reading, LongRoPE's factor sets, Qwen3's q/k norms, Phi-3's fused
tensors split once at load, and the port on both tiny checkpoints.

Expected values are derived by hand from transformers' formulas (modeling_qwen3.py, modeling_phi3.py,
modeling_rope_utils.py's `_compute_longrope_parameters` and `dynamic_rope_update`), never from the code
under test; tests/test_crosscheck_hf.py runs transformers itself.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gpu.backend import get_xp
from gpu.engine import PortEngine
from gpu.loader import device_copy, load_device_weights
from reference.asl.generate import generate
from reference.asl.params import Params
from reference.errors import OracleError
from reference.io.checkpoint import load_weights
from reference.io.fetch import TINY_ALIASES, resolve_model
from reference.io.safetensors import map_tensor, open_mapped, read_header
from reference.model.config import load_config, parse_config
from reference.model.rope import (
    attention_scaling,
    inverse_frequencies,
    longrope_switch_position,
    rope_tables,
    uses_long_factors,
)
from reference.model.transformer import prefill, project_qkv, rms_norm
from reference.model.weights import expected_tensors, fused_parts
from reference.oracle.conformance import FAIL, TOLERANCES, compare, record_from_trace
from reference.oracle.bundle import check_trace
from reference.oracle.trace import make_trace, save_trace
from reference.oracle.goldens import BASE
from tests.conftest import CHECKPOINTS, PORT_BACKENDS, array_module
from tests.model_factory import random_model

QWEN3 = dict(model_type="qwen3", vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-6,
             max_position_embeddings=512)
PHI3 = dict(model_type="phi3", vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5, max_position_embeddings=4096,
            original_max_position_embeddings=64,
            rope_scaling={"type": "longrope", "short_factor": [1.0, 1.125, 1.25, 1.5],
                          "long_factor": [1.0, 2.0, 8.0, 24.0]})


# ---------------------------------------------------------------- config


def test_qwen3_head_dim_biases_and_norms():
    cfg = parse_config(QWEN3)
    assert cfg.head_dim == 16 != cfg.hidden_size // cfg.num_attention_heads
    assert cfg.qk_norm and not cfg.fused_projections and not cfg.attention_bias
    assert parse_config({k: v for k, v in QWEN3.items() if k != "head_dim"}).head_dim == 128  # Qwen3Config's default
    biased = parse_config(QWEN3 | {"attention_bias": True})
    assert biased.attention_bias and biased.o_proj_bias  # Qwen3Attention: o_proj has bias=attention_bias too
    names = expected_tensors(biased)
    assert names["model.layers.1.self_attn.q_norm.weight"] == (16,)
    assert names["model.layers.1.self_attn.q_proj.weight"] == (64, 32)
    assert "model.layers.1.self_attn.o_proj.bias" in names


def test_qwen3_sliding_window_off_is_fine_and_on_is_refused():
    assert parse_config(QWEN3 | {"use_sliding_window": False, "sliding_window": 4096}).sliding_window is None
    with pytest.raises(OracleError, match="use_sliding_window is true"):
        parse_config(QWEN3 | {"use_sliding_window": True, "sliding_window": 4096})
    with pytest.raises(OracleError, match=r"layer_types\[1\] is \"sliding_attention\""):
        parse_config(QWEN3 | {"layer_types": ["full_attention", "sliding_attention"]})


def test_phi3_longrope_values_by_hand():
    cfg = parse_config(PHI3)
    rs = cfg.rope_scaling
    assert cfg.fused_projections and not cfg.qk_norm and cfg.head_dim == 8
    assert rs.rope_type == "longrope" and rs.original_max_position_embeddings == 64
    assert rs.factor == 4096 / 64
    assert rs.attention_factor == math.sqrt(1 + math.log(64) / math.log(64)) == math.sqrt(2)
    assert (rs.short_factor, rs.long_factor) == ((1.0, 1.125, 1.25, 1.5), (1.0, 2.0, 8.0, 24.0))
    names = expected_tensors(cfg)
    assert names["model.layers.0.self_attn.qkv_proj.weight"] == ((4 + 2 * 2) * 8, 32)
    assert names["model.layers.0.mlp.gate_up_proj.weight"] == (128, 32)
    assert not any(".q_proj." in n or ".gate_proj." in n for n in names)


@pytest.mark.parametrize("change, factor, attention", [
    ({"max_position_embeddings": 131072, "original_max_position_embeddings": 4096}, 32.0,
     math.sqrt(1 + math.log(32) / math.log(4096))),  # Phi-3-mini-128k's numbers
    ({"max_position_embeddings": 64}, 1.0, 1.0),  # no extension: factor <= 1, no scaling
    ({"max_position_embeddings": 32}, 0.5, 1.0),
    ({"rope_scaling": PHI3["rope_scaling"] | {"factor": 4.0}}, 4.0, math.sqrt(1 + math.log(4) / math.log(64))),
    ({"rope_scaling": PHI3["rope_scaling"] | {"attention_factor": 1.25}}, 64.0, 1.25),
])
def test_phi3_factor_and_attention_factor_as_transformers_computes_them(change, factor, attention):
    rs = parse_config(PHI3 | change).rope_scaling
    assert rs.factor == factor and rs.attention_factor == pytest.approx(attention, rel=1e-15)


def test_original_max_position_embeddings_precedence():
    """transformers 5: a top-level value wins; Phi3Config always has one (4096); otherwise max_position_embeddings."""
    inner = PHI3["rope_scaling"] | {"original_max_position_embeddings": 64}
    assert parse_config(PHI3 | {"rope_scaling": inner}).rope_scaling.original_max_position_embeddings == 64
    no_top = {k: v for k, v in PHI3.items() if k != "original_max_position_embeddings"}
    assert parse_config(no_top).rope_scaling.original_max_position_embeddings == 4096
    llama3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0}
    llama = dict(QWEN3, model_type="llama", rope_scaling=llama3)
    assert parse_config(llama).rope_scaling.original_max_position_embeddings == 512
    assert parse_config(llama | {"original_max_position_embeddings": 256}).rope_scaling.original_max_position_embeddings == 256


def test_phi3_su_spelling_and_v5_rope_parameters_read_the_same():
    old = parse_config(PHI3 | {"rope_scaling": PHI3["rope_scaling"] | {"type": "su"}})
    v5 = parse_config({k: v for k, v in PHI3.items() if k != "rope_scaling"} | {"rope_parameters": {
        "rope_type": "longrope", "rope_theta": 10000.0, "partial_rotary_factor": 1.0,
        "original_max_position_embeddings": 64, **{k: PHI3["rope_scaling"][k] for k in ("short_factor", "long_factor")}}})
    assert old.rope_scaling == v5.rope_scaling == parse_config(PHI3).rope_scaling


# ---------------------------------------------------------------- LongRoPE: which set, and the tables


def test_the_factor_set_is_chosen_per_call_from_its_last_position():
    """transformers' dynamic_rope_update: seq_len = max(position_ids) + 1; long iff seq_len > original max."""
    cfg = parse_config(PHI3)
    assert longrope_switch_position(cfg) == 64
    assert not uses_long_factors(cfg, np.arange(64))  # 64 tokens: positions 0 .. 63
    assert uses_long_factors(cfg, np.arange(65))
    assert not uses_long_factors(cfg, np.array([63]))  # a decoding step at position 63
    assert uses_long_factors(cfg, np.array([64]))  # ... and at 64: its call has 65 positions
    assert uses_long_factors(cfg, np.array([0, 5, 70]))  # kept positions of a pruned prompt: the last one decides
    assert longrope_switch_position(parse_config(QWEN3)) is None and not uses_long_factors(parse_config(QWEN3),
                                                                                           np.arange(10**4))


def test_longrope_tables_by_hand():
    cfg = parse_config(PHI3)
    i = np.arange(4)
    base = 10000.0 ** (2 * i / 8)
    np.testing.assert_allclose(inverse_frequencies(cfg), 1 / (np.array([1.0, 1.125, 1.25, 1.5]) * base), rtol=1e-15)
    np.testing.assert_allclose(inverse_frequencies(cfg, long=True), 1 / (np.array([1.0, 2.0, 8.0, 24.0]) * base),
                               rtol=1e-15)
    a = math.sqrt(2)
    assert attention_scaling(cfg) == a
    for positions, factors in ((np.arange(64), [1.0, 1.125, 1.25, 1.5]), (np.arange(65), [1.0, 2.0, 8.0, 24.0])):
        cos, sin = rope_tables(cfg, positions, np.float64)
        angle = 63.0 / (np.array(factors) * base)  # position 63 in both calls, different sets
        np.testing.assert_allclose(cos[63], a * np.cos(np.concatenate([angle, angle])), rtol=1e-13)
        np.testing.assert_allclose(sin[63], a * np.sin(np.concatenate([angle, angle])), rtol=1e-13)


def test_qwen3_q_and_k_are_normed_per_head_before_rope():
    """At position 0 rope is the identity: q is the projection, each head RMS-normed by q_norm (eps from the
    config), nothing else; Phi-3's q at position 0 is its projection times the attention factor."""
    w = load_weights(CHECKPOINTS / "tiny-qwen3", "float64")
    cfg, lw = w.config, w.layers[3]
    x = np.random.default_rng(0).standard_normal((1, cfg.hidden_size))
    q, k, _ = project_qkv(x, lw, cfg, np.array([0]))
    raw_q = (x @ lw.wq.T).reshape(cfg.num_attention_heads, cfg.head_dim)
    by_hand = raw_q / np.sqrt((raw_q**2).mean(-1, keepdims=True) + cfg.rms_norm_eps) * lw.q_norm
    np.testing.assert_allclose(q[:, 0], by_hand, rtol=1e-13)
    raw_k = (x @ lw.wk.T).reshape(cfg.num_key_value_heads, cfg.head_dim)
    np.testing.assert_allclose(k[:, 0], rms_norm(raw_k, lw.k_norm, cfg.rms_norm_eps), rtol=1e-13)
    assert not np.allclose(q[:, 0], raw_q)

    p = load_weights(CHECKPOINTS / "tiny-phi3", "float64")
    q, _, _ = project_qkv(x, p.layers[3], p.config, np.array([0]))
    np.testing.assert_allclose(q[:, 0].reshape(-1), math.sqrt(2) * (x @ p.layers[3].wq.T)[0], rtol=1e-13)


# ---------------------------------------------------------------- Phi-3's fused tensors: split once, at load


def stored(name: str, tensor: str) -> np.ndarray:
    header = read_header(CHECKPOINTS / name / "model.safetensors")
    return np.array(map_tensor(header, tensor, open_mapped(header)))


def same_buffer(*parts) -> bool:
    """The parts lie back to back in one buffer, in order: row blocks of one fused array."""
    starts = [p.__array_interface__["data"][0] for p in parts]
    return all(p.flags.c_contiguous for p in parts) and all(
        b == a + p.nbytes for a, b, p in zip(starts, starts[1:], parts))


def test_fused_tensors_are_split_at_load_into_views_of_the_file():
    w = load_weights(CHECKPOINTS / "tiny-phi3")  # bfloat16 on disk: each fused tensor widened once, parts are views
    qkv, gate_up = (stored("tiny-phi3", f"model.layers.6.{n}") for n in ("self_attn.qkv_proj.weight",
                                                                           "mlp.gate_up_proj.weight"))
    lw = w.layers[6]
    np.testing.assert_array_equal(lw.wq, qkv[:32])  # H·hd = 32 rows of q, then 16 of k, 16 of v
    np.testing.assert_array_equal(lw.wk, qkv[32:48])
    np.testing.assert_array_equal(lw.wv, qkv[48:])
    np.testing.assert_array_equal(lw.w_gate, gate_up[:64])  # Phi3MLP: chunk(2), the first half through silu
    np.testing.assert_array_equal(lw.w_up, gate_up[64:])
    assert same_buffer(lw.wq, lw.wk, lw.wv) and same_buffer(lw.w_gate, lw.w_up)  # one array, not copies
    assert lw.wq.flags.c_contiguous and lw.w_up.flags.c_contiguous
    assert fused_parts(w.config)["self_attn.qkv_proj.weight"] == (("wq", 0, 32), ("wk", 32, 48), ("wv", 48, 64))
    assert fused_parts(load_config(CHECKPOINTS / "tiny-qwen3")) == {}


def test_port_loader_splits_the_same_way_in_float16():
    xp = get_xp("numpy")
    w, report = load_device_weights(CHECKPOINTS / "tiny-phi3", xp, "float16", progress=False)
    ref = load_weights(CHECKPOINTS / "tiny-phi3")
    for got, want in ((w.layers[2].wk, ref.layers[2].wk), (w.layers[2].w_up, ref.layers[2].w_up)):
        assert got.dtype == np.float16
        np.testing.assert_array_equal(got, want.astype(np.float16))
    assert same_buffer(w.layers[2].wq, w.layers[2].wk, w.layers[2].wv)
    assert report.kept_float32 == []
    q3, _ = load_device_weights(CHECKPOINTS / "tiny-qwen3", xp, "float16", progress=False)
    assert q3.layers[0].q_norm.shape == (16,) and q3.layers[0].k_norm.dtype == np.float16


def test_tiny_checkpoints_are_registered_aliases():
    assert {"tiny-qwen3", "tiny-phi3"} <= set(TINY_ALIASES)
    assert resolve_model("tiny-phi3") == CHECKPOINTS / "tiny-phi3"
    assert load_config(resolve_model("tiny-qwen3")).model_type == "qwen3"


# ---------------------------------------------------------------- the port


BACKENDS = PORT_BACKENDS
PARAMS = BASE  # the goldens' small settings


def record(gen, weights):
    trace, arrays = make_trace(gen, model_name="tiny", model_sha256="", config=weights.config, dtype="float32")
    return record_from_trace(trace, arrays)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name, n_tokens, method", [
    ("tiny-qwen3", 100, "asl"), ("tiny-qwen3", 40, "snapkv"), ("tiny-qwen3", 100, "gemfilter"),
    ("tiny-phi3", 40, "asl"), ("tiny-phi3", 100, "asl"), ("tiny-phi3", 100, "snapkv"),
    ("tiny-phi3", 100, "asl-2pass"), ("tiny-phi3", 40, "gemfilter"), ("tiny-phi3", 62, "asl"),
    ("tiny-phi3", 62, "full"),
])
def test_port_agrees_with_the_reference(backend, name, n_tokens, method):
    """Phi-3: 40 tokens (+4 decoded) stay on the short side of original_max = 64, 100 on the long side; 62 + 4
    cross it (the prefill runs again at step 3, on both engines)."""
    xp_name, weight_dtype = backend
    xp = array_module(xp_name)
    ids = np.random.default_rng(n_tokens).integers(3, 259, n_tokens)
    params = PARAMS if method != "snapkv" else dataclasses.replace(PARAMS, kv_budget=30)
    weights = load_weights(CHECKPOINTS / name)
    expected = generate(weights, ids, 4, (), method=method, params=params)
    port = PortEngine(load_device_weights(CHECKPOINTS / name, xp, weight_dtype, progress=False)[0], xp,
                      block_q=16, block_k=32)
    got = generate(port, ids, 4, (), method=method, params=params)
    assert expected.recomputed_at == got.recomputed_at == (3 if n_tokens == 62 and name == "tiny-phi3" else None)
    verdict, findings = compare(record(expected, weights), record(got, weights), TOLERANCES[weight_dtype])
    assert verdict != FAIL, "; ".join(f"{f.field}: {f.message}" for f in findings)


@st.composite
def family_cases(draw):
    """Random Qwen3 / Phi-3 shapes: head_dim apart from hidden / heads (Qwen3), prompts on both sides of a small
    original max (Phi-3), every method."""
    family = draw(st.sampled_from(["qwen3", "phi3"]))
    n_kv = draw(st.sampled_from([1, 2]))
    n_heads, head_dim = n_kv * draw(st.sampled_from([1, 2, 4])), draw(st.sampled_from([4, 8, 16]))
    L = draw(st.integers(4, 8))
    model = dict(seed=draw(st.integers(0, 10**6)), n_layers=L, n_kv_heads=n_kv, n_heads=n_heads, head_dim=head_dim,
                 hidden=n_heads * head_dim if family == "phi3" else draw(st.sampled_from([16, 24])),
                 vocab=64, tied=draw(st.booleans()), dtype=np.float32, family=family,
                 # LongRoPE's attention factor (here √2 to √2.6) multiplies the scores by 2 to 2.6: q/k drawn flatter
                 original_max=draw(st.integers(24, 64)), sharpness=1.4 if family == "phi3" else 2.0)
    method = draw(st.sampled_from(["full", "asl", "fastkv", "gemfilter", "snapkv", "asl-2pass"]))
    w = draw(st.integers(1, 6))
    l_min = draw(st.integers(1, L - 1))
    params = Params(window=w, kernel=draw(st.sampled_from([1, 3])), select_k=draw(st.integers(w + 1, w + 30)),
                    tau=draw(st.sampled_from([0.1, 0.5, 1.2])), l_min=l_min, l_obs=draw(st.integers(2, l_min + 1)),
                    kv_budget=w + draw(st.integers(1, 20)) if method == "snapkv" else None,
                    select_layer=draw(st.integers(0, L - 1)), filter_layer=draw(st.integers(0, L - 1)))
    ids = np.random.default_rng(model["seed"]).integers(0, 64, draw(st.integers(1, 90)))
    return model, method, params, ids


@pytest.mark.parametrize("backend", BACKENDS[:2])
@settings(max_examples=15, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(case=family_cases())
def test_port_agrees_with_the_reference_on_random_qwen3_and_phi3_models(backend, case):
    xp_name, weight_dtype = backend
    xp = array_module(xp_name)
    model, method, params, ids = case
    weights = random_model(**model)
    expected = generate(weights, ids, 3, (), method=method, params=params)
    port = PortEngine(device_copy(weights, xp, weight_dtype), xp, block_q=16, block_k=32)
    got = generate(port, ids, 3, (), method=method, params=params)
    verdict, findings = compare(record(expected, weights), record(got, weights), TOLERANCES[weight_dtype])
    assert verdict != FAIL, "; ".join(f"{f.field}: {f.message}" for f in findings)


# ---------------------------------------------------------------- generation across Phi-3's boundary


def test_reference_generation_across_the_boundary_equals_a_fresh_prefill_per_step():
    """58 + 10 tokens cross L0 = 64: every step's logits are a fresh prefill's of the sequence so far (the short set
    up to 64 tokens, the long set from 65 on), as transformers' generate gives (tests/test_crosscheck_hf.py)."""
    w = load_weights(CHECKPOINTS / "tiny-phi3", "float64")
    ids = np.random.default_rng(58).integers(3, 259, 58).tolist()
    gen = generate(w, ids, 10, ())
    assert gen.recomputed_at == 65 - 58 and len(gen.notes) == 1 and "65 tokens at generation step 7" in gen.notes[0]
    sequence = ids + gen.generated_ids
    for step, logits in enumerate(gen.step_logits):
        fresh, _ = prefill(w, sequence[:58 + step])
        assert float(np.abs(logits - fresh).max()) < 1e-9, f"step {step} (position {57 + step})"


@pytest.mark.parametrize("n_prompt, new", [(40, 10), (64, 10), (65, 10), (50, 15)])
def test_recomputation_happens_exactly_when_the_sequence_first_passes_the_boundary(n_prompt, new):
    """Below and above L0 = 64 nothing is recomputed; a prompt of 64 recomputes at its first decode step (the
    token at position 64 is the first of the long set); 50 + 15 crosses at step 64 - 50 + 1 = 15, never reached:
    the 15th token is the last, no token is fed after it."""
    w = load_weights(CHECKPOINTS / "tiny-phi3", "float64")
    ids = np.random.default_rng(n_prompt).integers(3, 259, n_prompt).tolist()
    gen = generate(w, ids, new, ())
    crosses = n_prompt <= 64 < n_prompt + new - 1
    assert gen.recomputed_at == (65 - n_prompt if crosses else None)
    assert any("original_max_position_embeddings + 1 = 65" in n for n in gen.notes) == crosses


@pytest.mark.parametrize("method", ["asl", "snapkv", "gemfilter", "asl-2pass"])
def test_a_pruning_method_runs_its_prefill_again_on_the_whole_sequence_at_the_boundary(method):
    """At the crossing step the method's own prefill runs on prompt + generated tokens (the authors' code drops its
    cache there, and its next forward call is a prefill): the next token is that prefill's, and the steps before
    are those of the run that never crosses."""
    w = load_weights(CHECKPOINTS / "tiny-phi3", "float64")
    params = dataclasses.replace(BASE, kv_budget=30 if method == "snapkv" else None)
    ids = np.random.default_rng(7).integers(3, 259, 60).tolist()
    gen = generate(w, ids, 8, (), method=method, params=params)
    step = 65 - 60
    assert gen.recomputed_at == step and gen.notes
    short = generate(w, ids, step, (), method=method, params=params)  # stops before the crossing
    assert short.generated_ids == gen.generated_ids[:step] and short.recomputed_at is None
    again = generate(w, ids + gen.generated_ids[:step], 1, (), method=method, params=params)
    assert np.array_equal(again.step_logits[0], gen.step_logits[step])
    trace, _ = make_trace(gen, model_name="tiny-phi3", model_sha256="", config=w.config, dtype="float64")
    assert trace["recomputed_at"] == step and any(n.startswith("longrope: the sequence reached") for n in trace["notes"])


def test_pyramidinfer_across_the_boundary_is_refused_with_the_fix():
    w = load_weights(CHECKPOINTS / "tiny-phi3", "float64")
    with pytest.raises(OracleError, match=r"original_max_position_embeddings \(64\).*keep prompt \+ new tokens <= 65"):
        generate(w, list(range(3, 63)), 6, (), method="pyramidinfer")
    generate(w, list(range(3, 63)), 5, (), method="pyramidinfer")  # 60 + 5 = 65: the last token is never fed


# ---------------------------------------------------------------- judging a run that recomputed


def _crossing(method: str, tmp_path):
    """The oracle's trace of a tiny-phi3 run recomputed at step 3 (62 + 5 tokens), saved; and its in-memory copy."""
    w = load_weights(CHECKPOINTS / "tiny-phi3", "float64")
    params = BASE
    gen = generate(w, np.random.default_rng(3).integers(3, 259, 62).tolist(), 5, (), method=method, params=params)
    assert gen.recomputed_at == 3
    trace, arrays = make_trace(gen, model_name="tiny-phi3", model_sha256="0" * 64, config=w.config, dtype="float64")
    save_trace(trace, arrays, tmp_path / f"{method}.trace.json", with_arrays=True)
    return tmp_path / f"{method}.trace.json", trace, arrays


@pytest.mark.parametrize("method", ["asl", "full"])
def test_a_difference_after_the_recomputation_is_not_judged_for_a_pruning_method(method, tmp_path):
    """A pruning method's tokens after the recomputation rest on a second prefill the trace does not record: a
    difference there is INCOMPLETE (named, not judged), never a PASS; the full run has no decisions there and is
    judged (FAIL); the same difference one step before the recomputation FAILs for both."""
    path, trace, arrays = _crossing(method, tmp_path)
    assert check_trace(path, (trace, arrays)).verdict == "PASS"
    for step, verdict in ((3, "INCOMPLETE" if method == "asl" else FAIL), (2, FAIL)):
        bent = {k: v.copy() for k, v in arrays.items()}
        bent[f"step_logits/{step}"] = bent[f"step_logits/{step}"] + 0.5
        result = check_trace(path, (trace, bent))
        assert result.verdict == verdict, (step, result.verdict, [f.message for f in result.findings])
        if verdict == "INCOMPLETE":
            assert any("step_logits[3]" in u and "ran again" in u for u in result.unchecked), result.unchecked
