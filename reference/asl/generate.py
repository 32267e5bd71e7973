"""Greedy generation: prefill the prompt, then decode one token at a time from the KV cache.

Generated token t sits at position N + t. Greedy picks the arg-max token, the
lowest id on exact ties, and stops at an end-of-sequence token or the limit.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from reference.asl import pyramid
from reference.asl.engine import Engine, as_engine
from reference.asl.methods import PrefillResult, run_prefill
from reference.asl.params import Params
from reference.errors import OracleError
from reference.model.config import Config
from reference.model.weights import Weights


@dataclass
class Generation:
    prompt_ids: list[int]
    generated_ids: list[int] = field(default_factory=list)
    generated_gaps: list[float] = field(default_factory=list)  # per step: best minus second-best logit
    step_logits: list = field(default_factory=list)  # per generated id: the logits (V,) it was chosen from
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    stopped_at_eos: bool = False
    prefill: PrefillResult | None = None  # the method's decisions and per-layer record
    compressions: list = field(default_factory=list)  # PyramidInfer's decode-stage compressions (pyramid.Compression)


def check_prompt(cfg: Config, prompt_ids, max_new_tokens: int = 0) -> np.ndarray:
    """Token ids as int64, refused when empty, out of the vocabulary, or too long for the model."""
    ids = np.asarray(prompt_ids)
    if ids.ndim != 1 or len(ids) == 0:
        raise OracleError("the prompt is empty: give at least one token")
    if not np.issubdtype(ids.dtype, np.integer):
        raise OracleError(f"prompt token ids must be integers, got dtype {ids.dtype}")
    if ids.min() < 0 or ids.max() >= cfg.vocab_size:
        raise OracleError(
            f"prompt token ids must lie in [0, {cfg.vocab_size}) (the vocabulary), "
            f"got values from {ids.min()} to {ids.max()}"
        )
    if max_new_tokens < 0:
        raise OracleError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    total = len(ids) + max_new_tokens
    if total > cfg.max_position_embeddings:
        raise OracleError(
            f"prompt of {len(ids)} tokens + {max_new_tokens} new tokens exceeds the model's "
            f"max_position_embeddings ({cfg.max_position_embeddings}); shorten the prompt"
        )
    if cfg.sliding_window is not None and total > cfg.sliding_window:
        raise OracleError(
            f"the model uses sliding-window attention of {cfg.sliding_window} tokens, smaller than "
            f"the {total} tokens of this run; the reference implements full attention only, "
            "so shorten the prompt to at most the window"
        )
    return ids.astype(np.int64)


def greedy_token(logits: np.ndarray) -> int:
    """Arg-max; np.argmax returns the first maximum, i.e. the lowest id on exact ties."""
    return int(np.argmax(logits))


def top2_gap(logits: np.ndarray) -> float:
    """Best minus second-best logit: the margin of a greedy decision (0 on a tie)."""
    if len(logits) < 2:
        return float("inf")
    top2 = np.partition(logits, -2)[-2:]
    return float(top2[1] - top2[0])


def generate(
    engine: Engine | Weights,
    prompt_ids,
    max_new_tokens: int,
    eos_ids=(),
    on_token=None,
    method: str = "full",
    params: Params | None = None,
) -> Generation:
    """Greedy continuation of the prompt after a prefill with `method`, on `engine` (an Engine, or Weights
    for the reference's own).

    Decoding continues at the position the method leaves (N for one-shot
    methods, |kept| after a second pass); `on_token(id)` sees each token.
    `result.prefill.cache` is still the cache after prefill: each decode step
    returns a new cache (the Engine protocol, reference/asl/engine.py).
    """
    engine = as_engine(engine)
    ids = check_prompt(engine.config, prompt_ids, max_new_tokens)
    result = Generation(prompt_ids=ids.tolist())
    start = time.perf_counter()
    result.prefill = run_prefill(engine, ids, method, params)
    result.prefill_seconds = time.perf_counter() - start
    if max_new_tokens == 0:
        return result
    logits, cache, position = result.prefill.logits, result.prefill.cache, result.prefill.next_position
    state = result.prefill.decode_state  # PyramidInfer's decode stage, or None
    start = time.perf_counter()
    while True:
        if not np.isfinite(logits).all():
            step = len(result.generated_ids)
            raise OracleError(f"non-finite next-token logits (inf or NaN) at generation step {step} (position "
                              f"{position}); the activations overflowed in decoding: check the checkpoint, or try "
                              "--dtype float64")
        token = greedy_token(logits)
        result.step_logits.append(logits)  # step 0's are the prefill's
        result.generated_ids.append(token)
        result.generated_gaps.append(top2_gap(logits))
        if on_token is not None:
            on_token(token)
        if token in eos_ids:
            result.stopped_at_eos = True
            break
        if len(result.generated_ids) == max_new_tokens:
            break
        if state is None:
            logits, cache = engine.decode(cache, token, position)
        else:
            logits, cache, state = pyramid_decode(engine, cache, token, position, state, result)
        position += 1
    result.decode_seconds = time.perf_counter() - start
    return result


def pyramid_decode(engine, cache, token: int, position: int, state, result: Generation):
    """One decode step of PyramidInfer: decode, then compress the layers whose count says so (pyramid.py)."""
    layer0_before = len(engine.positions(cache[0])[0])
    logits, cache, rows = engine.decode(cache, token, position, attention=True)
    step = len(result.generated_ids)  # the step-th generated token was fed back
    positions = [engine.positions(c)[0] for c in cache]
    L = engine.config.num_hidden_layers
    state, keeps, events = pyramid.decode_compress(state, rows, positions, step, layer0_before, result.prefill.params, L)
    H_kv = engine.config.num_key_value_heads
    cache = tuple(c if keep is None else engine.compress(c, [keep] * H_kv) for c, keep in zip(cache, keeps))
    result.compressions += events
    return logits, cache, state
