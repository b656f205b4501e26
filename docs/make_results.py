"""Regenerate docs/results.md from the demo reports kept in docs/results/ (run from the checkout root):

    python docs/make_results.py

Each report is the report.json of the command listed for it below, copied here. The page is never edited by
hand: change a run, copy its report.json over the old one, and run this script (a test checks the page is
what this script makes of the reports).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

from raybackfill.eval.chain import chain_table
from raybackfill.eval.findings import Z_CLEAR, Verdict, findings
from raybackfill.eval.report import compare_reports, findings_table, load_report, render_table

HERE = Path(__file__).resolve().parent
RESULTS, PAGE, README = HERE / "results", HERE / "results.md", HERE.parent / "README.md"
README_START, README_END = "<!-- results:start (docs/make_results.py) -->", "<!-- results:end -->"
DIGITS = "digits"  # the table made by the commands in DIGITS_SETUP


@dataclass(frozen=True)
class Run:
    name: str  # docs/results/<name>.json
    label: str
    command: str


MAIN_RUNS = (
    Run("full", "built-in, full", "raybackfill demo --seed 0 --out demo-full"),
    Run("quick", "built-in, quick", "raybackfill demo --quick --seed 0 --out demo-quick"),
    Run("digits", "digits, quick", f"raybackfill demo --quick --seed 0 --data {DIGITS} --out demo-digits"),
)
SEED_RUNS = tuple(
    Run(f"quick-seed{s}", f"quick, seed {s}", f"raybackfill demo --quick --seed {s} --out demo-quick-{s}")
    for s in (1, 2, 3, 4)
) + tuple(
    Run(f"digits-seed{s}", f"digits, seed {s}", f"raybackfill demo --quick --seed {s} --data {DIGITS} --out demo-d{s}")
    for s in (1, 2)
)
TEXT_RUNS = (
    *(
        Run(
            f"text-quick-seed{s}",
            f"text, quick, seed {s}",
            f"raybackfill demo --text --quick --seed {s} --out demo-text-{s}",
        )
        for s in (0, 1, 2)
    ),
    Run("text-full", "text, full", "raybackfill demo --text --seed 0 --out demo-text"),
)
CHAIN_RUNS = (
    Run("quick-chain", "quick, chained upgrade", "raybackfill demo --quick --chain --seed 0 --out demo-quick-chain"),
)
DIGITS_SETUP = (
    "python -c \"import sys; sys.path.insert(0, 'tests'); from real_data import export_digits; "
    "export_digits('digits-folder')\"",
    f"raybackfill data import imagefolder digits-folder --out {DIGITS} --size 16",
)
ANCHORS = (
    ("old_old", "old query / old gallery"),
    ("new_new", "new / new"),
    ("bct_old", "BCT query / old gallery"),
    ("ract_old", "RACT query / old gallery"),
    ("new_fct", "new / FCT h(old)"),
    ("new_fct_side_info", "new / FCT h(old, side)"),
    ("new_fastfill", "new / FastFill h(old)"),
    ("new_fastfill_side_info", "new / FastFill h(old, side)"),
    ("psi_old", "psi(new query) / old gallery"),
)


def _reports(runs: tuple[Run, ...]) -> dict[Run, dict]:
    paths = {run: RESULTS / f"{run.name}.json" for run in runs}
    return {run: load_report(str(path)) for run, path in paths.items() if path.exists()}


def kept_runs() -> tuple[Run, ...]:
    """Every run this page reads, in the order it lists them (one ``docs/results/<name>.json`` each)."""
    return MAIN_RUNS + SEED_RUNS + TEXT_RUNS + CHAIN_RUNS


def _field(run: Run, report: dict, *path: str):
    """``report[path[0]][path[1]]...``, or a ValueError naming the run and the missing field."""
    value = report
    for i, key in enumerate(path):
        if not isinstance(value, dict) or key not in value:
            raise ValueError(f"docs/results/{run.name}.json: no '{'.'.join(path[: i + 1])}'")
        value = value[key]
    return value


def _pair(values: dict) -> str:
    return f"{values['top1']:.3f} / {values['map']:.3f}"


def _adapters(reports: dict[Run, dict]) -> list[str]:
    """One table per image-demo report with an ``adapters`` section: new-model queries against the old gallery
    sent through each map (label-free adapters, then the transformations trained with labels), next to old/old
    and new/new; each row's verdict is the report's ``above_old_old``."""
    lines: list[str] = []
    for run, report in reports.items():
        section = report.get("adapters")
        if section is None:
            continue
        oo, nn = _field(run, report, "adapters", "old_old"), _field(run, report, "adapters", "new_new")
        rows = [
            ["old query / old gallery (no upgrade)", "-", _pair(oo), "-", "-", "-"],
            ["new query / new gallery (everything re-embedded)", "-", _pair(nn), "-", "-", "-"],
        ]
        for r in _field(run, report, "adapters", "rows"):
            recall = r.get("gate", {}).get("score", {}).get("recall")
            rows.append(
                [
                    f"new query / {r['name']}(old)",
                    "none (label-free adapter)" if r["label_free"] else "labels + the new classifier",
                    _pair(r),
                    "-" if r["gain_top1"] is None else f"{r['gain_top1']:+.2f}",
                    "-" if recall is None else f"{recall:.3f}",
                    "above old/old" if r["above_old_old"] else "**below old/old**",
                ]
            )
        ks = sorted({r["gate"]["score"]["k"] for r in section["rows"] if "gate" in r})
        gate = "gate recall@" + ("/".join(map(str, ks)) or "k")
        header = ["search", "trained with", "top-1 / mAP", "share of the top-1 gain", gate, "verdict"]
        below = _field(run, report, "adapters", "below_old_old")
        lines += [
            f"### {run.label}",
            "",
            f"`{run.command}`, {report['queries']['evaluated']} queries.",
            "",
            render_table(header, rows, markdown=True),
            "",
            f"Below old/old (would serve worse than not upgrading): {', '.join(below) if below else 'none'}.",
            "",
        ]
    return lines


def _chain(reports: dict[Run, dict]) -> list[str]:
    """One section per kept report with a ``chain`` section (``demo --chain``): v3 against v2 on their validation
    split, then the chain's table (raybackfill.eval.chain.chain_table)."""
    if not reports:
        return []
    lines = [
        "## Chained upgrades",
        "",
        "v1 -> v2 -> v3 with the v3 upgrade started while v2's backfill was unfinished, and after it finished",
        "([Chained upgrades](concepts.md#chained-upgrades)): v3 queries; items v2 never re-embedded are served",
        "through h23(h12(phi1)) until v3 re-embeds them. A priority order's z is its gap to the random orders in",
        f"their standard deviation: *noise* inside {Z_CLEAR:g} of them.",
        "",
    ]
    for run, report in reports.items():
        chain = _field(run, report, "chain")
        v3 = _field(run, report, "chain", "v3")
        lines += [
            f"### {run.label}: `{run.command}`",
            "",
            f"v3 (trunk width {v3['width']}, v2's {v3['v2_width']}): accuracy {v3['val_accuracy']:.3f} on its "
            f"{v3['measured_on']}, v2 {v3['v2_val_accuracy']:.3f}.",
            "",
            chain_table(chain, markdown=True),
            "",
        ]
    return lines


def _z(gap: dict) -> str:
    return "-" if gap.get("z") is None else f"{gap['z']:+.1f}"


def _text_rows(reports: dict[Run, dict]) -> list[list[str]]:
    rows = []
    for run, report in reports.items():
        v = _field(run, report, "text_demo", "verdicts")
        new, best = _field(run, report, "text_demo", "verdicts", "new_new_vs_old_old"), v.get("best_adapter")
        gap = _field(run, report, "text_demo", "verdicts", "best_adapter_vs_old_old")
        adapter = (
            "none passed the gate"
            if best is None
            else f"{best} {v['best_adapter_top1']:.3f} (z {_z(gap)}, {gap['verdict']})"
        )
        u = _field(run, report, "text_demo", "verdicts", "uncertainty_vs_random")
        order = (
            f"{u['verdict']}: {u.get('why', '')}"
            if "auc_map" not in u
            else f"{u['auc_map']:.3f} vs {u['random_mean']:.3f} ± {u['random_sd']:.3f} over {u['random_orders']} "
            f"orders (z {_z(u)}, {u['verdict']})"
        )
        rows.append(
            [
                run.label,
                str(report["queries"]["evaluated"]),
                f"{v['old_old_top1']:.3f}",
                f"{v['new_new_top1']:.3f} (z {_z(new)}, {new['verdict']})",
                adapter,
                ", ".join(v["adapters_below_old_old"]) or "none",
                order,
            ]
        )
    return rows


def _text_gate(reports: dict[Run, dict]) -> str:
    """Per adapter kind and text run: the gate's recall@k on held-out pairs, then the top-1 of new queries on
    the old gallery through it (the evaluation split)."""
    kinds: list[str] = []
    for run, report in reports.items():
        kinds += [k for k in _field(run, report, "text_demo", "gate", "adapters") if k not in kinds]
    rows = []
    for kind in kinds:
        cells = []
        for report in reports.values():
            gate = report["text_demo"]["gate"]
            record = gate["adapters"].get(kind)
            top1 = {r["name"]: r["top1"] for r in report["adapters"]["rows"]}.get(kind)
            if record is None:
                cells.append("-")
                continue
            mark = " (kept)" if gate.get("kept") == kind else ("" if record["passes"] else " (refused)")
            cells.append(f"{record['score']['recall']:.3f} / {'-' if top1 is None else f'{top1:.3f}'}{mark}")
        rows.append([kind, *cells])
    ks = "/".join(sorted({str(r["text_demo"]["gate"]["k"]) for r in reports.values()}))
    return render_table([f"adapter (recall@{ks} / top-1)", *(run.label for run in reports)], rows, markdown=True)


def _text_tally(reports: dict[Run, dict]) -> list[str]:
    """Per claim of the text demo, how many runs gave each verdict (read from the reports)."""
    claims = (
        ("new_new_vs_old_old", "new/new above old/old"),
        ("best_adapter_vs_old_old", "the gate's adapter above old/old"),
        ("uncertainty_vs_random", "the uncertainty order's mAP area above the band of random orders"),
    )
    n, lines = len(reports), []
    for key, claim in claims:
        verdicts = [_field(run, r, "text_demo", "verdicts", key)["verdict"] for run, r in reports.items()]
        counts = {v.value: verdicts.count(v.value) for v in Verdict}
        rest = ", ".join(f"{v} in {counts[v]}" for v in ("noise", "reversed", "missing") if counts[v])
        lines.append(f"- {claim}: holds in {counts['holds']} of {n} runs" + (f"; {rest}" if rest else "") + ".")
    below = sum(bool(r["text_demo"]["verdicts"]["adapters_below_old_old"]) for r in reports.values())
    lines.append(f"- at least one label-free adapter below old/old: in {below} of {n} runs.")
    return lines


def _text(reports: dict[Run, dict]) -> list[str]:
    if not reports:
        return []
    return [
        "## The text demo",
        "",
        "`raybackfill demo --text` upgrades a text encoder with no labels on the upgrade path (see",
        "[the text demo](concepts.md#the-text-demo)): v1 a hashed bag of words, v2 character n-grams, the",
        "adapters fitted on a paired sample and gated on held-out pairs. Each run's `report.json` is kept here:",
        "",
        "| run | command |",
        "|---|---|",
        *(f"| {run.label} | `{run.command}` |" for run in reports),
        "",
        "Top-1 of new-model queries. z is the gap to old/old in standard errors of the two shares; the",
        "uncertainty order's mAP area is set against the mean ± sd of the random orders' areas. Each verdict is",
        f"the report's: *holds* at z >= {Z_CLEAR:g}, *reversed* at z <= -{Z_CLEAR:g}, *noise* in between.",
        "",
        render_table(
            [
                "run",
                "queries",
                "old/old",
                "new/new",
                "the gate's adapter",
                "below old/old",
                "uncertainty order vs random (mAP area)",
            ],
            _text_rows(reports),
            markdown=True,
        ),
        "",
        "Every adapter kind on the same runs: the gate's recall on held-out pairs (labels not used), then the",
        "top-1 of new queries on the old gallery mapped by it:",
        "",
        _text_gate(reports),
        "",
        "Counted over the runs above:",
        "",
        *_text_tally(reports),
        "",
    ]


def _anchors(reports: dict[Run, dict]) -> str:
    rows = []
    for key, label in ANCHORS:
        cells = []
        for report in reports.values():
            a = report["anchors"].get(key)
            cells.append("-" if a is None else f"{a['top1']:.3f} / {a['map']:.3f}")
        rows.append([label, *cells])
    return render_table(["cross test (top-1 / mAP)", *(run.label for run in reports)], rows, markdown=True)


def _training(reports: dict[Run, dict]) -> str:
    rows = []
    for run, report in reports.items():
        t = report.get("training")
        if not t:
            continue
        rates = ", ".join(f"{lr} -> {acc:.3f}" for lr, acc in t["lr_search"].items())
        kept = "; ".join(
            f"{name} {b['best_epoch'] + 1}/{b['epochs']} ({b['train_accuracy']:.2f} / {b['val_accuracy']:.2f})"
            for name, b in t["backbones"].items()
        )
        rows.append([run.label, f"{t['backbone_lr']:g}", rates, kept])
    header = ["run", "learning rate", "old model's validation accuracy by rate", "epoch kept (train / validation acc.)"]
    return render_table(header, rows, markdown=True)


def _timings(reports: dict[Run, dict]) -> str:
    rows = []
    for run, report in reports.items():
        t = report.get("timings")
        if t:
            rows.append([run.label, f"{t['total']:.0f} s", str(t["cpus"]), f"{t['load_average'][0]:.1f}"])
    return render_table(["run", "wall time", "CPUs", "load at start"], rows, markdown=True)


def _tally(reports: dict[Run, dict]) -> list[tuple[str, dict[str, int]]]:
    """Per finding, in order: how many of the runs gave each verdict."""
    per_run = [findings(report) for report in reports.values()]
    out = []
    for group in zip(*per_run, strict=True):
        counts = {v.value: sum(f.verdict == v for f in group) for v in Verdict}
        out.append((group[0].claim, counts))
    return out


def _tally_lines(reports: dict[Run, dict]) -> list[str]:
    n = len(reports)
    lines = []
    for claim, counts in _tally(reports):
        rest = ", ".join(f"{v} in {counts[v]}" for v in ("noise", "reversed", "missing") if counts[v])
        lines.append(f"- {claim}: holds in {counts['holds']} of {n} runs" + (f"; {rest}" if rest else "") + ".")
    return lines


def readme_summary() -> str:
    """One sentence for the README: how many of the papers' directions hold in every kept run."""
    every = _reports(MAIN_RUNS) | _reports(SEED_RUNS)
    tally = _tally(every)
    always = sum(counts["holds"] == len(every) for _, counts in tally)
    never = sum(counts["holds"] == 0 for _, counts in tally)
    return (
        f"Of the papers' {len(tally)} directions, {always} hold in all {len(every)} kept runs, "
        f"{len(tally) - always - never} in some of them and {never} in none; where one does not hold, its gap "
        "is noise or reversed. [docs/results.md](docs/results.md) gives every run's verdict and what it means."
    )


def render() -> str:
    main, seeds, text = _reports(MAIN_RUNS), _reports(SEED_RUNS), _reports(TEXT_RUNS)
    chain = _reports(CHAIN_RUNS)
    every = main | seeds
    adapters = _adapters(every)
    lines = [
        "# Results",
        "",
        "<!-- Generated by `python docs/make_results.py` from docs/results/*.json; do not edit by hand. -->",
        "",
        "Every figure below is read from the `report.json` of one demo run, kept in `docs/results/`. The built-in",
        "data is procedurally generated (`raybackfill data synth`); *digits* is the real UCI handwritten digits set",
        "that scikit-learn ships (1,797 8x8 greyscale images, 10 classes), exported as a class-per-folder tree and",
        "imported with the ImageFolder importer, so its table is sorted by class as real exports are:",
        "",
        "```bash",
        *DIGITS_SETUP,
        "```",
        "",
        "| run | command |",
        "|---|---|",
        *(f"| {run.label} | `{run.command}` |" for run in every),
        "",
        "The old model trains on the lower half of the classes, the new one on all of them; gallery and queries",
        "are disjoint splits (50 / 30 / 20 % train / gallery / query), scored by cosine similarity. Every backbone",
        "holds out 10 % of its training rows: they choose the epoch kept and, on the old model, the learning rate of",
        "all backbones. No figure was tuned on the gallery or query split.",
        "",
        "## Cross tests",
        "",
        _anchors(main),
        "",
        "## Backfill curves",
        "",
        "AUC is the mean of the metric over an even grid of backfill fractions; NFR the share of queries right under",
        "old/old and wrong during the backfill. Oracle rows (`column:oracle_loss`) order the gallery by each item's",
        "true FastFill error, computed from new embeddings a real backfill has not made yet: a bound, not a policy.",
        "",
        compare_reports({run.label: r for run, r in main.items()}, markdown=True),
        "",
        "## The papers' directions",
        "",
        "Each cell is the verdict and z, the gap in standard errors of its measurement (the spread of random",
        "backfill orders for curve areas, the binomial error for shares of queries): *holds* at "
        f"z >= {Z_CLEAR:g}, *reversed*",
        f"at z <= -{Z_CLEAR:g}, *noise* in between. A direction that is noise or reversed on a dataset is reported, "
        "not tuned.",
        "",
        findings_table(list(every.values()), [run.label for run in every], markdown=True),
        "",
        "## What the runs say",
        "",
        "Counted over every run above:",
        "",
        *_tally_lines(every),
        "",
        "A direction that holds in every run is a finding on these data. One that is noise in a run is not shown",
        "by that run, neither for nor against: the gap is inside the spread of its measurement. One that is",
        f"reversed in a run went the other way by at least {Z_CLEAR:g} standard errors there.",
        "",
        "These are small CNNs on small images, trained for minutes on a CPU, not the papers' ResNet-50s on",
        "CIFAR-100 or ImageNet. The demo trains its backbones without augmentation, so the new models come close",
        "to fitting their training set (see the training table below). Why: FastFill's uncertainty head learns",
        "each item's loss on that set, and this project's hypothesis is that the loss marks where the",
        "transformation fails only when the new model is right there. That is our hypothesis, not the papers':",
        "their reference code trains with augmentation and label smoothing. Where a direction does not hold here,",
        "this setting may be the reason; it is reported, not tuned away.",
        "",
        *(
            [
                "## Label-free adapters vs transformations trained with labels",
                "",
                "New-model queries against the old gallery sent through each map: the label-free adapters",
                "([Adapters](concepts.md#adapters)), fitted on the train split's stored old and new embeddings with",
                "the labels dropped, then FCT / FastFill trained with labels and the new model's classifier. The",
                "share of the gain is (top-1 - old/old) / (new/new - old/old); the gate's recall is on held-out",
                "pairs. A map is *below old/old* when its top-1 is not above it: serving it is worse than not",
                "upgrading, and the gate is what should refuse it.",
                "",
                *adapters,
            ]
            if adapters
            else []
        ),
        *_text(text),
        *_chain(chain),
        "## How the backbones trained",
        "",
        _training(every),
        "",
        "## Run times",
        "",
        _timings(every | text),
        "",
    ]
    return "\n".join(lines)


README_ROWS = (
    ("anchor", "old_old", "old model: old query / old gallery"),
    ("anchor", "new_new", "new model, gallery fully re-embedded"),
    ("anchor", "new_fastfill_side_info", "new query / FastFill-transformed gallery (no image read)"),
    ("run", ("fastfill_side_info", "uncertainty"), "FastFill + side-info backfill, uncertainty order (area)"),
    ("run", ("rank_merge_psi", "random"), "rank merge with psi, random order (area)"),
)


def readme_table() -> str:
    """The README's one results table: top-1 / mAP of the upgrade's key stages on the main runs."""
    main = _reports(MAIN_RUNS)
    rows = []
    for kind, key, label in README_ROWS:
        cells = []
        for report in main.values():
            if kind == "anchor":
                a = report["anchors"][key]
                cells.append(f"{a['top1']:.3f} / {a['map']:.3f}")
            else:
                run = next(r for r in report["runs"] if (r["method"], r["policy"]) == key)
                cells.append(f"{run['auc_top1']:.3f} / {run['auc_map']:.3f}")
        rows.append([label, *cells])
    return render_table(["top-1 / mAP", *(run.label for run in main)], rows, markdown=True)


def readme_block() -> str:
    """What stands between the README's results markers: the table, then the one-sentence summary."""
    return readme_table() + "\n\n" + readme_summary()


def readme_with_table(text: str) -> str:
    """``text`` (the README) with the block between the results markers replaced by :func:`readme_block`."""
    start, end = text.index(README_START) + len(README_START), text.index(README_END)
    return text[:start] + "\n" + readme_block() + "\n" + text[end:]


def main(argv: list[str]) -> int:
    PAGE.write_text(render())
    README.write_text(readme_with_table(README.read_text()))
    print(f"wrote {PAGE} and the results table of {README}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
