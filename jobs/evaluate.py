"""Offline evaluation as a Ray job: the flags of `raybackfill eval run`.

    ray job submit --working-dir . -- python jobs/evaluate.py --queries-old ... --out s3://bucket/eval/run1

The evaluation itself is numpy on the node running the job's driver; this file only parses and calls.
"""

from __future__ import annotations

import argparse
import sys

from raybackfill.cli.eval import add_run_arguments, run_command


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="jobs/evaluate.py",
        description="Backfill curves of one method on embedding tables; writes report.json, the PNG and report.md.",
    )
    add_run_arguments(parser)
    return run_command(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
