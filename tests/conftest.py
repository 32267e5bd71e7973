"""Shared fixtures: the tiny committed checkpoints and SmolLM2 (fetched by `make test`)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

CHECKPOINTS = Path(__file__).resolve().parent.parent / "reference" / "io" / "checkpoints"
TINY = ["tiny-llama", "tiny-qwen2"]
GOLDEN_DIR = Path(__file__).resolve().parent / "goldens"  # made by `make goldens`


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
