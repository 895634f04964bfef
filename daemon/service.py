"""The daemon process: runs the channels and delivers results, in one asyncio loop.

Redis outages are ridden out: the intakes answer "try again" (HTTP 503, a chat reply)
or retry (drop folders), and the delivery loop waits for Redis to come back. With the
embedded Redis, the daemon also starts it again when it dies, so a daemon running on
its own (under systemd, say) needs nobody else for that.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal

from redis.exceptions import RedisError

from daemon.channels import RunningChannel, build_channels
from daemon.config import Config
from daemon.delivery import DeliveryLoop
from daemon.logs import get_logger
from daemon.queue import QueueClient
from daemon.redis_server import EmbeddedRedis, EmbeddedRedisError
from daemon.submit import Submitter

log = get_logger(component="daemon")
REDIS_WATCH_S = 1.0  # how often the embedded Redis is looked at
MAX_RETRY_S = 60.0  # the longest wait between failed starts of it


async def run_daemon(config: Config, stop: asyncio.Event | None = None) -> None:
    # The composition: channels and kinds are plugins of the core, wired together here.
    from intake.channels import channel_types
    from workers.pipelines import kind_registry

    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)

    embedded = None if config.redis.url else EmbeddedRedis(config.state_dir,
                                                           config.redis.appendfsync)
    url = embedded.url if embedded else config.redis.url
    owns_redis = bool(embedded) and await asyncio.to_thread(embedded.start)
    queue = await QueueClient.open(url, keep_results_s=config.worker.keep_results,
                                   interactive_lead_s=config.queue.interactive_lead)
    submitter = Submitter(config, queue, kind_registry(config))
    channels = build_channels(channel_types(config), config, submitter)
    delivery = DeliveryLoop(config, queue)
    for channel in channels:
        if channel.deliver is not None:
            delivery.register(channel.name, channel.deliver)
    started: list[RunningChannel] = []
    watch = asyncio.create_task(_keep_redis(embedded, stop)) if embedded else None
    try:
        for channel in channels:
            await channel.start()
            started.append(channel)
        delivery_task = asyncio.create_task(delivery.run(stop))
        log.info("daemon ready", redis=url, channels=[channel.name for channel in channels])
        stopping = asyncio.create_task(stop.wait())
        await asyncio.wait([stopping, delivery_task], return_when=asyncio.FIRST_COMPLETED)
        if not stop.is_set():
            # The loop rides out Redis outages; if it died anyway, exit non-zero so that
            # the supervisor (reelqueue up, systemd) restarts the daemon, whose next start
            # redoes the interrupted deliveries. Waiting on would deliver nothing more.
            stopping.cancel()
            log.error("the delivery loop failed; exiting so that the daemon is restarted",
                      error=repr(delivery_task.exception()))
        log.info("daemon stopping")
        await delivery_task
    finally:
        if watch is not None:
            watch.cancel()
        for channel in started:
            await channel.stop()
        await queue.close()
        if embedded is not None and owns_redis:
            await asyncio.to_thread(embedded.stop)


async def _keep_redis(server: EmbeddedRedis, stop: asyncio.Event) -> None:
    """Start the embedded Redis again whenever it dies (same AOF and socket: the queue
    survives). ``reelqueue up`` does the same; the start lock lets only one start it."""
    delay = REDIS_WATCH_S
    while True:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), delay)
        if stop.is_set():
            return
        try:
            await asyncio.to_thread(server.revive)
            delay = REDIS_WATCH_S
        # A damaged AOF (its log tail says so), or a server dying again as it starts.
        except (EmbeddedRedisError, RedisError, OSError) as exc:
            delay = min(MAX_RETRY_S, delay * 2)
            log.error("could not start the embedded redis again", error=str(exc),
                      retry_in_s=delay)
