"""The HTTP channel's table, ``[intake.http]`` with its ``[[intake.http.tokens]]``, and
the doctor's look at it."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from daemon.config import Config, Duration, Section, resolve_secret
from daemon.findings import Finding, Level, where_secret_comes_from
from daemon.schedule import Priority


class HttpToken(Section):
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


class HttpIntakeConfig(Section):
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



SETTINGS = {"http": HttpIntakeConfig}  # the channel's table under [intake]


def token_checks(config: Config) -> list[Finding]:
    """The doctor's look at ``[intake.http]``: is any token usable?"""
    http = config.intake.http
    usable = [token.name for token in http.tokens if token.secret]
    disabled = [token for token in http.tokens if not token.secret]
    if not usable:
        reasons = "; ".join(f"{t.name}: {where_secret_comes_from(t.token)}" for t in disabled)
        return [Finding(Level.ERROR, "config",
                        f"the HTTP API on {http.listen} is enabled but no token is usable "
                        f"({reasons or 'none configured'}), so every request is refused",
                        "set the token's variable in /etc/reelqueue/env (or the environment), "
                        "or set [intake.http] enabled = false")]
    findings = [Finding(Level.OK, "config",
                        f"HTTP API on {http.listen}: usable tokens: {', '.join(usable)}")]
    findings += [Finding(Level.INFO, "config",
                         f"HTTP token {t.name} is disabled: {where_secret_comes_from(t.token)}")
                 for t in disabled]
    return findings
