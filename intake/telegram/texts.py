"""What the chat bot says. Every text is Telegram HTML: whatever comes from a user, a
job or the server is escaped here, so callers pass plain values.

Short sentences that tell the user what happened and what they can do next.
"""

from __future__ import annotations

import html
import time
from collections.abc import Iterable
from typing import Any

from daemon.jobs import JobStatus

STAGES = {"starting": "starting", "plan": "planning", "render": "rendering",
          "encode": "encoding", "queued": "queued"}
BAR_CELLS = 10
# Characters of a scene shown in a storyboard message: eight of them stay well inside
# Telegram's 4,096 characters per message.
MAX_SCENE_TEXT = 300


def _e(value: object) -> str:
    return html.escape(str(value), quote=False)


def job(job_id: str) -> str:
    # <code>: one tap copies the id, for /status and /cancel.
    return f"<code>{_e(job_id)}</code>"


def about(seconds: float) -> str:
    """A human duration, coarse enough not to change every second."""
    if seconds < 60:
        return f"{max(5, round(seconds / 5) * 5)} s"
    if seconds < 3600:
        return f"{round(seconds / 60)} min"
    hours, minutes = divmod(round(seconds / 60), 60)
    return f"{hours} h {minutes} min" if minutes else f"{hours} h"


def size(size_bytes: float) -> str:
    if size_bytes < 1024 * 1024:
        return f"{size_bytes / 1024:.0f} kB"
    return f"{size_bytes / 1024 / 1024:.1f} MB"


def bar(percent: float) -> str:
    filled = round(BAR_CELLS * max(0.0, min(100.0, percent)) / 100)
    return "▰" * filled + "▱" * (BAR_CELLS - filled)


# --- help and access --------------------------------------------------------------------


def help_text(kind_commands: dict[str, tuple[str, tuple[str, ...]]], bot_username: str,
              max_prompt_chars: int, max_queued: int, max_per_day: int) -> str:
    """``kind_commands``: command → (job kind, file suffixes that kind takes)."""
    lines = ["I turn text into videos on our own GPU. Commands:"]
    for command, (kind, inputs) in kind_commands.items():
        if inputs:
            lines.append(f"/{command} – a {_e(kind)} job: send a {_e(', '.join(inputs))} file "
                         f"with /{command} as its caption")
        else:
            lines.append(f"/{command} &lt;prompt&gt; – make a {_e(kind)}")
    lines += [
        "In a private chat, any text without a command is a video prompt.",
        "/storyboard &lt;prompt&gt; – see the scenes in seconds; reply <b>render</b> to make "
        "the video",
        "/status [id] – how a job is doing (your latest one without an id)",
        "/queue – your jobs and the queue",
        "/cancel &lt;id&gt; – cancel one of your jobs",
        "/gpu – the GPU and what it is running",
        "",
        f"Limits: prompts up to {max_prompt_chars:,} characters"
        + (f"; {max_queued} jobs queued at once" if max_queued else "")
        + (f"; {max_per_day} jobs a day" if max_per_day else "") + ".",
        f"In a group, address me: /video@{_e(bot_username)} …, or reply to one of my messages.",
    ]
    return "\n".join(lines)


def refusal(user_id: int, chat_id: int, private: bool) -> str:
    where = "" if private else f" and this group's id {_e(chat_id)}"
    return ("Sorry, this bot is private: it serves only the people and groups its "
            "administrators have added. If you should have access, send them your user id "
            f"{_e(user_id)}{where}.")


BUTTON_REFUSAL = "Sorry, this bot is private: ask its administrators to add you."


def unknown_command(command: str) -> str:
    return f"I don't know /{_e(command)}. /help lists what I can do."


def usage(command: str, takes_files: bool) -> str:
    if takes_files:
        return f"Send a file with /{_e(command)} as its caption."
    return f"Tell me what to make, e.g. /{_e(command)} a red fox runs through the snow at dusk"


def caption_needed() -> str:
    return "What should I do with this file? Send it again with a command as its caption; " \
        "/help lists them."


# --- submitting -------------------------------------------------------------------------


def not_queued(reason: str) -> str:
    return f"⚠️ Not queued: {_e(reason)}"


def attachment_too_large(size_bytes: int, limit_bytes: int) -> str:
    return f"the file is {size(size_bytes)}; this bot takes files up to {size(limit_bytes)}."


def queued_cap(active: int, cap: int) -> str:
    return f"you already have {active} jobs queued or running (the limit is {cap}). " \
        "One more can go in as soon as one finishes; /queue lists them, /cancel frees a place."


def daily_cap(cap: int, resets_in_s: float) -> str:
    return f"you have used all {cap} jobs for today. The count resets at 00:00 UTC, " \
        f"in {about(resets_in_s)}."


def already_queued(job_id: str) -> str:
    return f"That request is already job {job(job_id)}: /status {_e(job_id)}"


# --- progress ---------------------------------------------------------------------------


def progress(job_id: str, state: dict[str, Any], now: float | None = None) -> str:
    """The live progress message: stage, scene, percent and an ETA."""
    status = state.get("status")
    if status == JobStatus.queued:
        position = state.get("position")
        where = f": position {position} in the queue" if position else ""
        note = state.get("message") or ""
        return (f"⏳ Job {job(job_id)} is queued{where}.\n"
                + (f"{_e(note)}\n" if note else "")
                + "I'll keep this message up to date.")
    if status != JobStatus.running:
        return final(job_id, str(status), state.get("error") or None)
    stage = STAGES.get(str(state.get("stage")), str(state.get("stage") or "running"))
    detail = f", {_e(state['message'])}" if state.get("message") else ""
    percent = float(state.get("percent") or 0)
    line = f"{bar(percent)} {percent:.0f}%"
    eta = remaining_s(state, now)
    if eta is not None:
        line += f" · about {about(eta)} left"
    return f"🎬 Job {job(job_id)}: {_e(stage)}{detail}\n{line}"


def remaining_s(state: dict[str, Any], now: float | None = None) -> float | None:
    """Time left, from how long the job has run and how far it got."""
    percent = float(state.get("percent") or 0)
    started = state.get("started_at")
    if not started or percent < 5 or percent >= 100:  # too early to tell, or done
        return None
    elapsed = (now or time.time()) - float(started)
    return max(0.0, elapsed * (100 - percent) / percent)


def final(job_id: str, status: str, error: str | None) -> str:
    """How a finished job ended: the last word in a progress message that did not turn
    into the result, and /status."""
    if status == JobStatus.done:
        return f"✅ Job {job(job_id)} is done."
    if status == JobStatus.cancelled:
        return f"🚫 Job {job(job_id)} was cancelled."
    return f"❌ Job {job(job_id)} failed: {_e(error or 'no reason was given')}"


# --- results ----------------------------------------------------------------------------


def caption(job_id: str, report: dict[str, Any], duration_s: float | None = None,
            note: str = "") -> str:
    board = report.get("storyboard") or {}
    facts = [f"{duration_s:.1f} s"] if duration_s is not None else []
    if board.get("scenes"):
        count = len(board["scenes"])
        facts.append(f"{count} scene{'s' if count != 1 else ''}")
    render_s = (report.get("timings") or {}).get("total")
    if render_s:
        facts.append(f"rendered in {render_s:.1f} s")
    facts.append(f"job {job(job_id)}")
    title = f"<b>{_e(board['title'])}</b>\n" if board.get("title") else ""
    return title + " · ".join(facts) + (f"\n{_e(note)}" if note else "")


def reencoded(size_bytes: int, limit_bytes: int, original_bytes: int) -> str:
    return (f"Re-encoded to {size(size_bytes)} to fit this chat's {size(limit_bytes)} upload "
            f"limit (the original is {size(original_bytes)}).")


def link_instead(job_id: str, report: dict[str, Any], url: str, size_bytes: int,
                 limit_bytes: int, valid_s: float) -> str:
    title = (report.get("storyboard") or {}).get("title") or f"Job {job_id}"
    return (f"🎬 <b>{_e(title)}</b>\nThe result is {size(size_bytes)}, over this chat's "
            f"{size(limit_bytes)} upload limit, so here is a link instead (valid "
            f"{about(valid_s)}):\n{_e(url)}")


def not_sent(job_id: str, size_bytes: int, limit_bytes: int, reason: str) -> str:
    return (f"⚠️ Job {job(job_id)} is done, but its result ({size(size_bytes)}) is over "
            f"this chat's {size(limit_bytes)} upload limit and could not be made to fit "
            f"({_e(reason)}). Ask an administrator for the file, or to set public_base_url "
            "so that large results come as links.")


def done_notice(job_id: str) -> str:
    """Sent after the result, as a reply to it: the progress message turned into the
    result by an edit, which notifies nobody."""
    return f"✅ Job {job(job_id)} is done: see above."


def report_notice(job_id: str) -> str:
    """The report's caption: it is the notice when there is a report."""
    return done_notice(job_id) + "\nThe report: storyboard, timings and parameters."


# --- looking around ---------------------------------------------------------------------


def status(state: dict[str, Any], now: float | None = None) -> str:
    job_id = state["id"]
    text = progress(job_id, state, now)
    prompt = state.get("prompt") or ""
    if prompt:
        text += f"\n“{_e(prompt[:120])}{'…' if len(prompt) > 120 else ''}”"
    return text


def no_jobs_yet() -> str:
    return "You have no jobs yet. Send /video with a prompt to make one."


def no_job(job_id: str) -> str:
    return f"There is no job {_e(job_id)}. /queue lists yours."


def not_yours(job_id: str) -> str:
    return f"Job {job(job_id)} belongs to someone else."


def cancel_usage(active: Iterable[dict[str, Any]]) -> str:
    ids = [job(state["id"]) for state in active]
    listed = f" Yours: {', '.join(ids)}" if ids else " You have nothing queued or running."
    return "Which one? /cancel &lt;id&gt;." + listed


def cancelled(job_id: str, outcome: str, status_now: str = "") -> str:
    return {
        "cancelled": f"🚫 Cancelled job {job(job_id)} before it started.",
        "cancelling": f"Stopping job {job(job_id)} at its next step…",
        "finished": f"Job {job(job_id)} has already finished ({_e(status_now)}).",
    }.get(outcome, f"Job {job(job_id)} is no longer in the queue.")


def queue_overview(active: list[dict[str, Any]], waiting: int, running: int,
                   now: float | None = None) -> str:
    lines = ["Your jobs:"] if active else ["You have no jobs queued or running."]
    for state in active:
        if state["status"] == JobStatus.running:
            stage = STAGES.get(str(state.get("stage")), str(state.get("stage") or ""))
            lines.append(f"• {job(state['id'])} {_e(stage)}, {state['percent']:.0f}%")
        else:
            position = state.get("position")
            lines.append(f"• {job(state['id'])} queued"
                         + (f", position {position}" if position else ""))
    lines.append(f"In the queue: {waiting} waiting, {running} running.")
    return "\n".join(lines)


def gpu(workers: list[dict[str, Any]], running: dict[str, dict[str, Any] | None]) -> str:
    if not workers:
        return "No GPU worker is running: jobs wait in the queue until one starts."
    blocks = []
    for beat in workers:
        lines = [f"🖥 <b>{_e(beat.get('name') or '?')}</b>: {_e(beat.get('device') or 'unknown')}"]
        used, total = beat.get("vram_used"), beat.get("vram_total")
        if used is not None and total:
            lines.append(f"VRAM: {_gib(used)} used, {_gib(total - used)} free of {_gib(total)}")
        else:
            lines.append("VRAM: not reported")
        job_id = beat.get("job_id")
        state = running.get(job_id) if job_id else None
        if job_id and state:
            stage = STAGES.get(str(state.get("stage")), str(state.get("stage") or ""))
            lines.append(f"Running job {job(job_id)}: {_e(stage)}, {state['percent']:.0f}%")
        elif job_id:
            lines.append(f"Running job {job(job_id)}")
        else:
            lines.append("Idle.")
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


def _gib(size_bytes: float) -> str:
    return f"{size_bytes / 1024**3:.1f} GiB"


# --- storyboards ------------------------------------------------------------------------


def storyboard(title: str, scenes: list[dict[str, Any]]) -> str:
    total = sum(scene["duration_s"] for scene in scenes)
    lines = [f"🎞 Storyboard: <b>{_e(title)}</b>",
             f"{len(scenes)} scene{'s' if len(scenes) != 1 else ''}, {total:.0f} s in all"]
    for number, scene in enumerate(scenes, 1):
        text = scene["description"]
        if len(text) > MAX_SCENE_TEXT:
            text = text[:MAX_SCENE_TEXT] + "…"
        lines.append(f"{number}. {_e(scene['camera'])}, {scene['duration_s']:.0f} s: {_e(text)}")
    lines.append("Reply <b>render</b> to this message, or press Render, to make the video.")
    return "\n".join(lines)


RENDER_BUTTON = "Render"


def storyboard_gone() -> str:
    return ("I no longer have that storyboard (they are kept for a week). "
            "Send /storyboard with the prompt again.")


def queue_unavailable() -> str:
    return "⚠️ The job queue is unavailable right now (its Redis server is down): I could " \
        "not do that, and nothing was queued. Please try again in a minute."


def internal_error() -> str:
    return "Something went wrong on my side; the administrators can see it in the log. " \
        "Please try again in a minute."
