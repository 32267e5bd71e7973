"""The port (gpu/) agrees with the reference on random tiny models, prompts and parameters.

Agreement is judged by the tolerance policy of reference/oracle/conformance.py
(docs/conformance.md), the same code the golden checks use. Every test runs
on the NumPy backend and on the CPU stand-in for CuPy (tests/standin.py: the
GPU's layout, float16 weights, device arrays that refuse host conversions and
host operands, float32 flushed to zero as CuPy's kernels flush it); the CuPy
variants run where CuPy and a GPU are present and are skipped with the reason
otherwise.
"""

from __future__ import annotations

import functools
import json

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import gpu.attention
import gpu.engine
from gpu.attention import KeyBounds, flash_attention, flash_group_attention
from gpu.backend import cupy_unavailable_reason, get_xp, to_host
from gpu.engine import PortEngine
from gpu.loader import device_copy, load_device_weights
from reference.asl import pyramid
from reference.asl.engine import ReferenceEngine
from reference.asl.generate import generate
from reference.asl.methods import run_prefill
from reference.asl.params import Params
from reference.asl.scoring import window_attention
from reference.asl.selection import boundary_score
from reference.io.checkpoint import load_weights
from reference.io.fetch import resolve_model
from reference.model.attention import group_attention
from reference.model.rope import apply_rope
from reference.model.transformer import rms_norm, silu
from reference.oracle.conformance import FAIL, TOLERANCES, compare, record_from_trace
from reference.oracle.goldens import default_cases, run_case
from reference.oracle.trace import make_trace
from reference.oracle.verdicts import apart
from tests.conftest import GOLDEN_DIR, PORT_BACKENDS, array_module
from tests.model_factory import random_model

CUPY_SKIP = cupy_unavailable_reason()
BACKENDS = PORT_BACKENDS
SETTINGS = settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                            HealthCheck.function_scoped_fixture])


@st.composite
def agreement_cases(draw):
    L = draw(st.integers(4, 9))
    n_kv = draw(st.sampled_from([1, 2]))
    model = dict(seed=draw(st.integers(0, 10**6)), n_layers=L, n_kv_heads=n_kv,
                 n_heads=n_kv * draw(st.sampled_from([1, 2, 4])), head_dim=draw(st.sampled_from([4, 8, 16])),
                 vocab=draw(st.sampled_from([40, 64, 100])), bias=draw(st.booleans()), tied=draw(st.booleans()),
                 dtype=np.float32)
    method = draw(st.sampled_from(["asl", "fastkv", "gemfilter", "snapkv", "asl-2pass"]))
    w = draw(st.integers(1, 8))
    l_min = draw(st.integers(1, L - 1))
    kv_budget = draw(st.one_of(st.none(), st.integers(w + 1, w + 30))) if method != "snapkv" else w + draw(st.integers(1, 30))
    params = Params(window=w, kernel=draw(st.sampled_from([1, 3, 5, 7])), pooling=draw(st.sampled_from(["avg", "max"])),
                    select_k=draw(st.integers(w + 1, w + 40)), tau=draw(st.sampled_from([0.1, 0.4, 0.8, 1.2])),
                    l_min=l_min, l_obs=draw(st.integers(2, l_min + 1)), kv_budget=kv_budget,
                    select_layer=draw(st.integers(0, L - 1)), filter_layer=draw(st.integers(0, L - 1)))
    ids = np.random.default_rng(model["seed"]).integers(0, model["vocab"], draw(st.integers(1, 90)))
    return model, method, params, ids, draw(st.sampled_from([1, 2, 3]))


@pytest.fixture
def threads_on_tiny_work(monkeypatch):
    """Let the port use its CPU threads even on tiny prompts, so the threaded paths are the ones tested."""
    monkeypatch.setattr(gpu.engine, "MIN_ROWS_PER_THREAD", 2)
    monkeypatch.setattr(gpu.attention, "MIN_THREADED_SCORES", 0)


def record(gen, weights, dtype):
    trace, arrays = make_trace(gen, model_name="random", model_sha256="", config=weights.config, dtype=dtype)
    return record_from_trace(trace, arrays)


@pytest.mark.parametrize("backend", BACKENDS)
@SETTINGS
@given(case=agreement_cases())
def test_port_agrees_with_the_reference(backend, case, threads_on_tiny_work):
    name, weight_dtype = backend
    xp = array_module(name)
    model, method, params, ids, threads = case
    weights = random_model(**model)
    expected = generate(weights, ids, 4, (), method=method, params=params)
    port = PortEngine(device_copy(weights, xp, weight_dtype), xp, block_q=16, block_k=32,  # small blocks: many of them
                      threads=threads)  # NumPy only: 1, 2 or 3 CPU threads
    got = generate(port, ids, 4, (), method=method, params=params)
    verdict, findings = compare(record(expected, weights, "float32"), record(got, weights, "float32"),
                                TOLERANCES[weight_dtype])
    assert verdict != FAIL, "; ".join(f"{f.field}: {f.message}" for f in findings)


@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=40, deadline=None)
@given(T=st.integers(1, 70), extra=st.integers(0, 50), G=st.integers(1, 4), bq=st.integers(1, 20),
       bk=st.integers(1, 40), seed=st.integers(0, 2**31), decode=st.booleans())
def test_online_softmax_attention_equals_the_reference(backend, T, extra, G, bq, bk, seed, decode):
    xp = array_module(backend[0])
    rng = np.random.default_rng(seed)
    n = T + extra
    k_pos = np.sort(rng.choice(np.arange(3 * n), size=n, replace=False)).astype(np.int64)
    q_pos = k_pos[-1] + 1 + np.arange(T) if decode else k_pos[-T:]
    q = (3 * rng.standard_normal((G, T, 16))).astype(np.float32)
    k, v = rng.standard_normal((n, 16)).astype(np.float32), rng.standard_normal((n, 16)).astype(np.float32)
    got = to_host(flash_group_attention(xp, xp.asarray(q), xp.asarray(k), xp.asarray(v), q_pos, k_pos, bq, bk))
    expected = group_attention(q.astype(np.float64), k.astype(np.float64), v.astype(np.float64), q_pos, k_pos)
    np.testing.assert_allclose(got, expected, rtol=0, atol=2e-5)


def attention_in_float64(q, k, v, q_pos, k_pos):
    """The reference's attention of every KV head (q (B, G, T, hd), k, v (B, S, hd)), in float64."""
    return np.stack([group_attention(q[b].astype(np.float64), k[b].astype(np.float64), v[b].astype(np.float64),
                                     q_pos, k_pos) for b in range(q.shape[0])])


@pytest.mark.parametrize("per_head", [True, False], ids=["cpu-units", "gpu-units"])
def test_large_scores_take_a_shift_and_stay_exact(per_head):
    """Scores near 100 would overflow e^s: the fixed shift (KeyBounds) must be used, and the result must
    still be the reference's softmax to float32 precision."""
    rng = np.random.default_rng(0)
    B, G, T, hd = 2, 2, 40, 16
    q = 12 * rng.standard_normal((B, G, T, hd)).astype(np.float32)
    k = 12 * rng.standard_normal((B, T, hd)).astype(np.float32)
    v = rng.standard_normal((B, T, hd)).astype(np.float32)
    pos = np.arange(T)
    bounds = KeyBounds.of(np, k, v)
    scaled = (q / np.float32(4)).reshape(B, G * T, hd)
    assert bounds.shift(np, scaled) is not None, "the test must exercise the shift"
    got = flash_attention(np, q, k, v, pos, pos, 8, 16, per_head=per_head)
    np.testing.assert_allclose(got, attention_in_float64(q, k, v, pos, pos), rtol=0, atol=5e-5)


@settings(max_examples=20, deadline=None)
@given(T=st.integers(1, 40), heads=st.integers(1, 4), half=st.integers(1, 8), seed=st.integers(0, 2**31))
def test_the_ports_elementwise_pieces_are_the_reference_formulas(T, heads, half, seed):
    """The port computes rope, SiLU·up and RMSNorm in fewer passes (gpu/engine.py): rope and SiLU·up
    with the reference's very roundings (so the same bits), RMSNorm with its mean square summed in
    another order (so within a few float32 ulps). Large |x| too: SiLU's e^-x overflows below -88."""
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((heads, T, 2 * half)) * rng.choice([1, 100], size=(heads, T, 1))).astype(np.float32)
    cos, sin = rng.standard_normal((2, T, 2 * half)).astype(np.float32)
    rotated = np.empty_like(x)
    gpu.engine.rotate_into(rotated, x, cos, sin)
    np.testing.assert_array_equal(rotated, apply_rope(x, cos, sin))
    gate, up = x.reshape(-1, 2 * half), x[::-1].reshape(-1, 2 * half)
    expected = silu(gate) * up
    np.testing.assert_array_equal(gpu.engine.silu_times(np, gate.copy(), up), expected)
    engine = PortEngine(device_copy(random_model(seed=seed % 1000), np, "float32"), np)
    weight = rng.standard_normal(2 * half).astype(np.float32)
    rows = x.reshape(-1, 2 * half)
    np.testing.assert_allclose(engine.rms_norm(rows, weight), rms_norm(rows, weight, engine.config.rms_norm_eps),
                               rtol=4e-7, atol=1e-30)


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_key_bounds_taken_in_chunks_are_the_bounds_of_all_keys(dtype):
    """KeyBounds reads the keys `chunk` at a time (a float16 cache is never copied whole to float32):
    the bounds must be those of every key, whatever the chunk, and the key with the largest norm may
    sit in any chunk (here the last, and alone in it)."""
    rng = np.random.default_rng(3)
    k = rng.standard_normal((2, 23, 8)).astype(dtype)
    k[1, -1] = 9.0  # head 1's largest key is the very last one
    v = rng.standard_normal((2, 23, 8)).astype(dtype)
    k64 = k.astype(np.float64)
    for chunk in (1, 5, 22, 23, 1000):
        bounds = KeyBounds.of(np, k, v, chunk=chunk)
        np.testing.assert_array_equal(bounds.k_max[:, 0], k64.max(axis=1))
        np.testing.assert_array_equal(bounds.k_min[:, 0], k64.min(axis=1))
        np.testing.assert_allclose(bounds.k_norm[:, 0, 0], np.sqrt((k64 * k64).sum(-1)).max(axis=1), rtol=1e-6)


@pytest.mark.parametrize("per_head", [True, False], ids=["cpu-units", "gpu-units"])
def test_a_shift_that_underflows_falls_back_to_the_running_maximum(monkeypatch, per_head):
    """Keys along different axes make the bound loose: every score is 60 but the bound is |q|·max|k| = 240,
    so e^(s - shift) underflows and the block must be redone with the running maximum. KV head 1 is
    ordinary, so on CPU units only head 0 is redone, on GPU units both."""
    hd, T = 16, 24
    rng = np.random.default_rng(1)
    k = rng.standard_normal((2, T, hd)).astype(np.float32)
    k[0] = 0.0
    k[0, np.arange(T), np.arange(T) % hd] = 60.0  # each key of head 0 along one axis
    q = rng.standard_normal((2, 1, T, hd)).astype(np.float32)
    q[0] = 4.0  # q·k_j / sqrt(16) = 4·60/4 = 60 for every j
    v = rng.standard_normal((2, T, hd)).astype(np.float32)
    calls = []
    monkeypatch.setattr(gpu.attention, "online_softmax",
                        lambda *a: calls.append(1) or ONLINE_SOFTMAX(*a))
    pos = np.arange(T)
    got = flash_attention(np, q, k, v, pos, pos, 8, 8, per_head=per_head)
    assert calls, "the fallback must have run"
    np.testing.assert_allclose(got, attention_in_float64(q, k, v, pos, pos), rtol=0, atol=2e-5)


ONLINE_SOFTMAX = gpu.attention.online_softmax


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(T=st.integers(1, 60), B=st.integers(1, 3), G=st.integers(1, 3), bq=st.integers(1, 16), seed=st.integers(0, 2**31))
def test_thread_count_and_unit_layout_do_not_change_the_attention(T, B, G, bq, seed, threads_on_tiny_work):
    """Units never share an output row and each runs with BLAS at one thread, so 2 and 3 threads give the same
    bits, and one thread the same values to float32 rounding; so does the GPU's unit layout."""
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((B, G, T, 8)).astype(np.float32)
    k, v = rng.standard_normal((2, B, T, 8)).astype(np.float32)
    pos = np.arange(T)
    one, two, three = (flash_attention(np, q, k, v, pos, pos, bq, 16, threads) for threads in (1, 2, 3))
    np.testing.assert_array_equal(two, three)
    np.testing.assert_allclose(one, two, rtol=0, atol=1e-6)
    # the GPU's layout, all KV heads in one unit, run here on NumPy so that its first run is not on a GPU
    batched = flash_attention(np, q, k, v, pos, pos, bq, 16, per_head=False)
    np.testing.assert_allclose(batched, one, rtol=0, atol=1e-6)


@pytest.mark.parametrize("backend", [*BACKENDS, pytest.param(("numpy", "float16"), id="numpy-float16")])
@pytest.mark.parametrize("case", default_cases(), ids=lambda c: c.name)
def test_port_reproduces_the_goldens(backend, case):
    """float16 on NumPy runs the GPU's weight dtype through the same code, so a GPU run is not its first."""
    name, weight_dtype = backend
    xp = array_module(name)

    def engine(model_dir):
        return PortEngine(load_device_weights(model_dir, xp, weight_dtype, progress=False)[0], xp)

    golden = json.loads((GOLDEN_DIR / f"{case.name}.json").read_text())
    verdict, findings = compare(golden["expected"], run_case(case, engine)["expected"], TOLERANCES[weight_dtype])
    assert verdict != FAIL, "; ".join(f"{f.field}: {f.message}" for f in findings)


def test_cupy_backend_missing_is_a_clear_error():
    from reference.errors import OracleError

    if CUPY_SKIP is None:
        pytest.skip("CuPy with a GPU is present: nothing to refuse")
    with pytest.raises(OracleError, match="--backend cupy: .*use --backend numpy"):
        get_xp("cupy")
    assert get_xp("auto") is np


def test_a_driver_older_than_cupys_cuda_is_a_clear_error(monkeypatch):
    """CuPy importable, the driver too old for its CUDA (the device machine's CUDA 13 CuPy on a CUDA 12
    driver, say): one line naming the cause and the way out, not CuPy's traceback."""
    import sys
    import types

    from reference.errors import OracleError

    def too_old():
        raise RuntimeError("cudaErrorInsufficientDriver: CUDA driver version is insufficient for CUDA runtime version")

    fake = types.SimpleNamespace(__version__="14.2.0", cuda=types.SimpleNamespace(
        runtime=types.SimpleNamespace(getDeviceCount=too_old)))
    monkeypatch.setitem(sys.modules, "cupy", fake)
    with pytest.raises(OracleError, match=r"driver is older than the CUDA of CuPy 14\.2\.0 .*gpu-cuda13") as e:
        get_xp("cupy")
    assert "\n" not in str(e.value)


# ---------------------------------------------------------------- PyramidInfer

PYRAMID_BACKENDS = [*BACKENDS, pytest.param(("numpy", "float16"), id="numpy-float16")]
PYRAMID_PARAMS = [
    pytest.param(Params(), id="defaults"),
    pytest.param(Params(layerwise_downsample_interval=3, min_context_length=8, streamingllm_sink_len=2),
                 id="interval-3"),
    pytest.param(Params(gen_compress=False), id="prefill-only"),
]
PYRAMID_NEW_TOKENS = 12
ARRAY_MODULES = ["numpy", "standin", pytest.param("cupy", marks=pytest.mark.skipif(
    CUPY_SKIP is not None, reason=f"no GPU backend here: {CUPY_SKIP}"))]  # float32 weights on each


class DecodeLogits:
    """An engine that keeps every decoding step's logits (a Generation keeps only their top-2 gaps)."""

    def __init__(self, engine):
        self.engine, self.step_logits = engine, []

    def __getattr__(self, name):
        return getattr(self.engine, name)

    def decode(self, *args, **kwargs):
        out = self.engine.decode(*args, **kwargs)
        self.step_logits.append(out[0])
        return out


@functools.lru_cache(maxsize=None)
def pyramid_reference(model: str, params: Params):
    """The reference's PyramidInfer generation on a tiny checkpoint (float32) and its decoding steps' logits."""
    engine = DecodeLogits(ReferenceEngine(load_weights(resolve_model(model), "float32")))
    ids = np.random.default_rng(0).integers(3, engine.config.vocab_size, 150)
    return ids, generate(engine, ids, PYRAMID_NEW_TOKENS, (), method="pyramidinfer", params=params), engine.step_logits


def near_tie(what: str, exp_pos, got_pos, scored_pos, scores, count: int, protected, tol, ranked=None) -> str:
    """Two kept sets that differ, judged as reference/oracle/conformance.py judges a kept set: a near-tie (returned,
    described) when every position kept by one side alone is a scored position whose expected score lies within
    `score` (relative to the largest) of the expected top-`count` boundary, never a window or sink position;
    otherwise the test fails. `ranked`: the scores the top-`count` was taken on when not `scores` (the prefill's
    sink-forced ones: their largest float would make every distance relative to it look like nothing)."""
    only_e, only_g = sorted(set(exp_pos) - set(got_pos)), sorted(set(got_pos) - set(exp_pos))
    lists = f"{what}: kept only by the reference {only_e[:8]}, only by the port {only_g[:8]}"
    assert len(exp_pos) == len(got_pos), lists
    assert not set(only_e + only_g) & set(protected), f"{lists}: a window or sink position"
    row_of = {int(q): r for r, q in enumerate(scored_pos)}
    assert all(q in row_of for q in only_e + only_g), f"{lists}: a position that was not scored"
    scores = np.asarray(scores, dtype=np.float64)
    boundary = boundary_score(scores if ranked is None else np.asarray(ranked), count)
    scale = float(np.abs(scores).max()) or 1.0
    worst = max(abs(scores[row_of[q]] - boundary) / scale for q in only_e + only_g)
    assert worst <= tol.score, f"{lists}: {worst:.3g} (relative) from the boundary, beyond {tol.score}"
    return f"{lists}, within {worst:.2g} of the boundary"


def kept_apart(expected, got) -> str:
    return "kept " + apart(expected.tolist(), got.tolist(), "by the reference only", "by the port only")


def pyramid_agreement(exp, got, exp_logits, got_logits, tol, near_ties: bool) -> str | None:
    """The port's PyramidInfer run against the reference's, decision by decision in the order they are made.

    Per prefill layer: tokens processed, cached positions, r(i) and kept positions equal; then the prompt's logits
    within `tol.logits`; then per generated token t: its logits within `tol.logits`, the token, and the decode-stage
    compressions of step t (the step that fed token t-1 back and gave token t's logits: layer, R, scored and kept
    positions) equal. With near_ties (float16 weights) a kept
    set or greedy token may differ on a near-tie (`near_tie`; a token: the expected top-2 gap within 2·logits):
    what follows depends on it and is not compared; the near-tie is returned. Without, everything must be equal."""
    W = pyramid.recent_length(len(exp.prompt_ids), exp.prefill.params.recent_ratio) + 1
    sinks = exp.prefill.params.streamingllm_sink_len
    for a, b in zip(exp.prefill.layers, got.prefill.layers, strict=True):
        at = f"layer {a.layer}"
        assert (a.prefill_tokens, a.keep_ratio) == (b.prefill_tokens, b.keep_ratio), at
        assert [p.tolist() for p in a.kv_positions] == [p.tolist() for p in b.kv_positions], at
        assert (a.kept is None) == (b.kept is None), at
        if a.kept is not None and not np.array_equal(a.kept, b.kept):
            held, c = a.kv_positions[0], len(a.scores)
            assert near_ties, f"{at}: {kept_apart(a.kept, b.kept)}"
            return near_tie(at, a.kept.tolist(), b.kept.tolist(), held[:c], a.scores, len(a.kept) - W,
                            [*held[c:].tolist(), *held[:sinks].tolist()], tol, pyramid.sink_forced(a.scores, sinks))
    logits = [exp.prefill.logits, *exp_logits], [got.prefill.logits, *got_logits]
    assert len(exp.generated_ids) == len(got.generated_ids) == PYRAMID_NEW_TOKENS
    for t, (e_id, g_id) in enumerate(zip(exp.generated_ids, got.generated_ids)):
        diff = np.abs(logits[0][t] - logits[1][t]).max()
        assert diff <= tol.logits, f"token {t}: logits {diff:.3g} apart, beyond {tol.logits}"
        if e_id != g_id:
            gap = exp.generated_gaps[t]
            assert near_ties and gap <= 2 * tol.logits, f"token {t}: {e_id} expected, {g_id} generated (gap {gap:.3g})"
            return f"token {t}: {e_id} expected, {g_id} generated on a top-2 gap of {gap:.3g}"
        events = [[c for c in gen.compressions if c.step == t] for gen in (exp, got)]
        assert [(c.layer, c.recent) for c in events[0]] == [(c.layer, c.recent) for c in events[1]], f"step {t}"
        for a, b in zip(*events):
            at = f"step {t}, layer {a.layer}"
            assert np.array_equal(a.scored, b.scored), f"{at}: scored positions differ"
            if not np.array_equal(a.kept, b.kept):
                assert near_ties, f"{at}: {kept_apart(a.kept, b.kept)}"
                return near_tie(at, a.kept.tolist(), b.kept.tolist(), a.scored, a.scores, len(a.kept), [], tol)
    assert len(exp.compressions) == len(got.compressions)
    return None


@pytest.mark.parametrize("backend", PYRAMID_BACKENDS)
@pytest.mark.parametrize("params", PYRAMID_PARAMS)
@pytest.mark.parametrize("model", ["tiny-llama", "tiny-qwen2"])
def test_port_agrees_with_the_reference_on_pyramidinfer(backend, params, model, threads_on_tiny_work):
    """Both tiny checkpoints, 150 tokens (a window of W = 31 rows: two row blocks of 16), 12 new tokens. float32
    weights: every decision identical and the logits within float32's tolerance; float16 weights: the same, but
    a kept set or token may part on a near-tie (reference/oracle/conformance.py's rule), after which the runs
    are not compared."""
    name, weight_dtype = backend
    xp = array_module(name)
    ids, expected, expected_logits = pyramid_reference(model, params)
    port = DecodeLogits(PortEngine(load_device_weights(resolve_model(model), xp, weight_dtype, progress=False)[0], xp,
                                   block_q=16, block_k=32, threads=2))
    got = generate(port, ids, PYRAMID_NEW_TOKENS, (), method="pyramidinfer", params=params)
    assert params.gen_compress == bool(expected.compressions)  # the decode stage ran where it should
    pyramid_agreement(expected, got, expected_logits, port.step_logits, TOLERANCES[weight_dtype],
                      near_ties=weight_dtype == "float16")


@pytest.mark.parametrize("backend", ARRAY_MODULES)
@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(H_kv=st.integers(1, 3), G=st.integers(1, 4), n=st.integers(1, 60), data=st.data(), bq=st.integers(1, 20),
       budget=st.sampled_from([1, 50, 1 << 24]), seed=st.integers(0, 2**31))
def test_recent_attention_is_the_references_head_mean_in_blocks(backend, H_kv, G, n, data, bq, budget, seed,
                                                                  threads_on_tiny_work, monkeypatch):
    """PyramidInfer's window rows (W, n) from the port's blocks of KV groups × window rows (`block_q` rows, fewer
    when WINDOW_SCORES_PER_BLOCK is small: one row per block at 1) equal the reference's (H, W, n) mean."""
    W = data.draw(st.integers(1, n))
    monkeypatch.setattr(gpu.engine, "WINDOW_SCORES_PER_BLOCK", budget)
    xp = array_module(backend)
    rng = np.random.default_rng(seed)
    hd = 8
    q = (2 * rng.standard_normal((H_kv * G, W, hd))).astype(np.float32)
    k = (2 * rng.standard_normal((H_kv, n, hd))).astype(np.float32)
    engine = PortEngine(device_copy(random_model(seed=0, n_heads=H_kv * G, n_kv_heads=H_kv, head_dim=hd), xp,
                                    "float32"), xp, block_q=bq, threads=3)
    cache = engine.new_cache(n, np.arange(n))
    cache.k[:, :n] = xp.asarray(k)
    got = engine.recent_attention(xp.asarray(q), cache)
    assert isinstance(got, np.ndarray) and got.shape == (W, n) and got.dtype == np.float32
    np.testing.assert_allclose(got, window_attention(q, k, G).mean(axis=0), rtol=0, atol=1e-6)


@pytest.mark.parametrize("backend", ARRAY_MODULES)
def test_decode_attention_rows_are_the_references(backend):
    """decode(attention=True): per layer the new query's head-averaged attention over its cache and itself
    (len + 1,), host float32, the reference's to float32 rounding; the logits as with attention=False."""
    weights = random_model(seed=4, n_layers=3, n_heads=4, n_kv_heads=2, head_dim=8, hidden=32, dtype=np.float32)
    xp = array_module(backend)
    ids = np.random.default_rng(4).integers(0, 64, 30)
    reference, port = ReferenceEngine(weights), PortEngine(device_copy(weights, xp, "float32"), xp)
    ref_logits, _, ref_rows = reference.decode(run_prefill(reference, ids).cache, 7, len(ids), attention=True)
    logits, _, rows = port.decode(run_prefill(port, ids).cache, 7, len(ids), attention=True)
    assert len(rows) == 3 and all(isinstance(r, np.ndarray) and r.dtype == np.float32 for r in rows)
    assert [len(r) for r in rows] == [len(ids) + 1] * 3
    for got, want in zip(rows, ref_rows):
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
    np.testing.assert_allclose(logits, ref_logits, rtol=0, atol=1e-4)
    plain, _ = port.decode(run_prefill(port, ids).cache, 7, len(ids))
    np.testing.assert_array_equal(plain, logits)


@pytest.mark.parametrize("backend", ARRAY_MODULES)
def test_decode_stage_compression_leaves_the_prefill_cache_as_it_was(backend):
    """PyramidInfer compresses decoding steps' caches, which share their storage with the caches before them:
    the compression must not overwrite the rows `prefill.cache` reads (the Engine protocol), nor a later append
    the rows the compressed cache holds. The prefill cache after generating is bit for bit a fresh prefill's."""
    model_dir = resolve_model("tiny-llama")
    xp = array_module(backend)
    ids = np.random.default_rng(0).integers(3, 259, 80)
    params = Params(min_context_length=8, exceed_length_to_compress=4)

    def engine():
        return PortEngine(load_device_weights(model_dir, xp, "float32", progress=False)[0], xp)

    port = engine()
    gen = generate(port, ids, 10, (), method="pyramidinfer", params=params)
    assert gen.compressions  # the decode stage compressed caches
    fresh = run_prefill(engine(), ids, "pyramidinfer", params).cache
    for after, before in zip(gen.prefill.cache, fresh):
        assert after.lengths == before.lengths
        n = after.lengths[0]
        np.testing.assert_array_equal(after.pos[:, :n], before.pos[:, :n])
        for name in ("k", "v"):
            np.testing.assert_array_equal(to_host(getattr(after, name)[:, :n]), to_host(getattr(before, name)[:, :n]))
    reference = generate(load_weights(model_dir, "float32"), ids, 10, (), method="pyramidinfer", params=params)
    assert gen.generated_ids == reference.generated_ids
    assert [(c.step, c.layer, c.kept.tolist()) for c in gen.compressions] == \
        [(c.step, c.layer, c.kept.tolist()) for c in reference.compressions]
