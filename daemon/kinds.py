"""Job kinds as the core sees them: what a request of each kind may carry.

The core never imports a kind. The process that needs them (the daemon service, a
worker, the CLI) builds a ``KindRegistry`` from the kinds it has
(``workers.pipelines.kind_registry``) and hands it to whatever submits or runs jobs.
A kind is loaded the first time it is asked for, so a daemon that only ever sees
``video`` jobs never imports the upscaler.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path, PurePath
from typing import Any, Protocol

from pydantic import BaseModel, ValidationError

from daemon.config import Config
from daemon.jobs import JobError, describe_validation_error, validation_problems

MAX_PROMPT_CHARS = 10_000


class Kind(Protocol):
    """What every job kind declares (a module or an object with these attributes)."""

    Options: type[BaseModel]  # the options a job may set; extra="forbid"
    INPUTS: tuple[str, ...]  # the file suffixes it takes as inputs; () for text only

    def check_request(self, prompt: str, options: Any) -> None:
        """Cross-field checks; raise ``JobError`` saying what to change."""

    def run(self, job: Any) -> Any:
        """Do the job, top to bottom (in the worker)."""

    def models(self, config: Config) -> dict[str, Path]:
        """The model files or folders it needs under ``config``, by the setting that names
        each (``"[upscale] model"``): what the doctor checks is there and intact."""

    def unavailable(self, config: Config) -> str | None:
        """Why this server cannot run such a job now (its model is not configured or not
        installed), with what to do; None when it can. Asked at submission."""


class KindRegistry:
    """The job kinds one process knows, by name, each loaded on first use."""

    def __init__(self, loaders: Mapping[str, Callable[[], Kind]]):
        self._loaders = dict(loaders)
        self._loaded: dict[str, Kind] = {}

    def names(self) -> list[str]:
        return sorted(self._loaders)

    def get(self, name: str) -> Kind:
        if name not in self._loaders:
            raise JobError(f"unknown job kind {name!r}; this server runs: "
                           f"{', '.join(self.names())}",
                           [{"field": "kind", "reason": f"unknown kind; one of {self.names()}"}])
        if name not in self._loaded:
            self._loaded[name] = self._loaders[name]()
        return self._loaded[name]

    def inputs(self, name: str) -> tuple[str, ...]:
        return tuple(self.get(name).INPUTS)

    def models(self, config: Config) -> dict[str, tuple[str, Path]]:
        """Every kind's models under ``config``: setting → (kind, path). Loads each kind."""
        return {setting: (name, path) for name in self.names()
                for setting, path in self.get(name).models(config).items()}

    def validate(self, kind: str, prompt: str, options: dict[str, Any],
                 inputs: list[str] | None = None,
                 max_prompt_chars: int = MAX_PROMPT_CHARS) -> dict[str, Any]:
        """Check a request (and the names of its input files) before anything of it is
        written; return the normalised options. Raises ``JobError`` naming the field."""
        plugin = self.get(kind)
        takes = tuple(plugin.INPUTS)
        if takes and not inputs:
            raise JobError(f"a {kind} job needs an input file ({', '.join(takes)}), "
                           "not only text", [{"field": "file", "reason": "missing"}])
        for name in inputs or []:
            if PurePath(name).suffix.lower() not in takes:
                what = f"takes {', '.join(takes)} files" if takes else "takes no input files"
                raise JobError(f"a {kind} job {what}; {name!r} cannot be used",
                               [{"field": "file", "reason": f"{kind} {what}"}])
        if len(prompt) > max_prompt_chars:
            raise JobError(
                f"the prompt is {len(prompt):,} characters long; the limit is "
                f"{max_prompt_chars:,}",
                [{"field": "prompt", "reason": f"longer than {max_prompt_chars:,} characters"}],
            )
        try:
            parsed = plugin.Options.model_validate(options)
        except ValidationError as exc:
            problems = [{**p, "field": f"options.{p['field']}"}
                        for p in validation_problems(exc)]
            raise JobError(describe_validation_error(exc), problems) from None
        plugin.check_request(prompt, parsed)
        return parsed.model_dump(exclude_none=True)
