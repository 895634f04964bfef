"""The memory ladder: before a model loads, its need is estimated from the weight files
(read from the safetensors headers, no tensor is loaded) and compared with the VRAM
this worker may use; the fastest rung that fits wins: all on the GPU, model CPU
offload, group offload (block level, on a side stream), sequential offload. Here are
the rungs, the estimate, the choice and how a diffusers pipeline is placed on a rung;
stepping down after an out-of-memory error is ``workers.residency``'s.

Nothing here imports torch until it is needed: the weights-free job kinds run without it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any

from workers.device import CUDA_CONTEXT_BYTES, GB, GpuSettings

if TYPE_CHECKING:
    import torch

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
