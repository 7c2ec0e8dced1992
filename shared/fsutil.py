"""Crash-safe file operations: a reader sees the old file or the new one, never half of either."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import uuid
from collections.abc import Iterator
from pathlib import Path

_CHUNK = 1 << 20


def fsync_dir(folder: Path) -> None:
    """Make a rename or creation inside ``folder`` durable."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_file(path: Path) -> None:
    with path.open("rb") as handle:
        os.fsync(handle.fileno())


def atomic_write_bytes(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Write ``data`` to ``path`` through a temp file, fsync, rename, fsync of the folder."""
    temp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        temp.replace(path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def publish_dir(staging: Path, final: Path) -> None:
    """Fsync every file of ``staging`` and rename it to ``final`` (which must not exist)."""
    for child in staging.rglob("*"):
        if child.is_file():
            fsync_file(child)
    fsync_dir(staging)
    if final.exists():
        raise FileExistsError(f"{final} already exists")
    staging.rename(final)
    fsync_dir(final.parent)


def staging_dir_for(final: Path) -> Path:
    """A fresh hidden folder beside ``final`` (same file system, so the rename is atomic)."""
    staging = final.with_name(f".{final.name}.{uuid.uuid4().hex}.staging")
    staging.mkdir(parents=True)
    return staging


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """An exclusive advisory lock held across processes for the ``with`` block."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
