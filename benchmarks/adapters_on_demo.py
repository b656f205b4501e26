"""Adapters fitted without labels against FCT / FastFill trained with labels, on a finished demo's stored
embeddings (the issue's acceptance for adapters):

    python -m benchmarks.adapters_on_demo DEMO_OUT [DEMO_OUT ...] --out adapters.json

For each demo, the train split's stored old and new embeddings are the paired sample: every adapter kind is
fitted on them with their labels dropped (the closed-form ones in the driver, mlp and fastfill with the demo's
quick transformation fit in Ray Train's local mode), and the demo's own FCT / FastFill (trained with labels and
the new model's classifier on the same split) are loaded. All are then scored the way the demo's report scores
transformations: the query split's new embeddings against the gallery split's old embeddings mapped into the new
space (top-1, mAP), next to old/old and new/new; plus each adapter's held-out gate figures (recall@k, pair top-1)
from its own fit. ``above_old_old`` says whether the new query / adapted gallery top-1 beats old/old.
"""

from __future__ import annotations

import argparse
import json
import tempfile

import numpy as np
import torch

from raybackfill.adapters.fit import AdapterConfig, fit_adapter
from raybackfill.adapters.paired import Pairs
from raybackfill.data import storage
from raybackfill.data.schema import EMBEDDING, ID, LABEL, vectors_of
from raybackfill.demo.configs import QUICK
from raybackfill.demo.pipeline import DemoLayout, rows_of_ids
from raybackfill.eval.metrics import EvalConfig, evaluate
from raybackfill.models.artifacts import load_model
from raybackfill.models.transformations import apply_transformation
from raybackfill.runtime import init_ray
from raybackfill.train.trainer import TrainConfig
from raybackfill.types import AdapterKind

LABELLED = ("fct", "fastfill")  # the demo's transformations trained with labels and the new classifier


def measure(demo_out: str, seed: int) -> dict:
    layout = DemoLayout(demo_out)
    table = storage.read_table(layout.path("embeddings", "all"))
    splits = {s: storage.read_table(layout.split(s), columns=[ID, LABEL]) for s in ("train", "query", "gallery")}
    rows = {s: table.take(rows_of_ids(table, splits[s].column(ID).to_numpy())) for s in splits}
    labels = {s: splits[s].column(LABEL).to_numpy() for s in splits}
    old = {s: vectors_of(rows[s], EMBEDDING) for s in rows}
    new = {s: vectors_of(rows[s], "new") for s in rows}
    config = EvalConfig()

    def scored(queries: np.ndarray, gallery: np.ndarray) -> dict:
        result = evaluate(queries, gallery, labels["query"], labels["gallery"], config)
        return {"top1": result.top1, "map": result.map}

    anchors = {"old_old": scored(old["query"], old["gallery"]), "new_new": scored(new["query"], new["gallery"])}
    pairs = Pairs(rows["train"].column(ID).to_numpy(), old["train"], new["train"])  # no labels
    fit = QUICK.transformation
    figures = {}
    with tempfile.TemporaryDirectory() as scratch:
        train = TrainConfig(name="adapter", storage_path=f"{scratch}/runs", num_workers=0, epochs=fit.epochs,
                            batch_size=fit.batch_size, lr=fit.lr, seed=seed)  # fmt: skip
        for kind in AdapterKind:
            adapter = fit_adapter(kind, pairs, AdapterConfig(seed=seed), train)
            mapped = apply_transformation(adapter.module, old["gallery"])[0]
            figures[kind.value] = scored(new["query"], mapped) | {
                "recall": adapter.score.recall, "pair_top1": adapter.score.pair_top1, "labels": False,
            }  # fmt: skip
    for method in LABELLED:
        mapped = apply_transformation(load_model(layout.model(method)).module, old["gallery"])[0]
        figures[f"{method} (labels)"] = scored(new["query"], mapped) | {"labels": True}
    for entry in figures.values():
        entry["above_old_old"] = entry["top1"] > anchors["old_old"]["top1"]
    return {"anchors": anchors, "adapters": figures, "train_pairs": len(pairs), "queries": len(labels["query"])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("demos", nargs="+", metavar="DEMO_OUT", help="out directories of finished demos")
    parser.add_argument("--seed", type=int, default=0, help="the adapters' split and training seed")
    parser.add_argument("--out", required=True, help="JSON file with every figure")
    args = parser.parse_args()
    torch.set_num_threads(1)
    init_ray()
    everything = {demo: measure(demo, args.seed) for demo in args.demos}
    with open(args.out, "w") as f:
        json.dump(everything, f, indent=2)
    for demo, result in everything.items():
        a = result["anchors"]
        print(f"{demo}: {result['train_pairs']} pairs, {result['queries']} queries; old/old top-1 "
              f"{a['old_old']['top1']:.3f} mAP {a['old_old']['map']:.3f}, new/new top-1 {a['new_new']['top1']:.3f} "
              f"mAP {a['new_new']['map']:.3f}")  # fmt: skip
        for name, f in result["adapters"].items():
            gate = f"recall@10 {f['recall']:.3f}" if "recall" in f else "trained with labels"
            print(f"  {name:<17} new query / mapped old gallery: top-1 {f['top1']:.3f} mAP {f['map']:.3f}  "
                  f"({gate}){'' if f['above_old_old'] else '  NOT above old/old'}")  # fmt: skip


if __name__ == "__main__":
    main()
