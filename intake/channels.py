"""Every channel reelqueue has, declared once (``daemon.channels.ChannelType``). Adding
a channel is one module (or package) in ``intake`` and one entry here, or a module of
one's own named in ``[plugins] channels``."""

from __future__ import annotations

import importlib

from daemon.channels import ChannelType, RunningChannel
from daemon.config import Config
from daemon.jobs import Channel
from daemon.submit import Submitter
from intake import folder, http
from intake.telegram.checks import chat_checks


def _chat(config: Config, submitter: Submitter) -> RunningChannel:
    from intake.telegram.bot import ChatIntake  # python-telegram-bot only when chat is on

    return ChatIntake(config, submitter)


CHANNEL_TYPES = [
    ChannelType(Channel.folder, enabled=lambda config: bool(config.intake.folder),
                build=folder.FolderChannel, checks=lambda config: []),
    ChannelType(Channel.http, enabled=lambda config: config.intake.http.enabled,
                build=http.HttpIntake, checks=http.token_checks),
    ChannelType(Channel.chat, enabled=lambda config: config.intake.chat.enabled,
                build=_chat, checks=chat_checks),
]


def channel_types(config: Config) -> list[ChannelType]:
    """The built-in channels, then each ``[plugins] channels`` module's ``CHANNEL_TYPE``."""
    return CHANNEL_TYPES + [importlib.import_module(module).CHANNEL_TYPE
                            for module in config.plugins.channels]
