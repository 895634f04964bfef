"""Text and boxes drawn once with Pillow, then composited onto many frames.

Used by the animatic (title card, scene label) and by post-production (subtitles).
Drawing text costs milliseconds; compositing a ready overlay costs a fraction of one,
so each piece of text is drawn once and laid over every frame that shows it.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass

import cv2
import numpy as np
from PIL import Image, ImageDraw, ImageFont

from daemon.text import CJK

Font = ImageFont.FreeTypeFont | ImageFont.ImageFont
Colour = tuple[int, int, int]


@dataclass(frozen=True)
class Overlay:
    """A premultiplied RGB layer and its coverage, placed at a fixed spot in the frame."""

    top: int
    left: int
    premultiplied: np.ndarray  # h × w × 3 uint8
    inverse_alpha: np.ndarray  # h × w × 3 uint8: 255 - alpha

    @property
    def rows(self) -> slice:
        return slice(self.top, self.top + self.premultiplied.shape[0])

    @property
    def columns(self) -> slice:
        return slice(self.left, self.left + self.premultiplied.shape[1])

    def apply(self, frame: np.ndarray, strength: float = 1.0) -> None:
        """Composite onto ``frame`` in place; ``strength`` < 1 fades the overlay."""
        region = frame[self.rows, self.columns]
        # On a very small frame an overlay may overhang its edge: what is outside is cut.
        height, width = region.shape[:2]
        premultiplied = self.premultiplied[:height, :width]
        inverse_alpha = self.inverse_alpha[:height, :width]
        if strength >= 1.0:
            over(region, premultiplied, inverse_alpha)
            return
        faded_alpha = (255 - inverse_alpha.astype(np.float32)) * strength
        over(region, (premultiplied * strength).astype(np.uint8),
             (255 - faded_alpha).astype(np.uint8))


def over(base: np.ndarray, premultiplied: np.ndarray, inverse_alpha: np.ndarray) -> None:
    """Composite a premultiplied layer over ``base`` in place (saturating uint8 math)."""
    cv2.add(cv2.multiply(base, inverse_alpha, scale=1 / 255), premultiplied, dst=base)


@dataclass
class Card:
    """Boxes and text drawn as coverage masks, each with one colour, then flattened
    into an ``Overlay`` (later layers on top)."""

    width: int
    height: int

    def __post_init__(self) -> None:
        self.layers: list[tuple[Image.Image, Colour, float]] = []

    def layer(self, colour: Colour, opacity: float = 1.0) -> ImageDraw.ImageDraw:
        mask = Image.new("L", (self.width, self.height))
        self.layers.append((mask, colour, opacity))
        return ImageDraw.Draw(mask)

    def overlay(self, top: int, left: int) -> Overlay:
        colour_sum = np.zeros((self.height, self.width, 3), np.float32)
        alpha = np.zeros((self.height, self.width, 1), np.float32)
        for mask, colour, opacity in self.layers:
            coverage = np.asarray(mask, np.float32)[..., None] / 255 * opacity
            colour_sum = colour_sum * (1 - coverage) + np.array(colour, np.float32) * coverage
            alpha = alpha * (1 - coverage) + coverage
        return Overlay(top, left, np.round(colour_sum).astype(np.uint8),
                       np.repeat(np.round(255 - alpha * 255).astype(np.uint8), 3, axis=2))


# --- line breaking ------------------------------------------------------------------------

# Punctuation that must not start a line (CJK typesetting), kept on the line before.
_NO_LINE_START = set("，。、；：！？）」』》〉】,.;:!?)]}%…")
_TOKENS = re.compile(rf"\s+|{CJK.pattern}|[^\s{CJK.pattern[1:-1]}]+")


def wrap(text: str, font: Font, max_width: int, max_lines: int | None = None) -> list[str]:
    """Greedy line breaking: between words, or between any two CJK characters (CJK has
    no spaces). With ``max_lines``, a line that would overflow it ends with "…"."""
    lines: list[str] = []
    line = ""
    for token in _split_long_words(_TOKENS.findall(" ".join(text.split())), font, max_width):
        if token.isspace():
            line += " " if line else ""
            continue
        if not line or font.getlength(line + token) <= max_width or token in _NO_LINE_START:
            line += token
        else:
            lines.append(line.rstrip())
            line = token
    if line.strip():
        lines.append(line.rstrip())
    if max_lines is None or len(lines) <= max_lines:
        return lines
    last = lines[max_lines - 1]
    while last and font.getlength(last + "…") > max_width:
        last = last[:-1]
    return [*lines[:max_lines - 1], last.rstrip() + "…"]


def _split_long_words(tokens: list[str], font: Font, max_width: int) -> Iterator[str]:
    for token in tokens:
        if font.getlength(token) <= max_width:
            yield token
        else:  # a word wider than the line (a URL, say) breaks between characters
            yield from token
