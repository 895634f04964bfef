"""The diffusers render backend on tiny random-weight models of each family, on the CPU:
real loading, real denoising loops, two steps, a few frames."""

from __future__ import annotations

import gc
import shutil
import weakref
from pathlib import Path

import numpy as np
import pytest
import torch

from daemon.encoding import probe
from tests import tiny_models
from workers.context import JobCancelled
from workers.ladder import LADDER, Rung, ladder_for
from workers.models import ModelError
from workers.pipelines import diffusion, diffusion_plan
from workers.pipelines.diffusion import DiffusionSettings, RenderProgress, SceneRequest
from workers.residency import Residency
from workers.vram import VramMonitor

STEPS = 2


# What a worker process keeps between jobs, kept here between tests (the tiny models
# load once for the module).
RESIDENCY = Residency()


@pytest.fixture(scope="module", autouse=True)
def _one_thread_and_unload_after():
    yield from tiny_models.one_thread()
    RESIDENCY.evict()


def model(name: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_models.session_model(name, tmp_path_factory)


def scene(number: int = 1, frames: int = 12, first_frame: np.ndarray | None = None,
          scenes: int = 2) -> SceneRequest:
    return SceneRequest(number=number, scenes=scenes, prompt="A red fox runs through the snow.",
                        frames=frames, fps=8, width=40, height=30, seed=7,
                        first_frame=first_frame, frames_after=frames * (scenes - number))


def render(request: SceneRequest, settings: DiffusionSettings, progress: list | None = None):
    frames: list[np.ndarray] = []
    result = diffusion.render_scene(request, settings, frames.append,
                                    progress.append if progress is not None else None,
                                    resident=RESIDENCY)
    return frames, result


def assert_frames(frames: list[np.ndarray], count: int) -> None:
    assert len(frames) == count
    for frame in frames:
        assert frame.shape == (30, 40, 3) and frame.dtype == np.uint8


# --- each family, end to end ------------------------------------------------------------


def test_wan_renders_a_scene_with_progress_per_step(tmp_path_factory):
    settings = DiffusionSettings(model_dir=model("tiny-wan", tmp_path_factory), steps=STEPS)
    progress: list[RenderProgress] = []
    frames, result = render(scene(), settings, progress)

    assert_frames(frames, 12)
    assert result.pipeline == "WanPipeline" and result.native_fps == 16
    assert result.generations == [25]  # 1.5 s at 16 fps: 23 frames, rounded up to 4k + 1
    assert result.generated_size == (48, 32)  # multiples of 16 nearest to 40 × 30
    assert result.dtype == "float32" and result.device == "cpu" and result.rung == "on_device"
    assert [p.step for p in progress] == [1, 2]
    assert progress[-1].fraction == 1 and progress[-1].message().startswith("scene 1/2 · step 2/2")
    assert progress[-1].eta_s is not None
    assert np.array_equal(result.last_frame, frames[-1])
    assert result.denoise_s > 0 and result.other_s > 0


def test_ltx_renders_and_continues_from_the_previous_scene(tmp_path_factory):
    settings = DiffusionSettings(model_dir=model("tiny-ltx", tmp_path_factory), steps=STEPS)
    first, result = render(scene(), settings)
    assert_frames(first, 12)
    assert result.pipeline == "LTXPipeline" and result.native_fps == 24
    assert (result.generations[0] - 1) % 4 == 0  # the tiny VAE compresses time 4×

    second, continued = render(scene(2, first_frame=result.last_frame), settings)
    assert_frames(second, 12)
    assert continued.pipeline == "LTXImageToVideoPipeline"  # the same weights, composed
    assert continued.continuity == "continues the previous scene's last frame"
    assert continued.reused_model and continued.load_s < 0.05


def test_cogvideox_splits_a_long_scene_into_generations(tmp_path_factory):
    settings = DiffusionSettings(model_dir=model("tiny-cogvideox", tmp_path_factory),
                                 steps=STEPS)
    progress: list[RenderProgress] = []
    frames, result = render(scene(frames=12), settings, progress)

    assert_frames(frames, 12)
    assert result.pipeline == "CogVideoXPipeline" and result.native_fps == 8
    # At most 9 frames per generation (the tiny model's sample_frames): two of 4k + 1.
    assert result.generations == [9, 5]
    assert [(p.generation, p.step) for p in progress] == [(1, 1), (1, 2), (2, 3), (2, 4)]
    assert result.continuity == "starts afresh: first scene"


# --- cancel, out of memory, residency ------------------------------------------------------


def test_cancel_stops_at_the_next_step_and_the_pipeline_still_works(tmp_path_factory):
    settings = DiffusionSettings(model_dir=model("tiny-wan", tmp_path_factory), steps=3)
    steps_seen = []

    def cancel_at_first_step(progress: RenderProgress) -> None:
        steps_seen.append(progress.step)
        raise JobCancelled()

    frames: list[np.ndarray] = []
    with pytest.raises(JobCancelled):
        diffusion.render_scene(scene(), settings, frames.append, cancel_at_first_step,
                               resident=RESIDENCY)
    assert steps_seen == [1] and frames == []

    pipe = RESIDENCY.get(diffusion.ROLE).model
    assert pipe._interrupt is False and pipe._current_timestep is None
    again, result = render(scene(), settings)
    assert_frames(again, 12)
    assert result.reused_model and RESIDENCY.get(diffusion.ROLE).model is pipe


def test_out_of_memory_steps_down_the_ladder_and_the_scene_completes(tmp_path_factory, tmp_path):
    # A copy of its own: the rung it steps down to is remembered for its folder.
    model_dir = shutil.copytree(model("tiny-wan", tmp_path_factory), tmp_path / "wan")
    settings = DiffusionSettings(model_dir=model_dir, steps=STEPS)
    raised = []

    def out_of_memory_once(progress: RenderProgress) -> None:
        if not raised:
            raised.append(progress.step)
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    frames: list[np.ndarray] = []
    result = diffusion.render_scene(scene(), settings, frames.append, out_of_memory_once,
                                    resident=RESIDENCY)

    assert_frames(frames, 12)
    assert [(s.from_rung, s.to_rung) for s in result.step_downs] == [
        (Rung.ON_DEVICE, Rung.MODEL_OFFLOAD)]
    assert "OutOfMemoryError: CUDA out of memory" in result.step_downs[0].error
    assert result.rung == "model_offload" and not result.reused_model
    # The next job on this model starts on the rung that worked.
    _, next_job = render(scene(), settings)
    assert next_job.rung == "model_offload" and next_job.reused_model


def test_a_resident_model_is_reused_and_a_new_one_evicts_it(tmp_path_factory):
    wan = DiffusionSettings(model_dir=model("tiny-wan", tmp_path_factory), steps=1)
    render(scene(), wan)
    pipe = weakref.ref(RESIDENCY.get(diffusion.ROLE).model)
    _, second = render(scene(), wan)
    assert second.reused_model and second.load_s < 0.01
    assert RESIDENCY.get(diffusion.ROLE).model is pipe()

    ltx = DiffusionSettings(model_dir=model("tiny-ltx", tmp_path_factory), steps=1)
    _, switched = render(scene(), ltx)
    gc.collect()
    assert not switched.reused_model and pipe() is None  # the Wan pipeline is gone
    assert RESIDENCY.get(diffusion.ROLE).model_path.name == "tiny-ltx"


@pytest.mark.parametrize("rung", ladder_for(torch.device("cpu")))
def test_each_rung_of_the_cpu_ladder_renders(tmp_path_factory, rung):
    settings = DiffusionSettings(model_dir=model("tiny-wan", tmp_path_factory), steps=1,
                                 rung=rung)
    frames, result = render(scene(frames=4), settings)
    assert_frames(frames, 4)
    assert result.rung == rung


# --- models the backend cannot use ------------------------------------------------------------


def test_a_folder_that_is_no_diffusers_model_fails_with_what_to_do(tmp_path_factory):
    settings = DiffusionSettings(model_dir=model("tiny-llm", tmp_path_factory))
    with pytest.raises(ModelError, match="no model_index.json"):
        render(scene(), settings)


def test_an_image_to_video_model_is_refused_as_the_text_to_video_model(tmp_path):
    (tmp_path / "model_index.json").write_text('{"_class_name": "WanImageToVideoPipeline"}')
    with pytest.raises(ModelError, match="as the text-to-video model .* runs WanPipeline"):
        render(scene(), DiffusionSettings(model_dir=tmp_path))


# --- frames and generations ---------------------------------------------------------------------


@pytest.mark.parametrize(("needed", "most", "step", "first", "chained", "plan"), [
    (23, 81, 4, False, False, [25]),  # one generation, rounded up to 4k + 1
    (81, 81, 4, False, False, [81]),
    (82, 81, 4, False, True, [41, 45]),  # chained: the second repeats the first one's last frame
    (160, 81, 4, False, False, [81, 81]),
    (161, 161, 8, True, True, [89, 81]),  # a continued scene: its first frame is given
    (12, 9, 4, False, False, [9, 5]),
    (5, 81, 4, True, False, [9]),  # a start frame brings one frame less
])
def test_plan_generations(needed, most, step, first, chained, plan):
    assert diffusion_plan.plan_generations(needed, most, step, first, chained) == plan
    gained = sum(plan) - first - chained * (len(plan) - 1)
    assert gained >= needed and all((n - 1) % step == 0 and n <= most for n in plan)


def test_frames_are_resampled_by_time_and_sizes_fit_the_family():
    assert diffusion_plan.native_frames_needed(frames=12, fps=8, native_fps=24) == 34
    assert diffusion_plan.native_frames_needed(frames=80, fps=16, native_fps=16) == 80
    assert diffusion_plan.valid_frames_at_least(34, 8) == 41
    assert diffusion_plan.valid_frames_at_most(100, 8) == 97
    assert diffusion_plan.generation_size(832, 480, 16) == (832, 480)
    assert diffusion_plan.generation_size(854, 480, 32) == (864, 480)
    assert diffusion_plan.generation_size(40, 30, 32) == (32, 32)


# --- continuity through other image-to-video pipelines, a real clip, the GPU -------------------


@pytest.mark.slow
def test_a_separate_image_to_video_model_continues_the_next_scene(tmp_path_factory):
    pytest.importorskip("ftfy", reason="WanImageToVideoPipeline needs ftfy")
    settings = DiffusionSettings(model_dir=model("tiny-wan", tmp_path_factory), steps=STEPS,
                                 i2v_model_dir=model("tiny-wan-i2v", tmp_path_factory))
    first, opening = render(scene(), settings)
    assert opening.pipeline == "WanPipeline" and opening.generations == [25]

    second, continued = render(scene(2, frames=24, first_frame=opening.last_frame), settings)
    assert_frames(second, 24)
    assert continued.pipeline == "WanImageToVideoPipeline"
    # 3 s at 16 fps: 47 new frames after the given one; at most 81 per generation.
    assert continued.generations == [49]
    assert RESIDENCY.get(diffusion.CONTINUITY_ROLE).model_path.name == "tiny-wan-i2v"


@pytest.mark.slow
def test_wan_2_2_ti2v_chains_long_scenes_through_its_own_weights(tmp_path_factory):
    pytest.importorskip("ftfy", reason="WanImageToVideoPipeline needs ftfy")
    settings = DiffusionSettings(model_dir=model("tiny-wan22-ti2v", tmp_path_factory),
                                 steps=STEPS, max_frames=13)
    frames, result = render(scene(frames=24), settings)
    assert_frames(frames, 24)
    assert result.native_fps == 24 and result.generated_size == (32, 32)
    # 3 s at 24 fps: 70 frames; 13 per generation, each after the first repeating one.
    assert all(n <= 13 for n in result.generations)
    assert sum(result.generations) - (len(result.generations) - 1) >= 70
    assert result.pipeline == "WanImageToVideoPipeline"


@pytest.mark.slow
def test_a_scene_becomes_an_h264_clip_through_the_clip_writer(tmp_path_factory, tmp_path):
    from workers.pipelines import encode

    settings = DiffusionSettings(model_dir=model("tiny-ltx", tmp_path_factory), steps=STEPS)
    request = scene()
    fmt = encode.VideoFormat(width=request.width, height=request.height, fps=request.fps)
    with encode.clip_writer(tmp_path / "scene_01.mp4", fmt) as write:
        result = diffusion.render_scene(request, settings, write, resident=RESIDENCY)
    info = probe(tmp_path / "scene_01.mp4")
    assert (info.width, info.height) == (40, 30) and result.frames == 12
    last = diffusion.last_frame_of_clip(tmp_path / "scene_01.mp4", 40, 30)
    assert last.shape == (30, 40, 3)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("rung", list(LADDER))
def test_every_rung_renders_on_the_gpu_in_half_precision(tmp_path_factory, rung):
    RESIDENCY.evict()
    settings = DiffusionSettings(model_dir=model("tiny-wan", tmp_path_factory), steps=STEPS,
                                 rung=rung)
    with VramMonitor(settings.gpu) as vram:
        frames, result = render(scene(), settings)
    assert_frames(frames, 12)
    assert result.device.startswith("cuda") and result.dtype in ("bfloat16", "float16")
    assert result.rung == rung and vram.report()["peak"] > 0
    RESIDENCY.evict()
