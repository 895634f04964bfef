"""The OpenAPI 3.1 document for the HTTP API. Each kind's options schema comes from
the pydantic model its pipeline validates with, so the document cannot drift from
what the server accepts; a test checks that it lists exactly the app's routes."""

from __future__ import annotations

from functools import cache
from typing import Any

from daemon import links
from daemon.jobs import JobStatus
from daemon.kinds import MAX_PROMPT_CHARS, KindRegistry
from intake.http_input import CURSOR, DEFAULT_KIND, JOB_ID, MAX_LISTED, UPLOAD_FIELD

_REF = "#/components/schemas/{model}"


def _ref(name: str) -> dict[str, str]:
    return {"$ref": _REF.format(model=name)}


# Every answer carries one (the client's own X-Request-ID when it is a safe one).
_HEADERS = {"X-Request-ID": {"required": True, "schema": {"type": "string",
                                                          "pattern": "^[A-Za-z0-9._-]{1,64}$"}}}
# pydantic leaves the bounds of an annotated type with a before-validator (Duration) as
# its own keywords; JSON Schema's names for them:
_BOUNDS = {"ge": "minimum", "le": "maximum", "gt": "exclusiveMinimum", "lt": "exclusiveMaximum"}


def _json(schema: dict[str, Any], description: str, **headers: Any) -> dict[str, Any]:
    return {"description": description, "headers": {**_HEADERS, **headers},
            "content": {"application/json": {"schema": schema}}}


def _errors(*statuses: int) -> dict[str, Any]:
    reasons = {400: "the connection closed before the body ended",
               401: "no or unknown token", 403: "not this token's job",
               404: "no such job or file", 409: "the job has already finished",
               429: "the token's queued or daily cap is reached",
               413: "the body (chunked or not) is larger than its limit",
               415: "wrong content type",
               422: "a field, query parameter or header is invalid; problems name it",
               503: "the queue (Redis) is unavailable, or full"}
    return {str(s): _json(_ref("Error"), reasons[s]) for s in statuses}


def _kind_schemas(kinds: KindRegistry) -> dict[str, Any]:
    schemas: dict[str, Any] = {}
    for kind in kinds.names():
        model = kinds.get(kind).Options
        schema = _bounded(model.model_json_schema(ref_template=_REF))
        schemas.update(schema.pop("$defs", {}))
        schemas[f"{kind}Options"] = schema
    return schemas


def _bounded(schema: Any) -> Any:
    """``schema`` with pydantic's stray ``ge``/``le``/``gt``/``lt`` as JSON Schema's."""
    if isinstance(schema, list):
        return [_bounded(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    numeric = schema.get("type") in ("number", "integer")
    return {(_BOUNDS[key] if numeric and key in _BOUNDS else key): _bounded(value)
            for key, value in schema.items()}


def _new_jobs(kinds: KindRegistry, multipart: bool) -> dict[str, Any]:
    """A job, one shape per kind told apart by ``kind`` (a missing kind is the default
    one's). JSON carries no files, so a kind that needs one is multipart only; a
    multipart job sends its files as ``file`` parts, and only a kind that takes them."""
    shapes = []
    for kind in kinds.names():
        takes = tuple(kinds.get(kind).INPUTS)
        if takes and not multipart:
            continue
        shape: dict[str, Any] = {
            "title": kind, "type": "object", "additionalProperties": False,
            "required": [] if kind == DEFAULT_KIND else ["kind"], "properties": {
                "kind": {"const": kind},
                "prompt": {"type": "string", "maxLength": MAX_PROMPT_CHARS},
                "options": _ref(f"{kind}Options")}}
        if takes:
            shape["required"].append(UPLOAD_FIELD)
            shape["properties"][UPLOAD_FIELD] = {
                "type": "array", "minItems": 1, "description": f"named {', '.join(takes)}",
                "items": {"type": "string", "contentMediaType": "application/octet-stream"}}
        shapes.append(shape)
    return {"oneOf": shapes}


@cache
def openapi_document(kinds: KindRegistry) -> dict[str, Any]:
    """The document for the kinds this server runs (built once per registry)."""
    job_id = {"name": "id", "in": "path", "required": True,
              "schema": {"type": "string", "pattern": f"^{JOB_ID.pattern}$"}}
    nullable = {t: {"type": [t, "null"]} for t in ("number", "integer", "string", "object")}
    schemas: dict[str, Any] = {
        "Error": {"type": "object", "required": ["error"], "properties": {"error": {
            "type": "object", "required": ["status", "message", "problems", "request_id"],
            "properties": {
                "status": {"type": "integer"},
                "message": {"type": "string"},
                "problems": {"type": "array", "items": {
                    "type": "object", "required": ["field", "reason"],
                    "properties": {"field": {"type": "string"},
                                   "reason": {"type": "string"}}}},
                "request_id": {"type": "string"},
            }}}},
        "NewJob": _new_jobs(kinds, multipart=False),
        "NewJobForm": _new_jobs(kinds, multipart=True),
        "Job": {"type": "object", "required": [
            "id", "kind", "status", "position", "progress", "prompt", "submitted_by",
            "channel", "priority", "created_at", "started_at", "finished_at", "error",
            "links"], "properties": {
            "id": {"type": "string"},
            "kind": {"type": "string"},
            "status": {"type": "string", "enum": list(JobStatus.__members__)},
            "position": {**nullable["integer"], "minimum": 1,
                         "description": "1: next to start, in the queue policy's order"},
            "priority": {"type": "string", "enum": ["interactive", "batch"],
                         "description": "queue class: interactive jobs run first"},
            "progress": {"type": "object", "required": ["stage", "percent", "message"],
                         "properties": {"stage": {"type": "string"},
                                        "percent": {"type": "number"},
                                        "message": {"type": "string"}}},
            "prompt": {"type": "string"},
            "submitted_by": {"type": "string"},
            "channel": {"type": "string"},
            "created_at": nullable["number"],
            "started_at": nullable["number"],
            "finished_at": nullable["number"],
            "error": nullable["string"],
            "timings": {**nullable["object"], "description": "a done job's, from its report"},
            "links": {"type": "object", "required": ["self"], "properties": {
                "self": {"type": "string"},
                "files": {"type": "object", "additionalProperties": {"type": "string"},
                          "description": "a done job's: signed links, usable without a "
                                         "token"}}},
        }},
        "JobList": {"type": "object", "required": ["jobs", "next_cursor"], "properties": {
            "jobs": {"type": "array", "items": _ref("Job"), "maxItems": MAX_LISTED},
            "next_cursor": {"type": ["string", "null"], "pattern": f"^{CURSOR.pattern}$",
                            "description": "null on the last page"}}},
        "Paused": {"type": "object", "required": ["paused"], "properties": {
            "paused": {**nullable["object"], "description": "null: not paused"}}},
        "Health": {"type": "object", "required": ["status", "redis"], "properties": {
            "status": {"type": "string", "description": "ok, no worker alive, unhealthy"},
            "redis": {"type": "string"},
            "paused": nullable["object"],
            "queue_length": {"type": "integer", "minimum": 0},
            "worker_heartbeat_age_s": nullable["number"],
            "workers": {"type": "array", "items": {"type": "object", "description":
                "name, device, age_s, vram_used, vram_total, stopped; job_id to a token"}},
            "channels": {"type": "object", "description": "each channel of the daemon: "
                         "running, or why it is not (and how often it was tried)",
                         "additionalProperties": {"type": "object"}}}},
        **_kind_schemas(kinds),
    }
    signed = {"name": "link", "in": "query", "style": "form", "explode": True,
              "description": "a signed link's query (expires and sig, both or neither): "
                             "it opens the job's files without a token",
              "schema": {"type": "object", "additionalProperties": False,
                         "required": ["expires", "sig"], "properties": {
                             "expires": {"type": "string",
                                         "pattern": f"^{links.EXPIRES.pattern}$"},
                             "sig": {"type": "string",
                                     "pattern": f"^{links.SIGNATURE.pattern}$"}}}}
    listing = [
        {"name": "status", "in": "query",
         "schema": {"type": "string", "enum": list(JobStatus.__members__)}},
        {"name": "limit", "in": "query",
         "schema": {"type": "integer", "minimum": 1, "maximum": MAX_LISTED, "default": 20}},
        {"name": "cursor", "in": "query", "description": "the next_cursor of the page before",
         "schema": {"type": "string", "pattern": f"^{CURSOR.pattern}$"}},
        {"name": "submitted_by", "in": "query", "description": "admin tokens: another "
         "token's jobs (a user token may name only itself)",
         "schema": {"type": "string", "minLength": 1}}]
    idempotency = {"name": "Idempotency-Key", "in": "header", "schema": {"type": "string"},
                   "description": "a retry with the same key (per token) returns the first "
                                  "job; only its first 200 characters count"}
    replayed = {"Location": {"required": True, "schema": {"type": "string"}},
                "Idempotent-Replayed": {"schema": {"const": "true"},
                                        "description": "the key's job, queued before"}}
    return {
        "openapi": "3.1.0",
        "info": {"title": "reelqueue", "version": "1",
                 "description": "Submit, watch, fetch and cancel reelqueue jobs."},
        "security": [{"bearer": []}],
        "paths": {
            "/": {"get": {"summary": "A small web page using this API", "security": [],
                          "responses": {"200": {"description": "HTML", "headers": _HEADERS,
                                                "content": {"text/html": {}}}}}},
            "/healthz": {"get": {
                "summary": "Redis, workers and queue; no token needed",
                "security": [{}, {"bearer": []}],
                "description": "the job each worker runs (workers[].job_id) is shown only "
                               "to a valid token",
                "responses": {"200": _json(_ref("Health"), "healthy"),
                              "503": _json(_ref("Health"), "Redis or every worker is down")}}},
            "/metrics": {"get": {"summary": "Prometheus metrics", "responses": {
                "200": {"description": "exposition text", "headers": _HEADERS,
                        "content": {"text/plain": {"schema": {"type": "string"}}}},
                **_errors(401, 503)}}},
            "/openapi.json": {"get": {"summary": "This document", "responses": {
                "200": _json({"type": "object", "required": ["openapi", "paths"]},
                             "OpenAPI 3.1"),
                **_errors(401)}}},
            "/jobs": {
                "post": {
                    "summary": "Queue a job",
                    "parameters": [idempotency],
                    "requestBody": {"required": True, "content": {
                        "application/json": {"schema": _ref("NewJob")},
                        "multipart/form-data": {"schema": _ref("NewJobForm"), "encoding": {
                            "options": {"contentType": "application/json"}}}}},
                    "responses": {
                        "202": _json(_ref("Job"), "queued (or, replayed, the key's job)",
                                     **replayed),
                        **_errors(400, 401, 413, 415, 422, 429, 503)}},
                "get": {
                    "summary": "Recent jobs, newest first",
                    "parameters": listing,
                    "responses": {"200": _json(_ref("JobList"), "a page of jobs"),
                                  **_errors(401, 403, 422, 503)}},
            },
            "/jobs/{id}": {
                "get": {"summary": "A job's status, progress, timings and file links",
                        "parameters": [job_id],
                        "responses": {"200": _json(_ref("Job"), "the job"),
                                      **_errors(401, 403, 404, 503)}},
                "delete": {"summary": "Cancel a queued job or interrupt a running one",
                           "parameters": [job_id],
                           "responses": {"200": _json(_ref("Job"), "cancelled"),
                                         "202": _json(_ref("Job"), "stopping at its next step"),
                                         **_errors(401, 403, 404, 409, 503)}},
            },
            "/admin/pause": {"post": {
                "summary": "Workers finish their running job and take no new one (admin)",
                "requestBody": {"required": False, "content": {"application/json": {
                    "schema": {"type": "object", "additionalProperties": False,
                               "properties": {"reason": {
                                   "type": "string",
                                   "description": "kept to its first 500 characters"}}}}}},
                "responses": {"200": _json(_ref("Paused"), "paused"),
                              **_errors(400, 401, 403, 413, 422, 503)}}},
            "/admin/resume": {"post": {
                "summary": "Let paused workers take jobs again (admin)",
                "responses": {"200": _json(_ref("Paused"), "resumed"),
                              **_errors(401, 403, 503)}}},
            "/jobs/{id}/files/{name}": {"get": {
                "summary": "An artifact; supports Range. Signed links need no token.",
                "security": [{"bearer": []}, {}],
                "parameters": [job_id,
                               {"name": "name", "in": "path", "required": True,
                                "schema": {"type": "string"}},
                               signed],
                "responses": {"200": {"description": "the file", "headers": _HEADERS,
                                      "content": {"*/*": {}}},
                              "206": {"description": "a byte range of the file",
                                      "headers": _HEADERS, "content": {"*/*": {}}},
                              "416": {"description": "the range is outside the file",
                                      "headers": _HEADERS},
                              **_errors(401, 403, 404, 422, 503)}}},
        },
        "components": {
            "schemas": schemas,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
    }
