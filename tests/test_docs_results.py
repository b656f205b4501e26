"""docs/results.md is what docs/make_results.py makes of the reports in docs/results/ (never edited by hand)."""

import importlib.util
from pathlib import Path

DOCS = Path(__file__).resolve().parent.parent / "docs"


def _script():
    spec = importlib.util.spec_from_file_location("make_results", DOCS / "make_results.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_results_page_is_regenerated_from_the_kept_reports():
    assert (DOCS / "results.md").read_text() == _script().render(), "run: python docs/make_results.py"


def test_every_documented_main_run_has_its_report():
    script = _script()
    for run in script.MAIN_RUNS:
        assert (script.RESULTS / f"{run.name}.json").exists(), run.name
