"""The HTTP API on a real aiohttp server on loopback, with a real Redis. The end-to-end
test at the bottom adds a real daemon and worker."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import aiohttp
import imageio_ffmpeg
import pytest
from aiohttp.test_utils import TestClient, TestServer
from openapi_spec_validator import validate

from daemon import links
from daemon.compose import read_config
from daemon.jobs import Channel, JobOutcome, JobSpec, JobStatus, Source, write_spec
from daemon.queue import QueueClient
from intake.http import HttpApi
from intake.openapi import openapi_document
from tests.conftest import free_port, submitter_for, wait_for, write_config

pytestmark = pytest.mark.timeout(120)

TOKENS = """enabled = true
listen = "127.0.0.1:{port}"
max_body_mb = {max_mb}
[[intake.http.tokens]]
name = "alice"
token = "alice-secret"
[[intake.http.tokens]]
name = "bob"
token = "env:TEST_BOB_TOKEN"
[[intake.http.tokens]]
name = "root"
token = "root-secret"
role = "admin"
[[intake.http.tokens]]
name = "ghost"
token = "env:TEST_UNSET_TOKEN"
"""
ALICE = {"Authorization": "Bearer alice-secret"}
BOB = {"Authorization": "Bearer bob-secret"}
ROOT = {"Authorization": "Bearer root-secret"}
JOB = {"kind": "video", "prompt": "a red fox in the snow", "options": {"duration": 3}}


def http_config(tmp_path: Path, redis_url: str, port: int = 0, max_mb: float = 1):
    return write_config(tmp_path, redis_url,
                        **{"intake.http": TOKENS.format(port=port, max_mb=max_mb)})


@pytest.fixture
async def client(tmp_path, redis_url, monkeypatch):
    monkeypatch.setenv("TEST_BOB_TOKEN", "bob-secret")
    monkeypatch.delenv("TEST_UNSET_TOKEN", raising=False)
    config = read_config(http_config(tmp_path, redis_url))
    queue = await QueueClient.open(config.redis.url)
    api = HttpApi(config, submitter_for(config, queue))
    async with TestClient(TestServer(api.app())) as test_client:
        test_client.api = api
        yield test_client
    await queue.close()


async def error_of(response: aiohttp.ClientResponse, status: int) -> dict:
    assert response.status == status, await response.text()
    assert response.headers["X-Request-ID"]
    body = await response.json()
    assert body["error"]["status"] == status
    assert body["error"]["request_id"] == response.headers["X-Request-ID"]
    assert "Traceback" not in json.dumps(body)
    return body["error"]


async def test_submit_returns_202_with_location_and_queue_position(client):
    response = await client.post("/jobs", json=JOB, headers=ALICE)
    assert response.status == 202
    job = await response.json()
    assert response.headers["Location"] == f"/jobs/{job['id']}"
    assert job["status"] == "queued" and job["position"] == 1
    assert job["submitted_by"] == "alice" and job["links"]["self"] == f"/jobs/{job['id']}"
    second = await (await client.post("/jobs", json=JOB, headers=ALICE)).json()
    assert second["position"] == 2
    fetched = await (await client.get(f"/jobs/{job['id']}", headers=ALICE)).json()
    assert fetched["status"] == "queued" and fetched["progress"]["stage"] == "queued"


async def test_idempotency_key_returns_the_first_job(client):
    headers = {**ALICE, "Idempotency-Key": "retry-1"}
    first = await client.post("/jobs", json=JOB, headers=headers)
    again = await client.post("/jobs", json=JOB, headers=headers)
    assert (await first.json())["id"] == (await again.json())["id"]
    assert again.headers["Idempotent-Replayed"] == "true"
    other = await client.post("/jobs", json=JOB, headers={**BOB, "Idempotency-Key": "retry-1"})
    assert (await other.json())["id"] != (await first.json())["id"]  # keys are per token
    assert await client.api.queue.queue_length() == 2


async def test_authentication_and_roles(client):
    assert (await error_of(await client.get("/jobs"), 401))["message"].startswith(
        "this endpoint needs")
    await error_of(await client.get("/jobs", headers={"Authorization": "Bearer nope"}), 401)
    await error_of(await client.get("/jobs", headers={"Authorization": "Basic abc"}), 401)
    # A token whose environment variable is unset is disabled, not an empty password.
    await error_of(await client.get("/jobs", headers={"Authorization": "Bearer "}), 401)
    job = await (await client.post("/jobs", json=JOB, headers=ALICE)).json()
    await error_of(await client.get(f"/jobs/{job['id']}", headers=BOB), 403)
    await error_of(await client.delete(f"/jobs/{job['id']}", headers=BOB), 403)
    await error_of(await client.get("/jobs?submitted_by=alice", headers=BOB), 403)
    assert (await client.get(f"/jobs/{job['id']}", headers=ROOT)).status == 200
    bobs = await (await client.get("/jobs", headers=BOB)).json()
    assert bobs["jobs"] == []  # a user lists only its own jobs
    everyone = await (await client.get("/jobs", headers=ROOT)).json()
    assert [j["id"] for j in everyone["jobs"]] == [job["id"]]


@pytest.mark.parametrize("body, status, field", [
    (b'{"prompt": "x",', 422, "body"),
    (b'["a fox"]', 422, "body"),
    (b'{"kind": "hologram", "prompt": "x"}', 422, "kind"),
    (b'{"prompt": "x", "options": {"colour": "red"}}', 422, "options.colour"),
    (b'{"prompt": "x", "options": {"duration": -1}}', 422, "options.duration"),
    (b'{"prompt": "x", "options": {"fps": 1000}}', 422, "options.fps"),
    (b'{"prompt": "x", "options": {"width": 101}}', 422, "options.width"),
    (b'{"prompt": 5}', 422, "prompt"),
    (b'{"prompt": "x", "options": []}', 422, "options"),
    (b'{"prompt": "x", "colour": "red"}', 422, "colour"),
])
async def test_bad_submissions_name_the_field(client, body, status, field):
    response = await client.post("/jobs", data=body, headers={
        **ALICE, "Content-Type": "application/json"})
    error = await error_of(response, status)
    assert field in [p["field"] for p in error["problems"]], error


async def test_empty_prompt_is_explained(client):
    error = await error_of(await client.post("/jobs", json={"prompt": " "}, headers=ALICE), 422)
    assert "the prompt is empty" in error["message"]


async def test_wrong_content_type_is_415_and_oversize_is_413(client):
    await error_of(await client.post("/jobs", data=b"a fox", headers={
        **ALICE, "Content-Type": "text/plain"}), 415)
    big = json.dumps({"prompt": "x" * (2 * 1024 * 1024)})
    error = await error_of(await client.post("/jobs", data=big, headers={
        **ALICE, "Content-Type": "application/json"}), 413)
    assert "the limit is 1 MB" in error["message"]


async def test_chunked_upload_over_the_cap_is_413_and_leaves_nothing(client):
    async def chunks():
        for _ in range(3):
            yield b"x" * (512 * 1024)

    form = aiohttp.FormData()
    form.add_field("prompt", "a fox")
    form.add_field("file", chunks(), filename="big.mp4", content_type="video/mp4")
    await error_of(await client.post("/jobs", data=form, headers=ALICE), 413)
    jobs_dir = client.api.config.jobs_dir
    assert not jobs_dir.exists() or list(jobs_dir.iterdir()) == []


async def test_multipart_text_fields_and_a_file_the_kind_does_not_take(client):
    form = aiohttp.FormData(default_to_multipart=True)
    form.add_field("kind", "video")
    form.add_field("prompt", "a red fox")
    form.add_field("options", json.dumps({"duration": 3}))
    assert (await client.post("/jobs", data=form, headers=ALICE)).status == 202
    form = aiohttp.FormData()
    form.add_field("prompt", "a red fox")
    form.add_field("file", b"\x00\x01", filename="../../etc/passwd", content_type="x/y")
    error = await error_of(await client.post("/jobs", data=form, headers=ALICE), 422)
    assert "takes no input files" in error["message"]
    form = aiohttp.FormData(default_to_multipart=True)
    form.add_field("prompt", "a red fox")
    form.add_field("options", "{not json")
    await error_of(await client.post("/jobs", data=form, headers=ALICE), 422)


async def test_unknown_things_are_404_and_wrong_methods_405(client):
    await error_of(await client.get("/jobs/doesnotexist", headers=ALICE), 404)
    await error_of(await client.get("/jobs/../../etc/passwd", headers=ALICE), 404)
    await error_of(await client.get("/nowhere", headers=ALICE), 404)
    response = await client.put("/jobs", headers=ALICE)
    await error_of(response, 405)
    assert "POST" in response.headers["Allow"]


async def test_cancel_a_queued_job_then_409(client):
    job = await (await client.post("/jobs", json=JOB, headers=ALICE)).json()
    response = await client.delete(f"/jobs/{job['id']}", headers=ALICE)
    assert response.status == 200 and (await response.json())["status"] == "cancelled"
    await error_of(await client.delete(f"/jobs/{job['id']}", headers=ALICE), 409)
    assert await client.api.queue.queue_length() == 0


async def test_pagination_newest_first_and_status_filter(client):
    ids = []
    for n in range(5):
        job = {**JOB, "prompt": f"fox number {n}"}
        ids.append((await (await client.post("/jobs", json=job, headers=ALICE)).json())["id"])
        await asyncio.sleep(0.002)
    await client.delete(f"/jobs/{ids[1]}", headers=ALICE)
    seen, cursor = [], None
    while True:
        query = "/jobs?limit=2" + (f"&cursor={cursor}" if cursor else "")
        page = await (await client.get(query, headers=ALICE)).json()
        assert len(page["jobs"]) <= 2
        seen += [j["id"] for j in page["jobs"]]
        cursor = page["next_cursor"]
        if not cursor:
            break
    assert seen == ids[::-1]
    cancelled = await (await client.get("/jobs?status=cancelled", headers=ALICE)).json()
    assert [j["id"] for j in cancelled["jobs"]] == [ids[1]]
    for query in ("status=lost", "limit=0", "limit=abc", "cursor=xyz"):
        await error_of(await client.get(f"/jobs?{query}", headers=ALICE), 422)


async def test_healthz_needs_no_token_and_says_503_without_a_worker(client):
    response = await client.get("/healthz")
    assert response.status == 503
    body = await response.json()
    assert body["redis"] == "ok" and body["status"] == "no worker alive"


async def test_metrics_and_openapi(client):
    text = await (await client.get("/metrics", headers=ALICE)).text()
    assert "reelqueue_queue_length" in text and "reelqueue_workers_alive" in text
    await error_of(await client.get("/metrics"), 401)
    document = await (await client.get("/openapi.json", headers=ALICE)).json()
    validate(document)
    served = {(r.method.lower(), r.resource.canonical) for r in client.app.router.routes()
              if r.method != "HEAD"}
    documented = {(method, path) for path, item in document["paths"].items()
                  for method in item}
    assert served == documented
    assert document == openapi_document(client.api.submitter.kinds)


async def test_index_page_is_served_without_a_token(client):
    response = await client.get("/")
    assert response.status == 200 and "<title>reelqueue</title>" in await response.text()


def finished_job(api: HttpApi, job_id: str, owner: str = "alice") -> Path:
    """A done video job on disk, as the worker leaves it (no worker needed)."""
    spec = JobSpec(id=job_id, kind="video", prompt="a red fox", submitted_by=owner,
                   source=Source(channel=Channel.http, client=owner))
    directory = write_spec(api.config.jobs_dir, spec)
    for name, data in {"video.mp4": f"film of {job_id}", "report.json": "{}",
                       "report.html": f'<video id=film src="video.mp4"></video> {job_id}'
                       }.items():
        (directory / name).write_text(data)
    JobOutcome(JobStatus.done, primary="video.mp4",
               reports=["report.json", "report.html"]).write(directory)
    return directory


async def test_a_signed_report_link_serves_the_page_as_written_and_opens_its_video(client):
    directory = finished_job(client.api, "job1")
    link = client.api.file_link("job1", "report.html")
    response = await client.get(link)  # no token
    assert response.status == 200 and response.content_type == "text/html"
    assert await response.read() == (directory / "report.html").read_bytes()
    video = await client.get(link.replace("/report.html?", "/video.mp4?"))
    assert video.status == 200 and await video.text() == "film of job1"


async def test_a_signed_link_opens_only_its_own_job_and_only_until_it_expires(client):
    finished_job(client.api, "job1")
    finished_job(client.api, "job2")
    query = client.api.file_link("job1", "report.html").split("?")[1]
    await error_of(await client.get(f"/jobs/job2/files/video.mp4?{query}"), 401)
    await error_of(await client.get(f"/jobs/job2/files/report.html?{query}"), 401)
    expires, sig = (field.split("=")[1] for field in query.split("&"))
    later = int(expires) + 3600
    await error_of(await client.get(f"/jobs/job1/files/video.mp4?expires={later}&sig={sig}"),
                   401)
    tampered = sig[:-1] + ("0" if sig[-1] != "0" else "1")
    await error_of(await client.get(
        f"/jobs/job1/files/video.mp4?expires={expires}&sig={tampered}"), 401)
    expired = links.file_link(client.api.link_key, "job1", "video.mp4", ttl_s=-1)
    await error_of(await client.get(expired), 401)
    # Not an artifact: a signature opens none of the job's other files.
    await error_of(await client.get(f"/jobs/job1/files/spec.json?{query}"), 404)
    assert (await client.get(f"/jobs/job1/files/video.mp4?{query}")).status == 200


def test_end_to_end_submit_poll_download_seek_and_cancel(tmp_path, redis_url, spawn,
                                                         monkeypatch):
    import urllib.request

    port = free_port()
    monkeypatch.setenv("TEST_BOB_TOKEN", "bob-secret")
    http_config(tmp_path, redis_url, port=port, max_mb=64)
    spawn("daemon")
    base = f"http://127.0.0.1:{port}"

    def call(method, path, body=None, headers=ALICE):
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(base + path, data=data, method=method, headers={
            **headers, "Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return response.status, dict(response.headers), response.read()
        except urllib.error.HTTPError as error:
            return error.code, dict(error.headers), error.read()

    wait_for(lambda: _up(base), timeout=30, what="the HTTP API")
    assert call("GET", "/healthz", headers={})[0] == 503  # no worker yet
    spawn("worker")
    wait_for(lambda: call("GET", "/healthz", headers={})[0] == 200, what="a healthy worker")
    status, headers, body = call("POST", "/jobs", {"prompt": "A red fox runs. It stops.",
                                                   "options": {"duration": 6}})
    assert status == 202
    job_id = json.loads(body)["id"]

    def finished():
        job = json.loads(call("GET", f"/jobs/{job_id}")[2])
        return job if job["status"] in ("done", "failed") else None

    job = wait_for(finished, timeout=60, what="the job")
    assert job["status"] == "done", job
    assert set(job["links"]["files"]) == {"video.mp4", "report.json", "report.html",
                                          "subtitles.srt", "subtitles.vtt"}
    assert job["timings"]["total"] > 0

    video_link = job["links"]["files"]["video.mp4"]
    status, headers, video = call("GET", video_link, headers={})  # signed: no token needed
    assert status == 200 and headers["Content-Type"] == "video/mp4"
    saved = tmp_path / "download.mp4"
    saved.write_bytes(video)
    frames, seconds = imageio_ffmpeg.count_frames_and_secs(str(saved))
    assert frames == 6 * 8 and abs(seconds - 6) < 0.2
    status, headers, part = call("GET", video_link, headers={"Range": "bytes=100-199"})
    assert status == 206 and len(part) == 100 and part == video[100:200]
    assert headers["Content-Range"] == f"bytes 100-199/{len(video)}"
    assert call("GET", video_link.replace("sig=", "sig=0"), headers={})[0] == 401
    assert call("GET", f"/jobs/{job_id}/files/spec.json")[0] == 404  # not an artifact
    assert call("GET", f"/jobs/{job_id}/files/..%2Fspec.json")[0] == 404
    report_link = job["links"]["files"]["report.html"]
    status, headers, page = call("GET", report_link, headers={})
    assert status == 200 and headers["Content-Type"].startswith("text/html")
    assert page == (tmp_path / "var" / "jobs" / job_id / "report.html").read_bytes()
    # The page plays "video.mp4" with its own signed query (its player script does that).
    played = report_link.replace("/report.html?", "/video.mp4?")
    assert call("GET", played, headers={"Range": "bytes=0-99"})[2] == video[:100]
    assert call("DELETE", f"/jobs/{job_id}")[0] == 409
    metrics = call("GET", "/metrics")[2].decode()
    assert 'reelqueue_jobs_finished_total{kind="video",outcome="done"} 1.0' in metrics

    status, _, body = call("POST", "/jobs", {"prompt": "A fox. A hill. A sky. A moon.",
                                             "options": {"duration": 40, "width": 832,
                                                         "height": 480, "fps": 24}})
    long_id = json.loads(body)["id"]
    wait_for(lambda: json.loads(call("GET", f"/jobs/{long_id}")[2])["status"] == "running",
             what="the long job to start")
    assert call("DELETE", f"/jobs/{long_id}")[0] == 202
    final = wait_for(lambda: (j := json.loads(call("GET", f"/jobs/{long_id}")[2]))["status"]
                     in ("cancelled", "done") and j, timeout=30, what="the cancellation")
    assert final["status"] == "cancelled"


def _up(base: str) -> bool:
    import urllib.request

    try:
        urllib.request.urlopen(base + "/healthz", timeout=2)
    except urllib.error.HTTPError:
        return True
    except OSError:
        return False
    return True


async def test_multipart_upload_of_a_burst_for_a_media_kind(client):
    import cv2
    import numpy as np

    form = aiohttp.FormData()
    form.add_field("kind", "long_exposure")
    form.add_field("options", json.dumps({"mode": "foreground_blur"}))
    for i in range(3):
        frame = np.full((24, 32, 3), 40 * i, np.uint8)
        form.add_field("file", cv2.imencode(".png", frame)[1].tobytes(),
                       filename=f"../../burst {i}.png", content_type="image/png")
    response = await client.post("/jobs", data=form, headers=ALICE)
    assert response.status == 202, await response.text()
    job = await response.json()
    inputs = client.api.config.jobs_dir / job["id"] / "inputs"
    assert sorted(p.name for p in inputs.iterdir()) == ["burst_0.png", "burst_1.png",
                                                          "burst_2.png"]
    spec = json.loads((client.api.config.jobs_dir / job["id"] / "spec.json").read_text())
    assert spec["kind"] == "long_exposure" and len(spec["inputs"]) == 3
    # A media kind without its media is refused before anything is queued.
    error = await error_of(await client.post("/jobs", json={"kind": "long_exposure"},
                                             headers=ALICE), 422)
    assert "needs an input file" in error["message"]
