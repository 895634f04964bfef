"""The caption kind's table in config.toml, ``[caption]``: light to import, since every
process reads it with the config."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from pydantic import Field

from daemon.config import Section


class CaptionConfig(Section):
    # A local GIT video-captioning checkpoint directory (e.g. models/git-base-vatex).
    model: Path | None = None
    max_length: int = Field(default=40, ge=5, le=200)
    # A video with shot changes is also captioned per shot, up to this many shots.
    max_shots: int = Field(default=8, ge=1, le=50)

    def resolve_paths(self, resolve: Callable[[Path], Path]) -> None:
        if self.model is not None:
            self.model = resolve(self.model)


SETTINGS = {"caption": CaptionConfig}
