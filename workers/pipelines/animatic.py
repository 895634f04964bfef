"""The ``animatic`` render backend: a storyboard you can watch, with no model weights.

Each scene becomes a clip of exactly its frame count: a backdrop derived from the
scene's words and the seed (a two-colour gradient under soft shapes, on two layers
that move at different speeds, so the camera move reads as depth), the camera move
its ``camera`` asks for, a small scene label ("2/5 · close up") as on a storyboard
panel, and on the first scene a title card that fades out.

The scene's words are not drawn here: post-production shows them as subtitles, the
same way for every render backend, with the soft subtitle track and .srt/.vtt files
saying exactly what the picture shows (and nothing drawn twice).

Everything costly happens once per scene (backdrop layers, text drawn with PIL);
each frame is two ``cv2.warpAffine`` calls and a few saturating blends.

Clips are kept as ``scenes/scene_NN-<key>.mp4``, where the key covers everything
that affects their pixels, so a job that restarts reuses what it already rendered.
"""

from __future__ import annotations

import colorsys
import hashlib
import json
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import cv2
import numpy as np

from daemon import files
from daemon.storyboard import Camera, Storyboard, StoryboardScene
from workers import media
from workers.context import JobContext
from workers.fonts import covers, load_font
from workers.pipelines import encode
from workers.pipelines.overlays import Card, Overlay, over, wrap

RENDERER_VERSION = 2  # bump when the look changes, so kept clips are re-rendered
SCENES_DIR = "scenes"
CANVAS_SCALE = 1.4  # layers are this much larger than the frame: room to pan and pull out
FAR_DEPTH, NEAR_DEPTH = 0.45, 1.0  # how strongly each layer follows the camera
TITLE_HOLD_S, TITLE_FADE_S = 0.5, 1.0
THUMBNAIL_WIDTH = 240
PROGRESS_EVERY = 8  # frames between progress reports (each also checks for cancel)
WHITE = (255, 255, 255)


@dataclass(frozen=True)
class SceneClip:
    path: Path
    thumbnail: Path  # a small JPEG of the middle frame, for the report


def render_scene(
    job: JobContext,
    board: Storyboard,
    scene: StoryboardScene,
    fmt: encode.VideoFormat,
    font_path: Path | None,
    on_frames: Callable[[int], None],
) -> SceneClip:
    """Render ``scene`` to its clip, or reuse the clip a previous run left.

    ``on_frames(done)`` is called every few frames with the frames done so far; it may
    raise (a cancel), which abandons the clip without leaving half of it behind.
    """
    key = clip_key(board, scene, fmt, font_path)
    path = job.dir / SCENES_DIR / f"scene_{scene.number:02d}-{key}.mp4"
    thumbnail = path.with_suffix(".jpg")
    if path.is_file() and thumbnail.is_file():
        job.log("reusing scene clip", scene=scene.number, clip=path.name)
        on_frames(scene.frames)
        return SceneClip(path, thumbnail)

    renderer = SceneRenderer(board, scene, fmt, font_path)
    with files.atomic_path(path) as tmp, encode.clip_writer(tmp, fmt) as write:
        for index in range(scene.frames):
            frame = renderer.frame(index)
            write(frame)
            if index == scene.frames // 2:
                # The thumbnail lands before the clip, so a kept clip always has one.
                files.write_bytes(thumbnail, thumbnail_jpeg(frame))
            if (index + 1) % PROGRESS_EVERY == 0:
                on_frames(index + 1)
    on_frames(scene.frames)
    job.log("rendered scene clip", scene=scene.number, clip=path.name, frames=scene.frames)
    return SceneClip(path, thumbnail)


def remove_stale_clips(job_dir: Path, keep: list[SceneClip]) -> None:
    """Delete clips of earlier storyboards or settings, which can never be used again."""
    kept = {clip.path.name for clip in keep} | {clip.thumbnail.name for clip in keep}
    for path in (job_dir / SCENES_DIR).glob("scene_*"):
        if path.name not in kept:
            path.unlink(missing_ok=True)


def clip_key(
    board: Storyboard, scene: StoryboardScene, fmt: encode.VideoFormat, font_path: Path | None
) -> str:
    """A short hash of everything that affects a clip's pixels and bytes."""
    font = f"{font_path}:{font_path.stat().st_size}" if font_path else "PIL default"
    inputs = {
        "renderer": RENDERER_VERSION,
        "encoder": encode.ENCODER_ID,
        "format": asdict(fmt),
        "scene": scene.model_dump(mode="json"),
        "scene_count": len(board.scenes),  # shown on the slate
        "title": board.title if scene.number == 1 else None,
        "style": board.style,
        "seed": board.seed,
        "font": font,
    }
    encoded = json.dumps(inputs, sort_keys=True, ensure_ascii=False).encode()
    return hashlib.sha256(encoded).hexdigest()[:12]


def thumbnail_jpeg(frame: np.ndarray) -> bytes:
    """The scene's thumbnail for reports and digests."""
    return media.jpeg_bytes(frame, THUMBNAIL_WIDTH)


# --- one scene, frame by frame ----------------------------------------------------------


class SceneRenderer:
    """Pre-renders a scene's layers and text; ``frame(i)`` composites frame ``i``."""

    def __init__(
        self,
        board: Storyboard,
        scene: StoryboardScene,
        fmt: encode.VideoFormat,
        font_path: Path | None,
    ) -> None:
        self.scene = scene
        self.fmt = fmt
        digest = hashlib.sha256(f"{board.seed}\n{board.style}\n{scene.description}".encode())
        rng = np.random.default_rng(int.from_bytes(digest.digest()[:8], "big"))
        self.direction = 1 if rng.random() < 0.5 else -1  # which way the camera travels
        self.far, self.near = backdrop_layers(rng, fmt.width, fmt.height)
        self.slate = slate_overlay(f"{scene.number}/{len(board.scenes)} · {scene.camera}",
                                   fmt, font_path)
        # A title the font cannot draw is left out rather than shown as empty boxes.
        self.title = (title_overlay(board.title, board.style, fmt, font_path)
                      if scene.number == 1 and covers(font_path, board.title + board.style)
                      else None)

    def frame(self, index: int) -> np.ndarray:
        width, height = self.fmt.width, self.fmt.height
        progress = index / max(1, self.scene.frames - 1)
        zoom, dx, dy = camera_move(self.scene.camera, progress, self.direction)
        frame = cv2.warpAffine(self.far, _layer_matrix(zoom, dx, dy, FAR_DEPTH, self.far.shape,
                                                       width, height),
                               (width, height), flags=cv2.INTER_LINEAR,
                               borderMode=cv2.BORDER_REFLECT)
        near = cv2.warpAffine(self.near, _layer_matrix(zoom, dx, dy, NEAR_DEPTH, self.near.shape,
                                                       width, height),
                              (width, height), flags=cv2.INTER_LINEAR,
                              borderMode=cv2.BORDER_CONSTANT, borderValue=0)
        alpha = near[:, :, 3]
        over(frame, near[:, :, :3], cv2.merge([255 - alpha] * 3))
        if self.title is not None:
            seconds = index / self.fmt.fps
            strength = 1.0 - (seconds - TITLE_HOLD_S) / TITLE_FADE_S
            if strength > 0:
                self.title.apply(frame, min(1.0, strength))
        self.slate.apply(frame)
        return frame


def camera_move(camera: Camera, progress: float, direction: int) -> tuple[float, float, float]:
    """(zoom, x shift, y shift as fractions of the frame) at ``progress`` 0..1 of the shot."""
    p = progress
    if camera == "close up":  # slow push-in
        return 1.0 + 0.25 * p, 0.0, 0.0
    if camera == "medium shot":  # gentle push and a drift
        return 1.04 + 0.12 * p, direction * (0.06 * p - 0.03), 0.015 - 0.03 * p
    if camera == "aerial view":  # pull out while tilting down
        return 1.3 - 0.3 * p, 0.0, direction * (0.1 * p - 0.05)
    return 1.05, direction * (0.12 * p - 0.06), 0.0  # wide shot: slow pan


def _layer_matrix(zoom: float, dx: float, dy: float, depth: float, shape: tuple[int, ...],
                  width: int, height: int) -> np.ndarray:
    # Nearer layers zoom and travel more than far ones: that difference reads as depth.
    scale = 1.0 + (zoom - 1.0) * depth
    center_x = shape[1] / 2 + dx * depth * width
    center_y = shape[0] / 2 + dy * depth * height
    return np.array([[scale, 0.0, width / 2 - scale * center_x],
                     [0.0, scale, height / 2 - scale * center_y]])


# --- backdrop ------------------------------------------------------------------------------


def backdrop_layers(rng: np.random.Generator, width: int, height: int
                    ) -> tuple[np.ndarray, np.ndarray]:
    """A far layer (RGB: gradient, large soft shapes, fine grain) and a near layer (RGBA,
    premultiplied: a few soft discs), both ``CANVAS_SCALE`` times the frame size."""
    canvas_w, canvas_h = round(width * CANVAS_SCALE), round(height * CANVAS_SCALE)
    # Soft things are drawn small and scaled up: blur for free.
    small_w, small_h = max(16, canvas_w // 4), max(16, canvas_h // 4)
    hue = rng.random()
    light = _hsv(hue + rng.uniform(0.06, 0.22), rng.uniform(0.35, 0.6), rng.uniform(0.7, 0.85))
    dark = _hsv(hue, rng.uniform(0.5, 0.8), rng.uniform(0.18, 0.32))

    angle = rng.uniform(0, 2 * np.pi)
    ys, xs = np.mgrid[0:small_h, 0:small_w].astype(np.float32)
    ramp = xs / small_w * np.cos(angle) + ys / small_h * np.sin(angle)
    ramp = (ramp - ramp.min()) / max(1e-6, np.ptp(ramp))
    far = dark * (1 - ramp[..., None]) + light * ramp[..., None]
    for _ in range(rng.integers(3, 6)):
        mask = np.zeros((small_h, small_w), np.float32)
        center = (int(rng.uniform(0, small_w)), int(rng.uniform(0, small_h)))
        axes = (int(rng.uniform(0.12, 0.35) * small_w), int(rng.uniform(0.1, 0.3) * small_h))
        cv2.ellipse(mask, center, axes, rng.uniform(0, 180), 0, 360, 1.0, -1)
        mask = cv2.GaussianBlur(mask, (0, 0), max(axes) / 3 + 1)[..., None]
        tone = light if rng.random() < 0.5 else dark
        far = far * (1 - 0.45 * mask) + tone * 0.45 * mask
    far = cv2.resize(far, (canvas_w, canvas_h), interpolation=cv2.INTER_LINEAR)
    grain = rng.normal(0, 2.0, (canvas_h, canvas_w, 1)).astype(np.float32)  # hides banding
    far_layer = np.clip(far * 255 + grain, 0, 255).astype(np.uint8)

    near = np.zeros((small_h, small_w, 4), np.float32)
    for _ in range(rng.integers(4, 8)):
        disc = np.zeros((small_h, small_w), np.float32)
        center = (int(rng.uniform(0, small_w)), int(rng.uniform(0, small_h)))
        radius = int(rng.uniform(0.03, 0.09) * small_w) + 1
        cv2.circle(disc, center, radius, 1.0, -1)
        disc = cv2.GaussianBlur(disc, (0, 0), radius / 4 + 0.5) * rng.uniform(0.3, 0.6)
        colour = light * rng.uniform(1.0, 1.2)
        near[..., :3] = near[..., :3] * (1 - disc[..., None]) + colour * disc[..., None]
        near[..., 3] = near[..., 3] * (1 - disc) + disc
    near = cv2.resize(near, (canvas_w, canvas_h), interpolation=cv2.INTER_LINEAR)
    near_layer = np.clip(near * 255, 0, 255).astype(np.uint8)
    return far_layer, near_layer


def _hsv(hue: float, saturation: float, value: float) -> np.ndarray:
    return np.array(colorsys.hsv_to_rgb(hue % 1.0, saturation, value), np.float32)


# --- text ------------------------------------------------------------------------------------


def slate_overlay(label: str, fmt: encode.VideoFormat, font_path: Path | None) -> Overlay:
    """A small "2/5 · close up" tag in the top-left corner, as on a storyboard panel."""
    size = max(9, round(fmt.height * 0.035))
    font = load_font(font_path, size)
    pad = max(3, size // 2)
    width = min(fmt.width, round(font.getlength(label)) + 2 * pad)
    height = round(size * 1.3) + pad
    card = Card(width, height)
    card.layer((0, 0, 0), 0.45).rounded_rectangle((0, 0, width - 1, height - 1),
                                                  radius=pad, fill=255)
    card.layer(WHITE, 0.9).text((pad, pad // 2), label, font=font, fill=255)
    margin = round(fmt.height * 0.04)
    return card.overlay(margin, margin)


def title_overlay(title: str, style: str, fmt: encode.VideoFormat,
                  font_path: Path | None) -> Overlay:
    """The storyboard title (and style) centred on a dark veil over the whole frame."""
    size = max(12, round(fmt.height * 0.085))
    small = max(9, round(size * 0.5))
    title_font, style_font = load_font(font_path, size), load_font(font_path, small)
    text_width = round(fmt.width * 0.8)
    lines = [(line, title_font, size) for line in wrap(title, title_font, text_width, 2)]
    if style:
        lines += [(line, style_font, small) for line in wrap(style, style_font, text_width, 1)]
    heights = [round(line_size * 1.35) for _, _, line_size in lines]
    card = Card(fmt.width, fmt.height)
    card.layer((0, 0, 0), 0.6).rectangle((0, 0, fmt.width, fmt.height), fill=255)
    draw = card.layer(WHITE)
    y = (fmt.height - sum(heights)) / 2
    for (line, font, _), line_height in zip(lines, heights, strict=True):
        x = (fmt.width - font.getlength(line)) / 2
        draw.text((x, y), line, font=font, fill=255)
        y += line_height
    return card.overlay(0, 0)
