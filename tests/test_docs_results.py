"""docs/results.md is what docs/make_results.py makes of the reports in docs/results/ (never edited by hand)."""

import importlib.util
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
