"""`raybackfill demo` arguments map onto the library's DemoConfig (the run itself: test_demo_pipeline.py)."""

import argparse

import pytest

from raybackfill.cli.demo import DEFAULT_OUT, config_from_args, register
from raybackfill.demo.configs import FULL, QUICK, TEXT_FULL, TEXT_QUICK


def _parse(argv):
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command"))
    return parser.parse_args(["demo", *argv])


def test_defaults_run_the_full_demo_on_built_in_data():
    config = config_from_args(_parse([]))
    expected = (DEFAULT_OUT, False, None, "half", 0, "cosine", False)
    got = (config.out, config.quick, config.data, config.old_classes, config.seed, config.metric, config.diagnostics)
    assert got == expected
    assert config.resolved_scale() == FULL


def test_flags_reach_the_config():
    args = _parse(["--out", "o", "--quick", "--data", "s3://b/t", "--old-classes", "0-9", "--seed", "7",
                   "--metric", "l2", "--diagnostics"])  # fmt: skip
    config = config_from_args(args)
    assert (config.out, config.quick, config.data, config.old_classes, config.seed) == ("o", True, "s3://b/t", "0-9", 7)
    assert (config.metric, config.diagnostics) == ("l2", True)
    assert config.resolved_scale() == QUICK


def test_a_bad_seed_or_metric_is_refused_by_the_parser():
    with pytest.raises(SystemExit):
        _parse(["--seed", "x"])
    with pytest.raises(SystemExit):
        _parse(["--metric", "ip"])


def test_text_selects_the_text_demo_and_its_scale():
    args = _parse(["--text", "--quick", "--out", "t"])
    assert args.text
    config = config_from_args(args)
    assert config.resolved_text_scale() == TEXT_QUICK
    assert config_from_args(_parse(["--text"])).resolved_text_scale() == TEXT_FULL
    assert not _parse([]).text


def test_chain_flags_reach_the_config_and_a_bad_fraction_is_refused():
    config = config_from_args(_parse(["--chain", "--chain-v2-fraction", "0.25"]))
    assert (config.chain, config.chain_v2_fraction) == (True, 0.25)
    assert (config_from_args(_parse([])).chain, config_from_args(_parse([])).chain_v2_fraction) == (False, 0.5)
    with pytest.raises(ValueError, match="chain_v2_fraction"):
        config_from_args(_parse(["--chain", "--chain-v2-fraction", "1.5"]))


def test_text_demo_refuses_the_chain_before_starting_anything(tmp_path):
    args = _parse(["--text", "--chain", "--out", str(tmp_path / "t")])
    with pytest.raises(ValueError, match="--chain"):
        args.func(args)
    assert not (tmp_path / "t").exists()
