"""init_ray: joins the local cluster of a `ray start` instead of failing on the resources it asks for."""

import pytest

from raybackfill import runtime


def test_joins_a_running_local_cluster(monkeypatch):
    calls = []

    def fake_init(**kwargs):
        calls.append(kwargs)
        if "num_cpus" in kwargs:
            raise ValueError("When connecting to an existing cluster, num_cpus and num_gpus must not be provided.")

    monkeypatch.setattr(runtime.ray, "is_initialized", lambda: False)
    monkeypatch.setattr(runtime.ray, "init", fake_init)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    runtime.init_ray(num_cpus=2)
    assert len(calls) == 2 and "num_cpus" not in calls[1] and calls[1]["namespace"] == "raybackfill"


def test_other_init_errors_surface(monkeypatch):
    def fake_init(**kwargs):
        raise ValueError("something else")

    monkeypatch.setattr(runtime.ray, "is_initialized", lambda: False)
    monkeypatch.setattr(runtime.ray, "init", fake_init)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    with pytest.raises(ValueError, match="something else"):
        runtime.init_ray()


def test_log_level_reaches_workers_through_runtime_env(monkeypatch):
    calls = []
    monkeypatch.setattr(runtime.ray, "is_initialized", lambda: False)
    monkeypatch.setattr(runtime.ray, "init", lambda **kw: calls.append(kw))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setenv("RAYBACKFILL_LOG_LEVEL", "DEBUG")
    runtime.init_ray()
    assert calls[0]["runtime_env"] == {"env_vars": {"RAYBACKFILL_LOG_LEVEL": "DEBUG"}}
