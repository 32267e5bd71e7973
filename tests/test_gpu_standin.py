"""The GPU's rules kept on the CPU: the stand-in for CuPy (tests/standin.py) refuses what CuPy refuses, and the
port on it syncs with the host a fixed number of times per layer, uses 2-D GEMMs with float32 outputs, and keeps
float32 precision under flush-to-zero. The agreement tests and goldens on the stand-in are in
tests/test_port_agreement.py (the standin-float16 variants)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

import gpu.attention
from gpu.attention import flash_attention
from gpu.engine import PortEngine
from gpu.loader import device_copy
from reference.asl.generate import generate
from reference.asl.methods import run_prefill
from reference.asl.params import Params
from reference.model.attention import group_attention
from tests.model_factory import random_model
from tests.standin import standin

SLOW_ON_CUPY = ("batched matmul", "float16 matmul", "einsum")


def test_the_standin_refuses_what_cupy_refuses():
    xp = standin()
    a = xp.asarray(np.array([[1.0, -2.0], [3.0, 4.0]], dtype=np.float32))
    host = np.ones(2, dtype=np.float32)
    for mistake in (lambda: np.asarray(a), lambda: a + host, lambda: xp.maximum(a, host),
                    lambda: xp.copyto(a, np.float32(0), where=host > 0), lambda: a.__setitem__(0, host)):
        with pytest.raises(TypeError):
            mistake()
    total = a.sum()
    assert not isinstance(total, (np.ndarray, np.generic)) and xp.syncs == 0  # a 0-d device array, not a scalar
    assert float(total) == 6.0 and bool((a > 0).any()) and a.get().shape == (2, 2)
    assert xp.syncs == 3
    tiny = xp.exp(xp.asarray(np.array([-100.0], dtype=np.float32)))  # e^-100 is subnormal in float32
    assert np.exp(np.float32(-100.0)) > 0 and tiny.get()[0] == 0  # flushed, as CuPy's -ftz=true kernels flush it


def port_on_standin(n_layers: int, seed: int = 1):
    xp = standin()
    weights = random_model(seed=seed, n_layers=n_layers, n_heads=4, n_kv_heads=2, head_dim=8, hidden=32,
                           dtype=np.float32)
    return xp, PortEngine(device_copy(weights, xp, "float16"), xp, block_q=16, block_k=32)  # small blocks: many


@pytest.mark.parametrize("n_layers", [3, 5])
def test_a_prefill_syncs_a_fixed_number_of_times_per_layer_not_per_block(n_layers):
    """Per layer: the attention's quiet heads (one flag per KV head) and its fallback check (one flag per query
    block, fetched together), and the layer's finiteness check; once: the embeddings' finiteness check and the
    logits. 40 and 150 tokens make 3 and 10 query blocks of 16: the count must not see the difference."""
    counts = set()
    for n_tokens in (40, 150):
        xp, engine = port_on_standin(n_layers)
        xp.reset()
        run_prefill(engine, np.random.default_rng(0).integers(0, 64, n_tokens), "full", Params())
        counts.add(xp.syncs)
    assert counts == {3 * n_layers + 2}


@pytest.mark.parametrize("method", ["full", "snapkv", "asl"])
def test_a_decoding_step_syncs_once_for_its_logits(method):
    """SnapKV leaves the KV heads holding different positions: still no per-layer comparison or sync."""
    xp, engine = port_on_standin(6)
    params = Params(window=4, kernel=3, select_k=20, tau=0.5, l_min=2, l_obs=2, kv_budget=24)
    prefill = run_prefill(engine, np.random.default_rng(2).integers(0, 64, 90), method, params)
    cache = prefill.cache
    for step in range(3):
        xp.reset()
        _, cache = engine.decode(cache, 5, prefill.next_position + step)
        assert xp.syncs == 1, (method, dict(xp.sync_kinds))


@pytest.mark.parametrize("n_layers", [3, 5])
def test_a_pyramidinfer_prefill_syncs_once_more_per_deciding_layer(n_layers):
    """PyramidInfer adds one host sync per deciding layer (every layer at interval 1): its window's attention rows
    (W, n), fetched once however many KV groups and row blocks made them. 40 and 150 tokens make windows of 9 and
    31 rows, one and two blocks of 16 rows: the count must not see the difference (3 + 1 per layer, 2 once)."""
    counts = set()
    for n_tokens in (40, 150):
        xp, engine = port_on_standin(n_layers)
        xp.reset()
        prefill = run_prefill(engine, np.random.default_rng(0).integers(0, 64, n_tokens), "pyramidinfer",
                              Params(min_context_length=8))
        assert any(rec.kept is not None for rec in prefill.layers)  # it pruned
        counts.add(xp.syncs)
    assert counts == {4 * n_layers + 2}


def test_a_pyramidinfer_decoding_step_syncs_twice_and_its_compressions_never():
    """decode(attention=True): its logits and every layer's attention row, gathered on the device and fetched in one
    transfer; the decode stage's compressions (host index lists copied over) add none. attention=False stays at one."""
    xp, engine = port_on_standin(5)
    params = Params(min_context_length=8, exceed_length_to_compress=4)
    ids, seen = np.random.default_rng(2).integers(0, 64, 90), []
    gen = generate(engine, ids, 8, (), method="pyramidinfer", params=params, on_token=lambda token: seen.append(xp.syncs))
    assert gen.compressions and {c.step for c in gen.compressions} == set(range(1, 8))  # every step compressed
    assert np.diff(seen).tolist() == [2] * 7, dict(xp.sync_kinds)
    prefill = run_prefill(engine, ids, "pyramidinfer", params)  # a cache not decoded from yet
    cache, position = prefill.cache, prefill.next_position
    for step, (attention, syncs) in enumerate(((True, 2), (False, 1))):
        xp.reset()
        cache = engine.decode(cache, 5, position + step, attention=attention)[1]
        assert xp.syncs == syncs, (attention, dict(xp.sync_kinds))


@pytest.mark.parametrize("method", ["full", "asl", "snapkv", "gemfilter", "asl-2pass", "pyramidinfer"])
def test_the_device_path_takes_2d_gemms_with_float32_outputs_and_no_einsum(method):
    xp, engine = port_on_standin(6)
    params = Params(window=4, kernel=3, select_k=20, tau=0.5, l_min=2, l_obs=2, kv_budget=24, select_layer=2,
                    filter_layer=2)
    if method == "pyramidinfer":  # its own caches' compression, no budget; pruning from short contexts on
        params = dataclasses.replace(params, kv_budget=None, min_context_length=8, exceed_length_to_compress=4)
    generate(engine, np.random.default_rng(3).integers(0, 64, 70), 3, (), method=method, params=params)
    assert xp.calls["matmul"] > 0
    assert {name: xp.calls[name] for name in SLOW_ON_CUPY} == dict.fromkeys(SLOW_ON_CUPY, 0)


def loose_bound_case():
    """A row whose largest weight, after the fixed shift, is normal but small (about 2^-105) while 4999 other
    keys, each e^-15 of it, are subnormal: the box and norm bounds are loose (keys along different axes), so
    the shift overshoots the largest score by ~152 nats. Together those keys carry 0.15% of the softmax."""
    S, hd, T = 5000, 16, 16
    k = np.zeros((1, S, hd), np.float32)
    k[0, 0, 0] = 50.67  # score 50.67 with q = 4·(1, ..., 1) scaled by 1/4
    k[0, np.arange(1, S), 1 + np.arange(S - 1) % (hd - 1)] = 50.67 - 15
    q = np.full((1, 1, T, hd), 4.0, np.float32)
    v = np.random.default_rng(0).uniform(-1, 1, (1, S, hd)).astype(np.float32)
    k_pos, q_pos = np.arange(S), np.arange(S - T, S)
    expected = group_attention(q[0].astype(np.float64), k[0].astype(np.float64), v[0].astype(np.float64),
                               q_pos, k_pos)
    return (q, k, v, q_pos, k_pos), expected


def test_flush_to_zero_does_not_cost_the_fixed_shift_its_precision(monkeypatch):
    (q, k, v, q_pos, k_pos), expected = loose_bound_case()
    xp = standin(ftz=True)

    def attend():
        return flash_attention(xp, xp.asarray(q), xp.asarray(k), xp.asarray(v), q_pos, k_pos, 8, 1024).get()[0]

    np.testing.assert_allclose(attend(), expected, rtol=0, atol=2e-5)
    # the case does reach flush-to-zero: with a threshold that counts on subnormals (2^-149 per lost term, as if
    # nothing were flushed) the fixed shift's rows pass the check and lose the flushed keys' share
    monkeypatch.setattr(gpu.attention, "FLT_MIN", 2.0**-149)
    assert np.abs(attend() - expected).max() > 1e-4


def test_float16_weights_give_float32_outputs_above_65504():
    """A float16 product written in float16 turns 64 · 1100 · 1 = 70400 into inf; the port's stays finite."""
    x = np.full((2, 64), 1100.0, dtype=np.float32)
    w = np.ones((3, 64), dtype=np.float16)
    for xp in (np, standin()):
        engine = PortEngine(device_copy(random_model(seed=0), xp, "float16"), xp)
        y = engine.linear(xp.asarray(x), xp.asarray(w))
        y = y if xp is np else y.get()
        assert y.dtype == np.float32
        np.testing.assert_array_equal(y, np.full((2, 3), 70400.0, dtype=np.float32))
        if xp is not np:
            assert xp.calls["float16 matmul"] == 0


@pytest.mark.parametrize("failure", ["raises", "disagrees"])
def test_a_gemm_ex_that_fails_its_first_check_falls_back_to_the_widened_product(monkeypatch, failure):
    """The direct cuBLAS call is checked once per process; raising or disagreeing, it is replaced by the widened
    float32 product with one warning, and every later call takes the fallback silently."""
    import types

    import gpu.backend as backend

    fake_cupy = types.ModuleType("cupy")  # is_cupy() reads the name; NumPy does the arithmetic
    for name in ("asarray", "matmul", "allclose", "ascontiguousarray", "float32", "float16"):
        setattr(fake_cupy, name, getattr(np, name))
    calls = []

    def broken(xp, a, b):
        calls.append(a.shape)
        if failure == "raises":
            raise RuntimeError("CUBLAS_STATUS_NOT_SUPPORTED")
        return np.zeros((a.shape[0], b.shape[1]), dtype=np.float32)  # a wrong product

    monkeypatch.setattr(backend, "_gemm_ex_f16_f32", broken)
    monkeypatch.setattr(backend, "_GEMM_EX", {})
    rng = np.random.default_rng(1)
    a, b = rng.standard_normal((5, 7)).astype(np.float16), rng.standard_normal((7, 3)).astype(np.float16)
    want = a.astype(np.float32) @ b.astype(np.float32)
    with pytest.warns(RuntimeWarning, match="GemmEx .* not used"):
        got = backend.matmul_f32(fake_cupy, a, b)
    assert got.dtype == np.float32 and np.array_equal(got, want)
    checked = len(calls)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert np.array_equal(backend.matmul_f32(fake_cupy, a, b), want)
    assert len(calls) == checked  # checked once, never called again


class _DeviceBuffer:
    """A NumPy array dressed as a CuPy one for the cuBLAS call: shape, flags, copy, fill, data.ptr."""

    def __init__(self, a: np.ndarray):
        self.a = a
        self.shape, self.flags, self.dtype = a.shape, a.flags, a.dtype
        self.data = type("Memory", (), {"ptr": a.ctypes.data})()

    def copy(self):
        return _DeviceBuffer(self.a.copy())

    def fill(self, value):
        self.a.fill(value)


def _column_major(ptr: int, rows: int, cols: int, ld: int, dtype) -> np.ndarray:
    """The rows × cols matrix cuBLAS reads at ptr: element (i, j) at ptr + (i + j·ld) elements."""
    import ctypes

    itemsize = np.dtype(dtype).itemsize
    flat = np.ctypeslib.as_array((ctypes.c_uint8 * (((cols - 1) * ld + rows) * itemsize)).from_address(ptr))
    flat = flat.view(dtype)
    return np.stack([flat[j * ld : j * ld + rows] for j in range(cols)], axis=1)


def test_the_float16_gemm_call_passes_cublas_the_right_operands(monkeypatch):
    """gpu.backend's GemmEx call, run against a cuBLAS stand-in that reads memory column-major as cuBLAS does:
    operand order, transposes and leading dimensions give a @ b for C- and F-ordered operands, one-row and
    one-column shapes and a strided view (copied first)."""
    import ctypes
    import sys
    import types

    import gpu.backend as backend

    OP_N, OP_T, R_16F, R_32F = 0, 1, 2, 0

    def gemm_ex(handle, transa, transb, m, n, k, alpha, A, a_type, lda, B, b_type, ldb, beta, C, c_type, ldc,
                compute, algo):
        assert (a_type, b_type, c_type) == (R_16F, R_16F, R_32F)
        op = lambda ptr, trans, rows, cols, ld: (  # noqa: E731  op(X) is rows × cols
            _column_major(ptr, rows, cols, ld, np.float16) if trans == OP_N
            else _column_major(ptr, cols, rows, ld, np.float16).T)
        a32 = op(A, transa, m, k, lda).astype(np.float32)
        b32 = op(B, transb, k, n, ldb).astype(np.float32)
        scalar = lambda ptr: ctypes.c_float.from_address(ptr).value  # noqa: E731  host pointer mode
        assert scalar(beta) == 0.0  # C is written, not accumulated into
        product = scalar(alpha) * (a32 @ b32)
        base = np.ctypeslib.as_array((ctypes.c_float * ((n - 1) * ldc + m)).from_address(C))
        for j in range(n):
            base[j * ldc : j * ldc + m] = product[:, j]

    cublas = types.SimpleNamespace(gemmEx=gemm_ex, CUBLAS_OP_N=OP_N, CUBLAS_OP_T=OP_T, CUBLAS_COMPUTE_32F=68,
                                   CUBLAS_GEMM_DEFAULT_TENSOR_OP=99)
    modules = {"cupy_backends": types.ModuleType("cupy_backends"),
               "cupy_backends.cuda": types.ModuleType("cupy_backends.cuda"),
               "cupy_backends.cuda.libs": types.SimpleNamespace(cublas=cublas),
               "cupy_backends.cuda.libs.cublas": cublas,
               "cupy": types.ModuleType("cupy"),
               "cupy.cuda": types.SimpleNamespace(device=types.SimpleNamespace(get_cublas_handle=lambda: 0),
                                                  runtime=types.SimpleNamespace(CUDA_R_16F=R_16F, CUDA_R_32F=R_32F))}
    for name, module in modules.items():
        monkeypatch.setitem(sys.modules, name, module)
    fake_cupy = types.SimpleNamespace(empty=lambda shape, dtype: _DeviceBuffer(np.empty(shape, dtype=dtype)))

    rng = np.random.default_rng(4)
    for m, k, n in [(37, 50, 29), (1, 50, 29), (37, 50, 1), (8, 3, 5)]:
        a = rng.standard_normal((m, k)).astype(np.float16)
        w = rng.standard_normal((n, k)).astype(np.float16)  # a weight (out, in): the port multiplies by w.T
        for b in (w.T, np.ascontiguousarray(w.T)):
            got = backend._gemm_ex_f16_f32(fake_cupy, _DeviceBuffer(a), _DeviceBuffer(b)).a
            assert got.dtype == np.float32 and got.shape == (m, n)
            np.testing.assert_allclose(got, a.astype(np.float32) @ b.astype(np.float32), rtol=1e-5, atol=1e-5)
    strided = rng.standard_normal((20, 60)).astype(np.float16)[::2, ::3]  # neither C- nor F-ordered
    b = rng.standard_normal((20, 7)).astype(np.float16)
    got = backend._gemm_ex_f16_f32(fake_cupy, _DeviceBuffer(strided), _DeviceBuffer(b)).a
    np.testing.assert_allclose(got, strided.astype(np.float32) @ b.astype(np.float32), rtol=1e-5, atol=1e-5)
