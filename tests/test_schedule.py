"""The queue policy: interactive before batch with an age bonus, round robin between
submitters, first come first served within one submitter's jobs; parked jobs are
released one at a time by idle workers, and positions tell the same order."""

from __future__ import annotations

import asyncio
import json
import sys
from datetime import UTC, datetime, timedelta

import pytest

from daemon.compose import read_config
from daemon.jobs import JobSpec, JobStatus, Source, new_job_id, write_spec
from daemon.queue import QUEUE_NAME, QueueClient
from daemon.schedule import Waiting, dispatch_order, release_next
from tests.conftest import write_config

pytestmark = pytest.mark.timeout(120)
HOUR_MS = 3_600_000


def order(jobs: list[tuple[str, str, str, int]], served=None, lead_ms=HOUR_MS) -> list[str]:
    waiting = [Waiting(job_id, priority, who, created) for job_id, priority, who, created in jobs]
    return list(dispatch_order(waiting, served or {}, lead_ms))


def test_interactive_jobs_go_before_batch_jobs_queued_earlier():
    jobs = [("b1", "batch", "ann", 0), ("b2", "batch", "ann", 1000),
            ("i1", "interactive", "cy", 5000), ("i2", "interactive", "cy", 6000)]
    assert order(jobs) == ["i1", "i2", "b1", "b2"]


def test_a_batch_job_waiting_longer_than_the_lead_goes_first():
    jobs = [("b1", "batch", "ann", 0), ("i1", "interactive", "cy", HOUR_MS + 1),
            ("i0", "interactive", "dee", HOUR_MS - 1)]
    # i0 came within the lead of b1, i1 after it: the age bonus puts b1 between them.
    assert order(jobs) == ["i0", "b1", "i1"]


def test_the_age_bonus_goes_to_the_aged_batch_jobs_not_to_their_class():
    # bob's batch job is young: ann's old one takes the bonus although bob's turn is
    # due first, and bob's waits for the interactive job.
    jobs = [("ann-old", "batch", "ann", 0), ("bob-new", "batch", "bob", 2 * HOUR_MS - 60_000),
            ("cy-now", "interactive", "cy", 2 * HOUR_MS - 30_000)]
    served = {"batch:ann": 5, "batch:bob": 1}
    assert order(jobs, served) == ["ann-old", "cy-now", "bob-new"]


def test_round_robin_between_submitters_and_fifo_within_one():
    drop = [(f"a{n}", "batch", "ann", n) for n in range(5)]
    later = [("b0", "batch", "bob", 100), ("b1", "batch", "bob", 101)]
    assert order(later + drop) == ["a0", "b0", "a1", "b1", "a2", "a3", "a4"]


def test_whoever_was_served_least_recently_goes_first():
    jobs = [("a0", "interactive", "ann", 0), ("b0", "interactive", "bob", 50),
            ("c0", "interactive", "cy", 99)]
    served = {"interactive:ann": 7, "interactive:bob": 3}
    assert order(jobs, served) == ["c0", "b0", "a0"]


def test_turns_are_kept_per_class():
    # ann's recent interactive turn does not cost her a place among batch jobs.
    jobs = [("a0", "batch", "ann", 0), ("b0", "batch", "bob", 10)]
    assert order(jobs, {"interactive:ann": 9}) == ["a0", "b0"]


def test_specs_from_before_the_queue_classes_keep_their_channels_class():
    old = {"id": "j1", "kind": "video", "priority": 0, "source": {"channel": "folder"}}
    assert JobSpec.model_validate(old).priority == "batch"
    old["source"] = {"channel": "chat", "chat_id": 1}
    assert JobSpec.model_validate(old).priority == "interactive"


# --- on a real Redis --------------------------------------------------------------------


def make_spec(config, who: str, priority: str, kind: str = "video", age_s: float = 0,
              prompt: str = "a red fox") -> JobSpec:
    spec = JobSpec(id=new_job_id(), kind=kind, prompt=prompt, source=Source(channel="cli"),
                   submitted_by=who, priority=priority,
                   created_at=datetime.now(UTC) - timedelta(seconds=age_s))
    write_spec(config.jobs_dir, spec)
    return spec


async def test_release_follows_the_policy_and_positions_agree(config, queue):
    names = {}
    for who, priority, count in [("ann", "batch", 4), ("bob", "batch", 2),
                                 ("cy", "interactive", 1)]:
        for n in range(count):
            spec = make_spec(config, who, priority, age_s=100 - len(names))
            names[spec.id] = f"{who}{n}"
            await queue.enqueue(spec)
    expected = ["cy0", "ann0", "bob0", "ann1", "bob1", "ann2", "ann3"]

    positions = await queue.queue_positions()
    assert [names[j] for j in sorted(positions, key=positions.get)] == expected
    state = await queue.get_state(next(j for j, n in names.items() if n == "bob1"))
    assert state["position"] == 5 and state["priority"] == "batch"

    released = []
    while job_id := await release_next(queue.redis, 3600):
        released.append(names[job_id])
        # One job at a time: nothing more is released while it waits for a worker.
        assert await release_next(queue.redis, 3600) is None
        assert (await queue.queue_positions())[job_id] == 1
        await queue.redis.zrem(QUEUE_NAME, job_id)  # as if a worker ran it
    assert released == expected


async def test_parked_jobs_can_be_cancelled_and_are_not_queued_twice(config, queue):
    first, second = make_spec(config, "ann", "batch"), make_spec(config, "ann", "batch")
    assert (await queue.enqueue(first)).accepted
    assert not (await queue.enqueue(first)).accepted  # a duplicate request
    assert (await queue.enqueue(second)).position == 2
    assert await queue.cancel(first.id) == "cancelled"
    assert (await queue.get_state(first.id))["status"] == JobStatus.cancelled
    assert await queue.queue_positions() == {second.id: 1}
    assert await release_next(queue.redis, 3600) == second.id


async def test_a_real_worker_runs_jobs_in_policy_order(tmp_path, redis_url, start):
    """Jobs queued while the worker is paused start, once resumed, in policy order."""
    script = "import pathlib, sys; pathlib.Path(sys.argv[1], 'said.txt').write_text(sys.argv[2])"
    argv = json.dumps([sys.executable, "-c", script, "{outdir}", "{prompt}"])
    config_file = write_config(tmp_path, redis_url, **{
        "pipelines.say": f'type = "command"\ncommand = {argv}\noutputs = ["*.txt"]'})
    config = read_config(config_file)
    queue = await QueueClient.open(config.redis.url)
    try:
        await queue.pause("test")
        names = {}
        for who, priority, count in [("ann", "batch", 3), ("bob", "batch", 2),
                                     ("cy", "interactive", 1)]:
            for n in range(count):
                spec = make_spec(config, who, priority, kind="say", prompt=f"{who}{n}",
                                 age_s=100 - len(names))
                names[spec.id] = f"{who}{n}"
                await queue.enqueue(spec)
        start(config_file, "worker")
        await queue.resume()

        async def all_done() -> list[dict] | None:
            states = [await queue.get_state(job_id) for job_id in names]
            return states if all(s["status"] == JobStatus.done for s in states) else None

        states = None
        for _ in range(600):
            if states := await all_done():
                break
            await asyncio.sleep(0.1)
        assert states, "the jobs did not all finish within a minute"
        started = sorted(states, key=lambda s: float(s["started_at"]))
        assert [names[s["id"]] for s in started] == ["cy0", "ann0", "bob0", "ann1", "bob1",
                                                      "ann2"]
    finally:
        await queue.close()
