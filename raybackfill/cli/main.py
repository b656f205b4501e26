"""Entry point of the `raybackfill` command. Each area registers its subcommands from its own module.

Only the module of the command being run is imported: the others pull in torch and Ray, which take
seconds to import, and `raybackfill data synth` or `raybackfill --help` should not pay for them.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from raybackfill import __version__
from raybackfill.logs import LEVEL_ENV, configure_logging

# command -> (module under raybackfill.cli that registers it, one-line help for the top-level listing)
COMMANDS: dict[str, tuple[str, str]] = {
    "data": ("data", "make, import, split and inspect datasets"),
    "train": ("train", "train backbones, side-information, transformations and psi on Ray Train"),
    "sample": ("sample", "embed N gallery items with the old and the new encoder: pairs to fit adapters on"),
    "embed": ("embed", "embed a gallery table (images or texts) with an encoder (Ray Data actor pool)"),
    "encoder": ("encoder", "register a model made elsewhere (TorchScript, torch.export, torchvision, entrypoint)"),
    "serve": ("index", "start the serving index over a table of old embeddings"),
    "query": ("index", "top-k of the serving index for an item, a vector or an image"),
    "status": ("index", "backfill progress of the serving index"),
    "snapshot": ("index", "snapshot every shard now (a restart point)"),
    "promote": ("lifecycle", "make the upgrade the serving generation (every item must be in it)"),
    "rollback": ("lifecycle", "undo the last lifecycle step: the upgrade under way, else the last promote"),
    "gc": ("lifecycle", "free the generation the last promote replaced"),
    "export": ("lifecycle", "write a generation of the index as an embedding table"),
    "stop": ("lifecycle", "kill the index router and its shards"),
    "alias": ("alias", "point a stable name at an index and switch it atomically (blue/green)"),
    "backfill": ("backfill", "backfill a live index with a new model"),
    "transform": ("transform", "map an embedding table through a trained transformation (FCT/FastFill h, or psi)"),
    "eval": ("eval", "evaluate an upgrade: backfill curves, reports, live index quality"),
    "demo": ("demo", "train every method on built-in data and write report.json, report.md and the plots"),
    "bench": ("bench", "run the benchmark suite and write results JSON"),
}


def build_parser(command: str | None = None, *, complete: bool = True) -> argparse.ArgumentParser:
    """The full parser (``complete``), or one where only ``command``'s module is imported."""
    parser = argparse.ArgumentParser(
        prog="raybackfill",
        description="Upgrade the embedding model of a retrieval service without downtime, on Ray.",
    )
    parser.add_argument(
        "--log-level",
        default=None,
        metavar="LEVEL",
        help=f"DEBUG, INFO (default), WARNING or ERROR, for this process and its Ray workers (or set ${LEVEL_ENV})",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    version = sub.add_parser("version", help="print the raybackfill version")
    version.set_defaults(func=lambda args: print(__version__))
    if complete:
        modules = {module for module, _ in COMMANDS.values()}
    else:
        modules = {COMMANDS[command][0]} if command in COMMANDS else set()
    for module in dict.fromkeys(module for module, _ in COMMANDS.values()):
        if module in modules:
            importlib.import_module(f"raybackfill.cli.{module}").register(sub)
    for name, (module, help_text) in COMMANDS.items():
        if module not in modules:
            sub.add_parser(name, help=help_text, add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    command = next((a for a in argv if a in COMMANDS), None)  # the first word that names a command
    args = build_parser(command, complete=False).parse_args(argv)
    try:
        if args.log_level:
            os.environ[LEVEL_ENV] = args.log_level  # workers started from here inherit it
        configure_logging()
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
