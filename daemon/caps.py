"""Caps on what a submitter (and everybody together) may have queued, checked and taken
in one Redis script, so that parallel requests cannot pass a cap together.

Keys, under ``reelqueue:``: ``active:<submitter>`` (sorted set of the submitter's jobs
that are queued or running, scored by when their place was taken: a job joins when its
submission reserves a place, and leaves when it finishes, see ``QueueClient.finish``)
and ``daily:<submitter>:<UTC date>`` (jobs submitted that day). The global cap counts
arq's queue itself.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from arq.connections import ArqRedis

from daemon.jobs import JobStatus
from daemon.schedule import PREFIX, QUEUE_NAME, state_key

DAY_KEY_TTL_S = 2 * 86400
# A place taken by a submission that never got as far as queueing its job (its daemon
# died in between, and nobody sent the request again) is freed after this long.
UNFINISHED_SUBMISSION_S = 600

# Jobs whose submission holds a place but is not in arq's queue yet (writing its inputs):
# the global cap counts them with arq's queue, so parallel requests cannot pass it.
RESERVING_KEY = PREFIX + "reserving"

# KEYS: active set, daily counter, arq's queue, reserving. ARGV: job id, max queued, max
# per day, max waiting in all, now (ms), the daily key's lifetime (s), the score before
# which a reservation is stale (ms). Returns {verdict, count}: verdict "ok" (count 1 when
# this call took the place, 0 when the job held it already), "queue_full", "queued" or
# "daily".
_RESERVE = """
if redis.call('ZSCORE', KEYS[1], ARGV[1]) then return {'ok', 0} end
redis.call('ZREMRANGEBYSCORE', KEYS[4], '-inf', ARGV[7])
local max_waiting = tonumber(ARGV[4])
if max_waiting > 0 then
  local waiting = redis.call('ZCARD', KEYS[3]) + redis.call('ZCARD', KEYS[4])
  if waiting >= max_waiting then return {'queue_full', waiting} end
end
local max_queued = tonumber(ARGV[2])
if max_queued > 0 then
  local queued = redis.call('ZCARD', KEYS[1])
  if queued >= max_queued then return {'queued', queued} end
end
local today = tonumber(redis.call('GET', KEYS[2]) or '0')
if tonumber(ARGV[3]) > 0 and today >= tonumber(ARGV[3]) then return {'daily', today} end
redis.call('ZADD', KEYS[1], ARGV[5], ARGV[1])
redis.call('ZADD', KEYS[4], ARGV[5], ARGV[1])
redis.call('INCR', KEYS[2])
redis.call('EXPIRE', KEYS[2], ARGV[6])
return {'ok', 1}
"""

# KEYS: active set, daily counter (the one the place was counted in), reserving.
# ARGV: job id. The counter is only decremented while it exists: a day that expired
# meanwhile must not come back as a key at -1 that never expires.
_GIVE_BACK = """
redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('ZREM', KEYS[3], ARGV[1])
if redis.call('EXISTS', KEYS[2]) == 1 then redis.call('DECR', KEYS[2]) end
return 1
"""


def active_key(submitted_by: str) -> str:
    return f"{PREFIX}active:{submitted_by}"


def daily_key(submitted_by: str, now: datetime | None = None) -> str:
    return f"{PREFIX}daily:{submitted_by}:{(now or datetime.now(UTC)):%Y-%m-%d}"


def seconds_to_utc_midnight(now: datetime | None = None) -> float:
    now = now or datetime.now(UTC)
    midnight = (now + timedelta(days=1)).replace(hour=0, minute=0, second=0, microsecond=0)
    return (midnight - now).total_seconds()


@dataclass(frozen=True)
class Reservation:
    """The answer of ``reserve``: ``verdict`` "ok", or which cap refused, with the count
    that reached it. ``taken``: this call took the place (give it back on failure)."""

    verdict: str
    count: int
    job_id: str
    submitted_by: str
    daily_key: str  # the day it was counted in, for giving it back after midnight

    @property
    def ok(self) -> bool:
        return self.verdict == "ok"

    @property
    def taken(self) -> bool:
        return self.ok and self.count == 1


async def reserve(redis: ArqRedis, job_id: str, submitted_by: str, max_queued: int,
                  max_per_day: int, max_waiting: int) -> Reservation:
    """Take a place for ``job_id`` under every cap (0: none), or say which cap is full."""
    day = daily_key(submitted_by)
    keys = [active_key(submitted_by), day, QUEUE_NAME, RESERVING_KEY]
    now_ms = int(time.time() * 1000)
    args = [job_id, max_queued, max_per_day, max_waiting, now_ms, DAY_KEY_TTL_S,
            now_ms - UNFINISHED_SUBMISSION_S * 1000]
    verdict, count = await redis.eval(_RESERVE, len(keys), *keys, *args)
    if verdict == b"queued" and await _forget_finished(redis, submitted_by):
        # A job that ended without leaving the set (killed with its Redis half way):
        # with it gone, the cap may have room after all.
        verdict, count = await redis.eval(_RESERVE, len(keys), *keys, *args)
    return Reservation(verdict.decode(), int(count), job_id, submitted_by, day)


async def settle(redis: ArqRedis, place: Reservation) -> None:
    """The job is in arq's queue now, where the global cap counts it."""
    await redis.zrem(RESERVING_KEY, place.job_id)


async def give_back(redis: ArqRedis, place: Reservation) -> None:
    """Undo a place taken for a job that was not queued after all."""
    keys = [active_key(place.submitted_by), place.daily_key, RESERVING_KEY]
    await redis.eval(_GIVE_BACK, len(keys), *keys, place.job_id)


async def _forget_finished(redis: ArqRedis, submitted_by: str) -> int:
    """Drop jobs from the submitter's active set that are no longer queued or running, and
    places whose submission died before queueing its job."""
    entries = await redis.zrange(active_key(submitted_by), 0, -1, withscores=True)
    stale_before = (time.time() - UNFINISHED_SUBMISSION_S) * 1000
    async with redis.pipeline(transaction=False) as pipe:
        for job_id, _ in entries:
            pipe.hget(state_key(job_id.decode()), "status")
        statuses = await pipe.execute()
    gone = []
    for (job_id, taken), status in zip(entries, statuses, strict=True):
        if (JobStatus(status.decode()).finished if status is not None
                else taken < stale_before):
            gone.append(job_id)
    if gone:
        await redis.zrem(active_key(submitted_by), *gone)
    return len(gone)
