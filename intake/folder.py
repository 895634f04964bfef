"""The drop folder: a watched inbox where a file becomes a job, and where results
come back (``done/``) or failures are explained (``failed/``).

A file is taken only when it is complete: after a close-after-write or a moved-in
event, its size and mtime must hold still briefly; with no such event (a network
share on the polling observer, a file found by the start-up scan) they must hold
still for the folder's ``settle`` time. Hidden, temp and partial names are ignored.
The request file stays in the inbox until its job is delivered, so a lost queue is
recovered by the next scan; job ids derive from folder, name and content, so seeing
the same file twice queues it once.

Only regular files are requests. Whoever can drop a file can also drop a symbolic link,
a FIFO or a socket: each is refused into ``failed/`` as itself, never followed or
opened for reading (``daemon.files.open_regular``), and a file is read (size, owner,
content) through the one descriptor it was opened with. A name too long to be kept
and answered under is refused too. Answers are written by ``intake.folder_answers``.
"""

from __future__ import annotations

import asyncio
import contextlib
import fnmatch
import hashlib
import os
import shutil
import stat
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import Field, field_validator
from redis.exceptions import RedisError
from watchdog.events import (
    DirCreatedEvent,
    FileClosedEvent,
    FileCreatedEvent,
    FileDeletedEvent,
    FileModifiedEvent,
    FileMovedEvent,
    FileSystemEvent,
    FileSystemEventHandler,
)
from watchdog.observers import Observer
from watchdog.observers.polling import PollingObserver

from daemon import files, refusals
from daemon.config import Config, Duration, Section
from daemon.jobs import (
    Channel,
    JobError,
    JobOutcome,
    JobSpec,
    Source,
    derive_job_id,
    job_dir,
)
from daemon.logs import get_logger
from daemon.schedule import Priority
from daemon.submit import Refusal, Refused, Request, Submitter, Upload
from intake.folder_answers import (
    DONE,
    FAILED,
    MAX_NAME,
    UnsafeFolder,
    answer_folder,
    deliver,
    delivery_finished,
    reject,
)
from intake.jobfile import parse_request

IGNORED_PATTERNS = (".*", "*~", "*.tmp", "*.part", "*.swp", "*.crdownload")
# After close-write or a rename into the folder the writer is done: the file only has to
# hold still for one more look.
CLOSED_SETTLE_S = 0.05
UNCLOSED_GRACE = 5  # a written file never seen closed is taken after settle × this
RESCAN_S = 30.0  # a safety net for missed events (inotify queue overflow, odd shares)
RESTAT_S = 0.25  # how often a file that is still settling is looked at again
# A full queue or a submitter's cap delays a dropped file; it never fails it.
WAIT_IN_INBOX = (Refusal.queue_full, Refusal.queued_cap, Refusal.daily_cap,
                 Refusal.in_progress)
RETRY_S = 2.0  # a file that could not be queued (Redis away) is offered again after this

log = get_logger(component="folder")


class FolderIntakeConfig(Section):
    """One ``[[intake.folder]]`` table: a watched inbox."""
    path: Path
    kind: str = "video"
    poll: bool = False
    poll_interval: Duration = 1.0
    settle: Duration = 2.0
    max_file_mb: float = Field(default=1.0, gt=0)
    priority: Priority = "batch"

    @field_validator("priority", mode="before")
    @classmethod
    def _priority_number(cls, value: Any) -> Any:
        if isinstance(value, int) and not isinstance(value, bool):
            raise ValueError('is now a queue class: "batch" (the default for folders) or '
                             '"interactive"; see [queue] interactive_lead')
        return value

    options: dict[str, Any] = Field(default_factory=dict)

    def resolve_paths(self, resolve: Callable[[Path], Path]) -> None:
        self.path = resolve(self.path)


# The channel's tables under [intake]: one inbox by default.
SETTINGS = {"folder": (list[FolderIntakeConfig],
                       Field(default_factory=lambda: [FolderIntakeConfig(path=Path("inbox"))]))}


def is_ignored(name: str) -> bool:
    return any(fnmatch.fnmatch(name, pattern) for pattern in IGNORED_PATTERNS)


@dataclass
class _Pending:
    signature: tuple[int, int]
    stable_since: float
    closed: bool | None  # True: closed or moved in; False: being written; None: unknown


class _EventForwarder(FileSystemEventHandler):
    """Runs in watchdog's thread; hands events to the intake's event loop."""

    def __init__(self, intake: FolderIntake, loop: asyncio.AbstractEventLoop):
        self.intake = intake
        self.loop = loop

    def on_any_event(self, event: FileSystemEvent) -> None:
        if isinstance(event, DirCreatedEvent) or event.is_directory:
            return
        self.loop.call_soon_threadsafe(self.intake.on_event, event)


class FolderIntake:
    def __init__(self, folder: FolderIntakeConfig, config: Config, submitter: Submitter):
        self.folder = folder
        self.path = folder.path
        self.config = config
        self.submitter = submitter
        self.pending: dict[Path, _Pending] = {}
        self.taken: dict[Path, tuple[int, int]] = {}
        self.held: set[Path] = set()  # refusals waiting for a real failed/: retried by scans
        self._observer: Observer | PollingObserver | None = None
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._last_scan = 0.0

    # --- lifecycle ---------------------------------------------------------------------

    async def start(self) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        for sub in (DONE, FAILED):
            # Made with the inbox's mode. One that is not a real folder stops the start
            # (the daemon says why and tries again); one replaced later is checked
            # before every answer, which then waits until it is a folder again.
            answer_folder(self.path / sub)
        loop = asyncio.get_running_loop()
        if self.folder.poll:
            self._observer = PollingObserver(timeout=self.folder.poll_interval)
        else:
            self._observer = Observer()
        self._observer.schedule(_EventForwarder(self, loop), str(self.path), recursive=False)
        self._observer.start()
        self.scan()
        self._task = asyncio.create_task(self._run())
        log.info("watching folder", folder=str(self.path), kind=self.folder.kind,
                 poll=self.folder.poll)

    async def stop(self) -> None:
        if self._observer:
            self._observer.stop()
            await asyncio.to_thread(self._observer.join, 5)
        if self._task:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    # --- noticing files -------------------------------------------------------------------

    def scan(self) -> None:
        """Queue every candidate file in the inbox for a (settled) look."""
        self._last_scan = time.monotonic()
        for path in self.held:
            self.taken.pop(path, None)
        self.held.clear()
        try:
            entries = list(os.scandir(self.path))
        except FileNotFoundError:
            return
        for entry in entries:
            # Links and other special files too, to be refused; folders are not requests.
            if not entry.is_dir(follow_symlinks=False):
                self._notice(Path(entry.path), closed=None)

    def on_event(self, event: FileSystemEvent) -> None:
        if isinstance(event, FileMovedEvent):
            self._forget(Path(os.fsdecode(event.src_path)))
            self._notice(Path(os.fsdecode(event.dest_path)), closed=True)
        elif isinstance(event, FileDeletedEvent):
            self._forget(Path(os.fsdecode(event.src_path)))
        elif isinstance(event, FileClosedEvent):
            self._notice(Path(os.fsdecode(event.src_path)), closed=True)
        elif isinstance(event, FileCreatedEvent | FileModifiedEvent):
            # The polling observer never reports a close: its files settle by time alone.
            self._notice(Path(os.fsdecode(event.src_path)),
                         closed=None if self.folder.poll else False)

    def _forget(self, path: Path) -> None:
        self.pending.pop(path, None)
        self.taken.pop(path, None)

    def _notice(self, path: Path, closed: bool | None) -> None:
        if path.parent != self.path or path.name in (DONE, FAILED) or is_ignored(path.name):
            return  # the answer folders are never requests, even when not folders at all
        entry = self.pending.get(path)
        if entry is None:
            try:
                found = os.lstat(path)
            except FileNotFoundError:
                return
            signature = (found.st_size, found.st_mtime_ns)
            if self.taken.get(path) == signature:
                return  # an echo of a file we already took, unchanged
            if not stat.S_ISREG(found.st_mode):
                closed = True  # a link, FIFO…: nothing is being written, refuse it now
            self.pending[path] = _Pending(signature, time.monotonic(), closed)
        elif closed is not None:
            entry.closed = closed
            entry.stable_since = time.monotonic()
        self._wake.set()

    def _settle_time(self, entry: _Pending) -> float:
        if entry.closed is True:
            return CLOSED_SETTLE_S
        if entry.closed is False:
            return self.folder.settle * UNCLOSED_GRACE
        return self.folder.settle

    def _ready(self, path: Path, entry: _Pending, now: float) -> bool | None:
        """True: take it; False: wait; None: it is gone."""
        try:
            found = os.lstat(path)
        except FileNotFoundError:
            return None
        signature = (found.st_size, found.st_mtime_ns)
        if signature != entry.signature:
            entry.signature, entry.stable_since = signature, now
            return False
        return now - entry.stable_since >= self._settle_time(entry)

    def _next_look(self, now: float) -> float:
        """Seconds until a pending file may be ready (or a rescan is due)."""
        wait = RESCAN_S - (now - self._last_scan)
        for entry in self.pending.values():
            due = entry.stable_since + self._settle_time(entry) - now
            wait = min(wait, due if entry.closed else min(due, RESTAT_S))
        return max(0.0, wait)

    async def _run(self) -> None:
        while True:
            now = time.monotonic()
            if now - self._last_scan > RESCAN_S:
                self.scan()
            for path, entry in list(self.pending.items()):
                ready = self._ready(path, entry, now)
                if ready is None:
                    self.pending.pop(path, None)
                elif ready:
                    self.pending.pop(path, None)
                    self.taken[path] = entry.signature
                    try:
                        await self.take(path)
                    except RedisError as exc:
                        # Redis restarting: the file stays in the inbox, and a rescan soon
                        # offers it again.
                        self.taken.pop(path, None)
                        self._last_scan = min(self._last_scan, now - RESCAN_S + RETRY_S)
                        log.warning("could not take file yet; trying again shortly",
                                    file=str(path), error=str(exc), retry_in_s=RETRY_S)
                    except Exception:
                        # Never let one file stop the intake; it is retried on the next scan.
                        self.taken.pop(path, None)
                        log.exception("could not take file", file=str(path))
            # Sleep until the next file may be ready, or a watcher event comes in.
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self._next_look(time.monotonic()))

    # --- taking a file -------------------------------------------------------------------

    async def take(self, path: Path) -> str | None:
        """Turn a settled file into a queued job (or a rejection). Returns the job id."""
        # A media file is copied here as it is hashed, and handed over from here.
        staging = self.config.state_dir / "uploads" / f"folder-{uuid.uuid4().hex}"
        try:
            return await self._take(path, staging)
        finally:
            await asyncio.to_thread(shutil.rmtree, staging, True)

    async def _take(self, path: Path, staging: Path) -> str | None:
        try:
            request = await asyncio.to_thread(self._request, path, staging)
        except FileNotFoundError:
            log.info("file vanished before it was taken", file=path.name)
            return None
        except JobError as exc:
            await self._refuse(path, str(exc), record=True)
            return None
        if request is None:
            return None
        answer = await self.submitter.submit(request)
        if isinstance(answer, Refused):
            if answer.why in WAIT_IN_INBOX:
                # Backpressure: the file waits in the inbox; the next scan offers it again.
                self.taken.pop(path, None)
                log.warning("not queued yet; the file waits in the inbox", file=path.name,
                            reason=answer.message)
            else:
                await self._refuse(path, answer.message)
            return None
        log.info("job already known" if answer.duplicate else "job queued",
                 job_id=answer.spec.id, file=path.name, position=answer.position)
        return answer.spec.id

    async def _refuse(self, path: Path, reason: str, record: bool = False) -> None:
        """Answer in failed/; ``record``: for the digest too, when the refusal came before
        submission (which records its own)."""
        try:
            await asyncio.to_thread(reject, path, reason)
        except UnsafeFolder:
            # Logged with the fix; the file stays in the inbox, offered again at a scan.
            self.held.add(path)
            return
        if record:
            with contextlib.suppress(OSError):
                await asyncio.to_thread(refusals.record, self.config.state_dir,
                                        channel=Channel.folder, submitted_by="",
                                        what=f"{self.path.name}/{path.name}", reason=reason)

    def _request(self, path: Path, staging: Path) -> Request | None:
        """The submission a settled file asks for; None while an earlier job of the same
        file is being delivered. Everything is read through the one descriptor opened."""
        try:
            handle = files.open_regular(path)
        except files.NotRegularFile as exc:
            moved = ("the link itself was moved here; what it points to was not read"
                     if exc.what == files.file_type(stat.S_IFLNK) else "it was not read")
            raise JobError(f"it is {exc.what}, and a drop folder takes regular files only "
                           f"({moved})") from None
        with handle:
            found = os.fstat(handle.fileno())
            size = len(os.fsencode(path.name))
            if size > MAX_NAME:
                raise JobError(f"the file name is {size} bytes long (in UTF-8); this folder "
                               f"takes names of up to {MAX_NAME} bytes, so that the job and "
                               f"its answers can be named after it")
            limit = int(self.folder.max_file_mb * 1024 * 1024)
            self._check_size(found.st_size, limit)
            kind, prompt, options = self.folder.kind, "", dict(self.folder.options)
            if path.suffix.lower() in self.submitter.kinds.inputs(kind):
                # A media file is the job's input itself: hashed as it is copied, by
                # streaming, so a large video is never held in memory and the job gets
                # exactly the bytes its id was derived from.
                digest, staged = hashlib.sha256(), staging / path.name
                staging.mkdir(parents=True)
                with open(staged, "xb") as out:
                    while chunk := handle.read(files.COPY_CHUNK):
                        digest.update(chunk)
                        out.write(chunk)
                        self._check_size(out.tell(), limit)
                inputs, kept = (Upload.of_file(path.name, staged, move=True),), None
            else:
                data = handle.read(limit + 1)
                self._check_size(len(data), limit)
                asked = parse_request(path.name, data, kind, options)
                kind, prompt, options = asked.kind, asked.prompt, asked.options
                digest = hashlib.sha256(data)
                inputs, kept = (), Upload.of_bytes(path.name, data)
        job_id = folder_job_id(self.config.jobs_dir, self.path, path.name, digest.hexdigest())
        if job_id is None:
            return None
        return Request(
            kind=kind, prompt=prompt, options=options,
            source=Source(channel=Channel.folder, folder=str(self.path), filename=path.name),
            submitted_by=_owner_name(found.st_uid), priority=self.folder.priority,
            inputs=inputs, kept=kept, job_id=job_id,
        )

    def _check_size(self, size: int, limit: int) -> None:
        if size > limit:
            raise JobError(
                f"the file is {size / 1024 / 1024:.1f} MB; this folder takes files up to "
                f"{self.folder.max_file_mb:g} MB ([[intake.folder]] max_file_mb)"
            )


class FolderChannel:
    """Every ``[[intake.folder]]`` watched, and results delivered beside their requests."""

    name = Channel.folder

    def __init__(self, config: Config, submitter: Submitter):
        self.watchers = [FolderIntake(folder, config, submitter)
                         for folder in config.intake.folder]

    async def start(self) -> None:
        started = []
        try:
            for watcher in self.watchers:
                await watcher.start()
                started.append(watcher)
        except BaseException:  # all or none: the daemon's next try starts them all
            for watcher in started:
                await watcher.stop()
            raise

    async def stop(self) -> None:
        for watcher in self.watchers:
            await watcher.stop()

    @staticmethod
    async def deliver(spec: JobSpec, outcome: JobOutcome, directory: Path) -> None:
        await asyncio.to_thread(deliver, spec, outcome, directory)


def folder_job_id(jobs_root: Path, folder: Path, name: str, content_sha256: str) -> str | None:
    """The job id for file ``name`` with that content hash in watch folder ``folder``.

    Deterministic, so the same file seen twice is one job. A job already delivered
    means this is a new drop of the same file: it gets the next generation's id. None
    while that file's job is being delivered (it is on its way out of the inbox).
    """
    generation = 1
    while True:
        parts = [str(folder), name, content_sha256] + (
            [str(generation)] if generation > 1 else [])
        job_id = derive_job_id(*parts)
        delivered = delivery_finished(job_dir(jobs_root, job_id))
        if delivered is None:
            return job_id  # new, or queued / running: enqueueing again is a no-op
        if delivered is False:
            return None
        generation += 1


def _owner_name(uid: int) -> str:
    try:
        import pwd

        return pwd.getpwuid(uid).pw_name
    except (KeyError, ImportError, OSError):
        return ""
