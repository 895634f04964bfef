"""Every use of arq's worker internals, in one place.

reelqueue's worker is arq's ``Worker`` (arq is pinned: ``arq==0.28.0`` in pyproject.toml)
plus a few things arq has no public API for. They are all here, and nowhere else:

1. a step before each look at the queue (``Worker._poll_iteration``): the queue policy
   releases the next parked job there (daemon.schedule), so arq starts it in that very
   poll, and only while this worker has room for it (``job_counter``, ``max_jobs``,
   ``allow_pick_jobs``);
2. whether the running job was aborted by a user: arq's ``_cancel_aborted_jobs`` cancels
   the job's task and, before it awaits anything, adds the id to ``aborting_tasks``;
3. that the worker is shutting down: arq's SIGTERM/SIGINT handler ``handle_sig`` (which
   ``close`` calls too when arq handles no signals) records it here before it cancels
   the running job;
4. arq's in-progress key: its prefix, and its lifetime (the job timeout + 10 s).

tests/test_seam.py checks that these exist with the signatures used here and pins a hash
of the source of every arq function whose behaviour they rely on: an arq upgrade fails
that test, naming what to check again. Nothing else in reelqueue's worker overrides or
reads arq's private methods or attributes.
"""

from __future__ import annotations

import signal
from typing import Any

from arq import Worker
from arq.constants import in_progress_key_prefix

# arq marks a started job with this key (``<prefix><job id>``) until it ends.
IN_PROGRESS_PREFIX = in_progress_key_prefix


def in_progress_ttl_ms(job_timeout_s: float) -> int:
    """How long arq's in-progress marker lives when set: the job timeout + 10 s."""
    return int((job_timeout_s + 10) * 1000)


class SeamWorker(Worker):
    """arq's ``Worker`` with the hooks reelqueue needs; subclasses override ``before_poll``
    and use ``idle``, ``take_jobs``, ``abort_requested`` and ``stopping``."""

    def __init__(self, *args: Any, **kwargs: Any):
        # The name of the signal that began the shutdown, "" while running.
        self.stopping = ""
        super().__init__(*args, **kwargs)

    async def before_poll(self) -> None:
        """Called each time the worker is about to look for jobs to start."""

    async def _poll_iteration(self) -> None:
        await self.before_poll()
        await super()._poll_iteration()

    def handle_sig(self, signum: int) -> None:
        # Recorded first: arq cancels the running job's task right after, and the job
        # sees the CancelledError only at its next await, by which time this is set.
        self.stopping = signal.Signals(signum).name
        super().handle_sig(signum)

    @property
    def idle(self) -> bool:
        """Whether this worker would start a job now: it takes jobs and has room."""
        return self.allow_pick_jobs and self.job_counter < self.max_jobs

    def take_jobs(self, allowed: bool) -> None:
        """Start taking new jobs again, or stop (the running one carries on)."""
        self.allow_pick_jobs = allowed

    def abort_requested(self, job_id: str) -> bool:
        """Whether arq cancelled the job ``job_id`` because a user aborted it."""
        return job_id in self.aborting_tasks
