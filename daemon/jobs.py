"""The job model shared by every intake, the queue and the worker.

A job is a ``JobSpec`` (what to do, for whom, and where to answer) plus a directory
``<state>/jobs/<id>/`` that is its durable record: ``spec.json``, the inputs as
received, stage outputs, final artifacts and the report. Live state lives in Redis
(see ``daemon.queue``).
"""

from __future__ import annotations

import hashlib
import json
import uuid
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import Any

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
)

from daemon import files
from daemon.schedule import Priority


class JobStatus(StrEnum):
    queued = "queued"
    running = "running"
    done = "done"
    failed = "failed"
    cancelled = "cancelled"

    @property
    def finished(self) -> bool:
        return self in (JobStatus.done, JobStatus.failed, JobStatus.cancelled)


class Channel(StrEnum):
    """The channels reelqueue ships; a channel plugin brings a name of its own."""

    folder = "folder"
    http = "http"
    chat = "chat"
    cli = "cli"


class Source(BaseModel):
    """Where a job came from, with what is needed to answer it there."""

    model_config = ConfigDict(extra="forbid")

    channel: str = Field(pattern=r"^[a-z][a-z0-9_]{0,31}$")
    folder: str | None = None  # folder channel: the watch folder (absolute)
    filename: str | None = None  # folder channel: the request file's name in it
    client: str | None = None  # http: the token name / remote address
    chat_id: int | None = None
    message_id: int | None = None
    # Anything else a channel needs to answer (a plugin channel's own reference).
    reference: dict[str, str | int] = Field(default_factory=dict)


class JobSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: str
    kind: str
    prompt: str = ""
    inputs: list[str] = Field(default_factory=list)  # file names under inputs/
    options: dict[str, Any] = Field(default_factory=dict)
    source: Source
    submitted_by: str = ""
    # Which class it queues in (daemon.schedule): interactive jobs go before batch ones.
    priority: Priority = "interactive"
    created_at: datetime = Field(default_factory=lambda: datetime.now(UTC))

    @field_validator("priority", mode="before")
    @classmethod
    def _priority_number(cls, value: Any, info: ValidationInfo) -> Any:
        # Specs written before the queue had classes say ``"priority": 0``: such a job
        # keeps the class its channel has now.
        if isinstance(value, int) and not isinstance(value, bool):
            source = info.data.get("source")
            return "batch" if source and source.channel == Channel.folder else "interactive"
        return value


@dataclass
class JobOutcome:
    """How a job ended, written to ``result.json`` in its directory: the durable record
    that delivery reads. ``primary``, ``reports`` and ``extras`` are paths relative to
    the job dir."""

    status: JobStatus
    error: str | None = None
    primary: str | None = None
    reports: list[str] = field(default_factory=list)
    extras: list[str] = field(default_factory=list)
    finished_at: str = field(default_factory=lambda: datetime.now(UTC).isoformat())

    def write(self, directory: Path) -> None:
        files.write_json(directory / "result.json", asdict(self))

    @classmethod
    def read(cls, directory: Path) -> JobOutcome | None:
        path = directory / "result.json"
        if not path.exists():
            return None
        data = json.loads(path.read_text(encoding="utf-8"))
        data["status"] = JobStatus(data["status"])
        return cls(**data)


class JobError(Exception):
    """A failure explained in plain words for the person who sent the job.

    Raised by intakes for bad requests and by pipelines for problems the user can fix;
    the message is shown to them as is, so it should say what is wrong and what to do.
    ``problems`` lists ``{"field", "reason"}`` pairs where a request field is at fault.
    """

    def __init__(self, message: str, problems: list[dict[str, str]] | None = None):
        super().__init__(message)
        self.problems = problems or []


def derive_job_id(*parts: str | bytes) -> str:
    """A deterministic id: the same parts always give the same job."""
    digest = hashlib.sha256()
    for part in parts:
        digest.update(part.encode() if isinstance(part, str) else part)
        digest.update(b"\0")
    return digest.hexdigest()[:20]


def new_job_id() -> str:
    return uuid.uuid4().hex[:20]


def job_dir(jobs_root: Path, job_id: str) -> Path:
    if not job_id.isalnum():
        raise JobError(f"invalid job id {job_id!r}")
    return jobs_root / job_id


def write_spec(jobs_root: Path, spec: JobSpec) -> Path:
    directory = job_dir(jobs_root, spec.id)
    directory.mkdir(parents=True, exist_ok=True)
    files.write_text(directory / "spec.json", spec.model_dump_json(indent=2) + "\n")
    return directory


def read_spec(jobs_root: Path, job_id: str) -> JobSpec:
    path = job_dir(jobs_root, job_id) / "spec.json"
    return JobSpec.model_validate_json(path.read_text(encoding="utf-8"))


def validation_problems(error: ValidationError, what: str = "option") -> list[dict[str, str]]:
    """pydantic's errors as ``{"field", "reason"}`` pairs a user can act on."""
    problems = []
    for item in error.errors():
        field = ".".join(str(p) for p in item["loc"]) or what
        if item["type"] == "extra_forbidden":
            problems.append({"field": field, "reason": f"unknown {what}"})
            continue
        reason = item["msg"].removeprefix("Value error, ")
        value = item.get("input")
        got = "" if isinstance(value, dict | list) else f" (got {value!r})"
        problems.append({"field": field, "reason": reason + got})
    return problems


def describe_validation_error(error: ValidationError, what: str = "option") -> str:
    """One line per field: ``unknown option 'x'`` or ``option 'fps': reason (got 0)``."""
    return "; ".join(
        f"unknown {what} '{p['field']}'" if p["reason"] == f"unknown {what}"
        else f"{what} '{p['field']}': {p['reason']}"
        for p in validation_problems(error, what)
    )
