"""The long_exposure kind: the paper's building blocks, then whole jobs on synthetic
scenes whose true exposure is known."""

from __future__ import annotations

import json
import zipfile

import cv2
import numpy as np
import pytest

from daemon.compose import config_class
from daemon.config import StateConfig
from daemon.jobs import JobError, JobSpec, Source, job_dir
from tests.synthetic import psnr, render
from workers import media
from workers.pipelines import kind_registry
from workers.pipelines import long_exposure as le
from workers.runner import run_job_sync

Config = config_class()  # the core's tables and the kinds'

KINDS = kind_registry()


def test_soft_gamma_curves_invert_each_other():
    v = np.linspace(0, 1, 1001, dtype=np.float64)
    assert np.allclose(le.soft_gamma(le.soft_gamma(v, 3.0), 1 / 3), v, atol=1e-12)
    assert np.allclose(le.soft_gamma(le.soft_gamma(v, 1 / 3), 3.0), v, atol=1e-12)
    assert le.soft_gamma(np.array(0.5), 3.0) == pytest.approx(0.25)  # mids go down


@pytest.mark.parametrize("samples", [1, 2, 7, 64])
def test_ramp_weights_conserve_energy(samples):
    weights = le.ramp_weights(samples)
    assert weights[0] == 1.0 and np.all(np.diff(weights) < 0)
    assert np.allclose(weights + (1 - weights), 1.0)
    # A uniform scene stays exactly as bright through the blur, whatever the flow.
    frames = [np.full((24, 32, 3), 0.4, np.float32) for _ in range(3)]
    flows = [np.full((24, 32, 2), 3.0, np.float32)] * 2
    exposure = le.synthesize_exposure(frames, flows, [-f for f in flows], samples, _Progress())
    assert np.allclose(exposure.image, 0.4, atol=1e-5)


def test_selection_stops_at_the_first_frame_count_meeting_the_target():
    steps = [np.full((10, 10), 10.0) for _ in range(6)]
    assert le.select_frame_count(steps, 98, 25.0) == (4, 30.0)  # 3 gaps: 30 px ≥ 25
    assert le.select_frame_count(steps, 98, 30.0) == (4, 30.0)  # reaching it exactly counts
    assert le.select_frame_count(steps, 98, 1000.0) == (7, 60.0)  # never: all frames


def test_mask_saturates_at_alpha_and_beta():
    motion = np.linspace(0, 100, 10001, dtype=np.float32)
    reference = np.percentile(motion, 99)
    mask = le.motion_mask(motion, 0.16, 0.32)
    assert np.all(mask[motion <= 0.16 * reference] == 0)
    assert np.all(mask[motion >= 0.32 * reference] == 1)
    between = (motion > 0.17 * reference) & (motion < 0.31 * reference)
    assert np.all((mask[between] > 0) & (mask[between] < 1))
    assert np.all(le.motion_mask(np.zeros(100, np.float32), 0.16, 0.32) == 0)


def test_guided_filter_keeps_a_flat_source_flat():
    guide = np.random.default_rng(1).random((40, 40)).astype(np.float32)
    out = le.guided_filter(guide, np.full((40, 40), 0.7, np.float32), 3, 1e-3)
    assert np.allclose(out, 0.7, atol=1e-4)


class _Progress:
    """The slice of JobContext the blur stage uses."""

    def progress(self, *args: object) -> None:
        pass


def _run(tmp_path, frames, **options):
    config = Config(state=StateConfig(dir=tmp_path / "var"))
    spec = JobSpec(id="le" + str(abs(hash((tmp_path, tuple(options.items())))))[:12],
                   kind="long_exposure",
                   options=KINDS.validate("long_exposure", "", options, ["frame.png"]),
                   inputs=[f"frame_{i:03d}.png" for i in range(len(frames))],
                   source=Source(channel="cli"))
    inputs = job_dir(config.jobs_dir, spec.id) / "inputs"
    for name, frame in zip(spec.inputs, frames, strict=True):
        media.write_png(inputs / name, media.from_float(frame, 16))
    outcome = run_job_sync(spec, config)
    return outcome, job_dir(config.jobs_dir, spec.id)


def test_a_sparse_burst_comes_out_close_to_the_true_exposure(tmp_path):
    scene = render(320, 180, step=8, sparse_frames=7)
    outcome, directory = _run(tmp_path, scene.frames, use_all_frames=True)
    assert outcome.status == "done", outcome.error
    result = media.read_image(directory / le.OUTPUT_FILE)
    assert result.dtype == np.uint16 and result.shape == (180, 320, 3)  # 16 bits in, 16 out
    result = media.to_float(result)
    naive = np.mean(scene.frames, axis=0)
    gain = psnr(result, scene.truth, scene.moving) - psnr(naive, scene.truth, scene.moving)
    assert gain >= 3.0, f"only {gain:.2f} dB better than averaging in the moving region"
    report = json.loads((directory / "report.json").read_text())
    assert report["frames_used"] == 7 and report["output"]["bits"] == 16
    assert "data:image/jpeg;base64," in (directory / "report.html").read_text()


def test_a_static_scene_comes_back_unchanged(tmp_path):
    scene = render(160, 96, step=8, sparse_frames=5, moving=False)
    outcome, directory = _run(tmp_path, scene.frames)
    assert outcome.status == "done", outcome.error
    result = media.to_float(media.read_image(directory / le.OUTPUT_FILE))
    assert psnr(result, scene.truth) >= 45.0


def test_background_blur_mode_and_a_clip_input(tmp_path):
    scene = render(160, 96, step=4, sparse_frames=6)
    config = Config(state=StateConfig(dir=tmp_path / "var"))
    spec = JobSpec(id="clipjob1", kind="long_exposure", inputs=["burst.zip"],
                   options={"mode": "background_blur"}, source=Source(channel="cli"))
    inputs = job_dir(config.jobs_dir, spec.id) / "inputs"
    inputs.mkdir(parents=True)
    with zipfile.ZipFile(inputs / "burst.zip", "w") as archive:
        for i, frame in enumerate(scene.frames):
            ok, png = cv2.imencode(".png", (frame[..., ::-1] * 255).astype(np.uint8))
            archive.writestr(f"IMG_{i:04d}.png", png.tobytes())
    outcome = run_job_sync(spec, config)
    assert outcome.status == "done", outcome.error
    report = json.loads((job_dir(config.jobs_dir, spec.id) / "report.json").read_text())
    assert report["mode"] == "background_blur" and report["input"] == "burst burst.zip"
    assert media.read_image(job_dir(config.jobs_dir, spec.id) / le.OUTPUT_FILE).dtype == np.uint8


def test_frame_selection_stops_early_when_the_trail_is_long_enough(tmp_path):
    scene = render(160, 96, step=8, sparse_frames=8, speed=3.0)
    outcome, directory = _run(tmp_path, scene.frames, trail_target=0.05, trail_percentile=98)
    assert outcome.status == "done", outcome.error
    report = json.loads((directory / "report.json").read_text())
    assert 2 <= report["frames_used"] < 8
    assert report["trail"]["reached_fraction"] >= 0.05


@pytest.mark.parametrize("names, contents, message", [
    (["one.png"], [b"png"], "not an image"),
    (["clip.mp4"], [b"not a video"], "not a video this server can decode"),
    (["burst.zip"], [b"PK not really"], "not a valid zip"),
    (["a.png", "b.mp4"], [b"", b""], "not a mix"),
])
def test_bad_inputs_are_explained(tmp_path, names, contents, message):
    config = Config(state=StateConfig(dir=tmp_path / "var"))
    spec = JobSpec(id="badinput1", kind="long_exposure", inputs=names,
                   source=Source(channel="cli"))
    inputs = job_dir(config.jobs_dir, spec.id) / "inputs"
    inputs.mkdir(parents=True)
    for name, data in zip(names, contents, strict=True):
        (inputs / name).write_bytes(data)
    outcome = run_job_sync(spec, config)
    assert outcome.status == "failed" and message in outcome.error


def test_one_frame_is_not_enough(tmp_path):
    outcome, _ = _run(tmp_path, [np.zeros((32, 32, 3), np.float32)])
    assert outcome.status == "failed" and "needs at least 2" in outcome.error


def test_options_are_validated():
    with pytest.raises(JobError, match="mask_low must be below mask_high"):
        KINDS.validate("long_exposure", "", {"mask_low": 0.5, "mask_high": 0.4}, ["a.zip"])
    with pytest.raises(JobError, match="option 'mode'"):
        KINDS.validate("long_exposure", "", {"mode": "dreamy"}, ["a.zip"])
    with pytest.raises(JobError, match="takes .mp4"):
        KINDS.validate("long_exposure", "", {}, ["notes.txt"])
    with pytest.raises(JobError, match="needs an input file"):
        KINDS.validate("long_exposure", "a prompt alone", {})
