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
from reference.asl.generate import generate
from reference.asl.params import Params
from reference.model.attention import group_attention
from reference.model.rope import apply_rope
from reference.model.transformer import rms_norm, silu
from reference.oracle.conformance import FAIL, TOLERANCES, compare, record_from_trace
from reference.oracle.goldens import default_cases, run_case
from reference.oracle.trace import make_trace
from tests.conftest import GOLDEN_DIR
from tests.model_factory import random_model
from tests.standin import standin

CUPY_SKIP = cupy_unavailable_reason()
BACKENDS = [
    pytest.param(("numpy", "float32"), id="numpy-float32"),
    pytest.param(("standin", "float16"), id="standin-float16"),
    pytest.param(("cupy", "float16"), id="cupy-float16",
                 marks=pytest.mark.skipif(CUPY_SKIP is not None, reason=f"no GPU backend here: {CUPY_SKIP}")),
]
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


def array_module(name: str):
    """--backend NAME's module, or a fresh CPU stand-in for CuPy."""
    return standin() if name == "standin" else get_xp(name)


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
