"""H.264 through the static ffmpeg binary that imageio-ffmpeg ships.

Three jobs: write a clip from raw RGB frames (``clip_writer``), join clips into one
MP4 without re-encoding (``stitch``), and check that the result is what the
storyboard asked for (``verify``) before it lands under its final name.
"""

from __future__ import annotations

import contextlib
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import imageio_ffmpeg
import numpy as np

from daemon import files

# Every setting that changes a clip's bytes; it is part of each clip's cache key, so
# changing it here re-renders old clips instead of stitching mismatched ones.
# veryfast: animatics are gradients and text, where slower presets buy little; on two
# cores a 25 s job took 4.4 s with it and 8.2 s with medium.
X264_ARGS = ("-c:v", "libx264", "-preset", "veryfast", "-profile:v", "high",
             "-pix_fmt", "yuv420p")
ENCODER_ID = " ".join(X264_ARGS)
STDERR_LINES = 12  # how much of ffmpeg's complaint an error message carries


class FFmpegError(RuntimeError):
    """ffmpeg failed or produced something other than what was asked for."""


@dataclass(frozen=True)
class VideoFormat:
    """What every clip of a job shares, so clips can be joined without re-encoding."""

    width: int
    height: int
    fps: int
    crf: int


@dataclass(frozen=True)
class VideoInfo:
    frames: int
    duration_s: float
    width: int
    height: int
    fps: float
    codec: str
    pix_fmt: str
    size_bytes: int


def _ffmpeg(*args: str) -> list[str]:
    return [imageio_ffmpeg.get_ffmpeg_exe(), "-hide_banner", "-nostdin", "-loglevel", "error",
            *args]


def _tail(stderr: str) -> str:
    lines = [line for line in stderr.strip().splitlines() if line.strip()]
    return "\n".join(lines[-STDERR_LINES:]) or "(ffmpeg printed nothing)"


@contextlib.contextmanager
def clip_writer(path: Path, fmt: VideoFormat) -> Iterator[Callable[[np.ndarray], None]]:
    """Yield a function that pipes one RGB frame (height × width × 3, uint8) into ffmpeg.

    Leaving the block normally finishes the MP4 at ``path`` and raises ``FFmpegError``
    if ffmpeg failed; leaving it by an exception kills ffmpeg.
    """
    expected = (fmt.height, fmt.width, 3)
    # stderr goes to a file: a pipe nobody reads could fill up and stall ffmpeg.
    with tempfile.TemporaryFile() as stderr:
        process = subprocess.Popen(
            _ffmpeg(
                "-f", "rawvideo", "-pix_fmt", "rgb24", "-s", f"{fmt.width}x{fmt.height}",
                "-framerate", str(fmt.fps), "-i", "pipe:0",
                "-an", *X264_ARGS, "-crf", str(fmt.crf), "-fps_mode", "cfr",
                "-f", "mp4", "-y", str(path),
            ),
            stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=stderr,
        )
        assert process.stdin is not None

        def failure(what: str) -> FFmpegError:
            stderr.seek(0)
            return FFmpegError(f"ffmpeg {what} {path.name}:\n"
                               f"{_tail(stderr.read().decode('utf-8', 'replace'))}")

        def write(frame: np.ndarray) -> None:
            if frame.shape != expected or frame.dtype != np.uint8:
                raise ValueError(f"frame is {frame.shape} {frame.dtype}, not {expected} uint8")
            try:
                process.stdin.write(np.ascontiguousarray(frame).data)
            except BrokenPipeError:
                process.wait()
                raise failure("stopped while encoding") from None

        try:
            yield write
        except BaseException:
            process.kill()
            process.wait()
            raise
        with contextlib.suppress(BrokenPipeError):  # if ffmpeg quit, its status says why
            process.stdin.close()
        if process.wait() != 0:
            raise failure("could not encode")


def stitch(clips: list[Path], dest: Path, fmt: VideoFormat, frames: int) -> VideoInfo:
    """Join ``clips`` in order into ``dest`` (faststart MP4), verified before it lands.

    Stream copy is enough because every clip was encoded with the same ``fmt``.
    """
    listing = "".join(f"file '{_concat_quote(clip.resolve())}'\n" for clip in clips)
    with tempfile.TemporaryDirectory(dir=dest.parent, prefix=".concat-") as scratch:
        list_path = Path(scratch) / "clips.txt"
        list_path.write_text(listing, encoding="utf-8")
        with files.atomic_path(dest) as tmp:
            result = subprocess.run(
                _ffmpeg("-f", "concat", "-safe", "0", "-i", str(list_path),
                        "-c", "copy", "-movflags", "+faststart", "-f", "mp4", "-y", str(tmp)),
                capture_output=True, text=True, check=False,
            )
            if result.returncode != 0:
                raise FFmpegError(f"ffmpeg could not join the scene clips:\n{_tail(result.stderr)}")
            info = verify(tmp, fmt, frames)
    return info


def _concat_quote(path: Path) -> str:
    # The concat demuxer's quoting: a ' inside '...' is written '\''.
    return str(path).replace("'", "'\\''")


def verify(path: Path, fmt: VideoFormat, frames: int) -> VideoInfo:
    """Decode ``path`` and check codec, size, frame count and duration against the plan."""
    reader = imageio_ffmpeg.read_frames(str(path))
    try:
        meta = next(reader)
    finally:
        reader.close()
    counted, seconds = imageio_ffmpeg.count_frames_and_secs(str(path))
    info = VideoInfo(
        frames=counted,
        duration_s=seconds,
        width=meta["size"][0],
        height=meta["size"][1],
        fps=meta["fps"],
        codec=meta["codec"],
        pix_fmt=meta["pix_fmt"].split("(")[0],  # "yuv420p(progressive)"
        size_bytes=path.stat().st_size,
    )
    expected_s = frames / fmt.fps
    problems = []
    if (info.codec, info.pix_fmt) != ("h264", "yuv420p"):
        problems.append(f"is {info.codec}/{info.pix_fmt}, not h264/yuv420p")
    if (info.width, info.height) != (fmt.width, fmt.height):
        problems.append(f"is {info.width}×{info.height}, not {fmt.width}×{fmt.height}")
    if info.frames != frames or abs(info.duration_s - expected_s) > 0.5 / fmt.fps:
        problems.append(f"has {info.frames} frames ({info.duration_s:.3f} s), "
                        f"not {frames} ({expected_s:.3f} s)")
    if problems:
        raise FFmpegError(f"ffmpeg made a video that {'; '.join(problems)}")
    return info
