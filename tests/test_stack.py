"""End to end with real processes: Redis, `reelqueue daemon`, `reelqueue worker`,
`reelqueue up`, and the CLI, including crashes and restarts."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import imageio_ffmpeg
import pytest

from tests.conftest import REPO, wait_for, write_config

pytestmark = pytest.mark.timeout(120)

FOX = "一只红狐狸在雪地里奔跑。夕阳西下，它回头看向镜头。\n".encode()
# Long enough that a test can stop the worker between its scenes.
EIGHT_SCENES = {"prompt": "A fox runs. It stops. It looks back. The sun sets. Night falls. "
                          "Stars appear. The fox sleeps. Dawn comes.",
                "width": 480, "height": 272, "fps": 16, "duration": 24}


def inbox_of(config_file: Path) -> Path:
    inbox = config_file.parent / "inbox"
    inbox.mkdir(exist_ok=True)
    return inbox


def drop(inbox: Path, name: str, data: bytes) -> Path:
    tmp = inbox / f".{name}.part"
    tmp.write_bytes(data)
    tmp.rename(inbox / name)
    return inbox / name


def job_logs(config_file: Path) -> dict[str, list[dict]]:
    jobs = config_file.parent / "var" / "jobs"
    return {d.name: [json.loads(line) for line in (d / "log.jsonl").read_text().splitlines()]
            for d in jobs.iterdir() if (d / "log.jsonl").exists()}


def starts(events: list[dict]) -> int:
    return sum(1 for e in events if e["event"] == "job started")


def run_cli(config_file: Path, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "daemon.cli", "--config", str(config_file),
                           *args], cwd=REPO, capture_output=True, text=True, timeout=timeout)


def test_drop_a_prompt_get_a_video_and_report(config_file, spawn):
    spawn("daemon")
    spawn("worker")
    inbox = inbox_of(config_file)
    drop(inbox, "fox.txt", FOX)
    done = inbox / "done"
    wait_for(lambda: (done / "fox.txt").exists(), timeout=60, what="delivery")
    assert not (inbox / "fox.txt").exists()
    report = json.loads((done / "fox.report.json").read_text())
    frames, seconds = imageio_ffmpeg.count_frames_and_secs(str(done / "fox.mp4"))
    assert report["status"] == "done" and report["kind"] == "video"
    assert frames == report["output"]["frames"]
    assert abs(seconds - report["output"]["duration_s"]) < 0.2
    assert sum(s["duration_s"] for s in report["storyboard"]["scenes"]) == pytest.approx(
        report["output"]["duration_s"], abs=0.01)
    # The worker's page as it made it: its player finds fox.mp4 beside it by its own name.
    job_report = next((config_file.parent / "var" / "jobs").glob("*/report.html"))
    assert (done / "fox.report.html").read_bytes() == job_report.read_bytes()
    assert not [p for p in done.iterdir() if p.name.startswith(".")]  # no temp files left

    # The same file dropped again after delivery is a new request, answered beside the first.
    drop(inbox, "fox.txt", FOX)
    wait_for(lambda: (done / "fox-2.txt").exists(), timeout=60, what="second delivery")
    assert (done / "fox-2.mp4").exists() and (done / "fox.mp4").exists()


def test_a_failing_job_is_explained_in_failed(tmp_path, redis_url, spawn):
    config_file = write_config(tmp_path, redis_url,
                               video="width = 128\nheight = 96\nfps = 8\nscene_seconds = 3\n"
                                     'font = "fonts/missing.ttf"')
    spawn("daemon")
    spawn("worker")
    inbox = inbox_of(config_file)
    drop(inbox, "doomed.txt", b"a red fox runs through the snow")
    error = inbox / "failed" / "doomed.error.txt"
    wait_for(error.exists, timeout=60, what="failure delivery")
    assert "font" in error.read_text() and "missing.ttf" in error.read_text()
    assert (inbox / "failed" / "doomed.txt").read_bytes() == b"a red fox runs through the snow"


def test_daemon_killed_with_jobs_queued_loses_nothing_and_runs_nothing_twice(config_file, spawn):
    daemon = spawn("daemon")
    inbox = inbox_of(config_file)
    for n in range(3):
        drop(inbox, f"job{n}.txt", f"a red fox, take {n}".encode())
    wait_for(lambda: len(job_logs_or_specs(config_file)) == 3, what="three specs")
    time.sleep(0.5)
    daemon.kill()
    spawn("daemon")  # restarted: rescans the inbox; the queue already holds the jobs
    spawn("worker")
    done = inbox / "done"
    wait_for(lambda: len(list(done.glob("job*.txt"))) == 3, timeout=90, what="3 deliveries")
    time.sleep(1.5)  # anything run twice would show up now
    assert sorted(p.name for p in done.glob("*.mp4")) == ["job0.mp4", "job1.mp4", "job2.mp4"]
    assert list(inbox.glob("*.txt")) == []
    assert all(starts(events) == 1 for events in job_logs(config_file).values())


def job_logs_or_specs(config_file: Path) -> list[Path]:
    jobs = config_file.parent / "var" / "jobs"
    return list(jobs.glob("*/spec.json")) if jobs.exists() else []


def test_worker_killed_mid_job_resumes_and_reuses_finished_scenes(config_file, spawn):
    spawn("daemon")
    worker = spawn("worker")
    inbox = inbox_of(config_file)
    job = EIGHT_SCENES
    drop(inbox, "long.json", json.dumps(job).encode())
    scenes = config_file.parent / "var" / "jobs"
    wait_for(lambda: list(scenes.glob("*/scenes/*.mp4")), timeout=60, what="a first scene clip")
    worker.kill()
    finished_before = {p.name for p in scenes.glob("*/scenes/*.mp4")}
    assert not (inbox / "done" / "long.mp4").exists()
    restarted = time.monotonic()
    spawn("worker")  # same worker name: it recognises its dead predecessor's job at once
    wait_for(lambda: (inbox / "done" / "long.mp4").exists(), timeout=90, what="the resumed job")
    assert time.monotonic() - restarted < 60
    [events] = job_logs(config_file).values()
    assert starts(events) == 2
    reused = {e.get("clip") for e in events if e["event"] == "reusing scene clip"}
    assert finished_before <= {Path(c).name for c in reused if c}


def test_sigterm_stops_the_job_at_its_next_step_and_it_resumes_on_next_start(config_file, spawn):
    spawn("daemon")
    worker = spawn("worker")
    inbox = inbox_of(config_file)
    job = EIGHT_SCENES
    drop(inbox, "graceful.json", json.dumps(job).encode())
    jobs = config_file.parent / "var" / "jobs"
    wait_for(lambda: list(jobs.glob("*/scenes/*.mp4")), timeout=60, what="a first scene clip")
    assert worker.stop(timeout=30) == 0  # SIGTERM: a clean exit, not a kill
    [job_id] = [d.name for d in jobs.iterdir()]
    state = run_cli(config_file, "status", job_id).stdout
    assert "queued" in state and "resumes on the next start" in state
    assert not (inbox / "failed").exists() or not list((inbox / "failed").iterdir())
    spawn("worker")
    wait_for(lambda: (inbox / "done" / "graceful.mp4").exists(), timeout=90, what="the job")
    [events] = job_logs(config_file).values()
    assert starts(events) == 2
    assert any(e["event"] == "job interrupted by shutdown; it will run again" for e in events)
    assert "attempt: 1" in run_cli(config_file, "status", job_id).stdout  # not counted as a crash


def test_redis_unreachable_gives_a_clear_message(tmp_path):
    config_file = write_config(tmp_path, "redis://127.0.0.1:1/0")
    for command in (["status"], ["jobs"], ["worker"], ["daemon"]):
        result = run_cli(config_file, *command)
        assert result.returncode == 1, (command, result.stderr)
        assert "cannot reach Redis at redis://127.0.0.1:1/0" in result.stderr
        assert "Traceback" not in result.stderr + result.stdout


def test_submit_wait_status_jobs_and_cancel(config_file, spawn):
    spawn("daemon")
    queued = run_cli(config_file, "submit", "a", "lonely", "fox", "-o", "duration=3")
    assert queued.returncode == 0, queued.stderr
    job_id = queued.stdout.split("queued job ")[1].split()[0]
    cancelled = run_cli(config_file, "cancel", job_id)
    assert "cancelled before it started" in cancelled.stdout
    status = run_cli(config_file, "status", job_id)
    assert "cancelled" in status.stdout
    spawn("worker")
    waited = run_cli(config_file, "submit", "a red fox in the snow", "-o", "duration=3",
                     "--wait", timeout=90)
    assert waited.returncode == 0, waited.stdout + waited.stderr
    assert "done" in waited.stdout and ".mp4" in waited.stdout
    listing = run_cli(config_file, "jobs")
    assert "cancelled" in listing.stdout and "done" in listing.stdout
    overview = run_cli(config_file, "status")
    assert "queue length: 0" in overview.stdout and "worker test-worker" in overview.stdout
    bad = run_cli(config_file, "submit", "x", "-o", "fps=0")
    assert bad.returncode == 1 and "option 'fps'" in bad.stderr


def test_cancel_a_running_job(config_file, spawn):
    spawn("daemon")
    spawn("worker")
    job = {"prompt": "A fox runs. It stops. It looks back. The sun sets.",
           "width": 640, "height": 360, "fps": 24, "duration": 24}
    inbox = inbox_of(config_file)
    drop(inbox, "stop-me.json", json.dumps(job).encode())
    jobs = config_file.parent / "var" / "jobs"
    wait_for(lambda: any("render" in (d / "log.jsonl").read_text()
                         for d in jobs.glob("*") if (d / "log.jsonl").exists())
             or list(jobs.glob("*/scenes/*.mp4")), timeout=60, what="rendering")
    [job_id] = [d.name for d in jobs.iterdir()]
    result = run_cli(config_file, "cancel", job_id)
    assert result.returncode == 0 and "running" in result.stdout, result.stdout
    error = inbox / "failed" / "stop-me.error.txt"
    wait_for(error.exists, timeout=30, what="the cancellation notice")
    assert "cancelled" in error.read_text()


def test_up_runs_everything_and_stops_cleanly_on_ctrl_c(tmp_path):
    config_file = write_config(tmp_path, "")  # embedded Redis, started by `up`
    inbox = inbox_of(config_file)
    up = subprocess.Popen([sys.executable, "-m", "daemon.cli", "--config", str(config_file),
                           "up"], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        drop(inbox, "fox.txt", FOX)
        wait_for(lambda: (inbox / "done" / "fox.mp4").exists(), timeout=90, what="delivery")
    finally:
        up.send_signal(2)  # Ctrl-C
        output = up.communicate(timeout=60)[0].decode()
    assert up.returncode == 0, output
    socket = tmp_path / "var" / "redis" / "redis.sock"
    assert not socket.exists()  # the embedded Redis was shut down with it
    assert (tmp_path / "var" / "redis" / "appendonly.aof").exists() or \
        (tmp_path / "var" / "redis" / "appendonlydir").exists()


def test_a_job_over_its_timeout_fails_with_that_reason(tmp_path, redis_url, spawn):
    config_file = write_config(tmp_path, redis_url,
                               worker='job_timeout = "2s"\nname = "test-worker"')
    spawn("daemon")
    spawn("worker")
    inbox = inbox_of(config_file)
    job = {"prompt": "A fox runs. It stops. It looks back. The sun sets. Night falls.",
           "width": 832, "height": 480, "fps": 24, "duration": 40}
    drop(inbox, "slow.json", json.dumps(job).encode())
    error = inbox / "failed" / "slow.error.txt"
    wait_for(error.exists, timeout=60, what="the timeout notice")
    assert "longer than the worker's job_timeout (2 s)" in error.read_text()


def test_media_kinds_through_their_own_folders(tmp_path, redis_url, spawn):
    import sys
    import zipfile

    import cv2

    from tests.synthetic import render

    research = Path(__file__).parent / "fixtures" / "research_ok.py"
    config_file = write_config(
        tmp_path, redis_url,
        **{"intake.folder": 'path = "inbox"\nsettle = "0.5s"\n'
                            '[[intake.folder]]\npath = "exposures"\nkind = "long_exposure"\n'
                            'max_file_mb = 50\nsettle = "0.5s"\n'
                            '[[intake.folder]]\npath = "relight"\nkind = "relight"\n'
                            'settle = "0.5s"',
           "pipelines.relight": f'type = "command"\ninputs = ["video"]\n'
                                f'command = ["{sys.executable}", "{research}", "--in", '
                                f'"{{input}}", "--out", "{{outdir}}"]\n'
                                'outputs = ["result.bin", "metrics.json"]'})
    spawn("daemon")
    spawn("worker")
    exposures = config_file.parent / "exposures"
    relight = config_file.parent / "relight"
    wait_for(lambda: exposures.exists() and relight.exists(), what="the folders")
    burst = tmp_path / "burst.zip"
    with zipfile.ZipFile(burst, "w") as archive:
        for i, frame in enumerate(render(160, 96, step=8, sparse_frames=5).frames):
            archive.writestr(f"IMG_{i}.png",
                             cv2.imencode(".png", (frame[..., ::-1] * 255).astype("uint8"))[1])
    (exposures / ".night.zip.part").write_bytes(burst.read_bytes())
    (exposures / ".night.zip.part").rename(exposures / "night.zip")
    drop(relight, "take1.mp4", b"not really a video, but the research CLI does not care")
    wait_for(lambda: (exposures / "done" / "night.zip").exists(), timeout=60, what="exposure")
    assert cv2.imread(str(exposures / "done" / "night.png")) is not None
    report = json.loads((exposures / "done" / "night.report.json").read_text())
    assert report["kind"] == "long_exposure" and report["frames_used"] >= 2
    wait_for(lambda: (relight / "done" / "take1.mp4").exists(), timeout=60, what="relight")
    assert (relight / "done" / "take1.bin").exists()
    assert json.loads((relight / "done" / "take1.metrics.json").read_text())["psnr"] == 31.5
    drop(exposures, "notes.txt", b"a long exposure needs pictures")
    error = exposures / "failed" / "notes.error.txt"
    wait_for(error.exists, what="the refusal")
    assert "a long_exposure job needs an input file (.mp4" in error.read_text()


def test_a_job_that_kills_its_worker_every_time_fails_after_max_tries(tmp_path, redis_url,
                                                                      spawn):
    import sys

    killer = Path(__file__).parent / "fixtures" / "research_kill_worker.py"
    config_file = write_config(
        tmp_path, redis_url,
        **{"intake.folder": 'path = "inbox"\nkind = "killer"\nsettle = "0.5s"',
           "worker": 'job_timeout = "2m"\nmax_tries = 2\nname = "test-worker"',
           "pipelines.killer": f'type = "command"\ninputs = ["text"]\n'
                               f'command = ["{sys.executable}", "{killer}"]'})
    spawn("daemon")
    inbox = inbox_of(config_file)
    drop(inbox, "poison.txt", b"this job takes its worker down")
    error = inbox / "failed" / "poison.error.txt"
    deaths = 0
    deadline = time.monotonic() + 90
    while not error.exists() and time.monotonic() < deadline:
        worker = spawn("worker")  # what a supervisor does: start it again
        while worker.popen.poll() is None and not error.exists():
            time.sleep(0.1)
        deaths += worker.popen.returncode == -9
    assert error.exists(), "the poison job never failed"
    assert deaths == 2
    assert "started 2 times and each time its worker died" in error.read_text()


def test_up_beside_leftovers_of_an_earlier_up_names_them_and_starts_nothing(tmp_path):
    from daemon.lifeline import command_line

    config_file = write_config(tmp_path, "")
    leftover = subprocess.Popen(["sleep", "60"])  # stands in for an orphaned daemon
    try:
        state = tmp_path / "var"
        state.mkdir()
        (state / "up.json").write_text(json.dumps({
            "up": {"pid": 999999999, "argv": ["gone"]},
            "daemon": {"pid": leftover.pid, "argv": command_line(leftover.pid)}}))
        result = run_cli(config_file, "up", timeout=30)
        assert result.returncode == 1, result.stdout + result.stderr
        assert f"daemon (pid {leftover.pid})" in result.stderr
        assert f"kill {leftover.pid}" in result.stderr
        assert not (state / "redis" / "redis.sock").exists()  # nothing was started
        assert leftover.poll() is None  # and nothing was killed
    finally:
        leftover.kill()
        leftover.wait()
