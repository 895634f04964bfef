"""The upscale kind. Tiling itself is checked in test_tiling.py.

spandrel loads ESRGAN-family .pth files; it needs a torchvision build that matches
torch, which PyPI does not have for the CPU torch used here. So: the loader's own
errors are tested everywhere, the real spandrel load runs where spandrel imports (GPU
hosts, `pip install 'reelqueue[gpu]'`), and the image and video paths are tested here
with spandrel's one call replaced by the tiny RRDBNet it would have returned.
"""

from __future__ import annotations

import json
import subprocess

import imageio_ffmpeg
import numpy as np
import pytest
import torch

from daemon.config import Config, StateConfig, UpscaleConfig
from daemon.jobs import JobSpec, Source, job_dir, validate_request
from tests.rrdbnet import RRDBNet
from workers import media
from workers.pipelines import upscale
from workers.runner import run_job_sync


def run_upscale(tmp_path, name, write_input, model_path=None, **options):
    config = Config(state=StateConfig(dir=tmp_path / "var"),
                    upscale=UpscaleConfig(model=model_path, tile=32, tile_context=24))
    spec = JobSpec(id="up" + str(abs(hash((str(tmp_path), name))))[:10], kind="upscale",
                   inputs=[name], options=validate_request("upscale", "", options, [name]),
                   source=Source(channel="cli"))
    inputs = job_dir(config.jobs_dir, spec.id) / "inputs"
    inputs.mkdir(parents=True)
    write_input(inputs / name)
    return run_job_sync(spec, config), job_dir(config.jobs_dir, spec.id)


@pytest.fixture
def tiny_upscaler(monkeypatch):
    model = RRDBNet(blocks=1, features=8, growth=4).eval()
    monkeypatch.setattr(upscale, "load_upscaler",
                        lambda settings, half: (model, 4, torch.float32))
    return model


def rgba16(path):
    rng = np.random.default_rng(1)
    image = (rng.random((21, 35, 4)) * 65535).astype(np.uint16)
    image[..., 3] = 65535
    image[:5, :5, 3] = 0  # a transparent corner
    media.write_png(path, image)


def test_a_16_bit_image_with_alpha_comes_back_16_bit_with_alpha(tmp_path, tiny_upscaler):
    outcome, directory = run_upscale(tmp_path, "photo.png", rgba16)
    assert outcome.status == "done", outcome.error
    result = media.read_image(directory / upscale.IMAGE_OUTPUT)
    assert result.dtype == np.uint16 and result.shape == (84, 140, 4)
    assert result[0, 0, 3] < 1000 and result[-1, -1, 3] > 64000  # alpha kept, scaled
    original = media.read_image(directory / "inputs" / "photo.png")
    assert original.shape == (21, 35, 4)  # the original is untouched
    report = json.loads((directory / "report.json").read_text())
    assert report["scale"] == 4 and report["bits"] == 16 and report["alpha"] is True
    assert report["tiles"] == 2  # 21×35 in 32 px tiles


def test_a_video_is_upscaled_frame_by_frame_and_keeps_its_audio(tmp_path, tiny_upscaler):
    def clip_with_audio(path):
        ffmpeg = imageio_ffmpeg.get_ffmpeg_exe()
        subprocess.run([ffmpeg, "-v", "error", "-f", "lavfi", "-i", "testsrc=size=32x24:rate=8",
                        "-f", "lavfi", "-i", "sine=frequency=440", "-t", "1", "-c:v", "libx264",
                        "-pix_fmt", "yuv420p", "-c:a", "aac", "-shortest", str(path)],
                       check=True)

    outcome, directory = run_upscale(tmp_path, "clip.mp4", clip_with_audio)
    assert outcome.status == "done", outcome.error
    out = directory / upscale.VIDEO_OUTPUT
    reader = imageio_ffmpeg.read_frames(str(out))
    meta = next(reader)
    reader.close()
    assert meta["size"] == (128, 96) and meta["codec"] == "h264"
    assert imageio_ffmpeg.count_frames_and_secs(str(out))[0] == 8
    probe = subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-i", str(out)],
                           capture_output=True, text=True).stderr
    assert "Audio: aac" in probe


def test_no_model_configured_or_missing_file_says_how_to_install(tmp_path):
    outcome, _ = run_upscale(tmp_path / "a", "photo.png", rgba16)
    assert outcome.status == "failed" and "fetch_models.py RealESRGAN_x4plus" in outcome.error
    outcome, _ = run_upscale(tmp_path / "b", "photo.png", rgba16,
                             model_path=tmp_path / "models" / "RealESRGAN_x4plus.pth")
    assert outcome.status == "failed" and "does not exist" in outcome.error


def test_without_spandrel_the_job_says_what_to_install(tmp_path):
    try:
        import spandrel  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("spandrel imports here: the real loader is tested instead")
    model_path = tmp_path / "tiny_x4.pth"
    torch.save(RRDBNet().state_dict(), model_path)
    outcome, _ = run_upscale(tmp_path, "photo.png", rgba16, model_path=model_path)
    assert outcome.status == "failed" and "spandrel" in outcome.error


def test_spandrel_loads_an_esrgan_family_pth(tmp_path):
    pytest.importorskip("spandrel")
    model_path = tmp_path / "tiny_x4.pth"
    torch.save(RRDBNet().state_dict(), model_path)
    outcome, directory = run_upscale(tmp_path, "photo.png", rgba16, model_path=model_path)
    assert outcome.status == "done", outcome.error
    assert media.read_image(directory / upscale.IMAGE_OUTPUT).shape == (84, 140, 4)


def test_only_images_and_videos_are_taken():
    with pytest.raises(Exception, match="takes .png"):
        validate_request("upscale", "", {}, ["notes.txt"])
