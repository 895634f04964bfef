"""Post-production: the scene clips become the finished video. One entry point,
``produce``, reading top to bottom:

1. subtitles: cues from the storyboard, written as .srt and .vtt;
2. soundtrack: music (looped or cut, faded) or silence, as AAC;
3. picture: each scene clip decoded (moviepy), given the look, smoothed to a higher
   frame rate if asked; the scenes joined with their transitions; subtitles burned in;
4. encode: frames, soundtrack and subtitle track muxed in one ffmpeg pass, re-encoded
   to fit ``max_mb`` if needed, verified, and only then renamed to ``video.mp4``.

It always starts from the kept scene clips, so changing a post setting never renders
a scene again. Progress runs from 85 to 100 %, with a cancel checkpoint every few
frames; scratch files live in a hidden folder that is removed whatever happens.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from moviepy import VideoClip, VideoFileClip

from daemon import files
from daemon.encoding import MediaInfo, fit_to_size
from daemon.storyboard import Storyboard
from workers import fonts
from workers.context import JobContext
from workers.pipelines import audio, encode, interpolate, looks, subtitles, transitions
from workers.pipelines.video_settings import PostConfig

START_PERCENT, END_PERCENT = 85.0, 100.0
PROGRESS_EVERY = 8  # frames between progress reports (each also checks for cancel)
MAX_FPS = 60  # what players and chat apps handle everywhere
POSTER_FILE = "poster.jpg"


@dataclass(frozen=True)
class Production:
    """What post-production made, for the job's result and report."""

    video: Path
    info: MediaInfo
    fps: int  # the finished video's rate: the storyboard's times smooth_motion
    cues: list[subtitles.Cue]  # counted in frames of the storyboard's rate
    subtitle_files: list[Path]
    poster: Path  # a frame of the finished video (middle of the first scene), as JPEG
    burned_in: bool
    music: str | None  # the music file's name; None: a silent soundtrack
    look: looks.Look
    fitted_kbps: int | None  # the video bit rate when re-encoded to fit max_mb
    degradations: list[str]  # what was done differently from what was asked, and why


def produce(job: JobContext, board: Storyboard, clips: list[Path], fmt: encode.VideoFormat,
            settings: PostConfig, crf: int, font: Path | None, dest: Path) -> Production:
    """Turn ``clips`` (one per storyboard scene, at ``fmt``) into the finished ``dest``."""
    job.progress("post", START_PERCENT, "subtitles and soundtrack")
    degradations: list[str] = []
    factor = settings.smooth_motion
    if fmt.fps * factor > MAX_FPS:
        factor = max(1, MAX_FPS // fmt.fps)
        degradations.append(f"smooth_motion = {settings.smooth_motion} would make "
                            f"{fmt.fps * settings.smooth_motion} fps; used {factor} "
                            f"({fmt.fps * factor} fps), as most players stop at {MAX_FPS}")
    out_fmt = encode.VideoFormat(fmt.width, fmt.height, fmt.fps * factor)

    # 1. Subtitles: the same cues for the files, the track and the picture.
    layout = subtitles.Layout(fmt.width, fmt.height, font, settings.subtitle_style)
    cues = subtitles.cues_for(board, layout) if settings.subtitles != "off" else []
    subtitle_files = subtitles.write_files(cues, fmt.fps, job.dir) if cues else []
    burned_in = settings.subtitles == "burn" and bool(cues)
    if burned_in and not fonts.covers(font, "".join(cue.text for cue in cues)):
        # The plan stage already warned; drawing would only show empty boxes.
        burned_in = False
        degradations.append("subtitles not burned in: the font cannot draw them; they are "
                            "in the subtitle track and the .srt/.vtt files")

    with tempfile.TemporaryDirectory(dir=job.dir, prefix=".post-") as scratch_name:
        scratch = Path(scratch_name)

        # 2. Soundtrack: exactly as long as the picture.
        music, music_warnings = audio.choose_music(settings, board.seed)
        for warning in music_warnings:
            job.warn(warning)
        soundtrack = scratch / "soundtrack.m4a"
        audio.write_soundtrack(soundtrack, music, board.duration_s, settings.music_volume,
                               settings.music_fade)

        # 3. Picture: a lazy moviepy clip; frames are made as the encoder takes them.
        look = looks.resolve(settings.look)
        sources = [VideoFileClip(str(path), audio=False) for path in clips]
        try:
            scenes: list[VideoClip] = []
            for source, scene in zip(sources, board.scenes, strict=True):
                # The container's duration is rounded; the storyboard's frames are exact.
                shot = looks.apply(source.with_duration(scene.frames / fmt.fps), look)
                scenes.append(interpolate.smooth(shot, factor) if factor > 1 else shot)
            video = transitions.join(scenes, settings.transition, settings.transition_duration)
            if burned_in:
                video = subtitles.burn(video, cues, layout, fmt.fps)

            # 4. Encode, fit, verify; the finished file lands only when all is well.
            encoded = scratch / "encoded.mp4"
            frames = board.frames * factor
            poster, poster_index = job.dir / POSTER_FILE, board.scenes[0].frames * factor // 2
            srt = subtitle_files[0] if subtitle_files else None
            with encode.video_writer(encoded, out_fmt, crf, soundtrack, srt) as write:
                for index in range(frames):
                    # By index, not moviepy's iter_frames: its float duration × fps can
                    # round one frame away.
                    frame = video.get_frame(index / out_fmt.fps)
                    write(frame)
                    if index == poster_index:
                        write_jpeg(frame, poster)
                    if (index + 1) % PROGRESS_EVERY == 0:
                        job.progress("post", START_PERCENT + 13 * (index + 1) / frames,
                                     f"frame {index + 1} of {frames}")
        finally:
            for source in sources:
                source.close()
        job.progress("post", 98, "checking the video")
        fitted_kbps = None
        if settings.max_mb and encoded.stat().st_size > settings.max_mb * 1e6:
            fitted = scratch / "fitted.mp4"
            fitted_kbps = fit_to_size(encoded, fitted, int(settings.max_mb * 1e6), scratch)
            degradations.append(f"re-encoded at {fitted_kbps} kbit/s to fit max_mb = "
                                f"{settings.max_mb:g} (it was {encoded.stat().st_size / 1e6:.1f}"
                                " MB)")
            encoded = fitted
        info = encode.verify(encoded, out_fmt, frames, subtitles=srt is not None)
        files.move_file(encoded, dest)
    job.progress("post", END_PERCENT, f"{info.duration_s:.1f} s video ready")
    return Production(video=dest, info=info, fps=out_fmt.fps, cues=cues,
                      subtitle_files=subtitle_files, poster=poster, burned_in=burned_in,
                      music=music.name if music else None, look=look,
                      fitted_kbps=fitted_kbps, degradations=degradations)


def write_jpeg(frame: np.ndarray, path: Path) -> None:
    """An RGB frame as a JPEG file, landed atomically."""
    ok, data = cv2.imencode(".jpg", cv2.cvtColor(frame, cv2.COLOR_RGB2BGR),
                            [cv2.IMWRITE_JPEG_QUALITY, 82])
    if not ok:
        raise ValueError(f"OpenCV could not encode {path.name}")
    files.write_bytes(path, data.tobytes())
