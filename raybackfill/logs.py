"""Logging for the library, its Ray actors and the CLI.

Library and actor modules log through ``logging.getLogger(__name__)`` and never configure anything at import.
The CLI, the jobs and every actor's constructor call :func:`configure_logging`, which gives the package logger
one stderr handler (Ray forwards a worker's stderr to the driver and keeps it in the worker's log file) unless
the application already configured logging (a handler on the root logger).
"""

from __future__ import annotations

import logging
import os

__all__ = ["LEVEL_ENV", "LOGGER", "configure_logging"]

LOGGER = "raybackfill"
# The level for every process of a run; init_ray hands it to the workers through the runtime environment.
LEVEL_ENV = "RAYBACKFILL_LOG_LEVEL"
FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def configure_logging(level: str | int | None = None) -> logging.Logger:
    """Give the ``raybackfill`` logger a stderr handler and a level; idempotent.

    Args:
        level: a level name or number; defaults to ``$RAYBACKFILL_LOG_LEVEL``, else ``INFO``.

    Returns:
        The package logger.

    Example:
        >>> configure_logging("WARNING").level == logging.WARNING
        True
    """
    level = level if level is not None else os.environ.get(LEVEL_ENV, "INFO")
    if isinstance(level, str):
        name = level.upper()
        if not isinstance(logging.getLevelName(name), int):
            raise ValueError(f"unknown log level {level!r}; use DEBUG, INFO, WARNING or ERROR")
        level = logging.getLevelName(name)
    logger = logging.getLogger(LOGGER)
    # An application (or pytest, or Ray) that configured the root logger already shows our records.
    if not logger.handlers and not logging.getLogger().handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter(FORMAT))
        logger.addHandler(handler)
    logger.setLevel(level)
    return logger
