"""structlog setup: one JSON line per event, human-readable on a terminal."""

from __future__ import annotations

import logging
import sys

import structlog


def configure_logging(level: str = "info", fmt: str = "auto") -> None:
    use_console = fmt == "console" or (fmt == "auto" and sys.stderr.isatty())
    renderer = (
        structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
        if use_console
        else structlog.processors.JSONRenderer(ensure_ascii=False)
    )
    numeric = getattr(logging, level.upper())
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=False,
    )
    # arq and watchdog log through the standard library: keep them, at warning and up.
    logging.basicConfig(level=max(numeric, logging.WARNING), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("watchdog.observers.inotify").addFilter(_DropWatchdogStopNoise())


class _DropWatchdogStopNoise(logging.Filter):
    """watchdog 7 logs this error on every clean observer stop (its reader thread wakes
    once more after the watch is closed); it is not a fault."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "called when the thread is inactive" not in record.getMessage()


def get_logger(**bound: object) -> structlog.typing.FilteringBoundLogger:
    # Initial values, not .bind(): binding resolves the logger at once, and module-level
    # loggers would then keep structlog's defaults instead of configure_logging's.
    return structlog.get_logger(**bound)
