"""Durable, atomic replacement of small files (the QDB file and its journal)."""

from __future__ import annotations

import os
from collections.abc import Callable


def replace_atomically(path: str, data: bytes) -> None:
    """Write data to a temporary file beside path, fsync it, rename it over path, and
    fsync the directory: after a crash or a full disk, path holds the old or the new
    contents, never a mix."""
    def fill(fd: int) -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
    replace_atomically_by(path, fill)


def replace_atomically_by(path: str, fill: Callable[[int], None]) -> None:
    """replace_atomically, with the new contents written by fill(fd)."""
    directory = os.path.dirname(os.path.abspath(path))
    temporary = os.path.join(directory, f".{os.path.basename(path)}.tmp{os.getpid()}")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        fill(fd)
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        os.unlink(temporary)
        raise
    os.close(fd)
    os.rename(temporary, path)
    fsync_directory(directory)


def fsync_directory(directory: str) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
