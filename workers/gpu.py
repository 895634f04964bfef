"""The GPU across jobs, for the process that owns it: ``GpuState`` (the models kept
resident and a health counter) that every job is handed, how a GPU failure is told
from a job's own, and which queued job to run next.

- ``GpuHealth`` counts GPU failures in a row; after a few the worker should stop taking
  jobs rather than fail every job in the queue.
- ``GpuState`` is the resident models (``workers.residency``) and the health counter
  for one process: the process that owns the GPU (the worker, or ``reelqueue run`` for
  its one job) makes it with ``GpuState.for_process`` and hands it to every job
  (``JobContext.gpu``). Importing this module changes nothing.

Nothing here imports torch: the weights-free job kinds run without it.
"""

from __future__ import annotations

import os
import re
import sys
import threading
from collections.abc import MutableMapping, Sequence
from dataclasses import dataclass, field

from daemon.jobs import JobError
from workers.residency import Residency


def is_out_of_memory(error: BaseException) -> bool:
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(error, torch.OutOfMemoryError)


_GPU_FAILURE = re.compile(r"CUDA error|CUBLAS_STATUS|CUDNN_STATUS|cuDNN error|NVML|"
                          r"device-side assert|illegal memory access|out of memory", re.I)


def is_gpu_error(error: BaseException) -> bool:
    """Whether ``error`` came from the GPU or its driver, not from the job's input."""
    return is_out_of_memory(error) or isinstance(error, GpuOutOfMemory) or (
        isinstance(error, RuntimeError) and bool(_GPU_FAILURE.search(str(error))))


class GpuOutOfMemory(JobError):
    """Out of GPU memory even on the lowest rung of the ladder: the message tells the
    sender what to ask for instead."""


def one_line(error: BaseException) -> str:
    """An error as one line: its type and the first line of its message."""
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}".strip(": ")


# --- health ------------------------------------------------------------------------------


class GpuHealth:
    """GPU failures in a row. After ``limit`` of them the worker should stop taking jobs
    (and say why) instead of failing the whole queue on a broken or full card::

        try:
            run the job
        except Exception as exc:
            health.record_failure(exc)
        else:
            health.record_success()
        if health.should_stop:
            log and stop the worker with health.reason
    """

    def __init__(self, limit: int = 3):
        self.limit = limit
        self.failures: list[str] = []
        self._lock = threading.Lock()

    def record_failure(self, error: BaseException) -> None:
        """Count ``error`` if it came from the GPU; other errors are the job's own."""
        if not is_gpu_error(error):
            return
        with self._lock:
            self.failures.append(one_line(error))

    def record_success(self) -> None:
        with self._lock:
            self.failures.clear()

    @property
    def should_stop(self) -> bool:
        return len(self.failures) >= self.limit

    @property
    def reason(self) -> str:
        if not self.should_stop:
            return ""
        return (f"{len(self.failures)} jobs in a row failed on the GPU (last: "
                f"{self.failures[-1]}); this worker stopped taking jobs. Check the card with "
                "nvidia-smi (another program holding memory, a driver fault), then restart "
                "the worker")


FAILURE_LIMIT_ENV = "REELQUEUE_GPU_FAILURE_LIMIT"
HF_OFFLINE_ENV = "HF_HUB_OFFLINE"


@dataclass
class GpuState:
    """What a process keeps of the GPU from one job to the next: the models kept resident
    and the health counter. The process that owns the GPU makes one (``for_process``) and
    hands it to each job it runs through ``JobContext.gpu``; a bare ``GpuState()`` is a
    fresh one (tests, a job run on its own)."""

    resident: Residency = field(default_factory=Residency)
    health: GpuHealth = field(default_factory=GpuHealth)

    @classmethod
    def for_process(cls, environ: MutableMapping[str, str] | None = None) -> GpuState:
        """The state of a process that is about to run jobs (the worker at its start,
        ``reelqueue run`` for its job): reads ``REELQUEUE_GPU_FAILURE_LIMIT`` and sets
        ``HF_HUB_OFFLINE=1`` (unless set) before any model library is imported, since
        weights are only ever read from local folders."""
        environ = os.environ if environ is None else environ
        environ.setdefault(HF_OFFLINE_ENV, "1")
        return cls(health=GpuHealth(limit=int(environ.get(FAILURE_LIMIT_ENV, "3"))))


# --- queue preference ------------------------------------------------------------------


@dataclass(frozen=True)
class QueuedJob:
    """What ``group_by_model`` needs to know of a queued job."""

    id: str
    model: str | None  # the model it will load (a name or directory); None: no model
    skipped: int = 0  # how many times a later job went first


def group_by_model(queue: Sequence[QueuedJob], resident_model: str | None,
                   max_skips: int = 2) -> QueuedJob | None:
    """The job to run next: the oldest one on the resident model, which spends no time
    loading, unless the oldest job in the queue was passed over ``max_skips`` times
    already: then that one, so nothing starves. ``queue`` is in queue order; the caller
    adds one to ``skipped`` of every job the chosen one overtook."""
    if not queue:
        return None
    oldest = queue[0]
    if oldest.skipped >= max_skips or resident_model is None:
        return oldest
    return next((job for job in queue if job.model == resident_model), oldest)
