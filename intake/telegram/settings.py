"""The chat channel's table, ``[intake.chat]`` (light: read with the config by every
process, without loading python-telegram-bot)."""

from __future__ import annotations

from pydantic import Field

from daemon.config import Duration, Section, resolve_secret


class ChatIntakeConfig(Section):
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


SETTINGS = {"chat": ChatIntakeConfig}  # the channel's table under [intake]
