"""Crash-safe snapshots: a set of named blobs in a new versioned directory, then a small pointer file.

Layout under a snapshot root (local path or s3://):
    v00000001-<random>/<name>...   one directory per snapshot, never overwritten
    LATEST                         JSON {"version": "v00000001-...", "files": [...]}, written last

A crash (or a lost actor) in the middle of a snapshot leaves LATEST pointing at the previous complete
snapshot; the half-written directory is invisible and pruned later. The pointer is replaced atomically
(os.replace locally, one PUT on S3).
"""

from __future__ import annotations

import json
import re
import time
import uuid

import pyarrow.fs as pafs

from raybackfill.data.storage import StorageError, exists, join, read_bytes, resolve, write_bytes

POINTER = "LATEST"
_VERSION = re.compile(r"^v(\d{8})-[0-9a-f]{8}$")


def _read_pointer(root: str) -> dict | None:
    pointer = join(root, POINTER)
    if not exists(pointer):
        return None
    try:
        content = json.loads(read_bytes(pointer))
        version, files = content["version"], content["files"]
    except (ValueError, KeyError, TypeError) as err:
        raise StorageError(f"{pointer}: not a valid snapshot pointer ({err})") from err
    if not isinstance(version, str) or not _VERSION.match(version) or not isinstance(files, list):
        raise StorageError(f"{pointer}: invalid snapshot pointer {content!r}")
    return content


def latest_version(root: str) -> str | None:
    """The committed snapshot directory name under ``root``, or None when there is none yet."""
    pointer = _read_pointer(root)
    return pointer["version"] if pointer else None


def write_snapshot(root: str, blobs: dict[str, bytes | memoryview], keep: int = 2) -> str:
    """Write ``blobs`` as a new snapshot, commit it, prune all but the ``keep`` newest; return its URI."""
    if keep < 1:
        raise ValueError(f"keep must be at least 1, got {keep}")
    previous = latest_version(root)
    seq = 1
    if previous:
        match = _VERSION.match(previous)
        assert match is not None, f"snapshot pointer {previous!r}"  # _read_pointer checked it against _VERSION
        seq = int(match.group(1)) + 1
    version = f"v{seq:08d}-{uuid.uuid4().hex[:8]}"
    for name, data in blobs.items():
        write_bytes(join(root, version, name), data)
    pointer = {"version": version, "files": sorted(blobs), "written_at": time.time()}
    write_bytes(join(root, POINTER), json.dumps(pointer).encode())
    _prune(root, seq - keep + 1)
    return join(root, version)


def read_snapshot(root: str) -> dict[str, bytes] | None:
    """The blobs of the committed snapshot under ``root``, or None when there is none."""
    pointer = _read_pointer(root)
    if pointer is None:
        return None
    return {name: read_bytes(join(root, pointer["version"], name)) for name in pointer["files"]}


def _prune(root: str, oldest_kept: int) -> None:
    """Delete snapshot directories older than ``oldest_kept`` (including abandoned half-written ones)."""
    fs, path = resolve(root)
    try:
        infos = fs.get_file_info(pafs.FileSelector(path, recursive=False))
        for info in infos:
            match = _VERSION.match(info.base_name)
            if info.type == pafs.FileType.Directory and match and int(match.group(1)) < oldest_kept:
                fs.delete_dir(info.path)
    except OSError as err:
        raise StorageError(f"{root}: pruning old snapshots failed ({err})") from err
