"""A fake Telegram Bot API server for tests: a small aiohttp app on 127.0.0.1 that the
real python-telegram-bot client talks to through ``base_url`` and ``base_file_url``.

It speaks the real JSON shapes (``{"ok": true, "result": ...}``, message objects with
``message_id``, ``chat``, ``date``, ``text``…), feeds scripted updates to ``getUpdates``
with long-poll semantics (held briefly, answered at once when an update arrives),
keeps the messages the bot sent so edits can be checked against them (an
``editMessageMedia`` turns a text message into a video or document message, as
Telegram does; ``videos`` lists the video messages a chat has), records every call
(multipart uploads by file name and size), and can misbehave on request: answer 429
with ``retry_after``, 413 above an upload size, 500, or drop every connection as if the
server were down, and come back. ``delete`` removes a message, as a user can.

It runs in its own thread with its own event loop, so it serves a bot in another
process (a spawned daemon) and one in the test's own loop alike::

    with FakeBotApi() as api:
        ...  # base_url=api.base_url, base_file_url=api.base_file_url
        request = api.user_message(USER, "/video a red fox")
        api.wait_for("editMessageMedia")  # the progress message turned into the video
        [video] = api.videos(USER)
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

TOKEN = "123456:TEST-token-never-in-logs"
BOT_ID = int(TOKEN.split(":")[0])
BOT_USERNAME = "reelqueue_test_bot"
LONG_POLL_S = 0.5  # getUpdates holds at most this long, whatever timeout the bot asks
MAX_UPLOAD_BYTES = 50 * 1024 * 1024  # Telegram's cloud limit for bots


@dataclass
class Call:
    """One request the bot made, as the server saw it."""

    method: str
    params: dict[str, Any]
    files: dict[str, tuple[str, int]]  # form field → (file name, size in bytes)
    status: int
    at: float = field(default_factory=time.monotonic)
    result: Any = None
    uploaded: dict[str, bytes] = field(default_factory=dict)  # form field → the file's bytes


@dataclass
class _Fault:
    status: int
    retry_after: int | None
    remaining: int
    description: str


class FakeBotApi:
    def __init__(self, token: str = TOKEN, username: str = BOT_USERNAME,
                 max_upload_bytes: int = MAX_UPLOAD_BYTES):
        self.token = token
        self.bot_user = {"id": int(token.split(":")[0]), "is_bot": True,
                         "first_name": "Reelqueue", "username": username}
        self.max_upload_bytes = max_upload_bytes
        self.calls: list[Call] = []
        self.files: dict[str, tuple[str, bytes]] = {}  # file_id → (file_path, bytes)
        self.down = False
        self._closing = False
        self._lock = threading.Lock()
        self._updates: list[dict[str, Any]] = []
        self._update_ids = itertools.count(1)
        self._message_ids: defaultdict[int, itertools.count[int]] = defaultdict(
            lambda: itertools.count(1))
        self._messages: dict[tuple[int, int], dict[str, Any]] = {}
        self._faults: dict[str, _Fault] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake: asyncio.Event | None = None
        self._thread: threading.Thread | None = None
        self._runner: web.AppRunner | None = None
        self.port = 0

    # --- running ----------------------------------------------------------------------

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/bot"

    @property
    def base_file_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/file/bot"

    def __enter__(self) -> FakeBotApi:
        started = threading.Event()
        self._thread = threading.Thread(target=self._serve, args=(started,), daemon=True,
                                        name="fake-bot-api")
        self._thread.start()
        if not started.wait(10):
            raise RuntimeError("the fake Bot API server did not start")
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._loop is not None and self._thread is not None and self._wake is not None
        self._closing = True  # a held getUpdates answers now rather than at its deadline
        self._loop.call_soon_threadsafe(self._wake.set)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    def _serve(self, started: threading.Event) -> None:
        loop = self._loop = asyncio.new_event_loop()
        self._wake = asyncio.Event()
        # Uploads are checked against max_upload_bytes here, not by aiohttp's own limit.
        app = web.Application(client_max_size=1024**3)
        app.router.add_post("/bot{token}/{method}", self._api)
        app.router.add_get("/bot{token}/{method}", self._api)
        app.router.add_get("/file/bot{token}/{path:.+}", self._download)
        self._runner = web.AppRunner(app, access_log=None)
        loop.run_until_complete(self._runner.setup())
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        loop.run_until_complete(site.start())
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        started.set()
        try:
            loop.run_forever()
        finally:
            loop.run_until_complete(self._runner.cleanup())
            loop.close()

    # --- scripting what users do ----------------------------------------------------------

    def push_update(self, update: dict[str, Any]) -> dict[str, Any]:
        with self._lock:
            update = {"update_id": next(self._update_ids), **update}
            self._updates.append(update)
        if self._loop is not None and self._wake is not None:
            self._loop.call_soon_threadsafe(self._wake.set)
        return update

    def user_message(self, user_id: int, text: str | None = None, *, chat_id: int | None = None,
                     chat_type: str = "private", reply_to: dict[str, Any] | None = None,
                     caption: str | None = None, **media: Any) -> dict[str, Any]:
        """A user's message (pushed as an update); returns the message object."""
        chat_id = user_id if chat_id is None else chat_id
        message = self._new_message(chat_id, chat_type,
                                    {"id": user_id, "is_bot": False, "first_name": f"U{user_id}"})
        if text is not None:
            message["text"] = text
            message.update(_command_entities(text, "entities"))
        if caption is not None:
            message["caption"] = caption
            message.update(_command_entities(caption, "caption_entities"))
        if reply_to is not None:
            message["reply_to_message"] = reply_to
        message.update(media)
        self.push_update({"message": message})
        return message

    def button_press(self, user_id: int, message: dict[str, Any], data: str) -> None:
        self.push_update({"callback_query": {
            "id": f"cb{time.monotonic_ns()}", "chat_instance": "ci",
            "from": {"id": user_id, "is_bot": False, "first_name": f"U{user_id}"},
            "message": message, "data": data}})

    def add_file(self, file_id: str, data: bytes, file_path: str) -> None:
        self.files[file_id] = (file_path, data)

    def delete(self, chat_id: int, message_id: int) -> None:
        """A user deletes a message (their own, or one of the bot's in a private chat)."""
        with self._lock:
            del self._messages[(chat_id, message_id)]

    # --- misbehaving ------------------------------------------------------------------

    def fail(self, method: str, status: int, *, retry_after: int | None = None,
             times: int = 1, reason: str | None = None) -> None:
        """Answer the next ``times`` calls of ``method`` with an error ``status``, and
        ``reason`` after the status's name, as Telegram words its errors ("Bad Request:
        message can't be edited")."""
        description = _REASONS[status] + (f": {reason}" if reason else "")
        with self._lock:
            self._faults[method] = _Fault(status, retry_after, times, description)

    def go_down(self) -> None:
        """Drop every connection without an answer until ``come_back``."""
        self.down = True

    def come_back(self) -> None:
        self.down = False

    # --- inspecting what the bot did ----------------------------------------------------

    def sent(self, method: str | None = None, **params: Any) -> list[Call]:
        """Successful calls of ``method`` whose parameters include ``params``."""
        with self._lock:
            calls = list(self.calls)
        return [c for c in calls if c.status == 200 and (method is None or c.method == method)
                and all(c.params.get(k) == v for k, v in params.items())]

    def attempts(self, method: str) -> list[Call]:
        with self._lock:
            return [c for c in self.calls if c.method == method]

    def texts(self, chat_id: int) -> list[str]:
        """Texts the bot sent (not edits) to ``chat_id``, in order."""
        return [c.params["text"] for c in self.sent("sendMessage", chat_id=chat_id)]

    def message(self, chat_id: int, message_id: int) -> dict[str, Any]:
        with self._lock:
            return dict(self._messages[(chat_id, message_id)])

    def videos(self, chat_id: int | None = None) -> list[dict[str, Any]]:
        """The video messages in ``chat_id`` (every chat: None) as the chat shows them
        now, whether sent as videos or edited into them, oldest first."""
        with self._lock:
            return [dict(m) for (chat, _), m in sorted(self._messages.items())
                    if "video" in m and chat_id in (None, chat)]

    def wait_for(self, method: str, count: int = 1, timeout: float = 30,
                 **params: Any) -> list[Call]:
        """Block until ``count`` successful calls of ``method`` (for sync tests)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if len(found := self.sent(method, **params)) >= count:
                return found
            time.sleep(0.02)
        raise AssertionError(f"timed out after {timeout} s waiting for {count} × {method} "
                             f"{params}; calls: {[c.method for c in self.calls]}")

    async def until(self, method: str, count: int = 1, timeout: float = 15,
                    **params: Any) -> list[Call]:
        """``wait_for`` for async tests: yields to the event loop while waiting."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if len(found := self.sent(method, **params)) >= count:
                return found
            await asyncio.sleep(0.02)
        raise AssertionError(f"timed out after {timeout} s waiting for {count} × {method} "
                             f"{params}; calls: {[c.method for c in self.calls]}")

    # --- the API ----------------------------------------------------------------------

    async def _api(self, request: web.Request) -> web.StreamResponse:
        if self.down:
            return _drop(request)
        method = request.match_info["method"]
        if request.match_info["token"] != self.token:
            return self._answer(Call(method, {}, {}, 401), _error(401, "Unauthorized"))
        params, uploads = await _read_params(request)
        call = Call(method, params, {name: (f.filename, len(data))
                                     for name, (f, data) in uploads.items()}, 200,
                    uploaded={name: data for name, (_, data) in uploads.items()})
        with self._lock:
            fault = self._faults.get(method)
            if fault is not None:
                fault.remaining -= 1
                if fault.remaining <= 0:
                    del self._faults[method]
        if fault is not None:
            call.status = fault.status
            retry = {"retry_after": fault.retry_after} if fault.retry_after else None
            return self._answer(call, _error(fault.status, fault.description, retry))
        if sum(size for _, size in call.files.values()) > self.max_upload_bytes:
            call.status = 413
            return self._answer(call, _error(413, "Request Entity Too Large"))
        if method == "getUpdates":
            return self._answer(call, await self._get_updates(params), record=False)
        handler = getattr(self, f"_m_{method}", None)
        if handler is None:
            call.status = 404
            return self._answer(call, _error(404, "Not Found"))
        try:
            result = handler(params, call.files)
        except _BadRequest as exc:
            call.status = 400
            return self._answer(call, _error(400, f"Bad Request: {exc}"))
        call.result = result
        return self._answer(call, {"ok": True, "result": result})

    def _answer(self, call: Call, body: dict[str, Any], record: bool = True) -> web.Response:
        if record:
            with self._lock:
                self.calls.append(call)
        return web.json_response(body, status=call.status)

    async def _get_updates(self, params: dict[str, Any]) -> dict[str, Any]:
        assert self._wake is not None
        offset = int(params.get("offset") or 0)
        limit = int(params.get("limit") or 100)
        hold = min(float(params.get("timeout") or 0), LONG_POLL_S)
        deadline = time.monotonic() + hold
        while True:
            self._wake.clear()
            with self._lock:
                # An offset confirms every update before it: Telegram forgets those.
                self._updates = [u for u in self._updates if u["update_id"] >= offset]
                pending = self._updates[:limit]
            left = deadline - time.monotonic()
            if pending or left <= 0 or self.down or self._closing:
                return {"ok": True, "result": pending}
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), left)

    async def _download(self, request: web.Request) -> web.StreamResponse:
        if self.down:
            return _drop(request)
        if request.match_info["token"] != self.token:
            return web.json_response(_error(401, "Unauthorized"), status=401)
        path = request.match_info["path"]
        for file_path, data in self.files.values():
            if file_path == path:
                return web.Response(body=data)
        return web.json_response(_error(404, "Not Found"), status=404)

    # --- methods ----------------------------------------------------------------------

    def _new_message(self, chat_id: int, chat_type: str, sender: dict[str, Any]
                     ) -> dict[str, Any]:
        chat: dict[str, Any] = {"id": chat_id, "type": chat_type}
        if chat_type == "private":
            chat["first_name"] = sender["first_name"]
        else:
            chat["title"] = f"group {chat_id}"
        with self._lock:
            message_id = next(self._message_ids[chat_id])
            message = {"message_id": message_id, "from": sender, "chat": chat,
                       "date": int(time.time())}
            self._messages[(chat_id, message_id)] = message
        return message

    def _bot_message(self, params: dict[str, Any], **content: Any) -> dict[str, Any]:
        chat_id = int(params["chat_id"])
        message = self._new_message(chat_id, "private" if chat_id > 0 else "group",
                                    self.bot_user)
        reply = params.get("reply_parameters") or {}
        if reply.get("message_id"):
            original = self._messages.get((chat_id, int(reply["message_id"])))
            if original is None and not reply.get("allow_sending_without_reply"):
                raise _BadRequest("message to be replied not found")
            if original is not None:
                message["reply_to_message"] = dict(original)
        if params.get("reply_markup"):
            message["reply_markup"] = params["reply_markup"]
        message.update(content)
        with self._lock:
            self._messages[(chat_id, message["message_id"])] = message
        return message

    def _m_getMe(self, params: dict[str, Any], files: Any) -> dict[str, Any]:
        return {**self.bot_user, "can_join_groups": True, "can_read_all_group_messages": False,
                "supports_inline_queries": False}

    def _m_deleteWebhook(self, params: dict[str, Any], files: Any) -> bool:
        return True

    def _m_setMyCommands(self, params: dict[str, Any], files: Any) -> bool:
        return True

    def _m_answerCallbackQuery(self, params: dict[str, Any], files: Any) -> bool:
        return True

    def _m_sendMessage(self, params: dict[str, Any], files: Any) -> dict[str, Any]:
        if not str(params.get("text", "")).strip():
            raise _BadRequest("message text is empty")
        return self._bot_message(params, text=params["text"])

    def _message_to_edit(self, params: dict[str, Any]) -> dict[str, Any]:
        """The message an edit names (call with the lock held)."""
        message = self._messages.get((int(params["chat_id"]), int(params["message_id"])))
        if message is None:
            raise _BadRequest("message to edit not found")
        return message

    def _m_editMessageText(self, params: dict[str, Any], files: Any) -> dict[str, Any]:
        with self._lock:
            message = self._message_to_edit(params)
            if message.get("text") == params["text"] and \
                    message.get("reply_markup") == params.get("reply_markup"):
                raise _BadRequest("message is not modified: specified new message content and "
                                  "reply markup are exactly the same as a current content and "
                                  "reply markup of the message")
            message["text"] = params["text"]
            message["edit_date"] = int(time.time())
            _replace_markup(message, params)
            return dict(message)

    def _m_editMessageReplyMarkup(self, params: dict[str, Any], files: Any) -> dict[str, Any]:
        with self._lock:
            message = self._message_to_edit(params)
            message.pop("reply_markup", None)
            if params.get("reply_markup"):
                message["reply_markup"] = params["reply_markup"]
            return dict(message)

    def _m_editMessageMedia(self, params: dict[str, Any], files: dict[str, tuple[str, int]]
                            ) -> dict[str, Any]:
        """A message's media replaced, or added to a text message (as the Bot API allows): the
        text goes, the media and its caption take its place; the message keeps its id, its
        date and what it replies to."""
        media = params["media"]
        kind = media.get("type")
        if kind not in ("video", "document"):  # all that the fake knows
            raise _BadRequest("unsupported media type")
        # An upload is named by "attach://<field>"; anything else is a file_id or a URL.
        field_name = str(media["media"]).removeprefix("attach://")
        upload = files.get(field_name, (str(media["media"]), 0))
        with self._lock:
            message = self._message_to_edit(params)
            if message["from"]["id"] != self.bot_user["id"]:
                raise _BadRequest("message can't be edited")
            for content in ("text", "entities", "caption", "video", "document"):
                message.pop(content, None)
            message[kind] = _media(kind, media, *upload)
            message.update(_caption(media))
            message["edit_date"] = int(time.time())
            _replace_markup(message, params)
            return dict(message)

    def _m_sendVideo(self, params: dict[str, Any], files: dict[str, tuple[str, int]]
                     ) -> dict[str, Any]:
        video = _media("video", params, *files.get("video", ("", 0)))
        return self._bot_message(params, video=video, **_caption(params))

    def _m_sendDocument(self, params: dict[str, Any], files: dict[str, tuple[str, int]]
                        ) -> dict[str, Any]:
        document = _media("document", params, *files.get("document", ("", 0)))
        return self._bot_message(params, document=document, **_caption(params))

    def _m_getFile(self, params: dict[str, Any], files: Any) -> dict[str, Any]:
        file_id = params["file_id"]
        if file_id not in self.files:
            raise _BadRequest("invalid file_id")
        file_path, data = self.files[file_id]
        return {"file_id": file_id, "file_unique_id": f"u-{file_id}", "file_size": len(data),
                "file_path": file_path}


class _BadRequest(Exception):
    pass


_REASONS = {400: "Bad Request", 403: "Forbidden", 413: "Request Entity Too Large",
            429: "Too Many Requests", 500: "Internal Server Error", 502: "Bad Gateway"}


def _error(status: int, description: str, parameters: dict[str, Any] | None = None
           ) -> dict[str, Any]:
    if status == 429 and parameters:
        description = f"Too Many Requests: retry after {parameters['retry_after']}"
    body: dict[str, Any] = {"ok": False, "error_code": status, "description": description}
    if parameters:
        body["parameters"] = parameters
    return body


def _drop(request: web.Request) -> web.Response:
    # Close the connection without answering, as a crashed or unreachable server would.
    if request.transport is not None:
        request.transport.abort()
    return web.Response(status=503)


async def _read_params(request: web.Request) -> tuple[dict[str, Any], dict[str, Any]]:
    """Form fields (the Bot API's values are plain strings or JSON) and uploaded files."""
    params: dict[str, Any] = {}
    uploads: dict[str, Any] = {}
    if request.method == "GET":
        form: Any = request.query
    elif request.content_type == "application/json":
        return await request.json(), {}
    else:
        form = await request.post()
    for name, value in form.items():
        if isinstance(value, web.FileField):
            uploads[name] = (value, value.file.read())
            continue
        params[name] = _json_or_text(name, value)
    return params, uploads


_TEXT_FIELDS = {"text", "caption", "data", "callback_query_id", "file_id", "parse_mode"}


def _json_or_text(name: str, value: str) -> Any:
    if name in _TEXT_FIELDS:
        return value
    try:
        return json.loads(value)
    except json.JSONDecodeError:
        return value


def _replace_markup(message: dict[str, Any], params: dict[str, Any]) -> None:
    """An edit without reply_markup removes the message's keyboard, as Telegram does."""
    if "reply_markup" in params:
        message["reply_markup"] = params["reply_markup"]
    else:
        message.pop("reply_markup", None)


def _caption(params: dict[str, Any]) -> dict[str, Any]:
    return {"caption": params["caption"]} if params.get("caption") else {}


def _media(kind: str, params: dict[str, Any], name: str, size: int) -> dict[str, Any]:
    """A Video or Document object for an upload (or a file_id) and the call's fields."""
    if kind == "document":
        return {"file_id": f"doc-{time.monotonic_ns()}", "file_unique_id": "d",
                "file_name": name, "file_size": size}
    return {"file_id": f"video-{time.monotonic_ns()}", "file_unique_id": "v",
            "width": int(params.get("width") or 0), "height": int(params.get("height") or 0),
            "duration": int(params.get("duration") or 0), "file_name": name,
            "mime_type": "video/mp4", "file_size": size}


def _command_entities(text: str, key: str) -> dict[str, Any]:
    if not text.startswith("/"):
        return {}
    length = len(text.split(maxsplit=1)[0].encode("utf-16-le")) // 2
    return {key: [{"type": "bot_command", "offset": 0, "length": length}]}
