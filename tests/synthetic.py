"""A synthetic long-exposure scene whose true exposure is known, for tests and for
scripts/bench_long_exposure.py.

Rendered in linear light at a high frame rate: a textured static background, a
textured object moving across it, and a thin bright light moving on a diagonal. The
ground truth is the mean of every sub-frame; a camera sees only every k-th one. The
camera's tone curve is the inverse of the paper's soft gamma (k = 1/3), or sRGB.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from workers.pipelines.long_exposure import soft_gamma


def soft_curve(linear: np.ndarray) -> np.ndarray:
    return soft_gamma(linear, 1.0 / 3.0)


def srgb_curve(linear: np.ndarray) -> np.ndarray:
    return np.where(linear <= 0.0031308, 12.92 * linear,
                    1.055 * np.power(np.maximum(linear, 0), 1 / 2.4) - 0.055)


CURVES = {"soft-gamma": soft_curve, "sRGB": srgb_curve}


@dataclass
class Scene:
    frames: list[np.ndarray]  # what the camera saw: tone-mapped, float32 RGB in [0, 1]
    truth: np.ndarray  # the tone-mapped mean of every sub-frame
    moving: np.ndarray  # bool mask of pixels something moved over


def _texture(rng: np.random.Generator, h: int, w: int, low: float, high: float) -> np.ndarray:
    base = rng.random((h // 8 + 2, w // 8 + 2, 3)).astype(np.float32)
    smooth = cv2.resize(base, (w, h), interpolation=cv2.INTER_CUBIC)
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    stripes = 0.5 + 0.5 * np.sin(x / 5.0 + y / 9.0)[..., None]
    texture = 0.6 * smooth + 0.4 * stripes
    texture = (texture - texture.min()) / (np.ptp(texture) + 1e-6)
    return (low + (high - low) * texture).astype(np.float32)


def render(width: int, height: int, step: int, sparse_frames: int, speed: float = 1.5,
           moving: bool = True, curve: str = "soft-gamma", seed: int = 7) -> Scene:
    """``sparse_frames`` camera frames, one every ``step`` sub-frames."""
    rng = np.random.default_rng(seed)
    background = _texture(rng, height, width, 0.05, 0.55)
    size = max(8, height // 4)
    sprite = _texture(rng, size, size, 0.3, 0.9)
    subframes = (sparse_frames - 1) * step + 1
    total = np.zeros_like(background)
    footprint = np.zeros((height, width), bool)
    camera = []
    for t in range(subframes):
        frame = background.copy()
        if moving:
            x = int(round(width * 0.1 + speed * t))
            y = height // 3
            x0, x1 = max(0, x), min(width, x + size)
            if x1 > x0:
                frame[y:y + size, x0:x1] = sprite[:, x0 - x:x1 - x]
                footprint[y:y + size, x0:x1] = True
            # The thin bright light: a 3-pixel point on a diagonal, brighter than anything.
            lx = int(round(width * 0.2 + 0.8 * speed * t)) % width
            ly = int(round(height * 0.75 - 0.3 * speed * t)) % height
            cv2.circle(frame, (lx, ly), 1, (1.0, 0.95, 0.85), -1)
            cv2.circle(footprint.view(np.uint8), (lx, ly), 2, 1, -1)
        total += frame
        if t % step == 0:
            camera.append(CURVES[curve](frame))
    truth = CURVES[curve](total / subframes)
    moving_mask = cv2.dilate(footprint.astype(np.uint8), np.ones((5, 5), np.uint8)) > 0
    return Scene(camera, truth, moving_mask)


def psnr(a: np.ndarray, b: np.ndarray, mask: np.ndarray | None = None) -> float:
    diff = (a - b) ** 2
    mse = float(diff[mask].mean() if mask is not None else diff.mean())
    return float("inf") if mse == 0 else 10 * np.log10(1.0 / mse)


def ssim(a: np.ndarray, b: np.ndarray, mask: np.ndarray | None = None) -> float:
    """SSIM (Gaussian window, σ = 1.5) on luminance, averaged over ``mask``."""
    ga = cv2.cvtColor(a.astype(np.float32), cv2.COLOR_RGB2GRAY)
    gb = cv2.cvtColor(b.astype(np.float32), cv2.COLOR_RGB2GRAY)
    c1, c2 = 0.01**2, 0.03**2

    def blur(x: np.ndarray) -> np.ndarray:
        return cv2.GaussianBlur(x, (11, 11), 1.5)

    mu_a, mu_b = blur(ga), blur(gb)
    var_a = blur(ga * ga) - mu_a**2
    var_b = blur(gb * gb) - mu_b**2
    cov = blur(ga * gb) - mu_a * mu_b
    index = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / (
        (mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    return float(index[mask].mean() if mask is not None else index.mean())
