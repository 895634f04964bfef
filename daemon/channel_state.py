"""Which channels the daemon runs, and why one does not: a small Redis hash that the
daemon keeps fresh (``reelqueue status``, the doctor and ``reelqueue demo`` read it).

One field per channel, its value JSON: ``state`` (``running``, ``starting`` or
``failed``), ``error`` (why the last start failed), ``attempts``, ``retry_in_s`` and
``pid`` (the daemon's). The hash expires ``TTL_S`` after the daemon's last refresh, so a
daemon that died leaves no stale "running" behind, and a clean stop deletes it.
"""

from __future__ import annotations

import json
from typing import Any

from daemon.schedule import PREFIX

KEY = PREFIX + "channels"
REFRESH_S = 5.0
TTL_S = 3 * REFRESH_S

RUNNING, STARTING, FAILED = "running", "starting", "failed"


def encode(states: dict[str, dict[str, Any]]) -> dict[str, str]:
    """The hash's fields, from each channel's state."""
    return {name: json.dumps(state, ensure_ascii=False) for name, state in states.items()}


def decode(raw: dict[Any, Any]) -> dict[str, dict[str, Any]]:
    """Each channel's state from the hash as Redis returns it (bytes or text)."""
    states = {}
    for name, value in raw.items():
        name = name.decode() if isinstance(name, bytes) else name
        try:
            states[name] = json.loads(value)
        except ValueError:
            continue
    return states


def describe(name: str, state: dict[str, Any]) -> str:
    """One line for a person: what the channel does now and, if it is down, why."""
    if state.get("state") == RUNNING:
        return f"channel {name}: running"
    if state.get("state") == FAILED:
        retry = state.get("retry_in_s")
        again = f"; trying again within {retry:g} s" if retry else ""
        return (f"channel {name}: NOT RUNNING (failed {state.get('attempts', 1)} time(s)): "
                f"{state.get('error', '')}{again}")
    return f"channel {name}: {state.get('state', 'unknown')}"
