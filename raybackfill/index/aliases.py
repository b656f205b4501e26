"""Aliases: a stable name that clients query, pointing to one index and switched atomically (blue/green).

A team that prefers a full rebuild to an in-place backfill builds a second index next to the live one
(``raybackfill serve --name index-green ...``) and switches its clients with one write:
``raybackfill alias set search index-green``. ``alias set search index-blue`` switches back.

Storage. One JSON record per alias in Ray's GCS key-value store (``ray.experimental.internal_kv``, namespace
:data:`KV_NAMESPACE`, key = the alias name). Why the KV and not a detached actor: a single key put is atomic in
the GCS, it outlives every driver (like the index's detached actors, it lives as long as the cluster's GCS), a
read is one GCS round trip (a fraction of a search's fan-out to the shards), and there is no actor to schedule,
restart or give state to persist (docs/operations.md has the measured costs). The KV module is Ray's
experimental API (Ray Serve and Ray Jobs keep their own state in it); every call to it is in this module.

Resolution (:func:`resolve`, used by :func:`raybackfill.index.router.connect` and the HTTP service): a running
index of that name wins; otherwise an alias of that name gives its target. ``set`` refuses an alias name that
is an index name, so an alias never hides an index. Two operators setting one alias at once: the last write
wins, and each is told the target it replaced as read just before its write.

Nothing here imports the router (the router imports this module): an index is recognised as a named actor in
the raybackfill namespace that has the router's methods.
"""

from __future__ import annotations

import json
import logging
import re
import time
from dataclasses import asdict, dataclass

import ray
from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError
from ray.experimental import internal_kv

from raybackfill import NAMESPACE
from raybackfill.runtime import init_ray
from raybackfill.types import Phase, TargetHealth, parse

logger = logging.getLogger(__name__)

KV_NAMESPACE = f"{NAMESPACE}-aliases"
# Letters, digits, '.', '_', '-'; starts with a letter or digit: safe in a URL, a shell and a KV key.
ALIAS_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
STATE_TIMEOUT_S = 5.0
# Methods only the index router has: a shard or another named actor is not an index.
_ROUTER_METHODS = ("shard_names", "search", "progress", "health")


@dataclass(frozen=True)
class Alias:
    """One alias record.

    Attributes:
        name: the alias clients use.
        index: the index (router actor name) it points to.
        previous: the index it pointed to before the last ``set`` (None for a new alias): the rollback target.
        updated_at: Unix time of the last ``set``.
    """

    name: str
    index: str
    previous: str | None = None
    updated_at: float = 0.0

    def to_bytes(self) -> bytes:
        return json.dumps({"index": self.index, "previous": self.previous, "updated_at": self.updated_at}).encode()

    @classmethod
    def from_bytes(cls, name: str, raw: bytes) -> Alias:
        record = json.loads(raw)
        return cls(name, record["index"], record.get("previous"), float(record.get("updated_at", 0.0)))


@dataclass(frozen=True)
class Resolved:
    """The index a name designates: ``alias`` is the alias it went through, or None (the name is the index)."""

    index: str
    alias: str | None = None


@dataclass(frozen=True)
class IndexState:
    """How an index answers now: what `alias show` and `alias set` print about a target.

    Attributes:
        name: the index name.
        health: ok, unavailable (the router or a shard is dead, restarting or slower than the timeout) or missing.
        phase, items: the index's phase and item count (None unless ok).
        old_space, new_space: each space's model version and dim ({"version", "dim"}), None when empty or not ok.
        error: why it is not ok.
    """

    name: str
    health: TargetHealth
    phase: Phase | None = None
    items: int | None = None
    old_space: dict | None = None
    new_space: dict | None = None
    error: str | None = None

    def as_dict(self) -> dict:
        return asdict(self)


def check_alias_name(name: str) -> str:
    """``name`` if it is a valid alias name, else a ValueError naming the rule.

    Example:
        >>> check_alias_name("search-prod")
        'search-prod'
    """
    if not isinstance(name, str) or not ALIAS_NAME.fullmatch(name):
        raise ValueError(
            f"alias name {name!r} is not valid: use 1-128 letters, digits, '.', '_' or '-', starting with a "
            "letter or a digit"
        )
    return name


def _attach() -> None:
    init_ray("auto")  # a no-op when this process is already attached (a test, a job, a Serve replica)


def _key(name: str) -> bytes:
    return name.encode()


def _router(name: str):
    """The router actor named ``name``, or None when no index of that name runs."""
    try:
        handle = ray.get_actor(name, namespace=NAMESPACE)
    except ValueError:
        return None
    return handle if all(hasattr(handle, m) for m in _ROUTER_METHODS) else None


def _is_named_actor(name: str) -> bool:
    try:
        ray.get_actor(name, namespace=NAMESPACE)
    except ValueError:
        return False
    return True


def get_alias(name: str) -> Alias | None:
    """The alias record named ``name``, or None when there is no such alias.

    Args:
        name: an alias name (any string: a name that cannot be an alias simply has no record).

    Returns:
        The :class:`Alias`, or None.

    Example:
        >>> get_alias("search").index  # doctest: +SKIP
        'index-green'
    """
    _attach()
    raw = internal_kv._internal_kv_get(_key(name), namespace=KV_NAMESPACE)
    return None if raw is None else Alias.from_bytes(name, raw)


def list_aliases() -> list[Alias]:
    """Every alias of the cluster, sorted by name.

    Returns:
        The :class:`Alias` records.

    Example:
        >>> [(a.name, a.index) for a in list_aliases()]  # doctest: +SKIP
        [('search', 'index-green')]
    """
    _attach()
    out = []
    for key in internal_kv._internal_kv_list(b"", namespace=KV_NAMESPACE):
        name = key.decode()
        record = get_alias(name)  # removed between the listing and this read: skip it
        if record is not None:
            out.append(record)
    return sorted(out, key=lambda a: a.name)


def aliases_to(index: str) -> list[str]:
    """Names of the aliases that point to ``index`` (e.g. before stopping it).

    Example:
        >>> aliases_to("index-green")  # doctest: +SKIP
        ['search']
    """
    return [a.name for a in list_aliases() if a.index == index]


def resolve(name: str) -> Resolved:
    """The index ``name`` designates: a running index of that name wins, else the target of an alias of that name;
    a name that is neither comes back as itself (the caller's attach then fails with its own message).

    Costs one GCS lookup for an index name, two (the failed lookup and one KV read) for an alias.

    Args:
        name: an index or alias name.

    Returns:
        :class:`Resolved` (``alias`` is None when ``name`` is not an alias in use).

    Example:
        >>> resolve("search")  # doctest: +SKIP
        Resolved(index='index-green', alias='search')
    """
    _attach()
    if _is_named_actor(name):
        return Resolved(name)
    record = get_alias(name)
    return Resolved(name) if record is None else Resolved(record.index, name)


def index_state(index: str, timeout_s: float = STATE_TIMEOUT_S) -> IndexState:
    """Health, phase, item count and spaces of the index ``index``, asked of its router within ``timeout_s``.

    Args:
        index: an index (router actor) name.
        timeout_s: how long the router may take to answer.

    Returns:
        :class:`IndexState`; never raises for an index that is down or missing (that is its health).

    Example:
        >>> index_state("index-green").health  # doctest: +SKIP
        'ok'
    """
    _attach()
    router = _router(index)
    if router is None:
        why = "a named actor that is not an index router" if _is_named_actor(index) else "no index of that name runs"
        return IndexState(index, TargetHealth.MISSING, error=why)
    try:
        progress, health = ray.get([router.progress.remote(), router.health.remote()], timeout=timeout_s)
    except GetTimeoutError:
        return IndexState(index, TargetHealth.UNAVAILABLE, error=f"no answer within {timeout_s:g} s")
    except (RayActorError, RayTaskError) as err:
        cause = err.cause if isinstance(err, RayTaskError) else err
        return IndexState(index, TargetHealth.UNAVAILABLE, error=f"{type(cause).__name__}: {cause}".splitlines()[0])
    return IndexState(
        index,
        TargetHealth.OK,
        phase=parse(Phase, progress.phase),
        items=int(progress.total),
        old_space=health["old_space"],
        new_space=health["new_space"],
    )


def set_alias(name: str, index: str, *, force: bool = False, timeout_s: float = STATE_TIMEOUT_S) -> Alias:
    """Point the alias ``name`` at the index ``index`` in one atomic write (create it if new).

    Refused: an invalid alias name; an alias name that is a running index's name (an alias never hides an
    index); a target that is not a running index (or is itself an alias); a target whose router or shards do
    not answer within ``timeout_s``, unless ``force``.

    Args:
        name: the alias.
        index: the target index's name (``raybackfill serve --name``).
        force: switch even when the target does not answer now (it must still exist).
        timeout_s: how long the target may take to answer the health check.

    Returns:
        The new :class:`Alias` record; its ``previous`` is the target it replaced (the rollback: set it back).

    Example:
        >>> set_alias("search", "index-green").previous  # doctest: +SKIP
        'index-blue'
    """
    check_alias_name(name)
    _attach()
    if _is_named_actor(name):
        raise ValueError(
            f"alias name {name!r} is the name of a running index: an alias must not hide an index; choose another "
            "alias name"
        )
    if _router(index) is None:
        if get_alias(index) is not None:
            raise ValueError(f"target {index!r} is an alias, not an index: point {name!r} at an index name")
        raise ValueError(
            f"target index {index!r} does not exist (no index router of that name runs in Ray namespace "
            f"{NAMESPACE!r}); start it with `raybackfill serve --name {index}`"
        )
    state = index_state(index, timeout_s)
    if state.health is not TargetHealth.OK and not force:
        raise ValueError(f"target index {index!r} is {state.health} ({state.error}); fix it first, or --force")
    current = get_alias(name)
    record = Alias(name, index, current.index if current else None, time.time())
    internal_kv._internal_kv_put(_key(name), record.to_bytes(), overwrite=True, namespace=KV_NAMESPACE)
    logger.info("alias %s: %s -> %s", name, record.previous, index)
    return record


def remove_alias(name: str) -> Alias:
    """Delete the alias ``name`` (the index it pointed to keeps running).

    Returns:
        The removed :class:`Alias` record.

    Raises:
        ValueError: there is no alias of that name.

    Example:
        >>> remove_alias("search").index  # doctest: +SKIP
        'index-green'
    """
    current = get_alias(name)
    if current is None:
        raise ValueError(f"no alias named {name!r}")
    internal_kv._internal_kv_del(_key(name), namespace=KV_NAMESPACE)
    logger.info("alias %s removed (it pointed to %s)", name, current.index)
    return current
