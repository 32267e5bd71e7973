"""Loading checkpoint directories: key set, shapes, finiteness, shards, ties, dtypes."""

import json
import shutil

import numpy as np
import pytest

from reference.errors import OracleError
from reference.io.checkpoint import expected_tensors, load_weights
from reference.io.safetensors import map_tensor, open_mapped, read_header, save
from tests.conftest import CHECKPOINTS


def test_tiny_checkpoints_load_with_the_expected_structure(tiny_dir):
    w = load_weights(tiny_dir)
    cfg = w.config
    assert len(w.layers) == cfg.num_hidden_layers >= 24
    assert cfg.num_attention_heads != cfg.num_key_value_heads
    assert w.layers[0].wk.shape == (cfg.num_key_value_heads * cfg.head_dim, cfg.hidden_size)
    assert (w.lm_head is w.embed) == cfg.tie_word_embeddings
    assert w.embed.dtype == np.float32


def test_float32_weights_are_views_of_the_file_not_copies():
    w = load_weights(CHECKPOINTS / "tiny-llama")  # stored F32
    assert isinstance(w.layers[3].wq.base, np.memmap) or isinstance(w.layers[3].wq.base.base, np.memmap)


def test_bf16_checkpoint_is_widened_exactly():
    d = CHECKPOINTS / "tiny-qwen2"  # stored BF16
    header = read_header(d / "model.safetensors")
    stored = header.tensors["model.layers.0.self_attn.q_proj.weight"]
    assert stored.dtype == "BF16"
    raw = np.memmap(d / "model.safetensors", dtype=np.uint8, mode="r")
    bits = np.ndarray(stored.shape, np.dtype("<u2"), raw, header.data_start + stored.begin)
    expected = (bits.astype(np.uint32) << 16).view(np.float32)
    np.testing.assert_array_equal(load_weights(d).layers[0].wq, expected)
    np.testing.assert_array_equal(load_weights(d, "float64").layers[0].wq, expected.astype(np.float64))


def test_float64_on_request(tiny_dir):
    assert load_weights(tiny_dir, "float64").layers[5].w_up.dtype == np.float64
    with pytest.raises(OracleError, match="dtype must be one of"):
        load_weights(tiny_dir, "float16")


def _copy_single_file_checkpoint(tmp_path):
    """tiny-qwen2 copied, with its weights as a dict we can tamper with."""
    d = tmp_path / "ckpt"
    shutil.copytree(CHECKPOINTS / "tiny-qwen2", d)
    header = read_header(d / "model.safetensors")
    mapped = open_mapped(header)
    tensors = {name: np.array(map_tensor(header, name, mapped)) for name in header.tensors}
    return d, tensors


def test_missing_tensor_is_named(tmp_path):
    d, tensors = _copy_single_file_checkpoint(tmp_path)
    del tensors["model.layers.7.mlp.up_proj.weight"]
    save(tensors, d / "model.safetensors")
    with pytest.raises(OracleError, match=r"'model.layers.7.mlp.up_proj.weight' is missing"):
        load_weights(d)


def test_shape_disagreeing_with_config_is_named(tmp_path):
    d, tensors = _copy_single_file_checkpoint(tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    cfg["intermediate_size"] = 100
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(OracleError, match=r"'model.layers.0.mlp.gate_proj.weight' has shape \(96, 48\), but config.json implies \(100, 48\)"):
        load_weights(d)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_weights_are_refused(tmp_path, bad):
    d, tensors = _copy_single_file_checkpoint(tmp_path)
    tensors["model.layers.3.self_attn.k_proj.bias"][2] = bad
    save(tensors, d / "model.safetensors")
    with pytest.raises(OracleError, match="'model.layers.3.self_attn.k_proj.bias' holds NaN or infinite"):
        load_weights(d)


def test_missing_shard_is_named(tmp_path):
    d = tmp_path / "ckpt"
    shutil.copytree(CHECKPOINTS / "tiny-llama", d)
    (d / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(OracleError, match="shard 'model-00002-of-00002.safetensors', which is missing"):
        load_weights(d)


def test_no_weights_at_all(tmp_path):
    d = tmp_path / "ckpt"
    shutil.copytree(CHECKPOINTS / "tiny-llama", d)
    for f in d.glob("model*"):
        f.unlink()
    with pytest.raises(OracleError, match="only safetensors checkpoints are supported"):
        load_weights(d)


def test_unsupported_model_type_in_a_checkpoint(tmp_path):
    d = tmp_path / "ckpt"
    shutil.copytree(CHECKPOINTS / "tiny-llama", d)
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps(cfg | {"model_type": "gemma2"}))
    with pytest.raises(OracleError, match="model_type 'gemma2' is not supported"):
        load_weights(d)


def test_unsupported_rope_type_in_a_checkpoint(tmp_path):
    d = tmp_path / "ckpt"
    shutil.copytree(CHECKPOINTS / "tiny-llama", d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["rope_scaling"] = {"rope_type": "dynamic", "factor": 2.0}
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(OracleError, match="rope scaling type 'dynamic'"):
        load_weights(d)


def test_expected_tensors_counts():
    from reference.model.config import load_config

    cfg = load_config(CHECKPOINTS / "tiny-qwen2")
    names = expected_tensors(cfg)
    per_layer = 9 + 3  # 9 weights + q/k/v biases
    assert len(names) == 2 + cfg.num_hidden_layers * per_layer  # embed, norm; tied: no lm_head
