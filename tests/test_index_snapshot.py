"""Snapshots: versioned directories plus a pointer, so a crash mid-snapshot keeps the previous one."""

from __future__ import annotations

import json

import pytest

from raybackfill.data.storage import StorageError, join, read_bytes, write_bytes
from raybackfill.index.snapshot import POINTER, latest_version, read_snapshot, write_snapshot


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "snaps")
    return join(request.getfixturevalue("s3_bucket"), "snaps")


def test_snapshots_roundtrip_and_old_versions_are_pruned(root):
    assert read_snapshot(root) is None
    first = write_snapshot(root, {"a.bin": b"one", "meta.json": b"{}"})
    assert read_snapshot(root) == {"a.bin": b"one", "meta.json": b"{}"}
    write_snapshot(root, {"a.bin": b"two"}, keep=2)
    write_snapshot(root, {"a.bin": b"three"}, keep=2)
    assert read_snapshot(root) == {"a.bin": b"three"}
    assert latest_version(root).startswith("v00000003-")
    with pytest.raises(StorageError, match="no such file"):
        read_bytes(join(first, "a.bin"))  # the oldest version was pruned


def test_a_crash_before_the_pointer_leaves_the_previous_snapshot_readable(root):
    write_snapshot(root, {"a.bin": b"good"})
    # A writer that died after writing blobs of the next version but before committing the pointer.
    write_bytes(join(root, "v00000002-deadbeef", "a.bin"), b"half")
    assert read_snapshot(root) == {"a.bin": b"good"}
    write_snapshot(root, {"a.bin": b"next"})
    assert read_snapshot(root) == {"a.bin": b"next"}


def test_a_corrupt_pointer_is_a_clear_error(tmp_path):
    root = str(tmp_path)
    write_bytes(join(root, POINTER), json.dumps({"version": "../etc"}).encode())
    with pytest.raises(StorageError, match="snapshot pointer"):
        read_snapshot(root)
    with pytest.raises(ValueError, match="keep must be at least 1"):
        write_snapshot(root, {}, keep=0)
