"""Requests refused before they became jobs, kept for the morning digest: one JSON line
each in ``<state>/refusals/<UTC date>.jsonl``. A refused request has no job folder, so
without this record the digest would look cleaner than the night was."""

from __future__ import annotations

import json
import os
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

FOLDER = "refusals"


def record(state_dir: Path, *, channel: str, submitted_by: str, what: str, reason: str,
           kind: str = "", now: datetime | None = None) -> None:
    """Append one refusal. A single ``write`` of a line to a file opened for appending
    is atomic next to other writers on a local disk: lines never interleave."""
    now = now or datetime.now(UTC)
    folder = state_dir / FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    fields = {"channel": channel, "submitted_by": submitted_by, "what": what[:200],
              "kind": kind, "reason": reason[:2000]}
    # What was refused may be what made it invalid (a lone surrogate): kept as text.
    fields = {key: value.encode("utf-8", "replace").decode() for key, value in fields.items()}
    line = json.dumps({"at": now.isoformat(), **fields}, ensure_ascii=False) + "\n"
    fd = os.open(folder / f"{now:%Y-%m-%d}.jsonl", os.O_WRONLY | os.O_CREAT | os.O_APPEND,
                 0o640)
    try:
        os.write(fd, line.encode("utf-8"))
    finally:
        os.close(fd)


def read(state_dir: Path, since: datetime, until: datetime) -> list[dict[str, Any]]:
    """The refusals of ``[since, until)``, oldest first; ``at`` as a datetime."""
    found = []
    day = since.astimezone(UTC).date()
    while day <= until.astimezone(UTC).date():
        path = state_dir / FOLDER / f"{day:%Y-%m-%d}.jsonl"
        for line in path.read_text(encoding="utf-8").splitlines() if path.exists() else []:
            try:
                item = json.loads(line)
                item["at"] = datetime.fromisoformat(item["at"])
            except (ValueError, KeyError):
                continue  # a line cut by a full disk: skip it, keep the others
            if since <= item["at"] < until:
                found.append(item)
        day += timedelta(days=1)
    return found
