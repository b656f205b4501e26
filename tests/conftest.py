"""Session-wide fixtures: one real local Ray cluster and one real S3 endpoint (moto) on 127.0.0.1."""

from __future__ import annotations

import os
import uuid

import pytest
import torch

# Tiny models on a loaded 2-core box run 10-50x slower with torch's default intra-op threads than with one.
torch.set_num_threads(1)

# Loopback only, no auth token dance for the local test cluster, quiet Ray.
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")


@pytest.fixture(scope="session")
def s3_server():
    """A moto S3 server on 127.0.0.1; AWS_* variables point every client (pyarrow, s3fs, Ray) at it."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {
        "AWS_ENDPOINT_URL": f"http://{host}:{port}",
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing-secret-do-not-log",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_REGION": "us-east-1",
    }
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    yield env["AWS_ENDPOINT_URL"]
    server.stop()
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture
def s3_bucket(s3_server) -> str:
    """A fresh bucket for one test; returns its s3:// URI."""
    import boto3

    name = f"test-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket=name)
    return f"s3://{name}"


@pytest.fixture(scope="session")
def ray_cluster(s3_server):
    """One small local Ray cluster for the whole session (cold start is several seconds).

    It starts after the S3 server so that Ray's workers inherit the AWS_* environment.
    """
    import ray

    from raybackfill import NAMESPACE

    # Ray workers inherit the environment: the user encoders of tests/encoder_plugins.py import there too, as a
    # job's working_dir would ship them (tests/test_integration_cluster.py covers that path).
    tests_dir = os.path.dirname(os.path.abspath(__file__))
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (tests_dir, os.environ.get("PYTHONPATH")) if p)
    ray.init(
        num_cpus=2,
        object_store_memory=400 * 1024**2,
        include_dashboard=False,
        namespace=NAMESPACE,
        log_to_driver=False,
        configure_logging=False,
    )
    yield ray
    ray.shutdown()
