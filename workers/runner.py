"""Run one job to its outcome, synchronously. Shared by the arq worker (in a thread)
and by ``reelqueue run`` (in-process, no Redis), so both take exactly the same path.

The outcome is written to ``result.json`` in the job directory (``JobOutcome``).
"""

from __future__ import annotations

import threading
import traceback

from daemon.config import Config
from daemon.jobs import JobError, JobOutcome, JobSpec, JobStatus, job_dir
from workers import content, gpu, pipelines
from workers.context import JobCancelled, JobContext, ProgressCallback


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
    on_progress: ProgressCallback | None = None,
    cancellation: Cancellation | None = None,
    queue_wait_s: float | None = None,
    job_timeout_s: float | None = None,
) -> JobOutcome:
    """Run ``spec`` in its job directory and return (and record) its outcome.

    Raises ``Interrupted`` when a worker shutdown stopped it: the job keeps its
    finished stage outputs and runs again on the next start.
    """
    cancellation = cancellation or Cancellation()
    directory = job_dir(config.jobs_dir, spec.id)
    job = JobContext(
        spec=spec,
        dir=directory,
        config=config,
        on_progress=on_progress or (lambda stage, percent, message: None),
        cancel_event=cancellation.event,
        queue_wait_s=queue_wait_s,
    )
    try:
        # Inside the try: on a full disk even this fails, and the job must fail visibly.
        directory.mkdir(parents=True, exist_ok=True)
        job.log("job started", kind=spec.kind)
        content.check([spec.prompt], config.queue.blocklist, "prompt")
        result = pipelines.load(spec.kind).run(job)
        outcome = JobOutcome(JobStatus.done, primary=result.primary, reports=result.reports,
                             extras=result.extras)
        gpu.HEALTH.record_success()
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
    except JobError as exc:
        gpu.HEALTH.record_failure(exc)
        outcome = JobOutcome(JobStatus.failed, error=str(exc))
    except Exception as exc:  # a bug or an environment problem: keep the worker alive
        gpu.HEALTH.record_failure(exc)
        job.log("job crashed", error=repr(exc), traceback=traceback.format_exc())
        outcome = JobOutcome(
            JobStatus.failed,
            error=f"internal error ({type(exc).__name__}: {exc}); the details are in "
            f"{directory / 'log.jsonl'}",
        )
    job.log("job finished", status=outcome.status, error=outcome.error)
    try:
        outcome.write(directory)
    except OSError as exc:  # a full disk: Redis still records the outcome, delivery reads it
        job.log("could not write result.json", error=str(exc))
    return outcome
