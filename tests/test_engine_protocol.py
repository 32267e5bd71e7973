"""Both engines (the port also on the CPU stand-in for CuPy) keep the Engine protocol (reference/asl/engine.py) and
behave the same for a caller: after generation, `prefill.cache` is still the cache the prefill left, because each
decode step returns a new cache."""

from __future__ import annotations

import numpy as np
import pytest

from gpu.backend import get_xp
from gpu.engine import PortEngine
from gpu.loader import load_device_weights
from reference.asl.engine import Engine, ReferenceEngine
from reference.asl.generate import generate
from reference.asl.params import Params
from reference.io.checkpoint import load_weights
from reference.io.fetch import resolve_model
from tests.standin import standin

P = Params(window=4, kernel=3, select_k=24, tau=0.5, l_min=6, l_obs=4, kv_budget=40)
PROTOCOL = [name for name in vars(Engine) if not name.startswith("_") and callable(getattr(Engine, name))]


def engines():
    model_dir = resolve_model("tiny-llama")
    xp, device = get_xp("numpy"), standin()
    return {"reference": ReferenceEngine(load_weights(model_dir, "float32")),
            "port": PortEngine(load_device_weights(model_dir, xp, "float32", progress=False)[0], xp),
            "port on the CPU stand-in for CuPy": PortEngine(load_device_weights(model_dir, device, "float16",
                                                                                progress=False)[0], device)}


@pytest.mark.parametrize("name", ["reference", "port", "port on the CPU stand-in for CuPy"])
def test_each_engine_has_every_method_of_the_protocol(name):
    engine = engines()[name]
    assert PROTOCOL and all(callable(getattr(engine, m, None)) for m in PROTOCOL)


@pytest.mark.parametrize("method", ["full", "asl", "asl-2pass"])
def test_the_prefill_cache_is_unchanged_by_decoding_on_both_engines(method):
    ids = np.random.default_rng(5).integers(3, 259, 90)
    for name, engine in engines().items():
        gen = generate(engine, ids, 6, (), method=method, params=P)
        assert len(gen.generated_ids) == 6
        held = [[len(pos) for pos in engine.positions(layer)] for layer in gen.prefill.cache]
        assert held == [rec.kv_tokens for rec in gen.prefill.layers], name
        last = [pos[-1] for layer in gen.prefill.cache for pos in engine.positions(layer)]
        assert max(last) < gen.prefill.next_position, name  # no generated token in the prefill's cache
