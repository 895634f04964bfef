"""Atomic file writes: every artifact lands by write-to-temp then rename, so nobody
ever sees half a video, half a report, or half a copied result."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any


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
    try:
        yield tmp
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_bytes(path: Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_text(path: Path, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def write_json(path: Path, data: Any) -> None:
    write_text(path, json.dumps(data, indent=2, ensure_ascii=False, default=str) + "\n")


def copy_file(src: Path, dest: Path) -> None:
    with atomic_path(dest) as tmp:
        shutil.copyfile(src, tmp)


def move_file(src: Path, dest: Path) -> None:
    """Move ``src`` to ``dest`` atomically: a hard link under a temp name, renamed into
    place, then ``src`` removed (copy + rename across file systems).

    Not a plain rename: a rename out of a watched folder reaches watchdog as an unpaired
    "moved from", which it holds back half a second to pair it, and every later event
    of that folder waits behind it. A removal is reported at once. A crash in between
    leaves both names, and the move can simply be done again.
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_name(dest)
    tmp.unlink(missing_ok=True)
    try:
        os.link(src, tmp)
    except OSError:  # another file system, or one without hard links
        copy_file(src, dest)
    else:
        os.replace(tmp, dest)
    src.unlink()
