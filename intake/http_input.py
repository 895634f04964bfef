"""What the HTTP API reads from a request, and how it says no: bodies read whole (however
they arrive: split over TCP segments, chunked) and never past their limit, multipart
uploads streamed to a staging folder, JSON parsed with a depth limit. Whatever a client
sends, the answer is an ``ApiError`` (a 4xx naming the field), never an exception the
server did not expect."""

from __future__ import annotations

import json
import math
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

from aiohttp import BodyPartReader, MultipartReader, web
from aiohttp.http_exceptions import HttpProcessingError
from pydantic import BaseModel, ValidationError

from daemon import links
from daemon.jobs import validation_problems

MB = 1024 * 1024
MAX_FIELD_BYTES = MB  # a prompt or an options document, not a media file
MAX_JSON_DEPTH = 32  # options are a few levels deep; far deeper is an attack or a bug
UPLOAD_CHUNK = MB
# A listing's cursor (a creation time, as next_cursor gives it): a plain decimal Redis
# reads, and always a finite one (not "nan", "1_000", "١", "1e999").
CURSOR = re.compile(r"-?[0-9]{1,20}(\.[0-9]{1,20})?([eE][-+]?[0-9]{1,2})?")
JOB_ID = re.compile(r"[A-Za-z0-9]{1,64}")
DEFAULT_KIND = "video"  # a job that names no kind
JOB_FIELDS = ("kind", "prompt", "options")
UPLOAD_FIELD = "file"  # the multipart parts that carry a job's input files
MAX_LISTED = 200  # jobs on one page of a listing


class ApiError(Exception):
    """An error answered with reelqueue's JSON body; the middleware adds the request id."""

    def __init__(self, status: int, message: str,
                 problems: list[dict[str, str]] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.problems = problems or []

    @classmethod
    def naming(cls, problems: list[dict[str, str]], lead: str = "", status: int = 422
               ) -> ApiError:
        """An error whose message lists its problems: ``field: reason; …``."""
        return cls(status, lead + "; ".join(f"{p['field']}: {p['reason']}" for p in problems),
                   problems)


async def chunks(read: Callable[[int], Awaitable[bytes]], limit: int, field: str,
                 told: int | None = None) -> AsyncIterator[bytes]:
    """What ``read`` gives until the end of the body (or part), however it arrives; past
    ``limit`` bytes a 413 naming ``field`` (``told``: the whole request's limit, when
    ``limit`` is what is left of it)."""
    size = 0
    try:
        while chunk := await read(UPLOAD_CHUNK):  # b"" only at the end, unlike read(n)
            size += len(chunk)
            if size > limit:
                message = (f"the request is larger than {told / MB:g} MB (at the {field})"
                           if told else f"the {field} is larger than {limit / MB:g} MB")
                raise ApiError(413, message, [{"field": field, "reason": message}])
            yield chunk
    except ConnectionResetError:  # the client went away: nobody reads this answer
        raise ApiError(400, f"the connection closed before the {field} ended") from None


async def read_whole(read: Callable[[int], Awaitable[bytes]], limit: int, field: str,
                     told: int | None = None) -> bytes:
    return b"".join([chunk async for chunk in chunks(read, limit, field, told)])


def parse_json(text: bytes | str, field: str) -> Any:
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, UnicodeDecodeError
        reason = "nested too deeply" if isinstance(exc, RecursionError) else "not valid JSON"
        raise ApiError(422, f"the {field} is not valid JSON ({reason}): {exc}",
                       [{"field": field, "reason": reason}]) from None


def parse_cursor(text: str) -> str | None:
    """A listing's cursor as given to Redis: None for none, "" for one that is no
    next_cursor (Redis would refuse it: a 503 instead of this 422)."""
    if not text:
        return None
    number = float(text) if CURSOR.fullmatch(text) else math.nan
    return repr(number) if math.isfinite(number) else ""


def strict_problems(model: type[BaseModel], options: dict[str, Any]) -> list[dict[str, str]]:
    """Where ``options`` holds another JSON type than the schema states: over HTTP, "3"
    is no number and 1 no boolean (the kind's own validation, which other channels'
    text needs, would take them). 3.0 is an integer, as in JSON Schema."""
    try:
        text = json.dumps(_integral(options), ensure_ascii=False).encode()
    except UnicodeEncodeError:  # a lone surrogate: the submission names where
        return []
    try:
        model.model_validate_json(text, strict=True)
    except ValidationError as exc:
        return [{**p, "field": f"options.{p['field']}"} for p in validation_problems(exc)]
    return []


def _integral(value: Any) -> Any:
    """``value`` with every whole float (3.0) an int (3); depth is bounded (too_deep)."""
    if isinstance(value, dict):
        return {key: _integral(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_integral(item) for item in value]
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def too_deep(value: Any, limit: int = MAX_JSON_DEPTH) -> bool:
    """Whether JSON ``value`` nests lists and objects more than ``limit`` deep; checked
    level by level, not recursively: what reads it next recurses, and must not run out
    of stack."""
    level = [value]
    for _ in range(limit + 1):
        level = [item for v in level if isinstance(v, dict | list)
                 for item in (v.values() if isinstance(v, dict) else v)]
        if not level:
            return False
    return True


async def read_multipart(request: web.Request, staging: Path, max_body: int
                         ) -> tuple[dict[str, str], list[Path]]:
    """Text fields (at most 1 MB each) and files, streamed into ``staging``, never held
    whole in memory. Every part counts against ``max_body`` as it arrives, and is taken
    as sent (RFC 7578 retired Content-Transfer-Encoding). Text fields are a job's
    (kind, prompt, options), files are ``file`` parts; any other part is a 422. The
    caller removes ``staging``, whatever happens."""
    fields: dict[str, str] = {}
    uploads: list[Path] = []
    left = max_body
    try:
        reader = await request.multipart()
    except (KeyError, ValueError):  # no boundary, or one over 70 characters
        raise ApiError(422, "multipart/form-data needs a boundary (1 to 70 characters) in "
                       "its Content-Type", [{"field": "Content-Type",
                                             "reason": "no usable boundary"}]) from None
    while (part := await _next_part(reader)) is not None:
        if not isinstance(part, BodyPartReader):
            raise ApiError(422, "nested multipart bodies are not supported",
                           [{"field": "body", "reason": "nested multipart"}])
        # A file part may leave out its file name (RFC 7578: SHOULD): it is "upload".
        is_file = part.filename is not None or part.name == UPLOAD_FIELD
        if part.name not in ((UPLOAD_FIELD,) if is_file else JOB_FIELDS):
            raise ApiError(422, f"unknown {'file' if is_file else 'field'} part "
                           f"{part.name!r}: a job has the fields {', '.join(JOB_FIELDS)} "
                           f"and files named {UPLOAD_FIELD!r}",
                           [{"field": part.name or "", "reason": "unknown field"}])
        if not is_file:
            limit, told = ((MAX_FIELD_BYTES, None) if left > MAX_FIELD_BYTES
                           else (left, max_body))
            value = await read_whole(part.read_chunk, limit, part.name or "field", told)
            left -= len(value)
            fields[part.name or ""] = value.decode("utf-8", "replace")
            continue
        target = staging / _unique(links.safe_filename(part.filename or ""), uploads)
        target.parent.mkdir(parents=True, exist_ok=True)
        with open(target, "wb") as handle:
            async for chunk in chunks(part.read_chunk, left, "file", max_body):
                handle.write(chunk)
            left -= handle.tell()
        uploads.append(target)
    return fields, uploads


async def _next_part(reader: MultipartReader) -> Any:
    """The next part, or a 4xx where the body is not the multipart it says it is."""
    try:
        return await reader.next()
    except ConnectionResetError:
        raise ApiError(400, "the connection closed before the body ended") from None
    except (ValueError, HttpProcessingError) as exc:  # no start boundary, control bytes…
        raise ApiError(422, f"the multipart body is malformed: {exc}",
                       [{"field": "body", "reason": "malformed multipart"}]) from None


def _unique(name: str, taken: list[Path]) -> str:
    """``name``, or ``stem-2.suffix`` and so on where an earlier part took it."""
    path, n = Path(name), 1
    while name in {p.name for p in taken}:
        n += 1
        name = f"{path.stem}-{n}{path.suffix}"
    return name
