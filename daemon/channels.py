"""Channels as the daemon sees them. Each channel (a module or package in ``intake``)
declares a ``ChannelType``: the name its jobs carry as their source, its tables under
``[intake]``, whether the configuration turns it on, how to build it, and its doctor
checks. The daemon service
and the doctor go through ``intake.channels.channel_types(config)`` and know no channel
by name."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from daemon.config import Config, Tables
from daemon.findings import Finding
from daemon.jobs import JobOutcome, JobSpec
from daemon.submit import Submitter

# How a channel answers a finished job. It must be idempotent: after a crash the same
# job may be handed to it again, and it must not answer twice.
Deliverer = Callable[[JobSpec, JobOutcome, Path], Awaitable[None]]


class RunningChannel(Protocol):
    """A channel inside the daemon: started, stopped, and (where results go back by
    themselves) delivering. A channel whose results are fetched (HTTP) has no deliverer."""

    name: str  # what its jobs carry as ``source.channel``
    deliver: Deliverer | None

    async def start(self) -> None: ...

    async def stop(self) -> None: ...


@dataclass(frozen=True)
class ChannelType:
    name: str
    enabled: Callable[[Config], bool]
    build: Callable[[Config, Submitter], RunningChannel]
    checks: Callable[[Config], list[Finding]]
    settings: Tables = field(default_factory=dict)  # its tables under [intake]
    posts: bool = False  # drains an outbox (daemon.outbox): the digest can post through it


def unread_post_targets(types: list[ChannelType], config: Config) -> list[str]:
    """``[digest] post`` targets whose outbox nobody would read: why, for each."""
    running = {channel.name: channel for channel in types if channel.enabled(config)}
    problems = []
    for target in config.digest.post:
        channel = running.get(target.channel)
        if channel is None:
            problems.append(f"[digest] post names the channel {target.channel!r}, which is "
                            "not running here")
        elif not channel.posts:
            problems.append(f"[digest] post names the channel {target.channel!r}, which "
                            "cannot post")
    return problems


def build_channels(types: list[ChannelType], config: Config, submitter: Submitter
                   ) -> list[RunningChannel]:
    """The channels the configuration turns on, in the order they are declared."""
    return [channel.build(config, submitter) for channel in types if channel.enabled(config)]
