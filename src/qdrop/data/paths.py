"""Where qdrop looks for data and where it caches downloads."""

from __future__ import annotations

import os
from pathlib import Path


def _project_root() -> Path | None:
    """The qdrop checkout holding this file (a folder whose pyproject.toml names qdrop), if any."""
    for folder in Path(__file__).resolve().parents:
        pyproject = folder / "pyproject.toml"
        # Check the name: an installed copy may live under some other project's tree.
        if pyproject.is_file() and 'name = "qdrop"' in pyproject.read_text(errors="replace"):
            return folder
    return None


def data_root(explicit: str | os.PathLike | None = None) -> Path:
    """The data root: `explicit`, else $QDROP_DATA, else ../shared/data next to the project, else ~/.cache/qdrop/data."""
    if explicit is not None:
        return Path(explicit).expanduser()
    if os.environ.get("QDROP_DATA"):
        return Path(os.environ["QDROP_DATA"]).expanduser()
    project = _project_root()
    shared = (project if project is not None else Path.cwd()) / ".." / "shared" / "data"
    if shared.is_dir():
        return shared.resolve()
    return Path.home() / ".cache" / "qdrop" / "data"


def cache_dir() -> Path:
    """Where downloaded and trained models live: $QDROP_CACHE, else ~/.cache/qdrop."""
    if os.environ.get("QDROP_CACHE"):
        return Path(os.environ["QDROP_CACHE"]).expanduser()
    return Path.home() / ".cache" / "qdrop"
