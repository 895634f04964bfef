"""The GPU owner: VRAM monitor, memory estimates and ladder, residency, health, and the
queue preference. CPU-only except the tests marked ``gpu``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests import tiny_models
from tests.conftest import REPO
from workers import gpu, residency
from workers.device import GB, GpuSettings, empty_cache, pick_device, pick_dtype
from workers.gpu import QueuedJob
from workers.ladder import (
    LADDER,
    ComponentSize,
    MemoryNeed,
    Rung,
    choose_rung,
    ladder_for,
    memory_need,
)
from workers.residency import Residency
from workers.vram import VramMonitor, thin_timeline

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture
def resident() -> Residency:
    return Residency()


# --- device, dtype, monitor -----------------------------------------------------------------


def test_on_a_cpu_host_the_device_is_the_cpu_in_fp32():
    if torch.cuda.is_available():
        pytest.skip("this host has a GPU")
    assert pick_device() == torch.device("cpu")
    assert pick_dtype(torch.device("cpu")) == torch.float32
    with pytest.raises(RuntimeError, match="sees no CUDA GPU"):
        pick_device("cuda")


def test_the_vram_monitor_is_a_quiet_no_op_without_cuda():
    if torch.cuda.is_available():
        pytest.skip("this host has a GPU")
    warnings = []
    with VramMonitor(GpuSettings(sample_interval_s=0.01), warnings.append) as vram:
        time.sleep(0.05)
    assert vram.report() == {} and vram.timeline == [] and warnings == []


def test_a_long_timeline_is_thinned_but_keeps_its_peak():
    timeline = [(i * 0.2, 100 + (i % 7)) for i in range(5000)] + [(1000.0, 999)]
    thinned = thin_timeline(timeline, points=100)
    assert len(thinned) <= 100 and max(used for _, used in thinned) == 999


@pytest.mark.gpu
@needs_cuda
def test_the_vram_monitor_sees_an_allocation_and_warns_above_the_threshold():
    warnings = []
    settings = GpuSettings(sample_interval_s=0.02, warn_percent=0.0001)
    with VramMonitor(settings, warnings.append) as vram:
        block = torch.empty(256 * 1024**2, dtype=torch.uint8, device="cuda")
        time.sleep(0.1)
        del block
    report = vram.report()
    assert report["total"] > report["peak"] > 0 and report["max_allocated"] >= 256 * 1024**2
    assert len(report["timeline"]) >= 3 and len(warnings) == 1
    empty_cache()


# --- memory need -------------------------------------------------------------------------------


def test_memory_need_comes_from_the_headers_in_the_runtime_dtype(tmp_path_factory):
    model_dir = tiny_models.session_model("tiny-wan", tmp_path_factory)
    need32 = memory_need(model_dir, torch.float32)
    need16 = memory_need(model_dir, torch.bfloat16)

    names = {c.name for c in need32.components}
    assert names == {"transformer", "text_encoder", "vae"}  # no weights: tokenizer, scheduler
    weights = load_file(model_dir / "transformer" / "diffusion_pytorch_model.safetensors")
    transformer = next(c for c in need32.components if c.name == "transformer")
    assert transformer.total == sum(t.numel() * 4 for t in weights.values())
    assert need16.total == need32.total // 2  # every tensor of these is floating point
    blocks = sum(t.numel() * 4 for k, t in weights.items() if k.startswith("blocks.0."))
    assert transformer.largest_block == blocks
    # Each rung down needs less.
    needs = [need32.at(rung) for rung in LADDER]
    assert needs == sorted(needs, reverse=True) and needs[-1] > 0


def test_a_transformers_folder_counts_its_own_weights_and_skips_variants(tmp_path):
    header = json.dumps({"w": {"dtype": "F16", "shape": [10, 10], "data_offsets": [0, 200]},
                         "ids": {"dtype": "I64", "shape": [4], "data_offsets": [200, 232]}})
    blob = len(header).to_bytes(8, "little") + header.encode() + bytes(232)
    (tmp_path / "model.safetensors").write_bytes(blob)
    (tmp_path / "model.fp16.safetensors").write_bytes(blob)  # a variant: not loaded
    need = memory_need(tmp_path, torch.float32)
    assert [c.total for c in need.components] == [100 * 4 + 4 * 8]


def test_a_single_weight_file_counts_itself(tmp_path):
    header = json.dumps({"w": {"dtype": "F16", "shape": [10, 10], "data_offsets": [0, 200]}})
    weights = tmp_path / "x4.safetensors"
    weights.write_bytes(len(header).to_bytes(8, "little") + header.encode() + bytes(200))
    need = memory_need(weights, torch.float32)
    assert [(c.name, c.total) for c in need.components] == [("x4", 100 * 4)]
    pickle = tmp_path / "RealESRGAN_x4plus.pth"  # no header: counted as fp32 storage
    pickle.write_bytes(bytes(1000))
    assert memory_need(pickle, torch.float16).total == 500


def need_of(total_gb: float, largest_gb: float, block_gb: float) -> MemoryNeed:
    components = (ComponentSize("transformer", int(largest_gb * GB), int(block_gb * GB),
                                int(0.1 * GB), int(0.05 * GB)),
                  ComponentSize("text_encoder", int((total_gb - largest_gb) * GB),
                                int(block_gb * GB), int(0.1 * GB), int(0.05 * GB)))
    return MemoryNeed(Path("m"), components)


@pytest.mark.parametrize(("available_gb", "rung"), [
    (None, Rung.ON_DEVICE), (20, Rung.ON_DEVICE), (9, Rung.MODEL_OFFLOAD),
    (2, Rung.GROUP_OFFLOAD), (0.1, Rung.SEQUENTIAL_OFFLOAD), (0.01, Rung.SEQUENTIAL_OFFLOAD)])
def test_the_fastest_rung_that_fits_is_chosen(available_gb, rung):
    need = need_of(total_gb=14, largest_gb=8, block_gb=0.5)
    available = None if available_gb is None else int(available_gb * GB)
    assert choose_rung(need, available, LADDER) is rung


def test_the_cpu_ladder_leaves_out_sequential_offload():
    assert ladder_for(torch.device("cpu"))[-1] is Rung.GROUP_OFFLOAD
    assert ladder_for(torch.device("cuda"))[-1] is Rung.SEQUENTIAL_OFFLOAD


# --- residency ----------------------------------------------------------------------------------


class FakeModel:
    def __init__(self, name: str):
        self.name, self.device = name, "cpu"

    def to(self, device):
        self.device = str(device)
        return self


def acquire(resident: Residency, model_dir: Path, role: str = "video",
            device: str = "cpu", loads: list | None = None):
    model_dir.mkdir(exist_ok=True)

    def load(rung: Rung) -> FakeModel:
        time.sleep(0.02)
        if loads is not None:
            loads.append((model_dir.name, rung))
        return FakeModel(model_dir.name).to(device)

    return resident.acquire(role, model_dir, dtype=torch.float32, device=torch.device(device),
                            settings=GpuSettings(), load=load)


def test_a_resident_model_costs_no_load_and_a_new_one_evicts_it(tmp_path, resident):
    loads: list = []
    first = acquire(resident, tmp_path / "wan", loads=loads)
    again = acquire(resident, tmp_path / "wan", loads=loads)
    assert not first.reused and first.load_s >= 0.02
    assert again.reused and again.load_s < 0.01 and again.resident.model is first.resident.model

    other = acquire(resident, tmp_path / "ltx", loads=loads)
    assert first.resident.model is None  # evicted before the new model loaded
    assert other.resident.model.name == "ltx" and loads == [("wan", Rung.ON_DEVICE),
                                                             ("ltx", Rung.ON_DEVICE)]


def test_step_down_remembers_the_rung_and_ends_at_the_bottom(tmp_path, resident):
    loads: list = []
    acquire(resident, tmp_path / "wan", loads=loads)
    step = resident.step_down("video", "OutOfMemoryError: CUDA out of memory")
    assert (step.from_rung, step.to_rung) == (Rung.ON_DEVICE, Rung.MODEL_OFFLOAD)
    assert resident.get("video") is None
    acquire(resident, tmp_path / "wan", loads=loads)
    assert loads[-1] == ("wan", Rung.MODEL_OFFLOAD)
    resident.step_down("video", "again")
    acquire(resident, tmp_path / "wan", loads=loads)
    assert resident.step_down("video", "and again") is None  # group offload is the CPU's last


def test_another_role_is_parked_only_when_the_room_is_needed(tmp_path, resident, monkeypatch):
    # A pretend 10 GB card: what the resident models hold is taken from it.
    def available(settings, device):
        held = sum(r.vram_bytes for r in resident._slots.values())
        return 10 * GB - held

    monkeypatch.setattr(residency, "available_bytes", available)
    sizes = {"llm": 3 * GB, "wan": 6 * GB, "big": 9 * GB}
    monkeypatch.setattr(residency, "memory_need", lambda model_dir, dtype: need_of(
        sizes[model_dir.name] / GB, sizes[model_dir.name] / GB / 2, 0.1))

    llm = acquire(resident, tmp_path / "llm", role="storyboard", device="cuda")
    acquire(resident, tmp_path / "wan", role="video", device="cuda")
    assert not llm.resident.parked  # 3 + 6 GB fit together

    # Evicts wan; 3 + 9 GB do not fit.
    acquire(resident, tmp_path / "big", role="video", device="cuda")
    assert llm.resident.parked and llm.resident.model.device == "cpu"
    back = acquire(resident, tmp_path / "llm", role="storyboard", device="cuda")
    assert back.reused and not back.resident.parked and back.resident.model.device == "cuda"


# --- health and queue ----------------------------------------------------------------------------


def test_gpu_health_stops_after_failures_in_a_row_and_ignores_job_errors():
    health = gpu.GpuHealth(limit=2)
    health.record_failure(ValueError("bad prompt"))
    health.record_failure(RuntimeError("CUDA error: an illegal memory access was encountered"))
    assert not health.should_stop and health.reason == ""
    health.record_success()
    health.record_failure(torch.OutOfMemoryError("CUDA out of memory"))
    health.record_failure(gpu.GpuOutOfMemory("scene 2 does not fit"))
    assert health.should_stop
    assert "2 jobs in a row failed on the GPU" in health.reason and "nvidia-smi" in health.reason


def test_group_by_model_prefers_the_resident_model_without_starving_the_oldest():
    queue = [QueuedJob("a", "ltx"), QueuedJob("b", "wan"), QueuedJob("c", None)]
    assert gpu.group_by_model(queue, "wan").id == "b"
    assert gpu.group_by_model(queue, "cog").id == "a"
    assert gpu.group_by_model(queue, None).id == "a"
    starved = [QueuedJob("a", "ltx", skipped=2), QueuedJob("b", "wan")]
    assert gpu.group_by_model(starved, "wan").id == "a"
    assert gpu.group_by_model([], "wan") is None


# --- whose state ---------------------------------------------------------------------------------


def test_importing_the_worker_side_changes_no_global_state():
    # A fresh interpreter without HF_HUB_OFFLINE: importing every worker module (each
    # kind's too) must leave the environment as it was and make no GPU state.
    code = (
        "import importlib, os, pkgutil, cv2, workers\n"  # cv2 sets LD_LIBRARY_PATH itself
        "before = dict(os.environ)\n"
        "for m in pkgutil.walk_packages(workers.__path__, 'workers.'):\n"
        "    importlib.import_module(m.name)\n"
        "from workers import gpu\n"
        "assert dict(os.environ) == before, set(os.environ.items()) ^ set(before.items())\n"
        "assert not hasattr(gpu, 'RESIDENT') and not hasattr(gpu, 'HEALTH')\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


def test_the_owning_process_makes_its_gpu_state_once():
    environ = {"REELQUEUE_GPU_FAILURE_LIMIT": "5"}
    state = gpu.GpuState.for_process(environ)
    assert environ["HF_HUB_OFFLINE"] == "1" and state.health.limit == 5
    assert gpu.GpuState.for_process({"HF_HUB_OFFLINE": "0"}).health.limit == 3
    assert gpu.GpuState().resident is not gpu.GpuState().resident  # nothing shared


def test_each_job_gets_the_workers_state_and_a_one_off_run_its_own(tmp_path, monkeypatch):
    from daemon.compose import config_class
    from daemon.config import StateConfig
    Config = config_class()
    from daemon.jobs import JobSpec, Source, new_job_id, write_spec
    from daemon.kinds import KindRegistry
    from workers.runner import run_job_sync

    config = Config(state=StateConfig(dir=tmp_path / "var"))
    seen: list[gpu.GpuState] = []

    def run(job):
        seen.append(job.gpu)
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    kind = type("Kind", (), {"run": staticmethod(run)})
    kinds = KindRegistry({"video": lambda: kind})  # any kind will do
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)  # a one-off run sets it
    state = gpu.GpuState(health=gpu.GpuHealth(limit=2))
    for _ in range(2):
        spec = JobSpec(id=new_job_id(), kind="video", prompt="a fox",
                       source=Source(channel="cli"))
        write_spec(config.jobs_dir, spec)
        assert run_job_sync(spec, config, gpu_state=state, kinds=kinds).status == "failed"
    run_job_sync(spec, config, kinds=kinds)  # ``reelqueue run``: the process's only job
    assert os.environ["HF_HUB_OFFLINE"] == "1"
    assert seen[0] is state and seen[1] is state and seen[2] is not state
    assert state.health.should_stop and not seen[2].health.failures[1:]
