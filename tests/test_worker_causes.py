"""A job timeout, a user's cancel and a worker shutdown are told apart by what caused
them, not by how long the job ran: a real worker (arq's, in this process) on the test
Redis, running a job that sleeps until it is stopped."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import time
import types
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from daemon.compose import config_class, read_config
from daemon.jobs import JobSpec, Source, new_job_id, write_spec
from daemon.queue import QueueClient, attempts_key
from daemon.schedule import QUEUE_NAME
from tests.conftest import write_config
from workers import worker as worker_module
from workers.worker import PolicyWorker, create_worker

Config = config_class()  # the core's tables and the kinds'

pytestmark = pytest.mark.timeout(120)

NAP = json.dumps(["sleep", "60"])  # a job that runs until it is stopped


def config_for(tmp_path, redis_url: str, job_timeout: str = "2m") -> Config:
    return read_config(write_config(
        tmp_path, redis_url,
        worker=f'job_timeout = "{job_timeout}"\nname = "causes-worker"',
        **{"pipelines.nap": f'type = "command"\ncommand = {NAP}'}))


async def until(check: Callable[[], Awaitable[object]], timeout: float = 30,
                what: str = "condition") -> object:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = await check()
        if value:
            return value
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


@contextlib.asynccontextmanager
async def running_worker(config: Config) -> AsyncIterator[PolicyWorker]:
    worker = create_worker(config, config.redis.url)
    assert worker.loop is asyncio.get_running_loop()  # its signal handlers are this loop's
    main = asyncio.create_task(worker.async_run())
    try:
        yield worker
    finally:
        if not worker.stopping:
            # Let arq finish its bookkeeping of the last job first: stopped in the middle
            # of it, its task would end in a CancelledError of its own.
            with contextlib.suppress(AssertionError):
                await until(lambda: asyncio.sleep(0, result=worker.idle), timeout=10)
            worker.handle_sig(signal.SIGTERM)
        with contextlib.suppress(asyncio.CancelledError):
            await main
        await worker.close()


async def start_nap(config: Config, queue: QueueClient) -> str:
    spec = JobSpec(id=new_job_id(), kind="nap", prompt="", source=Source(channel="cli"))
    write_spec(config.jobs_dir, spec)
    await queue.enqueue(spec)

    async def napping():
        state = await queue.get_state(spec.id)
        return state["status"] == "running" and state["stage"] == "run"

    await until(napping, what="the job to run")
    return spec.id


async def test_a_job_over_its_timeout_is_stopped_by_the_workers_own_timer(tmp_path, redis_url):
    config = config_for(tmp_path, redis_url, job_timeout="2s")
    queue = await QueueClient.open(redis_url)
    try:
        async with running_worker(config) as worker:
            job_id = await start_nap(config, queue)

            async def finished():
                state = await queue.get_state(job_id)
                return state if state["status"] == "failed" else None

            state = await until(finished, what="the timeout")
            assert "longer than the worker's job_timeout (2 s)" in state["error"]
            # Stopped by its timer, not cancelled by arq's timeout (a backstop past it):
            # the job ended without an error, as far as arq is concerned.
            await until(lambda: asyncio.sleep(0, result=worker.jobs_complete), what="arq")
            assert worker.jobs_complete == 1 and worker.jobs_failed == 0
            assert not await queue.redis.zscore(QUEUE_NAME, job_id)
    finally:
        await queue.close()


async def test_a_users_cancel_is_a_cancel(tmp_path, redis_url):
    config = config_for(tmp_path, redis_url)
    queue = await QueueClient.open(redis_url)
    try:
        async with running_worker(config):
            job_id = await start_nap(config, queue)
            assert await queue.cancel(job_id) == "cancelling"

            async def finished():
                state = await queue.get_state(job_id)
                return state if state["status"] == "cancelled" else None

            state = await until(finished, what="the cancel")
            assert state["error"] == "cancelled by request"

            async def out_of_arqs_queue():
                return await queue.redis.zscore(QUEUE_NAME, job_id) is None

            await until(out_of_arqs_queue, what="arq to drop the job")
    finally:
        await queue.close()


async def test_a_shutdown_is_a_shutdown_even_when_the_clock_jumped(tmp_path, redis_url,
                                                                  monkeypatch):
    # The worker module's wall clock jumps three hours ahead while the job runs (an NTP
    # step, a suspended VM): how long the job seems to have run must not matter.
    offset = [0.0]
    clock = types.SimpleNamespace(time=lambda: time.time() + offset[0],
                                  monotonic=time.monotonic, sleep=time.sleep)
    monkeypatch.setattr(worker_module, "time", clock)
    config = config_for(tmp_path, redis_url, job_timeout="1h")
    queue = await QueueClient.open(redis_url)
    try:
        async with running_worker(config) as worker:
            job_id = await start_nap(config, queue)
            offset[0] = 3 * 3600
            signal.raise_signal(signal.SIGTERM)  # to arq's handler, as `kill` would
            await until(lambda: asyncio.sleep(0, result=worker.stopping), what="the signal")
            assert worker.stopping == "SIGTERM"
        state = await queue.get_state(job_id)
        assert state["status"] == "queued" and not state.get("error")
        assert "interrupted by a worker stop" in state["message"]
        # Back in arq's queue for the next start, the attempt given back.
        assert await queue.redis.zscore(QUEUE_NAME, job_id)
        assert int(await queue.redis.get(attempts_key(job_id)) or 0) == 0
    finally:
        await queue.close()


def test_the_cause_is_what_happened_in_order_abort_shutdown_timeout():
    from workers.runner import Cancellation
    from workers.worker import WorkerState, stop_cause

    seam = types.SimpleNamespace(stopping="", abort_requested=lambda job_id: job_id == "a")
    state = WorkerState(config=Config(), name="w", arq_worker=seam)  # type: ignore[arg-type]
    assert stop_cause(state, "a") == Cancellation.USER
    assert stop_cause(state, "b") == Cancellation.TIMEOUT  # arq's own timeout, the backstop
    seam.stopping = "SIGTERM"
    assert stop_cause(state, "a") == Cancellation.USER
    assert stop_cause(state, "b") == Cancellation.SHUTDOWN
