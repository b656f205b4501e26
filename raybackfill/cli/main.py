"""Entry point of the `raybackfill` command. Each area registers its subcommands from its own module."""

from __future__ import annotations

import argparse
import importlib
import sys

from raybackfill import __version__

# Modules under raybackfill.cli that define `register(subparsers)`; each added parser sets `func`.
COMMAND_MODULES = ("data", "train", "index", "eval", "backfill", "demo")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="raybackfill",
        description="Upgrade the embedding model of a retrieval service without downtime, on Ray.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    version = sub.add_parser("version", help="print the raybackfill version")
    version.set_defaults(func=lambda args: print(__version__))
    for name in COMMAND_MODULES:
        importlib.import_module(f"raybackfill.cli.{name}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        result = args.func(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (ValueError, OSError) as err:
        # Library errors carry a message naming the file/column/item: show it, not a traceback.
        print(f"raybackfill {args.command}: error: {err}", file=sys.stderr)
        return 2
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
