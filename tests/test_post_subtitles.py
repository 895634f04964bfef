"""Subtitles: cues from the storyboard, .srt/.vtt timing, text burned in exactly while
its cue runs, CJK drawn with a CJK font, and a warning instead of empty boxes when
no font can draw the text."""

from __future__ import annotations

import json

import numpy as np
import pytest

from daemon.compose import config_class
from daemon.config import StateConfig
from daemon.encoding import probe
from daemon.jobs import JobSpec, JobStatus, Source
from tests.test_post import FMT, GREY, decode, make_board, produce
from workers import fonts
from workers.pipelines import subtitles
from workers.pipelines.video_settings import PostConfig, VideoConfig
from workers.runner import run_job_sync

Config = config_class()  # the core's tables and the kinds'

FOX_ZH = "一只红狐狸在雪地里奔跑。夕阳西下，它回头看向镜头。"
DEJAVU = next((p for p in fonts.DEJAVU_PATHS if p.is_file()), None)
needs_dejavu = pytest.mark.skipif(DEJAVU is None, reason="DejaVu Sans is not installed here")


def text_rows(frames: np.ndarray, background: tuple[int, int, int] = GREY) -> np.ndarray:
    """Per frame: whether anything but the flat background shows in the bottom third,
    where subtitles go."""
    bottom = frames[:, FMT.height * 2 // 3:].astype(int)
    return np.abs(bottom - np.array(background)).max(axis=(1, 2, 3)) > 40


def test_cues_follow_the_scenes() -> None:
    layout = subtitles.Layout(FMT.width, FMT.height, fonts.find_font("x")[0], "outline")
    long = "a rather long subtitle that cannot fit on two lines of such a narrow frame"
    board = make_board(("Silent scene.", "", 24), ("Shown as its description.", None, 24),
                       ("Same words.", None, 16), ("Same words.", None, 16),
                       ("ignored", long, 40))
    cues = subtitles.cues_for(board, layout)
    assert cues[0] == subtitles.Cue(24, 48, ("Shown as its", "description."))
    assert (cues[1].start, cues[1].end, cues[1].text) == (48, 80, "Same words.")  # merged
    rest = cues[2:]
    assert len(rest) > 1 and all(len(cue.lines) <= subtitles.MAX_LINES for cue in rest)
    assert (rest[0].start, rest[-1].end) == (80, 120)  # split, the scene's span shared out
    assert all(a.end == b.start for a, b in zip(rest, rest[1:], strict=False))
    assert " ".join(line for cue in rest for line in cue.lines) == long


def test_srt_and_vtt_are_timed_to_the_scenes(tmp_path) -> None:
    board = make_board(("Dusk.", "", 24), ("Waves.", "Listen.", 20), ("Eyes.", None, 28))
    production, job = produce(tmp_path, board)
    assert [p.name for p in production.subtitle_files] == ["subtitles.srt", "subtitles.vtt"]
    assert (job.dir / "subtitles.srt").read_text(encoding="utf-8") == (
        "1\n00:00:03,000 --> 00:00:05,500\nListen.\n\n"
        "2\n00:00:05,500 --> 00:00:09,000\nEyes.\n\n")
    assert (job.dir / "subtitles.vtt").read_text(encoding="utf-8") == (
        "WEBVTT\n\n00:00:03.000 --> 00:00:05.500\nListen.\n\n"
        "00:00:05.500 --> 00:00:09.000\nEyes.\n\n")


def test_burned_in_text_shows_exactly_while_its_cue_runs(tmp_path) -> None:
    board = make_board(("Dusk.", "", 24), ("Waves.", "Listen.", 20), ("Eyes.", None, 28))
    production, _ = produce(tmp_path, board)
    assert production.burned_in
    frames = decode(production.video)
    shown = text_rows(frames)
    assert not shown[:24].any()  # scene 1 is silent
    assert shown[24:].all()
    # The text changes at the cut between scenes 2 and 3, and nowhere else.
    bottom = frames[:, FMT.height * 2 // 3:].astype(int)
    steps = [np.abs(bottom[i + 1] - bottom[i]).mean() for i in range(24, 71)]
    assert int(np.argmax(steps)) + 24 == 43 and max(steps) > 10 * np.median(steps) + 0.5
    assert np.abs(frames[:, :FMT.height // 2].astype(int) - GREY).max() < 40  # bottom only


def test_cjk_subtitles_are_drawn_with_a_cjk_font(tmp_path) -> None:
    sunset = "夕阳西下，它回头看向镜头。"
    board = make_board((sunset, None, 32))
    font, warnings = fonts.find_font(board.text())
    assert warnings == [] and fonts.covers(font, sunset)
    production, _ = produce(tmp_path, board, font=font)
    shown = decode(production.video)[16].astype(int)
    layout = subtitles.Layout(FMT.width, FMT.height, font, "outline")
    [cue] = production.cues
    assert "".join(cue.lines) == sunset and len(cue.lines) == 2  # broken without spaces
    expected = np.full((FMT.height, FMT.width, 3), GREY, np.uint8)
    overlay = layout.overlay(cue.lines)
    overlay.apply(expected)
    region = (overlay.rows, overlay.columns)
    # The picture matches the CJK rendering, up to compression noise around the glyphs…
    assert np.abs(shown[region] - expected[region]).mean() < 6
    # …and that rendering is real glyphs, not the empty boxes a Latin font would draw.
    if DEJAVU is not None:
        boxes = np.full_like(expected, GREY)
        subtitles.Layout(FMT.width, FMT.height, DEJAVU, "outline").overlay(cue.lines).apply(boxes)
        assert np.abs(boxes.astype(int) - expected).mean() > 3


@needs_dejavu
def test_without_a_font_for_the_script_the_job_warns_and_draws_no_boxes(tmp_path) -> None:
    config = Config(state=StateConfig(dir=tmp_path), post=PostConfig(transition="cut"),
                    video=VideoConfig(width=FMT.width, height=FMT.height, fps=FMT.fps,
                                      font=DEJAVU))
    spec = JobSpec(id="zh", kind="video", prompt=FOX_ZH, options={"duration": 9},
                   source=Source(channel="cli"))
    outcome = run_job_sync(spec, config)
    assert outcome.status == JobStatus.done, outcome.error
    job_dir = config.jobs_dir / "zh"
    report = json.loads((job_dir / "report.json").read_text(encoding="utf-8"))
    [warning] = report["warnings"]
    assert "DejaVuSans.ttf cannot draw" in warning and "fonts-noto-cjk" in warning
    assert report["degradations"][0].startswith("subtitles not burned in")
    assert report["subtitles"]["burned_in"] is False
    # The words still travel: in the files and as a track a player draws with its fonts.
    assert "夕阳西下" in (job_dir / "subtitles.srt").read_text(encoding="utf-8")
    streams = probe(job_dir / "video.mp4").streams
    assert [s.codec for s in streams if s.kind == "subtitle"] == ["mov_text"]
    assert "<track" in (job_dir / "report.html").read_text(encoding="utf-8")


@needs_dejavu
def test_unburned_subtitles_leave_the_picture_alone(tmp_path) -> None:
    board = make_board((FOX_ZH, None, 24))
    production, _ = produce(tmp_path, board, font=DEJAVU)
    assert not production.burned_in and not text_rows(decode(production.video)).any()


def test_soft_subtitles_are_a_track_and_files_only(tmp_path) -> None:
    board = make_board(("Waves.", "Listen.", 24))
    production, job = produce(tmp_path / "soft", board, subtitles="soft")
    assert not production.burned_in and not text_rows(decode(production.video)).any()
    assert [s.codec for s in production.info.streams if s.kind == "subtitle"] == ["mov_text"]
    assert (job.dir / "subtitles.vtt").is_file()

    production, job = produce(tmp_path / "off", board, subtitles="off")
    assert production.cues == [] and production.subtitle_files == []
    assert [s.kind for s in production.info.streams] == ["video", "audio"]
    assert not (job.dir / "subtitles.srt").exists()


def test_box_style_darkens_behind_the_text() -> None:
    font = fonts.find_font("x")[0]
    lines = ("Listen.",)
    frames = {}
    for style in ("outline", "box"):
        frame = np.full((FMT.height, FMT.width, 3), 200, np.uint8)
        overlay = subtitles.Layout(FMT.width, FMT.height, font, style).overlay(lines)
        overlay.apply(frame)
        frames[style] = frame[overlay.rows, overlay.columns].astype(int)
        # Inside the safe area: clear of the bottom edge and centred.
        assert overlay.rows.stop <= FMT.height * 0.95
        assert abs(overlay.columns.start - (FMT.width - overlay.columns.stop)) <= 1
    assert frames["box"].mean() < frames["outline"].mean() - 20
