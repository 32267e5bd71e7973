"""Hostile command lines, traces, bundles and numbers: one line on stderr and exit 2, never a traceback, a hang,
a crash or a confident wrong answer; nothing written where it should not be."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from reference.io.fetch import resolve_model

ASL = [sys.executable, "-m", "reference"]


def asl(*args, timeout=120, **kw):
    return subprocess.run(ASL + [str(a) for a in args], capture_output=True, text=True, timeout=timeout, **kw)


def one_line_error(run, fragment: str):
    lines = [line for line in run.stderr.splitlines() if line.strip()]
    assert run.returncode == 2, (run.returncode, run.stdout[-500:], run.stderr[-2000:])
    assert "Traceback" not in run.stderr and lines and lines[-1].startswith("asl: error:"), run.stderr[-2000:]
    assert fragment in run.stderr, run.stderr


@pytest.fixture(scope="module")
def ids_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("ids") / "ids.json"
    path.write_text(json.dumps(list(range(3, 43))))
    return path


@pytest.mark.parametrize("flag, value, fragment", [
    ("--tau", "inf", "tau must be a finite number"),
    ("--tau", "nan", "tau must be a finite number"),
    ("--tau", "-1", "tau must be a finite number > 0"),
    ("--window", "0", "window must be ≥ 1"),
    ("--kernel", "4", "kernel must be odd"),
    ("--select-k", "2", "select-k must be > window"),
    ("--l-obs", "1", "l-obs must be in"),
    ("--max-new-tokens", "-1", "max_new_tokens must be >= 0"),
])
def test_parameters_out_of_range(ids_file, flag, value, fragment):
    one_line_error(asl("run", "--model", "tiny-llama", "--prompt-ids", ids_file, "--method", "asl", flag, value),
                   fragment)


@pytest.mark.parametrize("content, fragment", [
    (None, "is a directory"),
    ("[[1, 2], [3]]", "must hold a JSON list of integer token ids"),
    ("[" * 100000 + "]" * 100000, "not valid JSON"),
    (b"\xff\xfe[1, 2]", "is not UTF-8 text"),
    ('{"ids": [1, 2]}', "must hold a JSON list"),
    ("[1, 2, 99999]", "must lie in [0, 259)"),
    ("[]", "the prompt is empty"),
    ("[true, 2]", "must hold a JSON list of integer token ids"),
])
def test_bad_prompt_id_files(tmp_path, content, fragment):
    path = tmp_path / "ids"
    if content is None:
        path.mkdir()
    elif isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    one_line_error(asl("run", "--model", "tiny-llama", "--prompt-ids", path, "--method", "full"), fragment)


def test_a_prompt_that_is_not_utf8():
    run = subprocess.run([*ASL, "run", "--model", "tiny-llama", "--method", "full", "--prompt", "abc \udcff def"],
                         capture_output=True, text=True, timeout=120, errors="surrogateescape")
    one_line_error(run, "not valid UTF-8")


@pytest.mark.parametrize("tokens", [0, -5, 10, 10**9])
def test_demo_lengths_are_checked_before_any_work(tokens):
    one_line_error(asl("demo", "--model", "tiny-llama", "--tokens", tokens, timeout=60), "--tokens must be in")


def test_golden_out_naming_a_file_is_refused_and_the_file_kept(tmp_path):
    target = tmp_path / "a-file"
    target.write_text("keep me")
    one_line_error(asl("golden", "--model", "tiny-llama", "--out", target), "is a file")
    assert target.read_text() == "keep me"


@pytest.mark.parametrize("case, fragment", [
    ({"name": "a", "method": "asl", "n_tokens": 10, "params": {"bogus": 1}}, "unknown parameter(s) bogus"),
    ({"name": "a", "method": "asl", "n_tokens": 10, "params": {"window": -3}}, "window must be ≥ 1"),
    ({"name": "a", "method": "asl", "n_tokens": 10, "params": {"tau": "high"}}, "tau must be"),
    ({"name": "a", "method": "asl", "n_tokens": -5}, "n_tokens must be in"),
    ({"name": "a", "method": "asl", "n_tokens": 10**9}, "n_tokens must be in"),
    ({"name": "a", "method": "full", "n_tokens": 10, "seed": -1}, "seed and max_new_tokens must be ≥ 0"),
    ({"name": "a", "method": "nope", "n_tokens": 10}, "method must be one of"),
])
def test_cases_files_with_bad_parameters_write_nothing(tmp_path, case, fragment):
    cases = tmp_path / "cases.json"
    cases.write_text(json.dumps([{"name": "ok", "method": "full", "n_tokens": 10}, case]))
    out = tmp_path / "out"
    one_line_error(asl("golden", "--model", "tiny-llama", "--cases", cases, "--out", out), fragment)
    assert not out.exists()  # checked before any case ran


@pytest.fixture(scope="module")
def saved_trace(tmp_path_factory, ids_file) -> Path:
    d = tmp_path_factory.mktemp("trace")
    run = asl("run", "--model", "tiny-llama", "--prompt-ids", ids_file, "--method", "full", "--max-new-tokens", 1,
              "--trace", d / "t.json", "--trace-arrays")
    assert run.returncode == 0, run.stderr
    return d / "t.json"


def test_an_npz_member_that_is_not_an_array(saved_trace, tmp_path):
    shutil.copy(saved_trace, tmp_path / "t.json")
    shutil.copy(saved_trace.with_suffix(".npz"), tmp_path / "t.npz")
    with zipfile.ZipFile(tmp_path / "t.npz", "a") as z:
        z.writestr("evil.txt", "not an array")
    one_line_error(asl("trace", tmp_path / "t.json"), "is not a .npy array")


def test_a_candidate_with_another_vocabulary_is_an_error_not_a_broadcast(tmp_path):
    from reference.oracle.bundle import check_trace, default_cases, write_bundle
    from reference.oracle.trace import load_trace

    bundle = write_bundle("tiny-llama", [c for c in default_cases("tiny-llama") if c.name == "tiny-llama-full"],
                          tmp_path / "b", progress=False)
    trace, arrays = load_trace(bundle / "tiny-llama-full.trace.json")
    trace = json.loads(json.dumps(trace))
    trace["model"]["vocab_size"] = 300
    arrays = {name: (np.zeros(300) if name == "logits" or name.startswith("step_logits/") else a)
              for name, a in arrays.items()}
    result = check_trace(bundle / "tiny-llama-full.trace.json", (trace, arrays))
    assert result.verdict == "ERROR" and "vocab_size" in result.error


def test_overflowing_embeddings_stop_at_the_first_layer_they_break(tmp_path, ids_file):
    """Embeddings of ~3e38 are finite but overflow float32 in the first RMSNorm: the run must say where, not answer."""
    model = tmp_path / "huge"
    shutil.copytree(resolve_model("tiny-llama"), model)
    index = json.loads((model / "model.safetensors.index.json").read_text())
    shard = model / index["weight_map"]["model.embed_tokens.weight"]
    tensors = load_file(shard)  # float32 shards
    e = tensors["model.embed_tokens.weight"]
    tensors["model.embed_tokens.weight"] = (e / np.abs(e).max() * np.float32(3e38)).astype(np.float32)
    assert np.isfinite(tensors["model.embed_tokens.weight"]).all()
    save_file(tensors, shard)
    run = asl("run", "--model", model, "--prompt-ids", ids_file, "--method", "asl", "--window", 4, "--select-k", 8,
              "--l-min", 6, "--l-obs", 4)
    one_line_error(run, "non-finite activations")
    assert "layer 0" in run.stderr or "embeddings" in run.stderr
