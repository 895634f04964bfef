"""Every channel reelqueue has, declared once (``daemon.channels.ChannelType``). Adding
a channel is one module (or package) in ``intake`` and one entry here, or a module of
one's own named in ``[plugins] channels``."""

from __future__ import annotations

import importlib
from typing import Any

from daemon.channels import ChannelType, RunningChannel
from daemon.config import Config
from daemon.jobs import Channel
from daemon.submit import Submitter
from intake import folder, http, http_settings
from intake.telegram import settings as telegram_settings
from intake.telegram.checks import chat_checks


def _chat(config: Config, submitter: Submitter) -> RunningChannel:
    from intake.telegram.bot import ChatIntake  # python-telegram-bot only when chat is on

    return ChatIntake(config, submitter)


CHANNEL_TYPES = [
    ChannelType(Channel.folder, enabled=lambda config: bool(config.intake.folder),
                build=folder.FolderChannel, checks=lambda config: [],
                settings=folder.SETTINGS),
    ChannelType(Channel.http, enabled=lambda config: config.intake.http.enabled,
                build=http.HttpIntake, checks=http_settings.token_checks,
                settings=http_settings.SETTINGS),
    ChannelType(Channel.chat, enabled=lambda config: config.intake.chat.enabled,
                build=_chat, checks=chat_checks, settings=telegram_settings.SETTINGS,
                posts=True),
]


def channel_tables() -> dict[str, Any]:
    """The tables the built-in channels own under ``[intake]``."""
    return {name: table for channel in CHANNEL_TYPES
            for name, table in channel.settings.items()}


def channel_types(config: Config) -> list[ChannelType]:
    """The built-in channels, then each ``[plugins] channels`` module's ``CHANNEL_TYPE``."""
    return CHANNEL_TYPES + [importlib.import_module(module).CHANNEL_TYPE
                            for module in config.plugins.channels]
