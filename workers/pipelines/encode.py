"""H.264 and AAC through the static ffmpeg binary that imageio-ffmpeg ships.

- ``clip_writer``: a scene clip from raw RGB frames, at intermediate quality (post
  encodes it once more), kept in the job directory for reuse;
- ``video_writer``: the finished MP4 in one pass: frames, the soundtrack (AAC, copied)
  and the subtitle track (mov_text), H.264 High, yuv420p, ``+faststart``;
- ``verify``: streams, duration and frame count, checked before a file lands under its
  final name; it counts frames and samples by decoding.

``probe`` and ``fit_to_size`` (a two-pass re-encode of the video stream to a byte budget,
for ``max_mb``) live in ``daemon.encoding``, which the chat's deliveries share; they are
re-exported here with the rest of what the pipelines use from it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import subprocess
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import imageio_ffmpeg
import numpy as np

from daemon.encoding import (
    X264_ARGS,
    FFmpegError,
    MediaInfo,
    ffmpeg_command,
    probe,
    run_ffmpeg,
    stderr_tail,
)

# Scene clips are intermediates that post-production decodes and encodes once more:
# high quality keeps that second generation clean.
CLIP_CRF = 16
# Every setting that changes a clip's bytes; it is part of each clip's cache key, so
# changing it here re-renders old clips instead of reusing mismatched ones.
ENCODER_ID = " ".join(X264_ARGS) + f" -crf {CLIP_CRF}"
AUDIO_RATE = 48_000


@dataclasses.dataclass(frozen=True)
class VideoFormat:
    """Frame size and rate: what every clip of a job shares, so they join seamlessly."""

    width: int
    height: int
    fps: float  # a film's whole rate, or a source clip's own (29.97) when upscaling


# --- writing -------------------------------------------------------------------------------


def clip_writer(path: Path, fmt: VideoFormat, crf: int = CLIP_CRF
                ) -> contextlib.AbstractContextManager[Callable[[np.ndarray], None]]:
    """A video-only clip at ``path`` (by default a scene clip, at ``CLIP_CRF``). See
    ``_frame_pipe``."""
    return _frame_pipe(path, fmt, (), ("-an", *X264_ARGS, "-crf", str(crf)))


def video_writer(path: Path, fmt: VideoFormat, crf: int, soundtrack: Path,
                 subtitles: Path | None) -> contextlib.AbstractContextManager[
                     Callable[[np.ndarray], None]]:
    """The finished video at ``path``: frames encoded at ``crf``, the AAC ``soundtrack``
    copied as is, and ``subtitles`` (an .srt) as a mov_text track players can switch on.
    See ``_frame_pipe``."""
    inputs = ["-i", str(soundtrack)] + (["-i", str(subtitles)] if subtitles else [])
    maps = ["-map", "0:v", "-map", "1:a"] + (["-map", "2:s"] if subtitles else [])
    subtitle_codec = ["-c:s", "mov_text", "-metadata:s:s:0", "handler_name=Subtitles"] \
        if subtitles else []
    return _frame_pipe(path, fmt, inputs, (*maps, *X264_ARGS, "-crf", str(crf), "-c:a", "copy",
                                           *subtitle_codec, "-movflags", "+faststart"))


@contextlib.contextmanager
def _frame_pipe(path: Path, fmt: VideoFormat, inputs: Sequence[str],
                output_args: Sequence[str]) -> Iterator[Callable[[np.ndarray], None]]:
    """Yield a function that pipes one RGB frame (height × width × 3, uint8) into ffmpeg.

    Leaving the block normally finishes the MP4 at ``path`` and raises ``FFmpegError``
    if ffmpeg failed; leaving it by an exception (a cancel) kills ffmpeg.
    """
    expected = (fmt.height, fmt.width, 3)
    # stderr goes to a file: a pipe nobody reads could fill up and stall ffmpeg.
    with tempfile.TemporaryFile() as stderr:
        process = subprocess.Popen(
            ffmpeg_command("-f", "rawvideo", "-pix_fmt", "rgb24",
                           "-s", f"{fmt.width}x{fmt.height}", "-framerate", str(fmt.fps),
                           "-i", "pipe:0", *inputs, *output_args, "-fps_mode", "cfr",
                           "-f", "mp4", "-y", str(path)),
            stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=stderr,
        )
        assert process.stdin is not None

        def failure(what: str) -> FFmpegError:
            stderr.seek(0)
            return FFmpegError(f"ffmpeg {what} {path.name}:\n{stderr_tail(stderr.read())}")

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


# --- checking --------------------------------------------------------------------------------


def audio_samples(path: Path, rate: int = 8000) -> np.ndarray:
    """The first audio stream decoded to mono float samples in -1..1 at ``rate``."""
    result = run_ffmpeg("decode the audio", "-i", str(path), "-map", "0:a:0", "-ac", "1",
                  "-ar", str(rate), "-f", "s16le", "-")
    return np.frombuffer(result.stdout, np.int16).astype(np.float32) / 32768


def verify(path: Path, fmt: VideoFormat, frames: int, subtitles: bool) -> MediaInfo:
    """Check the finished video against the plan: one H.264 High yuv420p video stream of
    the right size, one AAC audio stream as long as the video, the subtitle track when
    asked for, the frame count and duration, and the index at the front (faststart)."""
    info = probe(path)
    counted, seconds = imageio_ffmpeg.count_frames_and_secs(str(path))
    audio_rate = 8000
    audio_s = len(audio_samples(path, audio_rate)) / audio_rate if info.of_kind("audio") \
        else None
    info = dataclasses.replace(info, frames=counted, duration_s=seconds, audio_s=audio_s)
    expected_s = frames / fmt.fps
    problems = []
    videos, audios = info.of_kind("video"), info.of_kind("audio")
    subtitle_tracks = info.of_kind("subtitle")
    if [s.codec for s in videos] != ["h264"] or "(High)" not in videos[0].details \
            or "yuv420p" not in videos[0].details:
        problems.append(f"has video streams {[f'{s.codec} {s.details}' for s in videos]}, "
                        "not one h264 (High), yuv420p")
    if (info.width, info.height) != (fmt.width, fmt.height):
        problems.append(f"is {info.width}×{info.height}, not {fmt.width}×{fmt.height}")
    if info.frames != frames or abs(info.duration_s - expected_s) > 0.5 / fmt.fps:
        problems.append(f"has {info.frames} frames ({info.duration_s:.3f} s), "
                        f"not {frames} ({expected_s:.3f} s)")
    if [s.codec for s in audios] != ["aac"]:
        problems.append(f"has audio streams {[s.codec for s in audios]}, not one aac")
    # AAC works in blocks of 1024 samples: a block more or less is not a fault.
    elif info.audio_s is None or abs(info.audio_s - expected_s) > 0.05:
        problems.append(f"has {info.audio_s or 0:.3f} s of audio for {expected_s:.3f} s of video")
    wanted_subtitles = ["mov_text"] if subtitles else []
    if [s.codec for s in subtitle_tracks] != wanted_subtitles:
        problems.append(f"has subtitle tracks {[s.codec for s in subtitle_tracks]}, "
                        f"not {wanted_subtitles}")
    if not _index_first(path):
        problems.append("keeps its index after the media data (no faststart)")
    if problems:
        raise FFmpegError(f"ffmpeg made a video that {'; '.join(problems)}")
    return info


def _index_first(path: Path) -> bool:
    """Whether the MP4's index (moov) comes before its media data (mdat), so players
    start before the whole file has arrived."""
    with open(path, "rb") as handle:
        while header := handle.read(8):
            size, kind = int.from_bytes(header[:4], "big"), header[4:8]
            if kind in (b"moov", b"mdat"):
                return kind == b"moov"
            if size == 0:  # the box runs to the end of the file
                break
            if size == 1:  # a 64-bit size follows
                size = int.from_bytes(handle.read(8), "big") - 8
            handle.seek(size - 8, 1)
    return False
