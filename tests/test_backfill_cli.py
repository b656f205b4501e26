"""The backfill's arguments and configuration checks (no Ray needed: they fail before anything runs)."""

from __future__ import annotations

import argparse

import numpy as np
import pytest

from raybackfill.backfill.ledger import Ledger, batch_name
from raybackfill.backfill.run import BackfillConfig, backfill_limit
from raybackfill.cli.backfill import add_arguments, register
from raybackfill.data.schema import embedding_table

REQUIRED = ["--gallery", "g", "--old-embeddings", "o", "--upgrade", "m", "--method", "bct", "--out", "x"]


def _parse(*extra: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args([*REQUIRED, *extra])


def test_arguments_default_to_the_running_index_and_a_full_backfill():
    args = _parse()
    assert args.index == "raybackfill-router" and not args.no_index
    assert args.budget is None and args.until is None and args.policy == "uncertainty"


@pytest.mark.parametrize("extra", [("--budget", "3", "--until", "0.5"), ("--index", "a", "--no-index")])
def test_mutually_exclusive_arguments_are_refused(extra, capsys):
    with pytest.raises(SystemExit):
        _parse(*extra)
    assert "not allowed with argument" in capsys.readouterr().err


def test_the_subcommand_registers_under_backfill():
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["backfill", *REQUIRED, "--policy", "id", "--no-index"])
    assert args.command == "backfill" and args.no_index and callable(args.func)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"method": "fastfill", "policy": "id"}, "pass --transformation"),
        ({"method": "bct", "policy": "uncertainty"}, "needs the FastFill transformation"),
        ({"method": "bct", "policy": "entropy"}, "needs the old model's classifier"),
        ({"method": "bct", "policy": "id", "budget": 3, "until": 0.5}, "not both"),
        ({"method": "bct", "policy": "id", "until": 1.5}, "fraction"),
        ({"method": "bct", "policy": "id", "max_bad_fraction": -0.1}, "max_bad_fraction"),
        ({"method": "bct", "policy": "nope"}, "unknown policy"),
        ({"method": "nope", "policy": "id"}, "unknown method"),
    ],
)
def test_inconsistent_configurations_are_refused_before_anything_runs(kwargs, message):
    with pytest.raises(ValueError, match=message):
        BackfillConfig(gallery="g", old_embeddings="o", upgrade="m", out="x", **kwargs)


def test_batch_names_depend_only_on_the_set_of_ids():
    assert batch_name(np.array([3, 1, 2])) == batch_name(np.array([1, 2, 3]))
    assert batch_name(np.array([1, 2])) != batch_name(np.array([1, 2, 3]))


def test_ledger_writes_a_batch_once_and_reads_back_its_ids(tmp_path):
    ledger = Ledger(str(tmp_path))
    table = embedding_table(np.array([4, 2]), np.ones((2, 3), np.float32), model="v")
    first = ledger.write(ledger.tier_uri(0), table)
    assert ledger.write(ledger.tier_uri(0), table) == first  # a retried batch is a no-op
    ledger.write(ledger.tier_uri(1), embedding_table(np.array([7]), np.ones((1, 3), np.float32), model="v"))
    assert sorted(ledger.ids(ledger.new_uri)) == [2, 4, 7]
    assert ledger.files(ledger.new_uri)[0] == first  # oldest first
    assert len(ledger.ids(ledger.transformed_uri)) == 0 and len(ledger.quarantined(("decode",))) == 0


@pytest.mark.parametrize(
    ("stop", "done", "expected"),
    [({}, 5, 16), ({"budget": 3}, 5, 3), ({"until": 0.5}, 3, 5), ({"until": 0.5}, 9, 0), ({"until": 0.1}, 0, 2)],
)
def test_budget_counts_this_run_and_until_counts_the_whole_gallery(stop, done, expected):
    config = BackfillConfig(gallery="g", old_embeddings="o", upgrade="m", out="x", method="bct", policy="id", **stop)
    assert backfill_limit(config, total=16, done=done) == expected
