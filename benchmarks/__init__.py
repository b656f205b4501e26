"""Side-by-side benchmarks of the project's paths against bare baselines (``python -m benchmarks.run``)."""
