"""The soundtrack: music from the library, fitted to the video, or silence.

Every finished video carries one AAC track, silent when there is no music: players,
chat apps and editors all behave better with a track than without one. Music is looped
or cut to the video's exact length, set to ``music_volume`` and faded in and out, in
one ffmpeg command (``-stream_loop`` and the ``volume`` and ``afade`` filters), which
reads any format ffmpeg knows.
"""

from __future__ import annotations

import random
from pathlib import Path

from daemon.encoding import AUDIO_BITRATE, FFmpegError, run_ffmpeg
from daemon.jobs import JobError
from workers.pipelines.encode import AUDIO_RATE
from workers.pipelines.video_settings import MUSIC_RANDOM, PostConfig

MUSIC_SUFFIXES = (".mp3", ".m4a", ".aac", ".wav", ".flac", ".ogg", ".oga", ".opus")


def _library(settings: PostConfig) -> list[Path]:
    """The music files in ``[post] music_dir``, in name order."""
    folder = settings.music_dir
    if folder is None or not folder.is_dir():
        return []
    return sorted(path for path in folder.iterdir()
                  if path.suffix.lower() in MUSIC_SUFFIXES and not path.name.startswith("."))


def choose_music(settings: PostConfig, seed: int) -> tuple[Path | None, list[str]]:
    """The music file a job asked for, or None for silence; with warnings when "random"
    found nothing to choose from (the video then gets a silent track).

    "random" picks with the storyboard's seed: every run of a job gets the same music.
    A named file that is not in the library is the sender's mistake: a ``JobError``.
    """
    if not settings.music:
        return None, []
    tracks = _library(settings)
    where = f"[post] music_dir ({settings.music_dir})" if settings.music_dir else \
        "[post] music_dir, which is not set"
    if settings.music == MUSIC_RANDOM:
        if not tracks:
            return None, [f'music = "random" found no music files in {where}; the video has '
                          "a silent soundtrack"]
        return random.Random(seed).choice(tracks), []
    chosen = next((path for path in tracks if path.name == settings.music), None)
    if chosen is None:
        names = ", ".join(path.name for path in tracks[:8]) or "no music files"
        raise JobError(f"music {settings.music!r} is not in the music library, {where}; it "
                       f"has: {names}. Use one of those names, \"random\", or \"\" for none")
    return chosen, []


def write_soundtrack(dest: Path, music: Path | None, duration_s: float, volume: float,
                     fade_s: float) -> None:
    """Write ``duration_s`` of stereo AAC to ``dest`` (.m4a): the music looped or cut,
    at ``volume``, faded in and out; or silence when ``music`` is None."""
    if music is None:
        source = ["-f", "lavfi", "-i", f"anullsrc=r={AUDIO_RATE}:cl=stereo"]
        filters = "anull"
    else:
        fade_s = min(fade_s, duration_s / 3)  # a short video still has some music at full level
        source = ["-stream_loop", "-1", "-i", str(music)]
        filters = f"volume={volume:g}"
        if fade_s > 0:
            filters += (f",afade=t=in:d={fade_s:g}"
                        f",afade=t=out:st={duration_s - fade_s:.6f}:d={fade_s:g}")
    try:
        run_ffmpeg("make the soundtrack", *source, "-t", f"{duration_s:.6f}", "-vn", "-sn",
                   "-af", filters, "-ac", "2", "-ar", str(AUDIO_RATE), "-c:a", "aac",
                   "-b:a", AUDIO_BITRATE, "-f", "mp4", "-y", str(dest))
    except FFmpegError as exc:
        if music is None:
            raise
        raise JobError(f"the music file {music.name} could not be read as audio; replace it "
                       f"in the music library or pick another ({exc})") from None
