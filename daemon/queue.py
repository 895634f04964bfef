"""The queue client: arq for the job queue, plus reelqueue's own Redis keys for live
job state, worker heartbeats and the durable delivery queue.

Keys (all under ``reelqueue:``):

- ``job:<id>``          hash: status, stage, percent, message, error, times, kind, …
- ``recent``            sorted set of job ids by creation time (for listings)
- ``recent:by:<name>``  the same, per submitter (for a user's own listing and caps)
- ``active:<name>``, ``daily:<name>:<day>``  the caps' own keys: see daemon.caps
- ``events``            pub/sub channel: one JSON message per state change
- ``workers``           set of worker names ever seen (their heartbeats say which live)
- ``paused``            present while workers are paused: who paused them, why, when
- ``worker:<name>``     JSON heartbeat of a live worker (expires when it dies)
- ``running:<id>``      which worker runs a job (expires when that worker dies)
- ``attempts:<id>``     how many times a job was started and not cleanly handed back
- ``<channel>:outbox``  messages for a channel to post (the morning digest): daemon.outbox
- ``deliveries``        list of job ids whose outcome awaits delivery to its channel
- ``deliveries:active`` the ones a daemon is delivering right now (reliable-queue pattern)
- ``served``            per class and submitter, the turn it was last served (round robin)

New jobs wait *parked* in arq's queue until a worker releases them: see daemon.schedule.
"""

from __future__ import annotations

import itertools
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from arq import create_pool
from arq.connections import ArqRedis, RedisSettings
from arq.constants import abort_jobs_ss, job_key_prefix
from arq.jobs import Job
from arq.jobs import JobStatus as ArqJobStatus
from redis.exceptions import RedisError

from daemon import caps, schedule
from daemon.jobs import JobSpec, JobStatus
from daemon.schedule import PREFIX, QUEUE_NAME, state_key

RECENT_KEY = PREFIX + "recent"
EVENTS_CHANNEL = PREFIX + "events"
WORKERS_KEY = PREFIX + "workers"
PAUSED_KEY = PREFIX + "paused"
DELIVERIES_KEY = PREFIX + "deliveries"
DELIVERIES_ACTIVE_KEY = PREFIX + "deliveries:active"
# An overnight backlog must never expire: arq's default is one day.
JOB_EXPIRY_S = 60 * 86400
RUN_FUNCTION = "run_job"


def running_key(job_id: str) -> str:
    return f"{PREFIX}running:{job_id}"


def attempts_key(job_id: str) -> str:
    return f"{PREFIX}attempts:{job_id}"


def worker_key(name: str) -> str:
    return f"{PREFIX}worker:{name}"


def recent_key(submitted_by: str | None = None) -> str:
    return RECENT_KEY if submitted_by is None else f"{RECENT_KEY}:by:{submitted_by}"


class RedisUnavailable(Exception):
    """Redis could not be reached; the message says where and what to do."""


def redis_settings(url: str) -> RedisSettings:
    settings = RedisSettings.from_dsn(url)
    # Fail fast with our own message instead of arq's long retry loop.
    settings.conn_retries = 2
    settings.conn_timeout = 2
    return settings


async def connect(url: str) -> ArqRedis:
    try:
        pool = await create_pool(redis_settings(url))
        await pool.ping()
        return pool
    except (OSError, RedisError) as exc:
        raise RedisUnavailable(
            f"cannot reach Redis at {url}: {exc}. Start that Redis server, or leave "
            "[redis] url empty in the config to use reelqueue's embedded one."
        ) from None


def _now() -> float:
    return time.time()


def _decode(mapping: dict[bytes, bytes]) -> dict[str, str]:
    return {k.decode(): v.decode() for k, v in mapping.items()}


@dataclass
class EnqueueResult:
    job_id: str
    accepted: bool  # False: a job with this id already exists (a duplicate request)
    position: int | None


class QueueClient:
    """Everything the daemon, CLI and worker need from Redis, in one place."""

    def __init__(self, redis: ArqRedis, keep_results_s: float = 7 * 86400,
                 interactive_lead_s: float = 3600.0):
        self.redis = redis
        self.keep_results_s = keep_results_s
        self.interactive_lead_s = interactive_lead_s  # only for telling queue positions

    @classmethod
    async def open(cls, url: str, keep_results_s: float = 7 * 86400,
                   interactive_lead_s: float = 3600.0) -> QueueClient:
        return cls(await connect(url), keep_results_s, interactive_lead_s)

    async def close(self) -> None:
        await self.redis.aclose()

    # --- submitting -----------------------------------------------------------------

    async def enqueue(self, spec: JobSpec) -> EnqueueResult:
        """Queue a job whose spec.json is already in its directory (``daemon.submit``
        checked the request and took its place under the caps first).

        The arq job id is the reelqueue job id, so a second enqueue of the same id is
        refused by arq and reported here as ``accepted=False``. The job waits parked
        until a worker releases it (daemon.schedule).
        """
        key = state_key(spec.id)
        created = spec.created_at.timestamp()
        status = await self.redis.hget(key, "status")
        if status is not None and JobStatus(status.decode()).finished:
            # Finished (perhaps cancelled before it started, leaving no arq record):
            # a late duplicate of the request must not run it again.
            return EnqueueResult(spec.id, False, None)
        if status is None:
            await self.redis.hset(key, mapping={
                "id": spec.id,
                "status": JobStatus.queued,
                "kind": spec.kind,
                "channel": spec.source.channel,
                "submitted_by": spec.submitted_by,
                "priority": spec.priority,
                "prompt": spec.prompt[:200],
                "created_at": str(created),
                "stage": "queued",
                "percent": "0",
                "message": "",
            })
            await self.redis.zadd(RECENT_KEY, {spec.id: created})
            await self.redis.zadd(recent_key(spec.submitted_by), {spec.id: created})
        parked_until = datetime.fromtimestamp(
            schedule.parked_score(int(created * 1000)) / 1000, UTC)
        if await self.redis.zscore(QUEUE_NAME, spec.id) is None:
            # Not in arq's queue yet (new, or its first enqueue died half way).
            await self.redis.hset(schedule.PARKED_KEY, spec.id,
                                  schedule.parked_entry(spec.priority, spec.submitted_by))
        job = await self.redis.enqueue_job(
            RUN_FUNCTION, spec.id, _job_id=spec.id, _expires=JOB_EXPIRY_S,
            _defer_until=parked_until,
        )
        position = await self.queue_position(spec.id)
        if job is not None:
            await self._publish(spec.id, status=JobStatus.queued)
        return EnqueueResult(spec.id, job is not None, position)

    async def forget(self, spec: JobSpec) -> None:
        """Undo what a failed ``enqueue`` may have written before arq took the job: its
        state, its listings, its parked entry. Only for a job not in arq's queue."""
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.delete(state_key(spec.id))
            pipe.zrem(RECENT_KEY, spec.id)
            pipe.zrem(recent_key(spec.submitted_by), spec.id)
            pipe.hdel(schedule.PARKED_KEY, spec.id)
            await pipe.execute()

    async def is_waiting(self, job_id: str) -> bool:
        """Whether arq's queue holds the job (parked, released or held)."""
        return await self.redis.zscore(QUEUE_NAME, job_id) is not None

    async def park_again(self, spec: JobSpec) -> float:
        """Send a released job back among the parked ones, in its old place: returns the
        delay that makes arq's ``Retry`` put it there."""
        await self.redis.hset(schedule.PARKED_KEY, spec.id,
                              schedule.parked_entry(spec.priority, spec.submitted_by))
        parked_ms = schedule.parked_score(int(spec.created_at.timestamp() * 1000))
        return (parked_ms - _now() * 1000) / 1000

    # --- live state -------------------------------------------------------------------

    async def get_state(self, job_id: str,
                        positions: dict[str, int] | None = None) -> dict[str, Any] | None:
        """A job's live state; a queued one's includes its ``position`` (from
        ``positions`` when the caller already has them)."""
        raw = await self.redis.hgetall(state_key(job_id))
        if not raw:
            return None
        state: dict[str, Any] = _decode(raw)
        state["percent"] = float(state.get("percent") or 0)
        if state.get("status") == JobStatus.queued:
            state["position"] = (positions.get(job_id) if positions is not None
                                 else await self.queue_position(job_id))
        return state

    async def update_state(self, job_id: str, **fields: Any) -> None:
        values = {k: ("" if v is None else str(v)) for k, v in fields.items()}
        values["updated_at"] = str(_now())
        await self.redis.hset(state_key(job_id), mapping=values)
        await self._publish(job_id, **fields)

    async def finish(self, job_id: str, status: JobStatus, error: str | None = None) -> None:
        """Record a final state and queue its delivery, atomically; the job's place under
        its submitter's cap is free again."""
        key = state_key(job_id)
        submitted_by = (await self.redis.hget(key, "submitted_by") or b"").decode()
        async with self.redis.pipeline(transaction=True) as pipe:
            final = {"message": error} if error else {}
            pipe.hset(key, mapping={
                **final,
                "status": status,
                "error": error or "",
                "stage": status,
                "percent": "100" if status == JobStatus.done else "0",
                "finished_at": str(_now()),
                "updated_at": str(_now()),
            })
            pipe.expire(key, int(self.keep_results_s))
            pipe.hdel(schedule.PARKED_KEY, job_id)  # cancelled while parked
            pipe.lpush(DELIVERIES_KEY, job_id)
            pipe.zrem(caps.active_key(submitted_by), job_id)
            await pipe.execute()
        await self._publish(job_id, status=status, error=error)

    async def _publish(self, job_id: str, **fields: Any) -> None:
        message = {"id": job_id, **{k: str(v) for k, v in fields.items() if v is not None}}
        await self.redis.publish(EVENTS_CHANNEL, json.dumps(message))

    async def queue_length(self) -> int:
        return await self.redis.zcard(QUEUE_NAME)

    async def queue_position(self, job_id: str) -> int | None:
        """1 for the next job to start; None when not waiting in the queue."""
        # The policy's order is followed only as far as this job (the parked jobs are
        # still all read and sorted).
        for place, waiting in enumerate(await self._line(), start=1):
            if waiting == job_id:
                return place
        return None

    async def queue_positions(self) -> dict[str, int]:
        """Every waiting job's place in line, 1 for the next to start."""
        return {job_id: place for place, job_id in enumerate(await self._line(), start=1)}

    async def _line(self) -> Iterator[str]:
        """The waiting jobs in the order they will start: first those already released to
        the workers (and jobs held for a retry), in arq's order, then the parked ones in
        the order the policy would release them."""
        released = await schedule.unparked_waiting(self.redis)
        parked = schedule.dispatch_order(await schedule.parked_jobs(self.redis),
                                         await schedule.served_turns(self.redis),
                                         int(self.interactive_lead_s * 1000))
        return itertools.chain(released, parked)

    async def active_jobs(self, submitted_by: str, scan: int = 200) -> list[dict[str, Any]]:
        """The submitter's queued and running jobs, newest first (among their last
        ``scan`` jobs)."""
        active = []
        positions = await self.queue_positions()
        for raw in await self.redis.zrevrange(recent_key(submitted_by), 0, scan - 1):
            state = await self.get_state(raw.decode(), positions)
            if state and state["status"] in (JobStatus.queued, JobStatus.running):
                active.append(state)
        return active

    async def list_jobs(
        self,
        limit: int = 20,
        cursor: str | None = None,
        status: JobStatus | None = None,
        submitted_by: str | None = None,
    ) -> tuple[list[dict[str, Any]], str | None]:
        """Jobs newest first, optionally of one status or one submitter.

        Returns the page and the cursor for the next one (None on the last page). The
        cursor is the creation time of the page's last job.
        """
        key = recent_key(submitted_by)
        upper = f"({cursor}" if cursor else "+inf"
        page: list[dict[str, Any]] = []
        last_score: float | None = None
        positions = await self.queue_positions()
        while len(page) < limit:
            batch = await self.redis.zrevrangebyscore(key, upper, "-inf", start=0,
                                                      num=max(limit, 50), withscores=True)
            if not batch:
                return page, None
            for raw_id, score in batch:
                last_score = score
                upper = f"({score!r}"
                state = await self.get_state(raw_id.decode(), positions)
                if state is None:  # its record expired: drop it from the index too
                    await self.redis.zrem(key, raw_id)
                    continue
                if status is None or state["status"] == status:
                    page.append(state)
                    if len(page) == limit:
                        break
        return page, repr(last_score)

    async def cancel(self, job_id: str) -> str:
        """Cancel a queued job or interrupt a running one. Returns what happened."""
        state = await self.get_state(job_id)
        if state is None:
            return "unknown"
        if JobStatus(state["status"]).finished:
            return "finished"
        job = Job(job_id, self.redis, _queue_name=QUEUE_NAME)
        if await job.status() in (ArqJobStatus.queued, ArqJobStatus.deferred):
            # Not started (parked, released or held): take it out of the queue and
            # answer the sender now.
            removed = await self.redis.zrem(QUEUE_NAME, job_id)
            if removed:
                await self.redis.delete(job_key_prefix + job_id)
                await self.finish(job_id, JobStatus.cancelled, "cancelled before it started")
                return "cancelled"
        # Running (or just starting): the worker sees the abort and stops at the next step.
        await self.redis.zadd(abort_jobs_ss, {job_id: int(_now() * 1000)})
        await self.update_state(job_id, message="cancelling…")
        return "cancelling"

    # --- workers ------------------------------------------------------------------------

    async def workers(self) -> list[dict[str, Any]]:
        """Heartbeats of the live workers."""
        names = sorted(n.decode() for n in await self.redis.smembers(WORKERS_KEY))
        if not names:
            return []
        beats = []
        for raw in await self.redis.mget([worker_key(name) for name in names]):
            if raw:  # None: that worker is gone (its heartbeat expired)
                beat = json.loads(raw)
                beat["age_s"] = round(_now() - beat["ts"], 1)
                beats.append(beat)
        return beats

    async def pause(self, by: str, reason: str = "") -> None:
        """Workers finish their running job and take no new one; the queue stays."""
        await self.redis.set(PAUSED_KEY, json.dumps({"by": by, "reason": reason,
                                                     "since": _now()}))

    async def resume(self) -> bool:
        return bool(await self.redis.delete(PAUSED_KEY))

    async def paused(self) -> dict[str, Any] | None:
        raw = await self.redis.get(PAUSED_KEY)
        return json.loads(raw) if raw else None

    # --- deliveries ----------------------------------------------------------------------

    async def next_delivery(self, timeout_s: float) -> str | None:
        """Move one pending delivery to the active list and return its job id."""
        raw = await self.redis.blmove(DELIVERIES_KEY, DELIVERIES_ACTIVE_KEY, timeout_s,
                                      "RIGHT", "LEFT")
        return raw.decode() if raw else None

    async def delivery_done(self, job_id: str) -> None:
        await self.redis.lrem(DELIVERIES_ACTIVE_KEY, 0, job_id)

    async def delivery_retry_later(self, job_id: str) -> None:
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.lrem(DELIVERIES_ACTIVE_KEY, 0, job_id)
            pipe.lpush(DELIVERIES_KEY, job_id)
            await pipe.execute()

    async def requeue_active_deliveries(self) -> int:
        """At daemon start: deliveries a crashed daemon was in the middle of go back."""
        moved = 0
        while await self.redis.lmove(DELIVERIES_ACTIVE_KEY, DELIVERIES_KEY, "RIGHT", "LEFT"):
            moved += 1
        return moved


def utc_from_ts(value: str | float | None) -> datetime | None:
    if value in (None, ""):
        return None
    return datetime.fromtimestamp(float(value), UTC)
