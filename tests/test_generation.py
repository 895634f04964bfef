"""Real generation through the path the worker takes (``run_job_sync``): tiny Wan, LTX
and CogVideoX pipelines and a tiny chat model, built offline and loaded through the
real from_pretrained code, configured like a user would ([video] backend = "diffusers",
[storyboard] backend = "llm")."""

from __future__ import annotations

import json

import imageio_ffmpeg
import pytest

from daemon.compose import config_class
from daemon.config import ModelsConfig, StateConfig
from daemon.jobs import JobSpec, Source, job_dir, new_job_id
from tests import tiny_models
from workers import gpu
from workers.pipelines.video_settings import StoryboardConfig, VideoConfig
from workers.runner import Cancellation, run_job_sync

Config = config_class()  # the core's tables and the kinds'

PROMPT = "A red fox runs through the snow. The sun sets behind the hills."


# What a worker process keeps between jobs, kept here between tests.
GPU_STATE = gpu.GpuState()


@pytest.fixture(scope="module", autouse=True)
def _one_thread_and_unload_after():
    yield from tiny_models.one_thread()
    GPU_STATE.resident.evict()


def config_for(tmp_path, tmp_path_factory, video_model: str, llm: str = "") -> Config:
    models_dir = tiny_models.session_model(video_model, tmp_path_factory).parent
    storyboard = StoryboardConfig()
    if llm:
        tiny_models.session_model(llm, tmp_path_factory)
        storyboard = StoryboardConfig(backend="llm", model=llm)
    return Config(
        state=StateConfig(dir=tmp_path / "var"),
        video=VideoConfig(backend="diffusers", model=video_model, width=64, height=64, fps=8,
                          scene_seconds=3, steps=2),
        storyboard=storyboard,
        models=ModelsConfig(dir=models_dir),
    )


def video_job(config: Config, job_id: str | None = None, **options) -> JobSpec:
    return JobSpec(id=job_id or new_job_id(), kind="video", prompt=PROMPT,
                   options={"duration": 6, **options}, source=Source(channel="cli"))


@pytest.mark.parametrize("model", ["tiny-wan", "tiny-ltx", "tiny-cogvideox"])
def test_each_family_renders_a_film_through_the_worker_path(tmp_path, tmp_path_factory, model):
    config = config_for(tmp_path, tmp_path_factory, model)
    spec = video_job(config)
    events: list[tuple[str, float, str]] = []
    outcome = run_job_sync(spec, config, on_progress=lambda *e: events.append(e),
                           gpu_state=GPU_STATE)
    assert outcome.status == "done", outcome.error
    directory = job_dir(config.jobs_dir, spec.id)
    frames, seconds = imageio_ffmpeg.count_frames_and_secs(str(directory / "video.mp4"))
    assert frames == 48 and abs(seconds - 6) < 0.2
    report = json.loads((directory / "report.json").read_text())
    generation = report["generation"]
    assert generation["backend"] == "diffusers" and generation["model"] == model
    assert [s["scene"] for s in generation["scenes"]] == [1, 2]
    assert all(s["frames"] == 24 for s in generation["scenes"])
    assert report["made_by"] == f"{model} · {generation['steps']} steps"
    assert report["made_by"] in (directory / "report.html").read_text()
    steps = [e for e in events if e[0] == "render" and "step" in e[2]]
    assert steps, "progress must come from the denoising loop, step by step"

    # The same job again: every clip reused, the model already resident.
    again = run_job_sync(spec, config, gpu_state=GPU_STATE)
    assert again.status == "done"
    report = json.loads((directory / "report.json").read_text())
    assert all(s.get("reused") for s in report["generation"]["scenes"])


def test_a_chat_model_writes_the_storyboard(tmp_path, tmp_path_factory):
    config = config_for(tmp_path, tmp_path_factory, "tiny-wan", llm="tiny-llm")
    spec = video_job(config)
    outcome = run_job_sync(spec, config, gpu_state=GPU_STATE)
    assert outcome.status == "done", outcome.error
    report = json.loads((job_dir(config.jobs_dir, spec.id) / "report.json").read_text())
    written = report["storyboard"]["written_by"]
    assert written["path"] in ("llm-constrained", "llm", "llm-repaired", "rules")
    assert written["reason"] and len(written["video_prompts"]) == len(
        report["storyboard"]["scenes"])


def test_cancel_mid_denoise_then_the_model_still_works(tmp_path, tmp_path_factory):
    config = config_for(tmp_path, tmp_path_factory, "tiny-wan")
    cancellation = Cancellation()

    def on_progress(stage: str, percent: float, message: str) -> None:
        if stage == "render" and "step" in message:
            cancellation.set(Cancellation.USER)

    outcome = run_job_sync(video_job(config), config, on_progress=on_progress,
                           cancellation=cancellation, gpu_state=GPU_STATE)
    assert outcome.status == "cancelled"
    assert run_job_sync(video_job(config), config, gpu_state=GPU_STATE).status == "done"


def test_a_missing_model_fails_at_once_with_the_install_command(tmp_path):
    config = Config(state=StateConfig(dir=tmp_path / "var"),
                    video=VideoConfig(backend="diffusers", model="Wan2.1-T2V-1.3B-Diffusers",
                                      width=64, height=64, fps=8),
                    models=ModelsConfig(dir=tmp_path / "models"))
    outcome = run_job_sync(video_job(config), config, gpu_state=GPU_STATE)
    assert outcome.status == "failed"
    assert "scripts/fetch_models.py Wan2.1-T2V-1.3B-Diffusers" in outcome.error
