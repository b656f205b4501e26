"""Crash-safe snapshots: a set of named blobs in a new versioned directory, then a small pointer file.

Layout under a snapshot root (local path or s3://):
    v00000001-<random>/<name>...   one directory per snapshot, never overwritten
    LATEST                         JSON {"version": "v00000001-...", "files": [...]}, written last

A crash (or a lost actor) in the middle of a snapshot leaves LATEST pointing at the previous complete
snapshot; the half-written directory is invisible and pruned later. The pointer is replaced atomically
(os.replace locally, one PUT on S3).

:class:`SnapshotWriter` writes the blobs one at a time as they are produced (a shard writes its code rows
in chunks, so no second copy of a whole index is held in memory) and commits the pointer last.
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


class SnapshotWriter:
    """One new snapshot under ``root``, written blob by blob; invisible until :meth:`commit`.

    Example:
        >>> writer = SnapshotWriter("/tmp/snaps")  # doctest: +SKIP
        >>> writer.write("meta.json", b"{}")  # doctest: +SKIP
        >>> writer.commit()  # doctest: +SKIP
        '/tmp/snaps/v00000001-1a2b3c4d'
    """

    def __init__(self, root: str, keep: int = 2) -> None:
        if keep < 1:
            raise ValueError(f"keep must be at least 1, got {keep}")
        self.root, self.keep = root, keep
        previous = latest_version(root)
        self.seq = 1
        if previous:
            match = _VERSION.match(previous)
            assert match is not None, f"snapshot pointer {previous!r}"  # _read_pointer checked it against _VERSION
            self.seq = int(match.group(1)) + 1
        self.version = f"v{self.seq:08d}-{uuid.uuid4().hex[:8]}"
        self.files: list[str] = []

    def write(self, name: str, data: bytes | memoryview) -> None:
        if name in self.files:
            raise ValueError(f"snapshot blob {name!r} written twice")
        write_bytes(join(self.root, self.version, name), data)
        self.files.append(name)

    def commit(self) -> str:
        """Point LATEST at this snapshot, prune all but the ``keep`` newest; return its URI."""
        pointer = {"version": self.version, "files": sorted(self.files), "written_at": time.time()}
        write_bytes(join(self.root, POINTER), json.dumps(pointer).encode())
        _prune(self.root, self.seq - self.keep + 1)
        return join(self.root, self.version)


def write_snapshot(root: str, blobs: dict[str, bytes | memoryview], keep: int = 2) -> str:
    """Write ``blobs`` as a new snapshot, commit it, prune all but the ``keep`` newest; return its URI."""
    writer = SnapshotWriter(root, keep)
    for name, data in blobs.items():
        writer.write(name, data)
    return writer.commit()


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
