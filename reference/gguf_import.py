"""Convert a llama.cpp GGUF file (architecture ``llama`` or ``qwen2``) into a
Hugging Face-layout directory: ``model.safetensors`` (float32), ``config.json``,
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
"""

from __future__ import annotations

import json
import os
import re
import shutil
import uuid
from pathlib import Path
from typing import Any

import gguf
import numpy as np
from safetensors.numpy import save_file
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from tqdm import tqdm

from reference.errors import OracleError

ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}

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
}
_BLOCK_NAME = re.compile(r"blk\.(\d+)\.(.+)")

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
    except (ValueError, OSError, IndexError) as e:
        raise OracleError(f"{path}: not a readable GGUF file ({e}); pass a llama.cpp .gguf file") from None
    if reader.byte_order != "I":
        raise OracleError(f"{path}: big-endian GGUF files are not supported; use a little-endian conversion")
    return reader


def read_metadata(reader: gguf.GGUFReader) -> dict[str, Any]:
    """All key/value metadata of the file as plain Python values."""
    return {name: field.contents() for name, field in reader.fields.items() if not name.startswith("GGUF.")}


def _required(meta: dict[str, Any], key: str, path: Path) -> Any:
    """``meta[key]``, or OracleError naming the missing key."""
    if key not in meta:
        raise OracleError(f"{path}: GGUF metadata key {key!r} is missing; the file is not a complete llama.cpp conversion")
    return meta[key]


def _uniform(value: Any, key: str, path: Path) -> int:
    """A per-model integer that GGUF may also store as one value per layer."""
    if isinstance(value, list):
        if len(set(value)) != 1:
            raise OracleError(f"{path}: {key} differs between layers ({sorted(set(value))}); only uniform layers are supported")
        value = value[0]
    return int(value)


def _float32_decimal(x: float) -> float:
    """The shortest decimal that round-trips to the same float32 (GGUF stores float32: 1e-5, not 9.99999974e-06)."""
    return float(str(np.float32(x)))


# ----------------------------------------------------------------------------
# config
# ----------------------------------------------------------------------------


def read_architecture(meta: dict[str, Any], path: Path) -> str:
    """``general.architecture``, refused unless it is llama or qwen2."""
    arch = _required(meta, "general.architecture", path)
    if arch not in ARCHITECTURES:
        raise OracleError(
            f"{path}: GGUF architecture {arch!r} is not supported; supported: {', '.join(ARCHITECTURES)}"
        )
    return arch


def rope_scaling(meta: dict[str, Any], arch: str, path: Path) -> dict | None:
    """HF ``rope_scaling`` from the GGUF keys: linear only; anything else is refused."""
    kind = meta.get(f"{arch}.rope.scaling.type", "none")
    legacy_linear = meta.get(f"{arch}.rope.scale_linear")  # pre-2024 llama.cpp key
    if kind == "none" and legacy_linear is not None and float(legacy_linear) != 1.0:
        kind, factor = "linear", legacy_linear
    else:
        factor = meta.get(f"{arch}.rope.scaling.factor")
    if kind == "none":
        return None
    if kind != "linear":
        raise OracleError(f"{path}: rope scaling type {kind!r} is not supported; only 'linear' is")
    if factor is None:
        raise OracleError(f"{path}: linear rope scaling without {arch}.rope.scaling.factor")
    return {"rope_type": "linear", "factor": _float32_decimal(factor)}


def hf_config(meta: dict[str, Any], arch: str, n_vocab: int, tied: bool, attention_bias: bool, path: Path) -> dict:
    """The HF ``config.json`` dict for this GGUF's hyper-parameters."""
    D = int(_required(meta, f"{arch}.embedding_length", path))
    H = _uniform(_required(meta, f"{arch}.attention.head_count", path), "head_count", path)
    H_kv = _uniform(meta.get(f"{arch}.attention.head_count_kv", H), "head_count_kv", path)
    hd = int(meta.get(f"{arch}.attention.key_length", D // H))
    if int(meta.get(f"{arch}.attention.value_length", hd)) != hd:
        raise OracleError(f"{path}: key_length != value_length; only equal head dims are supported")
    rope_dim = int(meta.get(f"{arch}.rope.dimension_count", hd))
    if rope_dim != hd:
        raise OracleError(f"{path}: rope.dimension_count {rope_dim} != head_dim {hd}; partial rotary is not supported")
    if H % H_kv != 0:
        raise OracleError(f"{path}: head_count {H} is not a multiple of head_count_kv {H_kv}")
    config = {
        "architectures": [ARCHITECTURES[arch]],
        "model_type": arch,
        "hidden_size": D,
        "intermediate_size": _uniform(_required(meta, f"{arch}.feed_forward_length", path), "feed_forward_length", path),
        "num_hidden_layers": int(_required(meta, f"{arch}.block_count", path)),
        "num_attention_heads": H,
        "num_key_value_heads": H_kv,
        "head_dim": hd,
        "rms_norm_eps": _float32_decimal(_required(meta, f"{arch}.attention.layer_norm_rms_epsilon", path)),
        "rope_theta": _float32_decimal(meta.get(f"{arch}.rope.freq_base", 10000.0)),  # llama.cpp's default
        "max_position_embeddings": int(_required(meta, f"{arch}.context_length", path)),
        "vocab_size": n_vocab,
        "tie_word_embeddings": tied,
        "hidden_act": "silu",
        "attention_bias": attention_bias,
        "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": meta.get("tokenizer.ggml.eos_token_id"),
        "torch_dtype": "float32",
    }
    scaling = rope_scaling(meta, arch, path)
    if scaling is not None:
        config["rope_scaling"] = scaling
    return config


# ----------------------------------------------------------------------------
# tensors
# ----------------------------------------------------------------------------


def hf_tensor_name(gguf_name: str) -> str | None:
    """The HF name of a GGUF tensor, or None if this importer does not know it."""
    if gguf_name in GLOBAL_TENSORS:
        return GLOBAL_TENSORS[gguf_name]
    match = _BLOCK_NAME.fullmatch(gguf_name)
    if match and match.group(2) in BLOCK_TENSORS:
        return f"model.layers.{match.group(1)}.{BLOCK_TENSORS[match.group(2)]}"
    return None


def gguf_tensor_name(hf_name: str) -> str:
    """The GGUF name of an HF tensor (inverse of :func:`hf_tensor_name`)."""
    for gguf_name, name in GLOBAL_TENSORS.items():
        if name == hf_name:
            return gguf_name
    _, _, i, rest = hf_name.split(".", 3)  # model.layers.{i}.{rest}
    return next(f"blk.{i}.{g}" for g, h in BLOCK_TENSORS.items() if h == rest)


def expected_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    """Every HF tensor the config implies, with its (out, in) shape."""
    D, F, V = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    q_dim = config["num_attention_heads"] * config["head_dim"]
    kv_dim = config["num_key_value_heads"] * config["head_dim"]
    shapes = {"model.embed_tokens.weight": (V, D), "model.norm.weight": (D,)}
    if not config["tie_word_embeddings"]:
        shapes["lm_head.weight"] = (V, D)
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes |= {
            p + "input_layernorm.weight": (D,),
            p + "post_attention_layernorm.weight": (D,),
            p + "self_attn.q_proj.weight": (q_dim, D),
            p + "self_attn.k_proj.weight": (kv_dim, D),
            p + "self_attn.v_proj.weight": (kv_dim, D),
            p + "self_attn.o_proj.weight": (D, q_dim),
            p + "mlp.gate_proj.weight": (F, D),
            p + "mlp.up_proj.weight": (F, D),
            p + "mlp.down_proj.weight": (D, F),
        }
        if config["attention_bias"]:
            shapes |= {
                p + "self_attn.q_proj.bias": (q_dim,),
                p + "self_attn.k_proj.bias": (kv_dim,),
                p + "self_attn.v_proj.bias": (kv_dim,),
            }
            if config["model_type"] == "llama":  # HF Llama's attention_bias also covers o_proj
                shapes[p + "self_attn.o_proj.bias"] = (D,)
    return shapes


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
        return w  # qwen2: convert_hf_to_gguf writes q/k as HF has them
    if ".self_attn.q_proj." in name:
        return unpermute_rotary(w, config["num_attention_heads"])
    if ".self_attn.k_proj." in name:
        return unpermute_rotary(w, config["num_key_value_heads"])
    return w


def read_weights(reader: gguf.GGUFReader, config: dict, path: Path, progress: bool) -> dict[str, np.ndarray]:
    """Every tensor, dequantized to float32, renamed and un-permuted to HF layout."""
    shapes = expected_shapes(config)
    by_hf_name = {}
    for tensor in reader.tensors:
        hf_name = hf_tensor_name(tensor.name)
        if tensor.name == "rope_freqs.weight":
            raise OracleError(
                f"{path}: holds rope_freqs.weight (Llama 3.1-style rope frequency factors), which this "
                "importer does not map back to rope_scaling; use the original Hugging Face checkpoint, "
                "whose config.json states its llama3 rope scaling"
            )
        if hf_name is None or hf_name not in shapes:
            raise OracleError(f"{path}: tensor {tensor.name!r} is not supported by this importer ({config['model_type']})")
        by_hf_name[hf_name] = tensor
    missing = [gguf_tensor_name(name) for name in shapes if name not in by_hf_name]
    if missing:
        raise OracleError(f"{path}: missing tensor(s) {', '.join(missing[:5])}; the GGUF file is incomplete")

    weights = {}
    for hf_name, tensor in tqdm(by_hf_name.items(), desc="dequantize", unit="tensor", disable=not progress):
        if tuple(int(d) for d in reversed(tensor.shape)) != shapes[hf_name]:
            raise OracleError(
                f"{path}: tensor {tensor.name} has HF shape {tuple(reversed(tensor.shape.tolist()))}, "
                f"expected {shapes[hf_name]} from the metadata"
            )
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


def build_tokenizer(meta: dict[str, Any], path: Path) -> Tokenizer:
    """A ``tokenizers`` BPE tokenizer equivalent to the GGUF vocabulary and merges."""
    kind = meta.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise OracleError(f"{path}: tokenizer model {kind!r} is not supported; only byte-level BPE ('gpt2') is")
    pre = meta.get("tokenizer.ggml.pre", "default")
    if pre not in SUPPORTED_PRE:
        raise OracleError(
            f"{path}: pre-tokenizer {pre!r} (tokenizer.ggml.pre) is not supported; supported: {', '.join(SUPPORTED_PRE)}"
        )
    tokens = _required(meta, "tokenizer.ggml.tokens", path)
    merges = [tuple(m.split(" ")) for m in _required(meta, "tokenizer.ggml.merges", path)]
    bad = next((m for m in merges if len(m) != 2), None)
    if bad is not None:
        raise OracleError(f"{path}: merge {' '.join(bad)!r} is not two space-separated tokens")
    types = meta.get("tokenizer.ggml.token_type", [int(gguf.TokenType.NORMAL)] * len(tokens))

    normalizer, pre_tok, ignore_merges = pre_tokenizer(pre)
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


def _staging_dir(out_dir: Path) -> Path:
    """A fresh hidden sibling of ``out_dir`` to write into before the final rename."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = out_dir.parent / f".{out_dir.name}.partial-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    staging.mkdir()
    return staging


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def import_gguf(gguf_path: str | os.PathLike, out_dir: str | os.PathLike, *, progress: bool = True) -> Path:
    """Convert ``gguf_path`` (llama or qwen2) into an HF-layout directory ``out_dir``; return it.

    The directory appears only when complete: everything is written to a
    temporary sibling which is renamed at the end.
    """
    path, out_dir = Path(gguf_path), Path(out_dir)
    _check_out_dir(out_dir)
    reader = open_gguf(path)
    meta = read_metadata(reader)
    arch = read_architecture(meta, path)
    names = {t.name for t in reader.tensors}
    if "token_embd.weight" not in names:
        raise OracleError(f"{path}: missing tensor token_embd.weight; the GGUF file is incomplete")
    n_vocab = int(next(t for t in reader.tensors if t.name == "token_embd.weight").shape[1])
    attention_bias = arch == "qwen2" or "blk.0.attn_q.bias" in names
    config = hf_config(meta, arch, n_vocab, "output.weight" not in names, attention_bias, path)
    tokenizer = build_tokenizer(meta, path)  # fails fast on an unsupported tokenizer
    if len(meta["tokenizer.ggml.tokens"]) != n_vocab:
        raise OracleError(
            f"{path}: {len(meta['tokenizer.ggml.tokens'])} tokens in the vocabulary but token_embd has {n_vocab} rows"
        )

    staging = _staging_dir(out_dir)
    try:
        _write_json(staging / "config.json", config)
        weights = read_weights(reader, config, path, progress)
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
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out_dir
