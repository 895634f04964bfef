"""Content rules: ``[queue] blocklist`` patterns checked against what a job would make."""

from __future__ import annotations

import re
from collections.abc import Iterable

from daemon.jobs import JobError


def check(texts: Iterable[str], patterns: list[str], what: str) -> None:
    """Raise ``JobError`` naming the rule when any text matches a pattern."""
    for pattern in patterns:
        for text in texts:
            if re.search(pattern, text, re.IGNORECASE):
                raise JobError(f"the {what} matches this server's content rule {pattern!r} "
                               "([queue] blocklist), so the job was not run")
