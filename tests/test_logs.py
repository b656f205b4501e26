"""Logging: one handler on the package logger, the level from the argument, the environment or INFO."""

import logging
import os
import subprocess
import sys

import pytest

from raybackfill.logs import LEVEL_ENV, LOGGER, configure_logging


@pytest.fixture
def clean_logger(monkeypatch):
    logger = logging.getLogger(LOGGER)
    saved = (logger.handlers[:], logger.level, logger.propagate)
    logger.handlers.clear()
    # Propagating again, as before any configure_logging: pytest attaches its capture handlers to every
    # non-propagating logger, which an earlier in-process CLI call (test_cli) leaves this one as.
    logger.propagate = True
    monkeypatch.delenv(LEVEL_ENV, raising=False)
    yield logger
    logger.handlers[:], logger.level, logger.propagate = saved[0], saved[1], saved[2]


def test_idempotent_one_handler(clean_logger):
    configure_logging()
    configure_logging("DEBUG")
    assert len(clean_logger.handlers) == 1
    assert clean_logger.level == logging.DEBUG


def test_level_from_environment_then_default(clean_logger, monkeypatch):
    assert configure_logging().level == logging.INFO
    monkeypatch.setenv(LEVEL_ENV, "error")
    assert configure_logging().level == logging.ERROR


def test_unknown_level_is_a_clear_error(clean_logger):
    with pytest.raises(ValueError, match="unknown log level 'loud'"):
        configure_logging("loud")


def test_module_loggers_reach_the_handler(clean_logger, capsys):
    configure_logging("INFO")
    logging.getLogger("raybackfill.backfill.run").info("phase %s", "instant")
    logging.getLogger("raybackfill.backfill.run").debug("not shown")
    err = capsys.readouterr().err
    assert "INFO raybackfill.backfill.run: phase instant" in err and "not shown" not in err


def test_cli_option_sets_the_level_for_workers():
    code = ("import os, sys; from raybackfill.cli.main import main; "
            "main(['--log-level', 'warning', 'version']); print(os.environ['RAYBACKFILL_LOG_LEVEL'])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={k: v for k, v in os.environ.items() if k != LEVEL_ENV}).stdout
    assert out.split() == ["0.1.0", "warning"]
