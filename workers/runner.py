"""Run one job to its outcome, synchronously. Shared by the arq worker (in a thread)
and by ``reelqueue run`` (in-process, no Redis), so both take exactly the same path.

The outcome is written to ``result.json`` in the job directory (``JobOutcome``).
"""

from __future__ import annotations

import errno
import shutil
import threading
import traceback
from pathlib import Path

from daemon.config import Config
from daemon.jobs import JobError, JobOutcome, JobSpec, JobStatus, job_dir
from daemon.kinds import KindRegistry
from workers import gpu
from workers.context import JobCancelled, JobContext, ProgressCallback
from workers.pipelines import kind_registry


class Cancellation:
    """A thread-safe cancel flag that remembers why it was raised."""

    USER = "cancelled by request"
    TIMEOUT = "timeout"
    SHUTDOWN = "shutdown"

    def __init__(self) -> None:
        self.event = threading.Event()
        self.reason = ""

    def set(self, reason: str) -> None:
        if not self.event.is_set():
            self.reason = reason
            self.event.set()


class Interrupted(Exception):
    """The job was stopped by a worker shutdown and should run again later."""


def run_job_sync(
    spec: JobSpec,
    config: Config,
    *,
    kinds: KindRegistry | None = None,
    on_progress: ProgressCallback | None = None,
    cancellation: Cancellation | None = None,
    queue_wait_s: float | None = None,
    job_timeout_s: float | None = None,
    gpu_state: gpu.GpuState | None = None,
) -> JobOutcome:
    """Run ``spec`` in its job directory and return (and record) its outcome.

    ``gpu_state`` is the GPU state of the calling process, kept from job to job (the
    worker's); without one this call is the process's only job (``reelqueue run``) and
    makes its own with ``GpuState.for_process``.

    Raises ``Interrupted`` when a worker shutdown stopped it: the job keeps its
    finished stage outputs and runs again on the next start.
    """
    cancellation = cancellation or Cancellation()
    if gpu_state is None:
        gpu_state = gpu.GpuState.for_process()
    directory = job_dir(config.jobs_dir, spec.id)
    job = JobContext(
        spec=spec,
        dir=directory,
        config=config,
        on_progress=on_progress or (lambda stage, percent, message: None),
        cancel_event=cancellation.event,
        queue_wait_s=queue_wait_s,
        gpu=gpu_state,
    )
    try:
        # Inside the try: on a full disk even this fails, and the job must fail visibly.
        directory.mkdir(parents=True, exist_ok=True)
        job.log("job started", kind=spec.kind)
        # A one-shot run (``reelqueue run``, tests) has no worker to build the registry.
        result = (kinds or kind_registry(config)).get(spec.kind).run(job)
        outcome = JobOutcome(JobStatus.done, primary=result.primary, reports=result.reports,
                             extras=result.extras)
        gpu_state.health.record_success()
    except JobCancelled:
        if cancellation.reason == Cancellation.SHUTDOWN:
            job.log("job interrupted by shutdown; it will run again")
            raise Interrupted() from None
        if cancellation.reason == Cancellation.TIMEOUT:
            limit = f" ({job_timeout_s:.0f} s)" if job_timeout_s else ""
            outcome = JobOutcome(
                JobStatus.failed,
                error=f"the job ran longer than the worker's job_timeout{limit} and was "
                "stopped; ask for a shorter video or raise [worker] job_timeout",
            )
        else:
            outcome = JobOutcome(JobStatus.cancelled, error="cancelled by request")
    except Exception as exc:  # the request, a bug or the environment: the worker lives on
        gpu_state.health.record_failure(exc)
        outcome = JobOutcome(JobStatus.failed, error=_reason(exc, job, directory))
    job.log("job finished", status=outcome.status, error=outcome.error)
    try:
        outcome.write(directory)
    except OSError as exc:  # a full disk: Redis still records the outcome, delivery reads it
        job.log("could not write result.json", error=str(exc))
    return outcome


# How ENOSPC reads wherever it is only text: ffmpeg's stderr, a command pipeline's output.
NO_SPACE = "No space left on device"


def _reason(exc: Exception, job: JobContext, directory: Path) -> str:
    """What the sender reads about a failed job."""
    full = disk_full_reason(exc, directory)
    if full is not None:
        job.log("disk full", error=repr(exc))  # the reason names no file; this does
        return full
    if isinstance(exc, JobError):
        return str(exc)
    job.log("job crashed", error=repr(exc), traceback=traceback.format_exc())
    return (f"internal error ({type(exc).__name__}: {exc}); the details are in "
            f"{directory / 'log.jsonl'}")


def disk_full_reason(exc: BaseException, directory: Path) -> str | None:
    """The failure reason when ``exc`` comes from a full disk, else None. A full disk is
    no bug and no fault of the request: say which folder, how much is free, what to do."""
    where: Path | None = None
    cause: BaseException | None = exc
    while cause is not None:  # pipelines may wrap the OSError: look along the chain
        if isinstance(cause, OSError) and cause.errno == errno.ENOSPC:
            where = Path(cause.filename) if cause.filename else directory
            break
        if NO_SPACE in str(cause):
            where = directory  # a child process's message: it wrote into the job's folder
            break
        cause = cause.__cause__ or cause.__context__
    if where is None:
        return None
    folder = next((p for p in (where, *where.parents) if p.is_dir()), directory)
    free = shutil.disk_usage(folder).free
    return (f"the disk is full ({NO_SPACE}): {_amount(free)} free on {folder}. Free some "
            "space there, then submit the job again; an administrator can raise [queue] "
            "min_free_gb so that jobs wait for space instead of failing")


def _amount(size_bytes: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if size_bytes >= scale:
            return f"{size_bytes / scale:.1f} {unit}"
    return f"{size_bytes} bytes"
