"""The command line: every subcommand has --help, and the train/embed commands drive the library."""

import argparse

import pytest

from raybackfill import __version__
from raybackfill.cli.main import build_parser, main
from raybackfill.data import storage


def _commands(parser: argparse.ArgumentParser, prefix=()):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield (*prefix, name)
                yield from _commands(sub, (*prefix, name))


def test_every_subcommand_has_help(capsys):
    commands = list(_commands(build_parser()))
    assert {("data", "synth"), ("train", "backbone"), ("embed",), ("query",), ("status",)} <= set(commands)
    for command in commands:
        with pytest.raises(SystemExit) as exit_info:
            main([*command, "--help"])
        assert exit_info.value.code == 0, command
        assert "usage: raybackfill" in capsys.readouterr().out


def test_version(capsys):
    assert main(["version"]) == 0
    assert capsys.readouterr().out.strip() == __version__


def test_library_errors_are_one_line_messages_not_tracebacks(ray_cluster, tmp_path, capsys):
    assert main(["embed", "--gallery", str(tmp_path / "missing"), "--model", "m", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "raybackfill embed: error:" in err and "Traceback" not in err


def test_train_then_embed_from_the_command_line(ray_cluster, tmp_path, capsys):
    images, model, out = str(tmp_path / "images"), str(tmp_path / "m-v1"), str(tmp_path / "emb")
    assert main(["data", "synth", "--out", images, "--classes", "3", "--per-class", "4", "--size", "16"]) == 0
    train = ["train", "backbone", "--images", images, "--out", model, "--workers", "0", "--epochs", "1"]
    assert main([*train, "--storage", str(tmp_path / "runs"), "--embedding-dim", "16", "--no-augment"]) == 0
    assert "wrote small_cnn model 'm-v1'" in capsys.readouterr().out
    assert main(["embed", "--gallery", images, "--model", model, "--out", out]) == 0
    table = storage.read_table(out)
    assert table.num_rows == 12 and table.schema.field("embedding").type.list_size == 16
    assert set(table.column("model").to_pylist()) == {"m-v1"}


def test_the_lazy_command_table_lists_exactly_the_registered_commands():
    from raybackfill.cli.main import COMMANDS

    registered = {command[0] for command in _commands(build_parser()) if len(command) == 1}
    assert registered == {*COMMANDS, "version"}
    for name, (module, _) in COMMANDS.items():
        lazy = {c[0] for c in _commands(build_parser(name, complete=False)) if len(c) > 1}
        assert name in lazy or not any(c[0] == name and len(c) > 1 for c in _commands(build_parser())), module
