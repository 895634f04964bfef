"""The job kinds. Each kind is one module here with:

- ``Options``: a pydantic model of the options a job of that kind accepts
  (``extra="forbid"``, so a misspelt option is an error, not silently ignored);
- ``INPUTS``: the file suffixes a job of that kind takes as inputs (empty: none);
- ``check_request(prompt, options)``: cross-field checks, raising ``JobError``;
- ``run(job: JobContext) -> JobResult``: the one entry point, top to bottom.

Adding a kind means adding its module and one line to ``_KINDS``. Kinds declared in
the config as ``[pipelines.<name>]`` (research models run by their own command line)
are registered by ``register_commands`` when the config is read.
"""

from __future__ import annotations

import importlib
import re
from types import ModuleType
from typing import Any

from daemon.jobs import JobError

_KINDS = {
    "video": "workers.pipelines.video",
    "long_exposure": "workers.pipelines.long_exposure",
    "caption": "workers.pipelines.caption",
    "upscale": "workers.pipelines.upscale",
}


_COMMANDS: dict[str, Any] = {}  # name → CommandPipeline, from the config


def register_commands(specs: dict[str, Any]) -> None:
    """Make each ``[pipelines.<name>]`` table a job kind (replacing earlier ones)."""
    from workers.pipelines.command import CommandPipeline

    for name in specs:
        if name in _KINDS:
            raise ValueError(f"pipelines.{name}: clashes with the built-in kind {name!r}")
        if not re.fullmatch(r"[a-z][a-z0-9_]{0,31}", name):
            raise ValueError(f"pipelines.{name}: a kind name is lowercase letters, digits and _")
    _COMMANDS.clear()
    _COMMANDS.update({name: CommandPipeline(name, spec) for name, spec in specs.items()})


def kinds() -> list[str]:
    return sorted([*_KINDS, *_COMMANDS])


def load(kind: str) -> ModuleType | Any:
    if kind in _COMMANDS:
        return _COMMANDS[kind]
    if kind not in _KINDS:
        raise JobError(f"unknown job kind {kind!r}; this server runs: {', '.join(kinds())}",
                       [{"field": "kind", "reason": f"unknown kind; one of {kinds()}"}])
    return importlib.import_module(_KINDS[kind])
