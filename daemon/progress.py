"""Terminal progress for a job (``submit --wait``, ``demo``, ``run``), with rich."""

from __future__ import annotations

import asyncio
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from daemon.jobs import JobStatus
from daemon.queue import QueueClient


def make_progress(console: Console) -> Progress:
    return Progress(
        TextColumn("[bold]{task.fields[stage]:<9}"),
        BarColumn(),
        TextColumn("{task.percentage:>5.1f}%"),
        TimeElapsedColumn(),
        TextColumn("{task.fields[note]}"),
        console=console,
        transient=False,
    )


async def follow_job(queue: QueueClient, job_id: str, console: Console,
                     poll_s: float = 0.25) -> dict[str, Any]:
    """Show a job's progress until it finishes; return its final state."""
    with make_progress(console) as progress:
        task = progress.add_task(job_id, total=100, stage="queued", note="")
        while True:
            state = await queue.get_state(job_id)
            if state is None:
                raise LookupError(f"no job {job_id} (unknown, or its record expired)")
            status = JobStatus(state["status"])
            note = state.get("message") or ""
            if status == JobStatus.queued and state.get("position"):
                note = f"position {state['position']} in the queue"
            progress.update(task, completed=state["percent"], stage=state.get("stage") or status,
                            note=note)
            if status.finished:
                return state
            await asyncio.sleep(poll_s)
