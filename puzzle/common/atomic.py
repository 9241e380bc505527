"""Atomic writes: a file or directory appears under its name complete or not at all.

A writer fills a temporary sibling (same directory, so the final rename stays on one file system), by default
`.<name>.tmp-<pid>`, and renames it into place; on an exception the temporary is removed. A process killed mid-write
leaves only its temporary behind, never a half-written result under the real name.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

PathLike = str | os.PathLike[str]


def temp_sibling(path: PathLike) -> Path:
    """The temporary name this process writes `path` under: `.<name>.tmp-<pid>` in the same directory."""
    path = Path(path)
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def remove_path(path: PathLike) -> None:
    """Remove a file, symlink or directory tree; nothing if it does not exist."""
    path = Path(path)
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def replace_path(new: PathLike, target: PathLike) -> None:
    """Rename `new` to `target`. A file replaces a file in one rename; where a directory is involved, an existing
    `target` is moved aside first (back again if the swap fails) and removed after it."""
    new, target = Path(new), Path(target)
    if not os.path.lexists(target) or not (new.is_dir() or (target.is_dir() and not target.is_symlink())):
        os.replace(new, target)
        return
    old = target.with_name(f".{target.name}.old-{uuid.uuid4().hex[:8]}")
    os.replace(target, old)
    try:
        os.replace(new, target)
    except OSError:
        os.replace(old, target)
        raise
    remove_path(old)


@contextmanager
def atomic_file(path: PathLike) -> Iterator[Path]:
    """Yield a temporary path to write `path` through: it replaces `path` when the block ends normally and is
    removed when it raises. Creates the parent directory."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_sibling(path)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_atomic(path: PathLike, data: str | bytes) -> Path:
    """Write text (UTF-8) or bytes to `path` atomically; returns the path."""
    with atomic_file(path) as tmp:
        if isinstance(data, bytes):
            tmp.write_bytes(data)
        else:
            tmp.write_text(data, encoding="utf-8")
    return Path(path)


def write_json_atomic(
    path: PathLike, data: Any, *, indent: int | None = 1, sort_keys: bool = False, default: Any = None, end: str = ""
) -> Path:
    """Write `json.dumps(data, indent=..., sort_keys=..., default=...) + end` to `path` atomically; returns the path."""
    return write_atomic(path, json.dumps(data, indent=indent, sort_keys=sort_keys, default=default) + end)


def save_safetensors_atomic(path: PathLike, tensors: Mapping[str, Any], metadata: dict[str, str] | None = None) -> Path:
    """Save tensors (detached, contiguous, on the CPU) as a safetensors file, atomically; returns the path."""
    from safetensors.torch import save_file

    with atomic_file(path) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    return Path(path)


def link_or_copy(src: PathLike, dst: PathLike) -> None:
    """Hard-link `src` (a file, or a directory tree file by file) to `dst`, copying where links are impossible
    (another file system)."""

    def link(a: str, b: str) -> None:
        try:
            os.link(a, b)
        except OSError:
            shutil.copy2(a, b)

    if Path(src).is_dir():
        shutil.copytree(src, dst, copy_function=link)
    else:
        link(str(src), str(dst))


def link_atomic(src: PathLike, dst: PathLike) -> Path:
    """Make `dst` the file or directory `src` (hard links, copies across file systems), replacing `dst` atomically."""
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_sibling(dst)
    remove_path(tmp)  # a leftover of a killed writer with this pid
    try:
        link_or_copy(src, tmp)
        replace_path(tmp, dst)
    finally:
        remove_path(tmp)
    return dst


@contextmanager
def atomic_dir(target: PathLike, *, tmp: PathLike | None = None) -> Iterator[Path]:
    """Yield a fresh empty directory to build `target` in (default `temp_sibling(target)`): it replaces `target`
    when the block ends normally (see `replace_path`) and is removed when it raises."""
    target = Path(target)
    tmp = Path(tmp) if tmp is not None else temp_sibling(target)
    remove_path(tmp)  # a leftover of a killed writer with this name
    tmp.mkdir(parents=True)
    try:
        yield tmp
        replace_path(tmp, target)
    finally:
        remove_path(tmp)


def build_once(target: PathLike, build: Callable[[Path], None], is_complete: Callable[[Path], bool]) -> bool:
    """Build directory `target` once per machine: under a file lock beside it (concurrent callers wait for one build),
    skipped when `is_complete(target)`, else written by `build(tmp)` into a temporary sibling that is renamed into
    place when it returns. Leftovers (an incomplete `target`, temporary directories of killed builds) are removed
    first. Returns whether this call built it."""
    from filelock import FileLock

    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(target.parent / f"{target.name}.lock"):
        if is_complete(target):
            return False
        if target.exists():  # never trust a directory without the completion mark
            shutil.rmtree(target)
        for stale in target.parent.glob(f".{target.name}-*"):
            shutil.rmtree(stale, ignore_errors=True)
        with atomic_dir(target, tmp=target.parent / f".{target.name}-{os.getpid()}") as tmp:
            build(tmp)
    return True
