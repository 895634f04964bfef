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
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from daemon.schedule import Priority

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
    priority: Priority = "batch"

    @field_validator("priority", mode="before")
    @classmethod
    def _priority_number(cls, value: Any) -> Any:
        if isinstance(value, int) and not isinstance(value, bool):
            raise ValueError('is now a queue class: "batch" (the default for folders) or '
                             '"interactive"; see [queue] interactive_lead')
        return value
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
    # Per-token caps, 0: none. Beyond them a POST gets 429 saying when to come back.
    max_queued: int = Field(default=0, ge=0)
    max_jobs_per_day: int = Field(default=0, ge=0)
    priority: Priority = "interactive"

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


class QueueConfig(_Section):
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


class WorkerConfig(_Section):
    job_timeout: Duration = 7200.0
    keep_results: Duration = 7 * 86400.0
    max_tries: int = Field(default=3, ge=1, le=20)
    name: str = ""


class ModelsConfig(_Section):
    # Where models live; a model setting names a folder (or file) in here, or gives an
    # absolute path. Weights are never downloaded at run time.
    dir: Path = Path("models")


class GpuConfig(_Section):
    # VRAM kept free for everything else on the card.
    reserve_gb: float = Field(default=1.0, ge=0)
    # The most VRAM this worker may use (e.g. 8 on a shared card); 0: the whole card.
    vram_budget_gb: float = Field(default=0.0, ge=0)
    # A warning goes into the log and the report above this share of VRAM in use.
    warn_percent: float = Field(default=85.0, gt=0, le=100)


class StoryboardConfig(_Section):
    # "rules": split the prompt at sentences; "llm": a local chat model writes the scenes.
    backend: Literal["rules", "llm"] = "rules"
    # The chat model for backend = "llm" (e.g. Qwen2.5-1.5B-Instruct in [models] dir).
    model: str = ""
    # Schema-constrained decoding (outlines): the JSON is valid by construction.
    constrained: bool = True

    @model_validator(mode="after")
    def _model_for_llm(self) -> StoryboardConfig:
        if self.backend == "llm" and not self.model:
            raise ValueError('backend = "llm" needs model = "<a chat model folder in [models] '
                             'dir>", e.g. "Qwen2.5-1.5B-Instruct"')
        return self


class VideoConfig(_Section):
    # "animatic": a storyboard film, needs no weights; "diffusers": a local text-to-video
    # model (Wan 2.1/2.2, LTX-Video, CogVideoX), its family read from model_index.json.
    backend: Literal["animatic", "diffusers"] = "animatic"
    # The text-to-video model for backend = "diffusers": a name in [models] dir.
    model: str = ""
    # Start each scene from the previous scene's last frame (image-to-video).
    continuity: bool = True
    # A separate image-to-video model for continuity, when the main model has none.
    continuity_model: str = ""
    # Denoising steps; 0: the model family's default.
    steps: int = Field(default=0, ge=0, le=200)
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

    @model_validator(mode="after")
    def _model_for_diffusers(self) -> VideoConfig:
        if self.backend == "diffusers" and not self.model:
            raise ValueError('backend = "diffusers" needs model = "<a model folder in [models] '
                             'dir>", e.g. "Wan2.1-T2V-1.3B-Diffusers"')
        return self


class UpscaleConfig(_Section):
    # A local ESRGAN-family .pth (e.g. models/RealESRGAN_x4plus.pth), loaded with spandrel.
    model: Path | None = None
    # Tiles keep an 8 GB GPU enough for large images: core size, feathered overlap, and
    # context each tile sees beyond its core so edges match the whole-image result.
    tile: int = Field(default=192, ge=16, le=4096)
    tile_overlap: int = Field(default=16, ge=0, le=512)
    tile_context: int = Field(default=16, ge=0, le=512)
    # fp16/bf16 on a GPU when the model supports it (a NaN/Inf tile falls back to fp32).
    half: bool = True
    max_frames: int = Field(default=3000, ge=1)


class CaptionConfig(_Section):
    # A local GIT video-captioning checkpoint directory (e.g. models/git-base-vatex).
    model: Path | None = None
    max_length: int = Field(default=40, ge=5, le=200)
    # A video with shot changes is also captioned per shot, up to this many shots.
    max_shots: int = Field(default=8, ge=1, le=50)


COMMAND_PLACEHOLDERS = ("{input}", "{outdir}", "{jobdir}", "{prompt}", "{job_id}")
INPUT_TYPES = ("video", "image", "burst", "audio", "text")


class CommandPipelineConfig(_Section):
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


# --- [post]: what turns scene clips into a finished video -------------------------------

SubtitleMode = Literal["burn", "soft", "off"]
SubtitleStyle = Literal["outline", "box"]
Transition = Literal["cut", "crossfade", "fade"]
LookPreset = Literal["none", "natural", "warm", "vintage", "crisp"]
MUSIC_RANDOM = "random"


def _music_name(value: str) -> str:
    # A name inside [post] music_dir, never a path: a job must not read other files.
    if value and (value != value.strip() or "/" in value or "\\" in value
                  or value.startswith(".")):
        raise ValueError('must be "" (no music), "random", or a file name in [post] music_dir '
                         "(no folders, no leading dot)")
    return value


MusicChoice = Annotated[str, AfterValidator(_music_name)]
# Shared by [post] and the video kind's per-job options, so both check the same ranges.
Crf = Annotated[int, Field(ge=0, le=51)]
MusicVolume = Annotated[float, Field(ge=0, le=2)]
MusicFade = Annotated[Duration, Field(le=30)]
TransitionSeconds = Annotated[Duration, Field(ge=0.05, le=2)]
SmoothMotion = Annotated[int, Field(ge=1, le=4)]
MaxMegabytes = Annotated[float, Field(ge=0)]


class LookConfig(_Section):
    """A colour look: a preset, and raw values that override the preset's."""

    preset: LookPreset = "none"
    brightness: float | None = Field(default=None, ge=-1, le=1)
    contrast: float | None = Field(default=None, ge=0, le=3)
    saturation: float | None = Field(default=None, ge=0, le=3)
    warmth: float | None = Field(default=None, ge=-1, le=1)
    vignette: float | None = Field(default=None, ge=0, le=1)
    sepia: float | None = Field(default=None, ge=0, le=1)
    denoise: float | None = Field(default=None, ge=0, le=1)
    white_balance: bool | None = None
    clahe: float | None = Field(default=None, ge=0, le=8)


class PostConfig(_Section):
    subtitles: SubtitleMode = "burn"
    subtitle_style: SubtitleStyle = "outline"
    music: MusicChoice = ""
    music_dir: Path | None = None
    music_volume: MusicVolume = 0.5
    music_fade: MusicFade = 2.0
    transition: Transition = "crossfade"
    transition_duration: TransitionSeconds = 0.5
    look: LookPreset | LookConfig = "none"
    smooth_motion: SmoothMotion = 1
    max_mb: MaxMegabytes = 0


class PostTarget(_Section):
    channel: str = Field(pattern=r"^[a-z][a-z0-9_]{0,31}$")  # a channel that can post
    to: str  # where, in that channel's terms: a chat id for chat

    @field_validator("to", mode="before")
    @classmethod
    def _id_as_text(cls, value: Any) -> Any:
        return str(value) if isinstance(value, int) and not isinstance(value, bool) else value


class DigestConfig(_Section):
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

    @property
    def hour_minute(self) -> tuple[int, int]:
        hour, minute = self.at.split(":")
        return int(hour), int(minute)


_MODULE = r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$"


class PluginsConfig(_Section):
    """Job kinds and channels from Python modules of one's own, without editing
    reelqueue: each module must be importable by the daemon and the workers."""

    # Kind name → module declaring Options, INPUTS, check_request and run.
    kinds: dict[str, Annotated[str, Field(pattern=_MODULE)]] = Field(default_factory=dict)
    # Modules each declaring CHANNEL_TYPE (daemon.channels.ChannelType).
    channels: list[Annotated[str, Field(pattern=_MODULE)]] = Field(default_factory=list)


class Config(_Section):
    state: StateConfig = Field(default_factory=StateConfig)
    redis: RedisConfig = Field(default_factory=RedisConfig)
    log: LogConfig = Field(default_factory=LogConfig)
    intake: IntakeConfig = Field(default_factory=IntakeConfig)
    queue: QueueConfig = Field(default_factory=QueueConfig)
    worker: WorkerConfig = Field(default_factory=WorkerConfig)
    video: VideoConfig = Field(default_factory=VideoConfig)
    storyboard: StoryboardConfig = Field(default_factory=StoryboardConfig)
    models: ModelsConfig = Field(default_factory=ModelsConfig)
    gpu: GpuConfig = Field(default_factory=GpuConfig)
    post: PostConfig = Field(default_factory=PostConfig)
    digest: DigestConfig = Field(default_factory=DigestConfig)
    upscale: UpscaleConfig = Field(default_factory=UpscaleConfig)
    caption: CaptionConfig = Field(default_factory=CaptionConfig)
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

    config.state.dir = resolve(config.state.dir)
    for folder in config.intake.folder:
        folder.path = resolve(folder.path)
    if config.video.font is not None:
        config.video.font = resolve(config.video.font)
    if config.post.music_dir is not None:
        config.post.music_dir = resolve(config.post.music_dir)
    if config.digest.out_dir is not None:
        config.digest.out_dir = resolve(config.digest.out_dir)
    config.models.dir = resolve(config.models.dir)
    for section in (config.upscale, config.caption):
        if section.model is not None:
            section.model = resolve(section.model)
    for pipeline in config.pipelines.values():
        if pipeline.cwd is not None:
            pipeline.cwd = resolve(pipeline.cwd)
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
