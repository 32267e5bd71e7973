"""Verdicts and findings: the words of the tolerance policy (reference/oracle/conformance.py)."""

from __future__ import annotations

from dataclasses import dataclass

PASS, NEAR, FAIL = "PASS", "PASS-within-tolerance", "FAIL"
NOTE = "NOTE"  # a finding that changes no verdict
VERDICTS = (PASS, NEAR, FAIL)


@dataclass(frozen=True)
class Finding:
    verdict: str  # NEAR, FAIL or NOTE
    field: str  # e.g. "select_layer", "kept_positions", "layers[12].kv_tokens", "logits"
    message: str
    layer: int | None = None
    position: int | None = None  # a prompt position
    margin: float | None = None
    step: int | None = None  # a generated token's step (generated_ids)


def apart(a, b, only_a: str, only_b: str) -> str:
    """Two position sets as their differences, e.g. "only the oracle's [165], only the candidate's [233]"."""
    return f"{only_a} {sorted(set(a) - set(b))[:8]}, {only_b} {sorted(set(b) - set(a))[:8]}"
