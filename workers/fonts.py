"""Find a font that can draw a video's text (subtitles, titles), on a machine with no
fonts set up, whatever the script.

Order: ``[video] font`` from the config, the Noto Sans CJK that ships as a Python
dependency, a font fontconfig finds for the text's characters, DejaVu Sans, and last
PIL's built-in font. The first candidate that covers the text wins. If none does, the
first one found is used for what it can draw, and the caller gets a warning: text the
font cannot draw is left out of the picture rather than drawn as empty boxes.
"""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from daemon.jobs import JobError
from daemon.text import CJK

BUNDLED_PACKAGE = "cvttf_NotoSansCJK_Regular"
DEJAVU_PATHS = (
    Path("/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf"),
    Path("/usr/share/fonts/TTF/DejaVuSans.ttf"),
    Path("/usr/share/fonts/dejavu/DejaVuSans.ttf"),
    Path("/usr/share/fonts/dejavu-sans-fonts/DejaVuSans.ttf"),
)
SAMPLE_SIZE = 24  # distinct characters checked per text: enough to tell a script apart
# A private-use code point no font maps: it draws the font's "missing glyph" shape.
_UNMAPPED = "\U0010fffd"


def find_font(text: str, configured: Path | None = None) -> tuple[Path | None, list[str]]:
    """Return ``(font path or None for PIL's built-in font, warnings)`` for ``text``."""
    if configured is not None:
        if not configured.is_file():
            raise JobError(
                f"[video] font = {str(configured)!r} does not exist; fix the path in the "
                "config or remove the key to use the bundled Noto Sans CJK"
            )
        return configured, _coverage_warnings(configured, text)

    found = list(dict.fromkeys(_candidates(text)))  # in order, without duplicates
    for path in found:
        if covers(path, text):
            return path, []
    if found:
        return found[0], _coverage_warnings(found[0], text)
    warnings = ["no TrueType font was found; text uses PIL's small built-in font — "
                "install fonts-dejavu or set [video] font"]
    return None, warnings + _coverage_warnings(None, text)


def load_font(path: Path | None, size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    if path is None:
        return ImageFont.load_default(size=size)
    return ImageFont.truetype(str(path), size)


def covers(path: Path | None, text: str) -> bool:
    """Whether the font draws every letter of ``text`` beyond ASCII (checks a sample)."""
    return not missing_characters(path, text)


def missing_characters(path: Path | None, text: str) -> list[str]:
    """The sampled characters of ``text`` that the font has no glyph for."""
    sample = _sample(text)
    if not sample:
        return []
    if path is None:  # PIL's built-in font draws ASCII only
        return sample
    font = ImageFont.truetype(str(path), 24)
    missing = _glyph_pixels(font, _UNMAPPED)
    return [ch for ch in sample if _glyph_pixels(font, ch) == missing]


def _coverage_warnings(path: Path | None, text: str) -> list[str]:
    missing = missing_characters(path, text)
    if not missing:
        return []
    shown = "".join(missing[:6]) + ("…" if len(missing) > 6 else "")
    hint = "fonts-noto-cjk" if any(CJK.match(ch) for ch in missing) else "fonts-noto"
    name = path.name if path else "PIL's built-in font"
    return [f"{name} cannot draw {shown}: that text is left out of the picture (subtitles "
            f"still play from the video's subtitle track and the .srt/.vtt files); install "
            f"{hint} or set [video] font to a font that covers it"]


def _sample(text: str) -> list[str]:
    # ASCII is in every font; what differs between fonts is the rest.
    letters = (ch for ch in text if ch.isalnum() and not ch.isascii())
    return list(dict.fromkeys(letters))[:SAMPLE_SIZE]


def _glyph_pixels(font: ImageFont.FreeTypeFont, char: str) -> bytes:
    image = Image.new("L", (32, 32))
    ImageDraw.Draw(image).text((2, 2), char, font=font, fill=255)
    return image.tobytes()


def _candidates(text: str) -> Iterator[Path]:
    if (bundled := _bundled_font()) is not None:
        yield bundled
    if (matched := _fontconfig_match(text)) is not None:
        yield matched
    yield from (path for path in DEJAVU_PATHS if path.is_file())


def _bundled_font() -> Path | None:
    # find_spec locates the package without importing it.
    spec = importlib.util.find_spec(BUNDLED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        fonts = sorted(Path(folder).glob("*.[ot]t[fc]"))
        if fonts:
            return fonts[0]
    return None


def _fontconfig_match(text: str) -> Path | None:
    """fontconfig's best sans-serif for the text's characters (it may not cover all)."""
    fc_match = shutil.which("fc-match")
    if fc_match is None:
        return None
    charset = " ".join(f"{ord(ch):x}" for ch in _sample(text))
    pattern = f"sans-serif:charset={charset}" if charset else "sans-serif"
    try:
        result = subprocess.run([fc_match, "--format=%{file}", pattern],
                                capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    path = Path(result.stdout.strip())
    return path if result.returncode == 0 and path.is_file() else None
