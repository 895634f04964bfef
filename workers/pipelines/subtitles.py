"""Subtitles: each scene's words, timed to the scene, as .srt/.vtt files, a track in the
MP4, and (if asked) drawn into the picture.

A scene says its ``subtitle``, or its description when it has none (``subtitle = ""``
keeps it silent). Neighbouring scenes that say the same thing (one sentence filmed
from two angles) share one cue. Text longer than two lines is split into successive
cues within its scene, timed by length, so nothing is cut off and the files, the track
and the picture always show the same lines at the same frames.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from moviepy import VideoClip

from daemon import files
from daemon.storyboard import Storyboard
from workers.fonts import load_font
from workers.pipelines.overlays import Card, Overlay, wrap
from workers.pipelines.video_settings import SubtitleStyle

SRT_FILE, VTT_FILE = "subtitles.srt", "subtitles.vtt"
MAX_LINES = 2  # per cue: more is read too slowly
TEXT_HEIGHT = 0.055  # of the frame height
MIN_TEXT_PX = 12
SAFE_WIDTH = 0.86  # of the frame width, inside the title-safe area
BOTTOM_MARGIN = 0.07  # of the frame height
WHITE, BLACK = (255, 255, 255), (0, 0, 0)


@dataclass(frozen=True)
class Cue:
    """Lines shown from frame ``start`` up to (not including) frame ``end``."""

    start: int
    end: int
    lines: tuple[str, ...]

    @property
    def text(self) -> str:
        return "\n".join(self.lines)


class Layout:
    """How subtitles look at one frame size: font, size, line width, style."""

    def __init__(self, width: int, height: int, font_path: Path | None,
                 style: SubtitleStyle) -> None:
        self.width, self.height, self.style = width, height, style
        self.size = max(MIN_TEXT_PX, round(height * TEXT_HEIGHT))
        self.font = load_font(font_path, self.size)
        self.line_width = round(width * SAFE_WIDTH)

    def lines(self, text: str) -> list[str]:
        return wrap(text, self.font, self.line_width)

    def overlay(self, lines: tuple[str, ...]) -> Overlay:
        """The lines centred above the bottom margin, with an outline or on a box."""
        line_height = round(self.size * 1.3)
        pad = max(2, round(self.size * 0.3))  # room for the outline or the box's edge
        widths = [round(self.font.getlength(line)) for line in lines]
        card_width = min(self.width, max(widths) + 2 * pad)
        card_height = len(lines) * line_height + 2 * pad
        card = Card(card_width, card_height)
        if self.style == "box":
            backing = card.layer(BLACK, 0.6)
            for row, line_width in enumerate(widths):
                left = (card_width - line_width) // 2 - pad
                top = row * line_height + pad // 2
                backing.rounded_rectangle((left, top, left + line_width + 2 * pad - 1,
                                           top + line_height + pad - 1), radius=pad, fill=255)
        outline = card.layer(BLACK, 0.85) if self.style == "outline" else None
        text = card.layer(WHITE)
        stroke = max(1, round(self.size / 10))
        for row, (line, line_width) in enumerate(zip(lines, widths, strict=True)):
            position = ((card_width - line_width) / 2, pad + row * line_height)
            if outline is not None:
                outline.text(position, line, font=self.font, fill=255,
                             stroke_width=stroke, stroke_fill=255)
            text.text(position, line, font=self.font, fill=255)
        top = self.height - round(self.height * BOTTOM_MARGIN) - card_height
        return card.overlay(max(0, top), (self.width - card_width) // 2)


def cues_for(board: Storyboard, layout: Layout) -> list[Cue]:
    """The storyboard's subtitles as cues, in frames of the storyboard's rate."""
    spans: list[tuple[int, int, str]] = []  # (start, end, text) per run of scenes
    start = 0
    for scene in board.scenes:
        text = scene.description if scene.subtitle is None else scene.subtitle
        end = start + scene.frames
        if spans and spans[-1][2] == text and spans[-1][1] == start:
            spans[-1] = (spans[-1][0], end, text)
        else:
            spans.append((start, end, text))
        start = end
    cues: list[Cue] = []
    for span_start, span_end, text in spans:
        lines = layout.lines(text)
        if lines:
            cues += _split(span_start, span_end, lines)
    return cues


def _split(start: int, end: int, lines: list[str]) -> list[Cue]:
    """Cues of at most ``MAX_LINES`` lines each, sharing the span by their length."""
    groups = [tuple(lines[i:i + MAX_LINES]) for i in range(0, len(lines), MAX_LINES)]
    lengths = np.cumsum([sum(len(line) for line in group) for group in groups])
    cuts = [start] + [start + round((end - start) * done / lengths[-1]) for done in lengths]
    return [Cue(first, last, group)
            for first, last, group in zip(cuts[:-1], cuts[1:], groups, strict=True)
            if last > first]


def write_files(cues: list[Cue], fps: int, directory: Path) -> list[Path]:
    """``subtitles.srt`` and ``subtitles.vtt`` in ``directory``; returns their paths."""
    srt = "".join(f"{number}\n{_timestamp(cue.start, fps, ',')} --> "
                  f"{_timestamp(cue.end, fps, ',')}\n{cue.text}\n\n"
                  for number, cue in enumerate(cues, start=1))
    vtt = "WEBVTT\n\n" + "".join(f"{_timestamp(cue.start, fps, '.')} --> "
                                 f"{_timestamp(cue.end, fps, '.')}\n{cue.text}\n\n"
                                 for cue in cues)
    paths = [directory / SRT_FILE, directory / VTT_FILE]
    for path, text in zip(paths, (srt, vtt), strict=True):
        files.write_text(path, text)
    return paths


def _timestamp(frame: int, fps: int, separator: str) -> str:
    milliseconds = round(frame * 1000 / fps)
    hours, rest = divmod(milliseconds, 3_600_000)
    minutes, rest = divmod(rest, 60_000)
    seconds, milliseconds = divmod(rest, 1000)
    return f"{hours:02d}:{minutes:02d}:{seconds:02d}{separator}{milliseconds:03d}"


def burn(clip: VideoClip, cues: list[Cue], layout: Layout, cue_fps: int) -> VideoClip:
    """``clip`` with each cue drawn over the frames it covers (``cue_fps`` is the rate
    the cues are counted in; the clip may run faster)."""
    overlays = [layout.overlay(cue.lines) for cue in cues]

    def draw(get_frame: Callable[[float], np.ndarray], t: float) -> np.ndarray:
        frame = get_frame(t)
        # The frame index at the cues' rate; +1e-6 keeps 1/3-second steps from rounding down.
        index = int(t * cue_fps + 1e-6)
        for cue, overlay in zip(cues, overlays, strict=True):
            if cue.start <= index < cue.end:
                frame = np.array(frame)  # the decoder's buffer may be read-only
                overlay.apply(frame)
                break
        return frame

    return clip.transform(draw)
