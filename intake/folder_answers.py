"""Answers in a drop folder: results delivered into ``done/``, refusals explained in
``failed/``.

Anybody who can drop a file can also replace ``done/`` or ``failed/`` (the inbox is
group-writable), so both are checked before every write: a symbolic link, or anything
else that is not a real folder, is never written through (``UnsafeFolder``, logged as
an error naming the path and the fix; the request stays in the inbox). Every name
written fits the file system: at most ``MAX_NAME`` bytes of UTF-8, so that the temp
name each atomic write goes through (``daemon.files.temp_name``) fits ``NAME_MAX``
too; a longer stem is shortened, with room left for the longest suffix and the
``-2``, ``-3``… counter.
"""

from __future__ import annotations

import json
import os
import stat
from datetime import UTC, datetime
from pathlib import Path

from daemon import files
from daemon.jobs import JobOutcome, JobSpec, JobStatus
from daemon.logs import get_logger

DONE, FAILED = "done", "failed"
NAME_MAX = 255  # bytes in one file name (ext4, xfs, btrfs, tmpfs…)
MAX_NAME = NAME_MAX - (len(os.fsencode(files.temp_name(Path("x")).name)) - 1)
MAX_SUFFIX = 32  # a longer "suffix" is part of the name, not a file type

log = get_logger(component="folder")


class UnsafeFolder(OSError):
    """An answer folder (``done/``, ``failed/``) is not a real folder: nothing is
    written through it."""

    def __init__(self, path: Path, what: str):
        self.path, self.what = path, what
        self.fix = (f"remove {path} (rm {path}) or put a real folder there; reelqueue "
                    f"makes it again, with the inbox's mode, on its next answer")
        super().__init__(f"{path} is {what}, not a folder: reelqueue writes nothing "
                         f"through it; {self.fix}")


def answer_folder(folder: Path) -> Path:
    """``folder`` (an inbox's ``done/`` or ``failed/``), checked with ``lstat`` to be a
    real folder, and made with its inbox's mode if missing. Raises ``UnsafeFolder``."""
    try:
        mode = os.lstat(folder).st_mode
    except FileNotFoundError:
        _make_folder(folder)
        mode = os.lstat(folder).st_mode
    if not stat.S_ISDIR(mode):
        error = UnsafeFolder(folder, files.file_type(mode))
        log.error("answer folder is not a folder; nothing written, the request stays in "
                  "the inbox", folder=str(folder), found=error.what, fix=error.fix)
        raise error
    return folder


def _into(dest: Path) -> Path:
    """``dest``, once its folder has been checked: called right before each write."""
    answer_folder(dest.parent)
    return dest


def _make_folder(folder: Path) -> None:
    with_mode = stat.S_IMODE(os.stat(folder.parent).st_mode)
    try:
        os.mkdir(folder)
    except FileExistsError:
        return  # made meanwhile (checked by the caller, like any other)
    # Set through a descriptor of the folder just made, never a link swapped in for it
    # (mkdir's mode is cut by the umask, and never sets the sticky bit).
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    try:
        os.fchmod(fd, with_mode)
    finally:
        os.close(fd)


def split_name(name: str) -> tuple[str, str]:
    """``("fox", ".txt")`` for ``fox.txt``; an overlong "suffix" stays in the stem."""
    suffix = Path(name).suffix
    if not suffix or len(os.fsencode(suffix)) > MAX_SUFFIX:
        return name, ""
    return name[: -len(suffix)], suffix


def _fit(text: str, room: int) -> str:
    """``text`` cut to at most ``room`` bytes (UTF-8, as the file system stores the name),
    never inside a character."""
    kept, used = [], 0
    for char in text:
        used += len(os.fsencode(char))
        if used > room:
            break
        kept.append(char)
    return "".join(kept)


def unique_stem(directory: Path, stem: str, suffixes: list[str]) -> str:
    """``stem``, or ``stem-2``, ``stem-3``… so that no ``<stem><suffix>`` exists yet,
    shortened where needed so that every ``<stem><suffix>`` is at most ``MAX_NAME``
    bytes."""
    room = MAX_NAME - max((len(os.fsencode(suffix)) for suffix in suffixes), default=0)
    n = 1
    while True:
        counter = f"-{n}" if n > 1 else ""
        candidate = _fit(stem, room - len(counter)) + counter
        if not any(os.path.lexists(directory / f"{candidate}{suffix}")
                   for suffix in suffixes):
            return candidate
        n += 1


# --- refusals -------------------------------------------------------------------------


def reject(path: Path, reason: str, job_id: str | None = None) -> Path:
    """Move a request to ``failed/`` with an ``.error.txt`` that explains why. A link or
    other special file is moved as itself; what it points to is never touched."""
    inbox = path.parent
    target = answer_folder(inbox / FAILED)
    stem, suffix = split_name(path.name)
    stem = unique_stem(target, stem, [suffix, ".error.txt"])
    error = target / f"{stem}.error.txt"
    files.write_text(_into(error), error_text(path.name, reason, job_id, inbox))
    if os.path.lexists(path):
        files.move_file(path, _into(target / f"{stem}{suffix}"))
    log.info("request rejected", file=path.name, reason=reason)
    return error


def error_text(filename: str, reason: str, job_id: str | None, inbox: Path) -> str:
    when = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    filename = os.fsencode(filename).decode("utf-8", "replace")  # a name not in UTF-8
    job = f" (job {job_id})" if job_id else ""
    return (
        f'reelqueue could not make "{filename}"{job}.\n\n'
        f"Reason: {reason}.\n\n"
        f"Your request file was moved here unchanged. Once the reason above is dealt "
        f"with, drop it into {inbox} again.\n"
        f"({when})\n"
    )


# --- deliveries -----------------------------------------------------------------------


def _record_plan(path: Path, plan: dict[str, object]) -> None:
    """Keep the delivery plan in the job folder, so a redo uses the same names. On a
    full state disk that fails: deliver anyway (to the inbox's own disk), since an
    answer in failed/ matters more than perfect names on a redo."""
    try:
        files.write_json(path, plan)
    except OSError as exc:
        log.warning("could not record the delivery plan; delivering anyway", error=str(exc))


def delivery_finished(directory: Path) -> bool | None:
    """None: no delivery begun for the job in ``directory``; False: under way; True: done."""
    plan = directory / "delivery.json"
    if not plan.exists():
        return None
    return bool(json.loads(plan.read_text(encoding="utf-8")).get("delivered"))


def _plan(spec: JobSpec, outcome: JobOutcome, inbox: Path) -> dict[str, object]:
    """The names a job's answer gets: free ones, that fit, sharing one stem."""
    request = spec.source.filename or ""
    ok = outcome.status == JobStatus.done
    target = answer_folder(inbox / (DONE if ok else FAILED))
    stem, request_suffix = split_name(request)
    # "result.caption.txt" → "<stem>.caption.txt"; never the request's own name.
    primary_suffix = "".join(Path(outcome.primary).suffixes) if ok and outcome.primary \
        else ""
    if primary_suffix.lower() == request_suffix.lower():
        primary_suffix = f".result{primary_suffix}"
    extras = {f"extra:{e}": f".{Path(e).name}" for e in outcome.extras} if ok else {}
    suffixes = [request_suffix] + (
        [primary_suffix, ".report.json", ".report.html", *extras.values()] if ok
        else [".error.txt"]
    )
    stem = unique_stem(target, stem, suffixes)
    names = {"request": f"{stem}{request_suffix}"}
    if ok:
        names |= {"primary": f"{stem}{primary_suffix}", "report.json": f"{stem}.report.json",
                  "report.html": f"{stem}.report.html"}
        names |= {key: f"{stem}{suffix}" for key, suffix in extras.items()}
    else:
        names |= {"error": f"{stem}.error.txt"}
    return {"target": str(target), "files": {k: str(target / v) for k, v in names.items()},
            "delivered": False}


def deliver(spec: JobSpec, outcome: JobOutcome, directory: Path) -> dict[str, str]:
    """Put a finished job's results (or its failure) beside its request.

    Idempotent: the chosen names are recorded in ``delivery.json`` before anything is
    written, so a delivery interrupted by a crash finishes under the same names. The
    request leaves the inbox last, and only if it is still the file the job was made
    from: one rewritten since stays in the inbox (a new request of its own), and the
    job's kept copy answers in its place.
    """
    inbox = Path(spec.source.folder or "")
    request = inbox / (spec.source.filename or "")
    plan_path = directory / "delivery.json"
    if plan_path.exists():
        plan = json.loads(plan_path.read_text(encoding="utf-8"))
        if plan.get("delivered"):
            return plan["files"]
    else:
        plan = _plan(spec, outcome, inbox)
        _record_plan(plan_path, plan)

    out = {k: Path(v) for k, v in plan["files"].items()}
    if outcome.status == JobStatus.done:
        files.copy_file(directory / outcome.primary, _into(out["primary"]))
        for key, dest in out.items():
            if key.startswith("extra:"):
                files.copy_file(directory / key.removeprefix("extra:"), _into(dest))
        files.copy_file(directory / "report.json", _into(out["report.json"]))
        # As the worker wrote it: named <stem>.report.html, its page plays <stem>.mp4.
        files.copy_file(directory / "report.html", _into(out["report.html"]))
    else:
        reason = outcome.error or outcome.status.value
        files.write_text(_into(out["error"]), error_text(request.name, reason, spec.id, inbox))
    _answer_with_request(request, directory / "inputs" / request.name, out["request"])
    plan["delivered"] = True
    _record_plan(plan_path, plan)
    log.info("results delivered", job_id=spec.id, status=outcome.status,
             files=[p.name for p in out.values()])
    return plan["files"]


def _answer_with_request(request: Path, kept: Path, dest: Path) -> None:
    """Move the request to ``dest`` if it is still the file its job was made from;
    otherwise (changed, replaced, removed) put the job's kept copy there."""
    taken = _as_taken(request, kept)
    if taken is not None:
        try:
            files.move_file(request, _into(dest), expect=taken)
            return
        except files.Changed:
            pass  # rewritten between the comparison and the move
    if os.path.lexists(request):
        log.info("the request changed after it was taken; it stays in the inbox as a "
                 "new request, and the job's own copy answers", file=request.name)
    if not os.path.lexists(dest):  # a redo after a crash may have put it there already
        files.copy_file(kept, _into(dest))


def _as_taken(request: Path, kept: Path) -> os.stat_result | None:
    """The request's ``fstat`` if it is a regular file with the content its job kept
    (``<job>/inputs/<name>``); None if it is gone, changed or anything else now."""
    try:
        with files.open_regular(request) as handle:
            found = os.fstat(handle.fileno())
            if not kept.exists():
                return found  # nothing to compare with: a job from before copies were kept
            with open(kept, "rb") as copy:
                if os.fstat(copy.fileno()).st_size != found.st_size:
                    return None
                while chunk := handle.read(files.COPY_CHUNK):
                    if copy.read(len(chunk)) != chunk:
                        return None
            return found
    except (FileNotFoundError, files.NotRegularFile):
        return None
