"""Models kept loaded between jobs: ``Residency`` holds one per role ("video",
"storyboard", "caption", "upscale", …); every built-in kind that loads weights goes
through it, so it sees all they hold on the GPU. A job on a resident model spends no
time loading; a new model for a role evicts the old one first; a model in another role
is moved off the GPU ("parked" in host memory) only when the one about to run needs the
room. A CUDA out-of-memory error frees the model, steps one rung down the ladder
(``workers.ladder``) and the caller retries; the rung that worked is remembered.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from workers.device import GpuSettings, empty_cache
from workers.ladder import (
    LADDER,
    MemoryNeed,
    Rung,
    available_bytes,
    choose_rung,
    enforce_budget,
    ladder_for,
    memory_need,
)

if TYPE_CHECKING:
    import torch


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


def release_memory(resident: Residency) -> None:
    """Free what this process holds on the GPU, before another program needs the card:
    the resident models too.

    Does nothing (and imports nothing) when torch was never loaded here.
    """
    resident.evict()
    empty_cache()
