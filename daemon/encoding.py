"""ffmpeg work that both the workers and the intakes need, through the static binary that
imageio-ffmpeg ships: reading what a file holds (``probe``) and re-encoding a finished
video to a byte budget (``fit_to_size``: a job's ``max_mb``, a chat's upload limit).

It lives in the core so that the intakes need not import the workers. imageio-ffmpeg has
no ffprobe, so ``probe`` reads what ``ffmpeg -i`` prints.
"""

from __future__ import annotations

import dataclasses
import re
import subprocess
from pathlib import Path

import imageio_ffmpeg

from daemon.jobs import JobError

# veryfast: animatics are gradients and text, where slower presets buy little; on two
# cores a 25 s job took 4.4 s with it and 8.2 s with medium.
X264_ARGS = ("-c:v", "libx264", "-preset", "veryfast", "-profile:v", "high",
             "-pix_fmt", "yuv420p")
AUDIO_KBPS = 128
AUDIO_BITRATE = f"{AUDIO_KBPS}k"
MIN_VIDEO_KBPS = 100  # below this, a size cap gives mush; better to say so
FIT_ATTEMPTS = 3
STDERR_LINES = 12  # how much of ffmpeg's complaint an error message carries


class FFmpegError(RuntimeError):
    """ffmpeg failed or produced something other than what was asked for."""


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


def ffmpeg_command(*args: str) -> list[str]:
    """The ffmpeg command line for ``args``: quiet but for errors, never reading stdin."""
    return [imageio_ffmpeg.get_ffmpeg_exe(), "-hide_banner", "-nostdin", "-loglevel", "error",
            *args]


def run_ffmpeg(what: str, *args: str) -> subprocess.CompletedProcess[bytes]:
    result = subprocess.run(ffmpeg_command(*args), capture_output=True, check=False)
    if result.returncode != 0:
        raise FFmpegError(f"ffmpeg could not {what}:\n{stderr_tail(result.stderr)}")
    return result


def stderr_tail(stderr: bytes) -> str:
    lines = [line for line in stderr.decode("utf-8", "replace").splitlines() if line.strip()]
    return "\n".join(lines[-STDERR_LINES:]) or "(ffmpeg printed nothing)"


# --- reading -------------------------------------------------------------------------------

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
        raise FFmpegError(f"ffmpeg cannot read {path.name}:\n{stderr_tail(result.stderr)}")
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


# --- fitting a byte budget -----------------------------------------------------------------


def fit_to_size(source: Path, dest: Path, max_bytes: int, scratch: Path, *,
                limit_name: str | None = None) -> int:
    """Re-encode the video stream of ``source`` into ``dest`` (an MP4) so the file stays
    under ``max_bytes``; subtitles are copied, and so is the audio when it is AAC (other
    audio becomes AAC: the sound is never dropped). Two-pass x264 at the bit rate the
    budget leaves, lowered again if the muxed file still overshoots; the pass log goes
    into ``scratch``. Returns the video bit rate used (kbit/s); raises ``JobError`` when
    the budget is hopeless, naming the limit ``limit_name`` (by default the job option
    that sets it, ``max_mb = …``)."""
    info = probe(source)
    # The sound is kept: copied when it is AAC already, else made AAC.
    copy_audio = all(stream.codec == "aac" for stream in info.of_kind("audio"))
    audio_args = ("-c:a", "copy") if copy_audio else ("-c:a", "aac", "-b:a", AUDIO_BITRATE)
    # What the other streams take: subtitles as they are, the sound as it will be.
    others_kbps = sum(AUDIO_KBPS if stream.kind == "audio" and not copy_audio
                      else stream.kbps or 0
                      for stream in info.streams if stream.kind != "video")
    # 2 % for the container's own bytes (index, headers), which grow with the length.
    budget_kbps = max_bytes * 8 / 1000 / info.duration_s * 0.98 - others_kbps
    for _ in range(FIT_ATTEMPTS):
        if budget_kbps < MIN_VIDEO_KBPS:
            limit = limit_name or f"max_mb = {max_bytes / 1e6:g}"
            need_mb = _megabytes_for(MIN_VIDEO_KBPS + others_kbps, info)
            raise JobError(
                f"{limit} is too small for a {info.duration_s:.0f} s video "
                f"({info.width}×{info.height}): it leaves {max(0, budget_kbps):.0f} kbit/s for "
                f"the picture, and {MIN_VIDEO_KBPS} is the least that looks like anything; "
                f"allow at least {need_mb:.1f} MB, or ask for a shorter or smaller video"
            )
        kbps = int(budget_kbps)
        rate = ("-b:v", f"{kbps}k", "-passlogfile", str(scratch / "x264-pass"))
        run_ffmpeg("analyse the video for the size cap", "-i", str(source), "-map", "0:v",
                   *X264_ARGS, *rate, "-pass", "1", "-an", "-f", "null", "-")
        run_ffmpeg("re-encode the video to fit the size cap", "-i", str(source), "-map", "0",
                   *X264_ARGS, *rate, "-pass", "2", *audio_args, "-c:s", "copy",
                   "-movflags", "+faststart", "-f", "mp4", "-y", str(dest))
        size = dest.stat().st_size
        if size <= max_bytes:
            return kbps
        budget_kbps = kbps * max_bytes / size * 0.97
    raise FFmpegError(f"the video did not fit in {max_bytes / 1e6:g} MB after "
                      f"{FIT_ATTEMPTS} tries")


def _megabytes_for(kbps: float, info: MediaInfo) -> float:
    return kbps * 1000 / 8 * info.duration_s / 0.98 / 1e6
