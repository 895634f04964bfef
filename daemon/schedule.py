"""Which waiting job runs next: priorities, an age bonus and round robin between
submitters, on top of arq's queue.

arq runs jobs in score order, and a score in the future means "not yet". So new jobs
are *parked*: enqueued with a score far in the future (``PARKED_BASE_MS`` plus their
creation time), where arq leaves them alone. An idle worker *releases* one parked job
at a time, the one this policy picks, by moving its score to now; arq then starts it
as usual. Everything else (job records, retries, aborts, results, crash recovery)
stays arq's, and a parked job is an ordinary arq job the whole time, so nothing is
lost between the two states. The worker calls ``release_next`` from its hook into arq's
poll (workers.arq_seam); what this relies on of arq (a job starts once its score is
due, arq's key names) is pinned by tests/test_seam.py.

The policy, as ``dispatch_order`` computes it:

- two classes, ``interactive`` (chat, HTTP, CLI by default) and ``batch`` (folders by
  default); each folder and HTTP token can choose;
- an interactive job runs before a batch job, unless the batch job was queued more
  than ``[queue] interactive_lead`` earlier (the age bonus: a busy chat cannot starve
  a folder forever);
- within a class, round robin between submitters (whoever was served least recently
  goes next), first come first served within a submitter's own jobs.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

from arq.connections import ArqRedis
from arq.constants import default_queue_name, in_progress_key_prefix

Priority = Literal["interactive", "batch"]
PRIORITIES: tuple[Priority, ...] = ("interactive", "batch")

# Year 2286 in ms: a score arq will not reach, with room below 2**53 to add a
# creation time exactly.
PARKED_BASE_MS = 10**13
QUEUE_NAME = default_queue_name
PREFIX = "reelqueue:"
PARKED_KEY = PREFIX + "parked"  # hash job id -> "<class>\t<submitter>" while parked
SERVED_KEY = PREFIX + "served"  # hash "<class>:<submitter>" -> turn it was last served
TURN_KEY = PREFIX + "served:turn"  # counter of releases, the clock of the round robin


def state_key(job_id: str) -> str:
    """A job's live state (hash: status, stage, percent, …); see daemon.queue."""
    return f"{PREFIX}job:{job_id}"


def parked_score(created_ms: int) -> int:
    return PARKED_BASE_MS + created_ms


def parked_entry(priority: Priority, submitter: str) -> str:
    """What the policy needs to know of a parked job, kept in one hash so that reading
    a long queue's worth of it is one command."""
    return f"{priority}\t{submitter}"


@dataclass(frozen=True)
class Waiting:
    job_id: str
    priority: Priority
    submitter: str
    created_ms: int


def _turn_key(priority: str, submitter: str) -> str:
    return f"{priority}:{submitter}"


def dispatch_order(waiting: list[Waiting], served: dict[str, int],
                   interactive_lead_ms: int) -> Iterator[str]:
    """The ids of ``waiting`` jobs in the order they would be released.

    ``served`` maps "<class>:<submitter>" to the turn that submitter was last served
    (missing: never). The order holds as long as no job arrives or leaves meanwhile.
    """
    queues: dict[str, dict[str, deque[Waiting]]] = {p: {} for p in PRIORITIES}
    for job in sorted(waiting, key=lambda j: (j.created_ms, j.job_id)):
        queues[job.priority].setdefault(job.submitter, deque()).append(job)
    turns = {p: {who: served.get(_turn_key(p, who), 0) for who in queues[p]}
             for p in PRIORITIES}
    turn = max(served.values(), default=0)

    def round_robin(priority: str, queued_before_ms: float = math.inf) -> str | None:
        """The submitter of the class served least recently (then: whose next job is
        oldest), among those whose next job was queued before ``queued_before_ms``."""
        candidates = [(turns[priority][who], jobs[0].created_ms, who)
                      for who, jobs in queues[priority].items()
                      if jobs[0].created_ms < queued_before_ms]
        return min(candidates)[2] if candidates else None

    while queues["interactive"] or queues["batch"]:
        priority, who = "interactive", round_robin("interactive")
        if who is None:
            priority, who = "batch", round_robin("batch")
        else:
            # The age bonus: batch jobs queued more than the lead before the interactive
            # job that would go next go first, taking turns among themselves.
            aged = round_robin("batch", queues["interactive"][who][0].created_ms
                               - interactive_lead_ms)
            if aged is not None:
                priority, who = "batch", aged
        assert who is not None
        jobs = queues[priority][who]
        yield jobs.popleft().job_id
        turn += 1
        turns[priority][who] = turn
        if not jobs:
            del queues[priority][who]


async def parked_jobs(redis: ArqRedis) -> list[Waiting]:
    """The parked jobs with what the policy needs to know of each."""
    parked = await redis.zrangebyscore(QUEUE_NAME, PARKED_BASE_MS, "+inf", withscores=True)
    if not parked:
        return []
    entries = await redis.hmget(PARKED_KEY, [raw_id for raw_id, _ in parked])
    waiting = []
    for (raw_id, score), entry in zip(parked, entries, strict=True):
        priority, _, submitter = (entry or b"").decode().partition("\t")
        waiting.append(Waiting(
            job_id=raw_id.decode(),
            priority="batch" if priority == "batch" else "interactive",
            submitter=submitter,
            created_ms=int(score) - PARKED_BASE_MS,
        ))
    return waiting


async def served_turns(redis: ArqRedis) -> dict[str, int]:
    return {k.decode(): int(v) for k, v in (await redis.hgetall(SERVED_KEY)).items()}


async def unparked_waiting(redis: ArqRedis, due_only: bool = False) -> list[str]:
    """Jobs out of the parked range that no worker runs yet, in arq's order: released
    ones, jobs put back by a stop or a crash, jobs held for a retry (unless
    ``due_only``: then only those arq may start now)."""
    upper = int(time.time() * 1000) if due_only else f"({PARKED_BASE_MS}"
    unparked = await redis.zrangebyscore(QUEUE_NAME, "-inf", upper)
    if not unparked:
        return []
    async with redis.pipeline(transaction=False) as pipe:
        for raw in unparked:
            pipe.exists(in_progress_key_prefix + raw.decode())
        # Running jobs stay in arq's queue until they finish: they are not waiting.
        running = await pipe.execute()
    return [raw.decode() for raw, busy in zip(unparked, running, strict=True) if not busy]


async def release_next(redis: ArqRedis, interactive_lead_s: float) -> str | None:
    """Called by an idle worker before it looks at the queue: unless a job is already
    waiting to be started, release the parked job the policy picks. Returns its id.

    Two idle workers looking at the same moment release the same job; arq starts it
    once, and the other worker releases the next one a poll later.
    """
    if await unparked_waiting(redis, due_only=True):
        return None
    waiting = await parked_jobs(redis)
    if not waiting:
        return None
    served = await served_turns(redis)
    job = next(dispatch_order(waiting, served, int(interactive_lead_s * 1000)))
    chosen = next(w for w in waiting if w.job_id == job)
    # XX: a job cancelled since we looked stays gone (and its submitter keeps the turn).
    if not await redis.zadd(QUEUE_NAME, {job: int(time.time() * 1000)}, xx=True, ch=True):
        return None
    async with redis.pipeline(transaction=True) as pipe:
        pipe.hdel(PARKED_KEY, job)
        pipe.incr(TURN_KEY)
        turn = (await pipe.execute())[-1]
    await redis.hset(SERVED_KEY, _turn_key(chosen.priority, chosen.submitter), turn)
    return job
