"""Starting or attaching to Ray the same way from every entry point (CLI, jobs, demo)."""

from __future__ import annotations

import logging
import os
import sys

import ray

from raybackfill import NAMESPACE
from raybackfill.logs import LEVEL_ENV

logger = logging.getLogger(__name__)


def init_ray(
    address: str | None = None,
    *,
    num_cpus: int | None = None,
    log_to_driver: bool = False,
    py_modules: list[str] | None = None,
) -> None:
    """Attach to ``address`` (or ``RAY_ADDRESS``) when given; otherwise start a local cluster.

    A local cluster gets explicit resources (this machine's CPUs, no dashboard) so it behaves the same
    on a laptop and in CI. Under ``ray job submit`` RAY_ADDRESS is set and the job joins its cluster.
    ``log_to_driver`` forwards what workers print (training loops' per-epoch lines) to this console.
    ``py_modules`` (local package directories) ship user code, such as an encoder entrypoint, to every worker;
    this process imports the same code (their parent directories go on ``sys.path``).
    """
    for module in py_modules or ():
        parent = os.path.dirname(os.path.abspath(module))
        if parent not in sys.path:
            sys.path.insert(0, parent)
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    runtime_env: dict = {}
    if py_modules:
        runtime_env["py_modules"] = [os.path.abspath(p) for p in py_modules]
    if os.environ.get(LEVEL_ENV):  # the level asked for here holds in every worker too
        runtime_env["env_vars"] = {LEVEL_ENV: os.environ[LEVEL_ENV]}
    if address:
        ray.init(address=address, namespace=NAMESPACE, log_to_driver=log_to_driver, runtime_env=runtime_env or None)
        return
    try:
        ray.init(
            num_cpus=num_cpus or os.cpu_count(),
            include_dashboard=False,
            namespace=NAMESPACE,
            log_to_driver=log_to_driver,
            runtime_env=runtime_env or None,
        )
    except ValueError as err:
        # Without an address Ray joins the cluster of the last `ray start` on this machine, and refuses the
        # resources asked for a new one: join it as it is.
        if "existing cluster" not in str(err):
            raise
        logger.info("joining the Ray cluster already running on this machine (ray start)")
        ray.init(namespace=NAMESPACE, log_to_driver=log_to_driver, runtime_env=runtime_env or None)
