"""Configuration: one pydantic settings object read from a TOML file.

Lookup order: ``--config PATH``, then ``$REELQUEUE_CONFIG``, then ``./config.toml``,
then the built-in defaults (which equal the documented ``config.toml``). Relative
paths resolve against the folder of the file they were read from. A bad file is
reported key by key (``ConfigError``) and the CLI exits with status 2.
"""

from __future__ import annotations

import os
import re
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
)

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_UNIT_SECONDS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, None: 1}


def parse_duration(value: Any) -> float:
    """Seconds from ``90``, ``"90s"``, ``"1.5m"``, ``"2h"`` or ``"7d"``."""
    if isinstance(value, bool):
        raise ValueError("expected a duration like '30s', '2h' or a number of seconds")
    if isinstance(value, int | float):
        seconds = float(value)
    else:
        match = _DURATION.match(str(value))
        if not match:
            raise ValueError("expected a duration like '30s', '2h' or a number of seconds")
        seconds = float(match.group(1)) * _UNIT_SECONDS[match.group(2)]
    if seconds < 0:
        raise ValueError("a duration cannot be negative")
    return seconds


Duration = Annotated[float, BeforeValidator(parse_duration)]


class _Section(BaseModel):
    # Unknown keys are errors: a typo in config.toml must not be silently ignored.
    model_config = ConfigDict(extra="forbid")


class StateConfig(_Section):
    dir: Path = Path("var")


class RedisConfig(_Section):
    url: str = ""

    @field_validator("url")
    @classmethod
    def _scheme(cls, url: str) -> str:
        if url and not url.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("must be empty (embedded server) or start with redis://, rediss:// or unix://")
        return url


class LogConfig(_Section):
    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["auto", "json", "console"] = "auto"


class FolderIntakeConfig(_Section):
    path: Path
    kind: str = "video"
    poll: bool = False
    poll_interval: Duration = 1.0
    settle: Duration = 2.0
    max_file_mb: float = Field(default=1.0, gt=0)
    priority: int = 0
    options: dict[str, Any] = Field(default_factory=dict)


def resolve_secret(value: str) -> str | None:
    """``"env:NAME"`` reads the environment variable NAME (None when unset); any other
    value is the secret itself."""
    if value.startswith("env:"):
        return os.environ.get(value.removeprefix("env:")) or None
    return value or None


class HttpToken(_Section):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
    token: str
    role: Literal["user", "admin"] = "user"

    @property
    def secret(self) -> str | None:
        return resolve_secret(self.token)


class HttpIntakeConfig(_Section):
    enabled: bool = True
    listen: str = "127.0.0.1:8686"
    max_body_mb: float = Field(default=512, gt=0)
    # How long the signed file links in job responses stay valid.
    link_ttl: Duration = 7 * 86400.0
    tokens: list[HttpToken] = Field(
        default_factory=lambda: [HttpToken(name="default", token="env:REELQUEUE_TOKEN",
                                           role="admin")]
    )

    @field_validator("listen")
    @classmethod
    def _host_port(cls, value: str) -> str:
        host, sep, port = value.rpartition(":")
        if not sep or not host or not port.isdigit() or int(port) > 65535:
            raise ValueError("must be HOST:PORT, e.g. 127.0.0.1:8686")
        return value

    @property
    def host(self) -> str:
        return self.listen.rpartition(":")[0].strip("[]")

    @property
    def port(self) -> int:
        return int(self.listen.rpartition(":")[2])


class ChatIntakeConfig(_Section):
    enabled: bool = False
    token: str = "env:REELQUEUE_TELEGRAM_TOKEN"
    # A local Bot API server keeps chat inside the building.
    base_url: str = "https://api.telegram.org/bot"
    base_file_url: str = "https://api.telegram.org/file/bot"
    allowed_user_ids: list[int] = Field(default_factory=list)
    allowed_chat_ids: list[int] = Field(default_factory=list)
    admin_user_ids: list[int] = Field(default_factory=list)
    max_upload_mb: float = Field(default=50, gt=0)
    max_jobs_per_user_per_day: int = Field(default=20, ge=0)
    max_queued_per_user: int = Field(default=3, ge=0)
    max_prompt_chars: int = Field(default=2000, ge=1, le=10_000)
    # The progress message is edited at most this often.
    progress_interval: Duration = 5.0
    # Links instead of uploads for videos over max_upload_mb, when the HTTP API is public.
    public_base_url: str = ""

    @property
    def secret(self) -> str | None:
        return resolve_secret(self.token)


class IntakeConfig(_Section):
    folder: list[FolderIntakeConfig] = Field(
        default_factory=lambda: [FolderIntakeConfig(path=Path("inbox"))]
    )
    http: HttpIntakeConfig = Field(default_factory=HttpIntakeConfig)
    chat: ChatIntakeConfig = Field(default_factory=ChatIntakeConfig)


class WorkerConfig(_Section):
    job_timeout: Duration = 7200.0
    keep_results: Duration = 7 * 86400.0
    max_tries: int = Field(default=3, ge=1, le=20)
    name: str = ""


class VideoConfig(_Section):
    backend: Literal["animatic"] = "animatic"
    width: int = Field(default=832, ge=64, le=3840)
    height: int = Field(default=480, ge=64, le=2160)
    fps: int = Field(default=16, ge=1, le=60)
    scene_seconds: float = Field(default=5.0, ge=3, le=8)
    crf: int = Field(default=20, ge=0, le=51)
    font: Path | None = None

    @field_validator("width", "height")
    @classmethod
    def _even(cls, value: int) -> int:
        if value % 2:
            raise ValueError("must be even (H.264 with yuv420p needs even sizes)")
        return value


class Config(_Section):
    state: StateConfig = Field(default_factory=StateConfig)
    redis: RedisConfig = Field(default_factory=RedisConfig)
    log: LogConfig = Field(default_factory=LogConfig)
    intake: IntakeConfig = Field(default_factory=IntakeConfig)
    worker: WorkerConfig = Field(default_factory=WorkerConfig)
    video: VideoConfig = Field(default_factory=VideoConfig)
    # Where the file came from; relative paths were resolved against its folder.
    source_path: Path | None = Field(default=None, exclude=True)

    @property
    def state_dir(self) -> Path:
        return self.state.dir

    @property
    def jobs_dir(self) -> Path:
        return self.state.dir / "jobs"


class ConfigError(Exception):
    """A config file that cannot be used; the message names each bad key."""


def _format_validation_error(error: ValidationError, origin: str) -> str:
    lines = [f"{origin}: invalid configuration"]
    for item in error.errors():
        key = ""
        for part in item["loc"]:
            key += f"[{part}]" if isinstance(part, int) else (f".{part}" if key else str(part))
        reason = item["msg"].removeprefix("Value error, ")
        if item["type"] == "extra_forbidden":
            reason = "unknown key (check the spelling against config.toml)"
        value = item.get("input")
        shown = "" if isinstance(value, dict) else f" = {value!r}"
        lines.append(f"  {key}{shown}: {reason}")
    return "\n".join(lines)


def _resolve_paths(config: Config, base: Path) -> Config:
    def resolve(path: Path) -> Path:
        path = path.expanduser()
        return path if path.is_absolute() else (base / path).resolve()

    config.state.dir = resolve(config.state.dir)
    for folder in config.intake.folder:
        folder.path = resolve(folder.path)
    if config.video.font is not None:
        config.video.font = resolve(config.video.font)
    return config


def find_config_file(explicit: str | os.PathLike[str] | None = None) -> Path | None:
    if explicit:
        return Path(explicit)
    if env := os.environ.get("REELQUEUE_CONFIG"):
        return Path(env)
    local = Path("config.toml")
    return local if local.is_file() else None


def load_config(path: str | os.PathLike[str] | None = None) -> Config:
    """Read and validate the configuration; raise ``ConfigError`` with a readable message."""
    file = find_config_file(path)
    if file is None:
        return _resolve_paths(Config(), Path.cwd())
    try:
        raw = tomllib.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{file}: config file not found") from None
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"{file}: not valid TOML: {exc}") from None
    try:
        config = Config.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(_format_validation_error(exc, str(file))) from None
    config.source_path = file.resolve()
    return _resolve_paths(config, file.resolve().parent)
