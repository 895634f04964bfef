"""Chaos: a stream of tiny jobs through all three channels while the daemon, the worker
and the embedded Redis are SIGKILLed at random moments and restarted; then a drain,
and a per-request check that every acknowledged job got exactly one whole result.

What counts as acknowledged, per channel:

- folder: the file was renamed into the inbox (the file itself is the durable request);
- HTTP: some attempt of the POST got a 202 (the client retries with the same
  Idempotency-Key on connection errors and 5xx, as a careful client would);
- chat: the bot answered the /video message with "queued", or with "already job …"
  (a message fetched again after a crash: the bot told the user the job exists).

The seed is printed; ``REELQUEUE_CHAOS_SEED`` replays the same schedule of kills and
submissions (the processes' own timing still varies from run to run).
"""

from __future__ import annotations

import http.client
import os
import random
import re
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from daemon.jobs import Channel, JobSpec
from tests.conftest import free_port
from tests.fake_bot_api import TOKEN as BOT_TOKEN
from tests.fake_bot_api import FakeBotApi
from tests.fault.stack import (
    TINY_FRAMES,
    Supervised,
    drop,
    fault_config,
    frame_count,
    http_call,
    http_section,
    kill_redis,
    prompt,
    redis_client,
    redis_pid,
    redis_servers_of,
    stop_redis_servers,
)

pytestmark = [
    pytest.mark.slow,
    pytest.mark.timeout(420),
    pytest.mark.filterwarnings("ignore:unread_data:DeprecationWarning"),
]

# REELQUEUE_CHAOS_SECONDS shortens a run while debugging; the kill floor scales with it.
CHAOS_S = float(os.environ.get("REELQUEUE_CHAOS_SECONDS", "150"))
KILL_EVERY_S = (1.5, 3.5)  # a kill every 2.5 s on average: about 60 in 150 s
MIN_KILLS = round(50 * CHAOS_S / 150)
SUBMIT_EVERY_S = (3.0, 9.0)  # per channel: about 25 requests each in 150 s
RESTART_DELAY_S = 0.5  # like a supervisor's RestartSec
HTTP_GIVE_UP_S = 60.0  # a careful client stops retrying one request after this
HTTP_REPLAY_SHARE = 0.3  # of acknowledged POSTs sent once more, to test the replay path
DRAIN_S = 120.0
QUIET_S = 5.0  # queues empty this long: whatever is still missing is not coming
USERS = (201, 202, 203)
TAG = re.compile(r"request ([fhc]\d{3}) ")


def tag_of(text: str) -> str | None:
    match = TAG.search(text)
    return match.group(1) if match else None


class Timeline:
    """One file of what happened when, seconds from the start: kills, restarts and every
    submission. Lined up against the daemon's logs, it is the reproduction recipe."""

    def __init__(self, path: Path):
        self.started = time.monotonic()
        self._file = path.open("w")
        self._lock = threading.Lock()

    def at(self, monotonic: float) -> str:
        return f"{monotonic - self.started:.2f} s"

    def note(self, text: str) -> None:
        with self._lock:
            self._file.write(f"{time.monotonic() - self.started:8.2f}  {text}\n")
            self._file.flush()


# --- the three channels' drivers --------------------------------------------------------


class Driver:
    """Submits a request every few seconds until ``stop``, in its own thread."""

    channel = ""

    def __init__(self, rng: random.Random, timeline: Timeline):
        self.rng = rng
        self.timeline = timeline
        self.thread = threading.Thread(target=self._run, name=f"{self.channel}-driver",
                                       daemon=True)
        self.stop = threading.Event()
        self.count = 0

    def _run(self) -> None:
        while not self.stop.wait(self.rng.uniform(*SUBMIT_EVERY_S)):
            self.submit(f"{self.channel[0]}{self.count:03d}")
            self.count += 1

    def submit(self, tag: str) -> None:
        raise NotImplementedError


class FolderDriver(Driver):
    channel = "folder"

    def __init__(self, rng: random.Random, timeline: Timeline, inbox: Path):
        super().__init__(rng, timeline)
        self.inbox = inbox
        self.sent: list[str] = []  # file stems, each renamed into place: acknowledged

    def submit(self, tag: str) -> None:
        drop(self.inbox, f"{tag}.txt", prompt(tag).encode())
        self.sent.append(tag)
        self.timeline.note(f"dropped {tag}.txt")


@dataclass
class HttpRequest:
    tag: str
    key: str
    attempts: int = 0
    ids: list[str] = field(default_factory=list)  # the job id of every 202
    refused: str = ""  # a 4xx: the client gives up on it

    @property
    def acknowledged(self) -> bool:
        return bool(self.ids)


class HttpDriver(Driver):
    channel = "http"

    def __init__(self, rng: random.Random, timeline: Timeline, port: int, seed: int):
        super().__init__(rng, timeline)
        self.port = port
        self.seed = seed
        self.requests: list[HttpRequest] = []

    def submit(self, tag: str) -> None:
        request = HttpRequest(tag, key=f"chaos-{self.seed}-{tag}")
        self.requests.append(request)
        self.post_until_answered(request)
        if request.acknowledged and self.rng.random() < HTTP_REPLAY_SHARE:
            self.post_until_answered(request)  # a client that re-sends after success

    def post_until_answered(self, request: HttpRequest) -> None:
        deadline, pause = time.monotonic() + HTTP_GIVE_UP_S, 0.2
        answered = len(request.ids)
        while time.monotonic() < deadline and len(request.ids) == answered:
            request.attempts += 1
            try:
                status, body = http_call(self.port, "POST", "/jobs",
                                         {"kind": "video", "prompt": prompt(request.tag)},
                                         {"Idempotency-Key": request.key})
            except (OSError, http.client.HTTPException):
                status, body = None, None
            self.timeline.note(f"POST {request.tag} attempt {request.attempts}: {status}")
            if status == 202:
                request.ids.append(body["id"])
            elif status is not None and status < 500:
                request.refused = f"{status} {body}"
                return
            else:  # no answer, or the daemon says "try again shortly"
                time.sleep(pause)
                pause = min(2.0, pause * 1.5)


@dataclass
class ChatRequest:
    tag: str
    chat_id: int
    message_id: int


class ChatDriver(Driver):
    channel = "chat"

    def __init__(self, rng: random.Random, timeline: Timeline, api: FakeBotApi):
        super().__init__(rng, timeline)
        self.api = api
        self.requests: list[ChatRequest] = []

    def submit(self, tag: str) -> None:
        user = USERS[self.count % len(USERS)]
        message = self.api.user_message(user, f"/video {prompt(tag)}")
        self.requests.append(ChatRequest(tag, user, message["message_id"]))
        self.timeline.note(f"chat {tag}: user {user}, message {message['message_id']}")


def pending_chat_updates(api: FakeBotApi) -> int:
    """Updates the bot has not confirmed yet. The fake server keeps them privately; a
    test peeking is simpler than a public method nobody else needs."""
    with api._lock:
        return len(api._updates)


# --- chaos ------------------------------------------------------------------------------


class Chaos:
    """SIGKILLs one of daemon, worker, Redis every few seconds, and restarts the daemon
    and the worker when they die (the embedded Redis comes back with them)."""

    def __init__(self, rng: random.Random, daemon: Supervised, worker: Supervised,
                 state_dir: Path, timeline: Timeline):
        self.rng = rng
        self.roles = {"daemon": daemon, "worker": worker}
        self.state_dir = state_dir
        self.kills: Counter[str] = Counter()
        self.note = timeline.note

    def tend(self) -> None:
        for name, role in self.roles.items():
            happened = role.tend(time.monotonic())
            if happened:
                self.note(f"{name} {happened}")

    def kill_one(self) -> str | None:
        """Kill a random live target (another one if the first pick is down)."""
        targets = ["daemon", "worker", "redis"]
        self.rng.shuffle(targets)
        for target in targets:
            if target == "redis":
                pid = kill_redis(self.state_dir)
                if pid is None:
                    continue
            else:
                pid = self.roles[target].pid
                if not self.roles[target].kill():
                    continue
            self.kills[target] += 1
            self.note(f"SIGKILL {target} (pid {pid})")
            return target
        return None

    def run(self, seconds: float) -> None:
        end = time.monotonic() + seconds
        next_kill = time.monotonic() + self.rng.uniform(*KILL_EVERY_S)
        while time.monotonic() < end:
            self.tend()
            if time.monotonic() >= next_kill:
                self.kill_one()
                next_kill = time.monotonic() + self.rng.uniform(*KILL_EVERY_S)
            time.sleep(0.05)

    @property
    def total(self) -> int:
        return sum(self.kills[t] for t in ("daemon", "worker", "redis"))


# --- checking results -----------------------------------------------------------------


@dataclass
class Tally:
    channel: str
    submitted: int = 0
    acknowledged: int = 0
    done: int = 0
    failed: int = 0
    lost: list[str] = field(default_factory=list)
    duplicated: list[str] = field(default_factory=list)
    partial: list[str] = field(default_factory=list)
    phantom: list[str] = field(default_factory=list)  # a result nobody asked for
    notes: list[str] = field(default_factory=list)


def job_specs(jobs_dir: Path, state_dir: Path) -> tuple[list[JobSpec], list[JobSpec]]:
    """The jobs that exist, and the orphans: a spec.json whose job was never queued (a
    submit cut short after writing it; the sender was not told it was taken)."""
    jobs, orphans = [], []
    with redis_client(state_dir) as client:
        for path in jobs_dir.glob("*/spec.json"):
            spec = JobSpec.model_validate_json(path.read_text())
            queued = client.exists(f"reelqueue:job:{spec.id}") or \
                (path.parent / "result.json").exists()
            (jobs if queued else orphans).append(spec)
    return jobs, orphans


def check_video(video: Path, what: str, tally: Tally) -> None:
    frames = frame_count(video)
    if frames != TINY_FRAMES:
        tally.partial.append(f"{what}: {video} decodes to {frames} frames, not {TINY_FRAMES}")


def check_folder(inbox: Path, driver: FolderDriver, specs: list[JobSpec]) -> Tally:
    tally = Tally("folder", submitted=len(driver.sent), acknowledged=len(driver.sent))
    done, failed = inbox / "done", inbox / "failed"
    for stem in driver.sent:
        results = [p for p in (done / f"{stem}.mp4", failed / f"{stem}.error.txt") if p.exists()]
        requests = [p for p in (inbox / f"{stem}.txt", done / f"{stem}.txt",
                                failed / f"{stem}.txt") if p.exists()]
        if not results:
            tally.lost.append(f"{stem}: no result; request at {[str(p) for p in requests]}")
        elif len(results) > 1:
            tally.duplicated.append(f"{stem}: both {results}")
        elif results[0].suffix == ".mp4":
            tally.done += 1
            check_video(results[0], stem, tally)
        else:
            tally.failed += 1
            tally.notes.append(f"{stem} failed: {results[0].read_text().splitlines()[2]}")
        if results and [p.parent for p in requests] != [results[0].parent]:
            tally.duplicated.append(f"{stem}: request file at {[str(p) for p in requests]}")
    sent = set(driver.sent)
    for folder in (done, failed):
        for path in folder.iterdir():
            stem = path.name.split(".")[0]
            if path.name.startswith("."):
                tally.partial.append(f"temp file left in {folder.name}/: {path.name}")
            elif stem not in sent:
                base = re.sub(r"-\d+$", "", stem)
                (tally.duplicated if base in sent else tally.phantom).append(
                    f"{folder.name}/{path.name}")
    for spec in specs:
        if spec.source.channel == Channel.folder and \
                Path(spec.source.filename or "").stem not in sent:
            tally.phantom.append(f"job {spec.id} for a file never dropped: {spec.source}")
    return tally


def check_http(port: int, driver: HttpDriver, specs: list[JobSpec], jobs_dir: Path) -> Tally:
    tally = Tally("http", submitted=len(driver.requests))
    for request in driver.requests:
        if request.refused:
            tally.notes.append(f"{request.tag} refused after {request.attempts} attempts: "
                               f"{request.refused[:200]}")
        if len(set(request.ids)) > 1:
            tally.duplicated.append(f"{request.tag}: one Idempotency-Key, jobs {request.ids}")
        if not request.acknowledged:
            tally.notes.append(f"{request.tag} not acknowledged after {request.attempts} "
                               "attempts")
            continue
        tally.acknowledged += 1
        job_id = request.ids[0]
        status, body = http_call(port, "GET", f"/jobs/{job_id}")
        state = body.get("status") if isinstance(body, dict) else None
        if state == "done":
            tally.done += 1
            check_video(jobs_dir / job_id / "video.mp4", request.tag, tally)
        elif state == "failed":
            tally.failed += 1
            tally.notes.append(f"{request.tag} failed: {body.get('error')}")
        else:
            tally.lost.append(f"{request.tag} (job {job_id}, {request.attempts} attempts): "
                              f"GET answered {status} {str(body)[:200]}")
    jobs_per_tag = Counter(tag_of(s.prompt) for s in specs if s.source.channel == Channel.http)
    sent = {r.tag for r in driver.requests}
    for tag, count in jobs_per_tag.items():
        if tag not in sent:
            tally.phantom.append(f"{count} job(s) for HTTP request {tag}, never sent")
        elif count > 1:
            tally.duplicated.append(f"{tag}: {count} jobs for one Idempotency-Key")
    return tally


def check_chat(api: FakeBotApi, driver: ChatDriver, specs: list[JobSpec],
               jobs_dir: Path, timeline: Timeline) -> Tally:
    tally = Tally("chat", submitted=len(driver.requests))

    def replies(method: str, request: ChatRequest) -> list:
        return [c for c in api.sent(method, chat_id=request.chat_id)
                if (c.params.get("reply_parameters") or {}).get("message_id")
                == request.message_id]

    def replied_to(message: dict) -> int | None:
        return (message.get("reply_to_message") or {}).get("message_id")

    def video_sends(chat_id: int, message_ids: set[int]) -> list:
        """The calls that put a video into these messages, in order: a sendVideo, or an
        edit of the progress message (done again after a crash, it is still one video)."""
        return sorted((c for method in ("sendVideo", "editMessageMedia")
                       for c in api.sent(method, chat_id=chat_id)
                       if "video" in c.result and c.result["message_id"] in message_ids),
                      key=lambda c: c.at)

    for request in driver.requests:
        answers = [c.params["text"] for c in replies("sendMessage", request)]
        acknowledged = any("is queued" in a or "already job" in a for a in answers)
        # Video messages as the chat shows them now, each counted once however often
        # its video was put in.
        videos = [m for m in api.videos(request.chat_id) if replied_to(m) == request.message_id]
        failures = [a for a in answers if "failed:" in a]
        results = len(videos) + len(failures)
        if results > 1:
            sends = [timeline.at(c.at) for c in video_sends(
                request.chat_id, {m["message_id"] for m in videos})]
            tally.duplicated.append(f"{request.tag}: {len(videos)} videos (sent at {sends}), "
                                    f"{len(failures)} failure messages")
        if any("Not queued" in a for a in answers):
            tally.notes.append(f"{request.tag} refused: {answers}")
        if not acknowledged:
            tally.notes.append(f"{request.tag} not acknowledged (answers {answers}); "
                               f"{results} result(s), allowed either way")
            continue
        tally.acknowledged += 1
        if results == 0:
            tally.lost.append(f"{request.tag} (chat {request.chat_id}, message "
                              f"{request.message_id}): answers {answers}")
        elif videos:
            tally.done += 1
            job_id = re.search(r"job <code>(\w+)</code>", videos[0].get("caption", ""))
            if job_id:
                check_video(jobs_dir / job_id.group(1) / "video.mp4", request.tag, tally)
        else:
            tally.failed += 1
            tally.notes.append(f"{request.tag} failed: {failures[0][:200]}")
    errors = [c for c in api.sent("sendMessage") if "Something went wrong" in c.params["text"]]
    if errors:
        tally.notes.append(f"{len(errors)} 'something went wrong' messages (not replies), at "
                           f"{[timeline.at(c.at) for c in errors]}")
    known = {(r.chat_id, r.message_id) for r in driver.requests}
    for spec in specs:
        if spec.source.channel == Channel.chat and \
                (spec.source.chat_id, spec.source.message_id) not in known:
            tally.phantom.append(f"job {spec.id} for a message never sent: {spec.source}")
    for video in api.videos():
        if (video["chat"]["id"], replied_to(video)) not in known:
            tally.phantom.append(f"a video for message {replied_to(video)} nobody sent")
    return tally


# --- draining ---------------------------------------------------------------------------


def queues_empty(state_dir: Path) -> bool:
    try:
        with redis_client(state_dir) as client:
            return (client.zcard("arq:queue") == 0 and client.llen("reelqueue:deliveries") == 0
                    and client.llen("reelqueue:deliveries:active") == 0)
    except Exception:  # Redis still coming back
        return False


def drain(chaos: Chaos, state_dir: Path, inbox: Path, api: FakeBotApi,
          http_driver: HttpDriver) -> float:
    """Keep one daemon and one worker up until nothing is left to do (or DRAIN_S);
    returns how long it took."""
    started = time.monotonic()
    quiet_since: float | None = None
    while time.monotonic() - started < DRAIN_S:
        chaos.tend()  # restarts only: the kills are over
        idle = (queues_empty(state_dir)
                and not [p for p in inbox.glob("*.txt")]
                and pending_chat_updates(api) == 0
                and not http_driver.thread.is_alive()
                and all(role.alive() for role in chaos.roles.values()))
        if not idle:
            quiet_since = None
        elif quiet_since is None:
            quiet_since = time.monotonic()
        elif time.monotonic() - quiet_since >= QUIET_S:
            break
        time.sleep(0.25)
    return time.monotonic() - started


# --- the test ---------------------------------------------------------------------------


def chat_section(api: FakeBotApi) -> str:
    return "\n".join([
        "enabled = true", f'token = "{BOT_TOKEN}"', f'base_url = "{api.base_url}"',
        f'base_file_url = "{api.base_file_url}"', f"allowed_user_ids = {list(USERS)}",
        # No per-user caps: the driver's users send far more than a person would.
        "max_jobs_per_user_per_day = 0", "max_queued_per_user = 0",
        'progress_interval = "1s"'])


def summary_table(tallies: list[Tally]) -> str:
    columns = ("submitted", "acknowledged", "done", "failed", "lost", "duplicated",
               "partial", "phantom")
    lines = [f"{'channel':8}" + "".join(f"{c:>13}" for c in columns)]
    total = Counter()
    for tally in tallies:
        row = {c: getattr(tally, c) if isinstance(getattr(tally, c), int)
               else len(getattr(tally, c)) for c in columns}
        total.update(row)
        lines.append(f"{tally.channel:8}" + "".join(f"{row[c]:>13}" for c in columns))
    lines.append(f"{'total':8}" + "".join(f"{total[c]:>13}" for c in columns))
    return "\n".join(lines)


def summarize(chaos: Chaos, daemon: Supervised, worker: Supervised, tallies: list[Tally],
              orphans: list[JobSpec], redis_servers: list[int], pid_file_names: int | None,
              drain_s: float, elapsed: float, seed: int, tmp_path: Path) -> str:
    """What README.md calls the summary: kills, the table, then every finding."""
    lines = [
        f"chaos {CHAOS_S:.0f} s, drain {drain_s:.1f} s, {elapsed:.0f} s in all; seed {seed}",
        f"kills: daemon {chaos.kills['daemon']}, worker {chaos.kills['worker']}, redis "
        f"{chaos.kills['redis']} (total {chaos.total}); exits by themselves: daemon "
        f"{len(daemon.exits)}, worker {len(worker.exits)}; starts: daemon {daemon.starts}, "
        f"worker {worker.starts}",
        f"redis-servers serving the state dir at the end: {len(redis_servers)} "
        f"{redis_servers} (pid file names {pid_file_names})",
        summary_table(tallies),
    ]
    failures = Counter(note.split(" failed: ", 1)[1][:120] for t in tallies for note in t.notes
                       if " failed: " in note)
    lines += [f"  failed {n}×: {reason}" for reason, n in failures.most_common()]
    for tally in tallies:
        for kind in ("lost", "duplicated", "partial", "phantom"):
            lines += [f"  {tally.channel} {kind}: {item}" for item in getattr(tally, kind)]
        lines += [f"  {tally.channel} note: {n}" for n in tally.notes if " failed: " not in n]
    if orphans:
        lines.append(f"  orphan specs (never queued, left in jobs/): {len(orphans)}: "
                     f"{sorted(tag_of(s.prompt) or s.id for s in orphans)}")
    lines.append(f"logs: {tmp_path} (chaos-timeline.txt, daemon-*.log, worker-*.log)")
    return "\n".join(lines)


def test_chaos_kills_lose_nothing_and_deliver_nothing_twice(tmp_path):
    seed = int(os.environ.get("REELQUEUE_CHAOS_SEED") or random.randrange(1_000_000))
    print(f"\nchaos seed {seed} (replay with REELQUEUE_CHAOS_SEED={seed})")
    port = free_port()
    state_dir, inbox = tmp_path / "var", tmp_path / "inbox"
    with FakeBotApi() as api:
        config_file = fault_config(
            tmp_path, "",  # the embedded Redis, so that it can be killed too
            worker='job_timeout = "1m"\nname = "chaos-worker"\n'
                   # Room for a job whose worker is killed under it several times; the
                   # crash budget itself is tested in test_stack.py.
                   "max_tries = 10",
            **{"intake.http": http_section(port), "intake.chat": chat_section(api)})
        daemon = Supervised(config_file, "daemon", restart_delay=RESTART_DELAY_S)
        worker = Supervised(config_file, "worker", restart_delay=RESTART_DELAY_S)
        timeline = Timeline(tmp_path / "chaos-timeline.txt")
        chaos = Chaos(random.Random(seed), daemon, worker, state_dir, timeline)
        drivers = [FolderDriver(random.Random(seed + 1), timeline, inbox),
                   HttpDriver(random.Random(seed + 2), timeline, port, seed),
                   ChatDriver(random.Random(seed + 3), timeline, api)]
        folder_driver, http_driver, chat_driver = drivers
        try:
            daemon.start()
            worker.start()
            chaos_started = time.monotonic()
            for driver in drivers:
                driver.thread.start()
            chaos.run(CHAOS_S)
            for driver in drivers:
                driver.stop.set()
            chaos.note("chaos over: draining")
            drain_s = drain(chaos, state_dir, inbox, api, http_driver)
            chaos.note(f"drained in {drain_s:.1f} s")
            redis_servers = redis_servers_of(state_dir)
            pid_file_names = redis_pid(state_dir)
            specs, orphans = job_specs(state_dir / "jobs", state_dir)
            tallies = [check_folder(inbox, folder_driver, specs),
                       check_http(port, http_driver, specs, state_dir / "jobs"),
                       check_chat(api, chat_driver, specs, state_dir / "jobs", timeline)]
            elapsed = time.monotonic() - chaos_started
        finally:
            for driver in drivers:
                driver.stop.set()
            daemon.stop()
            worker.stop()
            stop_redis_servers(state_dir)

    summary = summarize(chaos, daemon, worker, tallies, orphans, redis_servers,
                        pid_file_names, drain_s, elapsed, seed, tmp_path)
    print(summary)
    (tmp_path / "summary.txt").write_text(summary + "\n")

    assert chaos.total >= MIN_KILLS, f"only {chaos.total} kills"
    assert sum(len(t.lost) for t in tallies) == 0, "acknowledged jobs lost (see summary)"
    assert sum(len(t.duplicated) for t in tallies) == 0, "results delivered twice (see summary)"
    assert sum(len(t.partial) for t in tallies) == 0, "partial files (see summary)"
    assert sum(len(t.phantom) for t in tallies) == 0, "results nobody asked for (see summary)"
    assert len(redis_servers) == 1, f"redis-servers on one state dir: {redis_servers}"
    assert all(t.acknowledged for t in tallies), "a channel acknowledged nothing"
