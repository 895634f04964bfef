"""The worker owns the GPU: the device and dtype a job runs on, a VRAM monitor, the
memory ladder, the models kept resident between jobs, and a health counter.

- ``VramMonitor`` samples used VRAM (NVML, else ``torch.cuda``) in a background thread
  while a job runs; its ``report()`` is the ``vram`` section of the job report.
- The memory ladder: before a model loads, its need is estimated from the weight files
  (read from the safetensors headers, no tensor is loaded) and compared with the VRAM
  this worker may use; the fastest rung that fits wins: all on the GPU, model CPU
  offload, group offload (block level, on a side stream), sequential offload. A CUDA
  out-of-memory error frees the model, steps one rung down and the caller retries.
- ``Residency`` keeps models loaded between jobs, one per role ("video", "storyboard",
  "caption", "upscale", …): every built-in kind that loads weights goes through it, so
  it sees all they hold on the GPU. A job on a resident model spends no time loading; a
  new model for a role evicts the old one first; a model in another role is moved off
  the GPU ("parked" in host memory) only when the one about to run needs the room.
- ``GpuHealth`` counts GPU failures in a row; after a few the worker should stop taking
  jobs rather than fail every job in the queue.
- ``GpuState`` is the two of them for one process: the process that owns the GPU (the
  worker, or ``reelqueue run`` for its one job) makes it with ``GpuState.for_process``
  and hands it to every job (``JobContext.gpu``). Importing this module changes nothing.

Nothing here imports torch until it is needed: the weights-free job kinds run without it.
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import re
import sys
import threading
import time
from collections.abc import Callable, MutableMapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any

from daemon.jobs import JobError

if TYPE_CHECKING:
    import torch

    from daemon.config import Config

GB = 1024**3
# What the CUDA context itself takes (outside torch's allocator), kept out of a budget.
CUDA_CONTEXT_BYTES = int(0.5 * GB)
TIMELINE_POINTS = 600  # a report's VRAM timeline is thinned to this many points


# --- device and dtype --------------------------------------------------------------------


def device_name() -> str:
    """The CUDA GPU's name when torch can see one, else ``"cpu"``."""
    try:
        import torch
    except ImportError:  # the weights-free job kinds run without torch installed
        return "cpu"
    try:
        if torch.cuda.is_available():
            return str(torch.cuda.get_device_name(0))
    except RuntimeError:  # a broken driver must not fail a job that already finished
        pass
    return "cpu"


def release_memory(resident: Residency) -> None:
    """Free what this process holds on the GPU, before another program needs the card:
    the resident models too.

    Does nothing (and imports nothing) when torch was never loaded here.
    """
    resident.evict()
    empty_cache()


def empty_cache() -> None:
    """Give torch's cached, unused GPU blocks back to the driver."""
    torch = sys.modules.get("torch")
    if torch is None:
        return
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def pick_device(requested: str | None = None) -> torch.device:
    """``requested`` ("cuda", "cuda:1", "cpu"), else the first CUDA GPU, else the CPU."""
    import torch

    if requested:
        device = torch.device(requested)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise RuntimeError(f"device {requested!r} was asked for, but torch sees no CUDA "
                               "GPU here; leave the device unset to run on the CPU")
        return device
    return torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")


def pick_dtype(device: torch.device) -> torch.dtype:
    """bf16 on GPUs that support it (Ampere and later), fp16 on older GPUs, fp32 on the
    CPU, where half precision is slow and poorly supported."""
    import torch

    if device.type != "cuda":
        return torch.float32
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


@dataclass(frozen=True)
class GpuSettings:
    """``[gpu]`` in the config."""

    reserve_gb: float = 1.0  # kept free for activations and other programs
    vram_budget_gb: float | None = None  # the most this worker may use (a shared card)
    warn_percent: float = 85.0  # the VRAM monitor warns above this much of the card
    sample_interval_s: float = 0.2

    @classmethod
    def from_config(cls, config: Config) -> GpuSettings:
        return cls(reserve_gb=config.gpu.reserve_gb,
                   vram_budget_gb=config.gpu.vram_budget_gb or None,
                   warn_percent=config.gpu.warn_percent)


# --- VRAM monitor ------------------------------------------------------------------------


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

    def __init__(self, settings: GpuSettings = GpuSettings(),
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


# --- what a model needs -----------------------------------------------------------------

_FLOAT_DTYPES = {"F64", "F32", "F16", "BF16"}
_DTYPE_BYTES = {"F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2,
                "BF16": 2, "I16": 2, "U16": 2, "I8": 1, "U8": 1, "BOOL": 1, "F8_E4M3": 1,
                "F8_E5M2": 1}
# A repeated block: "blocks.3.", "encoder.block.11.", "model.layers.27.", "up_blocks.1."
_BLOCK = re.compile(r"^(.*?(?:blocks|block|layers)\.\d+)\.")
_VARIANT = re.compile(r"\.(fp16|bf16|fp32)\.(safetensors|bin)$")


@dataclass(frozen=True)
class ComponentSize:
    """The bytes of one component's weights in the dtype it will run in."""

    name: str
    total: int
    largest_block: int  # the biggest repeated block (transformer layer)
    outside_blocks: int  # embeddings, norms, heads: what group offload keeps together
    largest_tensor: int  # what sequential offload moves at a time


@dataclass(frozen=True)
class MemoryNeed:
    model_path: Path
    components: tuple[ComponentSize, ...]

    @property
    def total(self) -> int:
        return sum(c.total for c in self.components)

    def at(self, rung: Rung) -> int:
        """Estimated VRAM for the weights at ``rung``; activations come on top (what
        ``reserve_gb`` is for)."""
        if not self.components:
            return 0
        if rung is Rung.ON_DEVICE:
            return self.total
        if rung is Rung.MODEL_OFFLOAD:  # one whole component on the GPU at a time
            return max(c.total for c in self.components)
        if rung is Rung.GROUP_OFFLOAD:  # see _group_offload
            return max(c.outside_blocks + 2 * c.largest_block if _is_denoiser(c.name)
                       else 2 * c.largest_tensor for c in self.components)
        return max(c.largest_tensor for c in self.components)


def memory_need(model_path: Path, dtype: torch.dtype) -> MemoryNeed:
    """Estimate what the model at ``model_path`` takes in ``dtype`` from its weight
    files alone.

    Safetensors headers give every tensor's dtype and shape, so floating-point tensors
    are counted at the size of ``dtype`` (a bf16 model loaded in fp32 needs twice its
    file size). ``.bin`` and ``.pth`` files cannot be read without loading them: they
    count as fp32. A diffusers pipeline counts the components its ``model_index.json``
    lists; any other directory counts its own top-level weights, and a single weight
    file (an ESRGAN ``.pth``) counts itself.
    """
    itemsize = dtype.itemsize
    if model_path.is_file():
        parts = [(model_path.stem, [model_path])]
    elif (index := model_path / "model_index.json").is_file():
        names = [name for name, value in json.loads(index.read_text()).items()
                 if isinstance(value, list) and (model_path / name).is_dir()]
        parts = [(name, _weight_files(model_path / name)) for name in names]
    else:
        parts = [(model_path.name, _weight_files(model_path))]
    sizes = [_component_size(name, paths, itemsize) for name, paths in parts]
    return MemoryNeed(model_path, tuple(size for size in sizes if size.total))


def _component_size(name: str, paths: list[Path], itemsize: int) -> ComponentSize:
    tensors: dict[str, int] = {}
    for path in paths:
        if path.suffix == ".safetensors":
            tensors.update(_safetensors_sizes(path, itemsize))
        else:  # a pickle: no header to read; assume fp32 storage
            tensors[path.name] = path.stat().st_size * itemsize // 4
    blocks: dict[str, int] = {}
    outside = 0
    for tensor_name, size in tensors.items():
        if match := _BLOCK.match(tensor_name):
            blocks[match.group(1)] = blocks.get(match.group(1), 0) + size
        else:
            outside += size
    return ComponentSize(name=name, total=sum(tensors.values()),
                         largest_block=max(blocks.values(), default=0), outside_blocks=outside,
                         largest_tensor=max(tensors.values(), default=0))


def _weight_files(folder: Path) -> list[Path]:
    """The files a loader would read: safetensors over pickles, no precision variants
    beside the main weights (as ``from_pretrained`` picks them)."""
    files = sorted(p for p in folder.iterdir() if p.is_file())
    for suffix in (".safetensors", ".bin", ".pt", ".pth"):
        found = [p for p in files if p.suffix == suffix]
        main = [p for p in found if not _VARIANT.search(p.name)]
        if main or found:
            return main or found
    return []


def _safetensors_sizes(path: Path, itemsize: int) -> dict[str, int]:
    with open(path, "rb") as handle:
        length = int.from_bytes(handle.read(8), "little")
        header = json.loads(handle.read(length))
    sizes = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        count = 1
        for dim in info["shape"]:
            count *= dim
        stored = info["dtype"]
        sizes[name] = count * (itemsize if stored in _FLOAT_DTYPES else _DTYPE_BYTES.get(stored, 4))
    return sizes


# --- the memory ladder -------------------------------------------------------------------


class Rung(StrEnum):
    """Where a model's weights live while it runs, fastest first."""

    ON_DEVICE = "on_device"  # every weight on the GPU
    MODEL_OFFLOAD = "model_offload"  # one component on the GPU at a time
    GROUP_OFFLOAD = "group_offload"  # one block at a time, the next one prefetched
    SEQUENTIAL_OFFLOAD = "sequential_offload"  # one layer at a time: slowest, least VRAM


LADDER = tuple(Rung)


def ladder_for(device: torch.device) -> tuple[Rung, ...]:
    """The rungs a model may take on ``device``.

    On the CPU the offload rungs move nothing (the weights live in RAM already) and no
    CUDA out-of-memory error ever comes, but they stay on the ladder so the CPU tests
    exercise the real step-down path. Sequential offload is left out there: accelerate
    cannot offload from the CPU to itself.
    """
    return LADDER if device.type == "cuda" else LADDER[:-1]


def available_bytes(settings: GpuSettings, device: torch.device) -> int | None:
    """VRAM this worker may still take on ``device``: the card's free memory, capped by
    ``vram_budget_gb`` (less what torch already holds), minus ``reserve_gb``. ``None``
    on the CPU, where RAM is the limit and nothing is measured."""
    import torch

    if device.type != "cuda":
        return None
    free, _ = torch.cuda.mem_get_info(device)
    if settings.vram_budget_gb:
        held = torch.cuda.memory_reserved(device)
        free = min(free, int(settings.vram_budget_gb * GB) - CUDA_CONTEXT_BYTES - held)
    return int(free - settings.reserve_gb * GB)


def enforce_budget(settings: GpuSettings, device: torch.device) -> None:
    """Make ``vram_budget_gb`` a hard limit: torch's allocator raises out-of-memory
    beyond it (which steps the ladder down) instead of growing into a shared card."""
    import torch

    if device.type != "cuda" or not settings.vram_budget_gb:
        return
    total = torch.cuda.get_device_properties(device).total_memory
    budget = settings.vram_budget_gb * GB - CUDA_CONTEXT_BYTES
    torch.cuda.set_per_process_memory_fraction(max(0.01, min(1.0, budget / total)), device)


def choose_rung(need: MemoryNeed, available: int | None, rungs: Sequence[Rung]) -> Rung:
    """The fastest of ``rungs`` whose need fits in ``available`` bytes (the first rung
    when nothing is measured, the last when nothing fits)."""
    if available is None:
        return rungs[0]
    return next((rung for rung in rungs if need.at(rung) <= available), rungs[-1])


def apply_rung(pipe: Any, rung: Rung, device: torch.device) -> None:
    """Place a diffusers pipeline's weights for ``rung``. Below ``ON_DEVICE`` the video
    VAE also decodes in tiles (and one video at a time), which bounds the decoder's
    memory, the largest single peak of a video job."""

    if rung is Rung.ON_DEVICE:
        pipe.to(device)
        return
    if rung is Rung.MODEL_OFFLOAD:
        pipe.enable_model_cpu_offload(device=device)
    elif rung is Rung.GROUP_OFFLOAD:
        _group_offload(pipe, device)
    else:
        pipe.enable_sequential_cpu_offload(device=device)
    vae = getattr(pipe, "vae", None)
    for method in ("enable_tiling", "enable_slicing"):
        if hasattr(vae, method):
            getattr(vae, method)()


def _group_offload(pipe: Any, device: torch.device) -> None:
    """Group offload, component by component. The denoiser runs at every step: whole
    blocks, the next one copied on a side stream while this one computes. The text
    encoder and the VAE run once per generation, and block-level offload cannot split
    them (a transformers encoder has no block list at its top level, so it would move
    whole): they go leaf by leaf."""
    import torch
    from diffusers.hooks import apply_group_offloading

    for name, component in pipe.components.items():
        if not isinstance(component, torch.nn.Module):
            continue
        by_block = _is_denoiser(name)
        apply_group_offloading(component, onload_device=device,
                               offload_device=torch.device("cpu"),
                               offload_type="block_level" if by_block else "leaf_level",
                               num_blocks_per_group=1 if by_block else None,
                               use_stream=device.type == "cuda")


def _is_denoiser(component: str) -> bool:
    return component.startswith(("transformer", "unet"))


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


# --- residency -------------------------------------------------------------------------


@dataclass
class ModelWith:
    """A model and what goes with it (a tokenizer, a processor, its scale), kept resident
    as one: ``Residency`` parks it with ``to``, which moves the model alone."""

    model: Any

    def to(self, device: Any) -> ModelWith:
        self.model.to(device)
        return self


@dataclass
class Resident:
    """A loaded model kept between jobs."""

    role: str
    model_path: Path
    dtype: torch.dtype
    device: torch.device
    rung: Rung
    rungs: tuple[Rung, ...]  # the ladder it may step down
    model: Any  # a diffusers pipeline, or anything with ``.to(device)``
    need: MemoryNeed
    load_s: float
    parked: bool = False  # moved to host memory to make room for another role's model
    extras: dict[str, Any] = field(default_factory=dict)  # built from the model, reused

    @property
    def vram_bytes(self) -> int:
        """What it holds on the GPU between calls: only ``ON_DEVICE`` keeps weights there."""
        on_gpu = self.device.type == "cuda" and self.rung is Rung.ON_DEVICE and not self.parked
        return self.need.total if on_gpu else 0


@dataclass(frozen=True)
class StepDown:
    """One step down the ladder, for the report."""

    model: str
    from_rung: Rung
    to_rung: Rung
    error: str


@dataclass
class Acquired:
    resident: Resident
    load_s: float  # 0 when it was resident already (plus the move back, if it was parked)
    reused: bool


class Residency:
    """Models kept loaded between jobs, one per role. Thread-safe."""

    def __init__(self) -> None:
        self._slots: dict[str, Resident] = {}
        # The lowest rung a model needed after an out-of-memory error: later jobs start
        # there instead of running into the same error.
        self._floors: dict[tuple[Path, str], Rung] = {}
        self._lock = threading.RLock()

    def get(self, role: str) -> Resident | None:
        return self._slots.get(role)

    def acquire(self, role: str, model_path: Path, *, dtype: torch.dtype,
                device: torch.device, settings: GpuSettings,
                load: Callable[[Rung], Any], rung: Rung | None = None,
                rungs: Sequence[Rung] | None = None) -> Acquired:
        """The model at ``model_path`` for ``role``, loaded with ``load(rung)`` unless it
        is resident already. ``rung`` forces a rung (benchmarks); otherwise the fastest
        of ``rungs`` (default: the device's ladder) that fits after parking the other
        roles' models if need be."""
        model_path = model_path.resolve()
        rungs = tuple(rungs or ladder_for(device))
        with self._lock:
            current = self._slots.get(role)
            if current is not None and \
                    not self._matches(current, model_path, dtype, device, rung):
                self.evict(role)
                current = None
            if current is not None:
                started = time.monotonic()
                if current.parked:
                    self._make_room(current.need.total, role, settings, device)
                    current.model.to(device)
                    current.parked = False
                return Acquired(current, time.monotonic() - started, reused=True)
            need = memory_need(model_path, dtype)
            chosen = rung or self._choose(need, model_path, dtype, role, settings, device,
                                          rungs)
            enforce_budget(settings, device)
            started = time.monotonic()
            model = load(chosen)
            resident = Resident(role=role, model_path=model_path, dtype=dtype, device=device,
                                rung=chosen, rungs=rungs, model=model, need=need,
                                load_s=time.monotonic() - started)
            self._slots[role] = resident
            return Acquired(resident, resident.load_s, reused=False)

    def step_down(self, role: str, error: str) -> StepDown | None:
        """After an out-of-memory error: free the role's model and remember the next rung
        down as its floor. ``None`` when it was on the lowest rung already.

        Call it outside the ``except`` block that caught the error: the traceback holds
        the failed call's frames, and with them tensors that would stay in VRAM."""
        with self._lock:
            current = self._slots[role]
            self.evict(role)
            lower = next((rung for rung in current.rungs
                          if LADDER.index(rung) > LADDER.index(current.rung)), None)
            if lower is None:
                return None
            self._floors[(current.model_path, str(current.dtype))] = lower
            return StepDown(model=current.model_path.name, from_rung=current.rung,
                            to_rung=lower, error=error)

    def evict(self, role: str | None = None) -> None:
        """Unload the role's model (every model when ``role`` is None) and free its VRAM."""
        with self._lock:
            for name in [role] if role else list(self._slots):
                resident = self._slots.pop(name, None)
                if resident is not None:
                    _unhook(resident.model)
                    resident.model = None
                    resident.extras.clear()
            empty_cache()

    def _matches(self, resident: Resident, model_path: Path, dtype: torch.dtype,
                 device: torch.device, rung: Rung | None) -> bool:
        return (resident.model_path, resident.dtype, resident.device) == \
            (model_path, dtype, device) and rung in (None, resident.rung)

    def _choose(self, need: MemoryNeed, model_path: Path, dtype: torch.dtype, role: str,
                settings: GpuSettings, device: torch.device, rungs: Sequence[Rung]) -> Rung:
        floor = self._floors.get((model_path, str(dtype)))
        if floor in rungs:
            rungs = rungs[rungs.index(floor):]
        available = available_bytes(settings, device)
        if available is None or need.at(rungs[0]) <= available:
            return rungs[0]
        # Parking the other roles' models beats running this one on a slower rung.
        self._make_room(need.at(rungs[0]), role, settings, device)
        return choose_rung(need, available_bytes(settings, device), rungs)

    def _make_room(self, need: int, role: str, settings: GpuSettings,
                   device: torch.device) -> None:
        for other in self._slots.values():
            available = available_bytes(settings, device)
            if available is None or available >= need:
                return
            if other.role != role and other.vram_bytes:
                other.model.to("cpu")
                other.parked = True
                empty_cache()


def _unhook(model: Any) -> None:
    # Offload hooks hold references to the weights; without removing them the memory
    # would outlive the model.
    remove = getattr(model, "remove_all_hooks", None)
    if callable(remove):
        with contextlib.suppress(Exception):
            remove()


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
