"""The chat delivery's crash window, made deterministic: the Bot API has taken the video
(the user sees it) but its answer has not reached the daemon when the daemon is
SIGKILLed. The chaos test lands there only by luck (seen once in its first runs). The
video is an edit of the progress message, so the restarted daemon's redo edits that
message again instead of sending a second video."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
from aiohttp import web

from tests.conftest import wait_for
from tests.fake_bot_api import TOKEN, FakeBotApi
from tests.fault.stack import fault_config, prompt

pytestmark = [
    pytest.mark.slow,
    pytest.mark.timeout(120),
    pytest.mark.filterwarnings("ignore:unread_data:DeprecationWarning"),
]

USER = 301
HOLD_S = 30.0  # longer than the test needs: the daemon dies waiting


class AnswerLateBotApi(FakeBotApi):
    """The fake Bot API, but the next call of a chosen method is carried out (and
    recorded) and then not answered, as when the reply is lost on the way back. It
    overrides the server's private handler: a fault no real test of the fake needs."""

    def __init__(self) -> None:
        super().__init__()
        self.hold_next: str | None = None
        self.released = threading.Event()

    async def _api(self, request: web.Request) -> web.StreamResponse:
        response = await super()._api(request)
        if request.match_info["method"] == self.hold_next:
            self.hold_next = None
            deadline = time.monotonic() + HOLD_S
            while not self.released.is_set() and time.monotonic() < deadline:
                await asyncio.sleep(0.1)
        return response

    def __exit__(self, *exc: object) -> None:
        self.released.set()  # let a held handler end, so the server stops at once
        super().__exit__(*exc)


def chat_section(api: FakeBotApi) -> str:
    return (f'enabled = true\ntoken = "{TOKEN}"\nbase_url = "{api.base_url}"\n'
            f'base_file_url = "{api.base_file_url}"\nallowed_user_ids = [{USER}]\n'
            'progress_interval = "1s"')


def test_a_daemon_killed_while_the_video_upload_is_answered_does_not_send_it_twice(
        tmp_path, redis_url, start):
    with AnswerLateBotApi() as api:
        config_file = fault_config(tmp_path, redis_url, **{"intake.chat": chat_section(api)})
        daemon = start(config_file, "daemon")
        start(config_file, "worker")
        wait_for(lambda: "chat bot connected" in daemon.log(), timeout=60, what="the bot")
        api.hold_next = "editMessageMedia"
        request = api.user_message(USER, f"/video {prompt('t001')}")
        api.wait_for("editMessageMedia", timeout=60)  # taken by Telegram; the answer is held
        daemon.kill()
        start(config_file, "daemon")
        api.wait_for("sendDocument", timeout=60)  # the delivery went on after the restart
        time.sleep(1.5)  # a second video would be here by now
        # The window was hit: the restarted daemon put the video in again…
        assert len(api.sent("editMessageMedia")) == 2
        # …into the same message, so the chat shows one video.
        videos = [m for m in api.videos(USER)
                  if m["reply_to_message"]["message_id"] == request["message_id"]]
        assert len(videos) == 1, f"{len(videos)} videos for one /video"
        assert api.sent("sendVideo") == []
