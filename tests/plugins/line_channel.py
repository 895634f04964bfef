"""A channel in one module: a request is one line on a loopback TCP port (``KIND
PROMPT``), answered at once on the same connection with ``queued ID`` or ``refused
REASON``; each finished job is appended, once, to ``line-results.jsonl`` in the state
folder. The port comes from ``REELQUEUE_LINE_PORT``."""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path

from daemon.channels import ChannelType
from daemon.config import Config
from daemon.jobs import JobOutcome, JobSpec, Source
from daemon.submit import Refused, Request, Submitter

NAME = "line"


class LineChannel:
    name = NAME

    def __init__(self, config: Config, submitter: Submitter):
        self.submitter = submitter
        self.results = config.state_dir / "line-results.jsonl"
        self.server: asyncio.Server | None = None

    async def start(self) -> None:
        port = int(os.environ["REELQUEUE_LINE_PORT"])
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", port)

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        kind, _, prompt = (await reader.readline()).decode().strip().partition(" ")
        answer = await self.submitter.submit(Request(
            kind=kind, prompt=prompt, options={}, submitted_by="line-user",
            source=Source(channel=NAME,
                          reference={"peer": str(writer.get_extra_info("peername"))}),
        ))
        writer.write((f"refused {answer.message}" if isinstance(answer, Refused)
                      else f"queued {answer.spec.id}").encode() + b"\n")
        await writer.drain()
        writer.close()

    async def deliver(self, spec: JobSpec, outcome: JobOutcome, directory: Path) -> None:
        known = self.results.read_text().splitlines() if self.results.exists() else []
        if any(json.loads(line)["id"] == spec.id for line in known):
            return  # delivered before a restart: once is enough
        primary = str(directory / outcome.primary) if outcome.primary else None
        with open(self.results, "a", encoding="utf-8") as handle:
            handle.write(json.dumps({"id": spec.id, "status": outcome.status,
                                     "primary": primary, "error": outcome.error}) + "\n")


CHANNEL_TYPE = ChannelType(NAME, enabled=lambda config: True, build=LineChannel,
                           checks=lambda config: [])
