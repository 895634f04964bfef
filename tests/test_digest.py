"""The digest: every job of a window from the job directories alone (no Redis), failures
first with their reasons, relative links to each report, and the morning cron job."""

from __future__ import annotations

import json
import os
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from PIL import Image

from daemon.cli import main
from daemon.compose import config_class, read_config
from daemon.config import DigestConfig, StateConfig
from daemon.delivery import DeliveryLoop
from daemon.jobs import Channel, JobError, JobOutcome, JobSpec, JobStatus, Source, write_spec
from daemon.queue import QueueClient
from daemon.submit import Refused, Request, Submitter
from intake.folder import FolderIntake
from tests.conftest import write_config
from workers.pipelines import digest, kind_registry
from workers.worker import create_worker, write_morning_digest

Config = config_class()  # the core's tables and the kinds'

NOW = datetime(2026, 11, 21, 7, 0, tzinfo=UTC)


def make_job(jobs: Path, job_id: str, status: JobStatus | None, hours_ago: float,
             error: str | None = None, name: str = "") -> Path:
    """A job directory as the worker leaves it: spec, log, result, and for a finished
    video its report and first keyframe."""
    finished = NOW - timedelta(hours=hours_ago)
    started = finished - timedelta(seconds=42)
    spec = JobSpec(id=job_id, kind="video", prompt=f"The story of {job_id}.",
                   source=Source(channel=Channel.folder, folder="/inbox",
                                 filename=name or f"{job_id}.txt"),
                   created_at=started - timedelta(minutes=5))
    directory = write_spec(jobs, spec)
    (directory / "log.jsonl").write_text(json.dumps({"ts": started.isoformat(),
                                                     "event": "job started"}) + "\n")
    if status is None:
        return directory
    (directory / "scenes").mkdir()
    Image.new("RGB", (240, 135), (200, 80, 40)).save(directory / "scenes" / "scene_01-k.jpg")
    if status == JobStatus.done:
        report = {"storyboard": {"title": f"Title of {job_id}", "scenes": [
            {"thumbnail": "scenes/scene_01-k.jpg"}]}, "output": {"duration_s": 12.0},
            "device": "NVIDIA RTX 4090"}
        (directory / "report.json").write_text(json.dumps(report))
        (directory / "report.html").write_text("<!doctype html><title>report</title>")
    JobOutcome(status, error=error, primary="video.mp4" if status == JobStatus.done else None,
               finished_at=finished.isoformat()).write(directory)
    return directory


@pytest.fixture
def config(tmp_path) -> Config:
    config = Config(state=StateConfig(dir=tmp_path / "state"))
    jobs = config.jobs_dir
    make_job(jobs, "done1", JobStatus.done, hours_ago=2)
    make_job(jobs, "done2", JobStatus.done, hours_ago=9)
    make_job(jobs, "broke", JobStatus.failed, hours_ago=5, error="the prompt is empty",
             name="empty.txt")
    make_job(jobs, "stopped", JobStatus.cancelled, hours_ago=3, error="cancelled by request")
    make_job(jobs, "waiting", None, hours_ago=0.5)
    make_job(jobs, "lastweek", JobStatus.failed, hours_ago=24 * 7, error="long ago")
    (jobs / "junk").mkdir()  # not a job: ignored
    return config


def test_failures_come_first_and_old_jobs_stay_out(config, tmp_path) -> None:
    entries = digest.collect(config, NOW - timedelta(days=1), NOW, tmp_path / "out")
    assert [(e.id, e.status) for e in entries] == [
        ("broke", "failed"), ("stopped", "cancelled"), ("done1", "done"), ("done2", "done"),
        ("waiting", "unfinished")]
    done = entries[2]
    assert done.title == "Title of done1" and done.video_s == 12.0 and done.run_s == 42
    assert done.device == "NVIDIA RTX 4090" and done.thumbnail.startswith("data:image/jpeg")
    assert entries[0].error == "the prompt is empty" and entries[0].report is None
    assert entries[0].thumbnail  # the keyframe a failed job had already rendered


def test_the_page_and_json_link_every_report_relatively(config, tmp_path) -> None:
    out = tmp_path / "out"
    written = digest.write(config, NOW - timedelta(days=1), NOW, out)
    page = Path(written["html"]).read_text(encoding="utf-8")
    assert page.index("empty.txt") < page.index("Title of done1") < page.index("waiting.txt")
    assert "the prompt is empty" in page and "long ago" not in page
    assert "http://" not in page and "https://" not in page
    links = [part.split('"', 1)[0] for part in page.split('href="')[1:]]
    assert "../state/jobs/done1/report.html" in links
    assert all((out / link).exists() for link in links)  # relative, and they resolve
    assert page.count("data:image/jpeg;base64,") == 4  # every job that rendered something

    latest = json.loads((out / "digest.json").read_text(encoding="utf-8"))
    assert latest == json.loads(Path(written["json"]).read_text(encoding="utf-8"))
    assert latest["counts"] == {"failed": 1, "refused": 0, "cancelled": 1, "done": 2,
                                "unfinished": 1}
    # The hook for a chat bot: a ready-to-post text.
    lines = latest["summary"].splitlines()
    assert lines[0].endswith("5 jobs (1 failed, 1 cancelled, 2 done, 1 unfinished).")
    assert lines[1] == "24 s of video made in 2.8 min of run time."
    assert lines[2:] == ["✗ empty.txt: the prompt is empty (job broke)",
                         "✗ stopped.txt: cancelled by request (job stopped)"]
    assert (out / "digest.html").read_text(encoding="utf-8") == page


async def test_refused_requests_and_jobs_cancelled_before_they_started_are_listed(
        tmp_path, redis_url) -> None:
    """Nothing looks cleaner than it was: a request refused at submission has no job
    folder but is listed with its reason; a job cancelled while queued is 'cancelled',
    not 'unfinished', and has no log to link to."""
    config = read_config(write_config(tmp_path, redis_url))
    queue = await QueueClient.open(redis_url)
    submitter = Submitter(config, queue, kind_registry(config))
    inbox = config.intake.folder[0].path
    folder = FolderIntake(config.intake.folder[0], config, submitter)
    await folder.start()
    try:
        (inbox / "broken.json").write_text('{"prompt": "a fox",')  # refused before submission
        await folder.take(inbox / "broken.json")
        refused = await submitter.submit(Request(
            kind="video", prompt="a quiet owl", options={"fps": 0},
            source=Source(channel=Channel.http, client="lab"), submitted_by="lab"))
        assert isinstance(refused, Refused)
        accepted = await submitter.submit(Request(
            kind="video", prompt="a patient heron", options={},
            source=Source(channel=Channel.cli), submitted_by="ann"))
        assert await queue.cancel(accepted.spec.id) == "cancelled"
        loop = DeliveryLoop(config, queue)
        await loop.deliver(accepted.spec.id, await queue.get_state(accepted.spec.id) or {})
    finally:
        await folder.stop()
        await queue.close()
    now = datetime.now(UTC)
    written = digest.write(config, now - timedelta(hours=1), now + timedelta(seconds=1),
                           tmp_path / "out")
    assert [(job["status"], job["title"]) for job in written["jobs"]] == [
        ("refused", "a quiet owl"), ("refused", "inbox/broken.json"),
        ("cancelled", "a patient heron")]
    assert "option 'fps'" in written["jobs"][0]["error"]
    assert "JSON is malformed" in written["jobs"][1]["error"]
    assert all(job["log"] is None for job in written["jobs"])
    assert "✗ a quiet owl: option 'fps'" in written["summary"] and "(refused, http lab)" in \
        written["summary"]
    page = Path(written["html"]).read_text(encoding="utf-8")
    assert "log.jsonl" not in page and "refused" in page


@pytest.mark.parametrize("text, expected", [
    ("12h", NOW - timedelta(hours=12)),
    ("1d", NOW - timedelta(days=1)),
    ("30m", NOW - timedelta(minutes=30)),
    ("2026-11-20T18:00+00:00", datetime(2026, 11, 20, 18, 0, tzinfo=UTC)),
])
def test_times_take_iso_and_spans_back_from_now(text, expected) -> None:
    assert digest.parse_time(text, NOW) == expected


def test_times_without_a_zone_are_local() -> None:
    moment = digest.parse_time("2026-11-20", NOW)
    assert moment == datetime(2026, 11, 20).astimezone() and moment.tzinfo is not None


def test_a_bad_time_says_what_would_do() -> None:
    with pytest.raises(JobError, match=r"'yesterday' is not a time: give an ISO date"):
        digest.parse_time("yesterday", NOW)


def test_the_command_works_without_redis(config, tmp_path, capsys, monkeypatch) -> None:
    # Logging set up on pytest's captured streams would outlive this test.
    monkeypatch.setattr("daemon.cli.configure_logging", lambda level, format: None)
    config_file = tmp_path / "config.toml"
    config_file.write_text(f'[state]\ndir = "{config.state_dir}"\n'
                           '[redis]\nurl = "redis://127.0.0.1:1/0"\n')
    out = tmp_path / "digests"
    assert main(["--config", str(config_file), "digest", "--since",
                 (datetime.now(UTC) - timedelta(days=30)).isoformat(), "--out", str(out)]) == 0
    assert "6 jobs (2 failed" in capsys.readouterr().out
    assert (out / "digest.html").exists()
    assert main(["--config", str(config_file), "digest", "--since", "soon"]) == 1
    assert "'soon' is not a time" in capsys.readouterr().err


async def test_the_morning_cron_job_writes_the_window(config, tmp_path) -> None:
    config.digest = DigestConfig(enabled=True, at="06:45", window="30d", out_dir=tmp_path / "d")
    worker = create_worker(config, "redis://127.0.0.1:1/0", name="w")
    [job] = worker.cron_jobs
    assert (job.hour, job.minute, job.name) == (6, 45, "cron:write_morning_digest")
    written = await write_morning_digest({"reelqueue": worker.ctx["reelqueue"]})
    assert Path(written["html"]).parent == tmp_path / "d"
    assert os.path.exists(tmp_path / "d" / "digest.json") and "jobs" in written["summary"]
    config.digest.enabled = False
    assert create_worker(config, "redis://127.0.0.1:1/0", name="w").cron_jobs == []


async def test_the_summary_goes_to_each_channel_outbox_named(tmp_path, redis_url):
    from daemon import outbox
    from daemon.config import RedisConfig
    from daemon.queue import QueueClient

    # chat_id, the older form, still means "post to that chat".
    config = Config(state=StateConfig(dir=tmp_path / "var"), redis=RedisConfig(url=redis_url),
                    digest=DigestConfig.model_validate({
                        "enabled": True, "chat_id": -100123, "out_dir": tmp_path / "d",
                        "post": [{"channel": "line", "to": "night-desk"}]}))
    make_job(config.jobs_dir, "failedjob", JobStatus.failed, 1, error="the GPU fell over")
    worker = create_worker(config, redis_url, name="w")
    state = worker.ctx["reelqueue"]
    state.queue = await QueueClient.open(redis_url)
    try:
        written = await write_morning_digest({"reelqueue": state})
        for channel, to in (("chat", "-100123"), ("line", "night-desk")):
            [raw] = await state.queue.redis.lrange(outbox.outbox_key(channel), 0, -1)
            assert json.loads(raw) == {"to": to, "text": written["summary"]}
    finally:
        await state.queue.close()
