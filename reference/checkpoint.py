"""Checkpoint: a Hugging Face-layout directory turned into Weights, checked before any maths.

A directory holds `config.json`, either `model.safetensors` or shards listed in
`model.safetensors.index.json`, `tokenizer.json`, and optionally
`generation_config.json`. The loader computes the full set of tensor names and
shapes that the config implies, and refuses a checkpoint where one is missing,
has another shape, or holds a non-finite value, naming the tensor.

Tensors are memory-mapped: a float32 tensor used in float32 is a view of the
file (never copied); F16/BF16, or any tensor used in float64, is converted once.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from reference.config import Config, load_config
from reference.errors import OracleError
from reference.safetensors_io import SafetensorsFile, map_tensor, open_mapped, read_header

DTYPES = {"float32": np.float32, "float64": np.float64}


@dataclass(frozen=True)
class LayerWeights:
    """One decoder layer. Projections are stored as in HF: (out, in), used as x @ W.T."""

    attn_norm: np.ndarray  # (D,)
    wq: np.ndarray  # (H*hd, D)
    wk: np.ndarray  # (H_kv*hd, D)
    wv: np.ndarray  # (H_kv*hd, D)
    wo: np.ndarray  # (D, H*hd)
    bq: np.ndarray | None  # (H*hd,)
    bk: np.ndarray | None  # (H_kv*hd,)
    bv: np.ndarray | None  # (H_kv*hd,)
    bo: np.ndarray | None  # (D,)
    mlp_norm: np.ndarray  # (D,)
    w_gate: np.ndarray  # (F, D)
    w_up: np.ndarray  # (F, D)
    w_down: np.ndarray  # (D, F)


@dataclass(frozen=True)
class Weights:
    config: Config
    embed: np.ndarray  # (V, D)
    layers: tuple[LayerWeights, ...]
    norm: np.ndarray  # (D,)
    lm_head: np.ndarray  # (V, D); the embedding itself when tied
    dtype: np.dtype


def expected_tensors(cfg: Config) -> dict[str, tuple[int, ...]]:
    """Every tensor name the config implies, with its shape."""
    D, F, V, hd = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size, cfg.head_dim
    q_out, kv_out = cfg.num_attention_heads * hd, cfg.num_key_value_heads * hd
    shapes = {"model.embed_tokens.weight": (V, D), "model.norm.weight": (D,)}
    if not cfg.tie_word_embeddings:
        shapes["lm_head.weight"] = (V, D)
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        shapes |= {
            p + "input_layernorm.weight": (D,),
            p + "self_attn.q_proj.weight": (q_out, D),
            p + "self_attn.k_proj.weight": (kv_out, D),
            p + "self_attn.v_proj.weight": (kv_out, D),
            p + "self_attn.o_proj.weight": (D, q_out),
            p + "post_attention_layernorm.weight": (D,),
            p + "mlp.gate_proj.weight": (F, D),
            p + "mlp.up_proj.weight": (F, D),
            p + "mlp.down_proj.weight": (D, F),
        }
        if cfg.attention_bias:
            shapes |= {
                p + "self_attn.q_proj.bias": (q_out,),
                p + "self_attn.k_proj.bias": (kv_out,),
                p + "self_attn.v_proj.bias": (kv_out,),
            }
        if cfg.o_proj_bias:
            shapes[p + "self_attn.o_proj.bias"] = (D,)
    return shapes


def shard_files(model_dir: Path) -> dict[str, Path]:
    """tensor name -> the .safetensors file that holds it."""
    single = model_dir / "model.safetensors"
    index = model_dir / "model.safetensors.index.json"
    if single.is_file():
        return {name: single for name in read_header(single).tensors}
    if not index.is_file():
        raise OracleError(
            f"{model_dir}: neither model.safetensors nor model.safetensors.index.json found; "
            "only safetensors checkpoints are supported (convert .bin/.pt files first)"
        )
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise OracleError(f"{index}: not a valid safetensors index ({e!r})") from None
    files = {name: model_dir / shard for name, shard in weight_map.items()}
    for shard in sorted(set(files.values())):
        if not shard.is_file():
            raise OracleError(f"{index}: lists shard '{shard.name}', which is missing from {model_dir}")
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


def open_checkpoint(model_dir: Path) -> tuple[Config, dict[str, Path], dict[str, tuple[int, ...]]]:
    """config, tensor name -> file, tensor name -> expected shape; every expected tensor present."""
    cfg = load_config(model_dir)
    files = shard_files(model_dir)
    shapes = expected_tensors(cfg)
    missing = [name for name in shapes if name not in files]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise OracleError(
            f"{model_dir}: tensor '{missing[0]}'{more} is missing; config.json "
            f"(model_type={cfg.model_type}, {cfg.num_hidden_layers} layers) expects it"
        )
    return cfg, files, shapes


def assemble(cfg: Config, get, dtype) -> Weights:
    """Weights from `get(name)`, which returns each checked tensor (host or device array)."""
    shapes = expected_tensors(cfg)

    def maybe(name: str):
        return get(name) if name in shapes else None

    layers = []
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        layers.append(
            LayerWeights(
                attn_norm=get(p + "input_layernorm.weight"),
                wq=get(p + "self_attn.q_proj.weight"),
                wk=get(p + "self_attn.k_proj.weight"),
                wv=get(p + "self_attn.v_proj.weight"),
                wo=get(p + "self_attn.o_proj.weight"),
                bq=maybe(p + "self_attn.q_proj.bias"),
                bk=maybe(p + "self_attn.k_proj.bias"),
                bv=maybe(p + "self_attn.v_proj.bias"),
                bo=maybe(p + "self_attn.o_proj.bias"),
                mlp_norm=get(p + "post_attention_layernorm.weight"),
                w_gate=get(p + "mlp.gate_proj.weight"),
                w_up=get(p + "mlp.up_proj.weight"),
                w_down=get(p + "mlp.down_proj.weight"),
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
