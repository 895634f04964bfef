"""Prometheus metrics (prometheus-client), served by the HTTP intake at ``/metrics``.

Counters and the duration histogram are fed by the daemon's delivery loop, which
sees every job end exactly once; gauges are read from Redis at scrape time.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from daemon.queue import QueueClient

REGISTRY = CollectorRegistry()
JOBS_FINISHED = Counter("reelqueue_jobs_finished", "Jobs that ended, by kind and outcome",
                        ["kind", "outcome"], registry=REGISTRY)
JOB_DURATION = Histogram(
    "reelqueue_job_duration_seconds", "Run time of finished jobs (start to end)", ["kind"],
    buckets=(1, 5, 15, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200, float("inf")),
    registry=REGISTRY,
)
QUEUE_LENGTH = Gauge("reelqueue_queue_length", "Jobs waiting or running", registry=REGISTRY)
WORKERS_ALIVE = Gauge("reelqueue_workers_alive", "Workers with a fresh heartbeat",
                      registry=REGISTRY)
WORKER_BUSY = Gauge("reelqueue_worker_busy", "1 while the worker runs a job", ["worker"],
                    registry=REGISTRY)
VRAM_USED = Gauge("reelqueue_vram_used_bytes", "GPU memory in use", ["worker"],
                  registry=REGISTRY)
VRAM_TOTAL = Gauge("reelqueue_vram_total_bytes", "GPU memory in all", ["worker"],
                   registry=REGISTRY)


def record_finished(state: dict[str, Any]) -> None:
    kind = str(state.get("kind") or "unknown")
    JOBS_FINISHED.labels(kind=kind, outcome=str(state.get("status") or "unknown")).inc()
    started, finished = state.get("started_at"), state.get("finished_at")
    if started and finished:
        JOB_DURATION.labels(kind=kind).observe(max(0.0, float(finished) - float(started)))


async def render(queue: QueueClient) -> bytes:
    """Refresh the gauges from Redis and return the exposition text."""
    QUEUE_LENGTH.set(await queue.queue_length())
    workers = await queue.workers()
    WORKERS_ALIVE.set(len(workers))
    for gauge in (WORKER_BUSY, VRAM_USED, VRAM_TOTAL):
        gauge.clear()  # workers that went away must not linger
    for beat in workers:
        WORKER_BUSY.labels(worker=beat["name"]).set(1 if beat.get("job_id") else 0)
        if beat.get("vram_total"):
            VRAM_USED.labels(worker=beat["name"]).set(beat.get("vram_used", 0))
            VRAM_TOTAL.labels(worker=beat["name"]).set(beat["vram_total"])
    return generate_latest(REGISTRY)
