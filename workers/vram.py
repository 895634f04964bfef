"""The VRAM monitor: ``VramMonitor`` samples used VRAM (NVML, else ``torch.cuda``) in a
background thread while a job runs; its ``report()`` is the ``vram`` section of the job
report. ``vram_now`` reads the card once, for heartbeats and /metrics.

Nothing here imports torch until it is needed: the weights-free job kinds run without it.
"""

from __future__ import annotations

import contextlib
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from workers.device import GB, GpuSettings

TIMELINE_POINTS = 600  # a report's VRAM timeline is thinned to this many points


class VramMonitor:
    """Samples the GPU's used memory every ``sample_interval_s`` in a thread.

    NVML (``nvidia-ml-py``) sees the whole card, other processes included; without it
    ``torch.cuda.mem_get_info`` does the same more slowly. On a host without CUDA the
    monitor does nothing and ``report()`` is ``{}``::

        with VramMonitor(settings, on_warning=job.warn) as vram:
            ...
        if report := vram.report():
            job_report["vram"] = report
    """

    def __init__(self, settings: GpuSettings = GpuSettings(),  # noqa: B008 (frozen)
                 on_warning: Callable[[str], None] | None = None, device_index: int = 0):
        self.settings = settings
        self.on_warning = on_warning
        self.device_index = device_index
        self.timeline: list[tuple[float, int]] = []
        self.total = 0
        self.max_allocated = 0
        self.warnings: list[str] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._read_used: Callable[[], int] | None = None

    def __enter__(self) -> VramMonitor:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def start(self) -> None:
        try:
            import torch
        except ImportError:  # the weights-free job kinds run without torch installed
            return
        if not torch.cuda.is_available():
            return
        self._read_used, self.total = _used_memory_reader(self.device_index)
        torch.cuda.reset_peak_memory_stats(self.device_index)
        self._started = time.monotonic()
        self._thread = threading.Thread(target=self._sample_until_stopped, name="vram-monitor",
                                        daemon=True)
        self._thread.start()

    def stop(self) -> None:
        if self._thread is None:
            return
        self._stop.set()
        self._thread.join()
        self._thread = None
        self._sample()  # the state at the end, even for a job shorter than one interval
        self.max_allocated = int(sys.modules["torch"].cuda.max_memory_allocated(self.device_index))

    def _sample_until_stopped(self) -> None:
        while True:
            self._sample()
            if self._stop.wait(self.settings.sample_interval_s):
                return

    def _sample(self) -> None:
        assert self._read_used is not None
        try:
            used = self._read_used()
        except Exception:  # a driver hiccup must not kill the job being watched
            return
        self.timeline.append((time.monotonic() - self._started, used))
        if used > self.total * self.settings.warn_percent / 100 and not self.warnings:
            message = (f"VRAM reached {used / GB:.1f} of {self.total / GB:.1f} GB "
                       f"({100 * used / self.total:.0f} %, above warn_percent "
                       f"{self.settings.warn_percent:g}); other programs on this GPU or a "
                       "large scene; [gpu] vram_budget_gb or a smaller size keeps it lower")
            self.warnings.append(message)
            if self.on_warning:
                self.on_warning(message)

    @property
    def peak(self) -> int:
        return max((used for _, used in self.timeline), default=0)

    def report(self) -> dict[str, Any]:
        """``{"total", "peak", "timeline": [[t_s, used], …], "max_allocated"}`` in bytes,
        or ``{}`` on a host without CUDA."""
        if not self.total:
            return {}
        return {
            "total": self.total,
            "peak": self.peak,
            "timeline": [[round(t, 2), used] for t, used in thin_timeline(self.timeline)],
            "max_allocated": self.max_allocated,
        }


_VRAM_READER: tuple[Callable[[], int], int] | None = None


def vram_now(device_index: int = 0) -> tuple[int, int] | None:
    """(used, total) bytes of this worker's card right now, for heartbeats and
    /metrics; None on a host without CUDA."""
    global _VRAM_READER
    torch = sys.modules.get("torch")
    if torch is None:
        import torch
    if not torch.cuda.is_available():
        return None
    if _VRAM_READER is None:
        _VRAM_READER = _used_memory_reader(device_index)
    used, total = _VRAM_READER
    return used(), total


def _used_memory_reader(device_index: int) -> tuple[Callable[[], int], int]:
    """A function returning the card's used bytes, and its total bytes."""
    import torch

    try:
        import pynvml

        pynvml.nvmlInit()
        handle = _nvml_handle(pynvml, device_index)
        total = int(pynvml.nvmlDeviceGetMemoryInfo(handle).total)
        return (lambda: int(pynvml.nvmlDeviceGetMemoryInfo(handle).used)), total
    except Exception:  # no NVML library (a container without it): ask the CUDA runtime
        free, total = torch.cuda.mem_get_info(device_index)

        def used() -> int:
            free, total = torch.cuda.mem_get_info(device_index)
            return int(total - free)

        return used, int(total)


def _nvml_handle(pynvml: Any, device_index: int) -> Any:
    # NVML numbers every GPU on the host and ignores CUDA_VISIBLE_DEVICES; the UUID names
    # the card torch calls ``cuda:device_index``.
    import torch

    uuid = getattr(torch.cuda.get_device_properties(device_index), "uuid", None)
    if uuid is not None:
        with contextlib.suppress(pynvml.NVMLError):
            return pynvml.nvmlDeviceGetHandleByUUID(f"GPU-{uuid}")
    return pynvml.nvmlDeviceGetHandleByIndex(device_index)


def thin_timeline(timeline: list[tuple[float, int]],
                  points: int = TIMELINE_POINTS) -> list[tuple[float, int]]:
    """At most ``points`` samples, keeping the highest of each run, so the peak shows."""
    if len(timeline) <= points:
        return list(timeline)
    size = -(-len(timeline) // points)
    return [max(timeline[i:i + size], key=lambda sample: sample[1])
            for i in range(0, len(timeline), size)]
