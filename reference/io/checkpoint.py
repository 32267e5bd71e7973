"""Checkpoint: a Hugging Face-layout directory turned into Weights, checked before any maths.

A directory holds `config.json`, either `model.safetensors` or shards listed in
`model.safetensors.index.json`, `tokenizer.json`, and optionally
`generation_config.json`. The loader computes the full set of tensor names and
shapes that the config implies, and refuses a checkpoint where one is missing,
has another shape, or holds a non-finite value, naming the tensor.

Tensors are memory-mapped: a float32 tensor used in float32 is a view of the
file (never copied); F16/BF16, or any tensor used in float64, is converted once.

(Length: loading together with the containment and tensor checks that make a hostile checkpoint directory safe to open.)
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import numpy as np

from reference.errors import OracleError
from reference.io.fetch import resolve_model
from reference.io.safetensors import (
    SafetensorsFile,
    map_tensor,
    open_mapped,
    quote_name,
    read_header,
)
from reference.io.tokenizer import load_tokenizer
from reference.model.config import Config, check_token_ids, load_config, read_json, show
from reference.model.weights import LayerWeights, Weights, expected_tensors, fused_parts
from reference.model.weights import axes as _axes
from reference.model.weights import axis_sizes as _axis_sizes

DTYPES = {"float32": np.float32, "float64": np.float64}


def _inside(model_dir: Path, path: Path, listed_in: Path | None = None) -> Path:
    """`path`, refused unless it (after following symlinks) lies inside `model_dir`.

    The one exception is the Hugging Face hub cache's own layout, where every file of
    `.../snapshots/<revision>/` is a symlink into `.../blobs/`.
    """
    where = listed_in or path
    try:
        real, root = path.resolve(), model_dir.resolve()
    except (OSError, RuntimeError, ValueError) as e:  # a symlink loop, an unreadable directory
        raise OracleError(f"{where}: cannot resolve {quote_name(path.name)} ({e}); fix the checkpoint directory") from None
    if real.is_relative_to(root):
        return path
    hub_blobs = root.parent.parent / "blobs"
    if root.parent.name == "snapshots" and path.is_symlink() and real.parent == hub_blobs:
        return path
    shown = path.relative_to(model_dir) if path.is_relative_to(model_dir) else path
    raise OracleError(
        f"{where}: {quote_name(str(shown))} resolves to {quote_name(str(real))}, outside the checkpoint "
        f"directory {root}; every weights file must lie inside it (copy the file in instead of linking to it)"
    )


def _shard_path(model_dir: Path, index: Path, name: str, shard) -> Path:
    """The file an index entry names: a relative path that stays inside the directory."""
    if not isinstance(shard, str) or not shard or "\x00" in shard:
        raise OracleError(
            f"{index}: weight_map[{quote_name(name)}] must be a shard file name (a non-empty string), "
            f"got {show(shard)}; fix model.safetensors.index.json"
        )
    relative = Path(shard)
    if relative.is_absolute():
        raise OracleError(
            f"{index}: weight_map[{quote_name(name)}] names the shard {show(shard)}, an absolute path, not inside "
            f"{model_dir}; shards must be file names relative to the checkpoint directory"
        )
    return _inside(model_dir, model_dir / relative, index)


def shard_files(model_dir: Path) -> dict[str, Path]:
    """tensor name -> the .safetensors file that holds it (every file inside `model_dir`)."""
    single = model_dir / "model.safetensors"
    index = model_dir / "model.safetensors.index.json"
    if single.is_file():
        _inside(model_dir, single)
        return {name: single for name in read_header(single).tensors}
    if not index.is_file():
        raise OracleError(
            f"{model_dir}: neither model.safetensors nor model.safetensors.index.json found; "
            "only safetensors checkpoints are supported (convert .bin/.pt files first)"
        )
    _inside(model_dir, index)
    fix = "fix or re-download model.safetensors.index.json"
    doc = read_json(index, fix)
    if not isinstance(doc, dict) or "weight_map" not in doc:
        raise OracleError(f"{index}: not a valid safetensors index (no \"weight_map\" object at the top); {fix}")
    weight_map = doc["weight_map"]
    if not isinstance(weight_map, dict):
        raise OracleError(
            f"{index}: weight_map must be an object {{tensor name: shard file}}, got {show(weight_map)}; {fix}"
        )
    shards: dict[str, Path] = {}
    files = {}
    for name, shard in weight_map.items():
        if not isinstance(shard, str) or shard not in shards:
            shards[shard] = _shard_path(model_dir, index, name, shard)  # refuses a non-string
        files[name] = shards[shard]
    for shard, path in sorted(shards.items()):
        if not path.is_file():
            raise OracleError(f"{index}: lists shard {quote_name(shard)}, which is missing from {model_dir}")
    return files


class TensorReader:
    """Opens each shard once (header + memory map) and hands out tensors by name."""

    def __init__(self, files: dict[str, Path]):
        self.files = files
        self._open: dict[Path, tuple[SafetensorsFile, np.memmap]] = {}

    def get(self, name: str) -> np.ndarray:
        path = self.files[name]
        if path not in self._open:
            header = read_header(path)
            self._open[path] = (header, open_mapped(header))
        header, mapped = self._open[path]
        if name not in header.tensors:
            raise OracleError(f"{path}: the index says it holds '{name}', but it does not")
        return map_tensor(header, name, mapped)


def check_shape(name: str, tensor: np.ndarray, shape: tuple[int, ...], where: Path) -> None:
    if tensor.shape != shape:
        raise OracleError(
            f"{where}: tensor '{name}' has shape {tensor.shape}, but config.json implies {shape}; "
            "the checkpoint and its config.json do not belong together"
        )


def non_finite_error(name: str, where: Path) -> OracleError:
    return OracleError(f"{where}: tensor '{name}' holds NaN or infinite values; the checkpoint is corrupt")


_LAYER_NAME = re.compile(r"model\.layers\.(\d+)\.")
# Tensors that Hugging Face itself ignores when loading: rotary buffers of old conversions.
_IGNORED_NAME = re.compile(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq")


def _layer_index(name: str) -> int | None:
    match = _LAYER_NAME.match(name)
    if match is None:
        return None
    digits = match.group(1)
    return int(digits) if len(digits) < 19 else 10**19


def _check_layer_count(cfg: Config, names, model_dir: Path) -> None:
    """num_hidden_layers against the layers the tensors hold, before anything loops over L.

    L may not exceed the number of distinct layer indices among the tensor names (a
    layer with no tensor at all cannot be complete), nor fall below the highest index
    + 1 (those tensors would be ignored): so L is bounded by the files' own size.
    """
    indices = {i for i in map(_layer_index, names) if i is not None}
    L, config = cfg.num_hidden_layers, model_dir / "config.json"
    if not indices:
        raise OracleError(
            f"{model_dir}: the checkpoint holds no decoder-layer tensors (model.layers.N.*), but config.json "
            f"asks for num_hidden_layers = {L}; the weights are incomplete or not a Llama/Mistral/Qwen2/Qwen3/Phi-3 "
            "checkpoint"
        )
    held, top = len(indices), max(indices) + 1
    if L > held:
        what = f"model.layers.0 to model.layers.{top - 1}" if held == top else f"{held} distinct indices up to {top - 1}"
        raise OracleError(
            f"{config}: num_hidden_layers is {L}, but the checkpoint's tensors hold {held} layers ({what}); "
            f"set num_hidden_layers to {held} in config.json, or use the complete checkpoint"
        )
    if L < top:
        beyond = sorted((n for n in names if (_layer_index(n) or 0) >= L), key=lambda n: (_layer_index(n), n))
        raise OracleError(
            f"{config}: num_hidden_layers is {L}, but the checkpoint holds tensors for layers up to {top - 1}: "
            f"{quote_name(beyond[0])} (and {len(beyond) - 1} more) would be ignored; "
            f"set num_hidden_layers to {top} in config.json"
        )


def _unused_tensor_error(cfg: Config, extras: list[str], model_dir: Path) -> OracleError:
    more = f" (and {len(extras) - 1} more)" if len(extras) > 1 else ""
    name = extras[0]
    if ".self_attn." in name and name.endswith(".bias") and not cfg.attention_bias:
        fix = "the weights have attention biases: set attention_bias to true in config.json"
    elif ".mlp." in name and name.endswith(".bias"):
        fix = "the weights have MLP biases (mlp_bias), which this reference does not support"
    elif name.endswith((".q_norm.weight", ".k_norm.weight")):
        fix = "the weights have per-head q_norm / k_norm (Qwen3's): is model_type \"qwen3\" meant?"
    elif name.endswith((".qkv_proj.weight", ".gate_up_proj.weight")):
        fix = "the weights store q/k/v (and gate/up) fused, as Phi-3 does: is model_type \"phi3\" meant?"
    else:
        fix = "the checkpoint and its config.json do not belong together; use the config.json that came with the weights"
    return OracleError(
        f"{model_dir}: tensor {quote_name(name)}{more} is in the checkpoint, but config.json "
        f"(model_type={cfg.model_type}, attention_bias={str(cfg.attention_bias).lower()}, "
        f"tie_word_embeddings={str(cfg.tie_word_embeddings).lower()}) does not use it; {fix}"
    )


def _shape_error(cfg: Config, name: str, actual: tuple, where: Path, model_dir: Path) -> OracleError:
    axes, sizes = _axes_of(cfg, name), _axis_sizes(cfg)
    shape = tuple(sizes[a][0] for a in axes)
    if len(actual) != len(shape):
        detail = f"it has {len(actual)} axes where {len(shape)} are expected"
        keys = "nothing in config.json explains this"
    else:
        wrong = [(i, a) for i, a in enumerate(axes) if actual[i] != sizes[a][0]]
        detail = "; ".join(f"axis {i} holds {actual[i]}, but config.json says {sizes[a][1]}" for i, a in wrong)
        keys = "fix " + " and ".join(dict.fromkeys(sizes[a][2] for _, a in wrong)) + f" in {model_dir / 'config.json'}"
    return OracleError(
        f"{where}: tensor {quote_name(name)} has shape {actual}, but config.json implies {shape} ({detail}); "
        f"the checkpoint and its config.json do not belong together: {keys}"
    )


def _axes_of(cfg: Config, name: str) -> tuple[str, ...]:
    index = _layer_index(name)
    if index is None:
        return _axes(dataclasses.replace(cfg, num_hidden_layers=0))[name]
    one = _axes(dataclasses.replace(cfg, num_hidden_layers=1))
    return one[name.replace(f"model.layers.{index}.", "model.layers.0.", 1)]


def open_checkpoint(model_dir: Path) -> tuple[Config, dict[str, Path], dict[str, tuple[int, ...]]]:
    """config, tensor name -> file, tensor name -> expected shape.

    Every expected tensor is present with its shape, and every tensor present is used,
    checked from the headers alone: nothing is allocated or loaded before this passes.
    """
    cfg = load_config(model_dir)
    files = shard_files(model_dir)
    _check_layer_count(cfg, files, model_dir)
    shapes = expected_tensors(cfg)
    missing = [name for name in shapes if name not in files]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        if missing[0].endswith(".bias") and cfg.model_type != "qwen2":
            fix = "the weights have no attention biases: set attention_bias to false in config.json"
        elif any(n.endswith((".qkv_proj.weight", ".gate_up_proj.weight")) for n in files):
            fix = "the weights store q/k/v (and gate/up) fused, as Phi-3 does: is model_type \"phi3\" meant?"
        elif missing[0].endswith((".qkv_proj.weight", ".gate_up_proj.weight")):
            fix = ("phi3 stores q/k/v as one qkv_proj and gate/up as one gate_up_proj; "
                   "these weights are not a Phi-3 checkpoint, or were converted to separate projections")
        elif missing[0].endswith((".q_norm.weight", ".k_norm.weight")):
            fix = "qwen3 has a q_norm and a k_norm per layer; these weights are not a Qwen3 checkpoint"
        elif missing[0] == "lm_head.weight":
            fix = "the weights have no lm_head: set tie_word_embeddings to true in config.json if it is tied"
        else:
            fix = "the checkpoint is incomplete, or its config.json belongs to another model"
        raise OracleError(
            f"{model_dir}: tensor '{missing[0]}'{more} is missing; config.json "
            f"(model_type={cfg.model_type}, {cfg.num_hidden_layers} layers) expects it; {fix}"
        )
    ignored = {"lm_head.weight"} if cfg.tie_word_embeddings else set()  # as transformers: tied wins
    extras = [n for n in files if n not in shapes and n not in ignored and not _IGNORED_NAME.fullmatch(n)]
    if extras:
        raise _unused_tensor_error(cfg, extras, model_dir)
    headers = {path: read_header(path) for path in dict.fromkeys(files[name] for name in shapes)}
    for name, shape in shapes.items():
        info = headers[files[name]].tensors.get(name)
        if info is None:
            raise OracleError(
                f"{files[name]}: the index says it holds {quote_name(name)}, but it does not; "
                "fix or re-download model.safetensors.index.json and the shards"
            )
        if info.shape != shape:
            raise _shape_error(cfg, name, info.shape, files[name], model_dir)
    return cfg, files, shapes


def assemble(cfg: Config, get, dtype) -> Weights:
    """Weights from `get(name)`, which returns each checked tensor (host or device array).

    Phi-3's fused qkv_proj and gate_up_proj are fetched once and split here, at load time, into row blocks
    (`reference.model.weights.fused_parts`): views of the one loaded tensor, never re-split at run time.
    """
    shapes = expected_tensors(cfg)
    fused = fused_parts(cfg)

    def maybe(name: str):
        return get(name) if name in shapes else None

    layers = []
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        parts = {}
        for name, split in fused.items():
            whole = get(p + name)
            parts |= {field: whole[start:end] for field, start, end in split}

        def part(field: str, name: str):
            return parts[field] if field in parts else get(p + name)

        layers.append(
            LayerWeights(
                attn_norm=get(p + "input_layernorm.weight"),
                wq=part("wq", "self_attn.q_proj.weight"),
                wk=part("wk", "self_attn.k_proj.weight"),
                wv=part("wv", "self_attn.v_proj.weight"),
                wo=get(p + "self_attn.o_proj.weight"),
                bq=maybe(p + "self_attn.q_proj.bias"),
                bk=maybe(p + "self_attn.k_proj.bias"),
                bv=maybe(p + "self_attn.v_proj.bias"),
                bo=maybe(p + "self_attn.o_proj.bias"),
                mlp_norm=get(p + "post_attention_layernorm.weight"),
                w_gate=part("w_gate", "mlp.gate_proj.weight"),
                w_up=part("w_up", "mlp.up_proj.weight"),
                w_down=get(p + "mlp.down_proj.weight"),
                q_norm=maybe(p + "self_attn.q_norm.weight"),
                k_norm=maybe(p + "self_attn.k_norm.weight"),
            )
        )
    embed = get("model.embed_tokens.weight")
    return Weights(
        config=cfg,
        embed=embed,
        layers=tuple(layers),
        norm=get("model.norm.weight"),
        lm_head=embed if cfg.tie_word_embeddings else get("lm_head.weight"),
        dtype=dtype,
    )


def load_weights(model_dir: str | Path, dtype: str = "float32") -> Weights:
    """Load and check every tensor of a checkpoint directory, in `dtype` (float32 or float64)."""
    model_dir = Path(model_dir)
    if dtype not in DTYPES:
        raise OracleError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    np_dtype = np.dtype(DTYPES[dtype])
    cfg, files, shapes = open_checkpoint(model_dir)
    reader = TensorReader(files)

    def get(name: str) -> np.ndarray:
        tensor = reader.get(name)
        check_shape(name, tensor, shapes[name], files[name])
        tensor = tensor.astype(np_dtype, copy=False)  # a view when the stored dtype is already `dtype`
        if not np.isfinite(tensor).all():
            raise non_finite_error(name, files[name])
        return tensor

    return assemble(cfg, get, np_dtype)


def eos_token_ids(model_dir: str | Path, cfg: Config) -> tuple[int, ...]:
    """End-of-sequence ids from generation_config.json, else from config.json; each id in the vocabulary."""
    path = Path(model_dir) / "generation_config.json"
    if path.is_file():
        fix = "fix or delete generation_config.json"
        raw = read_json(path, fix)
        if not isinstance(raw, dict):
            raise OracleError(f"{path}: expected a JSON object {{...}}, got {show(raw)}; {fix}")
        if raw.get("eos_token_id") is not None:
            return check_token_ids(raw["eos_token_id"], "eos_token_id", cfg.vocab_size, str(path), fix)
    return cfg.eos_token_ids


def load_reference(model: str, dtype: str, backend: str | None = None):
    """(model_dir, weights, tokenizer or None, eos ids, engine None): a checkpoint alias or directory for the reference."""

    if backend is not None:
        raise OracleError(f"load_reference loads the reference only, not --backend {backend}")
    model_dir = resolve_model(model)
    weights = load_weights(model_dir, dtype)
    tok = load_tokenizer(model_dir) if (model_dir / "tokenizer.json").is_file() else None
    return model_dir, weights, tok, eos_token_ids(model_dir, weights.config), None
