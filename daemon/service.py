"""The daemon process: runs the intakes and delivers results, in one asyncio loop."""

from __future__ import annotations

import asyncio
import signal
from typing import TYPE_CHECKING

from daemon.config import Config
from daemon.delivery import DeliveryLoop
from daemon.jobs import Channel
from daemon.logs import get_logger
from daemon.queue import QueueClient
from daemon.redis_server import ensure_redis

if TYPE_CHECKING:
    from intake.chat import ChatIntake

log = get_logger(component="daemon")


async def run_daemon(config: Config, stop: asyncio.Event | None = None) -> None:
    # Intakes build on the daemon, not the reverse: imported here, not at module level.
    from intake import folder as folder_channel
    from intake.folder import FolderIntake
    from intake.http import HttpIntake

    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)

    url, owned_redis = await asyncio.to_thread(ensure_redis, config.state_dir, config.redis.url,
                                               config.redis.appendfsync)
    queue = await QueueClient.open(url, keep_results_s=config.worker.keep_results,
                                   max_queued=config.queue.max_queued)
    intakes: list[FolderIntake | HttpIntake | ChatIntake] = [
        FolderIntake(folder, config, queue) for folder in config.intake.folder]
    if config.intake.http.enabled:
        intakes.append(HttpIntake(config, queue))
    delivery = DeliveryLoop(config, queue)
    delivery.register(Channel.folder, folder_channel.deliver_async)
    if config.intake.chat.enabled:
        from intake.chat import ChatIntake  # python-telegram-bot only when chat is on

        chat = ChatIntake(config, queue)
        intakes.append(chat)
        delivery.register(Channel.chat, chat.deliver)
    started: list[FolderIntake | HttpIntake | ChatIntake] = []
    try:
        for intake in intakes:
            await intake.start()
            started.append(intake)
        delivery_task = asyncio.create_task(delivery.run(stop))
        log.info("daemon ready", redis=url, folders=[str(f.path) for f in config.intake.folder],
                 http=config.intake.http.listen if config.intake.http.enabled else None,
                 chat=config.intake.chat.enabled)
        await stop.wait()
        log.info("daemon stopping")
        await delivery_task
    finally:
        for intake in started:
            await intake.stop()
        await queue.close()
        if owned_redis is not None:
            await asyncio.to_thread(owned_redis.stop)
