"""Config: the model's shape and constants, parsed from a checkpoint's config.json.

Every key the reference reads is strictly typed and range-checked before it is
used (`config_schema.json`, checked with jsonschema; the cross-field rules are
below): an integer is a JSON integer, a boolean a JSON boolean, a number a
finite JSON number. Required keys are required, `num_key_value_heads` and
`head_dim` are read explicitly, H % H_kv == 0 is checked, token ids lie in the
vocabulary, and unknown architectures or rope-scaling types are refused with an
error that names them. Unknown keys are ignored. Nothing is guessed from the
model's name. Sizes are checked against the tensors by reference.io.checkpoint.

(Length: every config.json key the model reads, with its cross-field checks (the per-key types and ranges are config_schema.json).)
"""

from __future__ import annotations

import functools
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from reference.errors import OracleError

# model_type -> whether q/k/v projections carry a bias by construction.
ARCHITECTURES = {"llama": False, "mistral": False, "qwen2": True}
ROPE_TYPES = ("default", "linear", "llama3")
SCHEMA_PATH = Path(__file__).with_name("config_schema.json")
MAX_JSON_BYTES = 64 * 2**20  # config / index / generation_config files are kilobytes; refuse absurd ones
ROPE_KEYS = ("rope_scaling", "rope_parameters")
NUMBER_KEYS = ("rms_norm_eps", "rope_theta")
ROPE_NUMBER_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "rope_theta")


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


# ---------------------------------------------------------------- reading JSON files


def show(value, limit: int = 80) -> str:
    """A value as it would read in the JSON file, shortened; safe for any Python value."""
    try:
        text = json.dumps(value, ensure_ascii=True, allow_nan=True)
    except (TypeError, ValueError, RecursionError):
        try:
            text = repr(value)
        except (ValueError, RecursionError):  # e.g. an integer too long to print
            text = f"<{type(value).__name__}>"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _reject_constant(name: str):
    raise ValueError(f"{name} is not valid JSON (JSON has no NaN or infinity)")


def read_json(path: Path, fix: str):
    """The parsed JSON of `path`: UTF-8, standard JSON only (no NaN), any failure an OracleError."""
    try:
        size = path.stat().st_size
        if size > MAX_JSON_BYTES:
            raise OracleError(f"{path}: is {size} bytes, far more than such a file holds (limit {MAX_JSON_BYTES}); {fix}")
        blob = path.read_bytes()
    except OSError as e:
        raise OracleError(f"{path}: cannot be read ({e.strerror or e}); {fix}") from None
    try:
        text = blob.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise OracleError(f"{path}: is not UTF-8 text (invalid byte at offset {e.start}); {fix}") from None
    try:
        return json.loads(text, parse_constant=_reject_constant)
    except json.JSONDecodeError as e:
        raise OracleError(f"{path}: not valid JSON ({e}); {fix}") from None
    except ValueError as e:  # NaN / Infinity, or an integer literal too long to convert
        raise OracleError(f"{path}: not valid JSON ({e}); {fix}") from None
    except RecursionError:
        raise OracleError(f"{path}: not valid JSON (nested too deeply); {fix}") from None


def check_token_ids(value, key: str, vocab_size: int, source: str, fix: str, allow_list: bool = True) -> tuple[int, ...]:
    """An eos-style value (null, an id, or a list of ids) as a tuple, each id in [0, vocab_size)."""
    ids = [] if value is None else value if isinstance(value, list) and allow_list else [value]
    for token in ids:
        if not (isinstance(token, int) and not isinstance(token, bool) and 0 <= token < vocab_size):
            what = " or a list of them" if allow_list else ""
            raise OracleError(
                f"{source}: {key} must be a token id (an integer in [0, {vocab_size}), the vocabulary){what}, "
                f"got {show(value)}; {fix}"
            )
    return tuple(ids)


# ---------------------------------------------------------------- the schema


@functools.lru_cache(maxsize=1)
def _validator():
    from jsonschema import Draft202012Validator, validators

    # JSON Schema's "integer" admits 8.0; config.json's integers must be written as integers.
    checker = Draft202012Validator.TYPE_CHECKER.redefine(
        "integer", lambda _checker, value: isinstance(value, int) and not isinstance(value, bool)
    )
    strict = validators.extend(Draft202012Validator, type_checker=checker)
    return strict(json.loads(SCHEMA_PATH.read_text()))


def _describe(raw: dict, path: list) -> tuple[str, str, object]:
    """(the key as dotted text, what it must be, its value) for the outermost described key on `path`."""
    schema = _validator().schema
    key = path[0]
    rope_props = schema["$defs"]["rope"]["properties"]
    if key in ROPE_KEYS and len(path) > 1 and path[1] in rope_props:
        return f"{key}.{path[1]}", rope_props[path[1]]["description"], raw[key][path[1]]
    return str(key), schema["properties"][key]["description"], raw[key]


def _check_schema(raw: dict, source: str) -> None:
    from jsonschema.exceptions import best_match

    error = best_match(_validator().iter_errors(raw))
    if error is None:
        return
    path = list(error.absolute_path)
    if error.validator == "required" and not path:
        missing = next(name for name in error.schema["required"] if name not in raw)
        raise OracleError(
            f"{source}: required key '{missing}' is missing; add it to config.json "
            f"(expected {_validator().schema['properties'][missing]['description']})"
        )
    key, description, value = _describe(raw, path)
    bound = f" at most {error.validator_value}" if error.validator == "maximum" and isinstance(value, int) else ""
    raise OracleError(f"{source}: {key} must be {description}{bound}, got {show(value)}; fix it in config.json")


def _check_finite(raw: dict, source: str) -> None:
    """NaN passes JSON Schema's comparisons; refuse it (and infinities) in every number we read."""
    found = [(k, raw[k]) for k in NUMBER_KEYS if k in raw]
    for rope in ROPE_KEYS:
        if isinstance(raw.get(rope), dict):
            found += [(f"{rope}.{k}", raw[rope][k]) for k in ROPE_NUMBER_KEYS if k in raw[rope]]
    for key, value in found:
        if isinstance(value, float) and not math.isfinite(value):
            raise OracleError(f"{source}: {key} must be a finite number, got {show(value)}; fix it in config.json")


# ---------------------------------------------------------------- parsing


def _parse_rope_scaling(raw: dict, source: str) -> RopeScaling:
    # transformers >= 5 writes `rope_parameters`; older files write `rope_scaling`.
    key = "rope_parameters" if raw.get("rope_parameters") else "rope_scaling"
    scaling = raw.get(key)
    if not scaling:
        return RopeScaling()
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type not in ROPE_TYPES:
        raise OracleError(
            f"{source}: rope scaling type {rope_type!r} is not supported (in {key}); "
            f"supported: {', '.join(ROPE_TYPES)}; fix config.json or use another checkpoint"
        )
    if rope_type == "default":
        return RopeScaling()
    if "factor" not in scaling:
        raise OracleError(
            f"{source}: rope scaling '{rope_type}' needs a positive 'factor' ({key}.factor is missing); "
            "add it to config.json"
        )
    factor = float(scaling["factor"])
    if rope_type == "linear":
        return RopeScaling("linear", factor)
    low = float(scaling.get("low_freq_factor", 1.0))
    high = float(scaling.get("high_freq_factor", 4.0))
    if not high > low:
        raise OracleError(
            f"{source}: {key}.high_freq_factor ({show(high)}) must be greater than {key}.low_freq_factor "
            f"({show(low)}) for llama3 rope scaling; fix config.json"
        )
    return RopeScaling("llama3", factor, low, high, scaling.get("original_max_position_embeddings", 8192))


def _rope_theta(raw: dict) -> float:
    params = raw.get("rope_parameters") or {}
    return float(params.get("rope_theta", raw.get("rope_theta", 10000.0)))


def _sliding_window(raw: dict, model_type: str) -> int | None:
    window = raw.get("sliding_window")
    if model_type == "qwen2" and not raw.get("use_sliding_window", False):
        return None
    if model_type == "llama" or window is None:
        return None
    return window


def parse_config(raw: dict, source: str = "config.json") -> Config:
    """Build a Config from the parsed JSON of a config.json, checking every field it reads."""
    if not isinstance(raw, dict):
        raise OracleError(f"{source}: expected a JSON object {{...}}, got {show(raw)}; fix config.json")
    model_type = raw.get("model_type")
    if isinstance(model_type, str) and model_type not in ARCHITECTURES:
        raise OracleError(
            f"{source}: model_type {model_type!r} is not supported; supported: {', '.join(ARCHITECTURES)} "
            "(fix model_type in config.json if it is misspelt, or use a checkpoint of these architectures)"
        )
    try:
        _check_schema(raw, source)
    except RecursionError:
        raise OracleError(f"{source}: a value is nested too deeply to check; fix config.json") from None
    _check_finite(raw, source)
    act = raw.get("hidden_act", "silu")
    if act != "silu":
        raise OracleError(f"{source}: hidden_act {act!r} is not supported; only 'silu' (SwiGLU); "
                          "use a checkpoint with hidden_act \"silu\"")
    if raw.get("mlp_bias", False):
        raise OracleError(f"{source}: mlp_bias=true is not supported by this reference; "
                          "use a checkpoint without MLP biases")

    H = raw["num_attention_heads"]
    H_kv = raw.get("num_key_value_heads", H)
    if H % H_kv:
        raise OracleError(
            f"{source}: num_attention_heads ({H}) must be a multiple of num_key_value_heads ({H_kv}); "
            "fix config.json"
        )
    D, V = raw["hidden_size"], raw["vocab_size"]
    head_dim = raw.get("head_dim")
    if head_dim is None:
        head_dim = D // H
        if head_dim == 0:
            raise OracleError(
                f"{source}: head_dim is absent and hidden_size // num_attention_heads = {D} // {H} = 0; "
                "add head_dim to config.json"
            )
    if head_dim % 2:
        raise OracleError(
            f"{source}: head_dim must be even for rotary embedding, got {head_dim}; fix head_dim in config.json"
        )
    fix = "fix it in config.json"
    bos = raw.get("bos_token_id")
    if bos is not None:
        check_token_ids(bos, "bos_token_id", V, source, fix, allow_list=False)

    return Config(
        model_type=raw["model_type"],
        vocab_size=V,
        hidden_size=D,
        intermediate_size=raw["intermediate_size"],
        num_hidden_layers=raw["num_hidden_layers"],
        num_attention_heads=H,
        num_key_value_heads=H_kv,
        head_dim=head_dim,
        rms_norm_eps=float(raw["rms_norm_eps"]),
        rope_theta=_rope_theta(raw),
        max_position_embeddings=raw["max_position_embeddings"],
        tie_word_embeddings=raw.get("tie_word_embeddings", False),
        attention_bias=ARCHITECTURES[raw["model_type"]] or raw.get("attention_bias", False),
        rope_scaling=_parse_rope_scaling(raw, source),
        sliding_window=_sliding_window(raw, raw["model_type"]),
        bos_token_id=bos,
        eos_token_ids=check_token_ids(raw.get("eos_token_id"), "eos_token_id", V, source, fix),
    )


def load_config(model_dir: str | Path) -> Config:
    """Read and check `model_dir/config.json`."""
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise OracleError(f"{model_dir}: no config.json; is this a Hugging Face checkpoint directory?")
    raw = read_json(path, "fix or re-download config.json")
    if not isinstance(raw, dict):
        raise OracleError(f"{path}: expected a JSON object {{...}}, got {show(raw)}; fix config.json")
    return parse_config(raw, str(path))
