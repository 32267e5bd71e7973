"""Checkpoints streamed onto the device, tensor by tensor, with the reference's checks.

The reference's config parsing, shard listing, header checks and expected
shapes are reused as they are (`reference.io.checkpoint`). Each tensor is read
from its memory-mapped shard, sent to the device, checked for finiteness
there, and stored in the weight dtype: float16 on a GPU (BF16 checkpoints are
widened exactly, then rounded once), unless a tensor overflows float16 (it is
then kept in float32, and the loader says so). Phi-3's fused qkv_proj and
gate_up_proj are streamed, checked and converted as the one tensor each is on
disk, and split into row blocks (views, no copy) by the reference's `assemble`,
once, at load time.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from gpu.backend import is_cupy
from reference.errors import OracleError
from reference.io.checkpoint import (
    TensorReader,
    assemble,
    check_shape,
    non_finite_error,
    open_checkpoint,
)
from reference.model.weights import Weights, expected_tensors

WEIGHT_DTYPES = ("float16", "float32")
FLOAT16_MAX = 65504.0


@dataclass
class LoadReport:
    weight_dtype: str
    kept_float32: list[str] = field(default_factory=list)  # tensors that overflow float16
    device_bytes: int = 0


def _free_device_bytes(xp) -> int | None:
    if not is_cupy(xp):
        return None
    free, _total = xp.cuda.runtime.memGetInfo()
    return int(free)


def load_device_weights(model_dir: str | Path, xp, weight_dtype: str = "float16", progress: bool = True):
    """Weights (reference.io.checkpoint.Weights holding `xp` arrays) and a LoadReport."""
    if weight_dtype not in WEIGHT_DTYPES:
        raise OracleError(f"weight dtype must be one of {', '.join(WEIGHT_DTYPES)}, got {weight_dtype!r}")
    model_dir = Path(model_dir)
    cfg, files, shapes = open_checkpoint(model_dir)
    itemsize = np.dtype(weight_dtype).itemsize
    needed = sum(int(np.prod(s)) for s in shapes.values()) * itemsize
    free = _free_device_bytes(xp)
    if free is not None and needed > free:
        raise OracleError(
            f"{model_dir}: the weights need {needed / 2**30:.1f} GiB as {weight_dtype} but the device has "
            f"{free / 2**30:.1f} GiB free; use a larger device or a smaller model"
        )
    reader = TensorReader(files)
    report = LoadReport(weight_dtype)
    dtype = np.dtype(weight_dtype)

    from tqdm import tqdm

    bar = tqdm(total=len(shapes), desc=f"loading {model_dir.name}", unit="tensor", disable=not progress, file=sys.stderr)

    def get(name: str):
        host = reader.get(name)  # a view of the mapped shard (BF16: widened, one tensor at a time)
        check_shape(name, host, shapes[name], files[name])
        try:
            dev = xp.asarray(host, dtype=np.float32)
            if not bool(xp.isfinite(dev).all()):
                raise non_finite_error(name, files[name])
            if dtype == np.float16 and float(xp.abs(dev).max()) > FLOAT16_MAX:
                report.kept_float32.append(name)
            else:
                dev = dev.astype(dtype)
        except Exception as e:
            if type(e).__name__ == "OutOfMemoryError":
                raise OracleError(f"the device ran out of memory while loading '{name}'; the model does not fit") from None
            raise
        report.device_bytes += int(dev.nbytes)
        bar.update(1)
        return dev

    try:
        weights = assemble(cfg, get, np.dtype(np.float32))
    finally:
        bar.close()
    if report.kept_float32:
        print(f"note: {len(report.kept_float32)} tensor(s) overflow float16 and stay in float32: "
              f"{', '.join(report.kept_float32[:5])}", file=sys.stderr)
    return weights, report


def random_device_weights(cfg, xp, weight_dtype: str = "float16", seed: int = 0) -> Weights:
    """Random weights of a config's shapes, generated on the device (no download, no host staging)."""

    shapes = expected_tensors(cfg)
    rng = xp.random.default_rng(seed) if hasattr(xp.random, "default_rng") else xp.random.RandomState(seed)
    dtype = np.dtype(weight_dtype)

    def get(name: str):
        shape = shapes[name]
        if name.endswith("norm.weight"):
            return xp.ones(shape, dtype=dtype)
        fan_in = shape[-1] if len(shape) == 2 else 1
        std = 1.0 / fan_in**0.5 if len(shape) == 2 else 0.02
        return (rng.standard_normal(shape, dtype=np.float32) * std).astype(dtype)

    return assemble(cfg, get, np.dtype(np.float32))


def device_copy(weights: Weights, xp, weight_dtype: str = "float32") -> Weights:
    """Host Weights (e.g. random test models) copied to `xp` in the weight dtype."""
    import dataclasses

    dtype = np.dtype(weight_dtype)

    def put(a):
        return None if a is None else xp.asarray(np.asarray(a, dtype=np.float32)).astype(dtype)

    layers = tuple(type(lw)(**{f.name: put(getattr(lw, f.name)) for f in dataclasses.fields(lw)}) for lw in weights.layers)
    embed = put(weights.embed)
    lm_head = embed if weights.config.tie_word_embeddings else put(weights.lm_head)
    return Weights(weights.config, embed, layers, put(weights.norm), lm_head, np.dtype(np.float32))
