"""The job kinds. Each kind is one module here with:

- ``Options``: a pydantic model of the options a job of that kind accepts
  (``extra="forbid"``, so a misspelt option is an error, not silently ignored);
- ``INPUTS``: the file suffixes a job of that kind takes as inputs (empty: none);
- ``check_request(prompt, options)``: cross-field checks, raising ``JobError``;
- ``run(job: JobContext) -> JobResult``: the one entry point, top to bottom.

Adding a kind means adding its module (and, if it has config tables, a light
``<kind>_settings`` module declaring ``SETTINGS``) and one line to ``BUILT_IN`` (or,
outside this package, one ``[plugins] kinds`` entry). Kinds declared in the config as
``[pipelines.<name>]`` (research models run by their own command line) join them in the
registry each process builds with ``kind_registry``.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

from daemon.config import CommandPipelineConfig, Config, ConfigError, Tables
from daemon.kinds import Kind, KindRegistry


@dataclass(frozen=True)
class BuiltIn:
    module: str  # the kind: Options, INPUTS, check_request, models, run
    settings: str | None = None  # its config tables (SETTINGS), light to import


BUILT_IN = {
    "video": BuiltIn("workers.pipelines.video", "workers.pipelines.video_settings"),
    "long_exposure": BuiltIn("workers.pipelines.long_exposure"),
    "caption": BuiltIn("workers.pipelines.caption", "workers.pipelines.caption_settings"),
    "upscale": BuiltIn("workers.pipelines.upscale", "workers.pipelines.upscale_settings"),
}
_KIND_NAME = re.compile(r"[a-z][a-z0-9_]{0,31}")


def _command(name: str, spec: CommandPipelineConfig) -> Kind:
    from workers.pipelines.command import CommandPipeline  # loaded with its first job

    return CommandPipeline(name, spec)


def kind_registry(config: Config | None = None) -> KindRegistry:
    """The built-in kinds, one per ``[pipelines.<name>]`` table of ``config`` and one per
    ``[plugins] kinds`` entry. A name that cannot be a kind, or is taken already, is a
    ``ConfigError``, reported like any other key of the file."""
    loaders: dict[str, Callable[[], Kind]] = {
        name: partial(importlib.import_module, kind.module) for name, kind in BUILT_IN.items()}
    origin = config.source_path if config and config.source_path else "config"
    added = {f"pipelines.{name}": (name, partial(_command, name, spec))
             for name, spec in (config.pipelines if config else {}).items()}
    added |= {f"plugins.kinds.{name}": (name, partial(importlib.import_module, module))
              for name, module in (config.plugins.kinds if config else {}).items()}
    for key, (name, loader) in added.items():
        problem = (f"clashes with the built-in kind {name!r}" if name in BUILT_IN else
                   f"clashes with the kind {name!r}" if name in loaders else
                   None if _KIND_NAME.fullmatch(name) else
                   "a kind name is lowercase letters, digits and _")
        if problem:
            raise ConfigError(f"{origin}: invalid configuration\n  {key}: {problem}")
        loaders[name] = loader
    return KindRegistry(loaders)


def kind_tables() -> Tables:
    """The config tables the built-in kinds own ([video], [post], [upscale], …)."""
    tables: dict[str, object] = {}
    for kind in BUILT_IN.values():
        if kind.settings:
            tables |= importlib.import_module(kind.settings).SETTINGS
    return tables
