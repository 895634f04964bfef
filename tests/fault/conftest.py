"""Fixtures for the fault-injection suite. Every test module here marks itself
``pytest.mark.slow`` (a ``pytestmark`` in a conftest would not reach the modules)."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

SMALL_DISK_MB = 20


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 20 MB tmpfs to fill up. Mounting needs root (or CAP_SYS_ADMIN): elsewhere the
    test skips and says why."""
    mount = tmp_path / "small-disk"
    mount.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={SMALL_DISK_MB}m", "tmpfs",
                             str(mount)], capture_output=True, text=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a {SMALL_DISK_MB} MB tmpfs here (needs root and mount "
                    f"permission): {result.stderr.strip() or result.returncode}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)
