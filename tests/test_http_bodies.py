"""Real-world bodies against the real HTTP API (issue 13, items 5 to 8): bodies split
over TCP segments or sent chunked, uploads cut off mid-way, malformed queries, headers
and text. Raw sockets where the test must control what goes on the wire. The answer is
never a 5xx, and what a request left behind is cleaned up."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import aiohttp
import pytest
from aiohttp.test_utils import TestClient, TestServer

from daemon import links
from daemon.compose import read_config
from daemon.queue import QueueClient, worker_key
from intake.http import HttpApi, HttpIntake
from tests.conftest import free_port, submitter_for
from tests.test_http import ALICE, JOB, ROOT, error_of, finished_job, http_config

pytestmark = pytest.mark.timeout(120)

MB = 1024 * 1024
LIMIT_MB = 4


@pytest.fixture
async def setup(tmp_path, redis_url, monkeypatch):
    """A config with a 4 MB body limit, its queue, and its submitter."""
    monkeypatch.setenv("TEST_BOB_TOKEN", "bob-secret")
    config = read_config(http_config(tmp_path, redis_url, port=free_port(), max_mb=LIMIT_MB))
    queue = await QueueClient.open(config.redis.url)
    yield config, queue
    await queue.close()


@pytest.fixture
async def client(setup):
    config, queue = setup
    api = HttpApi(config, submitter_for(config, queue))
    async with TestClient(TestServer(api.app())) as test_client:
        test_client.api = api
        yield test_client


async def raw(port: int, *pieces: bytes, pause: float = 0.0) -> tuple[int, dict]:
    """Send ``pieces`` as separate writes (``pause`` apart) and read the whole answer."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        for n, piece in enumerate(pieces):
            if n and pause:
                await asyncio.sleep(pause)
            writer.write(piece)
            await writer.drain()
        answer = await reader.read()
    finally:
        writer.close()
    head, _, body = answer.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    return status, json.loads(body) if body.strip() else {}


def post_head(path: str, content_type: str, length: int | None,
              extra: bytes = b"Authorization: Bearer alice-secret\r\n") -> bytes:
    size = (f"Content-Length: {length}\r\n" if length is not None
            else "Transfer-Encoding: chunked\r\n")
    return (f"POST {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n"
            f"Content-Type: {content_type}\r\n{size}").encode() + extra + b"\r\n"


def leftovers(config) -> list[Path]:
    """Files the requests left in the staging folder or the job folders."""
    folders = [config.state_dir / "uploads", config.jobs_dir]
    return [p for folder in folders if folder.exists() for p in folder.rglob("*")]


# --- item 5: the whole body is read, however it arrives ----------------------------------


async def test_a_json_body_split_over_segments_or_chunked_is_read_whole(client):
    port = client.server.port
    body = json.dumps(JOB).encode()
    # Headers and the first 20 bytes, a pause, then the rest: one job.
    status, job = await raw(port, post_head("/jobs", "application/json", len(body))
                            + body[:20], body[20:], pause=0.3)
    assert status == 202, job
    # A body near the limit, in many segments: read whole (JSON allows the padding).
    big = b'{"prompt": "a fox in the snow"' + b" " * (LIMIT_MB * MB - 100) + b"}"
    pieces = [big[i:i + 256 * 1024] for i in range(0, len(big), 256 * 1024)]
    status, job = await raw(port, post_head("/jobs", "application/json", len(big)),
                            *pieces, pause=0.01)
    assert status == 202, job

    async def chunks(total: int):
        for _ in range(total // (256 * 1024)):
            yield b" " * (256 * 1024)
            await asyncio.sleep(0)

    # Chunked, no length announced: under the limit it is a job, past it a 413.
    async def padded(total: int):
        yield b'{"prompt": "a fox"'
        async for chunk in chunks(total):
            yield chunk
        yield b"}"

    headers = {**ALICE, "Content-Type": "application/json"}
    response = await client.post("/jobs", data=padded(2 * MB), headers=headers)
    assert response.status == 202, await response.text()
    error = await error_of(await client.post("/jobs", data=padded(LIMIT_MB * MB + MB),
                                             headers=headers), 413)
    assert f"{LIMIT_MB} MB" in error["message"]
    # /admin/pause reads its (small) body whole too.
    reason = json.dumps({"reason": "maintenance window"}).encode()
    status, answer = await raw(port, post_head("/admin/pause", "application/json", len(reason),
                                               b"Authorization: Bearer root-secret\r\n")
                               + reason[:5], reason[5:], pause=0.3)
    assert status == 200 and answer["paused"]["reason"] == "maintenance window", answer


# --- item 6: nothing of an upload stays behind --------------------------------------------


def multipart(boundary: str, parts: list[tuple[str, bytes, str | None]]) -> bytes:
    body = b""
    for name, data, filename in parts:
        disposition = f'form-data; name="{name}"' + (
            f'; filename="{filename}"' if filename else "")
        body += (f"--{boundary}\r\nContent-Disposition: {disposition}\r\n\r\n".encode()
                 + data + b"\r\n")
    return body + f"--{boundary}--\r\n".encode()


async def wait_until(predicate, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.02)


@pytest.mark.parametrize("serve", ["test server (handler cancelled)", "daemon's runner"])
async def test_uploads_cut_short_leave_nothing_behind(setup, serve):
    config, queue = setup
    if serve.startswith("test"):
        server = TestServer(HttpApi(config, submitter_for(config, queue)).app())
        await server.start_server()
        port, stop = server.port, server.close
    else:
        stale = config.state_dir / "uploads" / "0123abcd" / "half.mp4"  # a daemon killed
        stale.parent.mkdir(parents=True)
        stale.write_bytes(b"x" * 1000)
        intake = HttpIntake(config, submitter_for(config, queue))
        await intake.start()  # clears what a daemon killed mid-upload left
        port, stop = config.intake.http.port, intake.stop
        assert not stale.exists()
    try:
        # A file part, then a field over the 1 MB field limit: 413, nothing kept.
        body = multipart("b0", [("file", b"\x00" * 1000, "clip.mp4"),
                                ("prompt", b"x" * (MB + 10), None)])
        status, answer = await raw(port, post_head("/jobs", "multipart/form-data; boundary=b0",
                                                   len(body)) + body)
        assert status == 413 and answer["error"]["problems"][0]["field"] == "prompt", answer
        assert leftovers(config) == []
        # A client that goes away after 2 MB of a 3 MB upload.
        head = multipart("b1", [("file", b"", "clip.mp4")]).split(b"\r\n\r\n")[0] + b"\r\n\r\n"
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(post_head("/jobs", "multipart/form-data; boundary=b1", 3 * MB) + head)
        for _ in range(8):
            writer.write(b"\x00" * (256 * 1024))
            await writer.drain()
        staged = config.state_dir / "uploads"
        await wait_until(lambda: any(p.is_file() and p.stat().st_size >= MB
                                     for p in staged.rglob("*")))
        writer.transport.abort()
        await wait_until(lambda: leftovers(config) == [])
        await asyncio.sleep(0.2)
        assert leftovers(config) == []
    finally:
        await stop()


# --- item 7: malformed input is a 4xx naming the field, never a 500 ------------------------


def fields_of(answer: dict) -> list[str]:
    return [p["field"] for p in answer["error"]["problems"]]


async def test_malformed_queries_headers_and_text_are_4xx_naming_the_field(client):
    port = client.server.port
    finished_job(client.api, "job1")
    query = client.api.file_link("job1", "video.mp4").split("?")[1]
    expires = query.split("&")[0].split("=")[1]
    for path, field in [("/jobs/job1/files/video.mp4?expires=%C2%B2&sig=00", "expires"),
                        (f"/jobs/job1/files/video.mp4?expires={expires}&sig=%C3%A9", "sig"),
                        ("/jobs?limit=%C2%B2", "limit"),
                        ("/jobs?limit=" + "9" * 5000, "limit"),
                        ("/jobs/job1/files/video.mp4?sig=00&expires=" + "9" * 5000,
                         "expires"),
                        ("/jobs?cursor=nan", "cursor"),
                        ("/jobs?cursor=1_000", "cursor")]:
        error = await error_of(await client.get(path, headers=ALICE), 422)
        assert field in [p["field"] for p in error["problems"]], (path, error)

    # Authorization headers that are not ASCII: 401, naming the header.
    for token in (b"\xff", b"caf\xe9", "café".encode()):
        status, answer = await raw(port, b"GET /jobs HTTP/1.1\r\nHost: t\r\n"
                                   b"Connection: close\r\nAuthorization: Bearer " + token
                                   + b"\r\n\r\n")
        assert status == 401 and "Authorization" in fields_of(answer), answer
    # A non-ASCII Idempotency-Key is as good a key as any.
    status, answer = await raw(port, post_head(
        "/jobs", "application/json", len(json.dumps(JOB)),
        b"Authorization: Bearer alice-secret\r\nIdempotency-Key: \xff\xfe\r\n")
        + json.dumps(JOB).encode())
    assert status == 202, answer

    def post(body: bytes, content_type: str = "application/json", extra: bytes = b""):
        return raw(port, post_head("/jobs", content_type, len(body),
                                   b"Authorization: Bearer alice-secret\r\n" + extra) + body)

    # JSON nested 1,000 deep (past Python's recursion limit), or deep inside the options.
    deep = b'{"prompt": "x", "options": {"scenes": ' + b"[" * 200 + b"]" * 200 + b"}}"
    for body, field in [(b"[" * 1000 + b"]" * 1000, "body"), (deep, "options"),
                        (b'{"prompt": "x", "options": {"style": "\\udfff"}}', "options.style")]:
        status, answer = await post(body)
        assert status == 422 and field in fields_of(answer), answer
    # A lone surrogate in the prompt: refused before a job folder is made, with or
    # without an Idempotency-Key (whose job folder a failure would otherwise keep).
    before = leftovers(client.api.config)
    for extra in (b"", b"Idempotency-Key: surrogate-1\r\n"):
        status, answer = await post(b'{"prompt": "a fox \\ud800"}', extra=extra)
        assert status == 422 and fields_of(answer) == ["prompt"], answer
        assert leftovers(client.api.config) == before

    # Multipart without a boundary, and part headers with control characters.
    status, answer = await post(b"--x\r\n\r\n--x--\r\n", "multipart/form-data")
    assert status in (400, 422) and "Content-Type" in fields_of(answer), answer
    for header in (b'Content-Disposition: form-data; name="prompt"\x01\r\n',
                   b'Content-Disposition: form-data; name="prompt"\r\nX-Odd\x07: 1\r\n',
                   b'Content-Disposition: form-data; name="pro\x00mpt"\r\n'):
        body = b"--b\r\n" + header + b"\r\na fox\r\n--b--\r\n"
        status, answer = await post(body, "multipart/form-data; boundary=b")
        assert 400 <= status < 500, (header, answer)
        assert fields_of(answer), answer


# --- item 8: the smaller ones -------------------------------------------------------------


async def test_pause_reason_healthz_job_ids_and_non_ascii_upload_names(client):
    for body in ({"reason": {}}, {"reason": 5}, ["why"]):
        error = await error_of(await client.post("/admin/pause", json=body, headers=ROOT),
                               422)
        assert error["problems"][0]["field"] == "reason", error
    assert (await client.post("/admin/pause", headers=ROOT)).status == 200
    await client.post("/admin/resume", headers=ROOT)

    beat = {"name": "gpu0", "device": "cpu", "job_id": "secretjob42", "ts": time.time()}
    await client.api.queue.redis.sadd("reelqueue:workers", "gpu0")
    await client.api.queue.redis.set(worker_key("gpu0"), json.dumps(beat))
    for headers in ({}, {"Authorization": "Bearer nope"}):
        response = await client.get("/healthz", headers=headers)
        assert response.status == 200 and "secretjob42" not in await response.text()
    health = await (await client.get("/healthz", headers=ALICE)).json()
    assert health["workers"][0]["job_id"] == "secretjob42"

    assert links.safe_filename("名前.png") == "upload.png"
    assert links.safe_filename("写真 1.PNG") == "1.PNG"
    assert links.safe_filename("../../.bashrc") == "bashrc"
    form = aiohttp.FormData()
    form.add_field("kind", "long_exposure")
    for name in ("名前.png", "写真.png", "名前.png"):
        form.add_field("file", _png(), filename=name, content_type="image/png")
    response = await client.post("/jobs", data=form, headers=ALICE)
    assert response.status == 202, await response.text()
    inputs = client.api.config.jobs_dir / (await response.json())["id"] / "inputs"
    assert sorted(p.name for p in inputs.iterdir()) == ["upload-2.png", "upload-3.png",
                                                          "upload.png"]


def _png() -> bytes:
    import cv2
    import numpy as np

    return cv2.imencode(".png", np.zeros((8, 8, 3), np.uint8))[1].tobytes()
