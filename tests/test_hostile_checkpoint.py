"""Hostile or malformed checkpoint files: always one clean `asl: error:` line, never a traceback or hang.

Each case copies a tiny checkpoint, breaks one thing (a config.json value, the
generation_config.json, the shard index, a safetensors header, a symlink), runs
`asl run ... --max-new-tokens 1`, and expects exit status 2 with exactly one
line on stderr that names the offending key. Legitimate variants of real
Hugging Face configs must still run. A hypothesis test throws wrong types and
out-of-range numbers at every key `parse_config` reads.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import shutil
import signal
import struct
import subprocess
import sys
import traceback
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from reference.errors import OracleError
from reference.io.safetensors import map_tensor, open_mapped, read_header, save
from reference.model.config import ARCHITECTURES, Config, parse_config
from tests.conftest import CHECKPOINTS, fuzz_examples

REPO = Path(__file__).resolve().parent.parent
BASE = json.loads((CHECKPOINTS / "tiny-llama" / "config.json").read_text())
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 256}


# ---------------------------------------------------------------- helpers


def copy_checkpoint(tmp_path: Path, base: str) -> Path:
    d = tmp_path / "ckpt"
    shutil.copytree(CHECKPOINTS / base, d)
    return d


def edit_json(path: Path, change) -> None:
    """`change`: a dict merged into the JSON object, or a function from the old document to the new one."""
    doc = json.loads(path.read_text())
    path.write_text(json.dumps(change(doc) if callable(change) else doc | change))


def rewrite_header(path: Path, change) -> None:
    """Rewrite a safetensors header: `change(header) -> header dict or raw bytes`; the data is kept."""
    blob = path.read_bytes()
    (n,) = struct.unpack("<Q", blob[:8])
    header, data = json.loads(blob[8 : 8 + n]), blob[8 + n :]
    new = change(header)
    raw = new if isinstance(new, bytes) else json.dumps(new).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)


# Cases also run as a real `python -m reference` process (the rest call reference.cli.main in this process,
# with the same arguments, an alarm as the hang timeout, and any other exception counted as a traceback).
SUBPROCESS = {"nkv-string", "layers-huge", "tie-string", "invalid-utf8", "nested-200k-deep", "traversal",
              "int64-overflowing-shape", "tiny-llama-as-is", "tiny-qwen2-as-is"}
TIMEOUT_S = 60


def run_asl(model_dir: Path, tmp_path: Path, subprocess_: bool = False) -> subprocess.CompletedProcess:
    ids = tmp_path / "ids.json"
    ids.write_text("[1, 2, 3]")
    argv = ["run", "--model", str(model_dir), "--prompt-ids", str(ids), "--method", "full", "--max-new-tokens", "1"]
    if subprocess_:
        env = os.environ | {"PYTHONPATH": str(REPO), "OPENBLAS_NUM_THREADS": "1"}
        return subprocess.run([sys.executable, "-m", "reference", *argv], capture_output=True, text=True,
                              timeout=TIMEOUT_S, cwd=tmp_path, env=env)
    from reference.cli import main

    def hang(*_):
        raise TimeoutError(f"asl {' '.join(argv)} ran longer than {TIMEOUT_S} s")

    out, err = io.StringIO(), io.StringIO()
    previous = signal.signal(signal.SIGALRM, hang)
    signal.alarm(TIMEOUT_S)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main(argv)
    except BaseException:  # what would reach the user as a traceback
        code = 1
        err.write("Traceback (in process)\n" + traceback.format_exc())
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    return subprocess.CompletedProcess(argv, code, out.getvalue(), err.getvalue())


def _in_subprocess(request) -> bool:
    return request.node.callspec.id in SUBPROCESS


def assert_one_line_error(result: subprocess.CompletedProcess, *needles: str) -> str:
    assert "Traceback" not in result.stderr, result.stderr
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("asl: error: "), result.stderr
    for needle in needles:
        assert needle in lines[0], f"{needle!r} not in: {lines[0]}"
    return lines[0]


# ---------------------------------------------------------------- config.json values

CONFIG_CASES = [
    # (id, base checkpoint, change to config.json, text the one error line must contain)
    ("nkv-string", "tiny-llama", {"num_key_value_heads": "abc"}, 'num_key_value_heads must be a positive integer'),
    ("nkv-null", "tiny-llama", {"num_key_value_heads": None}, "num_key_value_heads"),
    ("nkv-zero", "tiny-llama", {"num_key_value_heads": 0}, "num_key_value_heads"),
    ("nkv-not-divisor", "tiny-llama", {"num_key_value_heads": 3}, "num_key_value_heads (3)"),
    ("nkv-more-than-heads", "tiny-llama", {"num_key_value_heads": 8}, "num_key_value_heads (8)"),
    ("rope-scaling-string", "tiny-llama", {"rope_scaling": "llama3"}, "rope_scaling must be"),
    ("rope-scaling-list", "tiny-llama", {"rope_scaling": [8.0]}, "rope_scaling must be"),
    ("low-freq-factor-zero", "tiny-llama", {"rope_scaling": LLAMA3 | {"low_freq_factor": 0}}, "low_freq_factor"),
    ("low-freq-factor-negative", "tiny-llama", {"rope_scaling": LLAMA3 | {"low_freq_factor": -1.0}}, "low_freq_factor"),
    ("high-equals-low", "tiny-llama", {"rope_scaling": LLAMA3 | {"high_freq_factor": 1.0}}, "high_freq_factor"),
    ("high-below-low", "tiny-llama", {"rope_scaling": LLAMA3 | {"high_freq_factor": 0.5}}, "high_freq_factor"),
    ("rope-factor-zero", "tiny-llama", {"rope_scaling": LLAMA3 | {"factor": 0}}, "rope_scaling.factor"),
    ("rope-factor-string", "tiny-llama", {"rope_scaling": LLAMA3 | {"factor": "8"}}, "rope_scaling.factor"),
    ("rope-factor-missing", "tiny-llama", {"rope_scaling": {"rope_type": "linear"}}, "factor"),
    ("rope-orig-max-float", "tiny-llama", {"rope_scaling": LLAMA3 | {"original_max_position_embeddings": 256.5}},
     "original_max_position_embeddings"),
    ("rope-orig-max-zero", "tiny-llama", {"rope_scaling": LLAMA3 | {"original_max_position_embeddings": 0}},
     "original_max_position_embeddings"),
    ("rope-type-number", "tiny-llama", {"rope_scaling": LLAMA3 | {"rope_type": 3}}, "rope_scaling.rope_type"),
    ("rope-type-unknown", "tiny-llama", {"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "'yarn'"),
    ("rope-parameters-string", "tiny-llama", {"rope_parameters": "default"}, "rope_parameters"),
    ("rope-parameters-theta-zero", "tiny-llama", {"rope_parameters": {"rope_type": "default", "rope_theta": 0}},
     "rope_parameters.rope_theta"),
    ("head-dim-string", "tiny-llama", {"head_dim": "8"}, "head_dim must be"),
    ("head-dim-negative", "tiny-llama", {"head_dim": -8}, "head_dim must be"),
    ("head-dim-float", "tiny-llama", {"head_dim": 8.0}, "head_dim must be"),
    ("head-dim-odd", "tiny-llama", {"head_dim": 7}, "head_dim must be even"),
    ("head-dim-wrong", "tiny-llama", {"head_dim": 16}, "head_dim"),
    ("model-type-list", "tiny-llama", {"model_type": ["llama"]}, "model_type"),
    ("model-type-null", "tiny-llama", {"model_type": None}, "model_type"),
    ("model-type-unknown", "tiny-llama", {"model_type": "gemma2"}, "model_type 'gemma2'"),
    ("eos-object", "tiny-llama", {"eos_token_id": {}}, "eos_token_id"),
    ("eos-string", "tiny-llama", {"eos_token_id": "2"}, "eos_token_id"),
    ("eos-bool", "tiny-llama", {"eos_token_id": True}, "eos_token_id"),
    ("eos-past-vocab", "tiny-llama", {"eos_token_id": 259}, "eos_token_id"),
    ("eos-negative", "tiny-llama", {"eos_token_id": -1}, "eos_token_id"),
    ("eos-list-bad-item", "tiny-llama", {"eos_token_id": [2, "x"]}, "eos_token_id"),
    ("eos-list-past-vocab", "tiny-llama", {"eos_token_id": [2, 1000]}, "eos_token_id"),
    ("bos-past-vocab", "tiny-llama", {"bos_token_id": 259}, "bos_token_id"),
    ("bos-float", "tiny-llama", {"bos_token_id": 1.0}, "bos_token_id"),
    ("layers-huge", "tiny-llama", {"num_hidden_layers": 10**9}, "num_hidden_layers is 1000000000"),
    ("layers-too-few", "tiny-llama", {"num_hidden_layers": 12}, "num_hidden_layers is 12"),
    ("layers-too-few-single-file", "tiny-qwen2", {"num_hidden_layers": 23}, "model.layers.23."),
    ("layers-one-more", "tiny-qwen2", {"num_hidden_layers": 25}, "num_hidden_layers is 25"),
    ("layers-zero", "tiny-llama", {"num_hidden_layers": 0}, "num_hidden_layers"),
    ("layers-string", "tiny-llama", {"num_hidden_layers": "24"}, "num_hidden_layers"),
    ("layers-float", "tiny-llama", {"num_hidden_layers": 24.0}, "num_hidden_layers"),
    ("layers-bool", "tiny-llama", {"num_hidden_layers": True}, "num_hidden_layers"),
    ("tie-string", "tiny-llama", {"tie_word_embeddings": "false"}, "tie_word_embeddings"),
    ("tie-int", "tiny-qwen2", {"tie_word_embeddings": 1}, "tie_word_embeddings"),
    ("tie-false-without-lm-head", "tiny-qwen2", {"tie_word_embeddings": False}, "lm_head.weight"),
    ("use-sliding-window-string", "tiny-qwen2", {"use_sliding_window": "false"}, "use_sliding_window"),
    ("attention-bias-string", "tiny-llama", {"attention_bias": "false"}, "attention_bias"),
    ("attention-bias-without-biases", "tiny-llama", {"attention_bias": True}, "attention_bias"),
    ("mlp-bias-string", "tiny-llama", {"mlp_bias": "false"}, "mlp_bias"),
    ("mlp-bias-true", "tiny-llama", {"mlp_bias": True}, "mlp_bias"),
    ("eps-bool", "tiny-llama", {"rms_norm_eps": True}, "rms_norm_eps"),
    ("eps-zero", "tiny-llama", {"rms_norm_eps": 0}, "rms_norm_eps"),
    ("eps-negative", "tiny-llama", {"rms_norm_eps": -1e-5}, "rms_norm_eps"),
    ("eps-string", "tiny-llama", {"rms_norm_eps": "1e-5"}, "rms_norm_eps"),
    ("eps-null", "tiny-llama", {"rms_norm_eps": None}, "rms_norm_eps"),
    ("theta-zero", "tiny-llama", {"rope_theta": 0}, "rope_theta"),
    ("theta-negative", "tiny-llama", {"rope_theta": -10000.0}, "rope_theta"),
    ("theta-string", "tiny-llama", {"rope_theta": "10000"}, "rope_theta"),
    ("theta-bool", "tiny-llama", {"rope_theta": True}, "rope_theta"),
    ("sliding-window-zero", "tiny-llama", {"model_type": "mistral", "rope_scaling": None, "sliding_window": 0},
     "sliding_window"),
    ("sliding-window-string", "tiny-llama", {"model_type": "mistral", "rope_scaling": None, "sliding_window": "16"},
     "sliding_window"),
    ("vocab-string", "tiny-qwen2", {"vocab_size": "259"}, "vocab_size"),
    ("vocab-wrong", "tiny-qwen2", {"vocab_size": 300}, "vocab_size"),
    ("vocab-huge", "tiny-qwen2", {"vocab_size": 10**30}, "vocab_size"),
    ("hidden-zero", "tiny-qwen2", {"hidden_size": 0}, "hidden_size"),
    ("hidden-wrong", "tiny-qwen2", {"hidden_size": 64}, "hidden_size"),
    ("intermediate-float", "tiny-qwen2", {"intermediate_size": 96.0}, "intermediate_size"),
    ("intermediate-wrong", "tiny-qwen2", {"intermediate_size": 100}, "intermediate_size"),
    ("heads-wrong", "tiny-qwen2", {"num_attention_heads": 4}, "num_attention_heads"),
    ("max-positions-zero", "tiny-llama", {"max_position_embeddings": 0}, "max_position_embeddings"),
    ("max-positions-string", "tiny-llama", {"max_position_embeddings": "4096"}, "max_position_embeddings"),
    ("hidden-act-null", "tiny-llama", {"hidden_act": None}, "hidden_act"),
    ("hidden-act-gelu", "tiny-llama", {"hidden_act": "gelu"}, "hidden_act"),
    ("missing-vocab-size", "tiny-llama", lambda c: {k: v for k, v in c.items() if k != "vocab_size"}, "vocab_size"),
    ("config-not-object", "tiny-llama", lambda c: [c], "expected a JSON object"),
    # Qwen3
    ("qwen3-head-dim-inconsistent", "tiny-qwen3", {"head_dim": 8}, "num_attention_heads × head_dim = 4 × 8"),
    ("qwen3-head-dim-absent-means-128", "tiny-qwen3", lambda c: {k: v for k, v in c.items() if k != "head_dim"},
     "head_dim = 4 × 128"),
    ("qwen3-head-dim-null", "tiny-qwen3", {"head_dim": None}, "head_dim is null"),
    ("qwen3-sliding-window-on", "tiny-qwen3", {"use_sliding_window": True, "sliding_window": 64},
     "use_sliding_window is true"),
    ("qwen3-sliding-layer", "tiny-qwen3", {"layer_types": ["full_attention"] * 23 + ["sliding_attention"]},
     "layer_types[23]"),
    ("qwen3-layer-types-short", "tiny-qwen3", {"layer_types": ["full_attention"] * 3}, "layer_types has 3 entries"),
    ("qwen3-layer-types-string", "tiny-qwen3", {"layer_types": "full_attention"}, "layer_types must be"),
    ("qwen3-as-llama", "tiny-qwen3", {"model_type": "llama"}, "is model_type \"qwen3\" meant"),
    ("qwen3-attention-bias-without-biases", "tiny-qwen3", {"attention_bias": True}, "attention_bias"),
    ("partial-rotary", "tiny-qwen3", {"partial_rotary_factor": 0.5}, "partial_rotary_factor is 0.5"),
    # Phi-3 and LongRoPE
    ("phi3-short-factor-length", "tiny-phi3", lambda c: _rope(c, short_factor=[1.0, 1.0, 1.0]),
     "rope_scaling.short_factor has 3 entries, but longrope needs head_dim / 2 = 4"),
    ("phi3-long-factor-length", "tiny-phi3", lambda c: _rope(c, long_factor=[1.0] * 8), "rope_scaling.long_factor has 8"),
    ("phi3-long-factor-zero", "tiny-phi3", lambda c: _rope(c, long_factor=[1.0, 0.0, 8.0, 24.0]),
     "rope_scaling.long_factor[1] must be a positive finite number"),
    ("phi3-short-factor-negative", "tiny-phi3", lambda c: _rope(c, short_factor=[1.0, 1.0, -1.0, 1.0]),
     "rope_scaling.short_factor[2]"),
    ("phi3-short-factor-string", "tiny-phi3", lambda c: _rope(c, short_factor=[1.0, "1", 1.0, 1.0]),
     "rope_scaling.short_factor[1]"),
    ("phi3-short-factor-bool", "tiny-phi3", lambda c: _rope(c, short_factor=[True, 1.0, 1.0, 1.0]),
     "rope_scaling.short_factor[0]"),
    ("phi3-short-factor-tiny", "tiny-phi3", lambda c: _rope(c, short_factor=[5e-324, 1.0, 1.0, 1.0]), "overflows"),
    ("phi3-long-factor-missing", "tiny-phi3", lambda c: _rope(c, long_factor=None), "needs rope_scaling.long_factor"),
    ("phi3-factor-list-not-list", "tiny-phi3", lambda c: _rope(c, short_factor=1.0), "rope_scaling.short_factor must be"),
    ("phi3-attention-factor-zero", "tiny-phi3", lambda c: _rope(c, attention_factor=0), "rope_scaling.attention_factor"),
    ("phi3-original-max-disagrees", "tiny-phi3", lambda c: _rope(c, original_max_position_embeddings=128),
     "rope_scaling.original_max_position_embeddings is 128"),
    ("phi3-original-max-only-inside", "tiny-phi3",
     lambda c: _rope({k: v for k, v in c.items() if k != "original_max_position_embeddings"},
                     original_max_position_embeddings=64), "transformers' Phi3Config default"),
    ("phi3-original-max-one", "tiny-phi3", {"original_max_position_embeddings": 1}, "divides by its logarithm"),
    ("phi3-original-max-float", "tiny-phi3", {"original_max_position_embeddings": 64.0},
     "original_max_position_embeddings must be"),
    ("phi3-rope-yarn", "tiny-phi3", lambda c: _rope(c, type="yarn"), "'yarn' on phi3 is ambiguous"),
    ("phi3-rope-llama3", "tiny-phi3", {"rope_scaling": LLAMA3}, "not supported for phi3"),
    ("longrope-on-llama", "tiny-llama", {"rope_scaling": {"rope_type": "longrope", "short_factor": [1.0] * 4,
                                                          "long_factor": [2.0] * 4}}, "phi3 only"),
    ("phi3-partial-rotary-in-rope", "tiny-phi3", lambda c: _rope(c, partial_rotary_factor=0.75),
     "rope_scaling.partial_rotary_factor is 0.75"),
    ("phi3-head-dim-not-d-over-h", "tiny-phi3", {"head_dim": 16}, "phi3's must be hidden_size // num_attention_heads"),
    ("phi3-attention-bias", "tiny-phi3", {"attention_bias": True}, "phi3 has no attention biases"),
    ("phi3-heads-wrong", "tiny-phi3", {"num_key_value_heads": 4}, "self_attn.qkv_proj.weight"),
    ("phi3-intermediate-wrong", "tiny-phi3", {"intermediate_size": 48}, "2 × intermediate_size"),
    ("phi3-as-llama", "tiny-phi3", {"model_type": "llama", "rope_scaling": None}, "is model_type \"phi3\" meant"),
    ("llama-as-phi3", "tiny-llama", {"model_type": "phi3", "rope_scaling": None}, "qkv_proj"),
]


def _rope(config: dict, **change) -> dict:
    """config.json with its rope_scaling changed (None removes a key)."""
    rope = {k: v for k, v in (config["rope_scaling"] | change).items() if v is not None}
    return config | {"rope_scaling": rope}


@pytest.mark.parametrize("base, change, needle", [c[1:] for c in CONFIG_CASES], ids=[c[0] for c in CONFIG_CASES])
def test_hostile_config_value(request, tmp_path, base, change, needle):
    d = copy_checkpoint(tmp_path, base)
    edit_json(d / "config.json", change)
    line = assert_one_line_error(run_asl(d, tmp_path, _in_subprocess(request)), needle)
    assert str(d) in line  # names the file


# ---------------------------------------------------------------- config.json bytes

RAW_CONFIG_CASES = [
    ("invalid-utf8", lambda text: text.encode().replace(b'"llama"', b'"ll\xffama"'), "UTF-8"),
    ("not-json", lambda text: b"{oops", "not valid JSON"),
    ("empty", lambda text: b"", "not valid JSON"),
    ("nan", lambda text: text.replace("1e-05", "NaN").encode(), "NaN"),
    ("infinity-literal", lambda text: text.replace("1e-05", "Infinity").encode(), "Infinity"),
    ("overflowing-float", lambda text: text.replace("1e-05", "1e999").encode(), "rms_norm_eps"),
    ("huge-integer-literal", lambda text: text.replace('"vocab_size": 259', '"vocab_size": ' + "9" * 5000).encode(),
     "config.json"),
    ("nested-200k-deep", lambda text: text.replace("{", '{"deep": ' + "[" * 200_000 + "]" * 200_000 + ",", 1).encode(),
     "nested too deeply"),
]


@pytest.mark.parametrize("mutate, needle", [c[1:] for c in RAW_CONFIG_CASES], ids=[c[0] for c in RAW_CONFIG_CASES])
def test_hostile_config_bytes(request, tmp_path, mutate, needle):
    d = copy_checkpoint(tmp_path, "tiny-llama")
    text = json.dumps(json.loads((d / "config.json").read_text()), indent=2)
    (d / "config.json").write_bytes(mutate(text))
    line = assert_one_line_error(run_asl(d, tmp_path, _in_subprocess(request)), needle)
    assert "config.json" in line


# ---------------------------------------------------------------- generation_config.json

GENERATION_CASES = [
    ("invalid-json", b"{nope", "not valid JSON"),
    ("invalid-utf8", b'{"eos_token_id": 2, "x": "\xff"}', "UTF-8"),
    ("not-object", b"[2]", "expected a JSON object"),
    ("eos-object", b'{"eos_token_id": {}}', "eos_token_id"),
    ("eos-string", b'{"eos_token_id": "2"}', "eos_token_id"),
    ("eos-float", b'{"eos_token_id": 2.0}', "eos_token_id"),
    ("eos-past-vocab", b'{"eos_token_id": 259}', "eos_token_id"),
    ("eos-list-negative", b'{"eos_token_id": [2, -1]}', "eos_token_id"),
    ("nested-200k-deep", b'{"eos_token_id": 2, "x": ' + b"[" * 200_000 + b"]" * 200_000 + b"}", "nested too deeply"),
]


@pytest.mark.parametrize("content, needle", [c[1:] for c in GENERATION_CASES], ids=[c[0] for c in GENERATION_CASES])
def test_hostile_generation_config(request, tmp_path, content, needle):
    d = copy_checkpoint(tmp_path, "tiny-qwen2")
    (d / "generation_config.json").write_bytes(content)
    line = assert_one_line_error(run_asl(d, tmp_path, _in_subprocess(request)), needle)
    assert "generation_config.json" in line


# ---------------------------------------------------------------- model.safetensors.index.json

SHARD_1 = "model-00001-of-00002.safetensors"


def _index_map(change):
    def edit(doc):
        doc["weight_map"] = change(doc["weight_map"])
        return doc

    return edit


INDEX_CASES = [
    ("weight-map-list", _index_map(lambda m: list(m.items())), "weight_map must be an object"),
    ("weight-map-null", _index_map(lambda m: None), "weight_map must be an object"),
    ("no-weight-map", lambda doc: {"metadata": doc["metadata"]}, "weight_map"),
    ("not-object", lambda doc: [doc], "weight_map"),
    ("value-int", _index_map(lambda m: m | {"model.norm.weight": 1}), "weight_map['model.norm.weight']"),
    ("value-null", _index_map(lambda m: m | {"model.norm.weight": None}), "weight_map['model.norm.weight']"),
    ("value-empty", _index_map(lambda m: m | {"model.norm.weight": ""}), "weight_map['model.norm.weight']"),
    ("traversal", _index_map(lambda m: m | {"model.norm.weight": "../elsewhere/model.safetensors"}),
     "../elsewhere/model.safetensors"),
    ("traversal-inside-then-out", _index_map(lambda m: m | {"model.norm.weight": f"sub/../../elsewhere/{SHARD_1}"}),
     "elsewhere"),
    ("absolute", _index_map(lambda m: m | {"model.norm.weight": "ABSOLUTE"}), "not inside"),
    ("missing-shard", _index_map(lambda m: m | {"model.norm.weight": "model-00003-of-00002.safetensors"}),
     "model-00003-of-00002.safetensors"),
    ("wrong-shard", _index_map(lambda m: m | {"model.norm.weight": "model-00002-of-00002.safetensors"}),
     "the index says it holds 'model.norm.weight'"),
    ("extra-name", _index_map(lambda m: m | {"model.layers.0.mlp.gate_proj.bias": SHARD_1}),
     "model.layers.0.mlp.gate_proj.bias"),
    ("symlinked-folder", _index_map(lambda m: m | {"model.norm.weight": f"link/{SHARD_1}"}),
     "outside the checkpoint directory"),
    ("empty-weight-map", _index_map(lambda m: {}), "no decoder-layer tensors"),
    ("control-char-shard", _index_map(lambda m: m | {"model.norm.weight": "bad\nname.safetensors"}), "bad\\nname"),
    ("far-layer-name", _index_map(lambda m: m | {"model.layers.999999999.input_layernorm.weight": SHARD_1}),
     "model.layers.999999999.input_layernorm.weight"),
]


@pytest.mark.parametrize("change, needle", [c[1:] for c in INDEX_CASES], ids=[c[0] for c in INDEX_CASES])
def test_hostile_index(request, tmp_path, change, needle):
    d = copy_checkpoint(tmp_path, "tiny-llama")
    elsewhere = tmp_path / "elsewhere"  # a valid shard outside the directory: it must not be read
    elsewhere.mkdir()
    shutil.copy(d / SHARD_1, elsewhere / "model.safetensors")
    shutil.copy(d / SHARD_1, elsewhere / SHARD_1)
    (d / "sub").mkdir()
    (d / "link").symlink_to(elsewhere, target_is_directory=True)
    index = d / "model.safetensors.index.json"
    text = index.read_text()
    edit_json(index, change)
    index.write_text(index.read_text().replace("ABSOLUTE", str(elsewhere / SHARD_1)))
    assert text != index.read_text()
    line = assert_one_line_error(run_asl(d, tmp_path, _in_subprocess(request)), needle)
    assert str(d) in line


def test_layer_count_is_bounded_by_the_tensors_before_any_loop(tmp_path):
    """10**9 layers with one far-away layer name: refused at once, not looped over."""
    d = copy_checkpoint(tmp_path, "tiny-llama")
    edit_json(d / "config.json", {"num_hidden_layers": 10**9})
    edit_json(d / "model.safetensors.index.json",
              _index_map(lambda m: m | {"model.layers.999999999.input_layernorm.weight": SHARD_1}))
    assert_one_line_error(run_asl(d, tmp_path), "num_hidden_layers is 1000000000", "25 layers")


def test_index_invalid_utf8(tmp_path):
    d = copy_checkpoint(tmp_path, "tiny-llama")
    index = d / "model.safetensors.index.json"
    index.write_bytes(index.read_bytes().replace(b"model.norm.weight", b"model.norm\xfe.weight"))
    assert_one_line_error(run_asl(d, tmp_path), "model.safetensors.index.json", "UTF-8")


def test_symlinked_shard_outside_the_directory_is_refused(tmp_path):
    d = copy_checkpoint(tmp_path, "tiny-llama")
    outside = tmp_path / "outside.safetensors"
    shutil.move(d / SHARD_1, outside)
    (d / SHARD_1).symlink_to(outside)
    assert_one_line_error(run_asl(d, tmp_path), SHARD_1, "outside the checkpoint directory")


def test_symlinked_single_file_outside_the_directory_is_refused(tmp_path):
    d = copy_checkpoint(tmp_path, "tiny-qwen2")
    outside = tmp_path / "outside.safetensors"
    shutil.move(d / "model.safetensors", outside)
    (d / "model.safetensors").symlink_to(outside)
    assert_one_line_error(run_asl(d, tmp_path), "model.safetensors", "outside the checkpoint directory")


# ---------------------------------------------------------------- safetensors headers

NAME = "model.layers.0.self_attn.q_proj.weight"


def _entry(change):
    def edit(header):
        header[NAME] = header[NAME] | change
        return header

    return edit


SAFETENSORS_CASES = [
    ("nested-200k-deep", lambda h: b'{"x": ' + b"[" * 200_000 + b"]" * 200_000 + b"}", "nested too deeply"),
    ("int64-overflowing-shape", _entry({"shape": [2**40, 2**40]}), "spans"),
    ("huge-dim-zero-elements", _entry({"shape": [0, 2**70]}), "invalid shape"),
    ("header-not-object", lambda h: b"[1, 2]", "not a JSON object"),
    ("header-not-utf8", lambda h: json.dumps(h).encode().replace(b"model.norm.weight", b"model.norm\xff"), "UTF-8"),
    ("header-nan", lambda h: json.dumps(h).encode().replace(b'"format"', b'"x": NaN, "format"'), "NaN"),
    ("dtype-list", _entry({"dtype": ["BF16"]}), "dtype"),
    ("dtype-int", _entry({"dtype": 16}), "dtype"),
    ("dtype-unknown", _entry({"dtype": "F8_E4M3"}), "dtype"),
    ("shape-bool", _entry({"shape": [True, 48]}), "invalid shape"),
    ("shape-string", _entry({"shape": "48x48"}), "invalid shape"),
    ("shape-negative", _entry({"shape": [-48, -48]}), "invalid shape"),
    ("offsets-float", lambda h: _entry({"data_offsets": [float(o) for o in h[NAME]["data_offsets"]]})(h),
     "data_offsets"),
    ("offsets-bool", _entry({"data_offsets": [False, True]}), "data_offsets"),
    ("offsets-past-end", _entry({"data_offsets": [0, 2**62]}), "outside the data region"),
    ("entry-not-object", lambda h: h | {NAME: [1]}, "not an object"),
    ("metadata-not-object", lambda h: h | {"__metadata__": ["pt"]}, "__metadata__"),
    ("control-char-name", lambda h: h | {"model.layers.0.\nbad": h[NAME]}, "overlap"),
    ("aliased-tensor", lambda h: h | {"model.layers.0.mlp.up_proj.bias": h["model.norm.weight"]}, "overlap"),
]


@pytest.mark.parametrize("change, needle", [c[1:] for c in SAFETENSORS_CASES], ids=[c[0] for c in SAFETENSORS_CASES])
def test_hostile_safetensors_header(request, tmp_path, change, needle):
    d = copy_checkpoint(tmp_path, "tiny-qwen2")
    rewrite_header(d / "model.safetensors", change)
    line = assert_one_line_error(run_asl(d, tmp_path, _in_subprocess(request)), needle)
    assert "model.safetensors" in line


def test_header_length_past_the_file(tmp_path):
    d = copy_checkpoint(tmp_path, "tiny-qwen2")
    path = d / "model.safetensors"
    blob = path.read_bytes()
    path.write_bytes(struct.pack("<Q", len(blob) * 2) + blob[8:])
    assert_one_line_error(run_asl(d, tmp_path), "model.safetensors", "header length")


def test_truncated_shard(tmp_path):
    d = copy_checkpoint(tmp_path, "tiny-qwen2")
    path = d / "model.safetensors"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    assert_one_line_error(run_asl(d, tmp_path), "model.safetensors", "outside the data region")


def test_unused_tensor_is_refused_by_name(tmp_path):
    d = copy_checkpoint(tmp_path, "tiny-qwen2")
    header = read_header(d / "model.safetensors")
    mapped = open_mapped(header)
    tensors = {n: np.array(map_tensor(header, n, mapped)) for n in header.tensors}
    del mapped
    tensors["model.layers.3.mlp.up_proj.bias"] = np.zeros(96, np.float32)
    save(tensors, d / "model.safetensors", "BF16")
    assert_one_line_error(run_asl(d, tmp_path), "model.layers.3.mlp.up_proj.bias", "mlp_bias")


def _retensor(d: Path, change, dtype: str) -> None:
    """Rewrite a single-file checkpoint's tensors: `change(tensors)` edits the dict of arrays in place."""
    header = read_header(d / "model.safetensors")
    mapped = open_mapped(header)
    tensors = {n: np.array(map_tensor(header, n, mapped)) for n in header.tensors}
    del mapped
    change(tensors)
    save(tensors, d / "model.safetensors", dtype)


@pytest.mark.parametrize("name, rows, needle", [
    ("model.layers.5.self_attn.qkv_proj.weight", 65, "(4 + 2 × 2) × 8 = 64, the rows of q, k and v"),
    ("model.layers.5.self_attn.qkv_proj.weight", 48, "fix num_attention_heads, num_key_value_heads or head_dim"),
    ("model.layers.7.mlp.gate_up_proj.weight", 64, "2 × intermediate_size = 2 × 64 = 128, the rows of gate and up"),
])
def test_fused_tensor_of_the_wrong_size_is_named(tmp_path, name, rows, needle):
    """Phi-3's fused tensors are checked whole, against the sum of their parts, before anything is split."""
    d = copy_checkpoint(tmp_path, "tiny-phi3")
    _retensor(d, lambda t: t.update({name: np.zeros((rows, 32), np.float32)}), "BF16")
    line = assert_one_line_error(run_asl(d, tmp_path), name, needle)
    assert str(d / "model.safetensors") in line and "config.json" in line


def test_qwen3_q_norm_of_the_wrong_size_is_named(tmp_path):
    d = copy_checkpoint(tmp_path, "tiny-qwen3")
    name = "model.layers.2.self_attn.k_norm.weight"
    _retensor(d, lambda t: t.update({name: np.ones(8, np.float32)}), "BF16")
    assert_one_line_error(run_asl(d, tmp_path), name, "head_dim = 16")


def test_qwen3_without_q_norm_is_refused_by_name(tmp_path):
    d = copy_checkpoint(tmp_path, "tiny-qwen3")
    _retensor(d, lambda t: [t.pop(n) for n in list(t) if n.endswith("q_norm.weight")], "BF16")
    assert_one_line_error(run_asl(d, tmp_path), "model.layers.0.self_attn.q_norm.weight", "not a Qwen3 checkpoint")


@pytest.mark.parametrize("where, value, needle", [
    (("rope_scaling", "long_factor", 2), float("nan"), "rope_scaling.long_factor[2] holds NaN"),
    (("rms_norm_eps",), float("inf"), "rms_norm_eps holds Infinity"),
    (("rope_theta",), float("-inf"), "rope_theta holds -Infinity"),
])
def test_non_finite_value_written_by_python_json_is_named(tmp_path, where, value, needle):
    """Python's json.dump writes NaN / Infinity (and transformers reads them back); the message names the key."""
    d = copy_checkpoint(tmp_path, "tiny-phi3")
    config = json.loads((d / "config.json").read_text())
    target = config
    for key in where[:-1]:
        target = target[key]
    target[where[-1]] = value
    (d / "config.json").write_text(json.dumps(config))  # allow_nan=True, Python's default
    line = assert_one_line_error(run_asl(d, tmp_path), needle, "config.json")
    assert "not valid JSON" in line


# ---------------------------------------------------------------- legitimate variants still run

LEGIT_CASES = [
    ("tiny-llama-as-is", "tiny-llama", {}),
    ("tiny-qwen2-as-is", "tiny-qwen2", {}),
    ("rope-scaling-null", "tiny-llama", {"rope_scaling": None}),
    ("rope-scaling-absent", "tiny-llama", lambda c: {k: v for k, v in c.items() if k != "rope_scaling"}),
    ("rope-linear-old-spelling", "tiny-llama", {"rope_scaling": {"type": "linear", "factor": 2.0}}),
    ("rope-parameters-v5", "tiny-llama",
     lambda c: {k: v for k, v in c.items() if k not in ("rope_scaling", "rope_theta")}
     | {"rope_parameters": LLAMA3 | {"rope_theta": 10000.0}}),
    ("rope-theta-integer", "tiny-llama", {"rope_theta": 10000}),
    ("head-dim-absent", "tiny-llama", lambda c: {k: v for k, v in c.items() if k != "head_dim"}),
    ("head-dim-null", "tiny-qwen2", {"head_dim": None}),
    ("sliding-window-null", "tiny-qwen2", {"sliding_window": None}),
    ("mistral-sliding-window", "tiny-llama", {"model_type": "mistral", "rope_scaling": None, "sliding_window": 4096}),
    ("eos-list", "tiny-llama", {"eos_token_id": [2, 0]}),
    ("eos-null-bos-set", "tiny-llama", {"eos_token_id": None, "bos_token_id": 1}),
    ("tiny-qwen3-as-is", "tiny-qwen3", {}),
    ("tiny-phi3-as-is", "tiny-phi3", {}),
    ("qwen3-layer-types-full", "tiny-qwen3", {"layer_types": ["full_attention"] * 24}),
    ("qwen3-rope-parameters-v5", "tiny-qwen3", lambda c: {k: v for k, v in c.items() if k != "rope_theta"}
     | {"rope_parameters": {"rope_type": "default", "rope_theta": 1e6}}),
    ("phi3-rope-su", "tiny-phi3", lambda c: _rope(c, type="su")),
    ("phi3-rope-parameters-v5", "tiny-phi3", lambda c: {k: v for k, v in c.items() if k not in ("rope_scaling",)}
     | {"rope_parameters": {k: v for k, v in c["rope_scaling"].items() if k != "type"}
        | {"rope_type": "longrope", "rope_theta": 10000.0, "partial_rotary_factor": 1.0,
           "original_max_position_embeddings": 64}}),
    ("phi3-head-dim-explicit", "tiny-phi3", {"head_dim": 8}),
    ("phi3-sliding-window", "tiny-phi3", {"sliding_window": 2047}),
    ("phi3-no-rope-scaling", "tiny-phi3", {"rope_scaling": None}),
    ("phi3-explicit-factors", "tiny-phi3", lambda c: _rope(c, factor=32.0, attention_factor=1.19)),
    ("unknown-keys", "tiny-qwen2", {"torch_dtype": "bfloat16", "transformers_version": "4.45.0",
                                    "quantization_config": {"deep": [[[{"x": None}]]]}, "pad_token_id": None,
                                    "max_window_layers": 21, "use_cache": True, "initializer_range": 0.02}),
]


@pytest.mark.parametrize("base, change", [c[1:] for c in LEGIT_CASES], ids=[c[0] for c in LEGIT_CASES])
def test_legitimate_variants_still_run(request, tmp_path, base, change):
    d = copy_checkpoint(tmp_path, base)
    edit_json(d / "config.json", change)
    result = run_asl(d, tmp_path, _in_subprocess(request))
    assert result.returncode == 0, result.stderr


def test_absent_num_key_value_heads_means_one_per_query_head():
    raw = {k: v for k, v in BASE.items() if k != "num_key_value_heads"}
    assert parse_config(raw).num_key_value_heads == BASE["num_attention_heads"]


def test_legitimate_files_around_the_config_still_run(tmp_path):
    """A BOM-prefixed config, generation_config with an eos list, inv_freq buffers, a shard in a subfolder."""
    d = copy_checkpoint(tmp_path, "tiny-llama")
    (d / "config.json").write_bytes(b"\xef\xbb\xbf" + (d / "config.json").read_bytes())
    (d / "generation_config.json").write_text(json.dumps({"eos_token_id": [2], "bos_token_id": None}))
    (d / "sub").mkdir()
    shutil.move(d / SHARD_1, d / "sub" / SHARD_1)
    edit_json(d / "model.safetensors.index.json",
              _index_map(lambda m: {n: f"sub/{s}" if s == SHARD_1 else f"sub/../{s}" for n, s in m.items()}))
    assert run_asl(d, tmp_path).returncode == 0

    q = copy_checkpoint(tmp_path / "q", "tiny-qwen2")
    (q / "generation_config.json").unlink()
    header = read_header(q / "model.safetensors")
    mapped = open_mapped(header)
    tensors = {n: np.array(map_tensor(header, n, mapped)) for n in header.tensors}
    del mapped
    tensors["model.layers.0.self_attn.rotary_emb.inv_freq"] = np.ones(4, np.float32)  # old conversions carry these
    save(tensors, q / "model.safetensors", "BF16")
    assert run_asl(q, tmp_path).returncode == 0


def test_hugging_face_hub_cache_layout_still_loads(tmp_path):
    """snapshots/<rev>/ holds symlinks into ../../blobs/: the hub's own layout is not an escape."""
    repo = tmp_path / "models--tiny--qwen2"
    snapshot, blobs = repo / "snapshots" / "0123abc", repo / "blobs"
    snapshot.mkdir(parents=True)
    blobs.mkdir()
    for f in (CHECKPOINTS / "tiny-qwen2").iterdir():
        shutil.copy(f, blobs / f"blob-{f.name}")
        (snapshot / f.name).symlink_to(Path("../../blobs") / f"blob-{f.name}")
    assert run_asl(snapshot, tmp_path).returncode == 0


# ---------------------------------------------------------------- parse_config under random hostility

TOP_KEYS = ["model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
            "num_attention_heads", "num_key_value_heads", "head_dim", "rms_norm_eps", "rope_theta",
            "max_position_embeddings", "tie_word_embeddings", "attention_bias", "mlp_bias", "use_sliding_window",
            "sliding_window", "hidden_act", "bos_token_id", "eos_token_id", "rope_scaling", "rope_parameters",
            "original_max_position_embeddings", "partial_rotary_factor", "layer_types"]
ROPE_KEYS = ["rope_type", "type", "factor", "low_freq_factor", "high_freq_factor",
             "original_max_position_embeddings", "rope_theta", "short_factor", "long_factor", "attention_factor",
             "partial_rotary_factor"]
BASE_PHI3 = json.loads((CHECKPOINTS / "tiny-phi3" / "config.json").read_text())

hostile_values = st.one_of(
    st.none(), st.booleans(),
    st.integers(-3, 300), st.integers(-2**80, 2**80), st.sampled_from([0, 1, 2, 7, 8, 24, 259, 10**9, 2**53, 2**63]),
    st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([0.0, -0.0, 1e-300, 5e-324, 0.5, 1.0, 8.0, 1e308]),
    st.text(max_size=4), st.sampled_from(["llama", "qwen2", "mistral", "silu", "linear", "llama3", "default", "false"]),
    st.lists(st.integers(-2, 300), max_size=3), st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
)
factor_lists = st.lists(st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-2, 5), st.booleans(),
                                   st.sampled_from([5e-324, 1e-300, 1.0, 24.0, 1e308])), min_size=3, max_size=5)
rope_values = st.one_of(hostile_values, st.fixed_dictionaries(
    {}, optional={k: hostile_values for k in ROPE_KEYS}
    | {"rope_type": st.sampled_from(["linear", "llama3", "default", "longrope", "su", "yarn"]),
       "short_factor": st.one_of(hostile_values, factor_lists), "long_factor": st.one_of(hostile_values, factor_lists)}
))
DELETE = object()


def _apply(raw: dict, changes: dict) -> None:
    """The hostile edits: each key set to its value, or removed (DELETE)."""
    for key, value in changes.items():
        if value is DELETE:
            raw.pop(key, None)
        else:
            raw[key] = value


def _parsed_or_one_line(raw: dict) -> None:
    """parse_config accepts the config (and it is sane) or refuses it with one line naming the file."""
    try:
        cfg = parse_config(raw, "hostile/config.json")
    except OracleError as e:
        message = str(e)
        assert message.startswith("hostile/config.json: ") and "\n" not in message
        return
    _assert_sane(cfg)


@settings(max_examples=fuzz_examples(600), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(st.sampled_from(TOP_KEYS), st.one_of(hostile_values, st.just(DELETE)), min_size=1, max_size=3),
       st.one_of(st.none(), rope_values), st.sampled_from(["rope_scaling", "rope_parameters"]),
       st.sampled_from(sorted(ARCHITECTURES)))
def test_parse_config_never_raises_anything_but_oracle_error(changes, rope, rope_key, model_type):
    raw = dict(BASE, model_type=model_type)
    if rope is not None:
        raw[rope_key] = rope
    _apply(raw, changes)
    _parsed_or_one_line(raw)


@settings(max_examples=fuzz_examples(400), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(st.sampled_from(TOP_KEYS), st.one_of(hostile_values, st.just(DELETE)), max_size=2),
       st.dictionaries(st.sampled_from(ROPE_KEYS), st.one_of(hostile_values, factor_lists, st.just(DELETE)),
                       min_size=1, max_size=3))
def test_parse_phi3_longrope_never_raises_anything_but_oracle_error(changes, rope_changes):
    """tiny-phi3's config.json with its LongRoPE keys (and others) made hostile."""
    raw = dict(BASE_PHI3, rope_scaling=dict(BASE_PHI3["rope_scaling"]))
    _apply(raw["rope_scaling"], rope_changes)
    _apply(raw, changes)
    _parsed_or_one_line(raw)


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _assert_sane(cfg: Config) -> None:
    """What the rest of the reference relies on, for every config parse_config accepts."""
    for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                 "num_key_value_heads", "head_dim", "max_position_embeddings"):
        value = getattr(cfg, name)
        assert _is_int(value) and value > 0, (name, value)
    assert cfg.num_attention_heads % cfg.num_key_value_heads == 0 and cfg.head_dim % 2 == 0
    for name in ("rms_norm_eps", "rope_theta"):
        value = getattr(cfg, name)
        assert isinstance(value, float) and math.isfinite(value) and value > 0, (name, value)
    assert cfg.rope_theta >= 1
    assert isinstance(cfg.tie_word_embeddings, bool) and isinstance(cfg.attention_bias, bool)
    assert cfg.sliding_window is None or (_is_int(cfg.sliding_window) and cfg.sliding_window > 0)
    for token in cfg.eos_token_ids + ((cfg.bos_token_id,) if cfg.bos_token_id is not None else ()):
        assert _is_int(token) and 0 <= token < cfg.vocab_size
    rs = cfg.rope_scaling
    assert rs.rope_type in ("default", "linear", "llama3", "longrope")
    assert rs.rope_type != "longrope" or cfg.model_type == "phi3"
    assert math.isfinite(rs.factor) and rs.factor >= 1 or rs.rope_type in ("default", "longrope")
    if rs.rope_type in ("llama3", "longrope"):
        assert _is_int(rs.original_max_position_embeddings) and rs.original_max_position_embeddings > 0
    if rs.rope_type == "llama3":
        assert 0 < rs.low_freq_factor < rs.high_freq_factor and math.isfinite(rs.high_freq_factor)
    if rs.rope_type == "longrope":
        assert math.isfinite(rs.factor) and rs.factor > 0
        assert isinstance(rs.attention_factor, float) and math.isfinite(rs.attention_factor) and rs.attention_factor > 0
        for factors in (rs.short_factor, rs.long_factor):
            assert len(factors) == cfg.head_dim // 2
            assert all(isinstance(f, float) and math.isfinite(f) and f > 0 for f in factors)
    if cfg.head_dim <= 4096:  # the rotary tables of every accepted config are finite
        import warnings

        from reference.model.rope import inverse_frequencies, rope_tables

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # 2π / 0 for frequencies below float range
            for long in (False, True):
                assert np.isfinite(inverse_frequencies(cfg, long)).all()
            for positions in ([0, 1], [0, 1, min(cfg.max_position_embeddings, 2**40) - 1]):  # short, long (LongRoPE)
                cos, sin = rope_tables(cfg, np.array(positions), np.float64)
                assert np.isfinite(cos).all() and np.isfinite(sin).all()


positive_floats = st.floats(min_value=5e-324, max_value=1.7976931348623157e308, allow_nan=False, allow_infinity=False)


@settings(max_examples=fuzz_examples(300), deadline=None)
@given(theta=st.one_of(positive_floats, st.integers(1, 2**53)), eps=positive_floats,
       factor=positive_floats, low=positive_floats, high=positive_floats,
       orig=st.integers(1, 2**53), rope_type=st.sampled_from(["default", "linear", "llama3"]),
       max_pos=st.integers(1, 2**53))
def test_well_typed_extremes_are_refused_or_give_finite_rotary_tables(theta, eps, factor, low, high, orig, rope_type,
                                                                       max_pos):
    raw = BASE | {"rope_theta": theta, "rms_norm_eps": eps, "max_position_embeddings": max_pos,
                  "rope_scaling": {"rope_type": rope_type, "factor": factor, "low_freq_factor": low,
                                   "high_freq_factor": high, "original_max_position_embeddings": orig}}
    try:
        cfg = parse_config(raw)
    except OracleError as e:
        assert "\n" not in str(e)
        return
    _assert_sane(cfg)


def test_deeply_nested_but_parseable_header_values_are_named(tmp_path):
    """Nesting just under json's limit in a dtype or shape: still one clean line."""
    d = copy_checkpoint(tmp_path, "tiny-qwen2")
    deep = b"[" * 900 + b"]" * 900
    rewrite_header(d / "model.safetensors", lambda h: json.dumps(h).encode().replace(
        b'"dtype": "BF16"', b'"dtype": ' + deep, 1))
    assert_one_line_error(run_asl(d, tmp_path), "model.safetensors")
