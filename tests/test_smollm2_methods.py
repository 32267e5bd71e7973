"""ASL and FastKV on a real model (SmolLM2-135M-Instruct), at ~1K tokens where it retrieves reliably.

Parameters as the issue asks: tau=0.3, l_min=10, l_obs=8, window=32, kernel=7, select_k=256.
"""

import json

import pytest

from reference.asl.generate import generate
from reference.asl.params import SMOLLM2_PARAMS
from reference.cli import main
from reference.eval import tasks
from reference.eval.tasks import DEMO_DEPTH, needle_token_positions
from reference.io.checkpoint import eos_token_ids, load_weights
from reference.io.tokenizer import load_tokenizer
from reference.oracle.trace import make_trace

pytestmark = pytest.mark.smollm2
PARAMS = SMOLLM2_PARAMS


@pytest.fixture(scope="module")
def smollm2(smollm2_dir):
    weights = load_weights(smollm2_dir)
    return weights, load_tokenizer(smollm2_dir), eos_token_ids(smollm2_dir, weights.config)


def run(smollm2, prompt, method):
    weights, tok, eos = smollm2
    gen = generate(weights, prompt.ids, 12, eos, method=method, params=PARAMS)
    trace, _ = make_trace(gen, model_name="smollm2", model_sha256="", config=weights.config, dtype="float32")
    return tok.decode(gen.generated_ids), trace


def report(trace) -> str:
    fired = trace["select_layer"]
    margins = {e["layer"]: e["margin"] for e in trace["layers"] if e["margin"] is not None}
    return (f"selection layer {fired}, margin there {margins.get(fired)}, KV {100 * trace['totals']['kv_fraction']:.1f}%"
            if fired is not None else f"never fired; smallest margin {min(margins.values()):.3f}")


@pytest.fixture(scope="module")
def passkey(smollm2):
    return tasks.demo_passkey(smollm2[1], 1000)


@pytest.mark.parametrize("method", ["asl", "fastkv"])
def test_passkey_is_answered_and_the_needle_is_kept(smollm2, passkey, method):
    answer, trace = run(smollm2, passkey, method)
    assert passkey.answers[0] in answer, f"{method}: {answer!r} ({report(trace)})"
    assert 900 <= len(passkey.ids) <= 1100
    if method == "fastkv":
        assert trace["select_layer"] == PARAMS.select_layer
    if trace["select_layer"] is not None:  # the needle's digits survive the selection
        layer = trace["layers"][trace["select_layer"]]
        assert layer["margin"] < 0 if method == "asl" else True
        kept = set(trace["kept_positions"])
        needle = needle_token_positions(smollm2[1], passkey)
        assert needle and any(p in kept for p in needle), f"needle tokens {needle} not kept ({report(trace)})"
        assert len(kept) == PARAMS.select_k and trace["totals"]["kv_fraction"] < 1.0
    print(f"{method}: {report(trace)}")


def test_eight_similar_needles_are_reported_the_same_way_and_select_later(smollm2, passkey):
    needles = tasks.niah_multikey(smollm2[1], 1000, 0, depth=DEMO_DEPTH, n_keys=8)
    assert abs(len(needles.ids) - len(passkey.ids)) < 60
    _, easy = run(smollm2, passkey, "asl")
    answer, hard = run(smollm2, needles, "asl")
    print(f"passkey: {report(easy)}; eight needles: {report(hard)}; answer {answer!r} (expected {needles.answers[0]})")
    assert all(e["ratio"] is not None for e in hard["layers"][PARAMS.l_min : (hard["select_layer"] or 29) + 1])
    if hard["select_layer"] is None:
        assert any("never fired" in n for n in hard["notes"]) and hard["totals"]["kv_fraction"] == 1.0
    # the paper's central observation, on these two prompts: the harder one selects later (or never)
    assert easy["select_layer"] is not None
    assert hard["select_layer"] is None or hard["select_layer"] > easy["select_layer"]


def test_cli_summary_shows_the_kv_saving_of_each(smollm2_dir, smollm2, passkey, tmp_path, capsys):
    ids = tmp_path / "ids.json"
    ids.write_text(json.dumps(passkey.ids))
    flags = ["--tau", "0.3", "--l-min", "10", "--l-obs", "8", "--window", "32", "--kernel", "7", "--select-k", "256"]
    for method in ("asl", "fastkv"):
        assert main(["run", "--model", "smollm2", "--prompt-ids", str(ids), "--method", method, *flags,
                     "--max-new-tokens", "10"]) == 0
        out = capsys.readouterr().out
        assert passkey.answers[0] in out
        summary = next(line for line in out.splitlines() if line.startswith(f"[{method}:"))
        assert "kept 256 of" in summary and "% of full" in summary


def test_pyramidinfer_on_smollm2_and_the_port_makes_the_same_decisions(smollm2_dir, smollm2, passkey):
    """PyramidInfer with the authors' config on the ~1K passkey prompt: each layer holds what the one before kept
    (all tokens at layers 0-1, then fewer), the decode stage compresses, and the NumPy port (float32 weights)
    makes every decision the reference makes: kept sets, compressions, greedy ids. (Whether it answers is a
    result, docs/results.md, not a property: here its compressed caches lose digits of the key.)"""
    import numpy as np

    from gpu.engine import PortEngine
    from gpu.loader import load_device_weights
    from reference.asl.params import Params

    weights, tok, eos = smollm2
    reference = generate(weights, passkey.ids, 12, eos, method="pyramidinfer", params=Params())
    print("pyramidinfer:", tok.decode(reference.generated_ids))
    layers = reference.prefill.layers
    assert layers[0].prefill_tokens == layers[1].prefill_tokens == len(passkey.ids)  # r(0) = 1: layer 0 keeps all
    assert layers[-1].prefill_tokens < layers[2].prefill_tokens < len(passkey.ids)
    assert reference.compressions and {c.layer for c in reference.compressions if c.step == 1} == set(range(30))
    port = PortEngine(load_device_weights(smollm2_dir, np, "float32", progress=False)[0], np)
    got = generate(port, passkey.ids, 12, eos, method="pyramidinfer", params=Params())
    for a, b in zip(layers, got.prefill.layers):
        assert a.prefill_tokens == b.prefill_tokens, a.layer
        assert (a.kept is None) == (b.kept is None) and (a.kept is None or np.array_equal(a.kept, b.kept)), a.layer
    assert [(c.step, c.layer, c.scored.tolist(), c.kept.tolist()) for c in reference.compressions] == \
        [(c.step, c.layer, c.scored.tolist(), c.kept.tolist()) for c in got.compressions]
    assert got.generated_ids == reference.generated_ids
