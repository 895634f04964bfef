"""The GPU worker: an arq ``Worker`` with ``max_jobs=1`` that runs one job at a time.

Each job runs in a thread (``workers.runner``) so the event loop stays free for
heartbeats, progress and cancel requests. Around arq's own bookkeeping this adds:

- a heartbeat (``reelqueue:worker:<name>``) and a claim on the running job
  (``reelqueue:running:<id>``) that both expire when the worker dies;
- orphan recovery: a job whose worker died (SIGKILL, OOM killer, power loss) is handed
  back to the queue within seconds instead of after arq's job timeout;
- a crash budget: a job that kept killing its worker fails visibly after
  ``[worker] max_tries`` starts instead of crash-looping;
- graceful stop: on SIGTERM/SIGINT the job stops at its next checkpoint (finished
  scene clips stay) and goes back to the queue for the next start;
- the job timeout, a user's cancel and a shutdown told apart by what caused them: the
  worker's own timer for the first (arq's timeout is only a backstop past it), arq's
  abort and signal handling, as ``workers.arq_seam`` records them, for the others;
- the queue policy: new jobs wait parked, and an idle worker releases the one that
  should run next (priorities, age bonus, round robin; see daemon.schedule).

What the worker needs of arq's internals is in ``workers.arq_seam`` and nowhere else.
The worker's GPU state (resident models, health counter) is made here, at the start of
the worker process, and handed to each job (``run_job_sync(gpu_state=...)``).
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from arq import Retry, cron, func

from daemon import outbox
from daemon.config import Config
from daemon.jobs import JobOutcome, JobSpec, JobStatus, job_dir, read_spec
from daemon.kinds import KindRegistry
from daemon.logs import get_logger
from daemon.queue import (
    QUEUE_NAME,
    RUN_FUNCTION,
    WORKERS_KEY,
    QueueClient,
    attempts_key,
    redis_settings,
    running_key,
    worker_key,
)
from daemon.schedule import release_next
from workers import gpu
from workers.arq_seam import IN_PROGRESS_PREFIX, SeamWorker, in_progress_ttl_ms
from workers.device import device_name
from workers.pipelines import kind_registry
from workers.runner import Cancellation, Interrupted, run_job_sync
from workers.vram import vram_now

HEARTBEAT_S = 3.0
CLAIM_TTL_S = 20  # a dead worker's claim on its job lapses after this
ORPHAN_GRACE_MS = 15_000  # arq marks a job in progress a moment before we claim it
PROGRESS_MIN_INTERVAL_S = 0.25
DISK_RETRY_S = 60  # a job held for disk space is looked at again after this
# The worker stops a job at [worker] job_timeout itself; arq's own timeout, this much
# later, is only a backstop for a job that does not stop.
TIMEOUT_BACKSTOP_S = 120.0

log = get_logger(component="worker")


@dataclass
class WorkerState:
    config: Config
    name: str
    gpu: gpu.GpuState = field(default_factory=gpu.GpuState)  # made at the process start
    kinds: KindRegistry = field(default_factory=kind_registry)  # likewise, from the config
    queue: QueueClient = None  # type: ignore[assignment]  # set at startup from arq's pool
    instance: str = field(default_factory=lambda: uuid.uuid4().hex[:8])
    device: str = "cpu"
    arq_worker: PolicyWorker | None = None
    current_job: str | None = None
    current_stage: str = ""
    paused: str = ""  # why, while workers are paused
    heartbeat_task: asyncio.Task[None] | None = None

    @property
    def claim(self) -> str:
        return f"{self.name}|{self.instance}"

    @property
    def in_progress_ttl_ms(self) -> int:
        return in_progress_ttl_ms(arq_job_timeout(self.config))


def arq_job_timeout(config: Config) -> float:
    return config.worker.job_timeout + TIMEOUT_BACKSTOP_S


def default_worker_name() -> str:
    gpu = os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",")[0] or "0"
    return f"{socket.gethostname()}-gpu{gpu}"


async def _beat(state: WorkerState) -> None:
    redis = state.queue.redis
    vram = await asyncio.to_thread(vram_now)
    beat = {
        "name": state.name,
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "device": state.device,
        "job_id": state.current_job,
        "stage": state.current_stage,
        "vram_used": vram[0] if vram else None,
        "vram_total": vram[1] if vram else None,
        "stopped": state.gpu.health.reason or None,
        "paused": state.paused or None,
        "ts": time.time(),
    }
    await redis.set(worker_key(state.name), json.dumps(beat), ex=int(HEARTBEAT_S * 5))
    if state.current_job:
        await redis.set(running_key(state.current_job), state.claim, ex=CLAIM_TTL_S)


async def recover_orphans(state: WorkerState) -> list[str]:
    """Hand back jobs that arq still marks in progress but whose worker is gone."""
    redis = state.queue.redis
    recovered = []
    for key in await redis.keys(IN_PROGRESS_PREFIX + "*"):
        job_id = key.decode().removeprefix(IN_PROGRESS_PREFIX)
        owner = await redis.get(running_key(job_id))
        if owner:
            name, _, instance = owner.decode().partition("|")
            # Same worker name, another instance: that is us before a crash.
            if name != state.name or instance == state.instance:
                continue
        else:
            age_ms = state.in_progress_ttl_ms - await redis.pttl(key)
            if age_ms < ORPHAN_GRACE_MS:
                continue
        await redis.delete(key, running_key(job_id))
        recovered.append(job_id)
        log.warning("job's worker died; handing the job back to the queue", job_id=job_id)
    return recovered


async def _heartbeat_loop(state: WorkerState) -> None:
    while True:
        try:
            paused = await state.queue.paused()
            state.paused = (paused["reason"] or f"paused by {paused['by']}") if paused else ""
            if state.arq_worker is not None:
                # A paused worker finishes its job and takes no new one; so does one whose
                # GPU keeps failing.
                state.arq_worker.take_jobs(not paused and not state.gpu.health.should_stop)
            await _beat(state)
            await recover_orphans(state)
        except Exception as exc:  # Redis restarting: keep beating once it is back
            log.warning("heartbeat failed", error=str(exc))
        await asyncio.sleep(HEARTBEAT_S)


async def startup(ctx: dict[str, Any]) -> None:
    state: WorkerState = ctx["reelqueue"]
    state.queue = QueueClient(ctx["redis"], keep_results_s=state.config.worker.keep_results,
                              interactive_lead_s=state.config.queue.interactive_lead)
    state.device = await asyncio.to_thread(device_name)
    await state.queue.redis.sadd(WORKERS_KEY, state.name)
    await _beat(state)
    await recover_orphans(state)
    state.heartbeat_task = asyncio.create_task(_heartbeat_loop(state))
    log.info("worker ready", name=state.name, device=state.device, queue=QUEUE_NAME)


async def shutdown(ctx: dict[str, Any]) -> None:
    state: WorkerState = ctx["reelqueue"]
    if state.heartbeat_task:
        state.heartbeat_task.cancel()
    await state.queue.redis.delete(worker_key(state.name))
    log.info("worker stopped", name=state.name)


def _progress_publisher(state: WorkerState, job_id: str, loop: asyncio.AbstractEventLoop):
    """A thread-safe progress callback that sends at most a few updates per second."""
    last = {"t": 0.0, "stage": ""}

    def publish(stage: str, percent: float, message: str) -> None:
        now = time.monotonic()
        throttled = stage == last["stage"] and now - last["t"] < PROGRESS_MIN_INTERVAL_S
        if throttled and percent < 100:  # never drop a stage's last word
            return
        last.update(t=now, stage=stage)
        state.current_stage = stage
        update = state.queue.update_state(
            job_id, stage=stage, percent=round(percent, 1), message=message
        )
        asyncio.run_coroutine_threadsafe(update, loop)

    return publish


async def run_job(ctx: dict[str, Any], job_id: str) -> dict[str, str]:
    """arq's entry point: run one reelqueue job to a final, delivered-to-queue state."""
    state: WorkerState = ctx["reelqueue"]
    config, queue, redis = state.config, state.queue, state.queue.redis
    bound = log.bind(job_id=job_id)
    directory = job_dir(config.jobs_dir, job_id)

    previous = JobOutcome.read(directory)
    if previous is not None:
        # Finished before a crash kept it from being recorded in Redis: record it, don't redo it.
        await queue.finish(job_id, previous.status, previous.error)
        return {"status": previous.status}

    try:
        spec = read_spec(config.jobs_dir, job_id)
    except (OSError, ValueError) as exc:
        await queue.finish(job_id, JobStatus.failed, f"the job's spec could not be read: {exc}")
        return {"status": JobStatus.failed}

    low = low_disk_space(config, spec)
    if low:
        # Holding beats writing half-files: the job goes back to its place in the queue,
        # and this worker releases no job for a while (the next would be held too).
        await queue.update_state(job_id, status=JobStatus.queued, stage="held", message=low)
        bound.warning("job held: low disk space", reason=low, retry_in_s=DISK_RETRY_S)
        if state.arq_worker is not None:
            state.arq_worker.hold_releases(DISK_RETRY_S)
        raise Retry(defer=await queue.park_again(spec))

    attempts = await redis.incr(attempts_key(job_id))
    await redis.expire(attempts_key(job_id), int(config.worker.keep_results))
    if attempts > config.worker.max_tries:
        error = (
            f"the job was started {attempts - 1} times and each time its worker died "
            "(crash, out-of-memory kill or power loss); it was stopped so it cannot take "
            "the queue down with it"
        )
        JobOutcome(JobStatus.failed, error=error).write(directory)
        await queue.finish(job_id, JobStatus.failed, error)
        return {"status": JobStatus.failed}

    state.current_job, state.current_stage = job_id, "starting"
    await redis.set(running_key(job_id), state.claim, ex=CLAIM_TTL_S)
    started = time.time()
    queue_wait = max(0.0, started - spec.created_at.timestamp())
    await queue.update_state(
        job_id, status=JobStatus.running, stage="starting", percent=0, message="",
        started_at=started, worker=state.name, attempt=attempts,
    )
    bound.info("job started", attempt=attempts, queue_wait_s=round(queue_wait, 3))

    cancellation = Cancellation()
    loop = asyncio.get_running_loop()
    job_timeout = config.worker.job_timeout

    def time_is_up() -> None:
        if not cancellation.event.is_set():
            bound.info("stopping job", reason=Cancellation.TIMEOUT)
        cancellation.set(Cancellation.TIMEOUT)

    timer = loop.call_later(job_timeout, time_is_up)
    work = asyncio.ensure_future(asyncio.to_thread(
        run_job_sync, spec, config,
        on_progress=_progress_publisher(state, job_id, loop),
        cancellation=cancellation, queue_wait_s=queue_wait, job_timeout_s=job_timeout,
        gpu_state=state.gpu, kinds=state.kinds,
    ))
    try:
        try:
            outcome = await asyncio.shield(work)
        except asyncio.CancelledError:
            cancellation.set(stop_cause(state, job_id))
            bound.info("stopping job", reason=cancellation.reason)
            try:
                outcome = await _wait_uncancellable(work)
            except Interrupted:
                # A clean stop is not a crash: give the attempt back, and run it next start.
                await redis.decr(attempts_key(job_id))
                await queue.update_state(job_id, status=JobStatus.queued, stage="queued",
                                         percent=0, message="interrupted by a worker stop; "
                                         "it resumes on the next start")
                # arq puts a job that ends in CancelledError back in the queue.
                raise asyncio.CancelledError() from None
            await queue.finish(job_id, outcome.status, outcome.error)
            raise
        await queue.finish(job_id, outcome.status, outcome.error)
        await redis.delete(attempts_key(job_id))
        bound.info("job finished", status=outcome.status, error=outcome.error)
        if state.gpu.health.should_stop and state.arq_worker is not None:
            # Failing every queued job on a broken card helps nobody: stop taking jobs,
            # stay up to say why (heartbeat, status, /healthz), keep the queue intact.
            state.arq_worker.take_jobs(False)
            bound.error("worker stopped taking jobs", reason=state.gpu.health.reason)
        return {"status": outcome.status}
    finally:
        timer.cancel()
        await redis.delete(running_key(job_id))
        state.current_job, state.current_stage = None, ""


def stop_cause(state: WorkerState, job_id: str) -> str:
    """Why arq cancelled the running job, by what happened, not by how long it ran: a
    user's abort, else a worker shutdown, else arq's own job timeout (the backstop past
    the worker's timer, which stops the job without cancelling anything)."""
    worker = state.arq_worker
    if worker is not None and worker.abort_requested(job_id):
        return Cancellation.USER
    if worker is not None and worker.stopping:
        return Cancellation.SHUTDOWN
    return Cancellation.TIMEOUT


async def _wait_uncancellable(work: asyncio.Future[JobOutcome]) -> JobOutcome:
    """Wait for the job thread to stop, even if we are cancelled again meanwhile."""
    while True:
        try:
            return await asyncio.shield(work)
        except asyncio.CancelledError:
            if work.done():
                return work.result()


async def write_morning_digest(ctx: dict[str, Any]) -> dict[str, str]:
    """arq cron job: the page of the last ``[digest] window`` of jobs, each morning at
    ``[digest] at``. It queues like any job: with a video running, it follows it."""
    from workers.pipelines import digest

    state: WorkerState = ctx["reelqueue"]
    written = await asyncio.to_thread(digest.write_for_window, state.config)
    log.info("digest written", html=written["html"], jobs=len(written["jobs"]))
    # The channels live in the daemon: hand each the summary through its durable outbox.
    for target in state.config.digest.post:
        await outbox.leave(state.queue.redis, target.channel, target.to, written["summary"])
    return {"html": written["html"], "summary": written["summary"]}


def low_disk_space(config: Config, spec: JobSpec) -> str:
    """Why a job must wait for disk space, or "" when there is enough."""
    folders = [config.state_dir] + ([Path(spec.source.folder)] if spec.source.folder else [])
    need = config.queue.min_free_gb * 1e9
    for folder in folders:
        existing = next((p for p in (folder, *folder.parents) if p.exists()), None)
        if existing is None:
            continue
        free = shutil.disk_usage(existing).free
        if free < need:
            return (f"held: {free / 1e9:.1f} GB free on {folder}, below [queue] min_free_gb = "
                    f"{config.queue.min_free_gb:g}; free some space and it starts by itself")
    return ""


class PolicyWorker(SeamWorker):
    """arq's worker, releasing the next parked job whenever it is about to look for one.

    ``before_poll`` runs in arq's poll step (workers.arq_seam), so a released job is
    started in the same breath, without a second polling loop.
    """

    def __init__(self, *args: Any, interactive_lead_s: float, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.interactive_lead_s = interactive_lead_s
        self._releases_held_until = 0.0

    def hold_releases(self, seconds: float) -> None:
        self._releases_held_until = time.monotonic() + seconds

    async def before_poll(self) -> None:
        if self.idle and time.monotonic() >= self._releases_held_until:
            job_id = await release_next(self.pool, self.interactive_lead_s)
            if job_id:
                log.debug("released the next job", job_id=job_id)


def create_worker(config: Config, redis_url: str, name: str | None = None) -> PolicyWorker:
    """Build the arq worker for ``config``; call ``.run()`` on it. This is the worker
    process's start: its GPU state (``GpuState.for_process``) and its job kinds are made
    here."""
    state = WorkerState(config=config, name=name or config.worker.name or default_worker_name(),
                        gpu=gpu.GpuState.for_process(), kinds=kind_registry(config))
    worker = PolicyWorker(
        functions=[func(run_job, name=RUN_FUNCTION, max_tries=10_000)],  # we count tries
        queue_name=QUEUE_NAME,
        redis_settings=redis_settings(redis_url),
        max_jobs=1,
        job_timeout=arq_job_timeout(config),
        keep_result=config.worker.keep_results,
        allow_abort_jobs=True,
        poll_delay=0.05,  # an idle worker starts a new job within ~50 ms
        on_startup=startup,
        on_shutdown=shutdown,
        # unique (arq's default): with a worker per GPU, one of them writes it.
        cron_jobs=[cron(write_morning_digest, hour=config.digest.hour_minute[0],
                        minute=config.digest.hour_minute[1])] if config.digest.enabled else [],
        ctx={"reelqueue": state},
        interactive_lead_s=config.queue.interactive_lead,
    )
    state.arq_worker = worker
    return worker
