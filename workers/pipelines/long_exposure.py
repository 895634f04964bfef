"""The ``long_exposure`` kind: a burst or a short clip → one long-exposure still.

After Tabellion et al., "Computational Long Exposure Mobile Photography" (ACM TOG 2023),
with OpenCV and numpy and no learned weights. Top to bottom:

1. load: frames from a clip, a zip of images, or several images;
2. align: every frame onto the first (a feature homography, ECC as the fallback): on
   the static scene for ``foreground_blur`` (tripod look), on a central subject box for
   ``background_blur`` (panning look);
3. flow: dense DIS optical flow between consecutive aligned frames, both ways;
4. select: add frames until the blur trail is long enough (a percentile of trail length
   over the image diagonal);
5. blur: fill each gap between two frames by sampling both along the flow, with ramp
   weights, so trails are continuous rather than ghosted copies; accumulate in the
   paper's soft-gamma space so highlights keep their energy in trails;
6. composite: the sharpest frame where the scene is still, through a motion mask
   smoothed with that frame as guide;
7. write: a PNG (16-bit when the input had it), the mask, and the report.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import cv2
import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from daemon.config import Config
from daemon.jobs import JobError
from workers import media, reports
from workers.context import JobContext, JobResult

INPUTS = media.VIDEO_SUFFIXES + media.IMAGE_SUFFIXES + media.BURST_SUFFIXES
OUTPUT_FILE = "long_exposure.png"
MASK_FILE = "mask.png"
SOFT_GAMMA_K = 3.0
FLOW_MAX_SIDE = 960  # flow on a smaller copy, then scaled up: cost without visible loss
ALIGN_MAX_SIDE = 1024
IDENTITY_TOLERANCE_PX = 0.05  # a homography this close to identity is left unapplied

# The paper's frame-selection targets: percentile of trail length, fraction of diagonal.
TARGETS = {"foreground_blur": (98.0, 0.30), "background_blur": (80.0, 0.028)}


class Options(BaseModel):
    model_config = ConfigDict(extra="forbid")

    mode: Literal["foreground_blur", "background_blur"] = Field(
        default="foreground_blur",
        description="foreground_blur: tripod look (moving things streak, the scene stays "
                    "sharp); background_blur: panning look (the subject stays sharp)")
    trail_percentile: float | None = Field(default=None, gt=0, le=100,
                                           description="default: 98 (fg) or 80 (bg)")
    trail_target: float | None = Field(default=None, gt=0, le=5,
                                       description="trail length over the image diagonal; "
                                                   "default 0.30 (fg) or 0.028 (bg)")
    use_all_frames: bool = Field(default=False, description="skip frame selection")
    max_frames: int = Field(default=120, ge=2, le=1000)
    samples: int | None = Field(default=None, ge=1, le=256,
                                description="samples per gap between frames; default: "
                                            "enough for sub-pixel steps along the flow")
    mask_low: float = Field(default=0.16, ge=0, le=1, description="alpha of the paper")
    mask_high: float = Field(default=0.32, ge=0, le=1, description="beta of the paper")

    @model_validator(mode="after")
    def _mask_order(self) -> Options:
        if self.mask_low >= self.mask_high:
            raise ValueError("mask_low must be below mask_high")
        return self

    def target(self) -> tuple[float, float]:
        percentile, fraction = TARGETS[self.mode]
        return (self.trail_percentile or percentile, self.trail_target or fraction)


def check_request(prompt: str, options: Options) -> None:
    """Nothing to check across fields beyond the model; the input is checked at run time."""


def models(config: Config) -> dict[str, Path]:
    return {}  # OpenCV and numpy only


def unavailable(config: Config) -> str | None:
    return None


# --- the math of the paper, kept small and testable ---------------------------------------


def soft_gamma(values: np.ndarray, k: float) -> np.ndarray:
    """g(v) = v / (v + (1 − v)·k). With k = 3 it lifts highlights' share before averaging;
    k = 1/3 is its inverse."""
    return values / (values + (1.0 - values) * k)


def ramp_weights(samples: int) -> np.ndarray:
    """w_n = 1 − n/N: the earlier frame's share at each sample of a gap; the later
    frame gets 1 − w_n, so every sample's weights sum to one."""
    return 1.0 - np.arange(samples, dtype=np.float32) / samples


def select_frame_count(step_magnitudes: list[np.ndarray], percentile: float,
                       target_px: float) -> tuple[int, float]:
    """How many frames make a trail long enough: the first count whose accumulated
    per-pixel flow reaches ``target_px`` at ``percentile``. Returns (frames, trail px)."""
    trail = np.zeros_like(step_magnitudes[0]) if step_magnitudes else np.zeros(1)
    reached = 0.0
    for steps, magnitude in enumerate(step_magnitudes, start=1):
        trail = trail + magnitude
        reached = float(np.percentile(trail, percentile))
        if reached >= target_px:
            return steps + 1, reached
    return len(step_magnitudes) + 1, reached


def motion_mask(motion: np.ndarray, low: float, high: float) -> np.ndarray:
    """0 where the scene is still, 1 where it moves: the motion magnitude scaled between
    ``low`` and ``high`` times its 99th percentile."""
    reference = float(np.percentile(motion, 99))
    if reference < 1e-3:  # nothing moves: keep the sharp frame everywhere
        return np.zeros_like(motion, dtype=np.float32)
    scaled = (motion - low * reference) / ((high - low) * reference)
    return np.clip(scaled, 0.0, 1.0).astype(np.float32)


def change_mask(images: list[np.ndarray], reference: np.ndarray, low: float = 0.05,
                high: float = 0.15) -> np.ndarray:
    """0 where every aligned frame agrees with ``reference``, 1 where some frame differs
    by ``high`` or more: things too small or too fast for optical flow (a thin light, a
    spark) still change the pixels they cross."""
    gray = cv2.cvtColor(reference, cv2.COLOR_RGB2GRAY)
    change = np.zeros_like(gray)
    for image in images:
        change = np.maximum(change, np.abs(cv2.cvtColor(image, cv2.COLOR_RGB2GRAY) - gray))
    return np.clip((change - low) / (high - low), 0.0, 1.0)


def guided_filter(guide: np.ndarray, source: np.ndarray, radius: int, eps: float
                  ) -> np.ndarray:
    """He et al.'s guided filter (gray guide): smooths ``source`` while keeping the
    guide's edges, so the mask hugs the subject's outline."""
    size = (2 * radius + 1, 2 * radius + 1)

    def box(x: np.ndarray) -> np.ndarray:
        return cv2.boxFilter(x, -1, size, borderType=cv2.BORDER_REFLECT)

    mean_i, mean_p = box(guide), box(source)
    cov_ip = box(guide * source) - mean_i * mean_p
    var_i = box(guide * guide) - mean_i * mean_i
    a = cov_ip / (var_i + eps)
    b = mean_p - a * mean_i
    return box(a) * guide + box(b)


# --- the stages ---------------------------------------------------------------------------


@dataclass
class Frames:
    images: list[np.ndarray]  # float32 RGB in [0, 1]
    bits: int  # 8 or 16: what the output keeps
    source: str
    warnings: list[str] = field(default_factory=list)


def load_frames(job: JobContext, max_frames: int) -> Frames:
    paths = [job.inputs_dir / name for name in job.spec.inputs]
    if not paths:
        raise JobError("a long_exposure job needs a clip, a zip of a burst, or several images")
    suffixes = {p.suffix.lower() for p in paths}
    if len(paths) == 1 and suffixes <= set(media.VIDEO_SUFFIXES):
        raw = media.read_video(paths[0], max_frames).frames
        source = f"clip {paths[0].name}"
    elif len(paths) == 1 and suffixes <= set(media.BURST_SUFFIXES):
        raw = media.read_burst(paths[0], max_frames)
        source = f"burst {paths[0].name}"
    elif suffixes <= set(media.IMAGE_SUFFIXES):
        raw = [media.read_image(p) for p in sorted(paths)[:max_frames]]
        source = f"{len(raw)} images"
    else:
        raise JobError("give one clip, one zip of a burst, or two or more images — not a mix")
    if len(raw) < 2:
        raise JobError(f"the {source} has {len(raw)} frame; a long exposure needs at least 2")
    shapes = {image.shape[:2] for image in raw}
    if len(shapes) > 1:
        raise JobError(f"the frames differ in size ({sorted(shapes)}); a burst must share one")
    warnings = []
    if any(image.shape[2] == 4 for image in raw):
        warnings.append("the alpha channel was dropped: a long exposure is opaque")
    bits = 16 if any(image.dtype == np.uint16 for image in raw) else 8
    return Frames([media.to_float(image[..., :3]) for image in raw], bits, source, warnings)


def _gray_small(image: np.ndarray, max_side: int) -> tuple[np.ndarray, float]:
    scale = min(1.0, max_side / max(image.shape[:2]))
    gray = cv2.cvtColor((image * 255).astype(np.uint8), cv2.COLOR_RGB2GRAY)
    if scale < 1.0:
        gray = cv2.resize(gray, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
    return gray, scale


def _feature_mask(shape: tuple[int, int], mode: str) -> np.ndarray | None:
    if mode != "background_blur":
        return None
    mask = np.zeros(shape, np.uint8)
    h, w = shape
    mask[h // 4: 3 * h // 4, w // 4: 3 * w // 4] = 255  # the subject a panning shot follows
    return mask


def estimate_homography(base: np.ndarray, frame: np.ndarray, mode: str
                        ) -> tuple[np.ndarray | None, str]:
    """The homography taking ``frame`` onto ``base``, by features (RANSAC) or ECC."""
    base_gray, scale = _gray_small(base, ALIGN_MAX_SIDE)
    frame_gray, _ = _gray_small(frame, ALIGN_MAX_SIDE)
    mask = _feature_mask(base_gray.shape, mode)
    orb = cv2.ORB_create(nfeatures=4000)
    kp_base, des_base = orb.detectAndCompute(base_gray, mask)
    kp_frame, des_frame = orb.detectAndCompute(frame_gray, mask)
    if des_base is not None and des_frame is not None and len(kp_base) >= 8:
        matcher = cv2.BFMatcher(cv2.NORM_HAMMING)
        pairs = matcher.knnMatch(des_frame, des_base, k=2)
        good = [m for m, *rest in pairs if rest and m.distance < 0.75 * rest[0].distance]
        if len(good) >= 20:
            src = np.float32([kp_frame[m.queryIdx].pt for m in good])
            dst = np.float32([kp_base[m.trainIdx].pt for m in good])
            homography, inliers = cv2.findHomography(src, dst, cv2.RANSAC, 2.0)
            if homography is not None and int(inliers.sum()) >= 15:
                return _rescale(homography, scale), "features"
    try:
        warp = np.eye(3, dtype=np.float32)
        criteria = (cv2.TERM_CRITERIA_EPS | cv2.TERM_CRITERIA_COUNT, 100, 1e-5)
        _, warp = cv2.findTransformECC(base_gray, frame_gray, warp, cv2.MOTION_HOMOGRAPHY,
                                       criteria, mask, 5)
        # ECC gives the map from base to frame coordinates; we need frame → base.
        return _rescale(np.linalg.inv(warp), scale), "ecc"
    except cv2.error:
        return None, "none"


def _rescale(homography: np.ndarray, scale: float) -> np.ndarray:
    to_small = np.diag([scale, scale, 1.0])
    return np.linalg.inv(to_small) @ homography @ to_small


def _near_identity(homography: np.ndarray, shape: tuple[int, int]) -> bool:
    h, w = shape
    corners = np.float32([[0, 0], [w, 0], [0, h], [w, h]]).reshape(-1, 1, 2)
    moved = cv2.perspectiveTransform(corners, homography.astype(np.float64))
    return float(np.abs(moved - corners).max()) < IDENTITY_TOLERANCE_PX


def _mismatch(base: np.ndarray, frame: np.ndarray) -> float:
    return float(np.mean(np.abs(cv2.cvtColor(base, cv2.COLOR_RGB2GRAY)
                                - cv2.cvtColor(frame, cv2.COLOR_RGB2GRAY))))


def align(images: list[np.ndarray], mode: str, job: JobContext) -> dict[str, int]:
    """Warp every frame onto the first, in place. Returns how each frame was aligned.

    A warp is kept only if it makes the frame agree better with the base: a tripod
    burst needs none, and resampling it would only soften it.
    """
    methods = {"features": 0, "ecc": 0, "identity": 0, "none": 0}
    h, w = images[0].shape[:2]
    for index in range(1, len(images)):
        job.progress("align", 10 + 20 * index / len(images), f"frame {index + 1}")
        homography, method = estimate_homography(images[0], images[index], mode)
        if homography is None or _near_identity(homography, (h, w)):
            methods["identity" if homography is not None else "none"] += 1
            continue
        warped = cv2.warpPerspective(images[index], homography, (w, h),
                                     flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
        if _mismatch(images[0], warped) < 0.95 * _mismatch(images[0], images[index]):
            images[index] = warped
            methods[method] += 1
        else:
            methods["identity"] += 1
    return methods


def dense_flow(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """DIS optical flow from ``a`` to ``b`` in full-resolution pixels (H×W×2)."""
    gray_a, scale = _gray_small(a, FLOW_MAX_SIDE)
    gray_b, _ = _gray_small(b, FLOW_MAX_SIDE)
    dis = cv2.DISOpticalFlow_create(cv2.DISOPTICAL_FLOW_PRESET_MEDIUM)
    flow = dis.calc(gray_a, gray_b, None)
    if scale < 1.0:
        flow = cv2.resize(flow, (a.shape[1], a.shape[0]), interpolation=cv2.INTER_LINEAR)
        flow /= scale
    return flow


def _warp(image: np.ndarray, grid: np.ndarray, displacement: np.ndarray) -> np.ndarray:
    """Backward warp: out(x) = image(x + displacement(x))."""
    coords = grid + displacement
    return cv2.remap(image, coords[..., 0], coords[..., 1], cv2.INTER_LINEAR,
                     borderMode=cv2.BORDER_REPLICATE)


def samples_for(forward: np.ndarray, requested: int | None) -> int:
    """Enough samples per gap that each step along the flow is about a pixel."""
    if requested:
        return requested
    largest = float(np.percentile(np.linalg.norm(forward, axis=2), 99.5))
    return int(np.clip(math.ceil(largest), 2, 64))


@dataclass
class Exposure:
    image: np.ndarray  # float32 RGB in [0, 1]
    swept_motion: np.ndarray  # per pixel: the largest motion that passed over it (px/gap)
    samples: list[int]  # samples per gap


def synthesize_exposure(images: list[np.ndarray], forward: list[np.ndarray],
                        backward: list[np.ndarray], samples: int | None,
                        job: JobContext) -> Exposure:
    """The long exposure of ``images``: each gap filled along the flow, accumulated in
    soft-gamma space, closed by the last frame.

    The motion magnitudes travel along the flow with the pixels, so ``swept_motion``
    marks the whole path of a moving thing, not just where the frames caught it.
    """
    h, w = images[0].shape[:2]
    grid = np.dstack(np.meshgrid(np.arange(w, dtype=np.float32),
                                 np.arange(h, dtype=np.float32)))
    total = np.zeros_like(images[0])
    swept = np.zeros((h, w), np.float32)
    count = 0
    used = []
    for gap in range(len(images) - 1):
        job.progress("blur", 50 + 40 * gap / (len(images) - 1), f"gap {gap + 1}")
        a, b = images[gap], images[gap + 1]
        motion_a = np.linalg.norm(forward[gap], axis=2)
        motion_b = np.linalg.norm(backward[gap], axis=2)
        n_samples = samples_for(forward[gap], samples)
        used.append(n_samples)
        for n, weight in enumerate(ramp_weights(n_samples)):
            t = n / n_samples
            # A point at x at time t came from x − t·F in the earlier frame and is
            # x + (1 − t)·B's way back from the later one (B: the later → earlier flow).
            back_a, back_b = -t * forward[gap], (1.0 - t) * backward[gap]
            from_a = _warp(a, grid, back_a) if t else a
            from_b = _warp(b, grid, back_b)
            total += soft_gamma(weight * from_a + (1.0 - weight) * from_b, SOFT_GAMMA_K)
            count += 1
            swept = np.maximum(swept, np.maximum(_warp(motion_a, grid, back_a),
                                                 _warp(motion_b, grid, back_b)))
    total += soft_gamma(images[-1], SOFT_GAMMA_K)
    count += 1
    return Exposure(soft_gamma(total / count, 1.0 / SOFT_GAMMA_K), swept, used)


def sharpest(images: list[np.ndarray]) -> int:
    def sharpness(image: np.ndarray) -> float:
        gray = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)
        return float(cv2.Laplacian(gray, cv2.CV_32F).var())

    return max(range(len(images)), key=lambda i: sharpness(images[i]))


# --- the entry point -----------------------------------------------------------------------


def run(job: JobContext) -> JobResult:
    options = Options.model_validate(job.spec.options)

    with job.stage("load"):
        job.progress("load", 0, "reading the frames")
        frames = load_frames(job, options.max_frames)
        for warning in frames.warnings:
            job.warn(warning)
        images = frames.images
        h, w = images[0].shape[:2]
        diagonal = math.hypot(w, h)
        job.log("frames loaded", source=frames.source, frames=len(images), width=w, height=h)

    with job.stage("align"):
        alignment = align(images, options.mode, job)

    with job.stage("flow"):
        forward, backward = [], []
        for gap in range(len(images) - 1):
            job.progress("flow", 30 + 20 * gap / (len(images) - 1), f"gap {gap + 1}")
            forward.append(dense_flow(images[gap], images[gap + 1]))
            backward.append(dense_flow(images[gap + 1], images[gap]))
        magnitudes = [np.linalg.norm(f, axis=2) for f in forward]

    percentile, fraction = options.target()
    if options.use_all_frames:
        used, reached = len(images), float(np.percentile(sum(magnitudes), percentile))
    else:
        used, reached = select_frame_count(magnitudes, percentile, fraction * diagonal)
    if reached < fraction * diagonal and not options.use_all_frames:
        job.warn(f"the trail reached {reached / diagonal:.1%} of the diagonal, short of the "
                 f"{fraction:.1%} target: give a longer clip or burst for longer trails")
    images, forward, backward = images[:used], forward[:used - 1], backward[:used - 1]

    with job.stage("blur"):
        exposure = synthesize_exposure(images, forward, backward, options.samples, job)

    with job.stage("composite"):
        job.progress("composite", 90, "keeping still parts sharp")
        sharp = images[sharpest(images)]
        mask = np.maximum(motion_mask(exposure.swept_motion, options.mask_low,
                                      options.mask_high),
                          change_mask(images, sharp))
        guide = cv2.cvtColor(sharp, cv2.COLOR_RGB2GRAY)
        radius = max(2, round(diagonal / 300))
        mask = np.clip(guided_filter(guide, mask, radius, 1e-3), 0.0, 1.0)[..., None]
        result = mask * exposure.image + (1.0 - mask) * sharp

    media.write_png(job.dir / OUTPUT_FILE, media.from_float(result, frames.bits))
    media.write_png(job.dir / MASK_FILE, media.from_float(np.repeat(mask, 3, axis=2), 8))
    details = {
        "mode": options.mode,
        "input": frames.source,
        "frames_given": len(frames.images),
        "frames_used": used,
        "samples_per_gap": exposure.samples,
        "alignment": alignment,
        "trail": {"percentile": percentile, "target_fraction": fraction,
                  "reached_fraction": round(reached / diagonal, 4),
                  "reached_px": round(reached, 1)},
        "mask_moving_fraction": round(float((mask > 0.5).mean()), 4),
        "output": {"file": OUTPUT_FILE, "width": w, "height": h, "bits": frames.bits},
    }
    images_for_report = {"result": media.from_float(result, 8),
                         "motion mask": media.from_float(np.repeat(mask, 3, axis=2), 8)}
    reports.write_still(job, options.model_dump(), details, images_for_report,
                       title="Long exposure")
    job.progress("composite", 100, f"{used} frames → {OUTPUT_FILE}")
    return JobResult(primary=OUTPUT_FILE)
