"""Child processes that end with their supervisor, and finding the ones an earlier run
left behind.

``reelqueue up`` starts the daemon, the worker and the embedded Redis in sessions of
their own (a terminal's Ctrl-C reaches the supervisor alone, which stops them in
order). A session of their own also means they outlive a supervisor that is SIGKILLed,
holding the HTTP port and the Redis socket, unless the kernel tells them: each is
started with ``PR_SET_PDEATHSIG`` (Linux), and gets SIGTERM, its graceful stop, when
the process that started it dies. Children of those children (the Redis a daemon
started again) are tied the same way, through ``SUPERVISED_ENV``.
"""

from __future__ import annotations

import ctypes
import os
import signal
from collections.abc import Callable
from pathlib import Path

# Set in the environment of the supervisor's children: what they start dies with them.
SUPERVISED_ENV = "REELQUEUE_SUPERVISOR_PID"
_PR_SET_PDEATHSIG = 1


def supervised() -> bool:
    """Whether this process runs under ``reelqueue up``."""
    return SUPERVISED_ENV in os.environ


def die_with_parent() -> Callable[[], None] | None:
    """A ``preexec_fn`` for ``subprocess.Popen``: the child gets SIGTERM when this process
    dies (strictly: when the thread that started it ends, so start children from a
    thread that lives as long as the process). None where Linux's prctl is missing."""
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl  # resolved before the fork
    except (OSError, AttributeError):
        return None
    parent = os.getpid()

    def tie() -> None:
        prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
        if os.getppid() != parent:  # the parent died before the tie was made
            os.kill(os.getpid(), signal.SIGTERM)

    return tie


def command_line(pid: int) -> list[str] | None:
    """The arguments ``pid`` runs with, or None when no such (living) process exists."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        if stat.rpartition(")")[2].split()[0] == "Z":  # exited, waiting to be reaped
            return None
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (OSError, IndexError):
        return None
    return raw.decode(errors="replace").split("\0")[:-1] if raw else None


def still_running(pid: int, argv: list[str]) -> bool:
    """Whether ``pid`` is alive and still the process that was started with ``argv``
    (not a new one that reuses its number)."""
    return command_line(pid) == argv
