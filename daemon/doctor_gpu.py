"""The doctor's look at the GPU: the driver through NVML, and whether torch uses it."""

from __future__ import annotations

from types import ModuleType

from daemon.findings import Finding, Level

GB = 1024**3


def check_gpu() -> list[Finding]:
    """NVML (the whole card, the driver), else torch.cuda; no GPU is fine (the CPU)."""
    try:
        import pynvml
    except ImportError:
        return _torch_gpu_findings()
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError_LibraryNotFound:  # no NVIDIA driver on this host
        return _torch_gpu_findings()
    except pynvml.NVMLError as exc:
        return [Finding(Level.ERROR, "gpu", f"the NVIDIA driver does not answer: {exc}",
                        "after a driver upgrade, reboot; otherwise see nvidia-smi and dmesg")]
    try:
        findings = _nvml_gpu_findings(pynvml)
    finally:
        pynvml.nvmlShutdown()
    if not findings:
        return _torch_gpu_findings()
    return findings + _torch_uses_gpu_findings()


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value  # older NVML gave bytes


def _nvml_gpu_findings(pynvml: ModuleType) -> list[Finding]:
    driver = _text(pynvml.nvmlSystemGetDriverVersion())
    findings = []
    for index in range(pynvml.nvmlDeviceGetCount()):
        handle = pynvml.nvmlDeviceGetHandleByIndex(index)
        name = _text(pynvml.nvmlDeviceGetName(handle))
        memory = pynvml.nvmlDeviceGetMemoryInfo(handle)
        findings.append(Finding(Level.OK, "gpu",
                                f"GPU {index}: {name}, {memory.total / GB:.0f} GB, "
                                f"{memory.free / GB:.1f} GB free (driver {driver})"))
        if memory.free < memory.total / 4:
            findings.append(Finding(Level.INFO, "gpu",
                                    f"GPU {index} has only {memory.free / GB:.1f} GB free: "
                                    "another program, or a worker's resident models, holds it",
                                    "nvidia-smi lists the processes using it"))
    return findings


def _torch_uses_gpu_findings() -> list[Finding]:
    """NVML sees GPUs: can torch use them? A CPU-only build runs every job on the CPU."""
    import torch

    if torch.cuda.is_available():
        return [Finding(Level.OK, "gpu", f"torch {torch.__version__} uses CUDA "
                                         f"{torch.version.cuda}")]
    why = ("it is a CPU-only build" if torch.version.cuda is None
           else f"it was built for CUDA {torch.version.cuda}, which this driver may not support")
    return [Finding(Level.WARN, "gpu",
                    f"this host has NVIDIA GPUs but torch {torch.__version__} cannot use them "
                    f"({why}): jobs would run on the CPU",
                    "install the CUDA build of the same torch version into the venv "
                    "(docs/operations.md, GPU hosts)")]


def _torch_gpu_findings() -> list[Finding]:
    import torch

    if not torch.cuda.is_available():
        return [Finding(Level.INFO, "gpu", "no GPU: jobs run on the CPU, more slowly")]
    findings = []
    for index in range(torch.cuda.device_count()):
        free, total = torch.cuda.mem_get_info(index)
        findings.append(Finding(Level.OK, "gpu",
                                f"GPU {index}: {torch.cuda.get_device_name(index)}, "
                                f"{total / GB:.0f} GB, {free / GB:.1f} GB free (via torch; "
                                "NVML unavailable, so VRAM is sampled more slowly)"))
    return findings
