"""What this installation is made of, for the processes that read the configuration:
the core's tables, and those of every built-in channel and job kind. A composition
root: it imports ``intake`` and ``workers``, and nothing in the core imports it."""

from __future__ import annotations

import os

from daemon.config import Config, config_model, load_config
from intake.channels import channel_tables
from workers.pipelines import kind_tables


def read_config(path: str | os.PathLike[str] | None = None) -> Config:
    """The configuration (``--config``, ``$REELQUEUE_CONFIG``, ``./config.toml`` or the
    built-in defaults), every table checked."""
    return load_config(path, kind_tables(), channel_tables())


def config_class() -> type[Config]:
    """The configuration's class, to build one in code (tests, benchmarks)."""
    return config_model(kind_tables(), channel_tables())
