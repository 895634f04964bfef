"""The drop folder with a real watchdog observer and a real Redis (no worker here:
these tests check what is taken, when, how often, and how refusals are explained)."""

from __future__ import annotations

import asyncio
import hashlib
import inspect
import os
import time
from pathlib import Path

import pytest

from daemon.config import Config
from daemon.jobs import JobOutcome, JobSpec, JobStatus, Source, read_spec
from daemon.queue import QueueClient
from intake.folder import FolderIntake, folder_job_id
from intake.folder_answers import deliver
from tests.conftest import submitter_for

pytestmark = pytest.mark.timeout(60)


async def until(predicate, timeout=10.0, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return value
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture
async def intake(config: Config, queue: QueueClient):
    folder = config.intake.folder[0]
    running = FolderIntake(folder, config, submitter_for(config, queue))
    await running.start()
    yield running
    await running.stop()


async def queued_ids(queue: QueueClient) -> list[str]:
    return [raw.decode() for raw in await queue.redis.zrange("arq:queue", 0, -1)]


def drop(folder: Path, name: str, data: bytes) -> Path:
    """Write the way a careful tool does: to a temp name, then rename into place."""
    tmp = folder / f".{name}.part"
    tmp.write_bytes(data)
    tmp.rename(folder / name)
    return folder / name


async def test_a_prompt_file_becomes_one_queued_job(intake, queue, config):
    data = "一只红狐狸在雪地里奔跑。夕阳西下，它回头看向镜头。\n".encode()
    path = drop(intake.path, "fox.txt", data)
    expected = folder_job_id(config.jobs_dir, intake.path, "fox.txt",
                             hashlib.sha256(data).hexdigest())
    await until(lambda: queued_ids(queue), what="the job to be queued")
    assert await queued_ids(queue) == [expected]
    spec = read_spec(config.jobs_dir, expected)
    assert spec.prompt.startswith("一只红狐狸")
    assert spec.source.filename == "fox.txt" and spec.source.folder == str(intake.path)
    kept = config.jobs_dir / expected / "inputs" / "fox.txt"
    assert kept.read_bytes() == data  # the input is kept exactly as received
    assert path.exists()  # and the request stays in the inbox until delivered
    state = await queue.get_state(expected)
    assert state["status"] == "queued" and state["position"] == 1


async def test_same_file_seen_twice_is_queued_once(intake, queue):
    path = drop(intake.path, "a.txt", b"a red fox")
    await until(lambda: queued_ids(queue), what="first enqueue")
    # A duplicate watcher event, a rescan, and a direct second take: still one job.
    os.utime(path)
    intake.scan()
    await intake.take(path)
    await asyncio.sleep(1.0)
    assert len(await queued_ids(queue)) == 1


async def test_same_content_under_two_names_is_two_jobs(intake, queue):
    drop(intake.path, "one.txt", b"a red fox")
    drop(intake.path, "two.txt", b"a red fox")
    ids = await until(lambda: _two(queue), what="two jobs")
    assert len(set(ids)) == 2


async def _two(queue):
    ids = await queued_ids(queue)
    return ids if len(ids) == 2 else None


async def test_file_written_in_two_halves_is_taken_once_with_full_content(intake, queue, config):
    path = intake.path / "slow.txt"
    with open(path, "wb") as handle:
        handle.write(b"a red fox runs through the snow. ")
        handle.flush()
        await asyncio.sleep(2.0)  # longer than the folder's settle time
        assert await queued_ids(queue) == []  # still open for writing: not taken
        handle.write(b"the sun sets behind it.")
    ids = await until(lambda: queued_ids(queue), what="the finished file")
    await asyncio.sleep(1.0)
    assert len(await queued_ids(queue)) == 1
    assert read_spec(config.jobs_dir, ids[0]).prompt.endswith("the sun sets behind it.")


async def test_file_renamed_in_from_a_temp_name_starts_quickly(intake, queue):
    started = time.monotonic()
    drop(intake.path, "quick.txt", b"a red fox")
    await until(lambda: queued_ids(queue), what="enqueue")
    assert time.monotonic() - started < 1.0


@pytest.mark.parametrize("name", [".hidden.txt", "draft.txt~", "a.tmp", "b.part", ".c.swp",
                                  "d.swp", "e.crdownload"])
async def test_temp_and_hidden_files_are_ignored(intake, queue, name):
    (intake.path / name).write_bytes(b"a red fox")
    await asyncio.sleep(1.0)
    assert await queued_ids(queue) == []
    assert (intake.path / name).exists()
    assert list((intake.path / "failed").iterdir()) == []


async def test_file_deleted_before_it_is_taken_is_forgotten(intake, queue):
    path = intake.path / "gone.txt"
    path.write_bytes(b"a red fox")
    path.unlink()
    await asyncio.sleep(1.0)
    assert await queued_ids(queue) == []
    assert list((intake.path / "failed").iterdir()) == []


@pytest.mark.parametrize("name, data, reason", [
    ("empty.txt", b"", "the file is empty"),
    ("binary.txt", bytes(range(256)) * 4, "looks like a binary file"),
    ("latin1.txt", "café".encode("latin-1"), "not valid UTF-8"),
    ("broken.json", b'{"prompt": "a fox", "duration": }', "JSON is malformed at line 1"),
    ("broken.toml", b'prompt = "a fox\nduration = 5\n', "TOML is malformed"),
    ("unknown.json", b'{"prompt": "a fox", "soundtrack": "jazz"}', "unknown option 'soundtrack'"),
    ("negative.json", b'{"prompt": "a fox", "duration": -3}', "option 'duration'"),
    ("huge.json", b'{"prompt": "a fox", "width": 99999, "height": 99999}', "option 'width'"),
    ("fast.json", b'{"prompt": "a fox", "fps": 5000}', "option 'fps'"),
    ("kind.json", b'{"prompt": "a fox", "kind": "teleport"}', "unknown job kind 'teleport'"),
    ("notes.pdf", b"%PDF-1.4 ...", "unsupported file type '.pdf'"),
])
async def test_bad_files_go_to_failed_with_an_explanation(intake, queue, name, data, reason):
    drop(intake.path, name, data)
    failed = intake.path / "failed"
    stem = Path(name).stem
    error = await until(lambda: (failed / f"{stem}.error.txt").exists() and
                        failed / f"{stem}.error.txt", what="the error file")
    text = error.read_text()
    assert reason in text and name in text
    assert (failed / name).read_bytes() == data  # the input is kept, unchanged
    assert not (intake.path / name).exists()
    assert await queued_ids(queue) == []


async def test_a_100_mb_text_file_is_refused_without_reading_it(intake, queue):
    path = intake.path / ".big.txt.part"
    with open(path, "wb") as handle:
        chunk = (b"a red fox runs through the snow. " * 32768)[: 1024 * 1024]
        for _ in range(100):
            handle.write(chunk)
    path.rename(intake.path / "big.txt")
    error = intake.path / "failed" / "big.error.txt"
    await until(error.exists, timeout=20, what="the refusal")
    assert "the file is 100.0 MB; this folder takes files up to 1 MB" in error.read_text()
    assert (intake.path / "failed" / "big.txt").stat().st_size == 100 * 1024 * 1024


async def test_refusals_never_overwrite_each_other(intake):
    drop(intake.path, "empty.txt", b"")
    await until((intake.path / "failed" / "empty.error.txt").exists, what="first refusal")
    drop(intake.path, "empty.txt", b" ")
    await until((intake.path / "failed" / "empty-2.error.txt").exists, what="second refusal")
    assert (intake.path / "failed" / "empty.txt").read_bytes() == b""
    assert (intake.path / "failed" / "empty-2.txt").read_bytes() == b" "


async def test_files_present_at_start_are_taken(config, queue):
    folder = config.intake.folder[0]
    folder.path.mkdir(parents=True)
    (folder.path / "waiting.txt").write_bytes(b"a red fox")
    intake = FolderIntake(folder, config, submitter_for(config, queue))
    await intake.start()
    try:
        await until(lambda: queued_ids(queue), what="the start-up scan")
    finally:
        await intake.stop()


async def test_polling_observer_for_network_shares(config, queue):
    folder = config.intake.folder[0].model_copy(update={"poll": True, "poll_interval": 0.2})
    intake = FolderIntake(folder, config, submitter_for(config, queue))
    await intake.start()
    try:
        (folder.path / "share.txt").write_bytes(b"a red fox")
        await until(lambda: queued_ids(queue), what="the polled file")
    finally:
        await intake.stop()


def test_delivery_copies_the_report_page_as_written_beside_the_video_of_its_stem(tmp_path):
    """The worker's report.html plays "<stem><suffix>" when named "<stem>.report.html"
    (workers.pipelines.report.PLAYER_JS): delivery gives the page and the video one stem,
    the one picked at delivery time, and copies the page byte for byte."""
    inbox, directory = tmp_path / "drop", tmp_path / "jobs" / "job1"
    (inbox / "done").mkdir(parents=True)
    directory.mkdir(parents=True)
    (inbox / "done" / "fox.report.html").write_text("an earlier fox")  # so this one is fox-2
    (inbox / "fox.txt").write_text("a red fox")
    page = '<video id=film src="video.mp4"></video><script>/* the player */</script>'
    for name, data in {"video.mp4": "film", "report.json": "{}", "report.html": page}.items():
        (directory / name).write_text(data)
    spec = JobSpec(id="job1", kind="video", prompt="a red fox",
                   source=Source(channel="folder", folder=str(inbox), filename="fox.txt"))
    outcome = JobOutcome(JobStatus.done, primary="video.mp4",
                         reports=["report.json", "report.html"])
    delivered = {key: Path(path) for key, path in deliver(spec, outcome, directory).items()}
    assert delivered["report.html"] == inbox / "done" / "fox-2.report.html"
    assert delivered["primary"] == inbox / "done" / "fox-2.mp4"
    assert delivered["report.html"].read_text() == page
    assert delivered["primary"].read_text() == "film"
