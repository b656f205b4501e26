"""The HTTP service's configuration: one dataclass, built from Ray Serve's application ``args`` dict.

``raybackfill serve --http`` builds it from its flags; a Serve config file or a KubeRay ``RayService`` names
``raybackfill.service.app:build_app`` as the import path and passes these keys as ``args``:

======================== =============================================================================
key                      meaning (default)
======================== =============================================================================
index                    the router actor's name, or an alias of one (``raybackfill-router``)
old_model                encoder artefact for old-space queries (none)
new_model                encoder artefact for new-space queries (none)
psi_model                reverse transformation psi: old-space queries from the new encoder (none)
min_adapter_recall       refuse a psi adapter whose recorded recall@k (`train adapter`) is below this (none)
method                   the upgrade method; its recipe's strategy serves the mixed phases (inferred)
image_size               crop of image models that recorded none (each image's own shorter side)
trust_entrypoints        list of ``package.module:factory`` user encoders to run ([])
trust_all_entrypoints    run every entrypoint encoder (false)
device                   ``auto`` (a GPU when the replica has one), ``cpu`` or ``cuda``
api_key_env              name of an environment variable of the replicas holding the API key (none)
api_key_sha256           hex SHA-256 of the API key, for a key that must not reach the replicas (none)
max_body_bytes           largest request body (8 MiB)
max_queries              most queries in one request (64)
max_k                    largest k (1000)
max_batch_size           requests batched into one index call (32)
batch_wait_timeout_s     how long a batch waits to fill (0.005)
status_ttl_s             how old the cached phase and space versions may be (1.0)
alias_ttl_s              how long an alias's target is reused before it is read again; 0: every request (1.0)
retry_after_s            the ``Retry-After`` of a 503 (2)
index_timeout_s          a router call slower than this is a 503 (30)
min_replicas             autoscaling floor (1)
max_replicas             autoscaling ceiling (4)
target_ongoing_requests  in-flight requests per replica the autoscaler aims at (8)
num_cpus                 CPUs per replica (0.5)
num_gpus                 GPUs per replica (0; 1 puts the encoders on a GPU)
serving_nice             nice value the replica processes start at (0, the raylet's; Ray's default is 15)
======================== =============================================================================

The API key never travels in ``args`` in clear: give the name of a variable the replicas' environment holds
(``api_key_env``, e.g. from a Kubernetes Secret), or its SHA-256 (``api_key_sha256``, what the CLI sends).
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from dataclasses import dataclass
from typing import Any

from raybackfill.index.router import DEFAULT_NAME
from raybackfill.priority import check_nice
from raybackfill.types import Method, parse

DEVICES = ("auto", "cpu", "cuda")


@dataclass(frozen=True)
class ServiceConfig:
    """See the module docstring for each field."""

    index: str = DEFAULT_NAME
    old_model: str | None = None
    new_model: str | None = None
    psi_model: str | None = None
    min_adapter_recall: float | None = None
    method: Method | None = None
    image_size: int | None = None
    trust_entrypoints: tuple[str, ...] = ()
    trust_all_entrypoints: bool = False
    device: str = "auto"
    api_key_env: str | None = None
    api_key_sha256: str | None = None
    max_body_bytes: int = 8 * 1024 * 1024
    max_queries: int = 64
    max_k: int = 1000
    max_batch_size: int = 32
    batch_wait_timeout_s: float = 0.005
    status_ttl_s: float = 1.0
    alias_ttl_s: float = 1.0
    retry_after_s: float = 2.0
    index_timeout_s: float = 30.0
    min_replicas: int = 1
    max_replicas: int = 4
    target_ongoing_requests: float = 8.0
    num_cpus: float = 0.5
    num_gpus: float = 0.0
    # Replicas turn requests into index calls and embed queries: latency-critical work that would otherwise run
    # at Ray's worker default of 15, beside a backfill's read tasks, so they start where the index's actors do.
    serving_nice: int = 0

    def __post_init__(self) -> None:
        if self.method is not None:
            object.__setattr__(self, "method", parse(Method, self.method, what="method"))
        object.__setattr__(self, "trust_entrypoints", tuple(self.trust_entrypoints))
        if self.device not in DEVICES:
            raise ValueError(f"device must be one of {', '.join(DEVICES)}, got {self.device!r}")
        for name in ("max_body_bytes", "max_queries", "max_k", "max_batch_size", "min_replicas", "max_replicas"):
            if int(getattr(self, name)) < (0 if name == "min_replicas" else 1):
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.max_replicas < self.min_replicas:
            raise ValueError(f"max_replicas ({self.max_replicas}) is below min_replicas ({self.min_replicas})")
        if self.index_timeout_s <= 0:
            raise ValueError(f"index_timeout_s must be positive, got {self.index_timeout_s}")
        for name in ("batch_wait_timeout_s", "status_ttl_s", "alias_ttl_s", "retry_after_s", "num_cpus", "num_gpus"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be non-negative, got {getattr(self, name)}")
        check_nice(self.serving_nice, "serving_nice", "the nice value the replicas start at")
        if self.image_size is not None and self.image_size <= 0:
            raise ValueError(f"image_size must be positive, got {self.image_size}")
        if self.api_key_sha256 is not None:
            digest = self.api_key_sha256.lower()
            if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
                raise ValueError("api_key_sha256 must be 64 hex digits (a SHA-256)")
            object.__setattr__(self, "api_key_sha256", digest)

    @classmethod
    def from_args(cls, args: dict[str, Any] | None) -> ServiceConfig:
        """From Serve's ``args`` dict; an unknown key is an error naming it (a typo must not pass silently).

        Values may be strings, as ``serve run raybackfill.service.app:build_app key=value`` passes them: numbers,
        booleans (true/false), lists (comma-separated) and "none" are read by each field's type.
        """
        args = dict(args or {})
        fields = {f.name: str(f.type) for f in dataclasses.fields(cls)}
        unknown = sorted(set(args) - set(fields))
        if unknown:
            raise ValueError(f"unknown service args {unknown}; valid: {', '.join(sorted(fields))}")
        return cls(**{name: _from_text(name, value, fields[name]) for name, value in args.items()})

    def to_args(self) -> dict[str, Any]:
        """The ``args`` dict that :meth:`from_args` reads back (JSON-friendly)."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out["trust_entrypoints"] = list(self.trust_entrypoints)
        return {k: (v.value if isinstance(v, Method) else v) for k, v in out.items()}

    def api_key_digest(self) -> bytes | None:
        """The SHA-256 the requests' key must hash to, read in the replica; None when no key is required.

        Raises:
            ValueError: ``api_key_env`` names a variable that is unset or empty (the service must not start open).
        """
        if self.api_key_sha256:
            return bytes.fromhex(self.api_key_sha256)
        if self.api_key_env:
            key = os.environ.get(self.api_key_env, "")
            if not key:
                raise ValueError(f"api_key_env names {self.api_key_env!r}, which is unset or empty here")
            return hashlib.sha256(key.encode()).digest()
        return None

    def secrets(self) -> list[str]:
        """Strings that must never appear in a response: model locations, and credentials from the environment."""
        found = [u for u in (self.old_model, self.new_model, self.psi_model) if u]
        for uri in list(found):
            found.append(os.path.abspath(uri) if "://" not in uri else uri)
        names = [self.api_key_env] if self.api_key_env else []
        names += ["AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ACCESS_KEY_ID", "RAY_AUTH_TOKEN"]
        found += [os.environ[n] for n in names if os.environ.get(n)]
        return found


def _from_text(name: str, value: Any, annotation: str) -> Any:
    """A string arg read as its field's type (``annotation`` as written in the dataclass); other values as given."""
    if not isinstance(value, str):
        return value
    text = value.strip()
    if "None" in annotation and text.lower() in ("", "none", "null"):
        return None
    try:
        if annotation.startswith("bool"):
            if text.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError(text)
            return text.lower() in ("true", "1", "yes")
        if annotation.startswith("int"):
            return int(text)
        if annotation.startswith("float"):
            return float(text)
    except ValueError:
        raise ValueError(f"service arg {name}: {value!r} is not a {annotation.split(' ')[0]}") from None
    if annotation.startswith("tuple"):
        return tuple(part.strip() for part in text.split(",") if part.strip())
    return value
