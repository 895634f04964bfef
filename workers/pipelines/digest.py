"""The digest: one page listing every job of a time window, for the morning after an
overnight batch. Failures come first, with their reasons.

It reads only the job directories (``spec.json``, ``result.json``, ``report.json``,
``log.jsonl``) and the record of requests refused before they became jobs
(``daemon.refusals``), never Redis, so it covers jobs Redis has long forgotten and works
with the daemon stopped. ``write`` puts ``digest-<until>.html`` and ``.json`` in the output
folder and refreshes ``digest.html`` and ``digest.json`` there as the latest ones. The
JSON's ``summary`` is a few lines of plain text, ready to post to a chat.
"""

from __future__ import annotations

import base64
import html
import io
import json
import os
import re
from dataclasses import asdict, dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from PIL import Image

from daemon import files, refusals
from daemon.config import Config, parse_duration
from daemon.jobs import JobError, JobOutcome, JobSpec, JobStatus
from workers.pipelines.report import BASE_CSS, REPORT_HTML, REPORT_JSON, data_uri
from workers.reports import human_duration

LATEST_HTML, LATEST_JSON = "digest.html", "digest.json"
THUMBNAIL_WIDTH = 160
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
# Failures first, then requests refused outright, what was stopped, what worked, and
# what has not finished yet.
ORDER = {"failed": 0, "refused": 1, "cancelled": 2, "done": 3, "unfinished": 4}
_RELATIVE = re.compile(r"^\s*\d+(\.\d+)?\s*(ms|s|m|h|d)\s*$")


@dataclass
class Entry:
    """One job, as the digest shows it."""

    id: str
    kind: str
    status: str  # done, failed, cancelled, unfinished (queued or running), or refused
    title: str
    source: str  # "folder inbox/fox.txt", "http default", …
    created_at: datetime
    finished_at: datetime | None
    error: str | None
    video_s: float | None  # the finished video's length
    run_s: float | None  # from the job's (last) start to its end
    device: str | None
    report: str | None  # relative link from the digest's folder
    log: str | None  # relative link to log.jsonl, if the job ever started
    thumbnail: str  # a data: URI, or ""

    @property
    def when(self) -> datetime:
        return self.finished_at or self.created_at


def parse_time(text: str, now: datetime) -> datetime:
    """``--since``/``--until``: an ISO date or date and time (local time unless it says
    otherwise), or a span back from ``now`` such as "12h", "1d", "30m"."""
    if _RELATIVE.match(text):
        return now - timedelta(seconds=parse_duration(text))
    try:
        moment = datetime.fromisoformat(text.strip())
    except ValueError:
        raise JobError(f"{text!r} is not a time: give an ISO date or time (2026-11-20, "
                       "2026-11-20T18:00) or a span back from now (12h, 1d, 30m)") from None
    return moment if moment.tzinfo else moment.astimezone()  # naive: local time


def collect(config: Config, since: datetime, until: datetime, out_dir: Path) -> list[Entry]:
    """Every job that finished (or, unfinished, was created) in ``[since, until)``, and
    every request refused then; failures first, newest first within each group."""
    jobs_dir = config.jobs_dir
    entries = [_refused(item) for item in refusals.read(config.state_dir, since, until)]
    for directory in sorted(jobs_dir.glob("*/")) if jobs_dir.is_dir() else []:
        entry = _entry(directory, out_dir)
        if entry is not None and since <= entry.when < until:
            entries.append(entry)
    entries.sort(key=lambda e: -e.when.timestamp())
    entries.sort(key=lambda e: ORDER[e.status])  # stable: newest first within a status
    return entries


def write(config: Config, since: datetime, until: datetime, out_dir: Path | None = None
          ) -> dict[str, Any]:
    """Write the digest of ``[since, until)``; return its JSON (with ``html`` and
    ``json``, the paths written)."""
    out_dir = out_dir or config.digest.out_dir or config.state_dir / "digests"
    entries = collect(config, since, until, out_dir)
    stamp = until.astimezone().strftime("%Y-%m-%dT%H%M")
    paths = {"html": out_dir / f"digest-{stamp}.html", "json": out_dir / f"digest-{stamp}.json"}
    data = {
        "since": since.isoformat(),
        "until": until.isoformat(),
        "counts": {status: sum(e.status == status for e in entries) for status in ORDER},
        "summary": summary(entries, since, until),
        "jobs": [{**asdict(e), "thumbnail": bool(e.thumbnail)} for e in entries],
        **{name: str(path) for name, path in paths.items()},
    }
    page = render_html(entries, since, until, data["summary"])
    files.write_text(paths["html"], page)
    files.write_json(paths["json"], data)
    # The latest digest under fixed names: what a chat bot or a bookmark picks up.
    files.write_text(out_dir / LATEST_HTML, page)
    files.write_json(out_dir / LATEST_JSON, data)
    return data


def write_for_window(config: Config) -> dict[str, Any]:
    """The scheduled digest: the ``[digest] window`` up to now."""
    now = datetime.now().astimezone()
    return write(config, now - timedelta(seconds=config.digest.window), now)


def summary(entries: list[Entry], since: datetime, until: datetime) -> str:
    """A few lines of plain text: counts, totals, and each failure's reason."""
    counts = {status: sum(e.status == status for e in entries) for status in ORDER}
    parts = [f"{n} {status}" for status, n in counts.items() if n]
    video = sum(e.video_s or 0 for e in entries)
    run = sum(e.run_s or 0 for e in entries)
    lines = [f"reelqueue, {_local(since)} – {_local(until)}: {len(entries)} jobs"
             + (f" ({', '.join(parts)})" if parts else "") + "."]
    if entries:
        lines.append(f"{human_duration(video)} of video made in {human_duration(run)} of run time.")
    lines += [f"✗ {e.title}: {e.error or e.status} "
              + (f"(job {e.id})" if e.id else f"(refused, {e.source})")
              for e in entries if e.status in ("failed", "refused", "cancelled")]
    return "\n".join(lines)


# --- one job -------------------------------------------------------------------------------


def _entry(directory: Path, out_dir: Path) -> Entry | None:
    try:
        spec = JobSpec.model_validate_json((directory / "spec.json").read_bytes())
        outcome = JobOutcome.read(directory)
        report = _json(directory / REPORT_JSON)
    except (OSError, ValueError):  # not a job directory, or one being written right now
        return None
    status = outcome.status.value if outcome else "unfinished"
    finished = datetime.fromisoformat(outcome.finished_at) if outcome else None
    source = spec.source
    where = source.filename or source.client or (str(source.chat_id) if source.chat_id
                                                 else "")
    title = ((report.get("storyboard") or {}).get("title") or source.filename
             or _first_line(spec.prompt) or f"{spec.kind} job")
    started = _last_start(directory / "log.jsonl")
    report_page = directory / REPORT_HTML
    return Entry(
        id=spec.id,
        kind=spec.kind,
        status=status,
        title=title,
        source=f"{source.channel} {where}".strip(),
        created_at=spec.created_at,
        finished_at=finished,
        error=outcome.error if outcome and outcome.status != JobStatus.done else None,
        video_s=(report.get("output") or {}).get("duration_s"),
        run_s=(finished - started).total_seconds() if finished and started else None,
        device=report.get("device"),
        report=_link(report_page, out_dir) if status == "done" and report_page.exists()
        else None,
        log=_link(directory / "log.jsonl", out_dir) if (directory / "log.jsonl").exists()
        else None,
        thumbnail=_thumbnail(directory, report, outcome),
    )


def _refused(item: dict[str, Any]) -> Entry:
    """A request refused before it became a job: no folder, no log, only the reason."""
    return Entry(id="", kind=item.get("kind") or "request", status="refused",
                 title=item["what"], source=f"{item['channel']} {item['submitted_by']}".strip(),
                 created_at=item["at"], finished_at=None, error=item["reason"], video_s=None,
                 run_s=None, device=None, report=None, log=None, thumbnail="")


def _json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}


def _first_line(text: str) -> str:
    line = text.strip().split("\n", 1)[0]
    return line if len(line) <= 60 else line[:59] + "…"


def _last_start(log: Path) -> datetime | None:
    """When the job's last attempt started, from its own log."""
    started = None
    try:
        for line in log.read_text(encoding="utf-8").splitlines():
            if '"job started"' in line:
                started = datetime.fromisoformat(json.loads(line)["ts"])
    except (OSError, ValueError, KeyError):
        return started
    return started


def _thumbnail(directory: Path, report: dict[str, Any], outcome: JobOutcome | None) -> str:
    """A small JPEG as a data: URI: the first scene's keyframe (kept even when a job
    failed later), or the job's image result."""
    scenes = (report.get("storyboard") or {}).get("scenes") or []
    candidates = [directory / scenes[0]["thumbnail"]] if scenes else []
    candidates += sorted(directory.glob("scenes/scene_*.jpg"))[:1]
    if outcome and outcome.primary and Path(outcome.primary).suffix.lower() in IMAGE_SUFFIXES:
        candidates.append(directory / outcome.primary)
    for path in (path for path in candidates if path.is_file()):
        # Keyframes are small JPEGs already; anything else is shrunk first.
        if path.suffix.lower() in (".jpg", ".jpeg") and path.stat().st_size < 64_000:
            return data_uri(path)
        return _small_jpeg(path)
    return ""


def _small_jpeg(path: Path) -> str:
    try:
        with Image.open(path) as image:
            image.thumbnail((THUMBNAIL_WIDTH, THUMBNAIL_WIDTH))
            buffer = io.BytesIO()
            image.convert("RGB").save(buffer, format="JPEG", quality=80)
    except OSError:
        return ""
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode()


def _link(path: Path, out_dir: Path) -> str:
    return Path(os.path.relpath(path, out_dir)).as_posix()


# --- the page ----------------------------------------------------------------------------


def render_html(entries: list[Entry], since: datetime, until: datetime, text: str) -> str:
    rows = "".join(_row(entry) for entry in entries) or (
        "<p class=note>No jobs in this window.</p>")
    headline, *rest = text.split("\n")
    totals = _e(rest[0]) if rest else ""
    return f"""<!doctype html>
<html lang=en>
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>reelqueue digest — {_e(_local(until))}</title>
<style>{BASE_CSS}{_CSS}</style>
</head>
<body>
<main>
<header>
<p class=eyebrow>reelqueue digest</p>
<h1>{_e(_local(since))} – {_e(_local(until))}</h1>
<p class=meta>{_e(headline)}<br>{totals}</p>
</header>
<div class=jobs>{rows}</div>
</main>
</body>
</html>
"""


def _row(entry: Entry) -> str:
    image = (f'<img src="{_e(entry.thumbnail)}" alt="">' if entry.thumbnail
             else "<div class=noimage></div>")
    title = _e(entry.title)
    if entry.report:
        title = f'<a href="{_e(entry.report)}">{title}</a>'
    facts = [f"{entry.kind}", entry.source, _local(entry.when)]
    if entry.video_s:
        facts.append(f"{entry.video_s:.1f} s of video")
    if entry.run_s is not None:
        on = f" on {entry.device}" if entry.device else ""
        facts.append(f"ran {human_duration(entry.run_s)}{on}")
    reason = f"<p class=reason>{_e(entry.error)}</p>" if entry.error else ""
    links = " · ".join(([f'<a href="{_e(entry.report)}">report</a>'] if entry.report else [])
                       + ([f'<a href="{_e(entry.log)}">log</a>'] if entry.log else []))
    job = f"<br><code>{_e(entry.id)}</code>" if entry.id else ""
    return (f"<article class='job {entry.status}'>{image}<div class=what>"
            f"<p class=title><span class='pill {entry.status}'>{entry.status}</span>{title}</p>"
            f"<p class=facts>{_e(' · '.join(facts))}</p>{reason}</div>"
            f"<p class=links>{links}{job}</p></article>")


_CSS = """
.jobs{display:flex;flex-direction:column;gap:10px}
.job{display:grid;grid-template-columns:160px 1fr auto;gap:16px;align-items:center;
background:var(--card);border-radius:12px;padding:10px;box-shadow:0 1px 3px #00000014;
border-left:4px solid #2bb673}
.job.failed,.job.refused{border-left-color:#e5484d}.job.cancelled{border-left-color:#f5a524}
.job.unfinished{border-left-color:#aeaeb2}
.job img,.job .noimage{width:160px;aspect-ratio:16/9;object-fit:cover;border-radius:8px;
background:#e5e5ea;display:block}
.what p{margin:0 0 4px}
.title{font-weight:600;font-size:16px}
.title a{color:inherit}
.facts{color:var(--muted);font-size:13px}
.reason{color:#b42318;background:#fef3f2;border-radius:6px;padding:6px 10px;font-size:14px}
.links{margin:0;text-align:right;font-size:13px;color:var(--muted)}
.links a{color:var(--accent)}
.pill{display:inline-block;font-size:11px;font-weight:700;text-transform:uppercase;
letter-spacing:.05em;border-radius:4px;padding:1px 6px;margin-right:8px;vertical-align:2px;
color:#fff;background:#2bb673}
.pill.failed,.pill.refused{background:#e5484d}.pill.cancelled{background:#f5a524}
.pill.unfinished{background:#aeaeb2}
@media (max-width:700px){.job{grid-template-columns:96px 1fr}.job img,.job .noimage{width:96px}
.links{grid-column:1/-1;text-align:left}}
"""


def _e(text: object) -> str:
    return html.escape(str(text), quote=True)


def _local(moment: datetime) -> str:
    return moment.astimezone().strftime("%Y-%m-%d %H:%M")
