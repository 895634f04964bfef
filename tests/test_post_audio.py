"""The soundtrack: music fitted to the video's exact length, faded and set in volume;
a silent AAC track without music; the library's "random" and named choices."""

from __future__ import annotations

import numpy as np
import pytest

from daemon.jobs import JobError
from tests.test_post import make_board, produce, write_sine_wav
from workers.pipelines import audio, encode
from workers.pipelines.video_settings import PostConfig

RATE = 8000  # what encode.audio_samples decodes to by default


def rms(samples: np.ndarray) -> float:
    return float(np.sqrt(np.mean(samples**2)))


@pytest.mark.parametrize("music_s", [1.3, 20.0], ids=["looped", "cut"])
def test_music_is_exactly_as_long_as_the_video(tmp_path, music_s) -> None:
    library = tmp_path / "music"
    library.mkdir()
    write_sine_wav(library / "tone.wav", seconds=music_s)
    board = make_board(("One.", None, 26), ("Two.", None, 25))  # 6.375 s at 8 fps
    production, _ = produce(tmp_path, board, music="tone.wav", music_dir=library,
                            music_fade=1.0, subtitles="off")
    assert production.music == "tone.wav"
    samples = encode.audio_samples(production.video)
    assert len(samples) / RATE == pytest.approx(board.duration_s, abs=0.025)
    assert production.info.audio_s == pytest.approx(production.info.duration_s, abs=0.025)
    # Faded in and out, full in the middle (a looped tone has no gaps: no seams either).
    edges = [rms(samples[:RATE // 10]), rms(samples[-RATE // 10:])]
    middle = samples[len(samples) // 2 - RATE // 2:len(samples) // 2 + RATE // 2]
    assert rms(middle) > 0.1 and max(edges) < rms(middle) / 4


def test_music_volume_scales_the_level(tmp_path) -> None:
    tone = write_sine_wav(tmp_path / "tone.wav", seconds=2.0)
    levels = []
    for volume in (1.0, 0.25):
        path = tmp_path / f"{volume}.m4a"
        audio.write_soundtrack(path, tone, 2.0, volume, fade_s=0)
        levels.append(rms(encode.audio_samples(path)))
    assert levels[1] / levels[0] == pytest.approx(0.25, rel=0.05)


def test_without_music_a_silent_aac_track_is_added(tmp_path) -> None:
    production, _ = produce(tmp_path, make_board(("Quiet.", None, 24)))
    assert production.music is None
    assert [s.codec for s in production.info.streams if s.kind == "audio"] == ["aac"]
    samples = encode.audio_samples(production.video)
    assert len(samples) / RATE == pytest.approx(3.0, abs=0.025)
    assert np.abs(samples).max() == 0


def test_random_music_is_the_same_for_every_run_of_a_job(tmp_path) -> None:
    for name in ("a.wav", "b.mp3", "c.flac", ".hidden.wav", "notes.txt"):
        (tmp_path / name).write_bytes(b"")
    settings = PostConfig(music="random", music_dir=tmp_path)
    picks = {seed: audio.choose_music(settings, seed)[0].name for seed in range(20)}
    assert set(picks.values()) == {"a.wav", "b.mp3", "c.flac"}
    assert all(audio.choose_music(settings, seed)[0].name == picks[seed] for seed in picks)


def test_random_music_from_an_empty_library_is_a_warning_and_silence(tmp_path) -> None:
    music, [warning] = audio.choose_music(PostConfig(music="random", music_dir=tmp_path), 1)
    assert music is None and "found no music files" in warning and "silent" in warning


def test_a_named_file_missing_from_the_library_is_the_senders_error(tmp_path) -> None:
    (tmp_path / "calm.mp3").write_bytes(b"")
    with pytest.raises(JobError, match=r"music 'loud.mp3' is not in the music library.*"
                                       r"it has: calm.mp3"):
        audio.choose_music(PostConfig(music="loud.mp3", music_dir=tmp_path), 1)


def test_an_unreadable_music_file_fails_in_plain_words(tmp_path) -> None:
    broken = tmp_path / "broken.mp3"
    broken.write_bytes(b"this is not audio")
    with pytest.raises(JobError, match="broken.mp3 could not be read as audio"):
        audio.write_soundtrack(tmp_path / "out.m4a", broken, 2.0, 1.0, 0.5)


@pytest.mark.parametrize("name", ["../secret.wav", "/etc/passwd", "sub/x.mp3", ".hidden"])
def test_music_names_cannot_leave_the_library(name) -> None:
    with pytest.raises(ValueError, match="a file name in \\[post\\] music_dir"):
        PostConfig(music=name)
