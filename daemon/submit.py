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
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path, PurePath
from typing import Any

from redis.exceptions import RedisError

from daemon import caps, content, files, refusals
from daemon.config import Config
from daemon.jobs import JobError, JobSpec, Source, job_dir, new_job_id, read_spec, write_spec
from daemon.kinds import MAX_PROMPT_CHARS, KindRegistry
from daemon.logs import get_logger
from daemon.queue import QueueClient
from daemon.schedule import PREFIX, Priority

# Lone surrogates: JSON's "\ud800", undecodable bytes of a file name. Not text: no UTF-8
# file (the spec, the logs, a reply) can hold one.
_SURROGATE = re.compile("[\ud800-\udfff]")


log = get_logger(component="submit")


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
    in_progress = "in_progress"  # the same request is being submitted right now


# The refusals that are final (not "try again later"): the digest lists them.
FINAL = (Refusal.invalid, Refusal.blocked, Refusal.unavailable)
# A second submission of one id waits this long for the first to finish.
LOCK_WAIT_S = 30.0
# The holder renews it every third of this while it works (an upload can take minutes);
# the lock of a daemon killed mid-submission lapses within this.
LOCK_TTL_MS = 15_000
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""
_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
"""


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
        if problem := _name_problem(names + kept):
            return Refused(Refusal.invalid, problem, [{"field": "file", "reason": problem}])
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
        if request.job_id is None:
            return await self._place(request, job_id, options)
        # One submission of an id at a time: the same request sent twice at once (a
        # retried POST, an update fetched again) must not write one folder twice.
        async with self._only_submission_of(job_id) as alone:
            if not alone:
                return Refused(Refusal.in_progress, "the same request is being queued right "
                               "now; ask again in a moment to see its job")
            return await self._place(request, job_id, options)

    async def _place(self, request: Request, job_id: str, options: dict[str, Any]
                     ) -> Accepted | Refused:
        """Caps, the job folder and the enqueue, for a request that passed its checks."""
        existing = await asyncio.to_thread(self._known_spec, job_id)
        if existing is not None and not _same(existing, request, options):
            return Refused(Refusal.invalid, "a different request was already sent under "
                           "this id (an Idempotency-Key is for retrying one request)",
                           [{"field": "Idempotency-Key", "reason": "used for another request"}])
        limits = Limits(request.limits.max_queued or self.default_limits.max_queued,
                        request.limits.max_per_day or self.default_limits.max_per_day)
        place = await caps.reserve(self.queue.redis, job_id, request.submitted_by,
                                   limits.max_queued, limits.max_per_day, self.max_waiting)
        if not place.ok:
            return self._over_cap(place, limits)
        if existing is not None:
            # Seen before: queued already (a duplicate), or its first submission died
            # between writing the spec and queueing it, and this one finishes it.
            return await self._enqueue(existing, place, wrote=False)
        uploads = [*request.inputs, *([request.kept] if request.kept else [])]
        spec = JobSpec(id=job_id, kind=request.kind, prompt=request.prompt, options=options,
                       inputs=[upload.name for upload in uploads], source=request.source,
                       submitted_by=request.submitted_by, priority=request.priority)
        directory = job_dir(self.jobs_dir, job_id)
        try:
            for upload in uploads:
                await upload.put(directory / "inputs" / upload.name)
            await asyncio.to_thread(write_spec, self.jobs_dir, spec)
        except asyncio.CancelledError:
            # Stopped part way (the daemon stopping): nothing is awaited now. The folder
            # goes; a place taken frees itself as stale (daemon.caps).
            shutil.rmtree(directory, ignore_errors=True)
            raise
        except Exception as exc:
            await self._undo(spec, place, wrote=True)
            if isinstance(exc, JobError):  # an input its channel could not hand over
                return Refused(Refusal.invalid, str(exc), exc.problems)
            raise
        return await self._enqueue(spec, place, wrote=True)

    async def _enqueue(self, spec: JobSpec, place: caps.Reservation, wrote: bool) -> Accepted:
        try:
            queued = await self.queue.enqueue(spec)
        except asyncio.CancelledError:
            # Stopped part way, perhaps after arq took the job: its spec stays, and the
            # cancellation goes on (a stopping daemon must not wait on Redis here).
            raise
        except Exception as exc:
            log.warning("queueing a job failed part way", job_id=spec.id, error=repr(exc))
            with contextlib.suppress(RedisError, OSError):
                if await self.queue.is_waiting(spec.id):  # it went in before the failure
                    return Accepted(spec, None, duplicate=False)
                await self.queue.forget(spec)  # what enqueue wrote before it failed
            await self._undo(spec, place, wrote)
            raise
        with contextlib.suppress(RedisError, OSError):  # else it expires as stale
            await caps.settle(self.queue.redis, place)
        return Accepted(spec, queued.position, duplicate=not queued.accepted)

    async def _undo(self, spec: JobSpec, place: caps.Reservation, wrote: bool) -> None:
        """A submission that failed leaves nothing: its folder (if this one wrote it) and
        its place under the caps (if this one took it)."""
        if wrote:
            await asyncio.to_thread(shutil.rmtree, job_dir(self.jobs_dir, spec.id), True)
        if place.taken:
            # Best effort: with Redis gone, the place frees itself (daemon.caps).
            with contextlib.suppress(RedisError, OSError):
                await caps.give_back(self.queue.redis, place)

    @contextlib.asynccontextmanager
    async def _only_submission_of(self, job_id: str) -> AsyncIterator[bool]:
        """Hold the id while submitting it; False when another submission of it kept it
        for longer than ``LOCK_WAIT_S``."""
        key, token = f"{PREFIX}submitting:{job_id}", new_job_id()
        deadline = time.monotonic() + LOCK_WAIT_S
        while not await self.queue.redis.set(key, token, nx=True, px=LOCK_TTL_MS):
            if time.monotonic() > deadline:
                yield False
                return
            await asyncio.sleep(0.05)
        renewing = asyncio.create_task(self._renew(key, token))
        try:
            yield True
        finally:
            renewing.cancel()
            with contextlib.suppress(RedisError, OSError):
                await self.queue.redis.eval(_RELEASE, 1, key, token)

    async def _renew(self, key: str, token: str) -> None:
        while True:
            await asyncio.sleep(LOCK_TTL_MS / 3000)
            with contextlib.suppress(RedisError, OSError):
                await self.queue.redis.eval(_RENEW, 1, key, token, LOCK_TTL_MS)

    def _known_spec(self, job_id: str) -> JobSpec | None:
        try:
            return read_spec(self.jobs_dir, job_id)
        except FileNotFoundError:
            return None

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


def _name_problem(names: list[str]) -> str | None:
    """Input names are plain file names inside the job folder, each once."""
    for name in names:
        if name in ("", ".", "..") or "\0" in name or PurePath(name).name != name \
                or "\\" in name:
            return f"{name!r} is not a plain file name"
    if len(set(names)) < len(names):
        return "two input files have the same name"
    return None


def _same(spec: JobSpec, request: Request, options: dict[str, Any]) -> bool:
    """Whether ``request`` asks for what the job made under its id asked for."""
    return (spec.kind, spec.prompt, spec.options, spec.submitted_by) == \
        (request.kind, request.prompt, options, request.submitted_by)
