"""The job kinds. Each kind is one module here with:

- ``Options``: a pydantic model of the options a job of that kind accepts
  (``extra="forbid"``, so a misspelt option is an error, not silently ignored);
- ``INPUTS``: the file suffixes a job of that kind takes as inputs (empty: none);
- ``check_request(prompt, options)``: cross-field checks, raising ``JobError``;
- ``run(job: JobContext) -> JobResult``: the one entry point, top to bottom.

Adding a kind means adding its module and one line to ``_KINDS``.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from daemon.jobs import JobError

_KINDS = {
    "video": "workers.pipelines.video",
    "long_exposure": "workers.pipelines.long_exposure",
}


def kinds() -> list[str]:
    return sorted(_KINDS)


def load(kind: str) -> ModuleType:
    if kind not in _KINDS:
        raise JobError(f"unknown job kind {kind!r}; this server runs: {', '.join(kinds())}",
                       [{"field": "kind", "reason": f"unknown kind; one of {kinds()}"}])
    return importlib.import_module(_KINDS[kind])
