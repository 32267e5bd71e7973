"""Reading .safetensors files as memory-mapped NumPy arrays, with every header checked.

The format: 8 bytes little-endian header length n, n bytes of JSON header
{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}},
then the data region that the offsets index. We parse the header ourselves
(the `safetensors` package's NumPy reader copies every tensor and has no
bfloat16) so that a tensor is a read-only view of the mapped file, BF16 can be
widened exactly, and every malformed file gets an error that names the problem.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from reference.errors import OracleError

# safetensors dtype -> (numpy dtype of the stored bits, bytes per element)
STORED_DTYPES = {
    "F64": np.dtype("<f8"),
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype("<u2"),  # widened by bits in widen()
}
MAX_HEADER_BYTES = 100_000_000  # the safetensors format's own limit


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str  # a key of STORED_DTYPES
    shape: tuple[int, ...]
    begin: int  # byte offset into the data region
    end: int


@dataclass(frozen=True)
class SafetensorsFile:
    path: Path
    tensors: dict[str, TensorInfo]
    data_start: int  # byte offset of the data region in the file


def _bad(path: Path, why: str, fix: str = "re-download or re-convert the checkpoint") -> OracleError:
    return OracleError(f"{path}: {why}; {fix}")


def quote_name(name: str) -> str:
    """A tensor name for a one-line message: quoted, control characters escaped, shortened."""
    text = f"'{name}'" if name.isprintable() else repr(name)
    return text if len(text) <= 200 else text[:197] + "..."


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _short(value) -> str:
    try:
        text = repr(value)
    except (RecursionError, ValueError):  # nested too deeply, or an integer too long to print
        text = f"<{type(value).__name__}>"
    return text if len(text) <= 80 else text[:77] + "..."


def _parse_entry(path: Path, name: str, entry, data_size: int) -> TensorInfo:
    if not isinstance(entry, dict):
        raise _bad(path, f"header entry for {quote_name(name)} is not an object")
    dtype = entry.get("dtype")
    if not (isinstance(dtype, str) and dtype in STORED_DTYPES):
        raise _bad(
            path,
            f"tensor {quote_name(name)} has unknown or unsupported dtype {_short(dtype)} "
            f"(supported: {', '.join(STORED_DTYPES)})",
            "convert the checkpoint to F32, F16 or BF16",
        )
    shape = entry.get("shape")
    if not (isinstance(shape, list) and all(_is_int(s) and 0 <= s < 2**63 for s in shape)):
        raise _bad(path, f"tensor {quote_name(name)} has an invalid shape {_short(shape)} (expected a list of integers >= 0)")
    offsets = entry.get("data_offsets")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(o) for o in offsets)):
        raise _bad(path, f"tensor {quote_name(name)} has invalid data_offsets {_short(offsets)} (expected [begin, end])")
    begin, end = offsets
    if not 0 <= begin <= end <= data_size:
        raise _bad(
            path,
            f"tensor {quote_name(name)} has data_offsets [{begin}, {end}] outside the data region "
            f"of {data_size} bytes (truncated file?)",
        )
    n_bytes = math.prod(shape) * STORED_DTYPES[dtype].itemsize  # Python ints: no int64 overflow
    if end - begin != n_bytes:
        raise _bad(
            path,
            f"tensor {quote_name(name)} spans {end - begin} bytes but shape {_short(shape)} of {dtype} needs {n_bytes}",
        )
    return TensorInfo(name, dtype, tuple(shape), begin, end)


def _check_no_overlap(path: Path, tensors: list[TensorInfo]) -> None:
    spans = sorted(tensors, key=lambda t: (t.begin, t.end))
    for prev, cur in zip(spans, spans[1:]):
        if cur.begin < prev.end:
            raise _bad(path, f"tensors {quote_name(prev.name)} and {quote_name(cur.name)} overlap in the data region")


def _no_constant(name: str):
    raise ValueError(f"{name} is not valid JSON")


def read_header(path: str | Path) -> SafetensorsFile:
    """Parse and validate the header of a .safetensors file (no tensor data is read)."""
    path = Path(path)
    if not path.is_file():
        raise OracleError(f"{path}: file not found")
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise _bad(path, f"file is {size} bytes, too short to be safetensors (truncated?)")
            (n,) = struct.unpack("<Q", prefix)
            if n > size - 8:
                raise _bad(path, f"header length {n} is larger than the file ({size} bytes): truncated or not safetensors")
            if n > MAX_HEADER_BYTES:
                raise _bad(path, f"header length {n} exceeds the format's limit of {MAX_HEADER_BYTES}")
            raw = f.read(n)
    except OSError as e:
        raise _bad(path, f"cannot be read ({e.strerror or e})", "check the file's permissions") from None
    if len(raw) != n:
        raise _bad(path, f"header of {n} bytes could not be read in full (the file changed while reading?)")
    try:
        header = json.loads(raw.decode("utf-8"), parse_constant=_no_constant)
    except UnicodeDecodeError as e:
        raise _bad(path, f"header is not UTF-8 (invalid byte at offset {8 + e.start})") from None
    except json.JSONDecodeError as e:
        raise _bad(path, f"header is not valid JSON ({e})") from None
    except ValueError as e:  # NaN / Infinity, or an integer literal too long to convert
        raise _bad(path, f"header is not valid JSON ({e})") from None
    except RecursionError:
        raise _bad(path, "header is not valid JSON (nested too deeply)") from None
    if not isinstance(header, dict):
        raise _bad(path, "header is not a JSON object")
    metadata = header.get("__metadata__", {})
    if not (isinstance(metadata, dict) and all(isinstance(v, str) for v in metadata.values())):
        raise _bad(path, "header's __metadata__ is not an object of strings")
    data_start = 8 + n
    data_size = size - data_start
    tensors = [
        _parse_entry(path, name, entry, data_size)
        for name, entry in header.items()
        if name != "__metadata__"
    ]
    _check_no_overlap(path, tensors)
    return SafetensorsFile(path, {t.name: t for t in tensors}, data_start)


def widen(stored: np.ndarray, dtype: str) -> np.ndarray:
    """Stored bits -> a float array; BF16 is widened exactly: its bits are float32's top half."""
    if dtype == "BF16":
        return (stored.astype(np.uint32) << np.uint32(16)).view(np.float32)
    return stored


def map_tensor(file: SafetensorsFile, name: str, mapped: np.memmap) -> np.ndarray:
    """A read-only view of tensor `name` in the mapped file (BF16: a widened float32 copy)."""
    info = file.tensors[name]
    stored_dtype = STORED_DTYPES[info.dtype]
    stored = np.ndarray(
        info.shape, dtype=stored_dtype, buffer=mapped, offset=file.data_start + info.begin
    )
    return widen(stored, info.dtype)


def open_mapped(file: SafetensorsFile) -> np.memmap:
    """Memory-map the whole file read-only; tensors are views into it."""
    return np.memmap(file.path, dtype=np.uint8, mode="r")


def bf16_bits(x: np.ndarray) -> np.ndarray:
    """float32 -> the uint16 bits of the nearest bfloat16 (round half to even); widen() inverts it."""
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounding = np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))
    return ((bits + rounding) >> np.uint32(16)).astype(np.uint16)


def save(tensors: dict[str, np.ndarray], path: str | Path, dtype: str = "F32") -> None:
    """Write float tensors as one .safetensors file stored in `dtype` (F32, F16 or BF16)."""
    import safetensors

    if dtype not in ("F32", "F16", "BF16"):
        raise OracleError(f"cannot write dtype {dtype!r}; choose F32, F16 or BF16")
    stored = {
        name: bf16_bits(t) if dtype == "BF16" else np.ascontiguousarray(t, dtype=STORED_DTYPES[dtype])
        for name, t in tensors.items()
    }
    spec_dtype = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}[dtype]
    specs = {
        name: safetensors.TensorSpec(dtype=spec_dtype, shape=a.shape, data_ptr=a.ctypes.data, data_len=a.nbytes)
        for name, a in stored.items()
    }
    safetensors.serialize_file(specs, str(path), metadata={"format": "pt"})
