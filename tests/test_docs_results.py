"""docs/results.md is what docs/make_results.py makes of the reports in docs/results/ (never edited by hand)."""

import importlib.util
import json
import shlex
import sys
from pathlib import Path

DOCS = Path(__file__).resolve().parent.parent / "docs"


def _script():
    spec = importlib.util.spec_from_file_location("make_results", DOCS / "make_results.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_the_results_page_is_regenerated_from_the_kept_reports():
    assert (DOCS / "results.md").read_text() == _script().render(), "run: python docs/make_results.py"


def test_the_readme_table_is_regenerated_from_the_kept_reports():
    script = _script()
    text = script.README.read_text()
    assert script.readme_with_table(text) == text, "run: python docs/make_results.py"


def test_every_documented_main_run_has_its_report():
    script = _script()
    for run in script.MAIN_RUNS:
        assert (script.RESULTS / f"{run.name}.json").exists(), run.name


def test_every_kept_report_is_a_listed_run_with_a_command_that_parses():
    """No report in docs/results/ without the command that made it, and every listed command is a real one."""
    from raybackfill.cli.main import build_parser

    script = _script()
    listed = {run.name: run for run in script.kept_runs()}
    kept = {path.stem for path in script.RESULTS.glob("*.json")}
    assert kept <= set(listed), f"reports with no command listed in docs/make_results.py: {sorted(kept - set(listed))}"
    for name in kept:
        command = listed[name].command
        assert command.startswith("raybackfill demo "), command
        argv = shlex.split(command)[1:]
        build_parser().parse_args(argv)  # a renamed or removed flag exits here
        assert "--seed" in argv, f"{name}: the command must state its seed to be repeatable"


def test_each_kept_report_matches_the_scale_its_command_names():
    """A text report under an image command (or a quick run filed as a full one) fails here."""
    from raybackfill.demo.configs import TEXT_FULL, TEXT_QUICK
    from raybackfill.eval.report import load_report

    script = _script()
    for run in script.kept_runs():
        path = script.RESULTS / f"{run.name}.json"
        if not path.exists():
            continue
        argv = shlex.split(run.command)
        report = load_report(str(path))
        assert ("--text" in argv) == ("text_demo" in report), run.name
        if "--text" in argv:
            scale = TEXT_QUICK if "--quick" in argv else TEXT_FULL
            corpus = report["text_demo"]["corpus"]
            assert (corpus["classes"], corpus["per_class_cap"]) == (scale.classes, scale.per_class), run.name
            assert report["text_demo"]["verdicts"]["uncertainty_vs_random"]["random_orders"] == scale.random_seeds


def test_the_generated_sections_carry_every_kept_adapter_and_text_report():
    """The adapters and text-demo sections are on the page, one per kept report that has one, verdicts included."""
    script = _script()
    page = script.render()
    image = [run for run in script.MAIN_RUNS + script.SEED_RUNS if (script.RESULTS / f"{run.name}.json").exists()]
    with_adapters = [
        run for run in image if "adapters" in json.loads((script.RESULTS / f"{run.name}.json").read_text())
    ]
    assert with_adapters, "no kept image report has an adapters section"
    section = page.split("## Label-free adapters vs transformations trained with labels")[1].split("\n## ")[0]
    for run in with_adapters:
        assert f"### {run.label}\n" in section
    text = [run for run in script.TEXT_RUNS if (script.RESULTS / f"{run.name}.json").exists()]
    assert len(text) == len(script.TEXT_RUNS), "a listed text run has no kept report"
    section = page.split("## The text demo")[1].split("\n## ")[0]
    for run in text:
        report = json.loads((script.RESULTS / f"{run.name}.json").read_text())
        verdicts, queries = report["text_demo"]["verdicts"], report["queries"]["evaluated"]
        row = next(line for line in section.splitlines() if line.startswith(f"| {run.label} | {queries} | "))
        for key in ("new_new_vs_old_old", "best_adapter_vs_old_old", "uncertainty_vs_random"):
            assert verdicts[key]["verdict"] in row, (run.name, key)


def test_every_kept_chain_report_has_its_section_on_the_page():
    script = _script()
    page = script.render()
    for run in script.CHAIN_RUNS:
        path = script.RESULTS / f"{run.name}.json"
        if path.exists():
            chain = json.loads(path.read_text())["chain"]
            assert f"### {run.label}: `{run.command}`" in page
            assert script.chain_table(chain, markdown=True) in page
