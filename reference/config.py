"""Config: the model's shape and constants, parsed from a checkpoint's config.json.

Required keys are required, `num_key_value_heads` and `head_dim` are read
explicitly, H % H_kv == 0 is checked, and unknown architectures or rope-scaling
types are refused with an error that names them. Nothing is guessed from the
model's name.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from reference.errors import OracleError

# model_type -> whether q/k/v projections carry a bias by construction.
ARCHITECTURES = {"llama": False, "mistral": False, "qwen2": True}
ROPE_TYPES = ("default", "linear", "llama3")


@dataclass(frozen=True)
class RopeScaling:
    """How rotary frequencies are rescaled for long contexts (HF's `rope_scaling`)."""

    rope_type: str = "default"  # one of ROPE_TYPES
    factor: float = 1.0
    low_freq_factor: float = 1.0  # llama3 only
    high_freq_factor: float = 4.0  # llama3 only
    original_max_position_embeddings: int = 8192  # llama3 only


@dataclass(frozen=True)
class Config:
    """Shapes and constants of one checkpoint; symbols as in docs/shapes.md."""

    model_type: str
    vocab_size: int  # V
    hidden_size: int  # D
    intermediate_size: int  # F, the MLP width
    num_hidden_layers: int  # L
    num_attention_heads: int  # H (n_q)
    num_key_value_heads: int  # H_kv (n_kv)
    head_dim: int  # d (hd)
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool  # q/k/v (and, for llama, o) projections have a bias
    rope_scaling: RopeScaling = field(default_factory=RopeScaling)
    sliding_window: int | None = None  # Mistral / Qwen2 sliding-window attention, if active
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()

    @property
    def group_size(self) -> int:
        """G = H / H_kv: query heads that share one key/value head."""
        return self.num_attention_heads // self.num_key_value_heads

    @property
    def o_proj_bias(self) -> bool:
        """Llama puts a bias on o_proj when attention_bias is set; Qwen2 never does."""
        return self.attention_bias and self.model_type != "qwen2"


def _require(raw: dict, key: str, kind: type, source: str):
    if key not in raw:
        raise OracleError(f"{source}: required key '{key}' is missing; add it to config.json")
    value = raw[key]
    if kind is int and not (isinstance(value, int) and not isinstance(value, bool)):
        raise OracleError(f"{source}: '{key}' must be an integer, got {value!r}")
    if kind is float and not isinstance(value, (int, float)):
        raise OracleError(f"{source}: '{key}' must be a number, got {value!r}")
    return kind(value)


def _positive(value: int, key: str, source: str) -> int:
    if value <= 0:
        raise OracleError(f"{source}: '{key}' must be positive, got {value}")
    return value


def _parse_rope_scaling(raw: dict, source: str) -> RopeScaling:
    # transformers >= 5 writes `rope_parameters`; older files write `rope_scaling`.
    scaling = raw.get("rope_parameters") or raw.get("rope_scaling")
    if not scaling:
        return RopeScaling()
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type not in ROPE_TYPES:
        raise OracleError(
            f"{source}: rope scaling type '{rope_type}' is not supported; "
            f"supported: {', '.join(ROPE_TYPES)}"
        )
    if rope_type == "default":
        return RopeScaling()
    factor = float(scaling.get("factor", 0.0))
    if not factor > 0.0:
        raise OracleError(f"{source}: rope scaling '{rope_type}' needs a positive 'factor'")
    if rope_type == "linear":
        return RopeScaling("linear", factor)
    return RopeScaling(
        "llama3",
        factor,
        float(scaling.get("low_freq_factor", 1.0)),
        float(scaling.get("high_freq_factor", 4.0)),
        int(scaling.get("original_max_position_embeddings", 8192)),
    )


def _rope_theta(raw: dict) -> float:
    params = raw.get("rope_parameters") or {}
    return float(params.get("rope_theta", raw.get("rope_theta", 10000.0)))


def _sliding_window(raw: dict, model_type: str) -> int | None:
    window = raw.get("sliding_window")
    if model_type == "qwen2" and not raw.get("use_sliding_window", False):
        return None
    if model_type == "llama" or window is None:
        return None
    return int(window)


def _eos_ids(raw) -> tuple[int, ...]:
    if raw is None:
        return ()
    return tuple(raw) if isinstance(raw, list) else (int(raw),)


def parse_config(raw: dict, source: str = "config.json") -> Config:
    """Build a Config from the parsed JSON of a config.json, checking every field."""
    model_type = raw.get("model_type")
    if model_type not in ARCHITECTURES:
        raise OracleError(
            f"{source}: model_type {model_type!r} is not supported; "
            f"supported: {', '.join(ARCHITECTURES)}"
        )
    act = raw.get("hidden_act", "silu")
    if act != "silu":
        raise OracleError(f"{source}: hidden_act {act!r} is not supported; only 'silu' (SwiGLU)")
    if raw.get("mlp_bias", False):
        raise OracleError(f"{source}: mlp_bias=true is not supported by this reference")

    H = _positive(_require(raw, "num_attention_heads", int, source), "num_attention_heads", source)
    H_kv = _positive(int(raw.get("num_key_value_heads", H)), "num_key_value_heads", source)
    if H % H_kv:
        raise OracleError(
            f"{source}: num_attention_heads ({H}) must be a multiple of num_key_value_heads ({H_kv})"
        )
    D = _positive(_require(raw, "hidden_size", int, source), "hidden_size", source)
    head_dim = raw.get("head_dim") or D // H
    if head_dim % 2:
        raise OracleError(f"{source}: head_dim must be even for rotary embedding, got {head_dim}")

    eps = _require(raw, "rms_norm_eps", float, source)
    if not (math.isfinite(eps) and eps > 0):
        raise OracleError(f"{source}: rms_norm_eps must be a positive number, got {eps}")

    return Config(
        model_type=model_type,
        vocab_size=_positive(_require(raw, "vocab_size", int, source), "vocab_size", source),
        hidden_size=D,
        intermediate_size=_positive(
            _require(raw, "intermediate_size", int, source), "intermediate_size", source
        ),
        num_hidden_layers=_positive(
            _require(raw, "num_hidden_layers", int, source), "num_hidden_layers", source
        ),
        num_attention_heads=H,
        num_key_value_heads=H_kv,
        head_dim=int(head_dim),
        rms_norm_eps=eps,
        rope_theta=_rope_theta(raw),
        max_position_embeddings=_positive(
            _require(raw, "max_position_embeddings", int, source), "max_position_embeddings", source
        ),
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
        attention_bias=ARCHITECTURES[model_type] or bool(raw.get("attention_bias", False)),
        rope_scaling=_parse_rope_scaling(raw, source),
        sliding_window=_sliding_window(raw, model_type),
        bos_token_id=raw.get("bos_token_id"),
        eos_token_ids=_eos_ids(raw.get("eos_token_id")),
    )


def load_config(model_dir: str | Path) -> Config:
    """Read and check `model_dir/config.json`."""
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise OracleError(f"{model_dir}: no config.json; is this a Hugging Face checkpoint directory?")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise OracleError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(raw, dict):
        raise OracleError(f"{path}: expected a JSON object")
    return parse_config(raw, str(path))
