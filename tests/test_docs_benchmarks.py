"""docs/benchmarks.md is what docs/make_benchmarks.py makes of the results in docs/benchmarks/ (never edited by
hand), and it covers every key the suite writes."""

import importlib.util
import sys
from pathlib import Path

from benchmarks.run import TARGETS

DOCS = Path(__file__).resolve().parent.parent / "docs"


def _script():
    spec = importlib.util.spec_from_file_location("make_benchmarks", DOCS / "make_benchmarks.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_the_benchmarks_page_is_regenerated_from_the_kept_results():
    assert (DOCS / "benchmarks.md").read_text() == _script().render(), "run: python docs/make_benchmarks.py"


def test_the_page_has_a_row_for_every_key_of_the_suite_with_its_target():
    script = _script()
    latest = script.load_runs()[-1]
    assert set(TARGETS) <= set(script.KEYS), "describe the new key in docs/make_benchmarks.py KEYS"
    page = script.render()
    for key in script.KEYS:
        row = next(line for line in page.splitlines() if line.startswith(f"| `{key}` |"))
        assert latest["targets"].get(key, "-") in row.replace("\\|", "|")


def test_the_page_states_the_machine_and_load_of_the_run_it_shows():
    script = _script()
    latest = script.load_runs()[-1]
    page = script.render()
    assert f"{latest['machine']['loadavg_start'][0]:.1f}" in page
    assert f"{latest['machine']['cpus']} cores" in page and latest["machine"]["faiss"] in page
