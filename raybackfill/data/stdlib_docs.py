"""A real labelled text corpus that ships with every Python: the docstrings of the standard library.

Each document is the docstring of one function, method or class of a standard-library module or package, and
its class is that module or package (``asyncio``, ``email``, ``logging``, ...): telling a coroutine's docstring
from a MIME header's or a log handler's is a real topic task, and needs no download. The sources are parsed
with :mod:`ast`, never imported, so reading them runs no code. Which docstrings exist depends on the Python
version; the table records it in its schema metadata, next to the class names.
"""

from __future__ import annotations

import ast
import logging
import sys
import sysconfig
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa

from raybackfill.data.info import with_class_names
from raybackfill.data.schema import text_table

logger = logging.getLogger(__name__)

# Modules and packages with many documented definitions (largest first on CPython 3.11), none of them
# deprecated; the first ``classes`` of them are the corpus's classes.
STDLIB_PACKAGES = (
    "asyncio", "importlib", "email", "logging", "xml", "unittest", "turtle", "multiprocessing", "http",
    "urllib", "tarfile", "inspect", "ipaddress", "typing", "pydoc", "pathlib", "threading", "doctest",
    "imaplib", "wsgiref", "datetime", "enum", "collections", "mailbox",
)  # fmt: skip
MIN_CHARS = 40  # shorter docstrings ("Return self.") say nothing of their module
MAX_CHARS = 2000
PYTHON_KEY = b"raybackfill.python"


def module_files(name: str, root: Path | None = None) -> list[Path]:
    """The source files of standard-library module or package ``name`` (a package's tests left out)."""
    root = root or Path(sysconfig.get_paths()["stdlib"])
    single = root / f"{name}.py"
    if single.is_file():
        return [single]
    package = root / name
    if not (package / "__init__.py").is_file():
        raise ValueError(f"{name!r} is not a standard-library module or package under {root}")
    return sorted(p for p in package.rglob("*.py") if not {"test", "tests"} & set(p.relative_to(package).parts))


def docstrings(source: str) -> list[str]:
    """The docstrings of every function, method and class in ``source``, cleaned (:func:`ast.get_docstring`).

    Examples:
        >>> docstrings('def f():\\n    \\"\\"\\"Add two numbers.\\"\\"\\"\\nclass C:\\n    pass\\n')
        ['Add two numbers.']
    """
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            doc = ast.get_docstring(node)
            if doc:
                found.append(doc)
    return found


def stdlib_docstrings(
    classes: int = len(STDLIB_PACKAGES),
    *,
    per_class: int | None = None,
    packages: Sequence[str] = STDLIB_PACKAGES,
    seed: int = 0,
    root: Path | None = None,
) -> pa.Table:
    """The corpus as a text table (``id``, ``text``, ``label``), the class names in its schema metadata.

    Args:
        classes: how many of ``packages`` (in order) become classes.
        per_class: at most this many documents per class, drawn at random (seeded); None keeps all.
        packages: the standard-library modules or packages to read.
        seed: the draw of ``per_class``.
        root: the standard library's directory (default: this interpreter's).

    Returns:
        One row per distinct docstring of at least ``MIN_CHARS`` characters (cut at ``MAX_CHARS``); a text found
        in two classes is dropped from both, so no document carries two labels. Ids are 0..n-1.

    Examples:
        >>> table = stdlib_docstrings(2, per_class=5)
        >>> table.num_rows, sorted(set(table.column("label").to_pylist()))
        (10, [0, 1])
    """
    names = list(packages)[:classes]
    if classes < 2 or len(names) < classes:
        raise ValueError(f"classes must be between 2 and {len(packages)}, got {classes}")
    found: dict[str, set[str]] = {}
    for name in names:
        texts: set[str] = set()
        for path in module_files(name, root):
            try:
                texts.update(d[:MAX_CHARS] for d in docstrings(path.read_text(encoding="utf-8")) if len(d) >= MIN_CHARS)
            except (SyntaxError, UnicodeDecodeError, ValueError) as err:  # a file this version cannot parse
                logger.warning("skipping %s: %s", path, err)
        found[name] = texts
    seen: dict[str, int] = {}
    for texts in found.values():
        for text in texts:
            seen[text] = seen.get(text, 0) + 1
    rows: list[tuple[str, int]] = []
    for label, name in enumerate(names):
        kept = sorted(t for t in found[name] if seen[t] == 1)
        if per_class is not None and len(kept) > per_class:
            draw = np.random.default_rng([seed, label]).permutation(len(kept))[:per_class]
            kept = [kept[i] for i in sorted(draw)]
        if len(kept) < 2:
            raise ValueError(f"standard-library {name!r} has {len(kept)} usable docstrings; choose other packages")
        rows += [(t, label) for t in kept]
    table = text_table(np.arange(len(rows)), [t for t, _ in rows], [label for _, label in rows])
    table = with_class_names(table, names)
    version = f"{sys.version_info.major}.{sys.version_info.minor}.{sys.version_info.micro}".encode()
    return table.replace_schema_metadata({**(table.schema.metadata or {}), PYTHON_KEY: version})
