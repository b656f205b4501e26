"""`raybackfill alias set | show | rm`: a stable name for clients, switched atomically between indexes (blue/green).

Every command that takes ``--name`` (query, status, eval live, serve --http, ...) accepts an alias and follows it;
the library part is raybackfill.index.aliases.
"""

from __future__ import annotations

import argparse
import json

from raybackfill.cli import utc_time
from raybackfill.index.aliases import (
    STATE_TIMEOUT_S,
    Alias,
    IndexState,
    aliases_to,
    get_alias,
    index_state,
    list_aliases,
    remove_alias,
    resolve,
    set_alias,
)


def register(subparsers: argparse._SubParsersAction) -> None:
    alias = subparsers.add_parser(
        "alias",
        help="point a stable name at an index and switch it atomically (blue/green)",
        description="An alias is a name clients use instead of an index name (query/status --name, the HTTP "
        "service's index); `alias set` points it at another index in one atomic write, stored in the cluster's "
        "GCS. Build the new index next to the live one (`raybackfill serve --name index-green ...`), check it, "
        "then switch; `alias set` prints the previous target: setting it back is the rollback.",
    )
    sub = alias.add_subparsers(dest="alias_command", metavar="ACTION", required=True)

    set_ = sub.add_parser(
        "set",
        help="point NAME at INDEX (create or switch); prints the previous target",
        description="Point the alias NAME at the running index INDEX. Refused: an INDEX that does not run (or does "
        "not answer, unless --force), and a NAME that is an index's name (an alias never hides an index).",
    )
    set_.add_argument("alias", metavar="NAME", help="the alias")
    set_.add_argument("index", metavar="INDEX", help="the target index's name (serve --name)")
    set_.add_argument("--force", action="store_true", help="switch even if the target does not answer right now")
    _timeout(set_, "the target")
    set_.set_defaults(func=_set)

    show = sub.add_parser(
        "show",
        help="list the aliases (or one) with their target's phase and health",
        description="Each alias with its target index, the target's health (ok, unavailable, missing), phase and "
        "item count, and the previous target (the rollback).",
    )
    show.add_argument("alias", metavar="NAME", nargs="?", help="one alias (default: all)")
    show.add_argument("--json", action="store_true", help="print JSON instead of a table")
    _timeout(show, "each target")
    show.set_defaults(func=_show)

    rm = sub.add_parser("rm", help="remove an alias (its index keeps running)", description="Remove the alias NAME.")
    rm.add_argument("alias", metavar="NAME", help="the alias")
    rm.set_defaults(func=_rm)


def _timeout(parser: argparse.ArgumentParser, who: str) -> None:
    parser.add_argument(
        "--timeout", type=float, default=STATE_TIMEOUT_S, help=f"seconds {who} may take to answer ({STATE_TIMEOUT_S:g})"
    )


def _spaces(state: IndexState) -> str:
    parts = [f"{space} {held['version']} (dim {held['dim']})" for space, held in _held(state)]
    return ", ".join(parts) or "no vectors"


def _held(state: IndexState) -> list[tuple[str, dict]]:
    return [(space, held) for space, held in (("old", state.old_space), ("new", state.new_space)) if held]


def _summary(state: IndexState) -> str:
    if state.items is None:
        return f"{state.health}: {state.error}"
    return f"phase {state.phase}, {state.items:,} items, {_spaces(state)}"


def _set(args: argparse.Namespace) -> int:
    record = set_alias(args.alias, args.index, force=args.force, timeout_s=args.timeout)
    state = index_state(record.index, args.timeout)
    print(f"alias {record.name}: {record.previous or '(new)'} -> {record.index} ({_summary(state)})")
    if record.previous and record.previous != record.index:
        back = f"raybackfill alias set {record.name} {record.previous}"
        print(f"previous target: {record.previous}; to switch back: {back}")
        before = index_state(record.previous, args.timeout)
        if before.items is not None and state.items is not None and _held(before) != _held(state):
            print(
                f"note: {record.index} holds {_spaces(state)}, {record.previous} held {_spaces(before)}: a service "
                "whose encoders match the previous index refuses raw queries (409) until it runs matching encoders"
            )
    return 0


def _when(seconds: float) -> str:
    return utc_time(seconds) if seconds else "-"


def _show(args: argparse.Namespace) -> int:
    if args.alias:
        record = get_alias(args.alias)
        if record is None:
            raise ValueError(f"no alias named {args.alias!r} (`raybackfill alias show` lists them)")
        records: list[Alias] = [record]
    else:
        records = list_aliases()
    rows = [(a, index_state(a.index, args.timeout)) for a in records]
    if args.json:
        out = [
            {"alias": a.name, "index": a.index, "previous": a.previous, "updated_at": a.updated_at, **_state_json(s)}
            for a, s in rows
        ]
        print(json.dumps(out))
        return 0
    if not rows:
        print("no aliases (create one with `raybackfill alias set NAME INDEX`)")
        return 0
    header = ("alias", "index", "health", "phase", "items", "previous", "updated")
    table = [header] + [
        (
            a.name,
            a.index,
            str(s.health),
            str(s.phase or "-"),
            f"{s.items:,}" if s.items is not None else "-",
            a.previous or "-",
            _when(a.updated_at),
        )
        for a, s in rows
    ]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    for row in table:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
    for a, s in rows:
        if s.error:
            print(f"{a.name}: {a.index} is {s.health}: {s.error}")
    return 0


def _state_json(state: IndexState) -> dict:
    out = state.as_dict()
    out.pop("name")
    return out


def _rm(args: argparse.Namespace) -> int:
    record = remove_alias(args.alias)
    print(f"removed alias {record.name} (it pointed to {record.index}, which keeps running)")
    return 0


# ------------------------------------------------------------------------- used by the other index commands
def say_alias(name: str) -> None:
    """Print which index the alias ``name`` resolves to (nothing for an index name): what a command acts on."""
    resolved = resolve(name)
    if resolved.alias:
        print(f"alias {resolved.alias} -> index {resolved.index}")


def check_stop(name: str, force: bool) -> None:
    """`stop` takes an index's own name, and refuses (without ``force``) an index that aliases still point to."""
    resolved = resolve(name)
    if resolved.alias:
        raise ValueError(
            f"{name!r} is an alias (-> index {resolved.index!r}); stop an index by its own name: "
            f"`raybackfill stop --name {resolved.index}`"
        )
    pointing = aliases_to(name)
    if pointing and not force:
        raise ValueError(
            f"alias(es) {', '.join(pointing)} point to index {name!r}: their clients would fail; switch them first "
            "(`raybackfill alias set ALIAS OTHER-INDEX` or `raybackfill alias rm ALIAS`), or stop with --force"
        )
