"""`raybackfill serve --http ...`: the flags of the HTTP search service and the call that deploys it.

Kept apart from raybackfill.cli.index so that `serve` gains the service with one call and imports Ray Serve
only when ``--http`` is given.
"""

from __future__ import annotations

import argparse
import hashlib
import os

from raybackfill.types import Method


def add_http_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``--http`` group of `raybackfill serve` (and jobs/serve.py)."""
    group = parser.add_argument_group(
        "HTTP search service (Ray Serve)",
        "With --http, serve also deploys the search service in front of the index (POST /search, GET /status, "
        "GET /healthz, /openapi.json). Without --old-embeddings it fronts an index that already runs.",
    )
    group.add_argument("--http", action="store_true", help="deploy the HTTP search service")
    group.add_argument("--host", default="127.0.0.1", help="address to listen on (default loopback 127.0.0.1)")
    group.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    group.add_argument("--old-model", metavar="DIR", help="encoder that embeds old-space queries (images or texts)")
    group.add_argument("--new-model", metavar="DIR", help="encoder that embeds new-space queries")
    group.add_argument("--psi-model", metavar="DIR", help="reverse transformation psi: old-space queries from new ones")
    group.add_argument(
        "--method",
        choices=[m.value for m in Method],
        help="the upgrade method: its strategy serves the mixed phases (default: inferred from the encoders)",
    )
    group.add_argument(
        "--min-adapter-recall",
        type=float,
        metavar="R",
        help="refuse a --psi-model adapter whose recorded recall@k (`train adapter`) is below R",
    )
    group.add_argument("--image-size", type=int, help="crop of image models that recorded none (default: each image's)")
    group.add_argument(
        "--api-key-env",
        metavar="VAR",
        help="require this environment variable's value in the X-API-Key header (only its SHA-256 leaves this shell)",
    )
    group.add_argument("--min-replicas", type=int, default=1, help="autoscaling floor (default 1)")
    group.add_argument("--max-replicas", type=int, default=4, help="autoscaling ceiling (default 4)")
    group.add_argument("--replica-cpus", type=float, default=0.5, help="CPUs per replica (default 0.5)")
    group.add_argument("--replica-gpus", type=float, default=0.0, help="GPUs per replica (encoders run there)")
    group.add_argument("--max-body-bytes", type=int, default=8 * 1024 * 1024, help="largest request (default 8 MiB)")


def service_config(args: argparse.Namespace):
    """The :class:`~raybackfill.service.config.ServiceConfig` the flags describe."""
    from raybackfill.service.config import ServiceConfig

    digest = None
    if args.api_key_env:
        key = os.environ.get(args.api_key_env, "")
        if not key:
            raise ValueError(f"--api-key-env {args.api_key_env}: that environment variable is unset or empty")
        digest = hashlib.sha256(key.encode()).hexdigest()
    return ServiceConfig(
        index=args.name,
        old_model=args.old_model,
        new_model=args.new_model,
        psi_model=args.psi_model,
        min_adapter_recall=args.min_adapter_recall,
        method=args.method,
        image_size=args.image_size,
        trust_entrypoints=tuple(args.trust_entrypoint),
        trust_all_entrypoints=args.trust_entrypoints,
        api_key_sha256=digest,
        min_replicas=args.min_replicas,
        max_replicas=args.max_replicas,
        num_cpus=args.replica_cpus,
        num_gpus=args.replica_gpus,
        max_body_bytes=args.max_body_bytes,
        serving_nice=args.serving_nice,
    )


def deploy_http(args: argparse.Namespace) -> None:
    """Deploy the service for ``args`` (the index must run) and print its URL."""
    from raybackfill.index.aliases import resolve
    from raybackfill.index.router import connect
    from raybackfill.service.app import deploy

    config = service_config(args)
    try:
        connect(args.name)  # attaches to Ray
    except ValueError as err:  # the service finds the index by name when it comes (the demo creates its own)
        print(f"note: {err}; the service answers 503 until it runs")
    resolved = resolve(args.name)
    what = f"alias {args.name!r} (now index {resolved.index!r})" if resolved.alias else f"index {args.name!r}"
    url = deploy(config, host=args.host, port=args.port)
    print(f"search service for {what} at {url} (POST /search, GET /status, GET /healthz, /docs)")
