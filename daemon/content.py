"""Content rules: ``[queue] blocklist`` patterns checked against what a job would make:
its request at submission (``daemon.submit``), and in the worker what only exists there,
such as a storyboard an LLM wrote."""

from __future__ import annotations

import re
from collections.abc import Iterable

from daemon.jobs import JobError


def first_match(texts: Iterable[str], patterns: list[str]) -> str | None:
    """The first pattern (case-insensitive) that any of the texts matches, if any."""
    texts = list(texts)
    for pattern in patterns:
        if any(re.search(pattern, text, re.IGNORECASE) for text in texts):
            return pattern
    return None


def check(texts: Iterable[str], patterns: list[str], what: str) -> None:
    """Raise ``JobError`` naming the rule when any text matches a pattern."""
    if (pattern := first_match(texts, patterns)) is not None:
        raise JobError(f"the {what} matches this server's content rule {pattern!r} "
                       "([queue] blocklist), so the job was not run")
