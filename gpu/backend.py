"""Choosing the array module once: CuPy when asked (or available), NumPy otherwise.

As in scikit-learn's array-API support: resolve the namespace `xp` once, pass
it down, and convert to NumPy at one boundary only (`to_host`).
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
