"""Evaluation math (numpy only, no Ray): metrics over a gallery of parts, backfill curves, report, plots.

metrics: top-1/top-5, mAP@all, mAP@R, negative flips, cross tests.  curves: M(beta), AUC, relative gain.
report: the report.json schema, tables, merge/compare.  plots: the PNG of the curves.
"""
