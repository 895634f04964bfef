"""The ``video`` job end to end, in-process: storyboard, animatic clips, the finished
MP4 from post-production, report, reuse of finished clips, cancellation. Small frames
keep it fast. Post-production's own steps are tested in tests/test_post_*.py."""

from __future__ import annotations

import html
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from urllib.parse import urljoin, urlsplit
from urllib.request import url2pathname

import imageio_ffmpeg
import numpy as np
import pytest

from daemon.compose import config_class
from daemon.config import StateConfig
from daemon.jobs import JobError, JobOutcome, JobSpec, JobStatus, Source
from intake.folder_answers import deliver
from workers import fonts
from workers.device import device_name
from workers.pipelines import report
from workers.pipelines.overlays import wrap
from workers.pipelines.video_settings import VideoConfig
from workers.runner import Cancellation, run_job_sync

Config = config_class()  # the core's tables and the kinds'

WIDTH, HEIGHT, FPS = 256, 144, 8
SCENES = [
    {"description": "A lighthouse on a rocky coast at dusk.", "duration_s": 3},
    {"description": "Waves crash against the rocks.", "duration_s": 3, "subtitle": "Listen."},
    {"description": "The keeper's eyes, tired but calm.", "duration_s": 3},
]
FRAMES = 3 * 3 * FPS
FOX_ZH = "一只红狐狸在雪地里奔跑。夕阳西下，它回头看向镜头。"


def make_config(state: Path) -> Config:
    return Config(state=StateConfig(dir=state), video=VideoConfig(width=WIDTH, height=HEIGHT,
                                                                  fps=FPS))


def make_spec(job_id: str = "job1", prompt: str = "A lighthouse keeper's evening.",
              **options: object) -> JobSpec:
    return JobSpec(id=job_id, kind="video", prompt=prompt,
                   options={"scenes": SCENES, **options}, source=Source(channel="cli"))


def decode(path: Path) -> tuple[dict, np.ndarray]:
    reader = imageio_ffmpeg.read_frames(str(path))
    meta = next(reader)
    width, height = meta["size"]
    frames = [np.frombuffer(data, np.uint8).reshape(height, width, 3) for data in reader]
    return meta, np.stack(frames)


def log_events(job_dir: Path) -> list[dict]:
    lines = (job_dir / "log.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines]


def last_run_events(job_dir: Path) -> list[dict]:
    events = log_events(job_dir)
    starts = [i for i, event in enumerate(events) if event["event"] == "job started"]
    return events[starts[-1]:]


def clip_mtimes(job_dir: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in sorted((job_dir / "scenes").glob("*.mp4"))}


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list]:
    """One finished job shared by the read-only tests, with its progress reports."""
    config = make_config(tmp_path_factory.mktemp("state"))
    progress: list[tuple[str, float, str]] = []
    outcome = run_job_sync(make_spec(), config,
                           on_progress=lambda *report: progress.append(report))
    assert outcome.status == JobStatus.done, outcome.error
    assert outcome.primary == "video.mp4"
    return config.jobs_dir / "job1", progress


# --- the finished job -----------------------------------------------------------------------


def test_video_has_planned_frames_size_and_codec(finished) -> None:
    job_dir, _ = finished
    meta, frames = decode(job_dir / "video.mp4")
    assert meta["codec"] == "h264"
    assert meta["pix_fmt"].startswith("yuv420p")
    assert meta["size"] == (WIDTH, HEIGHT)
    assert meta["fps"] == FPS
    assert frames.shape == (FRAMES, HEIGHT, WIDTH, 3)
    assert imageio_ffmpeg.count_frames_and_secs(str(job_dir / "video.mp4")) == (FRAMES, 9.0)


def test_camera_moves_every_frame(finished) -> None:
    job_dir, _ = finished
    _, frames = decode(job_dir / "video.mp4")
    # Skip the title card (it fades) and the cuts; every other step shows motion.
    for scene in range(3):
        start = scene * 3 * FPS
        for index in range(start + 14, start + 3 * FPS - 1):
            step = np.abs(frames[index].astype(int) - frames[index + 1].astype(int)).mean()
            assert step > 0.1, f"frames {index} and {index + 1} are the same"
        travel = np.abs(frames[start + 4].astype(int) - frames[start + 3 * FPS - 1]).mean()
        assert travel > 1, f"scene {scene + 1} hardly moves"


def test_progress_goes_through_the_stages_in_order(finished) -> None:
    _, progress = finished
    stages = [stage for stage, _, _ in progress]
    assert stages[0] == "plan" and stages[-1] == "post"
    assert stages == sorted(stages, key=["plan", "render", "post"].index)
    percents = [percent for _, percent, _ in progress]
    assert percents == sorted(percents) and percents[-1] == 100
    render = [(percent, message) for stage, percent, message in progress if stage == "render"]
    assert all(5 <= percent <= 85 for percent, _ in render)
    assert all(85 <= percent <= 100 for stage, percent, _ in progress if stage == "post")
    assert {message for _, message in render} == {"scene 1 of 3", "scene 2 of 3", "scene 3 of 3"}


def test_report_json_describes_the_job(finished) -> None:
    job_dir, _ = finished
    data = json.loads((job_dir / "report.json").read_text(encoding="utf-8"))
    assert data["id"] == "job1" and data["kind"] == "video" and data["status"] == "done"
    assert data["source"]["channel"] == "cli"
    assert data["prompt"] == "A lighthouse keeper's evening."
    assert data["options"]["scenes"][1]["subtitle"] == "Listen."
    board = data["storyboard"]
    assert board["title"] == "A lighthouse keeper's evening"
    assert [s["description"] for s in board["scenes"]] == [s["description"] for s in SCENES]
    assert [s["camera"] for s in board["scenes"]] == ["wide shot", "medium shot", "close up"]
    assert [s["duration_s"] for s in board["scenes"]] == [3.0, 3.0, 3.0]
    assert [s["prompt"] for s in board["scenes"]] == [s["description"] for s in SCENES]
    assert [s["start_s"] for s in board["scenes"]] == [0.0, 3.0, 6.0]
    assert set(data["timings"]) == {"queue_wait", "plan", "render", "post", "total"}
    assert data["timings"]["queue_wait"] is None
    assert data["timings"]["total"] >= data["timings"]["render"] > 0
    assert data["timings"]["post"] > 0
    assert data["device"] == "cpu"
    assert data["output"] == {
        "path": str((job_dir / "video.mp4").resolve()), "duration_s": 9.0, "frames": FRAMES,
        "width": WIDTH, "height": HEIGHT, "fps": FPS, "codec": "h264", "pix_fmt": "yuv420p",
        "size_bytes": (job_dir / "video.mp4").stat().st_size,
        "streams": ["video: h264", "audio: aac", "subtitle: mov_text"], "fitted_kbps": None,
    }
    # It says plainly what made the picture, and how to get a model to make it.
    assert data["made_by"] == "animatic — no video model configured"
    page = html.unescape((job_dir / "report.html").read_text())
    assert "animatic — no video model configured" in page and 'backend = "diffusers"' in page
    # Enough to make it again: every setting as resolved, config defaults included.
    assert data["settings"]["video"] == {"backend": "animatic", "width": WIDTH,
                                         "height": HEIGHT, "fps": FPS, "scene_seconds": 5.0,
                                         "crf": 20}
    post = data["settings"]["post"]
    assert post["transition"] == "crossfade" and post["subtitles"] == "burn"
    assert post["look_values"]["contrast"] == 1.0
    assert [c["text"] for c in data["subtitles"]["cues"]] == [
        SCENES[0]["description"], "Listen.", SCENES[2]["description"]]
    assert data["subtitles"]["files"] == ["subtitles.srt", "subtitles.vtt"]
    assert data["music"] is None
    assert data["font"].endswith("NotoSansCJKtc-Regular.otf")
    assert data["warnings"] == [] and data["degradations"] == []
    assert data["version"]


def test_report_html_is_self_contained(finished) -> None:
    job_dir, _ = finished
    page = (job_dir / "report.html").read_text(encoding="utf-8")
    assert '<video id=film' in page and 'src="video.mp4"' in page
    assert "<script>" in page and "<script src" not in page  # the player script is inline
    assert "The keeper&#x27;s eyes, tired but calm." in page
    assert "Listen." in page and "close up" in page
    assert page.count('<img src="data:image/jpeg;base64,') == 3
    assert "<svg" in page and "render" in page  # the stage-timing bar
    assert "<track" not in page  # the subtitles are in the picture: no second copy
    assert "http://" not in page and "https://" not in page and "<link" not in page


def player_src(page: str, url: str) -> str:
    """What the page's player script sets the video's source to when the page is opened
    at ``url``: the inline script, run by node with a stand-in DOM."""
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed: the player script is not run")
    script = re.search(r"<script>(.*?)</script>", page, re.S).group(1)
    src = html.unescape(re.search(r'<video id=film[^>]* src="([^"]*)"', page).group(1))
    harness = f"""
const url = new URL({json.dumps(url)}), attrs = {{src: {json.dumps(src)}}};
const video = {{getAttribute: n => attrs[n], setAttribute: (n, v) => {{ attrs[n] = v; }}}};
const document = {{getElementById: id => (id === "film" ? video : null)}};
const location = {{pathname: url.pathname, search: url.search}};
{script}
process.stdout.write(attrs.src);
"""
    return subprocess.run([node, "-e", harness], capture_output=True, text=True, timeout=30,
                          check=True).stdout


def test_the_report_page_finds_its_video_wherever_it_is_opened(finished) -> None:
    job_dir, _ = finished
    page = (job_dir / "report.html").read_text(encoding="utf-8")
    # In the job directory (and from the digest, which links it there).
    assert player_src(page, (job_dir / "report.html").as_uri()) == "video.mp4"
    # Delivered to a folder: the stem is the page's own name's.
    assert player_src(page, "file:///srv/drop/done/fox-2.report.html") == "fox-2.mp4"
    assert player_src(page, "file:///srv/drop/done/my%20clip%20%231.report.html") == \
        "my%20clip%20%231.mp4"
    # Served by the HTTP API under a signed link: the same signature opens the video.
    served = "http://127.0.0.1:8686/jobs/job1/files/report.html?expires=99&sig=abc"
    assert player_src(page, served) == "video.mp4?expires=99&sig=abc"
    assert urljoin(served, player_src(page, served)) == \
        "http://127.0.0.1:8686/jobs/job1/files/video.mp4?expires=99&sig=abc"
    assert player_src(page, served.split("?")[0]) == "video.mp4"


def test_the_delivered_report_is_the_workers_and_names_the_delivered_video(
        finished, tmp_path) -> None:
    job_dir, _ = finished
    directory = tmp_path / "job1"
    shutil.copytree(job_dir, directory)
    inbox = tmp_path / "drop"
    (inbox / "done").mkdir(parents=True)
    (inbox / "done" / "fox.mp4").write_bytes(b"an earlier fox")  # so this one is fox-2
    (inbox / "fox.txt").write_text("A lighthouse keeper's evening.")
    spec = make_spec().model_copy(update={"source": Source(
        channel="folder", folder=str(inbox), filename="fox.txt")})
    delivered = {key: Path(value) for key, value in
                 deliver(spec, JobOutcome.read(directory), directory).items()}
    page = delivered["report.html"]
    assert page.name == "fox-2.report.html" and delivered["primary"].name == "fox-2.mp4"
    assert page.read_bytes() == (job_dir / "report.html").read_bytes()  # not re-rendered
    video = urljoin(page.as_uri(), player_src(page.read_text(encoding="utf-8"),
                                              page.as_uri()))
    assert Path(url2pathname(urlsplit(video).path)) == delivered["primary"]
    assert delivered["primary"].read_bytes() == (job_dir / "video.mp4").read_bytes()


def test_html_report_escapes_user_text(finished) -> None:
    job_dir, _ = finished
    data = json.loads((job_dir / "report.json").read_text(encoding="utf-8"))
    data["prompt"] = "<script>alert('x')</script>"
    data["storyboard"]["scenes"][0]["subtitle"] = "<b>loud</b>"
    page = report.render_html(job_dir, data, 'a"b.mp4')
    assert "<script>alert" not in page and "&lt;script&gt;alert" in page
    assert page.count("<script>") == 1  # the page's own player script only
    assert "<b>loud" not in page and "&lt;b&gt;loud" in page
    assert 'src="a&quot;b.mp4"' in page  # a URL, escaped as an attribute


def test_no_scratch_files_are_left_behind(finished) -> None:
    job_dir, _ = finished
    leftovers = [p.name for p in job_dir.rglob("*") if p.name.startswith(".")]
    assert leftovers == []
    assert len(list((job_dir / "scenes").glob("*.mp4"))) == 3
    assert len(list((job_dir / "scenes").glob("*.jpg"))) == 3


# --- text ----------------------------------------------------------------------------------


def test_wrapping_breaks_cjk_between_characters_and_shortens() -> None:
    font = fonts.load_font(fonts.find_font(FOX_ZH)[0], 16)
    lines = wrap(FOX_ZH * 2, font, 120, max_lines=3)
    assert len(lines) == 3 and lines[-1].endswith("…")
    assert all(font.getlength(line) <= 120 for line in lines)
    assert not any(line.startswith(("，", "。")) for line in lines)
    words = "a few words that will need wrapping"
    lines = wrap(words, font, 100, max_lines=5)
    assert len(lines) > 1 and " ".join(lines) == words  # breaks only between words
    assert all(font.getlength(line) <= 100 for line in lines)


def test_configured_font_must_exist(tmp_path) -> None:
    with pytest.raises(JobError, match=r"\[video\] font"):
        fonts.find_font("hello", tmp_path / "missing.ttf")


def test_font_without_cjk_gives_a_warning() -> None:
    dejavu = next((p for p in fonts.DEJAVU_PATHS if p.is_file()), None)
    if dejavu is None:
        pytest.skip("DejaVu Sans is not installed here")
    assert fonts.find_font("A fox.", dejavu) == (dejavu, [])
    font, [warning] = fonts.find_font(FOX_ZH, dejavu)
    assert font == dejavu
    assert "DejaVuSans.ttf cannot draw 一只红狐狸在…" in warning and "fonts-noto-cjk" in warning


def test_device_name_without_torch(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "torch", None)  # makes `import torch` fail
    assert device_name() == "cpu"


# --- reuse, resume and cancel -----------------------------------------------------------------


def test_rerun_reuses_every_scene_clip(tmp_path) -> None:
    config = make_config(tmp_path)
    assert run_job_sync(make_spec(), config).status == JobStatus.done
    job_dir = config.jobs_dir / "job1"
    before = clip_mtimes(job_dir)

    assert run_job_sync(make_spec(), config).status == JobStatus.done
    assert clip_mtimes(job_dir) == before
    events = [e["event"] for e in last_run_events(job_dir)]
    assert events.count("reusing scene clip") == 3
    assert "rendered scene clip" not in events
    assert "storyboard reused" in events
    assert imageio_ffmpeg.count_frames_and_secs(str(job_dir / "video.mp4"))[0] == FRAMES


def test_deleted_clip_alone_is_rendered_again(tmp_path) -> None:
    config = make_config(tmp_path)
    run_job_sync(make_spec(), config)
    job_dir = config.jobs_dir / "job1"
    before = clip_mtimes(job_dir)
    deleted = sorted(before)[1]
    (job_dir / "scenes" / deleted).unlink()

    assert run_job_sync(make_spec(), config).status == JobStatus.done
    after = clip_mtimes(job_dir)
    assert set(after) == set(before)
    assert {name for name in after if after[name] != before[name]} == {deleted}
    rendered = [e for e in last_run_events(job_dir) if e["event"] == "rendered scene clip"]
    assert [e["scene"] for e in rendered] == [2]


def test_changed_settings_render_new_clips_and_drop_old_ones(tmp_path) -> None:
    config = make_config(tmp_path)
    run_job_sync(make_spec(), config)
    job_dir = config.jobs_dir / "job1"
    before = clip_mtimes(job_dir)
    config.video.width = WIDTH + 64
    assert run_job_sync(make_spec(), config).status == JobStatus.done
    after = clip_mtimes(job_dir)
    assert len(after) == 3 and not set(after) & set(before)


def test_changed_post_settings_reuse_every_clip(tmp_path) -> None:
    config = make_config(tmp_path)
    run_job_sync(make_spec(), config)
    job_dir = config.jobs_dir / "job1"
    before = clip_mtimes(job_dir)
    config.video.crf = 30  # the finished video's quality: post alone redoes it
    config.post.transition = "fade"
    assert run_job_sync(make_spec(), config).status == JobStatus.done
    assert clip_mtimes(job_dir) == before


def test_cancel_during_render_stops_the_job_and_a_rerun_resumes(tmp_path) -> None:
    config = make_config(tmp_path)
    cancellation = Cancellation()

    def cancel_in_scene_two(stage: str, percent: float, message: str) -> None:
        if stage == "render" and message == "scene 2 of 3":
            cancellation.set(Cancellation.USER)

    outcome = run_job_sync(make_spec(), config, on_progress=cancel_in_scene_two,
                           cancellation=cancellation)
    assert outcome.status == JobStatus.cancelled
    job_dir = config.jobs_dir / "job1"
    assert not (job_dir / "video.mp4").exists()
    assert [p.name for p in job_dir.rglob("*") if p.name.startswith(".")] == []
    assert len(clip_mtimes(job_dir)) == 1  # scene 1 finished before the cancel

    assert run_job_sync(make_spec(), config).status == JobStatus.done
    events = last_run_events(job_dir)
    assert [e["scene"] for e in events if e["event"] == "reusing scene clip"] == [1]
    assert [e["scene"] for e in events if e["event"] == "rendered scene clip"] == [2, 3]


def test_bad_options_in_a_spec_fail_the_job_in_plain_words(tmp_path) -> None:
    outcome = run_job_sync(make_spec(fps=0), make_config(tmp_path))
    assert outcome.status == JobStatus.failed
    assert outcome.error.startswith("option 'fps'")


@pytest.mark.parametrize("size", [64, 72])
def test_the_smallest_documented_sizes_render(tmp_path, size) -> None:
    """64 px is the documented minimum: the scene tag must not overhang such a frame."""
    config = Config(state=StateConfig(dir=tmp_path / "var"))
    spec = JobSpec(id=f"tiny{size}", kind="video", prompt="a red fox",
                   options={"width": size, "height": size, "fps": 4, "duration": 3},
                   source=Source(channel="cli"))
    outcome = run_job_sync(spec, config)
    assert outcome.status == "done", outcome.error
