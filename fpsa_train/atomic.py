"""Atomic file writes: write a temporary sibling, flush it to disk, rename it over the target.

A reader (or a run killed mid-write and restarted) sees either the old file or the new one, never a partial one:
`os.replace` within one folder is atomic on POSIX file systems.
"""

from __future__ import annotations

import os
from typing import BinaryIO, Callable


def write_atomic(path: str | os.PathLike, write: Callable[[BinaryIO], None]) -> None:
    """Call `write(file)` on `.<name>.tmp-<pid>` beside `path`, flush it to disk, rename it over `path`; the
    temporary file is removed whatever happens."""
    path = os.fspath(path)
    tmp = os.path.join(os.path.dirname(path) or ".", f".{os.path.basename(path)}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    write_atomic(path, lambda f: f.write(data))


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    write_bytes_atomic(path, text.encode())
