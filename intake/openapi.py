"""The OpenAPI 3.1 document for the HTTP API. Each kind's options schema comes from
the pydantic model its pipeline validates with, so the document cannot drift from
what the server accepts; a test checks that it lists exactly the app's routes."""

from __future__ import annotations

from functools import cache
from typing import Any

from daemon import links
from daemon.jobs import JobStatus
from daemon.kinds import KindRegistry
from intake.http_input import CURSOR

_REF = "#/components/schemas/{model}"


def _ref(name: str) -> dict[str, str]:
    return {"$ref": _REF.format(model=name)}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _errors(*statuses: int) -> dict[str, Any]:
    reasons = {400: "the connection closed before the body ended",
               401: "no or unknown token", 403: "not this token's job",
               404: "no such job or file", 409: "the job has already finished",
               429: "the token's queued or daily cap is reached",
               413: "the body (chunked or not) is larger than its limit",
               415: "wrong content type",
               422: "a field, query parameter or header is invalid; problems name it",
               503: "the queue is unavailable, or full"}
    return {str(s): _json(_ref("Error"), reasons[s]) for s in statuses}


def _kind_schemas(kinds: KindRegistry) -> dict[str, Any]:
    schemas: dict[str, Any] = {}
    for kind in kinds.names():
        model = kinds.get(kind).Options
        schema = model.model_json_schema(ref_template=_REF)
        schemas.update(schema.pop("$defs", {}))
        schemas[f"{kind}Options"] = schema
    return schemas


@cache
def openapi_document(kinds: KindRegistry) -> dict[str, Any]:
    """The document for the kinds this server runs (built once per registry)."""
    job_id = {"name": "id", "in": "path", "required": True, "schema": {"type": "string"}}
    schemas: dict[str, Any] = {
        "Error": {"type": "object", "required": ["error"], "properties": {"error": {
            "type": "object", "required": ["status", "message", "problems", "request_id"],
            "properties": {
                "status": {"type": "integer"},
                "message": {"type": "string"},
                "problems": {"type": "array", "items": {
                    "type": "object", "properties": {"field": {"type": "string"},
                                                     "reason": {"type": "string"}}}},
                "request_id": {"type": "string"},
            }}}},
        "NewJob": {"type": "object", "additionalProperties": False, "properties": {
            "kind": {"type": "string", "enum": kinds.names(), "default": "video"},
            "prompt": {"type": "string", "maxLength": 10_000},
            "options": {"description": "validated per kind: see <kind>Options",
                        "oneOf": [_ref(f"{k}Options") for k in kinds.names()]},
        }},
        "Job": {"type": "object", "required": ["id", "kind", "status", "progress", "links"],
                "properties": {
            "id": {"type": "string"},
            "kind": {"type": "string"},
            "status": {"type": "string", "enum": list(JobStatus.__members__)},
            "position": {"type": ["integer", "null"],
                         "description": "1: next to start, in the queue policy's order"},
            "priority": {"type": "string", "enum": ["interactive", "batch"],
                         "description": "queue class: interactive jobs run first"},
            "progress": {"type": "object", "properties": {
                "stage": {"type": "string"}, "percent": {"type": "number"},
                "message": {"type": "string"}}},
            "prompt": {"type": "string"},
            "submitted_by": {"type": "string"},
            "channel": {"type": "string"},
            "created_at": {"type": ["number", "null"]},
            "started_at": {"type": ["number", "null"]},
            "finished_at": {"type": ["number", "null"]},
            "error": {"type": ["string", "null"]},
            "timings": {"type": ["object", "null"]},
            "links": {"type": "object", "properties": {
                "self": {"type": "string"},
                "files": {"type": "object", "additionalProperties": {"type": "string"},
                          "description": "signed links, usable without a token"}}},
        }},
        "JobList": {"type": "object", "properties": {
            "jobs": {"type": "array", "items": _ref("Job")},
            "next_cursor": {"type": ["string", "null"]}}},
        "Health": {"type": "object", "properties": {
            "status": {"type": "string"}, "redis": {"type": "string"},
            "paused": {"type": ["object", "null"]},
            "queue_length": {"type": "integer"},
            "worker_heartbeat_age_s": {"type": ["number", "null"]},
            "workers": {"type": "array", "items": {"type": "object"}}}},
        **_kind_schemas(kinds),
    }
    upload = {"type": "object", "properties": {
        "kind": {"type": "string"}, "prompt": {"type": "string"},
        "options": {"type": "string", "description": "a JSON object"},
        "file": {"type": "string", "format": "binary"}}}
    return {
        "openapi": "3.1.0",
        "info": {"title": "reelqueue", "version": "1",
                 "description": "Submit, watch, fetch and cancel reelqueue jobs."},
        "security": [{"bearer": []}],
        "paths": {
            "/": {"get": {"summary": "A small web page using this API", "security": [],
                          "responses": {"200": {"description": "HTML",
                                                "content": {"text/html": {}}}}}},
            "/healthz": {"get": {
                "summary": "Redis, workers and queue; no token needed", "security": [],
                "description": "the job each worker runs (workers[].job_id) is shown only "
                               "to a valid token",
                "responses": {"200": _json(_ref("Health"), "healthy"),
                              "503": _json(_ref("Health"), "Redis or every worker is down")}}},
            "/metrics": {"get": {"summary": "Prometheus metrics", "responses": {
                "200": {"description": "exposition text", "content": {"text/plain": {}}},
                **_errors(401)}}},
            "/openapi.json": {"get": {"summary": "This document", "responses": {
                "200": {"description": "OpenAPI 3.1", "content": {"application/json": {}}},
                **_errors(401)}}},
            "/jobs": {
                "post": {
                    "summary": "Queue a job",
                    "parameters": [{"name": "Idempotency-Key", "in": "header",
                                    "schema": {"type": "string"},
                                    "description": "a retry with the same key returns the "
                                                   "first job"}],
                    "requestBody": {"required": True, "content": {
                        "application/json": {"schema": _ref("NewJob")},
                        "multipart/form-data": {"schema": upload}}},
                    "responses": {"202": {**_json(_ref("Job"), "queued"), "headers": {
                        "Location": {"schema": {"type": "string"}}}},
                        **_errors(400, 401, 413, 415, 422, 429, 503)}},
                "get": {
                    "summary": "Recent jobs, newest first",
                    "parameters": [
                        {"name": "status", "in": "query",
                         "schema": {"type": "string", "enum": list(JobStatus.__members__)}},
                        {"name": "limit", "in": "query",
                         "schema": {"type": "integer", "minimum": 1, "maximum": 200,
                                    "default": 20}},
                        {"name": "cursor", "in": "query", "schema": {
                            "type": "string", "pattern": f"^{CURSOR.pattern}$"},
                         "description": "the next_cursor of the page before"},
                        {"name": "submitted_by", "in": "query", "schema": {"type": "string"},
                         "description": "admin tokens: another token's jobs"}],
                    "responses": {"200": _json(_ref("JobList"), "a page of jobs"),
                                  **_errors(401, 403, 422)}},
            },
            "/jobs/{id}": {
                "get": {"summary": "A job's status, progress, timings and file links",
                        "parameters": [job_id],
                        "responses": {"200": _json(_ref("Job"), "the job"),
                                      **_errors(401, 403, 404)}},
                "delete": {"summary": "Cancel a queued job or interrupt a running one",
                           "parameters": [job_id],
                           "responses": {"200": _json(_ref("Job"), "cancelled"),
                                         "202": _json(_ref("Job"), "stopping at its next step"),
                                         **_errors(401, 403, 404, 409)}},
            },
            "/admin/pause": {"post": {
                "summary": "Workers finish their running job and take no new one (admin)",
                "requestBody": {"required": False, "content": {"application/json": {
                    "schema": {"type": "object", "properties": {"reason": {"type": "string"}}}}}},
                "responses": {"200": _json({"type": "object"}, "paused"),
                              **_errors(400, 401, 403, 413, 422)}}},
            "/admin/resume": {"post": {
                "summary": "Let paused workers take jobs again (admin)",
                "responses": {"200": _json({"type": "object"}, "resumed"),
                              **_errors(401, 403)}}},
            "/jobs/{id}/files/{name}": {"get": {
                "summary": "An artifact; supports Range. Signed links need no token.",
                "parameters": [job_id,
                               {"name": "name", "in": "path", "required": True,
                                "schema": {"type": "string"}},
                               {"name": "expires", "in": "query", "schema": {
                                   "type": "string", "pattern": f"^{links.EXPIRES.pattern}$"}},
                               {"name": "sig", "in": "query", "schema": {
                                   "type": "string", "pattern": f"^{links.SIGNATURE.pattern}$"}}],
                "responses": {"200": {"description": "the file"},
                              "206": {"description": "a byte range of the file"},
                              **_errors(401, 403, 404, 422)}}},
        },
        "components": {
            "schemas": schemas,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
    }
