"""Delivery: answering each finished job in the channel it came from.

The worker never waits on a channel: when a job ends it pushes the job id onto a
durable Redis list, and the daemon delivers from there with the reliable-queue
pattern (an id moves to an "active" list while being delivered and leaves it only
when delivery succeeded). A daemon that dies mid-delivery delivers again on start;
each channel's delivery is idempotent, so nothing arrives twice.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable

from redis.exceptions import RedisError

from daemon import metrics
from daemon.channels import Deliverer
from daemon.config import Config
from daemon.jobs import JobOutcome, JobStatus, job_dir, read_spec
from daemon.logs import get_logger
from daemon.queue import QueueClient

MAX_BACKOFF_S = 300.0

log = get_logger(component="delivery")


class DeliveryLoop:
    def __init__(self, config: Config, queue: QueueClient):
        self.config = config
        self.queue = queue
        self.failures: dict[str, int] = {}
        self._retries: set[asyncio.Task[None]] = set()
        self._stop = asyncio.Event()
        # Channels not registered (cli, http) are answered by polling the job's state.
        self.deliverers: dict[str, Deliverer] = {}

    def register(self, channel: str, deliverer: Deliverer) -> None:
        self.deliverers[channel] = deliverer

    async def run(self, stop: asyncio.Event) -> None:
        self._stop = stop
        moved = await self.queue.requeue_active_deliveries()
        if moved:
            log.info("resuming deliveries interrupted by a restart", count=moved)
        while not stop.is_set():
            try:
                job_id = await self.queue.next_delivery(timeout_s=1)
            except (RedisError, OSError) as exc:
                log.warning("redis unavailable for deliveries; retrying", error=str(exc))
                await asyncio.sleep(1)
                continue
            if job_id is not None:
                await self._deliver_one(job_id)
        for task in self._retries:
            task.cancel()

    async def _deliver_one(self, job_id: str) -> None:
        try:
            state = await self.queue.get_state(job_id) or {}
            await self.deliver(job_id, state)
        except Exception as exc:
            failures = self.failures[job_id] = self.failures.get(job_id, 0) + 1
            delay = min(MAX_BACKOFF_S, 2.0**failures)
            log.warning("delivery failed; will retry", job_id=job_id, error=repr(exc),
                        retry_in_s=delay)
            task = asyncio.create_task(self._retry_later(job_id, delay))
            self._retries.add(task)
            task.add_done_callback(self._retries.discard)
            return
        self.failures.pop(job_id, None)
        metrics.record_finished(state)
        await self._record(self.queue.delivery_done, job_id)

    async def _retry_later(self, job_id: str, delay: float) -> None:
        await asyncio.sleep(delay)
        await self._record(self.queue.delivery_retry_later, job_id)

    async def _record(self, step: Callable[[str], Awaitable[None]], job_id: str) -> None:
        """Move a delivery on in Redis, waiting out a Redis restart. Given up only when
        the daemon stops: the id then stays in the active list, and the next start
        delivers it again (idempotently)."""
        while not self._stop.is_set():
            try:
                await step(job_id)
                return
            except (RedisError, OSError) as exc:
                log.warning("redis unavailable for deliveries; retrying", job_id=job_id,
                            error=str(exc))
                await asyncio.sleep(1)

    async def deliver(self, job_id: str, state: dict[str, object]) -> None:
        directory = job_dir(self.config.jobs_dir, job_id)
        spec = await asyncio.to_thread(read_spec, self.config.jobs_dir, job_id)
        outcome = JobOutcome.read(directory)
        if outcome is None:
            # Cancelled before it started: no worker wrote how it ended. Written here, the
            # job folder stays the whole record (the digest reads it, not Redis).
            outcome = _outcome_from_state(state)
            with contextlib.suppress(OSError):  # a full disk: delivered all the same
                await asyncio.to_thread(outcome.write, directory)
        deliverer = self.deliverers.get(spec.source.channel)
        if deliverer is not None:
            await deliverer(spec, outcome, directory)


def _outcome_from_state(state: dict[str, object]) -> JobOutcome:
    """A job cancelled before it ever started has no result.json: use its live state."""
    status = JobStatus(str(state.get("status") or JobStatus.failed))
    return JobOutcome(status, error=str(state.get("error") or status.value))
