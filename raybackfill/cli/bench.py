"""`raybackfill bench`: the benchmark suite (benchmarks/run.py) from the CLI.

The suite lives in the repository's ``benchmarks/`` package, next to ``raybackfill/``, not inside the
library: the command works from a source checkout (where ``benchmarks`` is importable) and says so elsewhere.
"""

from __future__ import annotations

import argparse

DESCRIPTION = (
    "Run every side-by-side benchmark (the project's path and its bare baseline in one process): embedding "
    "pipeline vs bare torch, transform vs re-embed, merged query vs bare FAISS, p99 latency during a backfill "
    "vs idle, a 1M-item backfill through the transform path (time, items/s, peak memory of all Ray processes) "
    "and growth from 100k to 1M items. Writes one JSON file. Needs a source checkout (benchmarks/)."
)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("bench", help="run the benchmark suite and write results JSON",
                                   description=DESCRIPTION)
    try:
        from benchmarks import run as suite
    except ModuleNotFoundError as err:
        if err.name != "benchmarks":
            raise
        missing = str(err)
        parser.set_defaults(func=lambda args: _unavailable(missing))
        return
    suite.add_arguments(parser)
    parser.set_defaults(func=lambda args: suite.run(args) and 0)


def _unavailable(reason: str) -> int:
    raise OSError(f"the benchmark suite is in the repository's benchmarks/ package; run from a checkout ({reason})")
