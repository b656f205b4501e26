"""Regenerate docs/benchmarks.md from the benchmark results kept in docs/benchmarks/ (run from the checkout root):

    python docs/make_benchmarks.py

Each file in docs/benchmarks/ is the JSON that ``python -m benchmarks.run --out FILE`` wrote, copied as is. The
page shows the latest of them (by its ``date_utc``) in full and lists the others. The page is never edited by
hand: run the suite, keep its JSON here, and run this script (a test checks the page is what this script makes).
The scale and plan-storage benchmarks keep theirs in docs/benchmarks/scale/ and docs/benchmarks/plan/; the page
shows the latest of each.
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS, PAGE = HERE / "benchmarks", HERE / "benchmarks.md"
SCALE_RESULTS = RESULTS / "scale"  # what ``python -m benchmarks.bench_scale --out FILE`` wrote
PLAN_RESULTS = RESULTS / "plan"  # what ``python benchmarks/bench_backfill.py --plan-only --out FILE`` wrote

# key -> (what it measures, in words; what the ratio compares)
KEYS = {
    "embed_pipeline_vs_bare": (
        "Embedding throughput of the project's Ray Data pipeline (read, decode, actor pool) against the faster "
        "of two warmed bare torch loops (one process with every thread, or one process per core), same table, "
        "model and batch size.",
        "pipeline / best bare loop, images/s",
    ),
    "transform_vs_reembed": (
        "The instant phase (forward transformation of stored old embeddings, no image read) against "
        "re-embedding the images with a backbone; both end to end with writes, same actor pool.",
        "transform / re-embed, items/s",
    ),
    "merged_query_vs_bare_faiss": (
        "Throughput of rank_merge queries on the sharded index, half of the gallery backfilled, against one "
        "bare FAISS IndexFlatIP with the faster of 1 or all threads.",
        "index / best bare index, queries/s",
    ),
    "p99_live_vs_idle": (
        "Single-query p99 latency while a thread upserts 10k-vector batches (as fast as the shards take them, "
        "then paced at 20k items/s) against the same queries on an idle index.",
        "p99 during upserts / p99 idle",
    ),
    "scale_1m": (
        "A backfill through the transform path (plan, instant phase into a live 2-shard index) at the largest "
        "size of the run: wall time and the peak memory (PSS) of every Ray process together.",
        "absolute: items/s and GB",
    ),
    "growth": (
        "The same backfill at each size of the run, then single-query latency: how time grows with the gallery.",
        "exponent b of time ~ n^b",
    ),
}
TARGET_SIZE = 1_000_000  # scale_1m's target is stated for a 1M-item gallery


def load_runs() -> list[dict]:
    """Every kept result, oldest first; each gets ``_file``, its name in docs/benchmarks/."""
    runs = []
    for path in sorted(RESULTS.glob("*.json")):
        run = json.loads(path.read_text())
        run["_file"] = path.name
        runs.append(run)
    return sorted(runs, key=lambda run: run["date_utc"])


def _load(entry_or_machine: dict) -> str:
    start, end = entry_or_machine["loadavg_start"], entry_or_machine["loadavg_end"]
    return f"{start[0]:.1f} -> {end[0]:.1f}"


def _meets(value: float, target: str) -> str:
    """'meets' or 'misses' for a target written as '>= X', '<= X', '> X' or '< X'."""
    op, text = target.split()[:2]
    number = float(text)
    checks = {">=": value >= number, "<=": value <= number, ">": value > number, "<": value < number}
    if op not in checks:
        raise ValueError(f"target {target!r}: expected one of {', '.join(checks)} and a number")
    return "meets" if checks[op] else "misses"


def _steady(value: float | None, unit: str = "") -> str:
    return "lost in noise" if value is None else f"{value:.2f}{unit}"


def _commands(run: dict) -> dict[str, str]:
    """The command that reproduces each key with this run's settings (from the checkout root)."""
    config = run["config"]
    shared = f"--cpus {config['cpus']} --repeats {config['repeats']} --seed {config['seed']}"
    quick = " --quick" if config["quick"] else ""
    backfill = f"python benchmarks/bench_backfill.py{quick} {shared}"
    index = f"python benchmarks/bench_index.py{quick} {shared}"
    sizes = ",".join(str(n) for n in config["sizes"])
    suite = f"python -m benchmarks.run{quick} --sizes {sizes} --out results.json"
    return {
        "embed_pipeline_vs_bare": backfill,
        "transform_vs_reembed": backfill,
        "merged_query_vs_bare_faiss": index,
        "p99_live_vs_idle": index,
        "scale_1m": suite,
        "growth": suite,
    }


def _measured(run: dict) -> dict[str, tuple[str, str]]:
    """key -> (the measured figures, the verdict against the target)."""
    targets = run["targets"]
    embed, transform = run["embed_pipeline_vs_bare"], run["transform_vs_reembed"]
    merged, live = run["merged_query_vs_bare_faiss"], run["p99_live_vs_idle"]
    scale, growth = run["scale_1m"], run["growth"]

    embed_text = (
        f"**{embed['ratio']:.2f}** end to end ({embed['pipeline_items_per_s']:,.0f} vs "
        f"{embed['bare_items_per_s']:,.0f} img/s; best bare: {embed['baseline']}); "
        f"**{embed['ratio_steady']:.2f}** in steady state ({embed['pipeline_steady_items_per_s']:,.0f} vs "
        f"{embed['bare_steady_items_per_s']:,.0f} img/s); the pool's first batch after "
        f"{embed['pipeline_startup_seconds']:.1f} s"
    )
    parts = []
    for name, figures in transform["by_backbone"].items():
        steady = figures["ratio_steady"]
        parts.append(
            f"**{figures['ratio']:.1f}x** end to end with {name} ({figures['transform_items_per_s']:,.0f} vs "
            f"{figures['reembed_items_per_s']:,.0f} items/s, {figures['reembed_images']:,} images), steady state "
            + ("lost in noise" if steady is None else f"{steady:.1f}x")
        )
    parts.append(
        f"compute bound (bare transformation / best bare embedding loop) {transform['compute_bound_ratio']:.1f}x"
    )
    others = ", ".join(
        f"{name} {ratio:.2f}" for name, ratio in merged["ratio_by_strategy"].items() if name != "rank_merge"
    )
    merged_text = (
        f"**{merged['ratio']:.2f}** ({merged['qps']:,.0f} vs {merged['bare_qps']:,.0f} QPS); other strategies: {others}"
    )
    busy, paced = live["during_upserts"], live["during_paced_upserts"]
    live_text = (
        f"**{live['ratio']:.2f}** unpaced ({busy['p99_ms']:.0f} vs {live['idle']['p99_ms']:.0f} ms, upserts at "
        f"{busy['upserts_per_s']:,.0f} items/s); **{live['ratio_paced']:.2f}** paced ({paced['p99_ms']:.0f} ms, "
        f"upserts at {paced['upserts_per_s']:,.0f} items/s); p50 idle {live['idle']['p50_ms']:.0f} ms"
    )
    scale_text = (
        f"{scale['items']:,} items in {scale['wall_seconds']:.1f} s: **{scale['items_per_s']:,.0f} items/s**; "
        f"peak PSS **{scale['peak_pss_gb']:.2f} GB** (RSS sum {scale['peak_rss_sum_bytes'] / 1e9:.2f} GB)"
    )
    if scale["items"] < TARGET_SIZE:
        scale_verdict = f"not judged: {scale['items']:,} items, the target is for {TARGET_SIZE:,}"
    else:
        fast = scale["items_per_s"] >= scale["target_items_per_s"]
        small = scale["peak_pss_gb"] < scale["target_gb"]
        scale_verdict = "meets" if fast and small else "misses"
    growth_text = (
        f"backfill {' / '.join(f'{s:.1f}' for s in growth['backfill_seconds'])} s: "
        f"~ n^{growth['exponent_backfill_seconds']:.2f}; query p50 "
        f"{' / '.join(f'{s:.0f}' for s in growth['query_p50_ms'])} ms: ~ n^{growth['exponent_query_p50']:.2f} "
        f"(sizes {' / '.join(f'{n:,}' for n in growth['items'])})"
    )
    return {
        "embed_pipeline_vs_bare": (embed_text, _meets(embed["ratio"], targets["embed_pipeline_vs_bare"])),
        "transform_vs_reembed": ("; ".join(parts), _meets(transform["ratio"], targets["transform_vs_reembed"])),
        "merged_query_vs_bare_faiss": (merged_text, _meets(merged["ratio"], targets["merged_query_vs_bare_faiss"])),
        "p99_live_vs_idle": (live_text, _meets(live["ratio"], targets["p99_live_vs_idle"])),
        "scale_1m": (scale_text, scale_verdict),
        "growth": (growth_text, "-"),
    }


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def _key_table(run: dict) -> list[str]:
    measured, commands, targets = _measured(run), _commands(run), run["targets"]
    lines = [
        "| key | what it measures | ratio | target | measured | verdict | reproduce |",
        "|---|---|---|---|---|---|---|",
    ]
    for key, (what, ratio) in KEYS.items():
        figures, verdict = measured[key]
        target = targets.get(key, "-")
        lines.append(
            f"| `{key}` | {_cell(what)} | {ratio} | {_cell(target)} | {_cell(figures)} | {verdict} | "
            f"`{commands[key]}` |"
        )
    return lines


def _machine(run: dict) -> list[str]:
    m = run["machine"]
    blas = m.get("numpy_blas") or {}
    usable = m.get("cpus_usable")
    cores = f"{m['cpus']} cores" + (f" ({usable} usable)" if usable and usable != m["cpus"] else "")
    parts = {
        "backfill benchmarks": run["embed_pipeline_vs_bare"],
        "index benchmarks": run["merged_query_vs_bare_faiss"],
        "largest scale point": run["scale_1m"],
    }
    before = m["loadavg_start"][0]
    peak = max(x[0] for entry in (m, *parts.values()) for x in (entry["loadavg_start"], entry["loadavg_end"]))
    lines = [
        f"- When: {run['date_utc']}, {run['seconds'] / 60:.0f} minutes, "
        f"{'quick sizes (`--quick`)' if run['config']['quick'] else 'full sizes'}, on CPU only.",
        f"- Machine: {cores}, {m.get('platform', 'platform unknown')}; Python {m['python']}, torch {m['torch']}, "
        f"FAISS {m['faiss']}, numpy {m['numpy']} on {blas.get('name')} {blas.get('version')}, Ray {m['ray']}.",
        f"- Load (1-minute load average): {before:.1f} before the suite started anything, "
        + ", ".join(f"{name} {_load(entry)}" for name, entry in parts.items())
        + f", {m['loadavg_end'][0]:.1f} at the end. The suite itself keeps about {m['cpus']} cores busy.",
    ]
    if peak > 2 * m["cpus"]:
        lines.append(
            f"- **Other work competed for the CPUs during this run** (load up to {peak:.1f} on {m['cpus']} cores). "
            "Its figures show that the suite runs end to end; they do not measure this code's speed. Re-run on an "
            "idle machine before reading anything into a ratio."
        )
    elif before > 0.5 * m["cpus"]:
        lines.append(
            f"- The machine was not idle when the run started (load {before:.1f} on {m['cpus']} cores): "
            "read the ratios with that in mind."
        )
    return lines


def _details(run: dict) -> list[str]:
    lines = []
    for key in (
        "embed_pipeline_vs_bare",
        "transform_vs_reembed",
        "merged_query_vs_bare_faiss",
        "p99_live_vs_idle",
        "scale_1m",
    ):
        lines.append(f"- `{key}`: {run[key]['what']}.")
    return lines


def _index_kinds(run: dict) -> list[str]:
    """The per-kind table (recall, QPS, bytes per item next to bare FAISS); runs from before it have none."""
    kinds = run.get("index_kinds")
    if not kinds:
        return []
    lines = [
        "## Index kinds",
        "",
        f"{kinds['what']}. Reproduce: `python benchmarks/bench_index.py kinds --n N` "
        f"(target: merged QPS >= {kinds['target_qps_ratio']}x bare).",
        "",
    ]
    split = all("split_qps_ratio" in k for k in kinds["by_factory"].values())
    swept = all("qps_ratio_by_shards" in k for k in kinds["by_factory"].values())
    alone = all("one_space_qps_ratio" in k for k in kinds["by_factory"].values())
    routed = all("router_qps_ratio" in k for k in kinds["by_factory"].values())
    transform = all("transform_qps_ratio" in k for k in kinds["by_factory"].values())
    spread = all("qps_ratio_rounds" in k for k in kinds["by_factory"].values())
    if split:
        lines += [
            "The ratio is the product of two: *split* is bare FAISS searching the same parts as the router (each "
            "shard's old and new space) one after the other in one process, against one bare index: what "
            "splitting the gallery costs FAISS itself. *serving* is the index against those bare parts: what Ray "
            "calls, the merge and processes sharing the cores add.",
            "",
        ]
    if alone:
        lines += [
            "*one space* is the index answering the same queries before any item moved, every item in the old "
            "space (one FAISS search per shard, merged across the shards), against the bare index: what serving "
            "costs when a query searches one space (before and after a backfill); the other columns are the "
            "two-space query of a backfill under way.",
            "",
        ]
    if transform:
        lines += [
            "*transform path* is the index during a transform-path backfill (FCT, FastFill): after the moves, "
            "the items still old are transformed into the new space and some of those re-embedded in place, so "
            "every item is in the new space and some rows were replaced (a graph index keeps them as deleted "
            "rows until its rebuild). A query searches one space, one FAISS search per shard, against the bare "
            "index over the same items; its recall@10 is in brackets.",
            "",
        ]
    if routed:
        lines += [
            "The index is searched as the HTTP service searches it: the client calls the shards "
            "(`IndexSearcher`). *via router* is the same two-space and one-space searches through the router, "
            "one Ray call more.",
            "",
        ]
    if spread:
        lines += [
            "Each side's figure is its best round, as the QPS columns are. In square brackets, the lowest and "
            "highest of the same ratio paired within one round (the index against the fastest bare thread count "
            "of that round): a ratio moves that far from one round to the next on this shared machine, so two "
            "figures inside each other's range are not a difference.",
            "",
        ]
    if swept:
        lines += [
            "The router serves with each shard count in *ratio by shards*; the best is the row's figure, as the "
            "bare side's fastest thread count is its own.",
            "",
        ]
    lines += [
        "| factory | search and build parameters | recall@10 | bare recall@10 | QPS | bare QPS | ratio "
        + ("| split | serving " if split else "")
        + ("| ratio by shards " if swept else "")
        + ("| one space " if alone else "")
        + ("| transform path (recall@10) " if transform else "")
        + ("| via router (one space) " if routed else "")
        + "| bytes/item served (held) | bare bytes/item |",
        "|---|---|---|---|---|---|---|"
        + ("---|---|" if split else "")
        + ("---|" if swept else "")
        + ("---|" if alone else "")
        + ("---|" if transform else "")
        + ("---|" if routed else "")
        + "---|---|",
    ]

    def ratio(k: dict, key: str) -> str:
        rounds = k.get(f"{key}_rounds")
        return f"{k[key]:.2f}" + (f" [{min(rounds):.2f}-{max(rounds):.2f}]" if spread and rounds else "")

    for factory, k in kinds["by_factory"].items():
        given = {**k["search_params"], **k.get("build_params", {})}
        params = ", ".join(f"{name}={value}" for name, value in given.items()) or "-"
        by_shards = (
            ", ".join(f"{shards}: {ratio:.2f}" for shards, ratio in k["qps_ratio_by_shards"].items()) if swept else ""
        )
        lines.append(
            f"| `{factory}` | {params} | {k['recall_at_10']:.3f} | {k['bare_recall_at_10']:.3f} | {k['qps']:,.0f} "
            f"| {k['bare_qps']:,.0f} | {ratio(k, 'qps_ratio')} "
            + (f"| {k['split_qps_ratio']:.2f} | {ratio(k, 'serving_qps_ratio')} " if split else "")
            + (f"| {by_shards} " if swept else "")
            + (f"| {ratio(k, 'one_space_qps_ratio')} ({k['one_space_shards']}) " if alone else "")
            + (f"| {ratio(k, 'transform_qps_ratio')} ({k['transform_recall_at_10']:.3f}) " if transform else "")
            + (f"| {k['router_qps_ratio']:.2f} ({k['router_one_space_qps_ratio']:.2f}) " if routed else "")
            + f"| {k['bytes_per_item_served']:.0f} "
            f"({k['bytes_per_item_held']:.0f}) | {k['bare_bytes_per_item']:.0f} |"
        )
    if alone and transform and split:
        lines += ["", *_kinds_verdicts(kinds)]
    return [*lines, ""]


def _verdict(value: float, rounds: list[float] | None, target: float) -> str:
    """Whether a QPS ratio meets its target: its best round does; only its range reaches it (a miss inside the
    round-to-round spread, noise); or not even its best-paired round does."""
    if value >= target:
        return "meets"
    if rounds and max(rounds) >= target:
        return "within the spread"
    return "misses"


def _kinds_verdicts(kinds: dict) -> list[str]:
    """Each kind against the QPS target, per query: one space and the transform path against the bare index;
    two spaces against the bare index and, beside it, against bare FAISS over the same parts (the only bare
    deployment that can hold two spaces of a real backfill, whose vectors are not comparable)."""
    target = kinds["target_qps_ratio"]
    lines = [
        f"Against the target (merged QPS >= {target}x bare). A real backfill's two spaces hold vectors of two "
        "models, which no single bare index can hold: bare FAISS would search one index per space and merge, the "
        "*split* above, so the two-space query is judged as a whole and by its *serving* factor (against bare "
        "FAISS over the same parts). A graph kind cannot remove a row: during the transform path its new space "
        "keeps the rows that re-embedding replaced until a rebuild, and so would bare FAISS (which excludes them "
        "with an IDSelector); *replaced rows* is that bare index against the clean one, and the transform path is "
        "judged by its *serving* factor beside it.",
        "",
    ]
    for factory, k in kinds["by_factory"].items():
        one, moving, two, serving = (
            _judged(k, key, target)
            for key in ("one_space_qps_ratio", "transform_qps_ratio", "qps_ratio", "serving_qps_ratio")
        )
        if "transform_replaced_qps_ratio" in k:  # a graph kind: the replaced rows' own cost, then serving's
            moving += (
                f" = replaced rows {k['transform_replaced_qps_ratio']:.2f} x serving "
                f"{_judged(k, 'transform_serving_qps_ratio', target)}"
            )
        lines.append(
            f"- `{factory}`: one space {one}, transform path {moving}, two spaces {two} = split "
            f"{k['split_qps_ratio']:.2f} x serving {serving}"
        )
    return lines


def _judged(kind: dict, key: str, target: float) -> str:
    return f"{kind[key]:.3f} ({_verdict(kind[key], kind.get(f'{key}_rounds'), target)})"


def _kept_runs(directory: Path) -> list[dict]:
    """Every result kept in a folder of docs/benchmarks/, oldest first, each with its ``_file`` (the path there)."""
    runs = []
    for path in sorted(directory.glob("*.json")):
        run = json.loads(path.read_text())
        run["_file"] = f"{directory.name}/{path.name}"
        runs.append(run)
    return sorted(runs, key=lambda run: run["date_utc"])


def load_scale_runs() -> list[dict]:
    """Every kept scale result (docs/benchmarks/scale/), oldest first."""
    return _kept_runs(SCALE_RESULTS)


def load_plan_runs() -> list[dict]:
    """Every kept plan-storage result (docs/benchmarks/plan/), oldest first."""
    return _kept_runs(PLAN_RESULTS)


def _plan(runs: list[dict]) -> list[str]:
    """The latest plan-storage run: the plan's bytes against the gallery's and against the former plan's copy."""
    if not runs:
        return []
    run = runs[-1]
    plan, config = run["plan_storage"], run["config"]
    target = plan["target_fraction"]
    fraction = plan["plan_fraction"]
    n = plan["planned_items"]
    verdict = _meets(fraction, f"< {target}")
    rows = [
        ("plan: ids, ranks and where each row lives", plan["plan_bytes"], fraction),
        ("former plan: the rows copied into tiers", plan["former_plan_bytes"], plan["former_plan_fraction"]),
        ("the gallery", plan["gallery_bytes"], 1.0),
    ]
    return [
        "## Plan storage",
        "",
        f"`docs/benchmarks/{run['_file']}` ({run['date_utc']}; load {_load(run['machine'])}). The priority plan "
        f"of a gallery of {n:,} JPEGs against the gallery itself and against what the former plan stored "
        f"(written in the same run): {plan['what']}. Reproduce: `python benchmarks/bench_backfill.py --plan-only "
        f"--plan-images {config['plan_images']} --plan-size {config['plan_size']} --repeats {config['repeats']} "
        "--out FILE` (it writes FILE's name with `_plan`).",
        "",
        "| stored | bytes | bytes per item | share of the gallery's bytes |",
        "|---|---|---|---|",
        *(f"| {what} | {size:,.0f} | {size / n:,.1f} | {100 * share:.2f} % |" for what, size, share in rows),
        "",
        f"Target: the plan < {100 * target:.0f} % of the gallery's bytes: {100 * fraction:.2f} % ({verdict}). The "
        f"plan's bytes per item do not depend on the images, so any gallery whose images average more than "
        f"{plan['plan_bytes'] / n / target:,.0f} bytes meets it. "
        f"Time (median of {len(plan['plan_seconds'])}): the plan {statistics.median(plan['plan_seconds']):.1f} s, "
        f"the former copy {statistics.median(plan['former_plan_seconds']):.1f} s.",
        "",
    ]


def _scale(runs: list[dict]) -> list[str]:
    """The latest scale run: each size's load, backfill, memory, recall and latency, against the targets."""
    if not runs:
        return []
    run = runs[-1]
    config, largest = run["config"], run["largest"]
    targets = run["targets"]
    lines = [
        "## Scale: the largest gallery on one box",
        "",
        f"`docs/benchmarks/{run['_file']}` ({run['date_utc']}, {run['seconds'] / 60:.0f} min; load "
        f"{_load(largest)} during the largest backfill). A clustered synthetic gallery of d={config['dim']} unit "
        f"vectors ({config['clusters']} clusters) streamed into {config['shards']} shards of `{config['index']}` "
        f"({_nprobe_text(config)}; each space trained on {config['train_sample']:,} vectors), then backfilled "
        "through the transform path (plan by id, instant phase, no image re-embedded) while one client sends "
        f"single `{config['strategy']}` queries (k={config['k']}). Recall@10 is against an exact scan of the "
        f"old table, for queries on the old space right after the load; {_transformation_text(config)} Memory is "
        "the peak PSS of this process and every Ray process. Reproduce: "
        f"`python -m benchmarks.bench_scale --sizes {','.join(str(n) for n in config['sizes'])} "
        f"--index '{config['index']}' --out FILE`.",
        "",
        "Items/s *alone* is the backfill with no query running; *under probes* is the same backfill while the "
        "client sends its queries back to back, which the index serves first.",
        "",
        "| items | load (s) | backfill items/s alone (under probes) | peak PSS (GB) | nprobe | recall@10 "
        "| p50 / p99 idle (ms) | p50 / p99 during the backfill (ms) | p99 ratio "
        "| paced: items/s, p50 / p99 (ms), p99 ratio |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for p in run["points"]:
        paced = p.get("paced")
        paced_text = (
            f"{paced['items_per_s']:,.0f}, {paced['during_backfill']['p50_ms']:.1f} / "
            f"{paced['during_backfill']['p99_ms']:.1f}, {paced['p99_ratio']:.2f}"
            if paced
            else "not run"
        )
        lines.append(
            f"| {p['items']:,} | {p['load_seconds']:.0f} | {_alone(p)} ({p['backfill_items_per_s']:,.0f}) "
            f"| {p['peak_pss_gb']:.2f} "
            f"| {p.get('nprobe', config.get('nprobe'))} | {p['recall_at_10']:.3f} "
            f"| {p['idle']['p50_ms']:.1f} / {p['idle']['p99_ms']:.1f} "
            f"| {p['during_backfill']['p50_ms']:.1f} / {p['during_backfill']['p99_ms']:.1f} | {p['p99_ratio']:.2f} "
            f"| {paced_text} |"
        )
    lines += ["", f"Targets at {largest['items']:,} items:", ""]
    for key, target in targets.items():
        value = largest.get(key)
        if value is None:
            lines.append(f"- `{key}` {target}: not measured in this run")
            continue
        shown = f"{value:,.0f}" if abs(value) >= 100 else f"{value:.3g}"
        lines.append(f"- `{key}` {target}: {shown} ({_meets(value, target)})")
    growth = run["growth"]
    lines += [
        "",
        f"Growth from {growth['items'][0]:,} to {growth['items'][-1]:,} items (exponent b of time ~ n^b): load "
        f"{growth['exponent_load_seconds']:.2f}, backfill {growth['exponent_backfill_seconds']:.2f}, peak PSS "
        f"{growth['exponent_peak_pss']:.2f}, idle p50 latency {growth['exponent_idle_p50']:.2f}.",
        "",
        *_windows(largest),
    ]
    if len(runs) > 1:
        lines += [
            "Every kept scale run, largest size (newest first; validation recall per nprobe tried, when chosen):",
            "",
            "| file | index | items | nprobe (validation recall@10 per nprobe) | recall@10 | peak PSS (GB) "
            "| backfill items/s alone (under probes) | p99 ratio | paced p99 ratio |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for kept in reversed(runs):
            p = kept["largest"]
            tried = ", ".join(f"{n}: {r:.3f}" for n, r in (p.get("nprobe_validation_recall") or {}).items())
            nprobe = p.get("nprobe", kept["config"].get("nprobe"))
            paced = f"{p['paced']['p99_ratio']:.2f}" if p.get("paced") else "not run"
            lines.append(
                f"| `docs/benchmarks/{kept['_file']}` | `{kept['config']['index']}` | {p['items']:,} "
                f"| {nprobe}{f' ({tried})' if tried else ''} | {p['recall_at_10']:.3f} | {p['peak_pss_gb']:.2f} "
                f"| {_alone(p)} ({p['backfill_items_per_s']:,.0f}) | {p['p99_ratio']:.2f} | {paced} |"
            )
        lines.append("")
    return lines


def _alone(point: dict) -> str:
    """The backfill's own rate (runs from before it was measured alone have only the rate under probes)."""
    alone = point.get("backfill_alone_items_per_s")
    return "-" if alone is None else f"{alone:,.0f}"


def _windows(largest: dict) -> list[str]:
    """Where in the largest backfill the latency tail is: p99 per 10 s window (runs that recorded it)."""
    lines = []
    for label, windows in (
        ("the backfill", largest["during_backfill"].get("windows")),
        ("the paced backfill", (largest.get("paced") or {}).get("windows")),
    ):
        if not windows:
            continue
        cells = ", ".join(f"{w['start_s']:.0f} s: {w['p99_ms']:.0f}" for w in windows)
        lines += [f"p99 (ms) per 10 s window of {label}, by start time: {cells}.", ""]
    return lines


def _transformation_text(config: dict) -> str:
    if config.get("fit_steps"):
        return (
            f"the forward transformation is trained for {config['fit_steps']} steps to keep the space's structure, "
            "as a trained FCT does, so the new index's lists are balanced."
        )
    return (
        "this run's transformation was untrained and collapsed its output into one direction (one huge IVF list "
        "in the new space, so queries slowed as the backfill went on)."
    )


def _nprobe_text(config: dict) -> str:
    if config.get("nprobe") is not None:
        return f"nprobe {config['nprobe']}"
    return (
        "nprobe per size chosen on separate validation queries: the smallest reaching the recall target plus a "
        "margin, else the smallest within a tie of the best; the recall shown is on the evaluation queries"
    )


def _kept(runs: list[dict]) -> list[str]:
    lines = [
        "| file | date (UTC) | sizes | minutes | load at start | embed | transform | merged query | p99 |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for run in reversed(runs):
        lines.append(
            f"| `docs/benchmarks/{run['_file']}` | {run['date_utc']} | {'quick' if run['config']['quick'] else 'full'} "
            f"| {run['seconds'] / 60:.0f} | {run['machine']['loadavg_start'][0]:.1f} "
            f"| {run['embed_pipeline_vs_bare']['ratio']:.2f} | {run['transform_vs_reembed']['ratio']:.1f}x "
            f"| {run['merged_query_vs_bare_faiss']['ratio']:.2f} | {run['p99_live_vs_idle']['ratio']:.2f} |"
        )
    return lines


def _duration(runs: list[dict], quick: bool) -> str:
    """How long the newest kept run of these sizes took (the Reproduce block's estimate comes from a real run)."""
    minutes = [run["seconds"] / 60 for run in runs if run["config"]["quick"] == quick]
    return f"~{max(1, round(minutes[-1]))} min on this page's machine" if minutes else "not run yet"


def render(
    runs: list[dict] | None = None, scale_runs: list[dict] | None = None, plan_runs: list[dict] | None = None
) -> str:
    runs = load_runs() if runs is None else runs
    scale_runs = load_scale_runs() if scale_runs is None else scale_runs
    plan_runs = load_plan_runs() if plan_runs is None else plan_runs
    if not runs:
        raise ValueError(f"no benchmark results in {RESULTS}: run python -m benchmarks.run --out {RESULTS}/NAME.json")
    latest = runs[-1]
    lines = [
        "# Benchmarks",
        "",
        "<!-- Generated by `python docs/make_benchmarks.py` from docs/benchmarks/*.json; do not edit by hand. -->",
        "",
        "Each benchmark runs the project's path and its bare baseline in the same process and the same minutes, "
        "and reports their ratio (the median of repeats), so a figure compares like with like on one machine. "
        "Compare figures within a run, not across runs or machines: a shared box's speed drifts.",
        "",
        f"## Latest run: `docs/benchmarks/{latest['_file']}`",
        "",
        *_machine(latest),
        "",
        *_key_table(latest),
        "",
        "A *quick* run uses small sizes (a few thousand images, a 50k-vector index, galleries up to 100k items); the "
        "targets were set for the full sizes (10k images, a 1M-vector index, 1M items), so a quick run's verdicts "
        "are a smoke test, not the measurement."
        if latest["config"]["quick"]
        else "This is a full run: the sizes the targets were set for.",
        "",
        "Exactly what each side ran:",
        "",
        *_details(latest),
        "",
        *_index_kinds(latest),
        *_scale(scale_runs),
        *_plan(plan_runs),
        "## Reproduce",
        "",
        "```bash",
        "export RAY_AUTH_MODE=disabled RAY_USAGE_STATS_ENABLED=0   # a local Ray without a token",
        f".venv/bin/python -m benchmarks.run --quick --out docs/benchmarks/quick.json  # {_duration(runs, quick=True)}",
        ".venv/bin/python -m benchmarks.run --out docs/benchmarks/full.json   # full sizes: "
        + _duration(runs, quick=False),
        ".venv/bin/python docs/make_benchmarks.py                             # rewrite this page",
        "```",
        "",
        "`raybackfill bench --quick --out results.json` runs the same suite from the CLI (from the checkout root). "
        "Run it on an otherwise idle machine; the page states the load each run met.",
        "",
        "## Kept runs",
        "",
        *_kept(runs),
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    PAGE.write_text(render())
    print(f"wrote {PAGE}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
