"""CPU priority of background work (Linux nice values; elsewhere nothing changes).

A backfill shares the cores of a node with the queries it must not slow down. Its work (the shard's writes,
the embedding and transformation actors) runs some nice steps below the queries, so the scheduler serves the
queries first when both want a core and gives the backfill every cycle they leave. On Linux nice is a
property of each thread, and a new thread inherits the value of the thread that starts it.

An unprivileged process can lower its priority but not raise it again, so these helpers are for threads and
processes that do nothing but background work (a write thread, a Ray Data actor): never for a pooled task
worker or a user's driver.
"""

from __future__ import annotations

import logging
import os
import threading

__all__ = [
    "MAX_NICE",
    "BackgroundPriority",
    "check_nice",
    "check_nice_increment",
    "lower_thread_priority",
    "started_at_nice",
]

logger = logging.getLogger(__name__)

MAX_NICE = 19  # the lowest CPU priority of a Linux thread
TASKS = "/proc/self/task"  # one entry per thread of this process (Linux)
# Ray starts each worker process at the nice value of this variable (15 unless set), so that workers never slow
# the raylet; a worker whose runtime environment sets it starts at that value instead (Ray's job supervisor
# starts at 0 this way).
RAY_WORKER_NICENESS = "RAY_worker_niceness"


def check_nice(value: int, name: str, meaning: str) -> int:
    """``value`` when it is an integer from 0 to MAX_NICE; a ValueError naming ``name`` and what it means
    otherwise."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_NICE:
        raise ValueError(f"{name} must be an integer in [0, {MAX_NICE}] ({meaning}), got {value!r}")
    return value


def started_at_nice(nice: int) -> dict:
    """The ``runtime_env`` of a Ray actor whose process must start at ``nice`` rather than Ray's 15: one that
    serves queries (an index router or shard, a search service replica)."""
    return {"env_vars": {RAY_WORKER_NICENESS: str(nice)}}


def check_nice_increment(value: int, name: str) -> int:
    """``value`` when it is a valid number of nice steps (0 to MAX_NICE); a ValueError naming ``name`` otherwise."""
    return check_nice(value, name, "nice steps below the queries")


def _nice_of(thread: int) -> int:
    return os.getpriority(os.PRIO_PROCESS, thread)


def _target(increment: int) -> int:
    """The nice value ``increment`` steps below this process's main thread, capped at MAX_NICE."""
    return min(MAX_NICE, _nice_of(os.getpid()) + increment)


def _lower(thread: int, target: int) -> None:
    """Set ``thread`` to ``target`` unless it already runs at that priority or lower."""
    if _nice_of(thread) < target:
        os.setpriority(os.PRIO_PROCESS, thread, target)


def lower_thread_priority(increment: int) -> bool:
    """Run the calling thread ``increment`` nice steps below the process's main thread (capped at MAX_NICE).

    Returns:
        True when the thread's priority is now the target (or already was lower); False when the platform or
        the process's limits did not allow it (the thread keeps its priority: work still gets done).
    """
    if increment <= 0:
        return True
    try:
        _lower(threading.get_native_id(), _target(increment))
    except (AttributeError, OSError) as error:  # not Linux, or not allowed
        logger.debug("thread priority unchanged: %s", error)
        return False
    return True


class BackgroundPriority:
    """Every thread of this process, ``increment`` nice steps below the priority the process had when this object
    was made: for a process that only does background work, such as a Ray Data actor.

    Call :meth:`apply` at the start of each unit of work. It lowers the threads started since the last call too (a
    thread pool torch or Ray starts later), at the cost of listing this process's threads once per call.

    Examples:
        >>> priority = BackgroundPriority(4)  # doctest: +SKIP
        >>> priority.apply()  # in __init__ and at the top of __call__  # doctest: +SKIP
    """

    def __init__(self, increment: int) -> None:
        self.increment = check_nice_increment(increment, "nice_increment")
        self.target: int | None
        try:
            self.target = _target(self.increment)
        except (AttributeError, OSError):
            self.target = None
        self._done: set[int] = set()

    def apply(self) -> int:
        """Bring the threads not seen yet to the target; returns how many this call saw (a thread that inherited
        the target from the thread that started it counts, though nothing needed changing)."""
        if not self.increment or self.target is None:
            return 0
        try:
            threads = {int(name) for name in os.listdir(TASKS)}
        except OSError:  # no /proc: this thread only
            threads = {threading.get_native_id()}
        lowered = 0
        for thread in sorted(threads - self._done):
            try:
                _lower(thread, self.target)
            except OSError as error:  # the thread ended meanwhile, or the limits forbid it
                logger.debug("thread %d priority unchanged: %s", thread, error)
                continue
            self._done.add(thread)
            lowered += 1
        self._done &= threads  # thread ids are reused: forget the ones that ended
        return lowered
