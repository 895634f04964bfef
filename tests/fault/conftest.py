"""Fixtures for the fault-injection suite. Every test module here marks itself
``pytest.mark.slow`` (a ``pytestmark`` in a conftest would not reach the modules)."""

from __future__ import annotations

import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.conftest import Process

SMALL_DISK_MB = 20


@pytest.fixture
def start() -> Iterator[Callable[..., Process]]:
    """``start(config_file, "worker", "--name", "w1")``: a reelqueue process that is
    stopped (SIGTERM, then SIGKILL) when the test ends, whatever happened."""
    started: list[Process] = []

    def launch(config_file: Path, *args: str) -> Process:
        process = Process(config_file, *args)
        started.append(process)
        return process

    yield launch
    for process in started:
        if process.popen.poll() is None:
            process.stop()
        else:
            process.handle.close()


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
