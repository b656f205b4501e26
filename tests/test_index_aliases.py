"""Aliases (blue/green) on the session's Ray cluster: the library, connect() following a switch, the CLI as
subprocesses. Two indexes with disjoint ids (blue 0..n-1, green 10_000..) tell every answer's index apart."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
import ray

from raybackfill import NAMESPACE
from raybackfill.cli.main import main
from raybackfill.index.aliases import (
    Alias,
    check_alias_name,
    get_alias,
    index_state,
    list_aliases,
    remove_alias,
    resolve,
    set_alias,
)
from raybackfill.index.router import RouterConfig, connect, create_index, destroy_index, get
from raybackfill.types import Phase, TargetHealth

ROOT = Path(__file__).resolve().parent.parent
N, D = 30, 8
GREEN_FIRST = 10_000
BLUE_IDS = set(range(N))
GREEN_IDS = set(range(GREEN_FIRST, GREEN_FIRST + N))


def _index(name: str, first_id: int, seed: int, version: str = "v1"):
    router = create_index(RouterConfig(name=name, shards=2, shard_num_cpus=0))
    vectors = np.random.default_rng(seed).standard_normal((N, D)).astype(np.float32)
    get(router.load_old.remote(np.arange(first_id, first_id + N), vectors, version))
    return router


@pytest.fixture(scope="module")
def indexes(ray_cluster):
    tag = uuid.uuid4().hex[:6]
    blue, green = f"alias-blue-{tag}", f"alias-green-{tag}"
    _index(blue, 0, seed=0)
    _index(green, GREEN_FIRST, seed=1)
    made: list[str] = []
    yield {"blue": blue, "green": green, "tag": tag, "aliases": made}
    for name in made:
        with contextlib.suppress(ValueError):
            remove_alias(name)
    for name in (blue, green):
        with contextlib.suppress(ValueError):
            destroy_index(name)


@pytest.fixture
def alias(indexes) -> str:
    name = f"search-{uuid.uuid4().hex[:6]}"
    indexes["aliases"].append(name)
    return name


def _colour(ids: list[int]) -> str:
    """'blue' or 'green' when every id is of that index, each at most once; anything else fails the test."""
    assert len(ids) == len(set(ids)), f"an id twice in one answer: {ids}"
    if set(ids) <= BLUE_IDS:
        return "blue"
    assert set(ids) <= GREEN_IDS, f"an answer mixes the two indexes: {ids}"
    return "green"


def test_set_show_rm_and_their_refusals(indexes, alias):
    blue, green = indexes["blue"], indexes["green"]
    first = set_alias(alias, blue)
    assert (first.index, first.previous) == (blue, None)
    switched = set_alias(alias, green)
    assert (switched.index, switched.previous) == (green, blue) and switched.updated_at >= first.updated_at
    assert get_alias(alias) == switched
    assert resolve(alias).index == green and resolve(alias).alias == alias
    assert resolve(green).alias is None and resolve(green).index == green  # an index name is itself
    assert alias in [a.name for a in list_aliases()]
    state = index_state(green)
    assert (state.health, state.phase, state.items) == (TargetHealth.OK, Phase.IDLE, N)
    assert state.old_space == {"version": "v1", "dim": D}

    with pytest.raises(ValueError, match=r"target index 'nobody-.*' does not exist"):
        set_alias(alias, f"nobody-{uuid.uuid4().hex[:4]}")
    with pytest.raises(ValueError, match="is the name of a running index: an alias must not hide an index"):
        set_alias(blue, green)
    with pytest.raises(ValueError, match="is an alias, not an index"):
        set_alias(f"other-{indexes['tag']}", alias)
    with pytest.raises(ValueError, match="alias name 'bad name' is not valid"):
        set_alias("bad name", green)
    shard = f"{green}-shard-000"  # a named actor of the namespace that is not an index router
    with pytest.raises(ValueError, match="does not exist"):
        set_alias(f"other-{indexes['tag']}", shard)
    assert index_state(shard).health is TargetHealth.MISSING
    assert get_alias(alias) == switched  # nothing refused was written
    with pytest.raises(ValueError, match=f"'{alias}' is an alias \\(of index '{green}'\\), not an index"):
        destroy_index(alias)  # the library, like `raybackfill stop`, never stops an index through an alias
    assert connect(green) is not None
    assert check_alias_name("a.b_c-1") == "a.b_c-1"

    removed = remove_alias(alias)
    assert removed == switched and get_alias(alias) is None
    with pytest.raises(ValueError, match=f"no alias named '{alias}'"):
        remove_alias(alias)
    with pytest.raises(ValueError, match=f"no index named '{alias}'.*nor an alias"):
        connect(alias)
    assert isinstance(Alias.from_bytes("x", switched.to_bytes()), Alias)


def test_connect_follows_a_switch_and_each_answer_comes_from_one_index(indexes, alias):
    """A client calls connect(alias) and searches in a loop while the alias switches from blue to green: every
    answer is the whole of one index (each id once); every search begun after `set` returned is green."""
    set_alias(alias, indexes["blue"])
    query = np.random.default_rng(5).standard_normal((1, D)).astype(np.float32)
    answers: list[tuple[float, str]] = []  # (time the connect began, colour)
    switched_at: list[float] = []
    stop = threading.Event()

    def client() -> None:
        while not stop.is_set():
            began = time.monotonic()
            router = connect(alias)
            top = get(router.search.remote(query, None, N, "old"))
            ids = [int(i) for i in top.ids[0] if i >= 0]
            assert len(ids) == N
            answers.append((began, _colour(ids)))

    errors: list[BaseException] = []

    def run() -> None:
        try:
            client()
        except BaseException as err:  # noqa: BLE001 - reported by the main thread
            errors.append(err)
            stop.set()

    thread = threading.Thread(target=run)
    thread.start()
    try:
        _wait(lambda: len(answers) >= 5 or errors)
        set_alias(alias, indexes["green"])
        switched_at.append(time.monotonic())
        _wait(lambda: sum(1 for t, _ in answers if t > switched_at[0]) >= 5 or errors)
    finally:
        stop.set()
        thread.join(timeout=60)
    assert not errors, errors
    assert answers[0][1] == "blue"
    after = [colour for began, colour in answers if began > switched_at[0]]
    assert after and set(after) == {"green"}, answers


def test_an_alias_to_a_stopped_index_is_an_error_naming_both(indexes, alias):
    gone = f"alias-gone-{indexes['tag']}"
    _index(gone, 50_000, seed=2)
    set_alias(alias, indexes["blue"])
    # A shard down for good: the target exists but does not answer, so a switch to it needs --force.
    ray.kill(ray.get_actor(f"{gone}-shard-001", namespace=NAMESPACE), no_restart=True)
    state = index_state(gone)
    assert state.health is TargetHealth.UNAVAILABLE and state.items is None
    with pytest.raises(ValueError, match=f"target index '{gone}' is unavailable .*--force"):
        set_alias(alias, gone)
    assert get_alias(alias).index == indexes["blue"]
    assert set_alias(alias, gone, force=True).previous == indexes["blue"]
    destroy_index(gone)
    with pytest.raises(ValueError, match=f"alias '{alias}' points to index '{gone}', which does not run"):
        connect(alias)
    state = index_state(gone)
    assert state.health is TargetHealth.MISSING and "no index of that name" in (state.error or "")
    with pytest.raises(ValueError, match="does not exist"):  # and it cannot be pointed there again
        set_alias(alias, gone)


def _wait(condition, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def _cli(*argv: str) -> subprocess.CompletedProcess:
    """`python -m raybackfill.cli.main ...` (what the console script runs) attached to the session's cluster."""
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address, "PYTHONPATH": str(ROOT)}
    args = [sys.executable, "-m", "raybackfill.cli.main", *argv]
    return subprocess.run(args, env=env, capture_output=True, text=True, timeout=120)


def test_cli_alias_commands_as_subprocesses(indexes, alias, tmp_path, capsys):
    blue, green = indexes["blue"], indexes["green"]
    created = _cli("alias", "set", alias, blue)
    assert created.returncode == 0, created.stderr[-2000:]
    assert f"alias {alias}: (new) -> {blue} (phase idle, {N} items, old v1 (dim {D}))" in created.stdout

    switched = _cli("alias", "set", alias, green)
    assert switched.returncode == 0, switched.stderr[-2000:]
    assert f"alias {alias}: {blue} -> {green}" in switched.stdout
    assert f"to switch back: raybackfill alias set {alias} {blue}" in switched.stdout

    shown = _cli("alias", "show", "--json")
    assert shown.returncode == 0, shown.stderr[-2000:]
    row = next(r for r in json.loads(shown.stdout) if r["alias"] == alias)
    assert (row["index"], row["previous"], row["health"], row["phase"], row["items"]) == (green, blue, "ok", "idle", N)

    vector = tmp_path / "q.npy"
    np.save(vector, np.random.default_rng(3).standard_normal(D).astype(np.float32))
    query = _cli("query", "--name", alias, "--vector", str(vector), "--strategy", "old", "--k", str(N), "--json")
    assert query.returncode == 0, query.stderr[-2000:]
    assert _colour([h["id"] for h in json.loads(query.stdout)[0]]) == "green"

    missing = _cli("alias", "set", alias, "no-such-index")
    assert missing.returncode == 2 and "target index 'no-such-index' does not exist" in missing.stderr
    stop = _cli("stop", "--name", alias)
    assert stop.returncode == 2 and f"'{alias}' is an alias (-> index '{green}'); stop an index" in stop.stderr

    # The same commands in this process (the code path of the console script, without a second start-up).
    assert main(["status", "--name", alias]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"alias {alias} -> index {green}\n") and f"index {green}   phase idle" in out
    assert main(["alias", "show", alias]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split() == ["alias", "index", "health", "phase", "items", "previous", "updated"]
    assert table[1].split()[:6] == [alias, green, "ok", "idle", str(N), blue]
    assert main(["stop", "--name", green]) == 2
    refused = capsys.readouterr().err
    assert f"point to index '{green}': their clients would fail" in refused and alias in refused
    assert main(["alias", "set", blue, green]) == 2
    assert "an alias must not hide an index" in capsys.readouterr().err
    table_uri = tmp_path / "old"
    from raybackfill.data.schema import embedding_table
    from raybackfill.data.storage import write_table

    write_table(embedding_table(np.arange(3), np.ones((3, D), np.float32), model="v1"), str(table_uri))
    assert main(["serve", "--old-embeddings", str(table_uri), "--name", alias]) == 2
    assert f"--name '{alias}' is an alias (-> index '{green}')" in capsys.readouterr().err

    removed = _cli("alias", "rm", alias)
    assert removed.returncode == 0 and f"removed alias {alias} (it pointed to {green}" in removed.stdout
    gone = _cli("alias", "show", alias)
    assert gone.returncode == 2 and f"no alias named '{alias}'" in gone.stderr
    assert connect(green) is not None  # the index keeps running
