"""The HTTP API: submit, watch, fetch and cancel jobs (aiohttp, served by the daemon).

Predictable JSON, honest status codes, one error shape::

    {"error": {"status": 422, "message": "...", "problems": [{"field", "reason"}],
               "request_id": "..."}}

Every response carries ``X-Request-ID``; no traceback ever reaches a client. Every
endpoint but ``/healthz`` (and the static page at ``/``) needs a bearer token from
``[[intake.http.tokens]]``; a ``user`` token sees and cancels its own jobs, an
``admin`` token all of them. File links in responses are signed (HMAC, expiring), so
a browser can play a video or open a report without sending the token.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import re
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiohttp import web
from redis.exceptions import RedisError

from daemon import channel_state, links, metrics
from daemon.config import Config
from daemon.jobs import (
    Channel,
    JobError,
    JobOutcome,
    JobSpec,
    JobStatus,
    Source,
    derive_job_id,
    job_dir,
)
from daemon.logs import get_logger
from daemon.lookup import find_job
from daemon.schedule import Priority
from daemon.submit import Limits, Refusal, Refused, Request, Submitter, Upload
from intake.http_input import (
    DEFAULT_KIND,
    JOB_FIELDS,
    JOB_ID,
    MAX_FIELD_BYTES,
    MAX_JSON_DEPTH,
    MAX_LISTED,
    ApiError,
    parse_cursor,
    parse_json,
    read_multipart,
    read_whole,
    strict_problems,
    too_deep,
)
from intake.http_settings import HttpToken
from intake.openapi import openapi_document

log = get_logger(component="http")

WORKER_STALE_S = 15.0
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
STATIC = Path(__file__).parent / "static"
REQUEST_ID = web.RequestKey("request_id", str)
CALLER = web.RequestKey("caller", str)
REFUSAL_STATUS = {Refusal.invalid: 422, Refusal.blocked: 422, Refusal.unavailable: 422,
                  Refusal.queued_cap: 429, Refusal.daily_cap: 429, Refusal.queue_full: 503,
                  Refusal.in_progress: 409}


@dataclass(frozen=True)
class Caller:
    name: str
    role: str
    max_queued: int = 0
    max_jobs_per_day: int = 0
    priority: Priority = "interactive"

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"


class HttpApi:
    def __init__(self, config: Config, submitter: Submitter):
        self.config = config
        self.http = config.intake.http
        self.submitter = submitter
        self.queue = submitter.queue
        self.max_body = int(self.http.max_body_mb * 1024 * 1024)
        self.tokens: list[tuple[bytes, HttpToken]] = []
        for token in self.http.tokens:
            secret = token.secret
            if secret is None:
                log.warning("http token disabled: its environment variable is not set",
                            token=token.name, variable=token.token.removeprefix("env:"))
                continue
            self.tokens.append((_bytes(secret), token))
        self.link_key = links.link_key(config.state_dir)

    # --- application -------------------------------------------------------------------

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self.errors_middleware],
                              client_max_size=self.max_body)
        app.add_routes([
            web.get("/", self.index),
            web.get("/healthz", self.healthz),
            web.get("/metrics", self.metrics),
            web.get("/openapi.json", self.openapi),
            web.post("/jobs", self.submit),
            web.get("/jobs", self.list_jobs),
            web.get("/jobs/{id}", self.get_job),
            web.delete("/jobs/{id}", self.cancel_job),
            web.get("/jobs/{id}/files/{name}", self.get_file),
            web.post("/admin/pause", self.pause),
            web.post("/admin/resume", self.resume),
        ])
        return app

    @web.middleware
    async def errors_middleware(self, request: web.Request, handler: Any) -> web.StreamResponse:
        supplied = request.headers.get("X-Request-ID", "")
        request_id = supplied if _REQUEST_ID.match(supplied) else uuid.uuid4().hex[:16]
        request[REQUEST_ID] = request_id
        started = time.monotonic()
        try:
            response = await handler(request)
        except ApiError as exc:
            response = self._json_error(exc, request_id)
        except web.HTTPException as exc:  # aiohttp's own: unknown route, wrong method, …
            error = ApiError(exc.status, exc.reason.lower())
            response = self._json_error(error, request_id, exc.headers.get("Allow"))
        except (RedisError, OSError) as exc:
            log.error("backend unavailable", request_id=request_id, error=repr(exc))
            error = ApiError(503, "the queue is unavailable right now; try again shortly")
            response = self._json_error(error, request_id)
        except Exception:
            log.exception("unhandled error", request_id=request_id, path=request.path)
            error = ApiError(500, "internal error; the server log has the details under "
                             "this request id")
            response = self._json_error(error, request_id)
        response.headers["X-Request-ID"] = request_id
        level = log.warning if response.status >= 400 else log.debug
        level("http request", request_id=request_id, method=request.method, path=request.path,
              status=response.status, ms=round((time.monotonic() - started) * 1000, 1),
              caller=request.get(CALLER))
        return response

    @staticmethod
    def _json_error(error: ApiError, request_id: str, allow: str | None = None
                    ) -> web.Response:
        body = {"error": {"status": error.status, "message": error.message,
                          "problems": error.problems, "request_id": request_id}}
        response = web.json_response(body, status=error.status)
        if allow is not None:
            response.headers["Allow"] = allow
        return response

    # --- authentication ------------------------------------------------------------------

    def authenticate(self, request: web.Request) -> Caller:
        header = request.headers.get("Authorization", "")
        scheme, _, presented = header.partition(" ")
        if scheme.lower() != "bearer" or not presented:
            raise ApiError(401, "this endpoint needs 'Authorization: Bearer <token>'",
                           [{"field": "Authorization", "reason": "no bearer token"}])
        match = None
        for secret, token in self.tokens:
            # compare_digest on every token: the time taken does not reveal which matched.
            if hmac.compare_digest(secret, _bytes(presented.strip())):
                match = token
        if match is None:
            raise ApiError(401, "unknown token", [{"field": "Authorization",
                                                   "reason": "unknown token"}])
        caller = Caller(match.name, match.role, match.max_queued, match.max_jobs_per_day,
                        match.priority)
        request[CALLER] = caller.name
        return caller

    def file_link(self, job_id: str, name: str) -> str:
        return links.file_link(self.link_key, job_id, name, self.http.link_ttl)

    def _signed(self, request: web.Request, job_id: str, name: str) -> bool:
        """A signed query opens any of the job's files (the report page reuses its own
        query for the video); ``name`` only for links signed per file before. A query
        that is no link's (a mangled copy) is a 422 naming what is wrong."""
        expires, sig = request.query.get("expires"), request.query.get("sig")
        if expires is None and sig is None:
            return False
        problems = links.query_problems(expires or "", sig or "")
        if problems:
            raise ApiError.naming(problems, "this file link is damaged: ")
        return links.verify(self.link_key, job_id, expires or "", sig or "", name)

    # --- job access ---------------------------------------------------------------------

    def _check_job_id(self, job_id: str) -> str:
        if not JOB_ID.fullmatch(job_id):
            raise ApiError(404, f"no job {job_id!r}")
        return job_id

    async def _load(self, job_id: str, caller: Caller | None) -> tuple[dict[str, Any], JobSpec]:
        """A job's live state (or its durable record) and spec, if the caller may see it."""
        found = await find_job(self.queue, self.config.jobs_dir, self._check_job_id(job_id))
        if found is None:
            raise ApiError(404, f"no job {job_id!r}")
        spec, state = found
        if caller is not None and not caller.is_admin and spec.submitted_by != caller.name:
            raise ApiError(403, "this job belongs to another token; a user token sees only its "
                         "own jobs")
        return state, spec

    def _artifacts(self, job_id: str) -> dict[str, Path]:
        directory = job_dir(self.config.jobs_dir, job_id)
        outcome = JobOutcome.read(directory)
        if outcome is None or outcome.status != JobStatus.done:
            return {}
        paths = ([outcome.primary] if outcome.primary else []) + outcome.reports + outcome.extras
        artifacts: dict[str, Path] = {}
        for relative in paths:  # served by base name; the first of a name wins
            path = directory / relative
            if path.is_file() and path.name not in artifacts:
                artifacts[path.name] = path
        return artifacts

    def job_view(self, state: dict[str, Any]) -> dict[str, Any]:
        job_id = state["id"]
        view: dict[str, Any] = {
            "id": job_id,
            "kind": state.get("kind"),
            "status": state.get("status"),
            "position": state.get("position"),
            "progress": {"stage": state.get("stage") or state.get("status"),
                         "percent": state.get("percent", 0.0),
                         "message": state.get("message") or ""},
            "prompt": state.get("prompt", ""),
            "submitted_by": state.get("submitted_by", ""),
            "channel": state.get("channel", ""),
            "priority": state.get("priority", "interactive"),
            "created_at": _float(state.get("created_at")),
            "started_at": _float(state.get("started_at")),
            "finished_at": _float(state.get("finished_at")),
            "error": state.get("error") or None,
            "links": {"self": f"/jobs/{job_id}"},
        }
        if state.get("status") == JobStatus.done:
            view["links"]["files"] = {name: self.file_link(job_id, name)
                                      for name in self._artifacts(job_id)}
            report = job_dir(self.config.jobs_dir, job_id) / "report.json"
            if report.is_file():
                view["timings"] = json.loads(report.read_text(encoding="utf-8")).get("timings")
        return view

    # --- handlers -------------------------------------------------------------------------

    async def index(self, request: web.Request) -> web.StreamResponse:
        # A static page with no data in it; it calls the API with a token typed in once.
        return web.FileResponse(STATIC / "index.html")

    async def openapi(self, request: web.Request) -> web.Response:
        self.authenticate(request)
        return web.json_response(openapi_document(self.submitter.kinds))

    async def healthz(self, request: web.Request) -> web.Response:
        """Open to all, but which job a worker runs is shown to a valid token only."""
        shown: tuple[str, ...] = ("job_id",)
        try:
            self.authenticate(request)
        except ApiError:
            shown = ()
        body: dict[str, Any] = {"redis": "ok"}
        try:
            await self.queue.redis.ping()
            body["queue_length"] = await self.queue.queue_length()
            workers = await self.queue.workers()
        except (RedisError, OSError) as exc:
            return web.json_response({"redis": f"unreachable: {exc}", "status": "unhealthy"},
                                     status=503)
        body["workers"] = [{k: beat.get(k) for k in ("name", "device", "age_s", *shown,
                                                      "vram_used", "vram_total", "stopped")}
                           for beat in workers]
        # A worker that stopped taking jobs (a broken GPU) is up, but serves nobody.
        alive = [beat for beat in workers
                 if beat["age_s"] < WORKER_STALE_S and not beat.get("stopped")]
        body["worker_heartbeat_age_s"] = min((b["age_s"] for b in workers), default=None)
        body["paused"] = await self.queue.paused()
        # A channel that could not start (a busy port) is retried while the rest serve.
        body["channels"] = channel_state.decode(await self.queue.redis.hgetall(channel_state.KEY))
        body["status"] = "ok" if alive else "no worker alive"
        return web.json_response(body, status=200 if alive else 503)

    async def metrics(self, request: web.Request) -> web.Response:
        self.authenticate(request)
        return web.Response(body=await metrics.render(self.queue),
                            content_type="text/plain", charset="utf-8",
                            headers={"X-Content-Type-Options": "nosniff"})

    async def submit(self, request: web.Request) -> web.Response:
        caller = self.authenticate(request)
        if request.content_length is not None and request.content_length > self.max_body:
            raise ApiError(413, f"the request is {request.content_length / 1024 / 1024:.1f} MB; "
                         f"the limit is {self.http.max_body_mb:g} MB",
                           [{"field": "body", "reason": "larger than max_body_mb"}])
        # A retry with the same key is the same job: its id derives from the key.
        key = request.headers.get("Idempotency-Key", "")[:200]
        staging = staging_root(self.config) / uuid.uuid4().hex
        try:
            if request.content_type == "application/json":
                body = await read_whole(request.content.read, self.max_body, "body")
                kind, prompt, options = self._job_fields(parse_json(body, "body"))
                uploads: list[Path] = []
            elif request.content_type == "multipart/form-data":
                kind, prompt, options, uploads = await self._read_multipart(request, staging)
            else:
                raise ApiError(415, "send application/json (or multipart/form-data with "
                             f"files); got {request.content_type or 'no content type'}")
            answer = await self.submitter.submit(Request(
                kind=kind, prompt=prompt, options=options,
                source=Source(channel=Channel.http, client=caller.name),
                submitted_by=caller.name, priority=caller.priority,
                inputs=tuple(Upload.of_file(path.name, path, move=True) for path in uploads),
                job_id=derive_job_id("http", caller.name, _bytes(key)) if key else None,
                limits=Limits(caller.max_queued, caller.max_jobs_per_day),
            ))
        finally:
            # Also when the client went away mid-upload and the handler is cancelled:
            # shielded, a second cancel cannot stop the removal half-way.
            await asyncio.shield(asyncio.to_thread(shutil.rmtree, staging, ignore_errors=True))
        if isinstance(answer, Refused):
            raise ApiError(REFUSAL_STATUS[answer.why], answer.message, answer.problems)
        job_id = answer.spec.id
        if answer.duplicate:
            state, _ = await self._load(job_id, caller)
        else:
            # The position submission just worked out: telling it again would cost as much.
            state = await self.queue.get_state(job_id, {job_id: answer.position}) or {}
            log.info("job queued", job_id=job_id, caller=caller.name, kind=kind,
                     request_id=request[REQUEST_ID])
        view = self.job_view(state)
        headers = {"Location": f"/jobs/{job_id}"}
        if answer.duplicate:
            headers["Idempotent-Replayed"] = "true"
        return web.json_response(view, status=202, headers=headers)

    def _job_fields(self, data: Any) -> tuple[str, str, dict[str, Any]]:
        if not isinstance(data, dict):
            raise ApiError(422, 'the body must be a JSON object: {"kind": "video", '
                         '"prompt": "...", "options": {...}}',
                         [{"field": "body", "reason": "not an object"}])
        unknown = sorted(set(data) - set(JOB_FIELDS))
        if unknown:
            raise ApiError(422, f"unknown field {unknown[0]!r}; a job has kind, prompt and "
                         "options", [{"field": f, "reason": "unknown field"} for f in unknown])
        kind, prompt, options = data.get("kind", DEFAULT_KIND), data.get("prompt", ""), \
            data.get("options", {})
        problems = []
        if not isinstance(kind, str):
            problems.append({"field": "kind", "reason": "must be a string"})
        if not isinstance(prompt, str):
            problems.append({"field": "prompt", "reason": "must be a string"})
        if not isinstance(options, dict):
            problems.append({"field": "options", "reason": "must be an object"})
        elif too_deep(options):
            problems.append({"field": "options",
                             "reason": f"nested more than {MAX_JSON_DEPTH} levels deep"})
        elif isinstance(kind, str) and kind in self.submitter.kinds.names():
            problems += strict_problems(self.submitter.kinds.get(kind).Options, options)
        if problems:
            raise ApiError.naming(problems)
        return kind, prompt.strip(), options

    async def _read_multipart(self, request: web.Request, staging: Path
                              ) -> tuple[str, str, dict[str, Any], list[Path]]:
        """Text fields kind, prompt, options (JSON); files staged in ``staging``."""
        fields, uploads = await read_multipart(request, staging, self.max_body)
        data = {"kind": fields.get("kind", DEFAULT_KIND), "prompt": fields.get("prompt", ""),
                "options": parse_json(fields.get("options") or "{}", "options")}
        kind, prompt, options = self._job_fields(data)
        return kind, prompt, options, uploads

    async def list_jobs(self, request: web.Request) -> web.Response:
        caller = self.authenticate(request)
        query = request.query
        problems = [{"field": name, "reason": "empty: leave it out, or give a value"}
                    for name in ("status", "cursor", "submitted_by") if query.get(name) == ""]
        status = query.get("status") or None
        if status is not None and status not in JobStatus.__members__:
            problems.append({"field": "status",
                             "reason": f"one of {', '.join(JobStatus.__members__)}"})
        limit_text = query.get("limit", "20")
        # Not str.isdigit(): it also takes '²' and other digits int() refuses.
        limit = int(limit_text) if re.fullmatch(r"[0-9]{1,3}", limit_text) else 0
        if not 1 <= limit <= MAX_LISTED:
            problems.append({"field": "limit",
                             "reason": f"a whole number from 1 to {MAX_LISTED}"})
        cursor = parse_cursor(query.get("cursor") or "")
        if cursor == "":
            problems.append({"field": "cursor", "reason": "use the next_cursor of a listing"})
        owner = query.get("submitted_by") or None
        if owner is not None and not caller.is_admin and owner != caller.name:
            raise ApiError(403, "a user token can list only its own jobs")
        if problems:
            raise ApiError.naming(problems)
        scope = owner if caller.is_admin else caller.name
        page, next_cursor = await self.queue.list_jobs(
            limit, cursor, JobStatus(status) if status else None, scope)
        return web.json_response({"jobs": [self.job_view(state) for state in page],
                                  "next_cursor": next_cursor})

    async def get_job(self, request: web.Request) -> web.Response:
        caller = self.authenticate(request)
        state, _ = await self._load(request.match_info["id"], caller)
        return web.json_response(self.job_view(state))

    async def cancel_job(self, request: web.Request) -> web.Response:
        caller = self.authenticate(request)
        job_id = request.match_info["id"]
        await self._load(job_id, caller)
        outcome = await self.queue.cancel(job_id)
        if outcome == "finished":
            state = await self.queue.get_state(job_id) or {}
            raise ApiError(409, f"job {job_id} has already finished ({state.get('status')})")
        if outcome == "unknown":
            raise ApiError(409, f"job {job_id} is no longer in the queue")
        state, _ = await self._load(job_id, caller)
        return web.json_response(self.job_view(state),
                                 status=200 if outcome == "cancelled" else 202)

    def _admin(self, request: web.Request) -> Caller:
        caller = self.authenticate(request)
        if not caller.is_admin:
            raise ApiError(403, "pausing and resuming the workers needs an admin token")
        return caller

    async def pause(self, request: web.Request) -> web.Response:
        caller = self._admin(request)
        body = await read_whole(request.content.read, MAX_FIELD_BYTES, "body")
        data = parse_json(body, "body") if body.strip() else {}
        reason = data.get("reason", "") if isinstance(data, dict) else None
        if not isinstance(reason, str) or set(data) - {"reason"}:
            raise ApiError(422, 'send {"reason": "..."} or no body',
                           [{"field": "reason", "reason": "must be a string"}])
        await self.queue.pause(by=caller.name, reason=reason[:500])
        return web.json_response({"paused": await self.queue.paused()})

    async def resume(self, request: web.Request) -> web.Response:
        self._admin(request)
        await self.queue.resume()
        return web.json_response({"paused": None})

    async def get_file(self, request: web.Request) -> web.StreamResponse:
        job_id = self._check_job_id(request.match_info["id"])
        name = request.match_info["name"]
        if not self._signed(request, job_id, name):
            caller = self.authenticate(request)
            await self._load(job_id, caller)
        artifacts = self._artifacts(job_id)
        if name not in artifacts:  # only the job's own artifacts: no path escapes
            raise ApiError(404, f"job {job_id} has no file {name!r}; see links.files in "
                         f"GET /jobs/{job_id}")
        # Served as the worker wrote it; the report page plays the video by itself.
        return web.FileResponse(artifacts[name], headers={"Cache-Control": "private"})


class HttpIntake:
    """Runs ``HttpApi`` on ``[intake.http] listen`` inside the daemon's event loop.
    Results are fetched (``GET /jobs/{id}``): nothing is delivered."""

    name = Channel.http
    deliver = None

    def __init__(self, config: Config, submitter: Submitter):
        self.config = config
        self.api = HttpApi(config, submitter)
        self.runner: web.AppRunner | None = None

    async def start(self) -> None:
        http = self.config.intake.http
        # What a daemon killed mid-upload staged: no request is reading it any more.
        await asyncio.to_thread(shutil.rmtree, staging_root(self.config), ignore_errors=True)
        self.runner = web.AppRunner(self.api.app(), access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, http.host, http.port)
        try:
            await site.start()
        except OSError as exc:
            await self.runner.cleanup()
            raise JobError(f"cannot listen on {http.listen}: {exc.strerror}; change "
                           "[intake.http] listen, or set enabled = false") from None
        log.info("http api listening", listen=http.listen, tokens=len(self.api.tokens))

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()


def _float(value: Any) -> float | None:
    return float(value) if value not in (None, "") else None


def _bytes(text: str) -> bytes:
    """A header's text as its bytes (aiohttp keeps bytes that are not UTF-8 as
    surrogates): keys and tokens of any bytes, never an encoding error."""
    return text.encode("utf-8", "surrogateescape")


def staging_root(config: Config) -> Path:
    """Where uploads are staged until their job folder takes them (or they are dropped)."""
    return config.state_dir / "uploads"
