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
from collections.abc import Callable, Mapping
from functools import cache
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    create_model,
    field_validator,
    model_validator,
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


Duration = Annotated[float, BeforeValidator(parse_duration), Field(ge=0)]


class Section(BaseModel):
    """A table of config.toml. Unknown keys are errors: a typo must not be silently
    ignored. A table with paths makes them absolute in ``resolve_paths``."""

    model_config = ConfigDict(extra="forbid")

    def resolve_paths(self, resolve: Callable[[Path], Path]) -> None:
        """Make relative paths absolute with ``resolve``; by default, the sub-tables'."""
        for _, value in self:
            items = value if isinstance(value, list) else \
                list(value.values()) if isinstance(value, dict) else [value]
            for item in items:
                if isinstance(item, Section):
                    item.resolve_paths(resolve)


# The tables a job kind or a channel owns and defines beside itself: table name → its
# model (defaulting to the model's defaults), or a pydantic field definition
# ``(annotation, Field(...))`` where the default is something else.
Tables = Mapping[str, Any]


class StateConfig(Section):
    dir: Path = Path("var")

    def resolve_paths(self, resolve: Callable[[Path], Path]) -> None:
        self.dir = resolve(self.dir)


class RedisConfig(Section):
    url: str = ""
    # The embedded server's AOF fsync: "always" makes a job durable before it is
    # acknowledged (a power cut loses no accepted job); "everysec" is faster and may
    # lose the last second. An external server keeps its own setting.
    appendfsync: Literal["always", "everysec"] = "always"

    @field_validator("url")
    @classmethod
    def _scheme(cls, url: str) -> str:
        if url and not url.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("must be empty (embedded server) or start with redis://, rediss:// or unix://")
        return url


class LogConfig(Section):
    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["auto", "json", "console"] = "auto"


def resolve_secret(value: str) -> str | None:
    """``"env:NAME"`` reads the environment variable NAME (None when unset); any other
    value is the secret itself."""
    if value.startswith("env:"):
        return os.environ.get(value.removeprefix("env:")) or None
    return value or None


class QueueConfig(Section):
    # New jobs are refused ("queue full") beyond this many waiting; 0: no cap. The drop
    # folder keeps such files in the inbox and tries again later.
    max_queued: int = Field(default=10_000, ge=0)
    # Each submitter's caps where its channel sets none (0): queued or running at once,
    # and per UTC day; 0: no cap.
    max_queued_per_submitter: int = Field(default=0, ge=0)
    max_jobs_per_day_per_submitter: int = Field(default=0, ge=0)
    # Jobs are held (not started) while the state or output folder has less free space.
    min_free_gb: float = Field(default=2.0, ge=0)
    # Interactive jobs run before batch jobs unless the batch job was queued more than
    # this much earlier: the age bonus that keeps a busy chat from starving a folder.
    interactive_lead: Duration = 3600.0
    # Regular expressions (case-insensitive): a request matching one is refused at
    # submission; a storyboard text matching one fails its job with that reason.
    blocklist: list[str] = Field(default_factory=list)

    @field_validator("blocklist")
    @classmethod
    def _patterns(cls, patterns: list[str]) -> list[str]:
        for pattern in patterns:
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ValueError(f"{pattern!r} is not a regular expression: {exc}") from None
        return patterns


class WorkerConfig(Section):
    job_timeout: Duration = 7200.0
    keep_results: Duration = 7 * 86400.0
    max_tries: int = Field(default=3, ge=1, le=20)
    name: str = ""


class ModelsConfig(Section):
    # Where models live; a model setting names a folder (or file) in here, or gives an
    # absolute path. Weights are never downloaded at run time.
    dir: Path = Path("models")

    def resolve_paths(self, resolve: Callable[[Path], Path]) -> None:
        self.dir = resolve(self.dir)


class GpuConfig(Section):
    # VRAM kept free for everything else on the card.
    reserve_gb: float = Field(default=1.0, ge=0)
    # The most VRAM this worker may use (e.g. 8 on a shared card); 0: the whole card.
    vram_budget_gb: float = Field(default=0.0, ge=0)
    # A warning goes into the log and the report above this share of VRAM in use.
    warn_percent: float = Field(default=85.0, gt=0, le=100)


COMMAND_PLACEHOLDERS = ("{input}", "{outdir}", "{jobdir}", "{prompt}", "{job_id}")
INPUT_TYPES = ("video", "image", "burst", "audio", "text")


class CommandPipelineConfig(Section):
    """A research model's own CLI and environment, run as a job kind (``[pipelines.X]``)."""

    type: Literal["command"]
    # What a job must bring: input types (video, image, burst, audio, text) or suffixes.
    inputs: list[str] = Field(default_factory=list)
    # The argv; no shell. An argument that is exactly a placeholder is replaced whole.
    command: list[str] = Field(min_length=1)
    cwd: Path | None = None
    outputs: list[str] = Field(default_factory=lambda: ["*"])
    timeout: Duration = 7200.0
    gpu: bool = False
    # Extra environment for the command; nothing else of the daemon's environment
    # (tokens, secrets) is passed on, only PATH, HOME and the locale.
    env: dict[str, str] = Field(default_factory=dict)

    def resolve_paths(self, resolve: Callable[[Path], Path]) -> None:
        if self.cwd is not None:
            self.cwd = resolve(self.cwd)

    @field_validator("inputs")
    @classmethod
    def _inputs(cls, values: list[str]) -> list[str]:
        for value in values:
            if value not in INPUT_TYPES and not re.fullmatch(r"\.[A-Za-z0-9]{1,10}", value):
                raise ValueError(f"{value!r} is neither an input type ({', '.join(INPUT_TYPES)})"
                                 " nor a file suffix like '.npz'")
        return values

    @field_validator("command")
    @classmethod
    def _placeholders(cls, argv: list[str]) -> list[str]:
        for arg in argv:
            if arg.startswith("{") and arg.endswith("}") and arg not in COMMAND_PLACEHOLDERS:
                known = ", ".join(COMMAND_PLACEHOLDERS)
                raise ValueError(f"unknown placeholder {arg}; use {known}")
        return argv

    @field_validator("outputs")
    @classmethod
    def _patterns(cls, patterns: list[str]) -> list[str]:
        for pattern in patterns:
            if "/" in pattern or "\\" in pattern or pattern.startswith("."):
                raise ValueError(f"{pattern!r}: output patterns match file names in {{outdir}}, "
                                 "without folders or leading dots")
        return patterns


class PostTarget(Section):
    channel: str = Field(pattern=r"^[a-z][a-z0-9_]{0,31}$")  # a channel that can post
    to: str  # where, in that channel's terms: a chat id for chat

    @field_validator("to", mode="before")
    @classmethod
    def _id_as_text(cls, value: Any) -> Any:
        return str(value) if isinstance(value, int) and not isinstance(value, bool) else value


class DigestConfig(Section):
    enabled: bool = False
    at: str = Field(default="07:00", pattern=r"^([01]\d|2[0-3]):[0-5]\d$")
    window: Duration = Field(default=86400.0, gt=0)
    out_dir: Path | None = None
    # The summary is also posted to each of these, e.g. [{channel = "chat", to = "-100123"}].
    post: list[PostTarget] = Field(default_factory=list)

    @model_validator(mode="before")
    @classmethod
    def _chat_id(cls, data: Any) -> Any:
        # Before channels could post, the one target was [digest] chat_id: still read.
        if isinstance(data, dict) and "chat_id" in data:
            data = dict(data)
            chat_id = data.pop("chat_id")
            if chat_id:
                data["post"] = [*data.get("post", []), {"channel": "chat", "to": chat_id}]
        return data

    def resolve_paths(self, resolve: Callable[[Path], Path]) -> None:
        if self.out_dir is not None:
            self.out_dir = resolve(self.out_dir)

    @property
    def hour_minute(self) -> tuple[int, int]:
        hour, minute = self.at.split(":")
        return int(hour), int(minute)


_MODULE = r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$"


class PluginsConfig(Section):
    """Job kinds and channels from Python modules of one's own, without editing
    reelqueue: each module must be importable by the daemon and the workers."""

    # Kind name → module declaring Options, INPUTS, check_request and run.
    kinds: dict[str, Annotated[str, Field(pattern=_MODULE)]] = Field(default_factory=dict)
    # Modules each declaring CHANNEL_TYPE (daemon.channels.ChannelType).
    channels: list[Annotated[str, Field(pattern=_MODULE)]] = Field(default_factory=list)


class Config(Section):
    """The core's tables. The channels' tables ([intake.http], …) and the job kinds'
    ([video], [post], [upscale], …) join them in the class ``config_model`` makes."""

    state: StateConfig = Field(default_factory=StateConfig)
    redis: RedisConfig = Field(default_factory=RedisConfig)
    log: LogConfig = Field(default_factory=LogConfig)
    queue: QueueConfig = Field(default_factory=QueueConfig)
    worker: WorkerConfig = Field(default_factory=WorkerConfig)
    models: ModelsConfig = Field(default_factory=ModelsConfig)
    gpu: GpuConfig = Field(default_factory=GpuConfig)
    digest: DigestConfig = Field(default_factory=DigestConfig)
    pipelines: dict[str, CommandPipelineConfig] = Field(default_factory=dict)
    plugins: PluginsConfig = Field(default_factory=PluginsConfig)
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

    config.resolve_paths(resolve)
    return config


def find_config_file(explicit: str | os.PathLike[str] | None = None) -> Path | None:
    if explicit:
        return Path(explicit)
    if env := os.environ.get("REELQUEUE_CONFIG"):
        return Path(env)
    local = Path("config.toml")
    return local if local.is_file() else None


def _field(definition: Any) -> tuple[Any, Any]:
    if isinstance(definition, tuple):
        return definition
    return definition, Field(default_factory=definition)


@cache
def _model_for(kinds: tuple[tuple[str, Any], ...], channels: tuple[tuple[str, Any], ...]
               ) -> type[Config]:
    intake = create_model("IntakeConfig", __base__=Section,
                          **{name: _field(table) for name, table in channels})
    fields = {name: _field(table) for name, table in kinds}
    return create_model("Config", __base__=Config, intake=_field(intake), **fields)


def config_model(kinds: Tables, channels: Tables) -> type[Config]:
    """The configuration's class: the core's tables, the channels' under ``[intake]``
    and the kinds' (one class per set of tables; ``config_model(…)(...)`` builds a
    configuration in code)."""
    return _model_for(tuple(sorted(kinds.items())), tuple(sorted(channels.items())))


def load_config(path: str | os.PathLike[str] | None, kinds: Tables, channels: Tables
                ) -> Config:
    """Read and validate the configuration, with the tables of the job kinds and the
    channels a process has; raise ``ConfigError`` with a readable message."""
    model = config_model(kinds, channels)
    file = find_config_file(path)
    if file is None:
        return _resolve_paths(model(), Path.cwd())
    try:
        raw = tomllib.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{file}: config file not found") from None
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"{file}: not valid TOML: {exc}") from None
    try:
        config = model.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(_format_validation_error(exc, str(file))) from None
    config.source_path = file.resolve()
    return _resolve_paths(config, file.resolve().parent)
