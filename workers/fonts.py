"""Find a font that can draw a caption, CJK included, on a machine with no fonts set up.

Order: ``[video] font`` from the config, the Noto Sans CJK that ships as a Python
dependency, fontconfig's choice, DejaVu Sans, and last PIL's built-in font. The first
candidate that covers the text wins; if none does, the first one found is used and
the caller gets a warning to pass on to the user.
"""

from __future__ import annotations

import importlib.util
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from daemon.jobs import JobError

# Characters of scripts written without spaces between words (Chinese, Japanese,
# Korean), their punctuation and full-width forms: they wrap per character, and most
# Latin fonts cannot draw them.
CJK = re.compile(
    "[\u2e80-\u2fdf\u3000-\u30ff\u3100-\u312f\u3190-\u31ff\u3400-\u4dbf"
    "\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff\ufe30-\ufe4f\uff00-\uffef]"
)

BUNDLED_PACKAGE = "cvttf_NotoSansCJK_Regular"
DEJAVU_PATHS = (
    Path("/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf"),
    Path("/usr/share/fonts/TTF/DejaVuSans.ttf"),
    Path("/usr/share/fonts/dejavu/DejaVuSans.ttf"),
    Path("/usr/share/fonts/dejavu-sans-fonts/DejaVuSans.ttf"),
)
NO_CJK_FONT = (
    "no font covering CJK text was found; captions may show empty boxes — "
    "install fonts-noto-cjk or set [video] font"
)
# A private-use code point no font maps: it draws the font's "missing glyph" shape.
_UNMAPPED = "\U0010fffd"


def has_cjk(text: str) -> bool:
    return CJK.search(text) is not None


def find_font(text: str, configured: Path | None = None) -> tuple[Path | None, list[str]]:
    """Return ``(font path or None for PIL's built-in font, warnings)`` for ``text``."""
    if configured is not None:
        if not configured.is_file():
            raise JobError(
                f"[video] font = {str(configured)!r} does not exist; fix the path in the "
                "config or remove the key to use the bundled Noto Sans CJK"
            )
        warnings = [] if covers(configured, text) else [NO_CJK_FONT]
        return configured, warnings

    found = list(dict.fromkeys(_candidates(text)))  # in order, without duplicates
    for path in found:
        if covers(path, text):
            return path, []
    if found:
        return found[0], [NO_CJK_FONT]
    warnings = ["no TrueType font was found; captions use PIL's small built-in font — "
                "install fonts-dejavu or set [video] font"]
    if has_cjk(text):
        warnings.append(NO_CJK_FONT)
    return None, warnings


def load_font(path: Path | None, size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    if path is None:
        return ImageFont.load_default(size=size)
    return ImageFont.truetype(str(path), size)


def covers(path: Path, text: str) -> bool:
    """Whether the font draws every CJK character of ``text`` (checks up to 24 of them)."""
    sample = list(dict.fromkeys(ch for ch in text if CJK.match(ch) and ch.isalnum()))[:24]
    if not sample:
        return True
    font = ImageFont.truetype(str(path), 24)
    missing = _glyph_pixels(font, _UNMAPPED)
    return all(_glyph_pixels(font, ch) != missing for ch in sample)


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
    fc_match = shutil.which("fc-match")
    if fc_match is None:
        return None
    pattern = "sans-serif:lang=zh" if has_cjk(text) else "sans-serif"
    try:
        result = subprocess.run([fc_match, "--format=%{file}", pattern],
                                capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    path = Path(result.stdout.strip())
    return path if result.returncode == 0 and path.is_file() else None
