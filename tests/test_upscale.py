"""The upscale kind. Tiling itself is checked in test_tiling.py.

spandrel loads ESRGAN-family .pth files; it needs a torchvision build that matches
torch, which PyPI does not have for the CPU torch used here. So: the loader's own
errors are tested everywhere, the real spandrel load runs where spandrel imports (GPU
hosts, `pip install 'reelqueue[gpu]'`), and the image and video paths are tested here
with spandrel's one call replaced by the tiny RRDBNet it would have returned; the rest
of the load (residency, dtype) is the real code.
"""

from __future__ import annotations

import json
import subprocess
import sys
import types
from dataclasses import dataclass

import imageio_ffmpeg
import numpy as np
import pytest
import torch

from daemon.compose import config_class
from daemon.config import StateConfig
from daemon.jobs import JobSpec, Source, job_dir
from tests.rrdbnet import RRDBNet
from workers import gpu, media
from workers.ladder import Rung
from workers.pipelines import kind_registry, upscale
from workers.pipelines.upscale_settings import UpscaleConfig
from workers.residency import release_memory
from workers.runner import run_job_sync

Config = config_class()  # the core's tables and the kinds'

KINDS = kind_registry()


def run_upscale(tmp_path, name, write_input, model_path=None, gpu_state=None, **options):
    config = Config(state=StateConfig(dir=tmp_path / "var"),
                    upscale=UpscaleConfig(model=model_path, tile=32, tile_context=24))
    spec = JobSpec(id="up" + str(abs(hash((str(tmp_path), name))))[:10], kind="upscale",
                   inputs=[name], options=KINDS.validate("upscale", "", options, [name]),
                   source=Source(channel="cli"))
    inputs = job_dir(config.jobs_dir, spec.id) / "inputs"
    inputs.mkdir(parents=True)
    write_input(inputs / name)
    return run_job_sync(spec, config, gpu_state=gpu_state), job_dir(config.jobs_dir, spec.id)


@pytest.fixture
def gpu_state() -> gpu.GpuState:
    """What a worker process keeps between the jobs it runs."""
    return gpu.GpuState()


@dataclass
class Descriptor:
    """What the upscale kind reads of a ``spandrel.ImageModelDescriptor``."""

    model: torch.nn.Module
    scale: int = 4
    input_channels: int = 3
    supports_half: bool = True
    supports_bfloat16: bool = True


@pytest.fixture
def fake_spandrel(monkeypatch):
    """spandrel as the upscale kind uses it: a .pth → the tiny RRDBNet saved in it. The
    list it returns grows by the path of every load."""
    loads = []

    class ModelLoader:
        def __init__(self, device):
            self.device = device

        def load_from_file(self, path):
            loads.append(path)
            model = RRDBNet(blocks=1, features=8, growth=4)
            model.load_state_dict(torch.load(path))
            return Descriptor(model.to(self.device))

    module = types.ModuleType("spandrel")
    module.ModelLoader, module.ImageModelDescriptor = ModelLoader, Descriptor
    monkeypatch.setitem(sys.modules, "spandrel", module)
    return loads


@pytest.fixture
def tiny_x4(tmp_path):
    return tiny_model_file(tmp_path / "tiny_x4.pth")


def tiny_model_file(path):
    torch.save(RRDBNet(blocks=1, features=8, growth=4).state_dict(), path)
    return path


def rgba16(path):
    rng = np.random.default_rng(1)
    image = (rng.random((21, 35, 4)) * 65535).astype(np.uint16)
    image[..., 3] = 65535
    image[:5, :5, 3] = 0  # a transparent corner
    media.write_png(path, image)


def test_a_16_bit_image_with_alpha_comes_back_16_bit_with_alpha(tmp_path, fake_spandrel,
                                                                 tiny_x4):
    outcome, directory = run_upscale(tmp_path, "photo.png", rgba16, model_path=tiny_x4)
    assert outcome.status == "done", outcome.error
    result = media.read_image(directory / upscale.IMAGE_OUTPUT)
    assert result.dtype == np.uint16 and result.shape == (84, 140, 4)
    assert result[0, 0, 3] < 1000 and result[-1, -1, 3] > 64000  # alpha kept, scaled
    original = media.read_image(directory / "inputs" / "photo.png")
    assert original.shape == (21, 35, 4)  # the original is untouched
    report = json.loads((directory / "report.json").read_text())
    assert report["scale"] == 4 and report["bits"] == 16 and report["alpha"] is True
    assert report["tiles"] == 2  # 21×35 in 32 px tiles


def test_a_video_is_upscaled_frame_by_frame_and_keeps_its_audio(tmp_path, fake_spandrel,
                                                                 tiny_x4):
    def clip_with_audio(path):
        ffmpeg = imageio_ffmpeg.get_ffmpeg_exe()
        subprocess.run([ffmpeg, "-v", "error", "-f", "lavfi", "-i", "testsrc=size=32x24:rate=8",
                        "-f", "lavfi", "-i", "sine=frequency=440", "-t", "1", "-c:v", "libx264",
                        "-pix_fmt", "yuv420p", "-c:a", "aac", "-shortest", str(path)],
                       check=True)

    outcome, directory = run_upscale(tmp_path, "clip.mp4", clip_with_audio, model_path=tiny_x4)
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


def test_the_model_stays_resident_between_jobs_and_another_file_replaces_it(
        tmp_path, fake_spandrel, tiny_x4, gpu_state):
    for name in ("a", "b"):
        outcome, _ = run_upscale(tmp_path / name, "photo.png", rgba16, model_path=tiny_x4,
                                 gpu_state=gpu_state)
        assert outcome.status == "done", outcome.error
    assert fake_spandrel == [str(tiny_x4)]  # loaded once, for both jobs
    first = gpu_state.resident.get(upscale.ROLE)
    assert first.model_path == tiny_x4.resolve() and first.rung is Rung.ON_DEVICE
    # The residency knows what the weights take (a .pth counts as fp32): it can make
    # room for them, or park them for another role's model.
    assert first.need.total == tiny_x4.stat().st_size

    other = tiny_model_file(tmp_path / "other_x4.pth")
    outcome, _ = run_upscale(tmp_path / "c", "photo.png", rgba16, model_path=other,
                             gpu_state=gpu_state)
    assert outcome.status == "done", outcome.error
    assert first.model is None  # evicted before the other file loaded
    assert gpu_state.resident.get(upscale.ROLE).model_path == other.resolve()
    release_memory(gpu_state.resident)  # what a command kind with its own models asks for
    assert gpu_state.resident.get(upscale.ROLE) is None


def test_half_precision_falls_back_to_what_the_architecture_runs():
    both, fp16_only = Descriptor(None), Descriptor(None, supports_bfloat16=False)
    neither = Descriptor(None, supports_half=False, supports_bfloat16=False)
    assert upscale._runnable_dtype(torch.bfloat16, both) == torch.bfloat16
    assert upscale._runnable_dtype(torch.bfloat16, fp16_only) == torch.float16
    assert upscale._runnable_dtype(torch.bfloat16, neither) == torch.float32
    assert upscale._runnable_dtype(torch.float16, neither) == torch.float32
    assert upscale._runnable_dtype(torch.float32, both) == torch.float32


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
        KINDS.validate("upscale", "", {}, ["notes.txt"])
