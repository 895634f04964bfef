"""Read a request file: a ``.txt``/``.md`` prompt, or a ``.json``/``.toml`` job file
that carries the prompt and options. Every problem becomes a ``JobError`` that says
what is wrong and how to fix it."""

from __future__ import annotations

import json
import tomllib
from dataclasses import dataclass
from pathlib import PurePath
from typing import Any

from daemon.jobs import JobError

PROMPT_SUFFIXES = (".txt", ".md")
JOB_FILE_SUFFIXES = (".json", ".toml")


@dataclass
class JobFile:
    """What a request file asks for; ``daemon.submit`` checks it."""

    kind: str
    prompt: str
    options: dict[str, Any]


def _decode(data: bytes) -> str:
    if not data.strip():
        raise JobError(
            "the file is empty: write the prompt in it as plain UTF-8 text (.txt or .md), "
            "or use a .json/.toml job file"
        )
    if b"\0" in data:
        raise JobError(
            "this looks like a binary file, not text: a prompt must be a UTF-8 text file "
            "(.txt or .md), or a .json/.toml job file"
        )
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise JobError(
            f"the file is not valid UTF-8 text (undecodable byte at offset {exc.start}); "
            "save it with UTF-8 encoding and drop it again"
        ) from None


def _parse_job_file(suffix: str, text: str) -> dict[str, Any]:
    if suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise JobError(
                f"the JSON is malformed at line {exc.lineno}, column {exc.colno}: {exc.msg}"
            ) from None
    else:
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise JobError(f"the TOML is malformed: {exc}") from None
    if not isinstance(data, dict):
        raise JobError(
            'a job file must hold one object, e.g. {"prompt": "a red fox running in snow", '
            '"duration": 10}'
        )
    return data


def parse_request(
    filename: str,
    data: bytes,
    default_kind: str,
    default_options: dict[str, Any] | None = None,
) -> JobFile:
    """Parse a request file's bytes; the folder's default options under the file's own."""
    suffix = PurePath(filename).suffix.lower()
    if suffix not in PROMPT_SUFFIXES + JOB_FILE_SUFFIXES:
        accepted = ", ".join(PROMPT_SUFFIXES + JOB_FILE_SUFFIXES)
        raise JobError(
            f"unsupported file type {suffix or '(no extension)'!r}: drop a prompt as .txt or "
            f".md, or a job file as .json or .toml (accepted: {accepted})"
        )
    text = _decode(data)
    options = dict(default_options or {})
    if suffix in PROMPT_SUFFIXES:
        return JobFile(default_kind, text.strip(), options)
    fields = _parse_job_file(suffix, text)
    kind = fields.pop("kind", default_kind)
    prompt = fields.pop("prompt", "")
    if not isinstance(kind, str) or not isinstance(prompt, str):
        raise JobError("'kind' and 'prompt' in a job file must be text")
    options.update(fields)
    return JobFile(kind, prompt.strip(), options)
