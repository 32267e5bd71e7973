"""Every xp.* the port calls exists in CuPy's namespace and takes the keywords the port passes.

CuPy imports without a GPU (only device use fails), so this runs wherever cupy is importable and is skipped
otherwise (the project's test extra leaves CuPy out: its wheel is ~200 MB). The calls are read from the source:
gpu/*.py and the reference.asl.scoring functions the port calls with its xp.
"""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SOURCES = sorted((ROOT / "gpu").glob("*.py")) + [ROOT / "reference" / "asl" / "scoring.py"]
ARRAY_METHODS = ("astype", "reshape", "transpose", "swapaxes", "sum", "max", "min", "all", "any", "copy", "fill",
                 "get", "view", "T", "nbytes", "size", "flags")
UFUNC_KEYWORDS = {"out", "dtype", "casting", "where"}  # CuPy's ufuncs are not introspectable; these they take


def xp_calls(source: str) -> list[tuple[str, list[str], int]]:
    """(dotted name after xp / self.xp, keywords, line) of every call of the array module in `source`."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.Call):
            continue
        parts, f = [], node.func
        while isinstance(f, ast.Attribute):
            parts.append(f.attr)
            f = f.value
        if isinstance(f, ast.Name) and f.id == "xp" and parts:
            pass
        elif isinstance(f, ast.Name) and f.id == "self" and parts and parts[-1] == "xp":
            parts = parts[:-1]
        else:
            continue
        if parts:
            found.append((".".join(reversed(parts)), [k.arg for k in node.keywords if k.arg], node.lineno))
    return found


def test_the_scan_finds_the_ports_calls():
    """The scan itself (runs without CuPy): it must see calls both ways the port writes them."""
    calls = {name for path in SOURCES for name, _, _ in xp_calls(path.read_text())}
    assert {"matmul", "copyto", "exp", "asarray", "empty", "concatenate", "random.default_rng"} <= calls
    assert xp_calls("self.xp.maximum(a, b, out=c)\n") == [("maximum", ["out"], 1)]


def test_every_xp_call_of_the_port_exists_in_cupy_with_its_keywords():
    cupy = pytest.importorskip("cupy", reason="CuPy is not importable here (pip install cupy-cuda13x to run this)")
    missing = []
    for path in SOURCES:
        for name, keywords, line in xp_calls(path.read_text()):
            where = f"{path.relative_to(ROOT)}:{line} xp.{name}"
            obj = cupy
            try:
                for part in name.split("."):
                    obj = getattr(obj, part)
            except AttributeError:
                missing.append(f"{where}: not in CuPy")
                continue
            try:
                params = inspect.signature(obj).parameters
                takes_any = any(p.kind is p.VAR_KEYWORD for p in params.values())
                accepted = set() if takes_any else set(params)
            except (TypeError, ValueError):  # a ufunc or a Cython builtin without a signature
                takes_any, accepted = False, UFUNC_KEYWORDS
            missing += [f"{where}: no keyword {k!r}" for k in keywords if not takes_any and k not in accepted]
    for method in ARRAY_METHODS:
        if not hasattr(cupy.ndarray, method):
            missing.append(f"cupy.ndarray.{method}")
    assert "dtype" in inspect.signature(cupy.random.Generator.standard_normal).parameters
    assert not missing, "\n".join(missing)


def test_the_float16_gemm_binding_exists_in_cupy():
    """gpu.backend's float16-in, float32-out GEMM calls cuBLAS's GemmEx through CuPy's binding. Importing the
    binding loads libcublas, so this is skipped where CuPy is importable but cuBLAS is not."""
    pytest.importorskip("cupy", reason="CuPy is not importable here")
    try:
        from cupy_backends.cuda.libs import cublas
    except ImportError as e:
        pytest.skip(f"cuBLAS is not loadable here: {e}")
    from cupy.cuda import device, runtime

    assert callable(cublas.gemmEx) and callable(device.get_cublas_handle)
    for name in ("CUBLAS_OP_N", "CUBLAS_OP_T", "CUBLAS_COMPUTE_32F", "CUBLAS_GEMM_DEFAULT_TENSOR_OP"):
        assert isinstance(getattr(cublas, name), int), name
    assert isinstance(runtime.CUDA_R_16F, int) and isinstance(runtime.CUDA_R_32F, int)
