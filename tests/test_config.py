"""config.json parsing: required keys, GQA shapes, rope scaling, refusals with names."""

import json

import pytest

from reference.errors import OracleError
from reference.model.config import load_config, parse_config

LLAMA = dict(
    model_type="llama", vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
    num_attention_heads=8, num_key_value_heads=2, rms_norm_eps=1e-5, max_position_embeddings=512,
)


def test_defaults_and_derived_shapes():
    cfg = parse_config(LLAMA)
    assert cfg.head_dim == 8 and cfg.group_size == 4
    assert cfg.rope_theta == 10000.0 and cfg.rope_scaling.rope_type == "default"
    assert not cfg.attention_bias and not cfg.tie_word_embeddings and cfg.sliding_window is None


def test_qwen2_has_qkv_bias_but_no_o_bias():
    cfg = parse_config(LLAMA | {"model_type": "qwen2"})
    assert cfg.attention_bias and not cfg.o_proj_bias


def test_explicit_head_dim_wins():
    assert parse_config(LLAMA | {"head_dim": 16}).head_dim == 16


@pytest.mark.parametrize("key", ["vocab_size", "hidden_size", "num_hidden_layers", "rms_norm_eps"])
def test_missing_required_key(key):
    raw = dict(LLAMA)
    del raw[key]
    with pytest.raises(OracleError, match=f"required key '{key}' is missing"):
        parse_config(raw)


def test_heads_not_divisible():
    with pytest.raises(OracleError, match=r"num_attention_heads \(8\) must be a multiple of num_key_value_heads \(3\)"):
        parse_config(LLAMA | {"num_key_value_heads": 3})


def test_unsupported_model_type():
    with pytest.raises(OracleError, match="model_type 'gemma2' is not supported"):
        parse_config(LLAMA | {"model_type": "gemma2"})


def test_unsupported_rope_type():
    with pytest.raises(OracleError, match="rope scaling type 'yarn' is not supported"):
        parse_config(LLAMA | {"rope_scaling": {"rope_type": "yarn", "factor": 4.0}})


def test_rope_scaling_both_spellings():
    old = parse_config(LLAMA | {"rope_scaling": {"type": "linear", "factor": 2.0}})
    new = parse_config(LLAMA | {"rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 5e5}})
    assert old.rope_scaling == new.rope_scaling and new.rope_theta == 5e5


def test_llama3_scaling_fields():
    rs = parse_config(
        LLAMA | {"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                  "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}}
    ).rope_scaling
    assert (rs.rope_type, rs.factor, rs.original_max_position_embeddings) == ("llama3", 8.0, 8192)


def test_mistral_sliding_window_is_kept_qwen2_only_when_enabled():
    assert parse_config(LLAMA | {"model_type": "mistral", "sliding_window": 4096}).sliding_window == 4096
    assert parse_config(LLAMA | {"model_type": "qwen2", "sliding_window": 64}).sliding_window is None
    qwen = LLAMA | {"model_type": "qwen2", "sliding_window": 64, "use_sliding_window": True}
    assert parse_config(qwen).sliding_window == 64


def test_non_silu_activation_refused():
    with pytest.raises(OracleError, match="hidden_act 'gelu'"):
        parse_config(LLAMA | {"hidden_act": "gelu"})


def test_load_config_errors(tmp_path):
    with pytest.raises(OracleError, match="no config.json"):
        load_config(tmp_path)
    (tmp_path / "config.json").write_text("{oops")
    with pytest.raises(OracleError, match="not valid JSON"):
        load_config(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(LLAMA))
    assert load_config(tmp_path).num_hidden_layers == 2
