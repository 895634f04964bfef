"""``reelqueue``: the command line. Every command takes ``--config PATH``."""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from redis.exceptions import RedisError
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from daemon import channel_state
from daemon.compose import read_config
from daemon.config import Config, ConfigError, find_config_file
from daemon.jobs import (
    Channel,
    JobError,
    JobSpec,
    JobStatus,
    Source,
    derive_job_id,
    new_job_id,
    write_spec,
)
from daemon.logs import configure_logging
from daemon.queue import QueueClient, RedisUnavailable, utc_from_ts
from daemon.redis_server import EmbeddedRedis, EmbeddedRedisError, ensure_redis
from daemon.submit import Refused, Request, Submitter

console = Console()


def _e(value: object) -> str:
    """A value for a rich message, with its brackets (``[upscale] model``) kept as text."""
    return escape(str(value))


def _error(message: str) -> None:
    # Plain print: rich would re-wrap long messages and paths.
    print(message, file=sys.stderr)

DEMO_PROMPT = "一只红狐狸在雪地里奔跑。夕阳西下，它回头看向镜头。"


def _parse_options(pairs: list[str]) -> dict[str, Any]:
    options: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key:
            raise JobError(f"--option takes key=value, got {pair!r}")
        try:
            options[key] = json.loads(raw)  # numbers, booleans, lists
        except json.JSONDecodeError:
            options[key] = raw
    return options


def _redis_url(config: Config) -> str:
    """The URL of the Redis to talk to; for the embedded one, it must already run."""
    if config.redis.url:
        return config.redis.url
    server = EmbeddedRedis(config.state_dir)
    if not server.is_running():
        raise RedisUnavailable(
            f"the embedded Redis is not running (socket {server.socket}); start reelqueue "
            "first with `reelqueue up` (or `reelqueue daemon`)"
        )
    return server.url


async def open_queue(config: Config) -> QueueClient:
    return await QueueClient.open(_redis_url(config), config.worker.keep_results,
                                  config.queue.interactive_lead)


def _print_where(config: Config) -> None:
    for folder in config.intake.folder:
        console.print(f"[bold]drop[/] {_e(folder.kind)} requests into "
                      f"[cyan]{_e(folder.path)}/[/]  →  "
                      f"results in [cyan]{_e(folder.path / 'done')}/[/], failures in "
                      f"[cyan]{_e(folder.path / 'failed')}/[/]")


# --- commands ----------------------------------------------------------------------------


def cmd_up(args: argparse.Namespace, config: Config) -> int:
    from daemon.supervisor import Supervisor

    _print_where(config)
    console.print("Ctrl-C stops everything.")
    return Supervisor(config, find_config_file(args.config)).serve_forever()


def cmd_daemon(args: argparse.Namespace, config: Config) -> int:
    from daemon.service import run_daemon

    asyncio.run(run_daemon(config))
    return 0


def cmd_worker(args: argparse.Namespace, config: Config) -> int:
    from workers.worker import create_worker

    url, owned = ensure_redis(config.state_dir, config.redis.url, config.redis.appendfsync)
    # Check reachability up front: a clear message instead of arq's retry traceback.
    asyncio.run(_ping(url))
    try:
        create_worker(config, url, name=args.name).run()
    except RedisError as exc:
        # Redis went away under the running worker. Its supervisor (reelqueue up, systemd)
        # starts it again; the job it ran is recovered as after a crash.
        _error(f"lost the connection to Redis at {url} ({exc}); exiting so that the "
               "worker is restarted once Redis is back")
        return 1
    finally:
        if owned is not None:
            owned.stop()
    return 0


async def _ping(url: str) -> None:
    queue = await QueueClient.open(url)
    await queue.close()


def cmd_submit(args: argparse.Namespace, config: Config) -> int:
    from daemon.progress import follow_job
    from workers.pipelines import kind_registry

    kinds = kind_registry(config)
    request = Request(
        kind=args.kind, prompt=" ".join(args.prompt), options=_parse_options(args.option),
        source=Source(channel=Channel.cli), submitted_by=_user(),
        job_id=derive_job_id("cli", _user(), args.key) if args.key else None,
    )

    async def submit() -> int:
        queue = await open_queue(config)
        try:
            answer = await Submitter(config, queue, kinds).submit(request)
            if isinstance(answer, Refused):
                _error(f"reelqueue: not queued: {answer.message}")
                return 1
            job_id = answer.spec.id
            if answer.duplicate:
                console.print(f"already queued as job [bold]{job_id}[/] (the same --key)")
            else:
                console.print(f"queued job [bold]{job_id}[/] (position {answer.position})")
            if not args.wait:
                return 0
            state = await follow_job(queue, job_id, console)
            return _report_final(config, job_id, state)
        finally:
            await queue.close()

    return asyncio.run(submit())


def _report_final(config: Config, job_id: str, state: dict[str, Any]) -> int:
    status = JobStatus(state["status"])
    directory = config.jobs_dir / job_id
    if status == JobStatus.done:
        result = json.loads((directory / "result.json").read_text())
        console.print(f"[green]done[/]: {_e(directory / result['primary'])}")
        console.print(f"report: {_e(directory / 'report.html')}")
        return 0
    console.print(f"[red]{_e(status)}[/]: {_e(state.get('error') or '')}")
    return 1


def _user() -> str:
    import getpass

    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return ""


def cmd_status(args: argparse.Namespace, config: Config) -> int:
    async def status() -> int:
        queue = await open_queue(config)
        try:
            if args.job_id:
                state = await queue.get_state(args.job_id)
                if state is None:
                    _error(f"no job {args.job_id} (unknown, or its record expired)")
                    return 1
                for key in ("id", "kind", "status", "stage", "percent", "message", "position",
                            "error", "submitted_by", "channel", "priority", "worker", "attempt"):
                    if state.get(key) not in (None, ""):
                        console.print(f"{key:>13}: {_e(state[key])}")
                return 0
            console.print(f"queue length: {await queue.queue_length()}")
            channels = channel_state.decode(await queue.redis.hgetall(channel_state.KEY))
            if not channels:
                console.print("[yellow]no daemon seen[/]: no channel takes requests; start "
                              "it with `reelqueue up` (or `reelqueue daemon`)")
            for name, state in channels.items():
                running = state.get("state") == channel_state.RUNNING
                # No markup: an error names paths and [tables].
                console.print(channel_state.describe(name, state), markup=False,
                              highlight=False, soft_wrap=True, style=None if running else "red")
            if paused := await queue.paused():
                console.print(f"[yellow]paused[/] by {_e(paused['by'])}: "
                              f"{_e(paused['reason'] or 'no reason given')}")
            workers = await queue.workers()
            if not workers:
                console.print("[yellow]no worker alive[/]: start one with `reelqueue worker`")
            for beat in workers:
                doing = "idle"
                if beat.get("job_id"):
                    state = await queue.get_state(beat["job_id"]) or {}
                    doing = _e(f"running {beat['job_id']}: {state.get('stage', '')} "
                               f"{state.get('percent', 0):.0f}% {state.get('message', '')}")
                if beat.get("stopped"):
                    doing = f"[red]not taking jobs[/]: {_e(beat['stopped'])}"
                vram = ""
                if beat.get("vram_total"):
                    vram = (f", VRAM {beat['vram_used'] / 2**30:.1f}/"
                            f"{beat['vram_total'] / 2**30:.1f} GiB")
                console.print(f"worker {_e(beat['name'])} on {_e(beat['device'])}{_e(vram)} "
                              f"(seen {_e(beat['age_s'])} s ago): {doing}")
            return 0
        finally:
            await queue.close()

    return asyncio.run(status())


def cmd_jobs(args: argparse.Namespace, config: Config) -> int:
    async def jobs() -> int:
        queue = await open_queue(config)
        try:
            table = Table("id", "kind", "status", "progress", "created", "by", "prompt / error")
            for state in (await queue.list_jobs(args.limit))[0]:
                created = utc_from_ts(state.get("created_at"))
                status = state["status"]
                detail = state.get("error") or state.get("prompt", "")
                table.add_row(state["id"], _e(state.get("kind", "")), status,
                              f"{state['percent']:.0f}% {_e(state.get('stage', ''))}",
                              created.strftime("%m-%d %H:%M") if created else "",
                              _e(state.get("submitted_by", "")), _e(detail[:60]))
            console.print(table)
            return 0
        finally:
            await queue.close()

    return asyncio.run(jobs())


def cmd_cancel(args: argparse.Namespace, config: Config) -> int:
    async def cancel() -> int:
        queue = await open_queue(config)
        try:
            outcome = await queue.cancel(args.job_id)
        finally:
            await queue.close()
        messages = {
            "unknown": f"no job {args.job_id}",
            "finished": f"job {args.job_id} has already finished",
            "cancelled": f"job {args.job_id} cancelled before it started",
            "cancelling": f"job {args.job_id} is running; it stops at its next step",
        }
        console.print(messages[outcome])
        return 0 if outcome in ("cancelled", "cancelling") else 1

    return asyncio.run(cancel())


def cmd_run(args: argparse.Namespace, config: Config) -> int:
    """Run one job in this process, no Redis: for debugging and the overhead benchmark."""
    from daemon.progress import make_progress
    from intake.jobfile import parse_request
    from workers.pipelines import kind_registry
    from workers.runner import run_job_sync

    path = Path(args.spec)
    if not path.is_file():
        raise JobError(f"{path}: no such file (give a .txt/.md prompt or a .json/.toml job file)")
    asked = parse_request(path.name, path.read_bytes(), args.kind, _parse_options(args.option))
    kinds = kind_registry(config)
    options = kinds.validate(asked.kind, asked.prompt, asked.options)
    spec = JobSpec(id=new_job_id(), kind=asked.kind, prompt=asked.prompt, options=options,
                   source=Source(channel=Channel.cli), submitted_by=_user())
    directory = write_spec(config.jobs_dir, spec)
    started = time.monotonic()
    with make_progress(console) as progress:
        task = progress.add_task(spec.id, total=100, stage="starting", note="")

        def on_progress(stage: str, percent: float, message: str) -> None:
            progress.update(task, completed=percent, stage=stage, note=message)

        outcome = run_job_sync(spec, config, kinds=kinds, on_progress=on_progress)
    elapsed = time.monotonic() - started
    if outcome.status != JobStatus.done:
        console.print(f"[red]{_e(outcome.status)}[/]: {_e(outcome.error)}")
        return 1
    console.print(f"[green]done[/] in {elapsed:.2f} s: {_e(directory / outcome.primary)}")
    console.print(f"report: {_e(directory / 'report.html')}")
    return 0


def cmd_digest(args: argparse.Namespace, config: Config) -> int:
    """Write the page of every job in a time window, from the job directories alone
    (no Redis needed)."""
    from datetime import datetime

    from workers.pipelines import digest

    now = datetime.now().astimezone()
    since = digest.parse_time(args.since, now)
    until = digest.parse_time(args.until, now) if args.until else now
    if since >= until:
        raise JobError(f"--since ({since:%Y-%m-%d %H:%M}) must be before --until "
                       f"({until:%Y-%m-%d %H:%M})")
    written = digest.write(config, since, until, Path(args.out) if args.out else None)
    print(written["summary"])
    console.print(f"digest: [cyan]{_e(written['html'])}[/]")
    return 0


def cmd_pause(args: argparse.Namespace, config: Config) -> int:
    async def pause() -> int:
        queue = await open_queue(config)
        try:
            await queue.pause(by=_user() or "cli", reason=args.reason)
        finally:
            await queue.close()
        console.print("paused: workers finish their running job and take no new one; "
                      "`reelqueue resume` lets them go on")
        return 0

    return asyncio.run(pause())


def cmd_resume(args: argparse.Namespace, config: Config) -> int:
    async def resume() -> int:
        queue = await open_queue(config)
        try:
            was_paused = await queue.resume()
        finally:
            await queue.close()
        console.print("resumed" if was_paused else "workers were not paused")
        return 0

    return asyncio.run(resume())


def cmd_models(args: argparse.Namespace, config: Config) -> int:
    """List the models in [models] dir and check them against the manifest."""
    from workers import models

    installed = models.list_models(config.models.dir)
    if not installed:
        console.print(f"no models in {_e(config.models.dir)}: fetch them with `python "
                      "scripts/fetch_models.py NAME --dest models/` on a machine with hub "
                      "access, then copy them there. Known names: "
                      f"{_e(', '.join(models.CATALOGUE))}")
        return 0
    table = Table("model", "kind", "size", "checksums")
    damaged = 0
    for model in installed:
        report = models.verify(config.models.dir, model.name)
        damaged += not report.ok
        state = "[green]ok[/]" if report.ok and report.in_manifest else (
            "[yellow]unchecked[/]" if report.ok else "[red]damaged[/]")
        table.add_row(model.name, model.kind, f"{model.size_bytes / 1e9:.2f} GB",
                      f"{state} {report.summary().split(': ', 1)[-1]}")
    console.print(table)
    return 1 if damaged else 0


def cmd_doctor(args: argparse.Namespace, config: Config) -> int:
    from daemon.doctor import render, run_checks

    text, status = render(run_checks(config))
    print(text)
    return status


def cmd_demo(args: argparse.Namespace, config: Config) -> int:
    """Start the whole stack, put one example prompt through the drop folder, stop."""
    from daemon.supervisor import Supervisor

    folder = config.intake.folder[0]
    folder.path.mkdir(parents=True, exist_ok=True)
    supervisor = Supervisor(config, find_config_file(args.config))
    console.print("[bold]reelqueue demo[/]: embedded Redis, daemon and worker start; one "
                  "example prompt goes through the drop folder.")
    _print_where(config)
    supervisor.start()
    try:
        return asyncio.run(_demo_job(config, folder.path, supervisor.exited))
    finally:
        supervisor.stop()


async def _demo_job(config: Config, inbox: Path, exited: Callable[[str], int | None]) -> int:
    """``exited(name)``: the exit status of the supervisor's child ``name`` if it is down."""
    from daemon.progress import follow_job
    from intake.folder import folder_job_id

    queue = await wait_for_worker(config, timeout_s=60)
    name = "fox.txt"
    data = (DEMO_PROMPT + "\n").encode()
    request = inbox / name
    job_id = folder_job_id(config.jobs_dir, inbox, name, hashlib.sha256(data).hexdigest())
    dropped = taken = False
    try:
        await _wait_for_folder(queue, inbox, exited)
        if request.exists():
            raise JobError(f"{request} is already waiting in the inbox; run `reelqueue up` to "
                           "process it, or remove it")
        tmp = inbox / f".{name}.part"
        tmp.write_bytes(data)
        tmp.rename(request)  # renamed in, as a careful writer would
        dropped = True
        console.print(f"dropped [cyan]{_e(request)}[/]: {_e(DEMO_PROMPT)}")
        deadline = time.monotonic() + 60
        while await queue.get_state(job_id) is None:  # until the daemon has taken the file
            if time.monotonic() > deadline:
                raise JobError(f"the daemon did not take {request} within 60 s; its log is "
                               "above, on this terminal (the daemon logs to stderr)")
            await _folder_trouble(queue, inbox, exited)
            await asyncio.sleep(0.1)
        taken = True
        state = await follow_job(queue, job_id, console)
    finally:
        if dropped and not taken:
            request.unlink(missing_ok=True)  # never leave our own request behind
        await queue.close()
    plan = config.jobs_dir / job_id / "delivery.json"
    while not (plan.exists() and json.loads(plan.read_text()).get("delivered")):
        await asyncio.sleep(0.05)
    files = json.loads(plan.read_text())["files"]
    if JobStatus(state["status"]) != JobStatus.done:
        console.print(f"[red]the demo job {_e(state['status'])}[/]: {_e(state.get('error'))}")
        console.print(f"explanation: {_e(files['error'])}")
        return 1
    console.print("[green]done.[/] Results:")
    for role in ("primary", "report.html", "report.json", "request"):
        console.print(f"  {role:>11}: {_e(files[role])}")
    return 0


async def _folder_trouble(queue: QueueClient, inbox: Path,
                          exited: Callable[[str], int | None]) -> bool:
    """Raise, naming the cause, when the daemon cannot take a file dropped in ``inbox``;
    False while it has not said yet whether its drop folder runs."""
    code = exited("daemon")
    if code is not None:
        raise JobError(f"the daemon exited (status {code}) and cannot take the demo file; "
                       "its log is above, on this terminal (the daemon logs to stderr)")
    folder = channel_state.decode(await queue.redis.hgetall(channel_state.KEY)).get(
        Channel.folder, {})
    if folder.get("state") == channel_state.FAILED:
        raise JobError(f"the daemon cannot watch {inbox}: {folder.get('error')}")
    return folder.get("state") == channel_state.RUNNING


async def _wait_for_folder(queue: QueueClient, inbox: Path,
                           exited: Callable[[str], int | None], timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while not await _folder_trouble(queue, inbox, exited):
        if time.monotonic() > deadline:
            raise JobError(f"the daemon did not start watching {inbox} within {timeout_s:.0f} "
                           "s; its log is above, on this terminal (the daemon logs to stderr)")
        await asyncio.sleep(0.1)


async def wait_for_worker(config: Config, timeout_s: float) -> QueueClient:
    """Connect once Redis is up and a worker has reported in."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            queue = await open_queue(config)
            if await queue.workers():
                return queue
            await queue.close()
        except RedisUnavailable:
            pass
        if time.monotonic() > deadline:
            raise JobError(f"no worker reported in within {timeout_s:.0f} s; see the log above")
        await asyncio.sleep(0.1)


# --- entry point -------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="reelqueue", description=__doc__)
    parser.add_argument("--config", help="config file (default: $REELQUEUE_CONFIG, "
                        "./config.toml, or built-in defaults)")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("up", help="run Redis, the daemon and a worker in the foreground")
    sub.add_parser("daemon", help="run the daemon (intakes and delivery)")
    worker = sub.add_parser("worker", help="run a GPU worker (one job at a time)")
    worker.add_argument("--name", help="worker name, unique per GPU (default host-gpuN)")
    submit = sub.add_parser("submit", help="queue a job")
    submit.add_argument("prompt", nargs="+")
    submit.add_argument("--kind", default="video")
    submit.add_argument("--option", "-o", action="append", default=[], metavar="KEY=VALUE")
    submit.add_argument("--wait", action="store_true", help="show progress until it ends")
    submit.add_argument("--key", help="an idempotency key: submitting again with the same "
                        "key returns the first job instead of queueing a second")
    status = sub.add_parser("status", help="queue, workers, or one job")
    status.add_argument("job_id", nargs="?")
    jobs = sub.add_parser("jobs", help="recent jobs")
    jobs.add_argument("--limit", type=int, default=20)
    cancel = sub.add_parser("cancel", help="cancel a queued or running job")
    cancel.add_argument("job_id")
    run = sub.add_parser("run", help="run one job file in this process, without Redis")
    run.add_argument("spec", help="a .txt/.md prompt or .json/.toml job file")
    run.add_argument("--kind", default="video")
    run.add_argument("--option", "-o", action="append", default=[], metavar="KEY=VALUE")
    digest = sub.add_parser("digest", help="a page listing every job of a time window")
    digest.add_argument("--since", required=True, metavar="TIME",
                        help="ISO date or time (2026-11-20, 2026-11-20T18:00) or a span back "
                        "from now (12h, 1d)")
    digest.add_argument("--until", metavar="TIME", help="same forms; default now")
    digest.add_argument("--out", metavar="DIR", help="where to write it (default [digest] "
                        "out_dir, else <state>/digests)")
    sub.add_parser("demo", help="start everything, run one example through the drop folder")
    sub.add_parser("models", help="list the models on disk and verify their checksums")
    pause = sub.add_parser("pause", help="workers finish their job and take no new one")
    pause.add_argument("--reason", default="", help="shown in status, /healthz and chat")
    sub.add_parser("resume", help="let paused workers take jobs again")
    sub.add_parser("doctor", help="check this machine: config, packages, ffmpeg, Redis, GPU, "
                   "models, folders, disk, fonts")
    return parser


COMMANDS = {"up": cmd_up, "daemon": cmd_daemon, "worker": cmd_worker, "submit": cmd_submit,
            "status": cmd_status, "jobs": cmd_jobs, "cancel": cmd_cancel, "run": cmd_run,
            "digest": cmd_digest, "demo": cmd_demo, "doctor": cmd_doctor,
            "models": cmd_models, "pause": cmd_pause, "resume": cmd_resume}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        config = read_config(args.config)
    except ConfigError as exc:
        _error(str(exc))
        return 2
    configure_logging(config.log.level, config.log.format)
    try:
        return COMMANDS[args.command](args, config)
    except ConfigError as exc:  # a [pipelines.<name>] table that cannot be a kind
        _error(str(exc))
        return 2
    except (RedisUnavailable, EmbeddedRedisError, JobError) as exc:
        _error(f"reelqueue: {exc}")
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
