"""What a check found: the doctor's vocabulary, shared by the checks that channels and
kinds declare next to themselves."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class Level(StrEnum):
    OK = "ok"
    INFO = "info"
    WARN = "warn"
    ERROR = "error"


@dataclass(frozen=True)
class Finding:
    level: Level
    area: str  # config, python, ffmpeg, redis, gpu, models, folders, disk, fonts
    what: str
    fix: str = ""  # one sentence; empty when there is nothing to do


def where_secret_comes_from(value: str) -> str:
    """Why a secret setting (``"env:NAME"`` or the value itself) gave nothing."""
    if value.startswith("env:"):
        return f"the environment variable {value.removeprefix('env:')} is unset or empty"
    return "its value is empty"
