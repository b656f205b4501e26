"""deploy/Dockerfile and .dockerignore: what the build context holds, and that the image matches the cluster.

The context is computed with the Docker SDK for Python (``docker.utils.build.exclude_paths``: its port of
Docker's own .dockerignore matcher, what ``docker.APIClient.build`` sends), over a checkout after a local
demo run and over this repository itself. No Docker daemon is needed.
"""

from __future__ import annotations

import re
import subprocess
import tomllib
from pathlib import Path

import pytest
import yaml
from docker.utils.build import exclude_paths

REPO = Path(__file__).resolve().parents[1]
DOCKERFILE = REPO / "deploy" / "Dockerfile"

# A checkout after a local demo run: (path, whether the image's build context must hold it).
TREE = {
    ".venv/lib/python3.11/site-packages/ray/__init__.py": False,
    ".venv/bin/python": False,
    ".git/HEAD": False,
    ".git/objects/ab/cdef": False,
    ".pytest_cache/v/cache/nodeids": False,
    ".ruff_cache/0.6/x": False,
    ".mypy_cache/3.11/raybackfill/types.data.json": False,
    "demo-out/report.md": False,
    "demo-quick/plots/curve.png": False,
    "raybackfill-demo/models/new/model.json": False,
    "data/synth/part-00000.parquet": False,
    "runs/backbone/checkpoint_000001/state.pt": False,
    "snapshots/v1/shard-000/meta.json": False,
    "results-quick.json": False,
    "raybackfill.egg-info/PKG-INFO": False,
    "raybackfill/index/__pycache__/router.cpython-311.pyc": False,
    "tests/test_index_router.py": False,
    "docs/operations.md": False,
    "benchmarks/run.py": False,
    ".ci/run": False,
    "cluster.yaml": False,
    "CHANGELOG.md": False,
    "some-new-output/table.parquet": False,  # an allowlist: what nobody listed stays out too
    "deploy/kubernetes/raycluster.yaml": False,
    "raybackfill/__init__.py": True,
    "raybackfill/py.typed": True,
    "raybackfill/data/storage.py": True,  # `data` is ./data only: the package's data/ goes in
    "raybackfill/index/router.py": True,
    "jobs/backfill.py": True,
    "pyproject.toml": True,
    "README.md": True,
    "LICENSE": True,
}


def _patterns() -> list[str]:
    """.dockerignore as Docker reads it: stripped lines, no blanks, no comments."""
    lines = [line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()]
    return [line for line in lines if line and not line.startswith("#")]


def _context_files(root: Path) -> set[str]:
    kept = exclude_paths(str(root), _patterns(), dockerfile="deploy/Dockerfile")
    return {path for path in kept if (root / path).is_file()}


def test_the_context_holds_the_package_and_not_the_venv_git_caches_or_outputs(tmp_path):
    _tree(tmp_path)
    (tmp_path / ".dockerignore").write_text("unused: the patterns come from the repository's file")
    context = _context_files(tmp_path)
    expected = {path for path, kept in TREE.items() if kept}
    assert context - {".dockerignore"} == expected


def test_the_context_of_this_repository_is_what_the_dockerfile_copies():
    context = _context_files(REPO)
    tracked = set(subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True).stdout.split())
    package = {p for p in tracked if p.startswith(("raybackfill/", "jobs/"))}
    assert package and package <= context  # every tracked file of the package and the jobs goes in
    assert {"pyproject.toml", "README.md", "LICENSE"} <= context
    outside = {p for p in context if not p.startswith(("raybackfill/", "jobs/"))}
    assert outside <= {"pyproject.toml", "README.md", "LICENSE", ".dockerignore", "deploy/Dockerfile"}, outside


def _instructions() -> list[tuple[str, str]]:
    text = re.sub(r"\\\n\s*", " ", DOCKERFILE.read_text())  # join continuation lines
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in lines]


def test_every_copy_source_exists_and_is_in_the_context():
    context = _context_files(REPO)
    copies = [args for op, args in _instructions() if op == "COPY"]
    assert copies
    for args in copies:
        sources = [word for word in args.split() if not word.startswith("--")][:-1]
        for source in sources:
            assert (REPO / source).exists(), source
            assert any(p == source or p.startswith(source + "/") for p in context), f"{source} is ignored"


def test_the_image_is_the_clusters_ray_image_with_the_gpu_faiss_of_the_gpu_extra():
    instructions = _instructions()
    arg = next(args for op, args in instructions if op == "ARG" and args.startswith("RAY_IMAGE="))
    image = arg.split("=", 1)[1]
    assert ("FROM", "${RAY_IMAGE}") in instructions
    assert image == yaml.safe_load((REPO / "cluster.yaml").read_text())["docker"]["image"]
    assert image.startswith("rayproject/ray:2.60.") and "py311" in image and image.endswith("-gpu")
    gpu_extra = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]["gpu"]
    run = " ".join(args for op, args in instructions if op == "RUN")
    assert "'.[gpu]'" in run and "pip uninstall -y faiss-cpu" in run
    for requirement in gpu_extra:
        assert f"'{requirement}'" in run  # the same faiss-gpu pin as the extra


def _tree(root: Path) -> None:
    for path in TREE:
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_text("x")


@pytest.mark.parametrize("dropped", [("*",), ("**/__pycache__", "**/*.pyc")])
def test_without_its_exclusions_files_that_must_stay_out_get_in(tmp_path, dropped):
    """The checks above can fail: drop an exclusion and files that must stay out enter the context."""
    _tree(tmp_path)
    patterns = [p for p in _patterns() if p not in dropped]
    assert len(patterns) == len(_patterns()) - len(dropped)
    kept = exclude_paths(str(tmp_path), patterns, dockerfile="deploy/Dockerfile")
    assert {p for p, keep in TREE.items() if not keep and p in kept}


def test_without_its_allowlist_entry_the_package_stays_out(tmp_path):
    _tree(tmp_path)
    patterns = [p for p in _patterns() if p != "!raybackfill"]
    kept = exclude_paths(str(tmp_path), patterns, dockerfile="deploy/Dockerfile")
    assert not any(p.startswith("raybackfill/") for p in kept)
