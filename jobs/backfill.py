"""Entry point for `ray job submit --working-dir . -- python jobs/backfill.py ARGS` (same ARGS as
`raybackfill backfill`): the job attaches to its cluster through RAY_ADDRESS, set by the job server."""

from __future__ import annotations

import argparse
import sys

from raybackfill.cli.backfill import DESCRIPTION, add_arguments, run

if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="jobs/backfill.py", description=DESCRIPTION)
    add_arguments(parser)
    sys.exit(run(parser.parse_args()))
