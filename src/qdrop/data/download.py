"""Atomic file downloads, shared by the data loaders and the model zoo."""

from __future__ import annotations

import hashlib
import os
import tempfile
import urllib.request
from pathlib import Path

# Set QDROP_OFFLINE=1 to fail fast instead of trying the network (tests, air-gapped machines).
OFFLINE_ENV = "QDROP_OFFLINE"


def offline() -> bool:
    return os.environ.get(OFFLINE_ENV, "") not in ("", "0")


def md5sum(path: Path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def download(url: str, dest: Path, md5: str | None = None, timeout: float = 30.0) -> Path:
    """Download `url` to `dest` atomically: a temp file in the same folder, checked, then renamed.

    A half-finished or corrupt download therefore never appears under the final name.
    Raises OSError (including urllib's URLError) on any failure.
    """
    if offline():
        raise OSError(f"not downloading {url}: {OFFLINE_ENV} is set")
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=dest.name + ".", suffix=".part", dir=dest.parent)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=timeout) as response:
            for chunk in iter(lambda: response.read(1 << 20), b""):
                out.write(chunk)
        if md5 is not None and (got := md5sum(tmp)) != md5:
            raise OSError(f"checksum mismatch for {url}: md5 {got}, expected {md5}")
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    return dest
