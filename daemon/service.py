"""The daemon process: runs the channels and delivers results, in one asyncio loop.

A channel that cannot start (a busy HTTP port, a drop folder that cannot be made) does
not stop the others: it is logged, recorded in Redis (``daemon.channel_state``, shown by
``reelqueue status``) and started again with backoff while the rest serve.

Redis outages are ridden out: the intakes answer "try again" (HTTP 503, a chat reply)
or retry (drop folders), and the delivery loop waits for Redis to come back. With the
embedded Redis, the daemon also starts it again when it dies, so a daemon running on
its own (under systemd, say) needs nobody else for that.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal

from redis.exceptions import RedisError

from daemon import channel_state
from daemon.channels import RunningChannel, build_channels, unread_post_targets
from daemon.config import Config
from daemon.delivery import DeliveryLoop
from daemon.logs import get_logger
from daemon.queue import QueueClient
from daemon.redis_server import EmbeddedRedis, EmbeddedRedisError
from daemon.submit import Submitter

log = get_logger(component="daemon")
REDIS_WATCH_S = 1.0  # how often the embedded Redis is looked at
MAX_RETRY_S = 60.0  # the longest wait between failed starts of it
MAX_CHANNEL_RETRY_S = 30.0  # the longest wait between failed starts of a channel


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
    types = channel_types(config)
    channels = build_channels(types, config, submitter)
    for problem in unread_post_targets(types, config):
        log.warning("the digest's summary would wait unread", problem=problem)
    delivery = DeliveryLoop(config, queue)
    for channel in channels:
        if channel.deliver is not None:
            delivery.register(channel.name, channel.deliver)
    kept = [KeptChannel(channel) for channel in channels]
    watch = asyncio.create_task(_keep_redis(embedded, stop)) if embedded else None
    keeping = [asyncio.create_task(channel.keep(stop)) for channel in kept]
    publishing = asyncio.create_task(_publish_channels(queue, kept, stop))
    try:
        # Each channel's first start is tried before the daemon says it is ready.
        await asyncio.gather(*(channel.tried.wait() for channel in kept))
        delivery_task = asyncio.create_task(delivery.run(stop))
        log.info("daemon ready", redis=url, channels=[channel.name for channel in channels],
                 failed=[c.name for c in kept if c.state == channel_state.FAILED])
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
        for task in (*keeping, publishing):
            task.cancel()
        await asyncio.gather(*keeping, publishing, return_exceptions=True)
        for channel in kept:
            if channel.state == channel_state.RUNNING:
                await channel.channel.stop()
        with contextlib.suppress(RedisError, OSError):
            await queue.redis.delete(channel_state.KEY)
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


class KeptChannel:
    """A channel the daemon keeps started: a failed start is logged, recorded and tried
    again with backoff (1 s … 30 s), so one channel that cannot start (a busy port)
    never stops the others."""

    def __init__(self, channel: RunningChannel):
        self.channel = channel
        self.name = str(channel.name)
        self.state = channel_state.STARTING
        self.error = ""
        self.attempts = 0
        self.retry_in_s = 0.0
        self.changed = asyncio.Event()
        self.tried = asyncio.Event()  # set once the first start has ended, well or not

    def record(self) -> dict[str, object]:
        return {"state": self.state, "error": self.error, "attempts": self.attempts,
                "retry_in_s": self.retry_in_s, "pid": os.getpid()}

    async def keep(self, stop: asyncio.Event) -> None:
        try:
            await self._keep(stop)
        finally:
            self.tried.set()

    async def _keep(self, stop: asyncio.Event) -> None:
        delay = 1.0
        while not stop.is_set():
            try:
                await self.channel.start()
            except Exception as exc:  # whatever a channel raises, the others go on
                self.attempts += 1
                self.state, self.error, self.retry_in_s = channel_state.FAILED, str(exc), delay
                self.changed.set()
                self.tried.set()
                log.error("channel could not start; the others run, it is tried again",
                          channel=self.name, error=str(exc), attempt=self.attempts,
                          retry_in_s=delay)
                with contextlib.suppress(Exception):  # undo a half start before the next
                    await self.channel.stop()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), delay)
                delay = min(MAX_CHANNEL_RETRY_S, delay * 2)
                continue
            if self.attempts:
                log.info("channel started after failed starts", channel=self.name,
                         attempts=self.attempts)
            self.state, self.error, self.retry_in_s = channel_state.RUNNING, "", 0.0
            self.changed.set()
            return


async def _publish_channels(queue: QueueClient, kept: list[KeptChannel],
                            stop: asyncio.Event) -> None:
    """Keep ``daemon.channel_state``'s hash fresh: at each change and every few seconds."""
    while not stop.is_set():
        for channel in kept:
            channel.changed.clear()
        states = {channel.name: channel.record() for channel in kept}
        try:
            async with queue.redis.pipeline(transaction=True) as pipe:
                pipe.delete(channel_state.KEY)
                if states:
                    pipe.hset(channel_state.KEY, mapping=channel_state.encode(states))
                    pipe.expire(channel_state.KEY, int(channel_state.TTL_S))
                await pipe.execute()
        except (RedisError, OSError):
            pass  # Redis is down: the next round writes it again
        waiters = [asyncio.ensure_future(event.wait())
                   for event in (stop, *(channel.changed for channel in kept))]
        try:
            await asyncio.wait(waiters, timeout=channel_state.REFRESH_S,
                               return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiter in waiters:
                waiter.cancel()
