"""Tiled super-resolution matches the whole-image result: no seams."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.rrdbnet import RRDBNet
from tests.synthetic import psnr
from workers.tiling import upscale_tiled

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def model():
    return RRDBNet(blocks=1, features=8, growth=4).eval()


def whole(model, image):
    with torch.inference_mode():
        out = model(torch.from_numpy(image.transpose(2, 0, 1).copy())[None])
    return out[0].permute(1, 2, 0).numpy()


@pytest.mark.parametrize("height, width", [(37, 53), (64, 64), (29, 101)])
@pytest.mark.parametrize("tile", [16, 24, 48])
def test_tiled_output_matches_the_untiled_output(model, height, width, tile):
    image = np.random.default_rng(height * width + tile).random((height, width, 3),
                                                                np.float32)
    reference = whole(model, image)
    # An RRDB block's receptive field reaches ~20 px: 24 px of context covers it.
    tiled, report = upscale_tiled(model, image, 4, tile=tile, overlap=8, context=24,
                                  device=CPU)
    assert tiled.shape == (height * 4, width * 4, 3)
    assert psnr(tiled, reference) >= 50.0
    assert report.tiles >= 1 and report.steps_down == []


def test_too_little_context_shows_seams_that_the_overlap_blend_softens(model):
    """The check above is not vacuous: without context the tiles disagree at edges."""
    image = np.random.default_rng(3).random((48, 48, 3), np.float32)
    reference = whole(model, image)
    hard, _ = upscale_tiled(model, image, 4, tile=16, overlap=0, context=0, device=CPU)
    soft, _ = upscale_tiled(model, image, 4, tile=16, overlap=8, context=0, device=CPU)
    assert psnr(hard, reference) < 50.0
    assert psnr(soft, reference) > psnr(hard, reference)


def test_out_of_memory_halves_the_tile_and_starts_over(model):
    calls = {"n": 0}

    class Flaky(torch.nn.Module):
        def forward(self, x):
            calls["n"] += 1
            if x.shape[-1] > 40:
                raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
            return model(x)

    image = np.random.default_rng(5).random((64, 64, 3), np.float32)
    out, report = upscale_tiled(Flaky(), image, 4, tile=64, overlap=8, context=8, device=CPU)
    assert report.tile == 16 and len(report.steps_down) == 2
    assert psnr(out, whole(model, image)) >= 40.0


def test_half_precision_nan_falls_back_to_float32(model):
    class NaNInHalf(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = model

        def forward(self, x):
            if x.dtype == torch.bfloat16:
                return torch.full((1, 3, x.shape[2] * 4, x.shape[3] * 4), float("nan"))
            return self.inner(x)

    image = np.random.default_rng(6).random((32, 32, 3), np.float32)
    out, report = upscale_tiled(NaNInHalf(), image, 4, tile=16, overlap=4, context=8,
                                device=CPU, dtype=torch.bfloat16)
    assert report.dtype == "float32" and "NaN/Inf" in report.steps_down[0]
    assert np.isfinite(out).all()
