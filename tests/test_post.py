"""Post-production as a whole, on short synthetic clips: the finished file (streams,
duration, frame count, faststart), the size cap, cancellation, and a whole job with
every post step switched on. The helpers here are shared by tests/test_post_*.py."""

from __future__ import annotations

import wave
from collections.abc import Callable
from pathlib import Path

import imageio_ffmpeg
import numpy as np
import pytest

from daemon.compose import config_class
from daemon.config import StateConfig
from daemon.encoding import FFmpegError
from daemon.jobs import JobError, JobSpec, JobStatus, Source
from daemon.storyboard import Storyboard, StoryboardScene
from workers import fonts
from workers.context import JobCancelled, JobContext
from workers.pipelines import encode, post
from workers.pipelines.video_settings import PostConfig, VideoConfig
from workers.runner import run_job_sync

Config = config_class()  # the core's tables and the kinds'

FMT = encode.VideoFormat(width=160, height=96, fps=8)
GREY = (128, 128, 128)
FrameMaker = Callable[[int, int], np.ndarray]  # (scene number, frame index) → RGB frame


def make_board(*scenes: tuple[str, str | None, int], fps: int = FMT.fps) -> Storyboard:
    """A storyboard of ``(description, subtitle, frames)`` scenes."""
    return Storyboard(
        title="Test", style="", seed=7, fps=fps, planner="job", inputs_hash="",
        scenes=[StoryboardScene(number=i, description=description, subtitle=subtitle,
                                frames=frames, duration_s=frames / fps, camera="wide shot")
                for i, (description, subtitle, frames) in enumerate(scenes, start=1)])


def flat(colour: tuple[int, int, int], fmt: encode.VideoFormat = FMT) -> FrameMaker:
    frame = np.full((fmt.height, fmt.width, 3), colour, np.uint8)
    return lambda scene, index: frame


def write_clips(directory: Path, board: Storyboard, make_frame: FrameMaker,
                fmt: encode.VideoFormat = FMT) -> list[Path]:
    """One clip per scene, as a render backend would leave them."""
    directory.mkdir(parents=True, exist_ok=True)
    clips = []
    for scene in board.scenes:
        path = directory / f"scene_{scene.number:02d}.mp4"
        with encode.clip_writer(path, fmt) as write:
            for index in range(scene.frames):
                write(make_frame(scene.number, index))
        clips.append(path)
    return clips


def job_context(directory: Path, **post_settings: object) -> JobContext:
    directory.mkdir(parents=True, exist_ok=True)
    config = Config(state=StateConfig(dir=directory.parent),
                    post=PostConfig(**post_settings))
    spec = JobSpec(id=directory.name, kind="video", source=Source(channel="cli"))
    return JobContext(spec=spec, dir=directory, config=config)


def produce(tmp_path: Path, board: Storyboard, make_frame: FrameMaker | None = None,
            fmt: encode.VideoFormat = FMT, font: Path | None = None, crf: int = 18,
            **post_settings: object) -> tuple[post.Production, JobContext]:
    """Run post-production on synthetic clips, as the video kind would."""
    job = job_context(tmp_path / "job", **post_settings)
    clips = write_clips(tmp_path / "clips", board, make_frame or flat(GREY, fmt), fmt)
    font = font or fonts.find_font(board.text())[0]
    production = post.produce(job, board, clips, fmt, job.config.post, crf, font,
                              job.dir / "video.mp4")
    return production, job


def write_sine_wav(path: Path, seconds: float, frequency: float = 440.0,
                   amplitude: float = 0.5, rate: int = 44_100) -> Path:
    """A mono 16-bit WAV of a sine tone: music for tests, made here, not downloaded."""
    t = np.arange(round(seconds * rate)) / rate
    samples = (amplitude * np.sin(2 * np.pi * frequency * t) * 32767).astype("<i2")
    with wave.open(str(path), "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(rate)
        out.writeframes(samples.tobytes())
    return path


def decode(path: Path) -> np.ndarray:
    reader = imageio_ffmpeg.read_frames(str(path))
    meta = next(reader)
    width, height = meta["size"]
    return np.stack([np.frombuffer(data, np.uint8).reshape(height, width, 3)
                     for data in reader])


# --- the finished file ------------------------------------------------------------------------


def test_the_finished_file_passes_verification(tmp_path) -> None:
    board = make_board(("One.", None, 24), ("Two.", None, 20))
    production, job = produce(tmp_path, board)
    info = production.info
    assert production.video == job.dir / "video.mp4" and production.video.is_file()
    assert info.frames == 44 and info.duration_s == pytest.approx(44 / 8)
    assert [(s.kind, s.codec) for s in info.streams] == [
        ("video", "h264"), ("audio", "aac"), ("subtitle", "mov_text")]
    assert "(High)" in info.streams[0].details and "yuv420p" in info.streams[0].details
    assert info.audio_s == pytest.approx(44 / 8, abs=0.05)
    assert encode._index_first(production.video)
    assert [p.name for p in job.dir.iterdir() if p.name.startswith(".")] == []  # no scratch


def test_verify_names_what_is_wrong(tmp_path) -> None:
    board = make_board(("One.", None, 24))
    production, _ = produce(tmp_path, board, subtitles="off")
    assert [s.kind for s in production.info.streams] == ["video", "audio"]
    with pytest.raises(FFmpegError) as info:
        encode.verify(production.video, encode.VideoFormat(160, 96, 8), 30, subtitles=True)
    message = str(info.value)
    assert "has 24 frames (3.000 s), not 30 (3.750 s)" in message
    assert "subtitle tracks [], not ['mov_text']" in message
    assert "of audio for 3.750 s of video" in message


def test_a_size_cap_re_encodes_to_fit(tmp_path) -> None:
    rng = np.random.default_rng(1)
    noise = [rng.integers(0, 256, (FMT.height, FMT.width, 3), np.uint8) for _ in range(8)]
    board = make_board(("Noise is hard to compress.", None, 32))
    uncapped, _ = produce(tmp_path / "a", board, lambda scene, i: noise[i % 8], crf=10)
    assert uncapped.info.size_bytes > 400_000  # the cap below really bites
    capped, job = produce(tmp_path / "b", board, lambda scene, i: noise[i % 8], crf=10,
                          max_mb=0.3)
    assert capped.info.size_bytes <= 300_000
    assert capped.fitted_kbps and capped.info.frames == 32
    assert [s.kind for s in capped.info.streams] == ["video", "audio", "subtitle"]
    assert capped.degradations[-1].startswith(f"re-encoded at {capped.fitted_kbps} kbit/s")


def test_a_hopeless_size_cap_says_what_would_fit(tmp_path) -> None:
    rng = np.random.default_rng(2)
    noise = rng.integers(0, 256, (FMT.height, FMT.width, 3), np.uint8)
    board = make_board(("Too much for too little.", None, 24))
    with pytest.raises(JobError, match=r"max_mb = 0.01 is too small for a 3 s video .* "
                                       r"allow at least [\d.]+ MB"):
        produce(tmp_path, board, lambda scene, i: np.roll(noise, i, axis=1), crf=10,
                max_mb=0.01)


def test_cancel_during_post_leaves_no_video_and_no_scratch(tmp_path) -> None:
    board = make_board(("One.", None, 24), ("Two.", None, 24))
    job = job_context(tmp_path / "job")
    clips = write_clips(tmp_path / "clips", board, flat(GREY))

    def cancel_midway(stage: str, percent: float, message: str) -> None:
        if stage == "post" and "frame 16 of" in message:
            job.cancel_event.set()

    job.on_progress = cancel_midway
    with pytest.raises(JobCancelled):
        post.produce(job, board, clips, FMT, job.config.post, 20, None, job.dir / "video.mp4")
    assert not (job.dir / "video.mp4").exists()
    assert [p.name for p in job.dir.iterdir() if p.name.startswith(".")] == []


# --- a whole job ---------------------------------------------------------------------------------


def test_a_job_with_every_post_step(tmp_path) -> None:
    """Music, a look, fades through black, doubled frame rate and burned-in subtitles
    together, through the real job path and its report."""
    library = tmp_path / "music"
    library.mkdir()
    write_sine_wav(library / "tone.wav", seconds=2.0)
    config = Config(state=StateConfig(dir=tmp_path / "state"),
                    video=VideoConfig(width=160, height=96, fps=8),
                    post=PostConfig(music_dir=library))
    spec = JobSpec(id="all", kind="video", prompt="A fox runs. It stops.",
                   options={"duration": 6, "music": "random", "look": "vintage",
                            "transition": "fade", "smooth_motion": 2, "max_mb": 5},
                   source=Source(channel="cli"))
    outcome = run_job_sync(spec, config)
    assert outcome.status == JobStatus.done, outcome.error
    assert outcome.extras == ["subtitles.srt", "subtitles.vtt"]
    job_dir = config.jobs_dir / "all"
    info = encode.verify(job_dir / "video.mp4", encode.VideoFormat(160, 96, 16), 96, True)
    assert info.fps == 16 and info.duration_s == pytest.approx(6.0)
    assert np.abs(encode.audio_samples(job_dir / "video.mp4")).max() > 0.05  # music plays
    report = (job_dir / "report.json").read_text()
    assert '"music": "tone.wav"' in report and '"smooth_motion": 2' in report
    assert '"sepia": 0.45' in report  # the preset's values, resolved
