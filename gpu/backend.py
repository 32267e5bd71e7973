"""Choosing the array module once: CuPy when asked (or available), NumPy otherwise.

As in scikit-learn's array-API support: resolve the namespace `xp` once, pass
it down, and convert to NumPy at one boundary only (`to_host`). `on_device`
(CuPy, or the tests' CPU stand-in for it, tests/standin.py) picks the GPU's
layout; `is_cupy` only what needs CuPy itself (cuBLAS, the memory pool).
"""

from __future__ import annotations

import numpy as np

from reference.errors import OracleError

BACKENDS = ("auto", "numpy", "cupy")


def _cupy_or_reason():
    """(cupy module, None) or (None, why it cannot be used)."""
    try:
        import cupy
    except ImportError as e:
        return None, f"CuPy is not installed ({e}); install the gpu extra: pip install 'asl-oracle[gpu]'"
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as e:  # CUDA driver or runtime missing
        if "InsufficientDriver" in str(e):
            return None, (f"the CUDA driver is older than the CUDA of CuPy {cupy.__version__} ({e}); install the CuPy "
                          f"of the driver's CUDA: pip install 'asl-oracle[gpu]' (CUDA 12) or 'asl-oracle[gpu-cuda13]'")
        return None, f"CuPy is installed but no CUDA device is usable ({e})"
    if count < 1:
        return None, "CuPy is installed but no CUDA device is present"
    return cupy, None


def cupy_unavailable_reason() -> str | None:
    """None when CuPy with a device can be used, else the reason (for skip messages)."""
    return _cupy_or_reason()[1]


def get_xp(name: str = "auto"):
    """The array module for --backend NAME: numpy, cupy, or auto (cupy when usable)."""
    if name not in BACKENDS:
        raise OracleError(f"--backend must be one of {', '.join(BACKENDS)}, got {name!r}")
    if name == "numpy":
        return np
    cupy, reason = _cupy_or_reason()
    if cupy is not None:
        return cupy
    if name == "cupy":
        raise OracleError(f"--backend cupy: {reason}; or use --backend numpy")
    return np


def to_host(a) -> np.ndarray:
    """Any array (NumPy or CuPy) as a NumPy array: the one device-to-host boundary."""
    if isinstance(a, np.ndarray):
        return a
    get = getattr(a, "get", None)
    return get() if get is not None else np.asarray(a)


def is_cupy(xp) -> bool:
    return xp.__name__ == "cupy"


def on_device(xp) -> bool:
    """Arrays off the host (CuPy, or the tests' stand-in for it): the GPU's layout and its host-sync rules."""
    return xp is not np


def row_sums_of_squares(xp, x):
    """Σ_d x[..., d]² for every row: an einsum on NumPy (no x² temporary), an elementwise product and a sum on a
    device (CuPy would turn that einsum into one 1×1 batched GEMM per row)."""
    if not on_device(xp):
        axes = "abcdefgh"[: x.ndim]
        return np.einsum(f"{axes},{axes}->{axes[:-1]}", x, x)
    return (x * x).sum(axis=-1)


ONE, ZERO = np.ones(1, dtype=np.float32), np.zeros(1, dtype=np.float32)  # GemmEx's alpha and beta (host pointers)


def matmul_f32(xp, a, b):
    """a (m, k) @ b (k, n) -> (m, n) float32: products accumulated and written in float32 whatever the operands'
    dtype (a float16 output would turn values above 65504 into inf). Float16 operands on CuPy: cuBLAS GemmEx,
    float16 in, float32 out, on tensor cores; elsewhere the float32 product of the widened operands, the same
    arithmetic (a product of two float16 values is exact in float32)."""
    if a.dtype == np.float32 and b.dtype == np.float32:
        return a @ b
    if is_cupy(xp) and a.dtype == b.dtype == np.float16 and _gemm_ex_works(xp):
        return _gemm_ex_f16_f32(xp, a, b)
    return xp.matmul(a, b, dtype=np.float32)


_GEMM_EX: dict[str, bool] = {}  # has the direct cuBLAS call been checked on this process's device, and did it agree


def _gemm_ex_works(cupy) -> bool:
    """The direct cuBLAS call, checked once against the widened product on odd shapes and both operand layouts
    (it has not run on a GPU before its first device check): on any error or disagreement the port warns once and
    keeps the widened float32 product, slower but the same arithmetic."""
    if "ok" not in _GEMM_EX:
        rng = np.random.default_rng(0)
        a = cupy.asarray(rng.standard_normal((37, 50)).astype(np.float16))
        b = cupy.asarray(rng.standard_normal((29, 50)).astype(np.float16)).T  # (50, 29), F-ordered like W^T
        try:
            got = [_gemm_ex_f16_f32(cupy, a, b), _gemm_ex_f16_f32(cupy, a, cupy.ascontiguousarray(b))]
            want = cupy.matmul(a.astype(np.float32), b.astype(np.float32))
            _GEMM_EX["ok"] = all(bool(cupy.allclose(g, want, rtol=1e-3, atol=1e-3)) for g in got)
            reason = "it disagreed with the widened float32 product"
        except Exception as e:  # a cuBLAS or binding error: the fallback is always correct
            _GEMM_EX["ok"], reason = False, f"{type(e).__name__}: {e}"
        if not _GEMM_EX["ok"]:
            import warnings

            warnings.warn(f"cuBLAS GemmEx (float16 in, float32 out) not used: {reason}; float16 layers run as "
                          f"widened float32 products (correct, without tensor cores)", RuntimeWarning, stacklevel=3)
    return _GEMM_EX["ok"]


def gemm_ex_status() -> bool | None:
    """True / False: the direct cuBLAS call passed / failed its check in this process; None: not checked yet."""
    return _GEMM_EX.get("ok")


def _cublas_operand(x):
    """A row-major matrix x (r, c) as cuBLAS's column-major operand x^T: (x, op, leading dimension)."""
    from cupy_backends.cuda.libs import cublas

    if x.flags.c_contiguous:  # its memory, read column-major, is x^T (c × r)
        return x, cublas.CUBLAS_OP_N, max(x.shape[1], 1)
    if x.flags.f_contiguous:  # its memory, read column-major, is x (r × c): transpose it
        return x, cublas.CUBLAS_OP_T, max(x.shape[0], 1)
    return _cublas_operand(x.copy())


def _gemm_ex_f16_f32(cupy, a, b):
    """C = a @ b in row-major terms is C^T = b^T a^T in cuBLAS's column-major ones: b goes first."""
    from cupy.cuda import device, runtime
    from cupy_backends.cuda.libs import cublas

    (m, k), n = a.shape, b.shape[1]
    out = cupy.empty((m, n), dtype=np.float32)
    if min(m, n, k) == 0:
        out.fill(0)
        return out
    b, op_b, ld_b = _cublas_operand(b)
    a, op_a, ld_a = _cublas_operand(a)
    cublas.gemmEx(device.get_cublas_handle(), op_b, op_a, n, m, k, ONE.ctypes.data, b.data.ptr, runtime.CUDA_R_16F,
                  ld_b, a.data.ptr, runtime.CUDA_R_16F, ld_a, ZERO.ctypes.data, out.data.ptr, runtime.CUDA_R_32F, n,
                  cublas.CUBLAS_COMPUTE_32F, cublas.CUBLAS_GEMM_DEFAULT_TENSOR_OP)
    return out
