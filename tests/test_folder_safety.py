"""The drop folder does not trust the file system (issue 13): it takes regular files
only and never follows a link, a FIFO cannot hang it, it writes nothing through a
symlinked ``done/`` or ``failed/``, every name it writes fits the file system, and a
request rewritten after it was taken is not delivered as if it were the old one.

In-process with the real FolderIntake and Redis where only taking is involved; the
real daemon (and worker) where a hang, a log or a delivery is."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from daemon.jobs import JobOutcome, JobSpec, JobStatus, Source
from intake.folder_answers import deliver, unique_stem
from tests.conftest import wait_for
from tests.test_folder_intake import drop, intake, queued_ids, until  # noqa: F401 (fixture)

pytestmark = pytest.mark.timeout(120)

SECRET = b"TOPSECRET-7f3a a red fox runs through the snow"
NAME_MAX = 255


def regular_files(root: Path) -> list[Path]:
    """Every regular file under ``root``, never following a link."""
    found = []
    for directory, _, names in os.walk(root, followlinks=False):
        for name in names:
            path = Path(directory) / name
            if path.is_file() and not path.is_symlink():
                found.append(path)
    return found


def names_under(root: Path) -> list[str]:
    return [name for _, dirs, names in os.walk(root) for name in dirs + names]


def inbox_of(config_file: Path) -> Path:
    inbox = config_file.parent / "inbox"
    inbox.mkdir(exist_ok=True)
    return inbox


def specs(config_file: Path) -> list[dict]:
    jobs = config_file.parent / "var" / "jobs"
    return [json.loads(p.read_text()) for p in jobs.glob("*/spec.json")] if jobs.exists() else []


# --- 1. links are refused, never followed ------------------------------------------------


async def test_a_symlink_to_a_secret_is_refused_and_never_read(intake, queue, config,  # noqa: F811
                                                                 tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_bytes(SECRET)
    os.symlink(secret, intake.path / "leak.txt")
    failed = intake.path / "failed"
    error = await until(lambda: (failed / "leak.error.txt").exists() and
                        failed / "leak.error.txt", what="the refusal")
    assert "symbolic link" in error.read_text()
    # The link itself was moved, its target left alone and unread.
    assert (failed / "leak.txt").is_symlink()
    assert os.readlink(failed / "leak.txt") == str(secret)
    assert secret.read_bytes() == SECRET
    await asyncio.sleep(0.5)
    assert await queued_ids(queue) == []
    for path in regular_files(intake.path) + regular_files(config.state_dir):
        assert b"TOPSECRET" not in path.read_bytes(), path


def test_a_symlink_to_a_directory_is_refused_without_a_traceback(config_file, spawn, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "private.txt").write_bytes(SECRET)
    inbox = inbox_of(config_file)
    daemon = spawn("daemon")
    wait_for(lambda: "watching folder" in daemon.log(), what="the daemon to start")
    os.symlink(elsewhere, inbox / "dir.txt")
    error = inbox / "failed" / "dir.error.txt"
    wait_for(error.exists, timeout=15, what="the refusal")
    assert "symbolic link" in error.read_text()
    assert (inbox / "failed" / "dir.txt").is_symlink()
    assert [p.name for p in elsewhere.iterdir()] == ["private.txt"]
    assert daemon.stop() == 0
    assert "Traceback" not in daemon.log() and '"exception"' not in daemon.log()


# --- 2. nothing is written through a symlinked done/ or failed/ ---------------------------


async def test_a_symlinked_failed_folder_receives_nothing(intake, queue, tmp_path):  # noqa: F811
    victim = tmp_path / "victim-ssh"
    victim.mkdir()
    failed = intake.path / "failed"
    failed.rmdir()
    os.symlink(victim, failed)
    with capture_logs() as logs:
        drop(intake.path, "authorized_keys", b"ssh-ed25519 AAAA attacker@example")
        await until(lambda: any(e["log_level"] == "error" for e in logs), what="an error")
        await asyncio.sleep(1.0)
    assert list(victim.iterdir()) == []
    assert (intake.path / "authorized_keys").exists()  # kept in the inbox
    [error] = [e for e in logs if e["log_level"] == "error"]  # once, not at every event
    assert error["folder"] == str(failed) and "remove" in error["fix"]
    # Once the folder is a real one again, the refusal is written there.
    failed.unlink()
    failed.mkdir()
    intake.scan()
    await until((failed / "authorized_keys.error.txt").exists, what="the refusal")
    assert list(victim.iterdir()) == []


def test_a_symlinked_done_folder_receives_nothing_and_the_request_stays(tmp_path):
    inbox, directory, victim = tmp_path / "drop", tmp_path / "jobs" / "job1", tmp_path / "v"
    for folder in (inbox, directory / "inputs", victim):
        folder.mkdir(parents=True)
    os.symlink(victim, inbox / "done")
    (inbox / "fox.txt").write_text("a red fox")
    (directory / "inputs" / "fox.txt").write_text("a red fox")
    for name in ("video.mp4", "report.json", "report.html"):
        (directory / name).write_text(name)
    spec = JobSpec(id="job1", kind="video", prompt="a red fox",
                   source=Source(channel="folder", folder=str(inbox), filename="fox.txt"))
    outcome = JobOutcome(JobStatus.done, primary="video.mp4",
                         reports=["report.json", "report.html"])
    with pytest.raises(OSError, match="symbolic link"):
        deliver(spec, outcome, directory)
    assert list(victim.iterdir()) == []
    assert (inbox / "fox.txt").read_text() == "a red fox"


# --- 3. a FIFO cannot hang the folder -------------------------------------------------------


def test_a_fifo_is_refused_and_the_folder_goes_on_and_stops_on_sigterm(config_file, spawn):
    inbox = inbox_of(config_file)
    daemon = spawn("daemon")
    wait_for(lambda: "watching folder" in daemon.log(), what="the daemon to start")
    os.mkfifo(inbox / "pipe.txt")
    time.sleep(3.0)  # past the settle time of a file never seen closed: the FIFO is taken
    drop(inbox, "fox.txt", b"a red fox runs through the snow")
    wait_for(lambda: [s for s in specs(config_file) if s["source"]["filename"] == "fox.txt"],
             timeout=15, what="the file dropped after the FIFO to be taken")
    error = inbox / "failed" / "pipe.error.txt"
    wait_for(error.exists, timeout=10, what="the FIFO's refusal")
    assert "FIFO" in error.read_text()
    assert (inbox / "failed" / "pipe.txt").is_fifo()
    daemon.popen.send_signal(signal.SIGTERM)
    started = time.monotonic()
    try:
        daemon.popen.wait(timeout=5)
    except Exception:
        pytest.fail("the daemon did not stop within 5 s of SIGTERM")
    assert time.monotonic() - started < 5


# --- 4. names that fit, and a rewritten request ----------------------------------------------


def test_a_240_character_stem_is_delivered_under_names_that_fit(config_file, spawn):
    inbox = inbox_of(config_file)
    spawn("daemon")
    spawn("worker")
    name = "f" * 240 + ".txt"
    drop(inbox, name, b"a red fox runs through the snow")
    jobs = config_file.parent / "var" / "jobs"

    def delivered() -> dict | None:
        for plan in jobs.glob("*/delivery.json"):
            data = json.loads(plan.read_text())
            if data["delivered"]:
                return data
        return None

    plan = wait_for(delivered, timeout=90, what="the delivery")
    done = inbox / "done"
    assert not (inbox / name).exists()
    written = {key: Path(path) for key, path in plan["files"].items()}
    assert {"request", "primary", "report.json", "report.html"} <= set(written)
    stem = written["request"].name.removesuffix(".txt")
    assert stem and "f" * len(stem) == stem
    for path in written.values():
        assert path.parent == done and path.exists() and path.name.startswith(stem)
    assert written["primary"].suffix == ".mp4"
    assert written["request"].read_bytes() == b"a red fox runs through the snow"
    assert all(len(n.encode()) <= NAME_MAX for n in names_under(inbox))
    assert not [p for p in done.iterdir() if p.name.startswith(".")]


async def test_a_250_character_stem_is_refused_under_names_that_fit(intake, queue):  # noqa: F811
    name = "g" * 250 + ".txt"  # 254 bytes: no room for a ".part" temp name, written in place
    (intake.path / name).write_bytes(b"a red fox runs through the snow")
    failed = intake.path / "failed"
    errors = await until(lambda: list(failed.glob("*.error.txt")), what="the refusal")
    [error] = errors
    assert "name" in error.read_text() and "bytes" in error.read_text()
    stem = error.name.removesuffix(".error.txt")
    assert (failed / f"{stem}.txt").read_bytes() == b"a red fox runs through the snow"
    assert not (intake.path / name).exists()
    assert await queued_ids(queue) == []
    # Room is left for the temp name every write goes through ("." + name + ".tmp").
    assert all(len(n.encode()) + 5 <= NAME_MAX for n in names_under(intake.path))


def test_unique_stem_shortens_by_utf8_bytes_and_keeps_room_for_its_counter(tmp_path):
    stem = "狐" * 84  # 252 bytes
    suffixes = [".txt", ".report.html", ".subtitles.srt"]
    first = unique_stem(tmp_path, stem, suffixes)
    assert stem.startswith(first)
    assert all(len(f".{first}{suffix}.tmp".encode()) <= NAME_MAX for suffix in suffixes)
    for suffix in suffixes:
        (tmp_path / f"{first}{suffix}").write_text("")
    second = unique_stem(tmp_path, stem, suffixes)
    assert second.endswith("-2") and stem.startswith(second.removesuffix("-2"))
    assert all(len(f".{second}{suffix}.tmp".encode()) <= NAME_MAX for suffix in suffixes)


def test_a_request_rewritten_after_it_was_taken_is_not_delivered_as_the_old_one(
        config_file, spawn):
    inbox = inbox_of(config_file)
    spawn("daemon")
    old, new = b"a red fox runs through the snow", b"a grey wolf howls at the moon"
    drop(inbox, "fox.txt", old)
    wait_for(lambda: len(specs(config_file)) == 1, what="the first job")
    drop(inbox, "fox.txt", new)  # rewritten while its job waits
    wait_for(lambda: len(specs(config_file)) == 2, what="the rewrite taken as a new job")
    spawn("worker")
    done = inbox / "done"
    wait_for(lambda: (done / "fox.mp4").exists() and (done / "fox.txt").exists(), timeout=90,
             what="the first delivery")
    # The old job's answer carries the request it was made from...
    assert (done / "fox.txt").read_bytes() == old
    # ...and the new text stayed in the inbox, a request of its own, answered beside it.
    wait_for(lambda: (done / "fox-2.txt").exists(), timeout=90, what="the second delivery")
    assert (done / "fox-2.txt").read_bytes() == new and (done / "fox-2.mp4").exists()
    assert not (inbox / "fox.txt").exists()
