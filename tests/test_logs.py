"""Logging: one handler on the package logger, the level from the argument, the environment or INFO."""

import logging
import os
import subprocess
import sys

import pytest

from raybackfill.logs import LEVEL_ENV, LOGGER, configure_logging


def run_python(code: str, **env: str) -> subprocess.CompletedProcess:
    """A fresh interpreter: its root logger has no handler (unlike this one under pytest)."""
    clean = {k: v for k, v in os.environ.items() if k != LEVEL_ENV} | env
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=clean)


def test_idempotent_one_handler_and_the_level():
    out = run_python(
        "import logging; from raybackfill.logs import configure_logging as c; c(); log = c('DEBUG'); "
        "print(len(log.handlers), log.level == logging.DEBUG)"
    ).stdout
    assert out.split() == ["1", "True"]


def test_level_from_environment_then_default():
    code = "from raybackfill.logs import configure_logging; print(configure_logging().level)"
    assert run_python(code).stdout.strip() == str(logging.INFO)
    assert run_python(code, **{LEVEL_ENV: "error"}).stdout.strip() == str(logging.ERROR)


def test_unknown_level_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown log level 'loud'"):
        configure_logging("loud")


def test_module_loggers_reach_stderr():
    code = (
        "import logging; from raybackfill.logs import configure_logging; configure_logging('INFO'); "
        "log = logging.getLogger('raybackfill.backfill.run'); log.info('phase %s', 'instant'); log.debug('hidden')"
    )
    err = run_python(code).stderr
    assert "INFO raybackfill.backfill.run: phase instant" in err and "hidden" not in err


def test_cli_option_sets_the_level_for_workers():
    code = (
        "import os, sys; from raybackfill.cli.main import main; "
        "main(['--log-level', 'warning', 'version']); print(os.environ['RAYBACKFILL_LOG_LEVEL'])"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        env={k: v for k, v in os.environ.items() if k != LEVEL_ENV},
    ).stdout
    assert out.split() == ["0.1.0", "warning"]


def test_an_application_that_configured_logging_keeps_its_handlers(caplog):
    logger = logging.getLogger(LOGGER)
    saved = (logger.handlers[:], logger.level)
    logger.handlers.clear()
    try:
        configure_logging("INFO")
        assert logger.handlers == []  # the root logger (here pytest's capture) shows our records
        logging.getLogger("raybackfill.embed.pipeline").info("rows written")
        assert [r.getMessage() for r in caplog.records if r.name.startswith(LOGGER)] == ["rows written"]
    finally:
        logger.handlers[:], logger.level = saved
