"""A job as every channel shows it: its spec and its state, live from Redis, or read
from its folder once Redis has forgotten a finished job."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from daemon.jobs import JobError, JobOutcome, JobSpec, JobStatus, job_dir, read_spec
from daemon.queue import QueueClient


async def find_job(queue: QueueClient, jobs_dir: Path, job_id: str
                   ) -> tuple[JobSpec, dict[str, Any]] | None:
    """The job's spec and state; None when there is no such job."""
    try:
        spec = await asyncio.to_thread(read_spec, jobs_dir, job_id)
    except (JobError, OSError, ValueError):
        return None
    state = await queue.get_state(job_id) or state_from_folder(jobs_dir, spec)
    return spec, state


def state_from_folder(jobs_dir: Path, spec: JobSpec) -> dict[str, Any]:
    """What the job folder tells: how it ended (``result.json``), else still queued."""
    outcome = JobOutcome.read(job_dir(jobs_dir, spec.id))
    status = outcome.status if outcome else JobStatus.queued
    return {"id": spec.id, "kind": spec.kind, "status": status, "stage": status,
            "percent": 100.0 if status == JobStatus.done else 0.0, "message": "",
            "error": outcome.error if outcome else "", "prompt": spec.prompt[:200],
            "submitted_by": spec.submitted_by, "channel": spec.source.channel,
            "created_at": str(spec.created_at.timestamp())}
