"""What a pipeline sees of the job it runs: spec, directory, config, progress,
cancellation, stage timings, warnings, a per-job log, and the GPU state of the process
running it (its resident models and health counter, ``gpu``)."""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from daemon.config import Config
from daemon.jobs import JobSpec
from daemon.logs import get_logger
from workers.gpu import GpuState

ProgressCallback = Callable[[str, float, str], None]


class JobCancelled(Exception):
    """Raised inside a pipeline at the next checkpoint after a cancel request."""


@dataclass
class JobResult:
    """What a finished pipeline hands back: file names inside the job directory."""

    primary: str  # the artifact the user asked for (video, image, text)
    reports: list[str] = field(default_factory=lambda: ["report.json", "report.html"])
    extras: list[str] = field(default_factory=list)  # more results, delivered beside it


@dataclass
class JobContext:
    spec: JobSpec
    dir: Path
    config: Config
    on_progress: ProgressCallback = lambda stage, percent, message: None
    cancel_event: threading.Event = field(default_factory=threading.Event)
    queue_wait_s: float | None = None
    timings: dict[str, float] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    started: float = field(default_factory=time.monotonic)
    # Owned by the process running the job (the worker, ``reelqueue run``) and kept from
    # job to job there; a context made without one gets a fresh state of its own.
    gpu: GpuState = field(default_factory=GpuState)

    def __post_init__(self) -> None:
        self._log = get_logger(job_id=self.spec.id, kind=self.spec.kind)
        self._log_lock = threading.Lock()

    @property
    def inputs_dir(self) -> Path:
        return self.dir / "inputs"

    def log(self, event: str, **fields: object) -> None:
        """Log to the process log and to the job's own ``log.jsonl``."""
        self._log.info(event, **fields)
        line = {"ts": datetime.now(UTC).isoformat(), "event": event, **fields}
        try:
            with self._log_lock, open(self.dir / "log.jsonl", "a", encoding="utf-8") as handle:
                handle.write(json.dumps(line, ensure_ascii=False, default=str) + "\n")
        except OSError as exc:
            # A full disk must not keep the job from reporting how it ended: the process
            # log above still has the line.
            self._log.warning("could not write the job log", error=str(exc))

    def warn(self, message: str) -> None:
        self.warnings.append(message)
        self.log("warning", message=message)

    def progress(self, stage: str, percent: float, message: str = "") -> None:
        self.check_cancelled()
        self.on_progress(stage, max(0.0, min(100.0, percent)), message)

    def check_cancelled(self) -> None:
        if self.cancel_event.is_set():
            raise JobCancelled()

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        """Time a stage into ``timings[name]`` (seconds, summed if re-entered)."""
        start = time.monotonic()
        try:
            yield
        finally:
            self.timings[name] = self.timings.get(name, 0.0) + time.monotonic() - start

    def elapsed(self) -> float:
        return time.monotonic() - self.started
