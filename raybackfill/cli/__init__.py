"""The `raybackfill` command line: each subcommand parses arguments and calls one library function."""

from datetime import UTC, datetime


def utc_time(seconds: float) -> str:
    """A Unix time as the CLI prints it: ``2026-12-04 21:15:29 UTC``."""
    return datetime.fromtimestamp(seconds, tz=UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
