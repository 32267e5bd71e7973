"""Config: the model's shape and constants, parsed from a checkpoint's config.json.

Every key the reference reads is strictly typed and range-checked before it is
used (`config_schema.json`, checked with jsonschema; the cross-field rules are
below): an integer is a JSON integer, a boolean a JSON boolean, a number a
finite JSON number. Required keys are required, `num_key_value_heads` and
`head_dim` are read explicitly, H % H_kv == 0 is checked, token ids lie in the
vocabulary, and unknown architectures or rope-scaling types are refused with an
error that names them. Keys the reference does not implement but that would
change the maths (partial rotary embedding, Qwen3's sliding-window layers, a
Phi-3 rope type transformers and llama.cpp read differently, ...) are refused by
name; other unknown keys (dropout rates, pad ids, transformers' bookkeeping) are
ignored. Nothing is guessed from the model's name. Sizes are checked against
the tensors by reference.io.checkpoint. docs/models.md states what each family
(llama, mistral, qwen2, qwen3, phi3) adds to the maths.

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
ARCHITECTURES = {"llama": False, "mistral": False, "qwen2": True, "qwen3": False, "phi3": False}
ROPE_TYPES = ("default", "linear", "llama3", "longrope")
SCHEMA_PATH = Path(__file__).with_name("config_schema.json")
MAX_JSON_BYTES = 64 * 2**20  # config / index / generation_config files are kilobytes; refuse absurd ones
ROPE_KEYS = ("rope_scaling", "rope_parameters")
NUMBER_KEYS = ("rms_norm_eps", "rope_theta", "partial_rotary_factor")
ROPE_NUMBER_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "rope_theta", "attention_factor",
                    "partial_rotary_factor")
QWEN3_HEAD_DIM = 128  # transformers' Qwen3Config default when config.json has no head_dim
PHI3_ORIGINAL_MAX = 4096  # transformers' Phi3Config default original_max_position_embeddings


@dataclass(frozen=True)
class RopeScaling:
    """How rotary frequencies are rescaled for long contexts (HF's `rope_scaling`)."""

    rope_type: str = "default"  # one of ROPE_TYPES
    factor: float = 1.0  # linear, llama3; longrope: the context extension (max / original max), used for the attention factor
    low_freq_factor: float = 1.0  # llama3 only
    high_freq_factor: float = 4.0  # llama3 only
    original_max_position_embeddings: int = 8192  # llama3, longrope
    short_factor: tuple[float, ...] = ()  # longrope: one per rotary frequency (head_dim / 2), for runs <= original max
    long_factor: tuple[float, ...] = ()  # longrope: the same, for runs past the original max
    attention_factor: float = 1.0  # longrope: cos and sin are multiplied by it


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
    attention_bias: bool  # q/k/v (and, for llama and qwen3, o) projections have a bias
    rope_scaling: RopeScaling = field(default_factory=RopeScaling)
    sliding_window: int | None = None  # Mistral / Qwen2 / Phi-3 sliding-window attention, if active
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()

    @property
    def group_size(self) -> int:
        """G = H / H_kv: query heads that share one key/value head."""
        return self.num_attention_heads // self.num_key_value_heads

    @property
    def o_proj_bias(self) -> bool:
        """Llama (and Qwen3) put a bias on o_proj when attention_bias is set; Qwen2 never does."""
        return self.attention_bias and self.model_type != "qwen2"

    @property
    def qk_norm(self) -> bool:
        """Qwen3: an RMSNorm of size head_dim on every query and key head, before rotary embedding."""
        return self.model_type == "qwen3"

    @property
    def fused_projections(self) -> bool:
        """Phi-3: q/k/v stored as one qkv_proj and gate/up as one gate_up_proj (split once when loaded)."""
        return self.model_type == "phi3"


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


class _NonStandardConstant(ValueError):
    """NaN, Infinity or -Infinity in a JSON text (Python's json writes them for non-finite floats)."""


def _reject_constant(name: str):
    raise _NonStandardConstant(name)


class _Constant:
    """Stands for a NaN / Infinity literal while the document is parsed again to find where it is."""

    def __init__(self, name: str):
        self.name = name


def _constant_path(value, path: str = "") -> tuple[str, str] | None:
    """(the key holding the first NaN / Infinity, as `a.b[2]`, and the literal) in document order, or None."""
    stack = [(value, path)]
    while stack:
        node, where = stack.pop()
        if isinstance(node, _Constant):
            return where, node.name
        if isinstance(node, dict):
            stack.extend(reversed([(v, f"{where}.{k}" if where else str(k)) for k, v in node.items()]))
        elif isinstance(node, list):
            stack.extend(reversed([(v, f"{where}[{i}]") for i, v in enumerate(node)]))
    return None


def _constant_error(path: Path, text: str, name: str, fix: str) -> OracleError:
    """NaN / Infinity named by the key that holds it: Python's json.dump writes these tokens and transformers
    reads them, but they are not JSON, and no number the model reads may be non-finite."""
    try:
        found = _constant_path(json.loads(text, parse_constant=_Constant))
    except (ValueError, RecursionError):
        found = None
    where, literal = found if found is not None else ("", name)
    holder = f"{where} holds" if where else "the top-level value is" if found is not None else "a value is"
    return OracleError(
        f"{path}: {holder} {literal}, which is not valid JSON (JSON has no NaN or infinity; Python's json writes "
        f"them for non-finite floats): write a finite number; {fix}"
    )


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
    except _NonStandardConstant as e:
        raise _constant_error(path, text, str(e), fix) from None
    except ValueError as e:  # an integer literal too long to convert
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


def _original_max(raw: dict, scaling: dict, key: str, source: str, model_type: str) -> int:
    """original_max_position_embeddings as transformers 5 reads it for llama3 / longrope rope scaling.

    A top-level key wins over the one inside the rope dict (transformers' `standardize_rope_params`); Phi-3's
    config class always has one (4096 when absent). The two disagreeing is refused rather than resolved
    silently; with neither, it is max_position_embeddings.
    """
    inner = scaling.get("original_max_position_embeddings")
    top, note = raw.get("original_max_position_embeddings"), ""
    if top is None and model_type == "phi3":
        top, note = PHI3_ORIGINAL_MAX, " (absent, so transformers' Phi3Config default)"
    if top is None:
        return inner if inner is not None else raw["max_position_embeddings"]
    if inner is not None and inner != top:
        raise OracleError(
            f"{source}: original_max_position_embeddings is {top}{note} but {key}.original_max_position_embeddings "
            f"is {inner}; transformers uses the top-level value, so the file says two things: make them agree "
            "(or remove one) in config.json"
        )
    return top


def _factor_list(scaling: dict, key: str, name: str, head_dim: int, theta: float, max_pos: int,
                 source: str) -> tuple[float, ...]:
    """longrope's short_factor / long_factor: head_dim / 2 positive numbers that leave every angle finite."""
    values, n = scaling.get(name), head_dim // 2
    if values is None:
        raise OracleError(f"{source}: longrope rope scaling needs {key}.{name}, a list of head_dim / 2 = {n} positive "
                          "numbers (one per rotary frequency); add it to config.json")
    if len(values) != n:
        raise OracleError(
            f"{source}: {key}.{name} has {len(values)} entries, but longrope needs head_dim / 2 = {n} "
            f"(one per rotary frequency, head_dim = {head_dim}); fix {key}.{name} (or head_dim) in config.json"
        )
    for i, v in enumerate(values):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
            raise OracleError(f"{source}: {key}.{name}[{i}] must be a positive finite number (rotary frequency {i} is "
                              f"divided by it), got {show(v)}; fix it in config.json")
        scaled = float(v) * theta ** (2 * i / head_dim)  # theta >= 1 and the exponent < 1: no overflow in **
        if scaled == 0.0 or not math.isfinite(max_pos / scaled):
            raise OracleError(f"{source}: {key}.{name}[{i}] = {show(v)} is so small that rotary frequency {i} "
                              f"overflows at position {max_pos}; fix it in config.json")
    return tuple(float(v) for v in values)


def _parse_longrope(raw: dict, scaling: dict, key: str, source: str, model_type: str, head_dim: int,
                    theta: float) -> RopeScaling:
    """Phi-3's LongRoPE, as transformers' `_compute_longrope_parameters` reads it (docs/models.md)."""
    orig = _original_max(raw, scaling, key, source, model_type)
    max_pos = raw["max_position_embeddings"]
    short = _factor_list(scaling, key, "short_factor", head_dim, theta, max_pos, source)
    long = _factor_list(scaling, key, "long_factor", head_dim, theta, max_pos, source)
    factor = float(scaling["factor"]) if scaling.get("factor") is not None else max_pos / orig
    attention = scaling.get("attention_factor")
    if attention is None:
        if factor <= 1.0:
            attention = 1.0
        elif orig < 2:
            raise OracleError(
                f"{source}: original_max_position_embeddings is {orig}, but longrope's attention factor "
                f"sqrt(1 + ln(factor) / ln(original_max_position_embeddings)) divides by its logarithm; "
                "fix original_max_position_embeddings in config.json"
            )
        else:
            attention = math.sqrt(1.0 + math.log(factor) / math.log(orig))
    return RopeScaling("longrope", factor, original_max_position_embeddings=orig, short_factor=short,
                       long_factor=long, attention_factor=float(attention))


def _rope_type(scaling: dict, key: str, source: str, model_type: str) -> str:
    """The rope type, with transformers' spellings ("type", Phi-3's "su") and the family's allowed types."""
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if model_type == "phi3":
        if rope_type == "su":  # Phi-3's first configs; transformers' Phi3Config reads it as longrope
            return "longrope"
        if rope_type == "yarn":
            raise OracleError(
                f"{source}: {key} type 'yarn' on phi3 is ambiguous: transformers' Phi3Config reads it as longrope, "
                "llama.cpp as YaRN (another attention factor); write \"longrope\" in config.json if that is meant"
            )
        if rope_type not in ("default", "longrope"):
            raise OracleError(
                f"{source}: rope scaling type {rope_type!r} is not supported for phi3 (in {key}); transformers' "
                "Phi3Config accepts default or longrope only; fix config.json"
            )
    elif rope_type == "longrope":
        raise OracleError(
            f"{source}: rope scaling type 'longrope' is supported for phi3 only (in {key}): for other families "
            "transformers keeps the cache when a generation crosses original_max_position_embeddings, so keys "
            "rotated with both factor sets would mix; use a phi3 checkpoint or another rope type"
        )
    if rope_type not in ROPE_TYPES:
        raise OracleError(
            f"{source}: rope scaling type {rope_type!r} is not supported (in {key}); "
            f"supported: {', '.join(ROPE_TYPES)}; fix config.json or use another checkpoint"
        )
    return rope_type


def _parse_rope_scaling(raw: dict, source: str, model_type: str, head_dim: int, theta: float) -> RopeScaling:
    # transformers >= 5 writes `rope_parameters`; older files write `rope_scaling`.
    key = "rope_parameters" if raw.get("rope_parameters") else "rope_scaling"
    scaling = raw.get(key)
    if not scaling:
        return RopeScaling()
    rope_type = _rope_type(scaling, key, source, model_type)
    if rope_type == "default":
        return RopeScaling()
    if rope_type == "longrope":
        return _parse_longrope(raw, scaling, key, source, model_type, head_dim, theta)
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
    return RopeScaling("llama3", factor, low, high, _original_max(raw, scaling, key, source, model_type))


def _rope_theta(raw: dict) -> float:
    params = raw.get("rope_parameters") or {}
    return float(params.get("rope_theta", raw.get("rope_theta", 10000.0)))


def _check_partial_rotary(raw: dict, head_dim: int, source: str) -> None:
    """partial_rotary_factor (top level or in the rope dict): only 1.0, every dimension rotated, is implemented."""
    places = [("", raw)] + [(f"{k}.", raw[k]) for k in ROPE_KEYS if isinstance(raw.get(k), dict)]
    for prefix, where in places:
        value = where.get("partial_rotary_factor")
        if value is not None and value != 1:
            raise OracleError(
                f"{source}: {prefix}partial_rotary_factor is {show(value)}: partial rotary embedding (only the first "
                f"{int(head_dim * value)} of head_dim = {head_dim} dimensions rotated) is not implemented by this "
                "reference; use a checkpoint that rotates every dimension"
            )


def _sliding_window(raw: dict, model_type: str) -> int | None:
    window = raw.get("sliding_window")
    if model_type in ("qwen2", "qwen3") and not raw.get("use_sliding_window", False):
        return None
    if model_type == "llama" or window is None:
        return None
    return window


def _check_qwen3_layers(raw: dict, source: str) -> None:
    """Qwen3's sliding-window layers are refused by name: the reference attends over every token."""
    if raw.get("use_sliding_window", False):
        raise OracleError(
            f"{source}: use_sliding_window is true: Qwen3's sliding-window layers (from max_window_layers on) are "
            "not implemented by this reference, which attends over every cached token; released Qwen3 dense "
            "models set it to false"
        )
    layer_types = raw.get("layer_types")
    if layer_types is None:
        return
    L = raw["num_hidden_layers"]
    if len(layer_types) != L:
        raise OracleError(f"{source}: layer_types has {len(layer_types)} entries, but num_hidden_layers is {L}; "
                          "give one per layer (or remove layer_types) in config.json")
    for i, kind in enumerate(layer_types):
        if kind != "full_attention":
            raise OracleError(
                f"{source}: layer_types[{i}] is {show(kind)}: only \"full_attention\" layers are implemented by this "
                "reference (Qwen3's sliding-window layers are not); fix layer_types in config.json"
            )


def _head_dim(raw: dict, model_type: str, D: int, H: int, source: str) -> int:
    """head_dim: explicit, else D // H (Qwen3: transformers' default 128); Phi-3's must be D // H."""
    head_dim = raw.get("head_dim")
    if model_type == "qwen3":
        if "head_dim" in raw and head_dim is None:
            raise OracleError(f"{source}: head_dim is null, which transformers' Qwen3Config refuses (an absent head_dim "
                              f"means {QWEN3_HEAD_DIM}); write head_dim as an integer in config.json")
        head_dim = raw.get("head_dim", QWEN3_HEAD_DIM)
    if model_type == "phi3" and head_dim is not None and head_dim != D // H:
        raise OracleError(
            f"{source}: head_dim is {head_dim}, but phi3's must be hidden_size // num_attention_heads = {D} // {H} "
            f"= {D // H} (transformers' Phi3 and llama.cpp size the rotary factors from it); fix or remove head_dim "
            "in config.json"
        )
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
    return head_dim


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
    if model_type == "phi3" and raw.get("attention_bias", False):
        raise OracleError(f"{source}: attention_bias is true, but phi3 has no attention biases (transformers' "
                          "Phi3Attention ignores the key); set it to false or remove it from config.json")
    if model_type == "qwen3":
        _check_qwen3_layers(raw, source)

    H = raw["num_attention_heads"]
    H_kv = raw.get("num_key_value_heads", H)
    if H % H_kv:
        raise OracleError(
            f"{source}: num_attention_heads ({H}) must be a multiple of num_key_value_heads ({H_kv}); "
            "fix config.json"
        )
    D, V = raw["hidden_size"], raw["vocab_size"]
    head_dim = _head_dim(raw, model_type, D, H, source)
    _check_partial_rotary(raw, head_dim, source)
    fix = "fix it in config.json"
    bos = raw.get("bos_token_id")
    if bos is not None:
        check_token_ids(bos, "bos_token_id", V, source, fix, allow_list=False)
    theta = _rope_theta(raw)

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
        rope_theta=theta,
        max_position_embeddings=raw["max_position_embeddings"],
        tie_word_embeddings=raw.get("tie_word_embeddings", False),
        attention_bias=ARCHITECTURES[raw["model_type"]] or raw.get("attention_bias", False),
        rope_scaling=_parse_rope_scaling(raw, source, model_type, head_dim, theta),
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
