"""`raybackfill bench`: the benchmark suite (benchmarks/run.py) from the CLI.

The suite lives in the repository's ``benchmarks/`` package, next to ``raybackfill/``, not inside the
library, so it is not installed. Like ``python -m benchmarks.run``, the command finds it in the current
directory: run it from the root of a source checkout. Elsewhere it says so instead of failing on arguments.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from types import ModuleType

DESCRIPTION = (
    "Run every side-by-side benchmark (the project's path and its bare baseline in one process): embedding "
    "pipeline vs bare torch, transform vs re-embed, merged query vs bare FAISS, p99 latency during a backfill "
    "vs idle, a 1M-item backfill through the transform path (time, items/s, peak memory of all Ray processes) "
    "and growth from 100k to 1M items. Writes one JSON file. Run from the root of a source checkout (benchmarks/)."
)


def register(subparsers: argparse._SubParsersAction) -> None:
    suite = _find_suite()
    # Without the suite its options are unknown: then every argument is taken as a plain word ("+" is never
    # an option prefix here), so the run reaches _unavailable's message instead of an argparse error.
    parser = subparsers.add_parser(
        "bench",
        help="run the benchmark suite and write results JSON",
        description=DESCRIPTION,
        prefix_chars="-" if suite else "+",
    )
    if suite is None:
        parser.add_argument("suite_args", nargs="*")
        parser.set_defaults(func=_unavailable)
        return
    suite.add_arguments(parser)
    parser.set_defaults(func=lambda args: suite.run(args) and 0)


def _find_suite() -> ModuleType | None:
    """benchmarks.run from the import path, else from a checkout in the current directory."""
    checkout = Path.cwd()
    if not _importable("benchmarks") and (checkout / "benchmarks" / "run.py").is_file():
        sys.path.insert(0, str(checkout))
    if not _importable("benchmarks"):
        return None
    from benchmarks import run

    return run


def _importable(name: str) -> bool:
    from importlib.util import find_spec

    return find_spec(name) is not None


def _unavailable(args: argparse.Namespace) -> int:
    raise OSError(
        f"the benchmark suite is the repository's benchmarks/ package, not installed with raybackfill; "
        f"run this command from the root of a source checkout (no benchmarks/run.py in {Path.cwd()})"
    )
