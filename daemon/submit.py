"""The one way a job gets into reelqueue, whichever channel it came from.

A channel turns its own input (a dropped file, a POST, a chat message, a command line)
into a ``Request`` and hands it to ``Submitter.submit``, which answers ``Accepted`` or
``Refused``; the channel turns that answer into its own reply. In one place, in this
order:

1. validate: that every text is text (no lone surrogate, which no file can hold), the
   kind, its options, the input file names, the prompt's length, the content
   blocklist (so a blocked prompt is refused at once, never queued), and whether this
   server can run the kind at all (its model configured and installed);
2. idempotency: a request that carries an id already used (the same dropped file, the
   same chat update, the same ``Idempotency-Key``) collapses into that job. This comes
   before the caps, since the first request already took its place under them;
3. caps: the submitter's queued and daily caps and the global queue cap, checked and
   taken in one Redis script (``daemon.caps``);
4. the job folder: inputs, then ``spec.json`` (a folder with a spec is a whole job);
5. enqueue.

A failure after step 3 gives the place back and removes what step 4 wrote, except a
written spec whose id is deterministic: the channel's retry (a rescan, a fetched
update, a client retrying with its key) finds it and finishes the enqueue.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import shutil
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

from redis.exceptions import RedisError

from daemon import caps, content, files, refusals
from daemon.config import Config
from daemon.jobs import JobError, JobSpec, Source, job_dir, new_job_id, read_spec, write_spec
from daemon.kinds import MAX_PROMPT_CHARS, KindRegistry
from daemon.queue import QueueClient
from daemon.schedule import Priority

# Lone surrogates: JSON's "\ud800", undecodable bytes of a file name. Not text: no UTF-8
# file (the spec, the logs, a reply) can hold one.
_SURROGATE = re.compile("[\ud800-\udfff]")


@dataclass(frozen=True)
class Upload:
    """An input file of a request: its name, and how to put it at a path in the job
    folder (atomically: the folder must never hold half an input)."""

    name: str
    put: Callable[[Path], Awaitable[None]]

    @classmethod
    def of_bytes(cls, name: str, data: bytes) -> Upload:
        async def put(dest: Path) -> None:
            await asyncio.to_thread(files.write_bytes, dest, data)

        return cls(name, put)

    @classmethod
    def of_file(cls, name: str, path: Path, move: bool = False) -> Upload:
        """A file on this machine: copied (kept where it is), or moved (a staged upload)."""
        async def put(dest: Path) -> None:
            await asyncio.to_thread(files.move_file if move else files.copy_file, path, dest)

        return cls(name, put)


@dataclass(frozen=True)
class Limits:
    """What one submitter may do; a cap of 0 takes [queue]'s per-submitter one."""

    max_queued: int = 0
    max_per_day: int = 0
    max_prompt_chars: int = MAX_PROMPT_CHARS


@dataclass(frozen=True)
class Request:
    kind: str
    prompt: str
    options: dict[str, Any]
    source: Source
    submitted_by: str
    priority: Priority = "interactive"
    inputs: tuple[Upload, ...] = ()  # what the kind works on (checked against its INPUTS)
    # The request itself as received, kept beside the inputs (a dropped prompt file):
    # the answer can bring it back even if the sender removed it meanwhile.
    kept: Upload | None = None
    # Deterministic where the channel has one (a dropped file's content, a chat update,
    # an Idempotency-Key): the same id is the same job. None: a new job.
    job_id: str | None = None
    limits: Limits = field(default_factory=Limits)


@dataclass(frozen=True)
class Accepted:
    spec: JobSpec
    position: int | None  # 1: next to start; None: no longer waiting
    duplicate: bool  # an earlier request with this id had made the job already


class Refusal(StrEnum):
    invalid = "invalid"  # a field is wrong; the message names it
    blocked = "blocked"  # the content blocklist
    unavailable = "unavailable"  # this server cannot run the kind (its model is missing)
    queued_cap = "queued_cap"  # the submitter has that many queued or running already
    daily_cap = "daily_cap"  # the submitter has used today's jobs
    queue_full = "queue_full"  # everybody's cap: try again later


# The refusals that are final (not "try again later"): the digest lists them.
FINAL = (Refusal.invalid, Refusal.blocked, Refusal.unavailable)


@dataclass(frozen=True)
class Refused:
    why: Refusal
    message: str  # for the sender, as is (a channel may word a cap its own way)
    problems: list[dict[str, str]] = field(default_factory=list)
    retry_after_s: float | None = None
    count: int = 0  # a cap's: how many the sender has
    limit: int = 0  # and how many it may have


class Submitter:
    def __init__(self, config: Config, queue: QueueClient, kinds: KindRegistry):
        self.config = config
        self.queue = queue
        self.kinds = kinds
        self.jobs_dir = config.jobs_dir
        self.blocklist = config.queue.blocklist
        self.max_waiting = config.queue.max_queued  # 0: no cap
        self.default_limits = Limits(config.queue.max_queued_per_submitter,
                                     config.queue.max_jobs_per_day_per_submitter)

    async def submit(self, request: Request) -> Accepted | Refused:
        answer = await self._submit(request)
        if isinstance(answer, Refused) and answer.why in FINAL:
            await asyncio.to_thread(self._record, request, answer)
        return answer

    def _record(self, request: Request, refused: Refused) -> None:
        """For the digest: a request that will never run, whoever sent it."""
        source = request.source
        what = source.filename or request.prompt.strip().split("\n", 1)[0] or request.kind
        # A full disk: the sender was told; the digest goes without it.
        with contextlib.suppress(OSError):
            refusals.record(self.config.state_dir, channel=source.channel,
                            submitted_by=request.submitted_by, what=what,
                            reason=refused.message, kind=request.kind)

    async def _submit(self, request: Request) -> Accepted | Refused:
        names = [upload.name for upload in request.inputs]
        kept = [request.kept.name] if request.kept else []
        texts = _texts({"prompt": request.prompt, "options": request.options,
                        "file": names + kept})
        problems = [{"field": where, "reason": "holds a lone surrogate, which is not text"}
                    for where, text in texts if _SURROGATE.search(text)]
        if problems:
            return Refused(Refusal.invalid, f"{problems[0]['field']} is not valid text: it "
                           "holds a lone surrogate (such as \\ud800); send UTF-8", problems)
        try:
            options = self.kinds.validate(request.kind, request.prompt, request.options,
                                          names, request.limits.max_prompt_chars)
        except JobError as exc:
            return Refused(Refusal.invalid, str(exc), exc.problems)
        rule = content.first_match([request.prompt, *(text for _, text in _texts(options))],
                                   self.blocklist)
        if rule is not None:
            return Refused(Refusal.blocked, f"the request matches this server's content rule "
                           f"{rule!r} ([queue] blocklist), so it was not queued",
                           [{"field": "prompt", "reason": "matches a content rule"}])

        why_not = await asyncio.to_thread(self.kinds.get(request.kind).unavailable, self.config)
        if why_not is not None:
            return Refused(Refusal.unavailable, why_not,
                           [{"field": "kind", "reason": "cannot run on this server now"}])

        job_id = request.job_id or new_job_id()
        existing = await asyncio.to_thread(self._known_spec, job_id)
        if existing is not None:
            queued = await self.queue.enqueue(existing)
            return Accepted(existing, queued.position, duplicate=not queued.accepted)

        limits = Limits(request.limits.max_queued or self.default_limits.max_queued,
                        request.limits.max_per_day or self.default_limits.max_per_day)
        place = await caps.reserve(self.queue.redis, job_id, request.submitted_by,
                                   limits.max_queued, limits.max_per_day, self.max_waiting)
        if not place.ok:
            return self._over_cap(place, limits)
        uploads = [*request.inputs, *([request.kept] if request.kept else [])]
        spec = JobSpec(id=job_id, kind=request.kind, prompt=request.prompt, options=options,
                       inputs=[upload.name for upload in uploads], source=request.source,
                       submitted_by=request.submitted_by, priority=request.priority)
        async with self._undone_on_failure(spec, place,
                                           keep_files=request.job_id is not None):
            directory = job_dir(self.jobs_dir, job_id)
            for upload in uploads:
                await upload.put(directory / "inputs" / upload.name)
            await asyncio.to_thread(write_spec, self.jobs_dir, spec)
            queued = await self.queue.enqueue(spec)
        return Accepted(spec, queued.position, duplicate=not queued.accepted)

    def _known_spec(self, job_id: str) -> JobSpec | None:
        try:
            return read_spec(self.jobs_dir, job_id)
        except FileNotFoundError:
            return None

    @contextlib.asynccontextmanager
    async def _undone_on_failure(self, spec: JobSpec, place: caps.Reservation,
                                 keep_files: bool) -> AsyncIterator[None]:
        try:
            yield
        except BaseException:
            directory = job_dir(self.jobs_dir, spec.id)
            if not (keep_files and (directory / "spec.json").exists()):
                shutil.rmtree(directory, ignore_errors=True)
            if place.taken:
                # Best effort: with Redis gone, the place frees itself (daemon.caps).
                with contextlib.suppress(RedisError, OSError):
                    await caps.give_back(self.queue.redis, spec.id, spec.submitted_by)
            raise

    def _over_cap(self, place: caps.Reservation, limits: Limits) -> Refused:
        if place.verdict == "queue_full":
            return Refused(Refusal.queue_full, f"the queue is full ({place.count} jobs "
                           f"waiting, the limit is {self.max_waiting}); try again later",
                           retry_after_s=60.0, count=place.count, limit=self.max_waiting)
        if place.verdict == "queued":
            return Refused(Refusal.queued_cap, f"you have {place.count} jobs queued or "
                           f"running, the most allowed ({limits.max_queued}); send more when "
                           "one has finished", retry_after_s=60.0, count=place.count,
                           limit=limits.max_queued)
        wait = caps.seconds_to_utc_midnight()
        return Refused(Refusal.daily_cap, f"you have used your {limits.max_per_day} jobs for "
                       f"today; the cap resets at midnight UTC, in {wait / 3600:.1f} h",
                       retry_after_s=wait, count=place.count, limit=limits.max_per_day)


def _texts(value: Any, field: str = "") -> Iterator[tuple[str, str]]:
    """Every text inside ``value`` (scene descriptions, titles, subtitles…), in order,
    with where it sits (``options.scenes.0.description``). Not recursive: a request
    nested a thousand deep must not take the stack with it."""
    stack: list[tuple[str, Any]] = [(field, value)]
    while stack:
        where, item = stack.pop()
        if isinstance(item, str):
            yield where, item
        elif isinstance(item, dict | list | tuple):
            pairs = item.items() if isinstance(item, dict) else enumerate(item)
            stack.extend(reversed([(f"{where}.{key}".lstrip("."), child)
                                   for key, child in pairs]))
