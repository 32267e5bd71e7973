"""Convert a llama.cpp GGUF file (architecture ``llama``, ``qwen2``, ``qwen3`` or
``phi3``) into a Hugging Face-layout directory: ``model.safetensors`` (float32), ``config.json``,
``tokenizer.json``, ``tokenizer_config.json`` and ``generation_config.json``.

The conversion happens once, here, so that the rest of the reference only ever
sees HF layout (half-split rotary embedding, HF tensor names).

What llama.cpp changes, and how it is undone
--------------------------------------------
* Quantisation: every tensor is dequantized with ``gguf.quants.dequantize``
  and kept in float32, so the values are exactly the dequantized ones.
* Shape: GGUF lists dimensions innermost first, so the dequantized array of a
  GGUF ``[in, out]`` tensor is already HF's ``(out, in)``; we reshape to
  ``reversed(tensor.shape)`` explicitly.
* Rotary rows of q and k: llama.cpp's ``convert_hf_to_gguf.py`` has
  ``LlamaModel.modify_tensors`` call ``LlamaModel.permute`` on ``q_proj``
  (with ``n_head``) and ``k_proj`` (with ``n_head_kv``), weights *and* biases::

      w.reshape(n_head, 2, rows // n_head // 2, *rest).swapaxes(1, 2)

  i.e. per head it views the rows as ``(2, hd/2)`` and transposes them to
  ``(hd/2, 2)`` (interleaved rotary pairs). ``Qwen2Model.modify_tensors`` does
  no such thing: it only renames and defers to ``TextModel.modify_tensors``
  (checked in llama.cpp's converter and in transformers' GGUF loader, whose
  ``TENSOR_PROCESSORS`` reverse-permutes only for ``llama``). So we undo the
  permutation for ``llama`` only, and use ``n_head_kv`` for k: grouping k by
  the query head count is a silent bug (plausible logits, much worse loss).
  ``Qwen3Model`` (a ``Qwen2Model``) and ``Phi3MiniModel`` do not permute either
  (llama.cpp runs both with NEOX, i.e. half-split, rotary); Qwen3's per-head
  norms are ``attn_q_norm`` / ``attn_k_norm``.
* Phi-3's fused tensors: ``attn_qkv`` is HF's ``qkv_proj`` and ``ffn_up`` is
  HF's fused ``gate_up_proj`` (2·F rows, gate first; there is no ``ffn_gate``).
  They stay fused here, as in an HF Phi-3 checkpoint; the loader splits them.
* Phi-3's LongRoPE: the factor lists are the tensors ``rope_factors_long`` and
  ``rope_factors_short`` (no rope.scaling.type key is written), the
  pre-training length is ``phi3.rope.scaling.original_context_length`` and the
  attention factor ``phi3.rope.scaling.attn_factor``, which the converter
  computes as sqrt(1 + ln(s) / ln(original)), s = context / original, as
  transformers does when the config gives no ``factor``: when the stored value
  is that formula's (in float32), config.json leaves it to be recomputed,
  otherwise it is written as ``attention_factor``. ``phi3.attention.sliding_window``
  = 0 means none. The head size is always embedding_length / head_count.

Hostile or damaged files
------------------------
Every metadata value is checked before it is used: counts must be integers in
range (never a float, a string or a bool), token ids must lie inside the
vocabulary, texts must be valid UTF-8, and the counts must agree with the
tensors actually present (``block_count`` with the ``blk.N`` tensors,
``embedding_length`` and the head counts with the tensor shapes) *before*
anything loops over them or allocates. A failed import, whatever the cause,
removes its staging directory; staging directories left by killed imports
(same host, process gone) are removed by the next import into the same
place.

(Length: one converter: metadata checks, tensor dequantization and layout, and the tokenizer, for one file format.)
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import socket
import uuid
from pathlib import Path
from typing import Any

import gguf
import numpy as np
from safetensors.numpy import save_file
from tokenizers import (
    AddedToken,
    Regex,
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    processors,
)
from tqdm import tqdm

from reference.errors import OracleError
from reference.model.config import parse_config
from reference.model.weights import expected_tensors

ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM",
                 "phi3": "Phi3ForCausalLM"}

# GGUF tensor name -> HF tensor name.
GLOBAL_TENSORS = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
BLOCK_TENSORS = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.bias": "self_attn.o_proj.bias",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
    "attn_q_norm.weight": "self_attn.q_norm.weight",  # qwen3
    "attn_k_norm.weight": "self_attn.k_norm.weight",  # qwen3
    "attn_qkv.weight": "self_attn.qkv_proj.weight",  # phi3
}
# Where an architecture's block tensor means something else: Phi-3's ffn_up holds gate and up.
ARCH_BLOCK_TENSORS = {"phi3": {"ffn_up.weight": "mlp.gate_up_proj.weight"}}
ROPE_FACTOR_TENSORS = {"rope_factors_long.weight": "long_factor", "rope_factors_short.weight": "short_factor"}
_BLOCK_NAME = re.compile(r"blk\.(0|[1-9][0-9]{0,8})\.(.+)")  # a block index as llama.cpp writes it

# Pre-tokenizer regexes as the original HF tokenizer.json files spell them
# (llama.cpp's src/llama-vocab.cpp carries the same ones, case-folding spelled out).
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# llama.cpp's "default" marks a file whose pre-tokenizer it did not recognise; it is refused
# rather than guessed, since a wrong split gives plausible but different token ids.
SUPPORTED_PRE = ("smollm", "gpt2", "llama-bpe", "qwen2")

OUTPUT_FILES = (
    "model.safetensors",
    "config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "generation_config.json",
)


# ----------------------------------------------------------------------------
# reading the file
# ----------------------------------------------------------------------------


def open_gguf(path: Path) -> gguf.GGUFReader:
    """Open ``path`` as GGUF, or raise OracleError saying why it is not one."""
    if not path.is_file():
        raise OracleError(f"{path}: no such file; pass the path of a .gguf file")
    try:
        reader = gguf.GGUFReader(path, "r")
    except Exception as e:  # the reader raises whatever a damaged header makes numpy or struct raise
        raise OracleError(f"{path}: not a readable GGUF file ({_one_line(e)}); pass a llama.cpp .gguf file") from None
    if reader.byte_order != "I":
        raise OracleError(f"{path}: big-endian GGUF files are not supported; use a little-endian conversion")
    return reader


FIX = ("the file is damaged or not a llama.cpp conversion; "
       "convert the model again with llama.cpp's convert_hf_to_gguf.py")
MAX_COUNT = 2**31 - 1  # llama.cpp keeps counts and ids in 32-bit integers
_MISSING = object()


def _one_line(e: BaseException, limit: int = 300) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _show(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def read_metadata(reader: gguf.GGUFReader, path: Path | None = None) -> dict[str, Any]:
    """All key/value metadata of the file as plain Python values (OracleError naming a key that cannot be read)."""
    meta = {}
    for name, field in reader.fields.items():
        if name.startswith("GGUF."):
            continue
        try:
            meta[name] = field.contents()
        except UnicodeDecodeError as e:
            raise OracleError(f"{path}: GGUF metadata {name} holds text that is not valid UTF-8 "
                              f"(byte 0x{e.object[e.start]:02x}); {FIX}") from None
        except Exception as e:
            raise OracleError(f"{path}: GGUF metadata {name} cannot be read ({_one_line(e)}); {FIX}") from None
    return meta


def _required(meta: dict[str, Any], key: str, path: Path) -> Any:
    """``meta[key]``, or OracleError naming the missing key."""
    if key not in meta:
        raise OracleError(f"{path}: GGUF metadata key {key!r} is missing; the file is not a complete llama.cpp conversion")
    return meta[key]


def _bad(path: Path, key: str, value: Any, what: str) -> OracleError:
    return OracleError(f"{path}: GGUF metadata {key} = {_show(value)} {what}; {FIX}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _int(meta: dict[str, Any], key: str, path: Path, *, default: Any = _MISSING, minimum: int = 1,
         maximum: int = MAX_COUNT, per_layer: bool = False) -> int:
    """An integer metadata value in [minimum, maximum]; ``per_layer``: GGUF may store one per layer, all equal."""
    value = _required(meta, key, path) if default is _MISSING else meta.get(key, default)
    if per_layer and isinstance(value, list):
        if not value or not all(_is_int(v) for v in value):
            raise _bad(path, key, value, "is not a list of integers")
        if len(set(value)) != 1:
            raise OracleError(f"{path}: {key} differs between layers ({sorted(set(value))[:8]}); "
                              "only uniform layers are supported")
        value = value[0]
    if not _is_int(value):
        raise _bad(path, key, value, "is not an integer")
    if not minimum <= value <= maximum:
        raise _bad(path, key, value, f"is out of range (expected {minimum} to {maximum})")
    return value


def _uniform(value: Any, key: str, path: Path) -> int:
    """A per-model integer that GGUF may also store as one value per layer."""
    return _int({key: value}, key, path, per_layer=True)


def _float(meta: dict[str, Any], key: str, path: Path, default: Any = _MISSING) -> float:
    """A positive, finite number."""
    value = _required(meta, key, path) if default is _MISSING else meta.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise _bad(path, key, value, "is not a positive finite number")
    with np.errstate(over="ignore"):
        as_float32 = np.float32(value)
    if not math.isfinite(as_float32):
        raise _bad(path, key, value, "does not fit in a float32")
    return float(value)


def _bool(meta: dict[str, Any], key: str, path: Path) -> bool:
    value = meta.get(key, False)
    if not isinstance(value, bool):
        raise _bad(path, key, value, "is not a boolean")
    return value


def _str(meta: dict[str, Any], key: str, path: Path, default: Any = _MISSING) -> Any:
    value = _required(meta, key, path) if default is _MISSING else meta.get(key, default)
    if value is not None and not isinstance(value, str):
        raise _bad(path, key, value, "is not a string")
    return value


def _token_id(meta: dict[str, Any], key: str, n_vocab: int, path: Path) -> int | None:
    """A special-token id: absent, or an integer inside the vocabulary."""
    if meta.get(key) is None:
        return None
    return _int(meta, key, path, minimum=0, maximum=n_vocab - 1)


def _float32_decimal(x: float) -> float:
    """The shortest decimal that round-trips to the same float32 (GGUF stores float32: 1e-5, not 9.99999974e-06)."""
    return float(str(np.float32(x)))


# ----------------------------------------------------------------------------
# config
# ----------------------------------------------------------------------------


def read_architecture(meta: dict[str, Any], path: Path) -> str:
    """``general.architecture``, refused unless it is one of ARCHITECTURES."""
    arch = _required(meta, "general.architecture", path)
    if not isinstance(arch, str) or arch not in ARCHITECTURES:
        raise OracleError(
            f"{path}: GGUF architecture {arch!r} is not supported; supported: {', '.join(ARCHITECTURES)}"
        )
    return arch


def rope_scaling(meta: dict[str, Any], arch: str, path: Path, factors: dict[str, list[float]] | None = None,
                 context: int | None = None) -> dict | None:
    """HF ``rope_scaling`` from the GGUF keys: linear, or Phi-3's LongRoPE (``factors`` from the rope factor
    tensors); anything else is refused."""
    kind = _str(meta, f"{arch}.rope.scaling.type", path, default="none")
    if factors:
        if kind not in ("none", "longrope"):
            raise OracleError(f"{path}: holds LongRoPE factor tensors but {arch}.rope.scaling.type is {kind!r}; {FIX}")
        return longrope_scaling(meta, arch, path, factors, context)
    if kind == "longrope":
        raise OracleError(f"{path}: {arch}.rope.scaling.type is 'longrope' but the file has no rope_factors_long / "
                          f"rope_factors_short tensors; {FIX}")
    legacy_key = f"{arch}.rope.scale_linear"  # pre-2024 llama.cpp key
    legacy_linear = _float(meta, legacy_key, path) if meta.get(legacy_key) is not None else None
    if kind == "none" and legacy_linear is not None and legacy_linear != 1.0:
        kind, factor = "linear", legacy_linear
    else:
        factor_key = f"{arch}.rope.scaling.factor"
        factor = _float(meta, factor_key, path) if meta.get(factor_key) is not None else None
    if kind == "none":
        return None
    if kind != "linear":
        raise OracleError(f"{path}: rope scaling type {kind!r} is not supported; only 'linear' (and Phi-3's LongRoPE) is")
    if factor is None:
        raise OracleError(f"{path}: linear rope scaling without {arch}.rope.scaling.factor")
    return {"rope_type": "linear", "factor": _float32_decimal(factor)}


def longrope_scaling(meta: dict[str, Any], arch: str, path: Path, factors: dict[str, list[float]],
                     context: int) -> dict:
    """Phi-3's LongRoPE as HF writes it; the attention factor only when the file's differs from the formula."""
    if arch != "phi3":
        raise OracleError(f"{path}: holds LongRoPE factor tensors, which this importer reads for phi3 only ({arch})")
    missing = [n for n, key in ROPE_FACTOR_TENSORS.items() if key not in factors]
    if missing:
        raise OracleError(f"{path}: holds one LongRoPE factor tensor but not {missing[0]}; {FIX}")
    original = _int(meta, f"{arch}.rope.scaling.original_context_length", path, default=context)
    scaling = {"rope_type": "longrope", "short_factor": factors["short_factor"], "long_factor": factors["long_factor"]}
    key = f"{arch}.rope.scaling.attn_factor"
    if meta.get(key) is not None:
        stored = _float(meta, key, path)
        scale = context / original
        formula = math.sqrt(1 + math.log(scale) / math.log(original)) if scale > 1.0 and original > 1 else 1.0
        if np.float32(stored) != np.float32(formula):
            scaling["attention_factor"] = _float32_decimal(stored)
    return scaling


def read_rope_factors(reader: gguf.GGUFReader, arch: str, path: Path) -> dict[str, list[float]]:
    """LongRoPE's factor lists from the tensors rope_factors_long / rope_factors_short (empty if absent)."""
    factors = {}
    for tensor in reader.tensors:
        if tensor.name in ROPE_FACTOR_TENSORS:
            if arch != "phi3":
                raise OracleError(f"{path}: holds {tensor.name} (LongRoPE factors), which this importer reads for "
                                  f"phi3 only, not {arch}")
            values = dequantize_tensor(tensor, path).reshape(-1)
            if not np.isfinite(values).all() or (values <= 0).any():
                raise OracleError(f"{path}: {tensor.name} holds a non-positive or non-finite factor; {FIX}")
            factors[ROPE_FACTOR_TENSORS[tensor.name]] = [float(v) for v in values]
    return factors


def hf_config(meta: dict[str, Any], arch: str, n_vocab: int, tied: bool, attention_bias: bool, path: Path,
              rope_factors: dict[str, list[float]] | None = None) -> dict:
    """The HF ``config.json`` dict for this GGUF's hyper-parameters, every value checked."""
    p = f"{arch}."
    D = _int(meta, p + "embedding_length", path)
    H = _int(meta, p + "attention.head_count", path, per_layer=True)
    H_kv = _int(meta, p + "attention.head_count_kv", path, default=H, per_layer=True)
    if p + "attention.key_length" not in meta and D % H:
        raise OracleError(f"{path}: embedding_length {D} is not a multiple of head_count {H} and "
                          f"{p}attention.key_length is missing; {FIX}")
    hd = _int(meta, p + "attention.key_length", path, default=D // H)
    if _int(meta, p + "attention.value_length", path, default=hd) != hd:
        raise OracleError(f"{path}: key_length != value_length; only equal head dims are supported")
    if arch == "phi3" and hd != D // H:
        raise OracleError(f"{path}: {p}attention.key_length is {hd}, but phi3's head size is embedding_length / "
                          f"head_count = {D // H}; {FIX}")
    rope_dim = _int(meta, p + "rope.dimension_count", path, default=hd)
    if rope_dim != hd:
        raise OracleError(f"{path}: rope.dimension_count {rope_dim} != head_dim {hd}; partial rotary is not supported")
    if hd % 2:
        raise OracleError(f"{path}: head dim {hd} is odd, but rotary embeddings need an even one; {FIX}")
    if H % H_kv != 0:
        raise OracleError(f"{path}: head_count {H} is not a multiple of head_count_kv {H_kv}")
    F = _int(meta, p + "feed_forward_length", path, per_layer=True)
    n_layers = _int(meta, p + "block_count", path)
    eps = _float(meta, p + "attention.layer_norm_rms_epsilon", path)
    theta = _float(meta, p + "rope.freq_base", path, default=10000.0)  # llama.cpp's default
    context = _int(meta, p + "context_length", path)
    if meta.get(p + "vocab_size") is not None and _int(meta, p + "vocab_size", path) != n_vocab:
        raise OracleError(f"{path}: {p}vocab_size is {meta[p + 'vocab_size']} but token_embd has {n_vocab} rows; {FIX}")
    config = {
        "architectures": [ARCHITECTURES[arch]],
        "model_type": arch,
        "hidden_size": D,
        "intermediate_size": F,
        "num_hidden_layers": n_layers,
        "num_attention_heads": H,
        "num_key_value_heads": H_kv,
        "head_dim": hd,
        "rms_norm_eps": _float32_decimal(eps),
        "rope_theta": _float32_decimal(theta),
        "max_position_embeddings": context,
        "vocab_size": n_vocab,
        "tie_word_embeddings": tied,
        "hidden_act": "silu",
        "attention_bias": attention_bias,
        "bos_token_id": _token_id(meta, "tokenizer.ggml.bos_token_id", n_vocab, path),
        "eos_token_id": _token_id(meta, "tokenizer.ggml.eos_token_id", n_vocab, path),
        "torch_dtype": "float32",
    }
    if arch == "phi3":
        window = _int(meta, p + "attention.sliding_window", path, default=0, minimum=0)
        config["sliding_window"] = window or None  # llama.cpp's converter writes 0 for none
        config["original_max_position_embeddings"] = _int(meta, p + "rope.scaling.original_context_length", path,
                                                          default=context)
    scaling = rope_scaling(meta, arch, path, rope_factors, context)
    if scaling is not None:
        config["rope_scaling"] = scaling
    return config


# ----------------------------------------------------------------------------
# tensors
# ----------------------------------------------------------------------------


def _block_tensors(arch: str) -> dict[str, str]:
    return BLOCK_TENSORS | ARCH_BLOCK_TENSORS.get(arch, {})


def hf_tensor_name(gguf_name: str, arch: str = "llama") -> str | None:
    """The HF name of a GGUF tensor of architecture ``arch``, or None if this importer does not know it."""
    if gguf_name in GLOBAL_TENSORS:
        return GLOBAL_TENSORS[gguf_name]
    match = _BLOCK_NAME.fullmatch(gguf_name)
    block = _block_tensors(arch)
    if match and match.group(2) in block:
        return f"model.layers.{match.group(1)}.{block[match.group(2)]}"
    return None


def gguf_tensor_name(hf_name: str, arch: str = "llama") -> str:
    """The GGUF name of an HF tensor (inverse of :func:`hf_tensor_name`)."""
    for gguf_name, name in GLOBAL_TENSORS.items():
        if name == hf_name:
            return gguf_name
    _, _, i, rest = hf_name.split(".", 3)  # model.layers.{i}.{rest}
    return next(f"blk.{i}.{g}" for g, h in _block_tensors(arch).items() if h == rest)


def expected_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    """Every HF tensor the converted config implies, with its (out, in) shape: the model's one table."""
    return expected_tensors(parse_config(config, "the config converted from the GGUF metadata"))


def unpermute_rotary(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k row order: per head, rows viewed as (hd/2, 2) become (2, hd/2).

    ``w`` is a weight (n_heads*hd, D) or a bias (n_heads*hd,); pass H for q and H_kv for k.
    """
    hd = w.shape[0] // n_heads
    per_head = w.reshape(n_heads, hd // 2, 2, *w.shape[1:])  # (n, hd/2, 2, ...)
    return np.ascontiguousarray(per_head.swapaxes(1, 2).reshape(w.shape))  # (n*hd, ...)


def dequantize_tensor(tensor: Any, path: Path) -> np.ndarray:
    """A GGUF tensor as float32 in HF shape (GGUF's dimension order reversed)."""
    shape = tuple(int(d) for d in reversed(tensor.shape))
    try:
        values = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
    except NotImplementedError:
        raise OracleError(
            f"{path}: tensor {tensor.name} has type {tensor.tensor_type.name}, which the gguf package "
            f"{getattr(gguf, '__version__', '')} cannot dequantize; re-quantize the model to a common type (Q8_0, Q4_K, F16)"
        ) from None
    return np.ascontiguousarray(values, dtype=np.float32).reshape(shape)


def to_hf_layout(name: str, w: np.ndarray, config: dict) -> np.ndarray:
    """Undo the rotary permutation where llama.cpp applied it (llama q and k only)."""
    if config["model_type"] != "llama":
        return w  # qwen2, qwen3, phi3: convert_hf_to_gguf writes q/k (and phi3's fused qkv) as HF has them
    if ".self_attn.q_proj." in name:
        return unpermute_rotary(w, config["num_attention_heads"])
    if ".self_attn.k_proj." in name:
        return unpermute_rotary(w, config["num_key_value_heads"])
    return w


def check_tensors(reader: gguf.GGUFReader, config: dict, path: Path) -> dict[str, Any]:
    """{HF name: GGUF tensor}: exactly the tensors the config implies, each of its shape.

    Checked before any loop over the layers or any allocation, so a block_count
    or a dimension that disagrees with the tensors present is refused at once.
    """
    n_layers = config["num_hidden_layers"]
    blocks = {int(m.group(1)) for t in reader.tensors if (m := _BLOCK_NAME.fullmatch(t.name))}
    if len(blocks) != n_layers or (blocks and max(blocks) != n_layers - 1):  # distinct indices: exactly 0..n-1
        held = f"blocks blk.{min(blocks)} to blk.{max(blocks)} ({len(blocks)} in all)" if blocks else "no blk.N tensors"
        raise OracleError(f"{path}: GGUF metadata {config['model_type']}.block_count = {n_layers}, but the file "
                          f"holds {held}; {FIX}")
    shapes = expected_shapes(config)
    arch = config["model_type"]
    by_hf_name = {}
    for tensor in reader.tensors:
        if tensor.name in ROPE_FACTOR_TENSORS and arch == "phi3":
            continue  # read into config.json's rope_scaling (read_rope_factors)
        hf_name = hf_tensor_name(tensor.name, arch)
        if tensor.name == "rope_freqs.weight":
            raise OracleError(
                f"{path}: holds rope_freqs.weight (Llama 3.1-style rope frequency factors), which this "
                "importer does not map back to rope_scaling; use the original Hugging Face checkpoint, "
                "whose config.json states its llama3 rope scaling"
            )
        if hf_name is None or hf_name not in shapes:
            raise OracleError(f"{path}: tensor {tensor.name!r} is not supported by this importer ({config['model_type']})")
        by_hf_name[hf_name] = tensor
    missing = [gguf_tensor_name(name, arch) for name in shapes if name not in by_hf_name]
    if missing:
        raise OracleError(f"{path}: missing tensor(s) {', '.join(missing[:5])}; the GGUF file is incomplete")
    for hf_name, tensor in by_hf_name.items():
        if tuple(int(d) for d in reversed(tensor.shape)) != shapes[hf_name]:
            raise OracleError(
                f"{path}: tensor {tensor.name} has HF shape {tuple(reversed(tensor.shape.tolist()))}, "
                f"expected {shapes[hf_name]} from the metadata"
            )
    return by_hf_name


def read_weights(reader: gguf.GGUFReader, config: dict, path: Path, progress: bool,
                 tensors: dict[str, Any] | None = None) -> dict[str, np.ndarray]:
    """Every tensor, dequantized to float32, renamed and un-permuted to HF layout."""
    by_hf_name = tensors if tensors is not None else check_tensors(reader, config, path)
    weights = {}
    for hf_name, tensor in tqdm(by_hf_name.items(), desc="dequantize", unit="tensor", disable=not progress):
        weights[hf_name] = to_hf_layout(hf_name, dequantize_tensor(tensor, path), config)
    return weights


# ----------------------------------------------------------------------------
# tokenizer
# ----------------------------------------------------------------------------


def pre_tokenizer(pre: str) -> tuple[Any, Any, bool]:
    """(normalizer, pre-tokenizer, ignore_merges) for llama.cpp's ``tokenizer.ggml.pre`` value."""
    if pre == "smollm":
        # SmolLM2's own tokenizer.json: every digit alone, then GPT-2 byte-level splitting.
        return None, pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]), False
    if pre == "gpt2":
        return None, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True), False
    if pre == "llama-bpe":
        # Llama 3's tokenizer.json: regex split, byte-level without regex, merges ignored for whole-vocab words.
        return None, pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]), True
    if pre == "qwen2":
        # Qwen2's tokenizer.json: NFC, regex split (single digits), byte-level without regex.
        return normalizers.NFC(), pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False, trim_offsets=False),
        ]), False
    raise ValueError(pre)


def check_vocabulary(meta: dict[str, Any], n_vocab: int, path: Path) -> None:
    """The tokenizer keys: tokens (unique strings, one per embedding row), token types, merges, special ids."""
    tokens = _required(meta, "tokenizer.ggml.tokens", path)
    if not isinstance(tokens, list) or not all(isinstance(t, str) for t in tokens):
        raise _bad(path, "tokenizer.ggml.tokens", tokens, "is not a list of strings")
    if len(tokens) != n_vocab:
        raise OracleError(f"{path}: {len(tokens)} tokens in the vocabulary but token_embd has {n_vocab} rows")
    if len(set(tokens)) != len(tokens):
        first = {}
        for i, t in enumerate(tokens):
            if t in first:
                raise OracleError(f"{path}: token {t!r} appears twice in tokenizer.ggml.tokens "
                                  f"(ids {first[t]} and {i}), so ids would be ambiguous; {FIX}")
            first[t] = i
    types = meta.get("tokenizer.ggml.token_type")
    if types is not None and not (isinstance(types, list) and len(types) == len(tokens) and all(map(_is_int, types))):
        raise OracleError(f"{path}: tokenizer.ggml.token_type must be {len(tokens)} integers, one per token; {FIX}")
    # llama.cpp's GGUFWriter drops an empty array, so a BPE vocabulary without merges (a byte-level one such as the
    # tiny checkpoints') has no tokenizer.ggml.merges key at all: absent means none
    merges = meta.get("tokenizer.ggml.merges", [])
    if not isinstance(merges, list) or not all(isinstance(m, str) for m in merges):
        raise _bad(path, "tokenizer.ggml.merges", merges, "is not a list of strings")
    for key in ("bos_token_id", "eos_token_id", "unknown_token_id", "padding_token_id"):
        _token_id(meta, f"tokenizer.ggml.{key}", n_vocab, path)
    for key, id_key in (("add_bos_token", "bos_token_id"), ("add_eos_token", "eos_token_id")):
        if _bool(meta, f"tokenizer.ggml.{key}", path) and meta.get(f"tokenizer.ggml.{id_key}") is None:
            raise OracleError(f"{path}: tokenizer.ggml.{key} is true but tokenizer.ggml.{id_key} is missing; {FIX}")
    _str(meta, "tokenizer.chat_template", path, default=None)


def build_tokenizer(meta: dict[str, Any], path: Path, n_vocab: int | None = None) -> Tokenizer:
    """A ``tokenizers`` BPE tokenizer equivalent to the GGUF vocabulary and merges.

    With ``n_vocab`` (the embedding's rows) the tokenizer keys are checked first (:func:`check_vocabulary`).
    """
    kind = meta.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise OracleError(f"{path}: tokenizer model {_show(kind)} is not supported; only byte-level BPE ('gpt2') is")
    pre = meta.get("tokenizer.ggml.pre", "default")
    if not isinstance(pre, str) or pre not in SUPPORTED_PRE:
        raise OracleError(
            f"{path}: pre-tokenizer {_show(pre)} (tokenizer.ggml.pre) is not supported; supported: {', '.join(SUPPORTED_PRE)}"
        )
    if n_vocab is not None:
        check_vocabulary(meta, n_vocab, path)
    tokens = _required(meta, "tokenizer.ggml.tokens", path)
    merges = [tuple(m.split(" ")) for m in meta.get("tokenizer.ggml.merges", [])]
    bad = next((m for m in merges if len(m) != 2), None)
    if bad is not None:
        raise OracleError(f"{path}: merge {' '.join(bad)!r} is not two space-separated tokens")
    types = meta.get("tokenizer.ggml.token_type", [int(gguf.TokenType.NORMAL)] * len(tokens))

    normalizer, pre_tok, ignore_merges = pre_tokenizer(pre)
    try:
        return _assemble_tokenizer(meta, tokens, merges, types, normalizer, pre_tok, ignore_merges)
    except Exception as e:  # the Rust library raises a bare Exception, e.g. for a merge of unknown tokens
        raise OracleError(f"{path}: the vocabulary and merges are not a valid BPE tokenizer "
                          f"({_one_line(e)}); {FIX}") from None


def _assemble_tokenizer(meta, tokens, merges, types, normalizer, pre_tok, ignore_merges) -> Tokenizer:
    tok = Tokenizer(models.BPE({t: i for i, t in enumerate(tokens)}, merges, ignore_merges=ignore_merges))
    if normalizer is not None:
        tok.normalizer = normalizer
    tok.pre_tokenizer = pre_tok
    tok.decoder = decoders.ByteLevel()
    # Control tokens (<|im_start|> ...) are special; user-defined ones are matched whole but not special.
    tok.add_special_tokens([
        AddedToken(t, special=True, normalized=False) for t, ty in zip(tokens, types) if ty == gguf.TokenType.CONTROL
    ])
    tok.add_tokens([
        AddedToken(t, special=False, normalized=False)
        for t, ty in zip(tokens, types)
        if ty == gguf.TokenType.USER_DEFINED
    ])
    tok.post_processor = post_processor(meta, tokens)
    return tok


def post_processor(meta: dict[str, Any], tokens: list[str]) -> Any:
    """BOS/EOS insertion only when the file asks for it (``add_bos_token`` / ``add_eos_token``)."""
    bos_id, eos_id = meta.get("tokenizer.ggml.bos_token_id"), meta.get("tokenizer.ggml.eos_token_id")
    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", False)) and bos_id is not None
    add_eos = bool(meta.get("tokenizer.ggml.add_eos_token", False)) and eos_id is not None
    if not (add_bos or add_eos):
        return None
    bos, eos = (tokens[bos_id] if add_bos else None), (tokens[eos_id] if add_eos else None)
    single = " ".join(([f"{bos}:0"] if add_bos else []) + ["$A:0"] + ([f"{eos}:0"] if add_eos else []))
    pair = single + " " + " ".join(([f"{bos}:1"] if add_bos else []) + ["$B:1"] + ([f"{eos}:1"] if add_eos else []))
    special = ([(bos, bos_id)] if add_bos else []) + ([(eos, eos_id)] if add_eos and eos != bos else [])
    return processors.TemplateProcessing(single=single, pair=pair, special_tokens=special)


def tokenizer_config(meta: dict[str, Any]) -> dict:
    """``tokenizer_config.json``: special-token strings, BOS policy and chat template."""
    tokens = meta["tokenizer.ggml.tokens"]

    def token(key: str) -> str | None:
        i = meta.get(f"tokenizer.ggml.{key}")
        return tokens[i] if i is not None else None

    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": token("bos_token_id"),
        "eos_token": token("eos_token_id"),
        "unk_token": token("unknown_token_id"),
        "pad_token": token("padding_token_id"),
        "add_bos_token": bool(meta.get("tokenizer.ggml.add_bos_token", False)),
        "add_eos_token": bool(meta.get("tokenizer.ggml.add_eos_token", False)),
        "clean_up_tokenization_spaces": False,
    }
    if "tokenizer.chat_template" in meta:
        config["chat_template"] = meta["tokenizer.chat_template"]
    return config


# ----------------------------------------------------------------------------
# writing
# ----------------------------------------------------------------------------


def _check_out_dir(out_dir: Path) -> None:
    """Refuse to overwrite anything: the output must not exist or be an empty directory."""
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise OracleError(f"{out_dir}: already exists and is not an empty directory; delete it or choose another --out")


_STAGING = re.compile(r"\.(?P<name>.+)\.partial-(?P<host>[A-Za-z0-9_-]+)-(?P<pid>[0-9]+)-[0-9a-f]{8}")


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9_-]", "_", socket.gethostname()) or "host"


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists but not ours, or cannot tell: keep its directory
        return True
    return True


def _remove_stale_staging(out_dir: Path) -> None:
    """Staging directories of earlier imports into ``out_dir`` that were killed (same host, process gone)."""
    try:
        siblings = list(out_dir.parent.iterdir())
    except OSError:
        return
    for old in siblings:
        m = _STAGING.fullmatch(old.name)
        if m and m["name"] == out_dir.name and m["host"] == _host() and not _alive(int(m["pid"])) and old.is_dir():
            shutil.rmtree(old, ignore_errors=True)


def _staging_dir(out_dir: Path) -> Path:
    """A fresh hidden sibling of ``out_dir`` to write into before the final rename."""
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale_staging(out_dir)
        staging = out_dir.parent / f".{out_dir.name}.partial-{_host()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        staging.mkdir()
    except OSError as e:
        raise OracleError(f"{out_dir}: cannot create the output next to it ({e.strerror or e}); "
                          "choose another --out") from None
    return staging


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _embedding_rows(reader: gguf.GGUFReader, path: Path) -> int:
    """The vocabulary size: the rows of token_embd.weight, which must be a matrix."""
    tensor = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)
    if tensor is None:
        raise OracleError(f"{path}: missing tensor token_embd.weight; the GGUF file is incomplete")
    shape = [int(d) for d in tensor.shape]
    if len(shape) != 2 or min(shape) < 1:
        raise OracleError(f"{path}: tensor token_embd.weight has GGUF shape {shape}, not a (hidden, vocabulary) "
                          f"matrix; {FIX}")
    return shape[1]


def import_gguf(gguf_path: str | os.PathLike, out_dir: str | os.PathLike, *, progress: bool = True) -> Path:
    """Convert ``gguf_path`` (llama, qwen2, qwen3 or phi3) into an HF-layout directory ``out_dir``; return it.

    Everything is checked before anything is written; the directory appears
    only when complete: everything is written to a temporary sibling which is
    renamed at the end, and removed if anything fails.
    """
    path, out_dir = Path(gguf_path), Path(out_dir)
    _check_out_dir(out_dir)
    reader = open_gguf(path)
    meta = read_metadata(reader, path)
    arch = read_architecture(meta, path)
    names = {t.name for t in reader.tensors}
    n_vocab = _embedding_rows(reader, path)
    attention_bias = arch == "qwen2" or (arch != "phi3" and "blk.0.attn_q.bias" in names)
    rope_factors = read_rope_factors(reader, arch, path)
    config = hf_config(meta, arch, n_vocab, "output.weight" not in names, attention_bias, path, rope_factors)
    tokenizer = build_tokenizer(meta, path, n_vocab)  # fails fast on an unsupported or inconsistent tokenizer
    tensors = check_tensors(reader, config, path)  # counts and shapes against the tensors, before any work

    staging = _staging_dir(out_dir)
    try:
        _write_json(staging / "config.json", config)
        weights = read_weights(reader, config, path, progress, tensors)
        save_file(weights, str(staging / "model.safetensors"), metadata={"format": "pt"})
        del weights
        # safetensors creates its file 0600; give it the mode (umask) of the files Python wrote.
        os.chmod(staging / "model.safetensors", (staging / "config.json").stat().st_mode & 0o777)
        tokenizer.save(str(staging / "tokenizer.json"))
        _write_json(staging / "tokenizer_config.json", tokenizer_config(meta))
        _write_json(staging / "generation_config.json",
                    {"bos_token_id": config["bos_token_id"], "eos_token_id": config["eos_token_id"]})
        if out_dir.exists():
            out_dir.rmdir()  # empty, checked above
        staging.rename(out_dir)
    except BaseException as e:
        shutil.rmtree(staging, ignore_errors=True)
        if isinstance(e, OracleError) or not isinstance(e, Exception):  # KeyboardInterrupt: cleaned up, re-raised
            raise
        raise _failed(e, path, out_dir) from None
    return out_dir


def _failed(e: Exception, path: Path, out_dir: Path) -> OracleError:
    """An unexpected error while converting, as one OracleError (nothing was left behind)."""
    if isinstance(e, MemoryError):
        return OracleError(f"{path}: out of memory while converting (the float32 copy of every tensor must fit); "
                           "free memory or use a machine with more")
    if isinstance(e, OSError):
        return OracleError(f"{out_dir}: cannot write the output ({e.strerror or _one_line(e)}); "
                           "free disk space, check permissions, or choose another --out")
    return OracleError(f"{path}: conversion failed ({type(e).__name__}: {_one_line(e)}); {FIX}")
