"""Duration → frames for the diffusers render backend: how many frames the model makes
at its native rate, in how many generations of at most ``max_frames`` (a family's
frames come as ``step·k + 1``), and the nearest size it accepts. The render path
(``workers.pipelines.diffusion``) joins the generations in order and resamples them to
the job's rate by taking, for each output frame, the generated frame nearest in time
(frames are dropped or repeated, never blended, so nothing ghosts).
"""

from __future__ import annotations

import math


def valid_frames_at_least(count: int, step: int) -> int:
    """The smallest ``step·k + 1`` (k ≥ 1) that is at least ``count``."""
    return step * max(1, math.ceil((count - 1) / step)) + 1


def valid_frames_at_most(count: int, step: int) -> int:
    """The largest ``step·k + 1`` (k ≥ 1) that is at most ``count``."""
    return step * max(1, (count - 1) // step) + 1


def native_frames_needed(frames: int, fps: int, native_fps: int) -> int:
    """Native frames covering ``frames`` output frames: up to the one nearest in time to
    the last output frame."""
    return round((frames - 1) * native_fps / fps) + 1


def plan_generations(needed: int, max_frames: int, step: int, first_conditioned: bool,
                     chained: bool) -> list[int]:
    """Frame counts of the generations that make ``needed`` new frames between them,
    each valid for the family and at most ``max_frames``, as equal as they can be.

    A generation that starts from a given frame (``first_conditioned`` for the first,
    ``chained`` for the rest) repeats that frame first, so it brings one frame less.
    """
    largest = valid_frames_at_most(max_frames, step)
    first_gain = largest - first_conditioned
    later_gain = largest - chained
    count = 1 + max(0, math.ceil((needed - first_gain) / later_gain))
    plan, remaining = [], needed
    for index in range(count):
        conditioned = first_conditioned if index == 0 else chained
        share = math.ceil(remaining / (count - index))
        frames = min(largest, valid_frames_at_least(share + conditioned, step))
        plan.append(frames)
        remaining -= frames - conditioned
    return plan


def generation_size(width: int, height: int, multiple: int) -> tuple[int, int]:
    """The size nearest to ``width × height`` that the model accepts (halves round up)."""
    return (max(multiple, math.floor(width / multiple + 0.5) * multiple),
            max(multiple, math.floor(height / multiple + 0.5) * multiple))
