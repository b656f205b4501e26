"""The backfill's arguments and configuration checks (no Ray needed: they fail before anything runs)."""

from __future__ import annotations

import argparse

import pytest

from raybackfill.backfill.run import BackfillConfig, backfill_limit
from raybackfill.cli.backfill import add_arguments, register

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


def test_max_rate_reaches_the_config(monkeypatch):
    from raybackfill.cli import backfill as cli

    seen = {}
    monkeypatch.setattr("raybackfill.runtime.init_ray", lambda *a, **k: None)
    monkeypatch.setattr("raybackfill.backfill.run.run_backfill", lambda config: seen.setdefault("config", config))
    monkeypatch.setattr("raybackfill.backfill.run.summary_table", lambda summary: "")
    cli.run(_parse("--policy", "id", "--no-index", "--max-rate", "250", "--train-sample", "5000"))
    assert seen["config"].max_rate == 250.0 and seen["config"].train_sample == 5000
    assert _parse().max_rate is None and _parse().train_sample == 100_000


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
        ({"method": "bct", "policy": "id", "max_rate": 0}, "max_rate"),
        ({"method": "bct", "policy": "id", "train_sample": 0}, "train_sample"),
        ({"method": "bct", "policy": "nope"}, "unknown policy"),
        ({"method": "nope", "policy": "id"}, "unknown method"),
    ],
)
def test_inconsistent_configurations_are_refused_before_anything_runs(kwargs, message):
    with pytest.raises(ValueError, match=message):
        BackfillConfig(gallery="g", old_embeddings="o", upgrade="m", out="x", **kwargs)


@pytest.mark.parametrize(
    ("stop", "done", "expected"),
    [({}, 5, 16), ({"budget": 3}, 5, 3), ({"until": 0.5}, 3, 5), ({"until": 0.5}, 9, 0), ({"until": 0.1}, 0, 2)],
)
def test_budget_counts_this_run_and_until_counts_the_whole_gallery(stop, done, expected):
    config = BackfillConfig(gallery="g", old_embeddings="o", upgrade="m", out="x", method="bct", policy="id", **stop)
    assert backfill_limit(config, total=16, done=done) == expected
