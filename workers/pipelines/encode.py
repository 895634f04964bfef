"""H.264 and AAC through the static ffmpeg binary that imageio-ffmpeg ships.

- ``clip_writer``: a scene clip from raw RGB frames, at intermediate quality (post
  encodes it once more), kept in the job directory for reuse;
- ``video_writer``: the finished MP4 in one pass: frames, the soundtrack (AAC, copied)
  and the subtitle track (mov_text), H.264 High, yuv420p, ``+faststart``;
- ``fit_to_size``: a two-pass re-encode of the video stream to a byte budget;
- ``probe`` and ``verify``: streams, duration and frame count, checked before a file
  lands under its final name. imageio-ffmpeg has no ffprobe, so ``probe`` reads what
  ``ffmpeg -i`` prints and ``verify`` counts frames and samples by decoding.
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
import subprocess
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import imageio_ffmpeg
import numpy as np

from daemon.jobs import JobError

# veryfast: animatics are gradients and text, where slower presets buy little; on two
# cores a 25 s job took 4.4 s with it and 8.2 s with medium.
X264_ARGS = ("-c:v", "libx264", "-preset", "veryfast", "-profile:v", "high",
             "-pix_fmt", "yuv420p")
# Scene clips are intermediates that post-production decodes and encodes once more:
# high quality keeps that second generation clean.
CLIP_CRF = 16
# Every setting that changes a clip's bytes; it is part of each clip's cache key, so
# changing it here re-renders old clips instead of reusing mismatched ones.
ENCODER_ID = " ".join(X264_ARGS) + f" -crf {CLIP_CRF}"
AUDIO_RATE = 48_000
AUDIO_BITRATE = "128k"
MIN_VIDEO_KBPS = 100  # below this, a size cap gives mush; better to say so
FIT_ATTEMPTS = 3
STDERR_LINES = 12  # how much of ffmpeg's complaint an error message carries


class FFmpegError(RuntimeError):
    """ffmpeg failed or produced something other than what was asked for."""


@dataclasses.dataclass(frozen=True)
class VideoFormat:
    """Frame size and rate: what every clip of a job shares, so they join seamlessly."""

    width: int
    height: int
    fps: float  # a film's whole rate, or a source clip's own (29.97) when upscaling


@dataclasses.dataclass(frozen=True)
class Stream:
    index: int
    kind: str  # "video", "audio" or "subtitle"
    codec: str  # "h264", "aac", "mov_text", …
    details: str  # the rest of ffmpeg's line: profile, pixel format, size, rate…
    kbps: int | None  # the stream's bit rate, when ffmpeg knows it


@dataclasses.dataclass(frozen=True)
class MediaInfo:
    frames: int
    duration_s: float
    audio_s: float | None  # the decoded audio's length, when there is audio
    width: int
    height: int
    fps: float
    size_bytes: int
    streams: tuple[Stream, ...]

    def of_kind(self, kind: str) -> list[Stream]:
        return [stream for stream in self.streams if stream.kind == kind]


def _ffmpeg(*args: str) -> list[str]:
    return [imageio_ffmpeg.get_ffmpeg_exe(), "-hide_banner", "-nostdin", "-loglevel", "error",
            *args]


def run_ffmpeg(what: str, *args: str) -> subprocess.CompletedProcess[bytes]:
    result = subprocess.run(_ffmpeg(*args), capture_output=True, check=False)
    if result.returncode != 0:
        raise FFmpegError(f"ffmpeg could not {what}:\n{_tail(result.stderr)}")
    return result


def _tail(stderr: bytes) -> str:
    lines = [line for line in stderr.decode("utf-8", "replace").splitlines() if line.strip()]
    return "\n".join(lines[-STDERR_LINES:]) or "(ffmpeg printed nothing)"


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
            _ffmpeg("-f", "rawvideo", "-pix_fmt", "rgb24", "-s", f"{fmt.width}x{fmt.height}",
                    "-framerate", str(fmt.fps), "-i", "pipe:0", *inputs, *output_args,
                    "-fps_mode", "cfr", "-f", "mp4", "-y", str(path)),
            stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=stderr,
        )
        assert process.stdin is not None

        def failure(what: str) -> FFmpegError:
            stderr.seek(0)
            return FFmpegError(f"ffmpeg {what} {path.name}:\n{_tail(stderr.read())}")

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


def fit_to_size(source: Path, dest: Path, max_bytes: int, scratch: Path) -> int:
    """Re-encode the video stream of ``source`` into ``dest`` so the file stays under
    ``max_bytes``; audio and subtitles are copied. Two-pass x264 at the bit rate the
    budget leaves, lowered again if the muxed file still overshoots. Returns the video
    bit rate used (kbit/s); raises ``JobError`` when the budget is hopeless."""
    info = probe(source)
    others_kbps = sum(s.kbps or 0 for s in info.streams if s.kind != "video")
    # 2 % for the container's own bytes (index, headers), which grow with the length.
    budget_kbps = max_bytes * 8 / 1000 / info.duration_s * 0.98 - others_kbps
    for _ in range(FIT_ATTEMPTS):
        if budget_kbps < MIN_VIDEO_KBPS:
            raise JobError(
                f"max_mb = {max_bytes / 1e6:g} is too small for a {info.duration_s:.0f} s video "
                f"({info.width}×{info.height}): it leaves {max(0, budget_kbps):.0f} kbit/s for "
                f"the picture, and {MIN_VIDEO_KBPS} is the least that looks like anything; "
                f"allow at least {_megabytes_for(MIN_VIDEO_KBPS + others_kbps, info):.1f} MB, "
                "or ask for a shorter or smaller video"
            )
        kbps = int(budget_kbps)
        rate = ("-b:v", f"{kbps}k", "-passlogfile", str(scratch / "x264-pass"))
        run_ffmpeg("analyse the video for the size cap", "-i", str(source), "-map", "0:v",
                   *X264_ARGS, *rate, "-pass", "1", "-an", "-f", "null", "-")
        run_ffmpeg("re-encode the video to fit the size cap", "-i", str(source), "-map", "0",
                   *X264_ARGS, *rate, "-pass", "2", "-c:a", "copy", "-c:s", "copy",
                   "-movflags", "+faststart", "-f", "mp4", "-y", str(dest))
        size = dest.stat().st_size
        if size <= max_bytes:
            return kbps
        budget_kbps = kbps * max_bytes / size * 0.97
    raise FFmpegError(f"the video did not fit in {max_bytes / 1e6:g} MB after "
                      f"{FIT_ATTEMPTS} tries")


def _megabytes_for(kbps: float, info: MediaInfo) -> float:
    return kbps * 1000 / 8 * info.duration_s / 0.98 / 1e6


# --- checking --------------------------------------------------------------------------------

_DURATION = re.compile(r"Duration: (\d+):(\d\d):(\d\d(?:\.\d+)?)")
_STREAM = re.compile(r"Stream #0:(\d+)\S*: (Video|Audio|Subtitle): (\w+)(.*)")
_SIZE = re.compile(r", (\d{2,5})x(\d{2,5})")
_FPS = re.compile(r", ([\d.]+) fps")
_KBPS = re.compile(r"(\d+) kb/s")


def probe(path: Path) -> MediaInfo:
    """Streams, size, rate and container duration as ``ffmpeg -i`` reports them (no
    decoding: ``frames`` and ``audio_s`` are left unknown, 0 and None)."""
    # Without an output file ffmpeg exits 1 after printing the input's description.
    result = subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-hide_banner", "-nostdin",
                             "-i", str(path)], capture_output=True, check=False)
    text = result.stderr.decode("utf-8", "replace")
    duration = _DURATION.search(text)
    if duration is None:
        raise FFmpegError(f"ffmpeg cannot read {path.name}:\n{_tail(result.stderr)}")
    hours, minutes, seconds = duration.groups()
    streams = tuple(
        Stream(int(index), kind.lower(), codec, details.strip(),
               int(kbps.group(1)) if (kbps := _KBPS.search(details)) else None)
        for index, kind, codec, details in _STREAM.findall(text)
    )
    video = next((s for s in streams if s.kind == "video"), None)
    size = _SIZE.search(video.details) if video else None
    fps = _FPS.search(video.details) if video else None
    return MediaInfo(
        frames=0,
        duration_s=int(hours) * 3600 + int(minutes) * 60 + float(seconds),
        audio_s=None,
        width=int(size.group(1)) if size else 0,
        height=int(size.group(2)) if size else 0,
        fps=float(fps.group(1)) if fps else 0.0,
        size_bytes=path.stat().st_size,
        streams=streams,
    )


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
