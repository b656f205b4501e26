"""Evaluating an upgrade: metrics over a gallery of parts, backfill curves, report, plots (numpy/FAISS), and
the live quality of the serving index (the one module here that talks to Ray).

metrics: top-1/top-5, mAP@all, mAP@R, negative flips, cross tests.  curves: M(beta), AUC, relative gain.
report: the report.json schema, tables, merge/compare.  plots: the PNG of the curves.
offline: embedding tables -> report.  live: top-1 / mAP@k of the serving index on a probe set.
"""
