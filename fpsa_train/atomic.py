"""Atomic writes: a new file, folder or link is written under a temporary sibling name and renamed over the target.

A reader (or a run killed mid-write and restarted) sees either the old version or the new one, never a partial
one: `os.replace` within one folder is atomic on POSIX file systems.

- Files: `atomic_path` yields the temporary name to writers that take a file name (safetensors, PyAV, PIL);
  `write_atomic` hands a file object, `write_bytes_atomic` / `write_text_atomic` take the contents. The file is
  flushed to disk before the rename, so a crash just after it cannot leave an empty file under the final name.
  The temporary name is `.<name>.tmp-<pid>`; it is removed whatever happens.
- Folders: `replacing_dir` yields a new empty folder to fill and, once the block completes, swaps it in for the
  target (`replace_dir`: the previous version is moved aside and deleted only once the new one is in place). Its
  temporary names record the writer (`temp_sibling`: host and pid), so that the next write of the same target can
  remove a killed writer's leftover and leave a running one's alone (`remove_stale_siblings`). A folder can hold
  gigabytes (an export of a 14B model), so such a leftover is worth finding.
- Links: `symlink_atomic` repoints a symlink (`last.ckpt`).
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import socket
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO, Callable

log = logging.getLogger(__name__)

_HOST = re.sub(r"[^A-Za-z0-9]", "", socket.gethostname())[:32] or "host"  # a name part without '-' or '.'


# --------------------------------------------------------------------------------------------------- files


def _temp_file(path: str) -> str:
    return os.path.join(os.path.dirname(path) or ".", f".{os.path.basename(path)}.tmp-{os.getpid()}")


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[str]:
    """Yield `.<name>.tmp-<pid>` beside `path` for the block to write; then flush it to disk and rename it over
    `path`. The temporary file is removed whatever happens (an exception in the block leaves `path` as it was)."""
    path = os.fspath(path)
    tmp = _temp_file(path)
    try:
        yield tmp
        fd = os.open(tmp, os.O_RDONLY)  # fsync through a new descriptor: the writer may have closed its own
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_atomic(path: str | os.PathLike, write: Callable[[BinaryIO], None]) -> None:
    """Call `write(file)` on a temporary file beside `path` and rename it over `path` (`atomic_path`)."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        write(f)


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    write_atomic(path, lambda f: f.write(data))


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    write_bytes_atomic(path, text.encode())


def symlink_atomic(target: str, link: str | os.PathLike) -> None:
    """Point the symlink `link` at `target` through a temporary link renamed over it: a reader always finds the old
    link or the new one. `link` may be a file or a link, not a folder (a rename cannot replace a folder)."""
    link = os.fspath(link)
    tmp = _temp_file(link)
    if os.path.lexists(tmp):
        os.remove(tmp)
    os.symlink(target, tmp)
    os.replace(tmp, link)


# ------------------------------------------------------------------------------------------------- folders


def temp_sibling(final: Path, kind: str) -> Path:
    """A hidden sibling of `final` for an atomic replace, `.{name}.{kind}-{host}-{pid}-{random}`: kind `tmp` (the
    new version being written) or `old` (the replaced version until it is deleted). Host and pid name the writer,
    so that a later write can tell a killed writer's leftover from a running one's (`remove_stale_siblings`)."""
    if kind not in ("tmp", "old"):
        raise ValueError(f"temp_sibling kind={kind!r}: expected 'tmp' or 'old'")
    return final.with_name(f".{final.name}.{kind}-{_HOST}-{os.getpid()}-{uuid.uuid4().hex[:8]}")


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True


def remove_stale_siblings(final: Path) -> list[Path]:
    """Delete what killed writes of `final` left beside it; returns the deleted paths.

    A leftover (`temp_sibling`; also `..{name}.tmp-...`, a weights save that exports before `replacing_dir` nested
    inside their own) is deleted when its writer ran on this host and that process is gone: a `tmp` always, an
    `old` only while `final` exists (a write killed between its two renames leaves the previous version only
    there). Kept and logged: a live writer's (a concurrent write to the same folder), another host's (its pid means
    nothing here), and names that carry no writer (from an fpsa before writers were recorded; delete those by hand
    once no write is running). By owner rather than by age: an export of a 14B model runs for minutes, so a
    leftover's age cannot say whether its writer is still at work; its pid can (a recycled pid only keeps a
    leftover longer)."""
    pattern = re.compile(rf"\.+{re.escape(final.name)}\.(?P<kind>tmp|old)-"
                         rf"(?:(?P<host>[A-Za-z0-9]+)-(?P<pid>\d+)-)?[0-9a-f]{{8}}")
    removed, kept = [], []
    for path in sorted(final.parent.iterdir()) if final.parent.is_dir() else []:
        match = pattern.match(path.name)
        if match is None:
            continue
        host, pid = match["host"], match["pid"]
        if host != _HOST or pid is None or _process_alive(int(pid)):
            kept.append(path)
        elif match["kind"] == "tmp" or final.exists():
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
            removed.append(path)
    if removed:
        log.info("removed %d leftover(s) of killed writes of %s: %s", len(removed), final,
                 ", ".join(p.name for p in removed))
    if kept:
        log.warning("kept %s beside %s: written by a running process, another host, or an older fpsa that did not "
                    "record its writer; delete by hand what no running write uses", ", ".join(p.name for p in kept),
                    final)
    return removed


def replace_dir(new: Path, final: Path) -> None:
    """Rename `new` to `final`; an existing `final` is moved aside first and deleted only once `new` is in place.
    Then the leftovers of earlier killed writes of `final` are removed (`remove_stale_siblings`)."""
    old = None
    if final.exists():
        old = temp_sibling(final, "old")
        final.rename(old)
    try:
        new.rename(final)
    except BaseException:
        if old is not None:
            old.rename(final)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)  # the new folder is in place: never fail the save for this
    try:
        remove_stale_siblings(final)
    except OSError as e:  # tidying up must not fail a complete save either
        log.warning("could not look for leftovers beside %s: %s", final, e)


@contextmanager
def replacing_dir(final: str | os.PathLike) -> Iterator[Path]:
    """Yield a new empty folder beside `final` (`temp_sibling`) for the block to fill; when the block completes it
    replaces `final` (`replace_dir`), when it raises it is deleted and `final` is left as it was. Creates the parent
    folder."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_sibling(final, "tmp")
    try:
        tmp.mkdir()
        yield tmp
        replace_dir(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
