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
from reference.model.rope import longrope_switch_position
from reference.model.weights import Weights

RECOMPUTED = "longrope: the sequence reached"  # the start of the note a recomputed cache leaves in the trace


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
    recomputed_at: int | None = None  # LongRoPE: the step whose token was fed by a prefill of the whole sequence
    notes: list[str] = field(default_factory=list)  # what decoding adds to the prefill's notes (the recomputation)


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

    LongRoPE (Phi-3): when the sequence (prompt + generated tokens, the one
    being fed included) first reaches L0 + 1 tokens, L0 being
    original_max_position_embeddings, the cache of short-factor keys is
    dropped and the method's prefill runs again on the whole sequence (with
    the long factors, as its positions now reach L0); decoding goes on from
    that prefill. This is transformers' Phi3ForCausalLM.generate and the
    authors' code (docs/semantics.md §5).
    """
    engine = as_engine(engine)
    ids = check_prompt(engine.config, prompt_ids, max_new_tokens)
    switch = longrope_switch_position(engine.config)  # L0, or None: no recomputation
    if (switch is not None and method == "pyramidinfer" and len(ids) <= switch
            and len(ids) + max_new_tokens >= switch + 2):
        raise OracleError(
            f"pyramidinfer with a generation that may cross original_max_position_embeddings ({switch}): a prompt "
            f"of {len(ids)} tokens and {max_new_tokens} new tokens; the recomputation there is not defined for "
            f"PyramidInfer's decode stage (docs/semantics.md §5); keep prompt + new tokens <= {switch + 1}, or use "
            f"a prompt longer than {switch} tokens")
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
        sequence = len(ids) + len(result.generated_ids)  # tokens once `token` is fed
        if switch is not None and sequence == switch + 1:  # LongRoPE's first step past L0: recompute
            logits, cache, position = recompute(engine, ids, method, params, result)
            continue
        if state is None:
            logits, cache = engine.decode(cache, token, position)
        else:
            logits, cache, state = pyramid_decode(engine, cache, token, position, state, result)
        position += 1
    result.decode_seconds = time.perf_counter() - start
    return result


def recompute(engine, ids: np.ndarray, method: str, params: Params | None, result: Generation):
    """LongRoPE's step past L0: the method's prefill of the whole sequence (prompt + every generated token) in
    place of decoding the last one; returns its logits, cache and next position."""
    sequence = np.concatenate([ids, np.asarray(result.generated_ids, dtype=np.int64)])
    again = run_prefill(engine, sequence, method, params)
    result.recomputed_at = len(result.generated_ids)
    result.notes.append(
        f"{RECOMPUTED} original_max_position_embeddings + 1 = {len(sequence)} tokens at generation step "
        f"{result.recomputed_at}: the cache was dropped and the {method} prefill run again on the whole sequence "
        "with the long factors (as transformers' Phi3ForCausalLM.generate does); "
        + (f"its selection layer there: {again.select_layer}" if again.select_layer is not None else
           "it selected at no layer"))
    return again.logits, again.cache, again.next_position


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
