"""Where the project's own files are (the root, conf/), where this machine's cache is, and how a user's relative path
is resolved."""

from __future__ import annotations

import os
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[2]
# conf/ lives beside the package in the repository; PUZZLE_CONF_DIR points elsewhere.
CONF_DIR = Path(os.environ.get("PUZZLE_CONF_DIR", PROJECT_ROOT / "conf"))


def resolve_path(path: str | os.PathLike[str]) -> Path:
    """A user path: absolute or ~ as given; a relative one from the cwd, else from the project root."""
    p = Path(path).expanduser()
    if p.is_absolute():
        return p
    if p.exists() or not (PROJECT_ROOT / p).exists():
        return p.absolute()
    return PROJECT_ROOT / p


def default_cache_root() -> Path:
    """This machine's cache, shared by every run: $PUZZLE_CACHE, else ~/.cache/puzzle (default parents, imported GGUF
    checkpoints, profile timings)."""
    return Path(os.environ.get("PUZZLE_CACHE") or Path.home() / ".cache" / "puzzle").expanduser()
