"""GPU helpers. For now: which device a job ran on, for its report."""

from __future__ import annotations


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
