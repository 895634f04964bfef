"""The picture steps of post-production: looks change pixel statistics the way their
names promise, transitions keep every frame where the storyboard put it, and optical
flow makes better in-between frames than blending on a clip whose truth is known."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
from moviepy import ColorClip, ImageSequenceClip

from tests.test_post import FMT, decode, make_board, produce
from workers.pipelines import interpolate, looks, transitions
from workers.pipelines.looks import Grade, Look
from workers.pipelines.video_settings import LookConfig, LookPreset


def colourful(width: int = 160, height: int = 96, seed: int = 3) -> np.ndarray:
    """A smooth, mid-toned, many-coloured test picture."""
    rng = np.random.default_rng(seed)
    small = rng.uniform(60, 190, (height // 16 + 2, width // 16 + 2, 3)).astype(np.float32)
    return cv2.resize(small, (width, height), interpolation=cv2.INTER_CUBIC).astype(np.uint8)


def graded(look: Look, frame: np.ndarray) -> np.ndarray:
    grade = Grade(look, frame.shape[1], frame.shape[0], white_balance_reference=frame)
    return grade(frame).astype(float)


def chroma(frame: np.ndarray) -> float:
    return float(np.std(frame.astype(float), axis=2).mean())


def red_over_blue(frame: np.ndarray) -> float:
    return float(frame[..., 0].mean() / frame[..., 2].mean())


# --- looks ----------------------------------------------------------------------------------


def test_looks_move_pixel_statistics_the_promised_way() -> None:
    frame = colourful()
    base = frame.astype(float)
    assert red_over_blue(graded(Look(warmth=0.5), frame)) > red_over_blue(base) * 1.2
    assert red_over_blue(graded(Look(warmth=-0.5), frame)) < red_over_blue(base) / 1.2
    assert graded(Look(brightness=0.1), frame).mean() > base.mean() + 20
    assert graded(Look(contrast=1.5), frame).std() > base.std() * 1.3
    assert chroma(graded(Look(saturation=1.6), frame)) > chroma(base) * 1.4
    assert chroma(graded(Look(saturation=0.0), frame)) < 1.0  # greyscale

    vignetted = graded(Look(vignette=0.8), frame)
    corners = np.concatenate([vignetted[:8, :8], vignetted[-8:, -8:]])
    assert corners.mean() < 0.5 * np.concatenate([base[:8, :8], base[-8:, -8:]]).mean()
    middle = (slice(40, 56), slice(72, 88))
    assert np.abs(vignetted[middle] - base[middle]).max() <= 1

    grey = np.full((96, 160, 3), 128, np.uint8)
    sepia = graded(Look(sepia=1.0), grey)[0, 0]
    assert sepia[0] > sepia[1] > sepia[2]


def test_white_balance_neutralises_a_colour_cast() -> None:
    frame = colourful()
    cast = cv2.transform(frame, np.diag([0.8, 0.95, 1.25]))  # a blue cast
    balanced = graded(Look(white_balance=True), cast)
    spread = np.ptp(cast.reshape(-1, 3).mean(axis=0))
    assert np.ptp(balanced.reshape(-1, 3).mean(axis=0)) < spread / 3


def test_clahe_raises_local_contrast_and_denoise_lowers_noise() -> None:
    flat_detail = cv2.addWeighted(colourful(), 0.25, np.full((96, 160, 3), 128, np.uint8),
                                  0.75, 0)

    def local_contrast(image: np.ndarray) -> float:
        return float(np.abs(cv2.Laplacian(cv2.cvtColor(image.astype(np.uint8),
                                                       cv2.COLOR_RGB2GRAY), cv2.CV_32F)).mean())
    assert local_contrast(graded(Look(clahe=3.0), flat_detail)) > \
        1.3 * local_contrast(flat_detail)

    rng = np.random.default_rng(4)
    noisy = np.clip(colourful() + rng.normal(0, 12, (96, 160, 3)), 0, 255).astype(np.uint8)
    clean = colourful().astype(float)
    denoised = graded(Look(denoise=1.0), noisy)
    assert np.abs(denoised - clean).mean() < 0.8 * np.abs(noisy - clean).mean()


def test_presets_and_raw_values() -> None:
    assert set(LookPreset.__args__) == set(looks.PRESETS)  # config and code name the same
    assert looks.resolve("none").changes_nothing
    assert looks.resolve("warm") == looks.PRESETS["warm"]
    tuned = looks.resolve(LookConfig(preset="warm", vignette=0.6, saturation=1.0))
    assert tuned.vignette == 0.6 and tuned.saturation == 1.0
    assert tuned.warmth == looks.PRESETS["warm"].warmth
    frame = colourful()
    for name in ("natural", "warm", "vintage", "crisp"):
        assert np.abs(graded(looks.resolve(name), frame) - frame).mean() > 2, name


def test_a_look_reaches_the_finished_video(tmp_path) -> None:
    production, _ = produce(tmp_path, make_board(("Warm.", "", 16)), look="warm")
    frames = decode(production.video)
    assert red_over_blue(frames[8].astype(float)) > 1.15  # from a neutral grey clip


# --- transitions ----------------------------------------------------------------------------


def two_colour_scenes(fps: int = 8) -> list:
    return [ColorClip((32, 16), colour, duration=3).with_fps(fps)
            for colour in ((200, 0, 0), (0, 0, 200))]


@pytest.mark.parametrize("kind", ["cut", "crossfade", "fade"])
def test_transitions_keep_every_frame_in_place(kind) -> None:
    joined = transitions.join(two_colour_scenes(), kind, seconds=1.0)
    assert joined.duration == 6.0
    frames = np.stack([joined.get_frame(i / 8) for i in range(48)]).astype(int)
    red, blue = frames[:, 0, 0, 0], frames[:, 0, 0, 2]
    # Away from the seam (frame 24) every frame is its own scene's, untouched.
    assert (red[:20] == 200).all() and (blue[:20] == 0).all()
    assert (blue[28:] == 200).all() and (red[28:] == 0).all()
    window = slice(20, 28)  # 1 s at 8 fps, centred on the seam
    if kind == "cut":
        assert (red[:24] == 200).all() and (blue[24:] == 200).all()
    elif kind == "crossfade":
        assert (np.diff(red[window]) < 0).all() and (np.diff(blue[window]) > 0).all()
        assert (red[window] + blue[window] == pytest.approx(200, abs=2))
    else:
        assert red[23] < 30 and blue[24] < 30  # through black at the seam
        assert (np.diff(red[20:24]) < 0).all() and (np.diff(blue[24:28]) > 0).all()
        assert (blue[20:24] == 0).all() and (red[24:28] == 0).all()


@pytest.mark.parametrize("kind", ["crossfade", "fade"])
def test_transitions_keep_the_finished_videos_length(tmp_path, kind) -> None:
    board = make_board(("One.", "", 21), ("Two.", "", 19), ("Three.", "", 24))
    production, _ = produce(tmp_path, board, transition=kind, transition_duration=1.5)
    assert production.info.frames == 64  # verified by decoding, before it landed
    assert production.info.duration_s == pytest.approx(8.0)


# --- smoother motion ------------------------------------------------------------------------


def moving_pattern(width: int, height: int, frames: int, seed: int = 5) -> list[np.ndarray]:
    """A textured background panning slowly, and a textured block crossing it faster in
    another direction (so it hides and reveals the background): real motion, real
    occlusions, and every frame's truth known. Used by scripts/bench_post.py too."""
    rng = np.random.default_rng(seed)

    def texture(h: int, w: int) -> np.ndarray:
        coarse = cv2.resize(rng.random((h // 8 + 2, w // 8 + 2, 3)).astype(np.float32),
                            (w, h), interpolation=cv2.INTER_CUBIC)
        return (np.clip(0.7 * coarse + 0.3 * rng.random((h, w, 3)), 0, 1) * 255).astype(
            np.uint8)

    margin = 64
    background = texture(height + 2 * margin, width + 2 * margin)
    block = texture(height // 3, width // 4)
    result = []
    for index in range(frames):
        pan = np.float32([[1, 0, -margin + 1.25 * index], [0, 1, -margin + 0.6 * index]])
        frame = cv2.warpAffine(background, pan, (width, height), flags=cv2.INTER_LINEAR)
        speed = width / 90  # pixels per frame: 9 at 832×480
        move = np.float32([[1, 0, width * 0.1 + speed * index],
                           [0, 1, height * 0.3 + speed / 3 * index]])
        shown = cv2.warpAffine(np.full(block.shape[:2], 255, np.uint8), move, (width, height))
        moved = cv2.warpAffine(block, move, (width, height))
        alpha = shown[..., None].astype(np.float32) / 255
        result.append((frame * (1 - alpha) + moved * alpha).astype(np.uint8))
    return result


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    error = np.mean((a.astype(float) - b.astype(float)) ** 2)
    return float(10 * np.log10(255**2 / error))


def test_flow_interpolation_beats_blending_on_known_motion() -> None:
    truth = moving_pattern(256, 144, 9)
    flow, blend = [], []
    for index in range(0, 8, 2):  # keep even frames, rebuild the odd ones
        first, middle, second = truth[index], truth[index + 1], truth[index + 2]
        flow.append(psnr(interpolate.FlowPair(first, second).at(0.5), middle))
        blend.append(psnr(cv2.addWeighted(first, 0.5, second, 0.5, 0), middle))
    assert np.mean(flow) > np.mean(blend) + 6, (flow, blend)


def test_smooth_doubles_the_rate_keeps_the_length_and_the_original_frames() -> None:
    frames = moving_pattern(128, 80, 6)
    clip = ImageSequenceClip(frames, fps=8)
    smooth = interpolate.smooth(clip, 2)
    assert smooth.fps == 16 and smooth.duration == clip.duration
    made = [smooth.get_frame(i / 16) for i in range(12)]
    assert all((made[2 * i] == frames[i]).all() for i in range(6))
    assert (made[11] == frames[5]).all()  # the last frame has nothing to move towards
    between = made[3]
    assert psnr(between, frames[1]) < 40 and psnr(between, frames[2]) < 40  # new, not a copy


def test_smooth_motion_stays_within_what_players_take(tmp_path) -> None:
    fast = FMT.__class__(FMT.width, FMT.height, 40)
    production, _ = produce(tmp_path, make_board(("Fast.", "", 120), fps=40), fmt=fast,
                            smooth_motion=2)
    assert production.fps == 40 and production.info.frames == 120
    assert "smooth_motion = 2 would make 80 fps; used 1 (40 fps)" in production.degradations[0]
