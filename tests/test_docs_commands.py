"""Every `raybackfill ...` command in the README and docs/*.md, and every `python jobs/X.py ...` job they
submit, parses with the real command line: a renamed or removed flag fails here, not in a newcomer's shell.
(Parsing only: nothing runs.)"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from raybackfill.cli.main import build_parser

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"```bash\n(.*?)```", re.S)
# jobs/<name>.py takes the arguments of this raybackfill command
JOBS = {
    "prepare_data": "data",
    "train": "train",
    "embed": "embed",
    "serve": "serve",
    "backfill": "backfill",
    "evaluate": "eval run",
}
JOB = re.compile(r"python jobs/(\w+)\.py (.*)")


def commands(page: Path) -> list[str]:
    """The raybackfill commands of a page's bash blocks, continuation lines joined, comments dropped."""
    found = []
    for block in FENCE.findall(page.read_text()):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split("   #")[0].split("  #")[0].strip()
            if "..." in line:
                continue
            for prefix in (".venv/bin/raybackfill ", "raybackfill "):
                if line.startswith(prefix):
                    found.append(line[len(prefix) :])
            job = JOB.search(line)
            if job:
                found.append(f"{JOBS[job.group(1)]} {job.group(2)}")
    return found


CASES = [(page.relative_to(ROOT).as_posix(), command) for page in PAGES for command in commands(page)]


def test_the_pages_have_commands_to_check():
    assert sum(page == "README.md" for page, _ in CASES) >= 20


@pytest.mark.parametrize(("page", "command"), CASES, ids=[f"{p}: {c[:60]}" for p, c in CASES])
def test_a_documented_command_parses(page, command):
    argv = shlex.split(command)
    try:
        build_parser().parse_args(argv)
    except SystemExit as exit_:
        pytest.fail(f"{page}: `raybackfill {command}` does not parse (exit {exit_.code})")
