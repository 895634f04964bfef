"""Colour looks: one grade for every scene, as a named preset or raw values.

A grade runs in the order a colourist would: clean-up first (denoise, automatic white
balance, CLAHE local contrast), then the creative part (brightness, contrast, warmth,
saturation and sepia folded into one colour matrix), and the vignette last. Everything
that does not depend on the frame (the matrix, the vignette mask, the CLAHE object)
is prepared once per scene; a frame costs a few OpenCV calls.
"""

from __future__ import annotations

import dataclasses

import cv2
import numpy as np
from moviepy import VideoClip

from workers.pipelines.video_settings import LookConfig, LookPreset


@dataclasses.dataclass(frozen=True)
class Look:
    """Resolved look values; the defaults change nothing."""

    brightness: float = 0.0  # -1..1, a fraction of full scale added to every channel
    contrast: float = 1.0  # around mid-grey
    saturation: float = 1.0  # 0 is greyscale
    warmth: float = 0.0  # -1..1: towards blue (cold) or orange (warm)
    vignette: float = 0.0  # 0..1: how much the corners darken
    sepia: float = 0.0  # 0..1: mix towards a sepia print
    denoise: float = 0.0  # 0..1: edge-preserving smoothing strength
    white_balance: bool = False  # grey-world automatic white balance, per scene
    clahe: float = 0.0  # CLAHE clip limit on lightness; 0 is off

    @property
    def changes_nothing(self) -> bool:
        return self == Look()


PRESETS: dict[str, Look] = {
    "none": Look(),
    # Clean-up only: what a careful grade of raw footage starts with.
    "natural": Look(white_balance=True, clahe=1.5, denoise=0.25),
    "warm": Look(warmth=0.3, saturation=1.1, brightness=0.02, vignette=0.2),
    "vintage": Look(sepia=0.45, warmth=0.15, contrast=0.9, saturation=0.75, vignette=0.5),
    "crisp": Look(contrast=1.15, saturation=1.15, clahe=2.0),
}

# Rec. 601 luma weights, in RGB order: what "grey" means for saturation and sepia.
_LUMA = np.array([0.299, 0.587, 0.114])
_SEPIA = np.array([[0.393, 0.769, 0.189],
                   [0.349, 0.686, 0.168],
                   [0.272, 0.534, 0.131]])
_WHITE_BALANCE_LIMITS = (0.7, 1.4)  # beyond these a "correction" is really a recolouring


def resolve(choice: LookPreset | LookConfig) -> Look:
    """The values a look setting stands for: its preset, with raw values on top."""
    config = LookConfig(preset=choice) if isinstance(choice, str) else choice
    overrides = config.model_dump(exclude={"preset"}, exclude_none=True)
    return dataclasses.replace(PRESETS[config.preset], **overrides)


def apply(clip: VideoClip, look: Look) -> VideoClip:
    """``clip`` with ``look`` applied to every frame. White balance is measured once,
    on the clip's middle frame, so it cannot flicker within a scene."""
    if look.changes_nothing:
        return clip
    reference = clip.get_frame(clip.duration / 2) if look.white_balance else None
    return clip.image_transform(Grade(look, clip.w, clip.h, reference))


class Grade:
    """``look`` prepared for frames of one size: call it on a frame to grade it."""

    def __init__(self, look: Look, width: int, height: int,
                 white_balance_reference: np.ndarray | None = None) -> None:
        self.look = look
        self.white_balance = (white_balance_gains(white_balance_reference)
                              if look.white_balance and white_balance_reference is not None
                              else None)
        self.clahe = (cv2.createCLAHE(clipLimit=look.clahe, tileGridSize=(8, 8))
                      if look.clahe > 0 else None)
        self.matrix = colour_matrix(look)
        self.vignette = vignette_mask(width, height, look.vignette) if look.vignette else None

    def __call__(self, frame: np.ndarray) -> np.ndarray:
        look = self.look
        if look.denoise:
            # Bilateral: smooths flat areas and keeps edges, at video speed (non-local
            # means would be ~20× slower per frame).
            sigma = 8 + 40 * look.denoise
            frame = cv2.bilateralFilter(frame, 5, sigma, sigma / 8 + 1)
        if self.white_balance is not None:
            frame = cv2.transform(frame, np.diag(self.white_balance))
        if self.clahe is not None:
            lab = cv2.cvtColor(frame, cv2.COLOR_RGB2LAB)
            lab[..., 0] = self.clahe.apply(np.ascontiguousarray(lab[..., 0]))
            frame = cv2.cvtColor(lab, cv2.COLOR_LAB2RGB)
        if self.matrix is not None:
            frame = cv2.transform(frame, self.matrix)  # saturates to 0..255
        if self.vignette is not None:
            frame = cv2.multiply(frame, self.vignette, scale=1 / 255)
        return frame


def colour_matrix(look: Look) -> np.ndarray | None:
    """Brightness, contrast, warmth, saturation and sepia as one 3×4 affine matrix on
    RGB values 0..255 (applied in that order), or None when it changes nothing."""
    # 4×4 homogeneous steps, composed right to left.
    tone = np.eye(4)
    tone[:3, :3] *= look.contrast
    tone[:3, 3] = 127.5 * (1 - look.contrast) + 255 * look.brightness
    warmth = np.diag([1 + 0.3 * look.warmth, 1 + 0.05 * look.warmth, 1 - 0.3 * look.warmth, 1])
    grey = np.tile(_LUMA, (3, 1))
    saturation = np.eye(4)
    saturation[:3, :3] = look.saturation * np.eye(3) + (1 - look.saturation) * grey
    sepia = np.eye(4)
    sepia[:3, :3] = (1 - look.sepia) * np.eye(3) + look.sepia * _SEPIA
    matrix = (sepia @ saturation @ warmth @ tone)[:3]
    return None if np.allclose(matrix, np.eye(4)[:3]) else matrix


def white_balance_gains(frame: np.ndarray) -> np.ndarray:
    """Grey-world gains per RGB channel: the scene's average should be neutral grey.
    Clipped (and blown-out pixels ignored) so a red sunset stays red, only less so."""
    pixels = frame.reshape(-1, 3).astype(np.float64)
    usable = pixels[(pixels.max(axis=1) < 250) & (pixels.max(axis=1) > 5)]
    means = (usable if len(usable) else pixels).mean(axis=0) + 1e-6
    return np.clip(means.mean() / means, *_WHITE_BALANCE_LIMITS)


def vignette_mask(width: int, height: int, strength: float) -> np.ndarray:
    """A 3-channel uint8 gain mask: 255 in the middle, falling smoothly towards the
    corners to ``1 - strength`` of full brightness."""
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    # Elliptic distance: 0 at the centre, 1 at the middle of each edge, √2 in the corners.
    distance = np.hypot((xs + 0.5) / width * 2 - 1, (ys + 0.5) / height * 2 - 1) / np.sqrt(2)
    falloff = np.clip((distance - 0.35) / 0.65, 0, 1) ** 2
    gain = 255 * (1 - strength * falloff)
    return cv2.merge([np.round(gain).astype(np.uint8)] * 3)
