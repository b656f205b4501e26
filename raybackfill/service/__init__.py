"""The HTTP search service: a Ray Serve application in front of the index router.

- :mod:`~raybackfill.service.queries`: raw queries (images, texts) -> the query vectors a strategy needs.
- :mod:`~raybackfill.service.api`: request and response shapes, validation, typed errors (no Ray).
- :mod:`~raybackfill.service.config`: :class:`ServiceConfig`, Serve's ``args`` of the application.
- :mod:`~raybackfill.service.app`: the deployment, ``build_app`` (``raybackfill.service.app:build_app``), ``deploy``.
- :mod:`~raybackfill.service.client`: a small HTTP client (urllib) for the CLI, the demo and the benchmarks.

This file imports nothing, so the client does not pull in Ray Serve.
"""
