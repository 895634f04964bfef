"""Joining scenes: a cut, a crossfade, or a fade through black at each seam.

The joined video is exactly as long as the scenes together, frame for frame, so
subtitles and music stay where the storyboard put them. A transition is therefore
centred on the cut rather than overlapping the scenes (which would shorten the
video): over a crossfade the outgoing shot holds its last frame once the cut has
passed, and the incoming shot holds its first frame until then. Within a fade each
frame is that blend, so the hold reads as the shot settling, not as a freeze.
"""

from __future__ import annotations

import bisect
import itertools

import cv2
import numpy as np
from moviepy import VideoClip

from workers.pipelines.video_settings import Transition


def join(scenes: list[VideoClip], transition: Transition, seconds: float) -> VideoClip:
    """One clip of ``scenes`` in order, with ``transition`` lasting ``seconds`` at each
    seam (shortened if a scene is too short to give half of it on both sides)."""
    fps = scenes[0].fps
    counts = [round(scene.duration * fps) for scene in scenes]
    starts = [0, *itertools.accumulate(counts)]
    half = 0 if transition == "cut" else min(round(seconds * fps / 2), min(counts) // 2)

    def scene_frame(scene: int, index: int) -> np.ndarray:
        held = min(max(index, 0), counts[scene] - 1)  # before its start or after its end
        return scenes[scene].get_frame(held / fps)

    def frame_at(t: float) -> np.ndarray:
        frame = round(t * fps)
        scene = min(bisect.bisect_right(starts, frame) - 1, len(scenes) - 1)
        # The seam this frame is nearest to, as the index of the scene after it.
        seam = scene + 1 if frame - starts[scene] >= counts[scene] / 2 else scene
        if half == 0 or seam in (0, len(scenes)) or abs(frame + 0.5 - starts[seam]) > half:
            return scene_frame(scene, frame - starts[scene])
        # 0 at the window's first frame, 1 after its last; 0.5 right at the seam.
        progress = (frame + 0.5 - (starts[seam] - half)) / (2 * half)
        outgoing = scene_frame(seam - 1, frame - starts[seam - 1])
        incoming = scene_frame(seam, frame - starts[seam])
        if transition == "fade":
            shown = outgoing if progress < 0.5 else incoming
            return cv2.convertScaleAbs(shown, alpha=abs(1 - 2 * progress))
        return cv2.addWeighted(outgoing, 1 - progress, incoming, progress, 0)

    return VideoClip(frame_at, duration=starts[-1] / fps).with_fps(fps)
