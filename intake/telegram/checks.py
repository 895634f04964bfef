"""The doctor's look at ``[intake.chat]`` (without loading python-telegram-bot)."""

from __future__ import annotations

from daemon.config import Config
from daemon.findings import Finding, Level, where_secret_comes_from


def chat_checks(config: Config) -> list[Finding]:
    chat = config.intake.chat
    findings = []
    if not chat.secret:
        findings.append(Finding(Level.ERROR, "config",
                                "the chat bot is enabled but has no token: "
                                + where_secret_comes_from(chat.token),
                                "put the bot's token in /etc/reelqueue/env, or set "
                                "[intake.chat] enabled = false"))
    if not chat.allowed_user_ids and not chat.admin_user_ids:
        findings.append(Finding(Level.ERROR, "config",
                                "the chat bot is enabled but nobody may use it",
                                "add Telegram user ids to [intake.chat] allowed_user_ids"))
    elif not chat.allowed_chat_ids:
        # Private chats need only the user on the list; a group must be listed too.
        findings.append(Finding(Level.INFO, "config",
                                "chat bot: private chats only (no group is allowed)",
                                "add group chat ids to [intake.chat] allowed_chat_ids to "
                                "serve groups"))
    if not findings:
        findings.append(Finding(Level.OK, "config",
                                f"chat bot: {len(chat.allowed_user_ids)} user(s) and "
                                f"{len(chat.allowed_chat_ids)} group(s) allowed"))
    return findings
