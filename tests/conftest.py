"""Shared fixtures: the tiny committed checkpoints and SmolLM2 (fetched by `make test`)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

CHECKPOINTS = Path(__file__).resolve().parent.parent / "reference" / "io" / "checkpoints"
TINY = ["tiny-llama", "tiny-qwen2"]
GOLDEN_DIR = Path(__file__).resolve().parent / "goldens"  # made by `make goldens`


def _port_backends():
    """The port's backends as test parameters: (array module name, weight dtype); CuPy's skipped with the reason."""
    from gpu.backend import cupy_unavailable_reason

    cupy_skip = cupy_unavailable_reason()
    return [
        pytest.param(("numpy", "float32"), id="numpy-float32"),
        pytest.param(("standin", "float16"), id="standin-float16"),
        pytest.param(("cupy", "float16"), id="cupy-float16",
                     marks=pytest.mark.skipif(cupy_skip is not None, reason=f"no GPU backend here: {cupy_skip}")),
    ]


PORT_BACKENDS = _port_backends()


def array_module(name: str):
    """--backend NAME's module, or a fresh CPU stand-in for CuPy."""
    from gpu.backend import get_xp
    from tests.standin import standin

    return standin() if name == "standin" else get_xp(name)


def fuzz_examples(default: int) -> int:
    """Examples per fuzz property: `default` in CI, ASL_FUZZ_EXAMPLES for a longer manual pass (docs/robustness.md)."""
    return int(os.environ.get("ASL_FUZZ_EXAMPLES") or default)


@pytest.fixture(params=TINY)
def tiny_dir(request) -> Path:
    return CHECKPOINTS / request.param


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """SmolLM2's converted directory; in CI its absence is a failure, elsewhere a skip."""
    from reference.errors import OracleError
    from reference.io.fetch import resolve_model

    try:
        return resolve_model("smollm2")
    except OracleError as e:
        if os.environ.get("CI"):
            pytest.fail(f"SmolLM2 is missing in CI (make test fetches it first): {e}")
        pytest.skip(f"SmolLM2 not fetched: {e}")
