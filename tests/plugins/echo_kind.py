"""A job kind in one module: the prompt, reversed, as a text file with a small report."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict

from daemon import files
from daemon.config import Config
from daemon.jobs import JobError
from workers.context import JobContext, JobResult

INPUTS: tuple[str, ...] = ()


class Options(BaseModel):
    model_config = ConfigDict(extra="forbid")

    shout: bool = False


def check_request(prompt: str, options: Options) -> None:
    if not prompt:
        raise JobError("an echo needs a prompt to echo")


def models(config: Config) -> dict[str, Path]:
    return {}  # no weights


def unavailable(config: Config) -> str | None:
    return None  # nothing to install


def run(job: JobContext) -> JobResult:
    options = Options.model_validate(job.spec.options)
    text = job.spec.prompt[::-1]
    files.write_text(job.dir / "echo.txt", text.upper() if options.shout else text)
    files.write_json(job.dir / "report.json", {"kind": "echo", "characters": len(text)})
    return JobResult(primary="echo.txt", reports=["report.json"])
