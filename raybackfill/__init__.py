"""raybackfill: upgrade the embedding model of a retrieval service without downtime."""

__version__ = "0.1.0"

# Every entry point (jobs, CLI, tests) attaches to named actors in this namespace.
NAMESPACE = "raybackfill"
