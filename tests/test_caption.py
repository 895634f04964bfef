"""The caption kind with a tiny GIT model built offline, through the real loading code."""

from __future__ import annotations

import json

import imageio_ffmpeg
import numpy as np
import pytest
import torch

from daemon.compose import config_class
from daemon.config import StateConfig
from daemon.jobs import JobSpec, Source, job_dir
from tests.tiny_git import WORDS, build_tiny_git
from workers import gpu, residency
from workers.device import GpuSettings
from workers.ladder import ComponentSize, MemoryNeed, Rung
from workers.pipelines import caption, kind_registry
from workers.pipelines.caption_settings import CaptionConfig
from workers.residency import release_memory
from workers.runner import run_job_sync

Config = config_class()  # the core's tables and the kinds'

KINDS = kind_registry()


@pytest.fixture(scope="module")
def tiny_git(tmp_path_factory):
    return build_tiny_git(tmp_path_factory.mktemp("models") / "git-tiny")


@pytest.fixture
def gpu_state() -> gpu.GpuState:
    """What a worker process keeps between the jobs it runs."""
    return gpu.GpuState()


def two_shot_video(path, fps=8, seconds_per_shot=2):
    """A red textured shot, then a blue one: one cut in the middle."""
    rng = np.random.default_rng(0)
    writer = imageio_ffmpeg.write_frames(str(path), (96, 64), fps=fps, macro_block_size=1)
    writer.send(None)
    for colour in ((200, 40, 40), (40, 60, 210)):
        for _ in range(fps * seconds_per_shot):
            noise = rng.integers(0, 40, (64, 96, 3))
            writer.send(np.clip(np.array(colour) + noise, 0, 255).astype(np.uint8))
    writer.close()


def run_caption(tmp_path, model, video_name="clip.mp4", video=two_shot_video, gpu_state=None,
                **options):
    config = Config(state=StateConfig(dir=tmp_path / "var"), caption=CaptionConfig(model=model))
    spec = JobSpec(id="cap" + str(abs(hash(str(tmp_path))))[:10], kind="caption",
                   inputs=[video_name],
                   options=KINDS.validate("caption", "", options, [video_name]),
                   source=Source(channel="cli"))
    inputs = job_dir(config.jobs_dir, spec.id) / "inputs"
    inputs.mkdir(parents=True)
    video(inputs / video_name)
    return run_job_sync(spec, config, gpu_state=gpu_state), job_dir(config.jobs_dir, spec.id)


def test_a_two_shot_video_gets_a_caption_and_one_per_shot(tmp_path, tiny_git):
    outcome, directory = run_caption(tmp_path, tiny_git)
    assert outcome.status == "done", outcome.error
    assert outcome.primary == caption.OUTPUT_FILE
    lines = (directory / caption.OUTPUT_FILE).read_text().splitlines()
    assert len(lines) == 3 and lines[1].startswith("shot 1 (0.0–") and lines[2].startswith("shot 2")
    assert any(word in lines[0].split() for word in WORDS)  # words from the model's vocabulary
    report = json.loads((directory / "report.json").read_text())
    assert report["frames_per_caption"] == 6 and len(report["sampled_s"]) == 6
    assert [s["shot"] for s in report["shots"]] == [1, 2]
    assert 1.5 <= report["shots"][1]["start_s"] <= 2.5  # the cut is at 2 s
    assert report["caption"] in (directory / "report.html").read_text()


def test_per_shot_captions_can_be_switched_off(tmp_path, tiny_git):
    outcome, directory = run_caption(tmp_path, tiny_git, per_shot=False)
    assert outcome.status == "done", outcome.error
    assert len((directory / caption.OUTPUT_FILE).read_text().splitlines()) == 1


def test_the_model_stays_resident_between_jobs(tmp_path, tiny_git, monkeypatch, gpu_state):
    loads = []
    real_load = caption._load

    def counted_load(model_dir, *args):
        loads.append(model_dir)
        return real_load(model_dir, *args)

    monkeypatch.setattr(caption, "_load", counted_load)
    for name in ("a", "b"):
        outcome, _ = run_caption(tmp_path / name, tiny_git, per_shot=False, gpu_state=gpu_state)
        assert outcome.status == "done", outcome.error
    assert loads == [tiny_git]  # one from_pretrained for both jobs
    resident = gpu_state.resident.get(caption.ROLE)
    assert resident.model_path == tiny_git.resolve() and resident.rung is Rung.ON_DEVICE
    assert isinstance(resident.model, caption.Captioner) and resident.need.total > 0


def test_another_caption_model_replaces_the_first_and_release_frees_it(tmp_path, tiny_git,
                                                                       gpu_state):
    other = build_tiny_git(tmp_path / "git-tiny-other")
    run_caption(tmp_path / "a", tiny_git, per_shot=False, gpu_state=gpu_state)
    first = gpu_state.resident.get(caption.ROLE)
    outcome, _ = run_caption(tmp_path / "b", other, per_shot=False, gpu_state=gpu_state)
    assert outcome.status == "done", outcome.error
    assert first.model is None  # evicted before the other model loaded
    assert gpu_state.resident.get(caption.ROLE).model_path == other.resolve()
    release_memory(gpu_state.resident)  # what a command kind with its own models asks for
    assert gpu_state.resident.get(caption.ROLE) is None


def test_the_video_model_parks_a_resident_captioner_when_it_needs_the_room(
        tmp_path, tiny_git, monkeypatch, gpu_state):
    run_caption(tmp_path, tiny_git, per_shot=False, gpu_state=gpu_state)
    captioner = gpu_state.resident.get(caption.ROLE)
    # Pretend the captioner sits on a card with room for one model of its size.
    captioner.device = torch.device("cuda")
    card = captioner.need.total
    monkeypatch.setattr(residency, "available_bytes", lambda settings, device: card - sum(
        r.vram_bytes for r in gpu_state.resident._slots.values()))
    monkeypatch.setattr(residency, "memory_need", lambda path, dtype: MemoryNeed(
        path, (ComponentSize("transformer", card, 0, 0, 0),)))

    video = gpu_state.resident.acquire("video", tmp_path / "wan", dtype=torch.float32,
                                       device=torch.device("cpu"), settings=GpuSettings(),
                                       load=lambda rung: object())
    assert captioner.parked and video.resident.rung is Rung.ON_DEVICE


def test_shot_detection_and_even_sampling():
    red = [np.full((8, 8, 3), (200, 0, 0), np.uint8)] * 8
    blue = [np.full((8, 8, 3), (0, 0, 200), np.uint8)] * 8
    times = [i / 4 for i in range(16)]
    assert caption.find_shots(red + blue, times) == [(0, 8), (8, 16)]
    assert caption.find_shots(red[:2] + blue, times[:10]) == [(0, 10)]  # a cut 0.5 s in: too soon
    assert caption.sample_evenly(0, 3, 6) == [0, 0, 1, 1, 2, 2]
    assert caption.sample_evenly(10, 20, 2) == [10, 19]


def test_missing_model_tells_how_to_install_it(tmp_path):
    outcome, _ = run_caption(tmp_path, None)
    assert outcome.status == "failed" and "scripts/fetch_models.py git-base-vatex" in outcome.error
    outcome, _ = run_caption(tmp_path / "b", tmp_path / "models" / "git-base-vatex")
    assert outcome.status == "failed" and "not a model folder" in outcome.error


def test_a_broken_video_is_explained(tmp_path, tiny_git):
    def garbage(path):
        path.write_bytes(b"\x00\x00\x00\x18ftypmp42 but then nothing useful")

    outcome, _ = run_caption(tmp_path, tiny_git, video=garbage)
    assert outcome.status == "failed" and "not a video this server can decode" in outcome.error
