"""Every malformed .safetensors file gets an OracleError naming the problem; BF16 is exact."""

import json
import struct

import numpy as np
import pytest
from safetensors.numpy import save_file

from reference.errors import OracleError
from reference.io.safetensors import (
    bf16_bits,
    map_tensor,
    open_mapped,
    read_header,
    save,
    widen,
)


def write_raw(path, header: dict, data: bytes, header_len: int | None = None):
    blob = json.dumps(header).encode()
    n = len(blob) if header_len is None else header_len
    path.write_bytes(struct.pack("<Q", n) + blob + data)
    return path


def test_reads_what_safetensors_writes(tmp_path):
    a = np.arange(12, dtype=np.float32).reshape(3, 4)
    b = np.linspace(-1, 1, 5).astype(np.float16)
    save_file({"a": a, "b": b}, tmp_path / "m.safetensors")
    f = read_header(tmp_path / "m.safetensors")
    mapped = open_mapped(f)
    np.testing.assert_array_equal(map_tensor(f, "a", mapped), a)
    np.testing.assert_array_equal(map_tensor(f, "b", mapped), b)


def test_float32_tensor_is_a_view_of_the_mapped_file(tmp_path):
    save_file({"a": np.ones((4, 4), np.float32)}, tmp_path / "m.safetensors")
    f = read_header(tmp_path / "m.safetensors")
    mapped = open_mapped(f)
    t = map_tensor(f, "a", mapped)
    assert np.shares_memory(t, mapped)
    assert not t.flags.writeable


def test_bf16_widening_is_exact_for_every_finite_bit_pattern():
    bits = np.arange(2**16, dtype=np.uint16)
    wide = widen(bits, "BF16")
    finite = np.isfinite(wide)
    # The float32 has the bf16 bits on top and zeros below, so rounding back is the identity.
    assert (wide.view(np.uint32)[finite] & 0xFFFF == 0).all()
    np.testing.assert_array_equal(bf16_bits(wide[finite]), bits[finite])


def test_bf16_rounding_is_to_nearest_even():
    # 1 + 2^-8 lies halfway between bf16 neighbours 1 and 1 + 2^-7: ties go to the even one (1).
    x = np.array([1.0 + 2.0**-8, 1.0 + 3 * 2.0**-8, 1.0 + 2.0**-9], dtype=np.float32)
    np.testing.assert_array_equal(widen(bf16_bits(x), "BF16"), np.array([1.0, 1.0 + 2.0**-6, 1.0], np.float32))


def test_save_bf16_round_trip(tmp_path):
    x = np.random.default_rng(0).standard_normal((7, 3)).astype(np.float32)
    save({"x": x}, tmp_path / "m.safetensors", "BF16")
    f = read_header(tmp_path / "m.safetensors")
    assert f.tensors["x"].dtype == "BF16"
    got = map_tensor(f, "x", open_mapped(f))
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, x, rtol=2**-8)


def test_truncated_file(tmp_path):
    save_file({"a": np.ones(100, np.float32)}, tmp_path / "m.safetensors")
    blob = (tmp_path / "m.safetensors").read_bytes()
    (tmp_path / "m.safetensors").write_bytes(blob[:-40])
    with pytest.raises(OracleError, match="outside the data region"):
        read_header(tmp_path / "m.safetensors")


def test_file_shorter_than_the_length_prefix(tmp_path):
    (tmp_path / "m.safetensors").write_bytes(b"\x01\x02")
    with pytest.raises(OracleError, match="too short"):
        read_header(tmp_path / "m.safetensors")


def test_header_length_larger_than_file(tmp_path):
    path = write_raw(tmp_path / "m.safetensors", {}, b"", header_len=10_000)
    with pytest.raises(OracleError, match="header length 10000 is larger than the file"):
        read_header(path)


def test_header_not_json(tmp_path):
    path = tmp_path / "m.safetensors"
    path.write_bytes(struct.pack("<Q", 5) + b"{nope")
    with pytest.raises(OracleError, match="not valid JSON"):
        read_header(path)


def test_overlapping_offsets(tmp_path):
    header = {
        "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
        "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]},
    }
    path = write_raw(tmp_path / "m.safetensors", header, bytes(12))
    with pytest.raises(OracleError, match="'a' and 'b' overlap"):
        read_header(path)


def test_out_of_range_offsets(tmp_path):
    header = {"a": {"dtype": "F32", "shape": [4], "data_offsets": [8, 24]}}
    path = write_raw(tmp_path / "m.safetensors", header, bytes(16))
    with pytest.raises(OracleError, match=r"data_offsets \[8, 24\] outside"):
        read_header(path)


def test_offsets_disagree_with_shape(tmp_path):
    header = {"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}
    path = write_raw(tmp_path / "m.safetensors", header, bytes(8))
    with pytest.raises(OracleError, match="spans 8 bytes but shape"):
        read_header(path)


def test_unknown_dtype(tmp_path):
    header = {"a": {"dtype": "F8_E4M3", "shape": [4], "data_offsets": [0, 4]}}
    path = write_raw(tmp_path / "m.safetensors", header, bytes(4))
    with pytest.raises(OracleError, match="unknown or unsupported dtype 'F8_E4M3'"):
        read_header(path)
