"""Atomic file writes: every artifact lands by write-to-temp then rename, so nobody
ever sees half a video, half a report, or half a copied result.

None of them writes through a symbolic link: a temp file is created afresh
(``O_EXCL | O_NOFOLLOW``), and the rename onto the final name replaces a link there
rather than following it. ``open_regular`` reads a file that others could have put in
place (a drop folder's) without following a link or blocking on a FIFO.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

COPY_CHUNK = 1024 * 1024
_TYPES = {stat.S_IFLNK: "a symbolic link", stat.S_IFIFO: "a FIFO (named pipe)",
          stat.S_IFSOCK: "a socket", stat.S_IFCHR: "a character device",
          stat.S_IFBLK: "a block device", stat.S_IFDIR: "a directory"}


class NotRegularFile(OSError):
    """``open_regular`` found something other than a regular file there."""

    def __init__(self, path: Path, what: str):
        super().__init__(f"{path} is {what}, not a regular file")
        self.path, self.what = path, what


class Changed(OSError):
    """``move_file``'s source is no longer the file it was expected to be."""


def file_type(mode: int) -> str:
    """"a symbolic link", "a FIFO (named pipe)"…: what a ``st_mode`` says the entry is."""
    return _TYPES.get(stat.S_IFMT(mode), "a regular file" if stat.S_ISREG(mode)
                      else "an unknown kind of file")


def open_regular(path: Path) -> BinaryIO:
    """Open ``path`` for reading if it is a regular file; raise ``NotRegularFile`` if not.

    A symbolic link is never followed (``O_NOFOLLOW``), and anything but a regular file
    is refused by ``lstat`` before it is opened, so a FIFO or a device is never opened
    for long: the open itself cannot block (``O_NONBLOCK``), and ``fstat`` on the
    descriptor checks what was opened, so an entry swapped in between is refused too.
    Read everything (size, owner, content) from the returned handle, never by name.
    """
    mode = os.lstat(path).st_mode
    if not stat.S_ISREG(mode):
        raise NotRegularFile(path, file_type(mode))
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise NotRegularFile(path, file_type(stat.S_IFLNK)) from None
        raise
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise NotRegularFile(path, file_type(mode))
    return os.fdopen(fd, "rb")


def _create(path: Path) -> BinaryIO:
    """A new file at ``path``, never one reached through a link planted there."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    return os.fdopen(os.open(path, flags, 0o666), "wb")


def temp_name(path: Path) -> Path:
    # Hidden and ending in .tmp, so the folder intake ignores it in a watch folder. The
    # same name every time: a writer killed mid-copy (SIGKILL skips any cleanup) leaves
    # its partial file under the name the redo writes over, so none is left for good.
    return path.with_name(f".{path.name}.tmp")


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path to write to; on success it is renamed onto ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_name(path)
    tmp.unlink(missing_ok=True)  # a partial one left by a killed writer, or a planted link
    try:
        yield tmp
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_bytes(path: Path, data: bytes) -> None:
    with atomic_path(path) as tmp, _create(tmp) as out:
        out.write(data)


def write_text(path: Path, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def write_json(path: Path, data: Any) -> None:
    write_text(path, json.dumps(data, indent=2, ensure_ascii=False, default=str) + "\n")


def copy_file(src: Path, dest: Path) -> None:
    with open(src, "rb") as handle:
        copy_from(handle, dest)


def copy_from(handle: BinaryIO, dest: Path) -> None:
    """Copy what ``handle`` reads from where it stands to ``dest``, atomically."""
    with atomic_path(dest) as tmp, _create(tmp) as out:
        shutil.copyfileobj(handle, out, COPY_CHUNK)


def move_file(src: Path, dest: Path, expect: os.stat_result | None = None) -> None:
    """Move ``src`` to ``dest`` atomically: a hard link under a temp name, renamed into
    place, then ``src`` removed (copy + rename across file systems). A symbolic link or
    other special file is moved as itself (renamed), never what it points to. With
    ``expect``, ``src`` must still be that file (the same inode, size and modification
    time) when it is linked or copied, or ``Changed`` is raised and nothing is moved.

    Not a plain rename: a rename out of a watched folder reaches watchdog as an unpaired
    "moved from", which it holds back half a second to pair it, and every later event
    of that folder waits behind it. A removal is reported at once. A crash in between
    leaves both names, and the move can simply be done again.
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_name(dest)
    tmp.unlink(missing_ok=True)
    try:
        os.link(src, tmp, follow_symlinks=False)
    except FileNotFoundError:
        raise
    except OSError:  # another file system, one without hard links, or not ours to link
        if not stat.S_ISREG(os.lstat(src).st_mode):
            _same(os.lstat(src), expect)
            os.rename(src, dest)  # a link, FIFO, socket: renamed as itself
            return
        with open_regular(src) as handle:
            _same(os.fstat(handle.fileno()), expect)
            copy_from(handle, dest)
    else:
        try:
            _same(os.lstat(tmp), expect)
        except Changed:
            tmp.unlink()
            raise
        os.replace(tmp, dest)
    src.unlink()


def _same(found: os.stat_result, expect: os.stat_result | None) -> None:
    def key(s: os.stat_result) -> tuple[int, ...]:
        return s.st_dev, s.st_ino, s.st_size, s.st_mtime_ns

    if expect is not None and key(found) != key(expect):
        raise Changed(errno.ESTALE, "the file changed since it was read")
