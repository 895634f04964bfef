"""The device a job runs on: which one (and its name), the dtype there, the ``[gpu]``
settings, and handing torch's cached GPU memory back to the driver.

Nothing here imports torch until it is needed: the weights-free job kinds run without it.
"""

from __future__ import annotations

import gc
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from daemon.config import Config

GB = 1024**3
# What the CUDA context itself takes (outside torch's allocator), kept out of a budget.
CUDA_CONTEXT_BYTES = int(0.5 * GB)


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
