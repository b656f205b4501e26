"""Ablation: psi trained with raybackfill's metric-compatible loss (raybackfill.compat.losses) against Seo et al.'s
original, which lacks the loss's third block of candidates, psi(new)_i . psi(new)_j (the other items' psi
outputs). Run on the artefacts of finished demos:

    python -m benchmarks.psi_candidates DEMO_OUT [DEMO_OUT ...] --train-seeds 0 1 2 --out psi.json

For each demo (its train-split embeddings, gallery and queries) and each training seed, psi is trained both
ways with the demo's quick reverse fit (Ray Train local mode), then scored on the demo's query and gallery
splits: psi(new query) on the old gallery (top-1, mAP) and the rank_merge_psi backfill curve's areas (mean
over several random orders). The JSON has every figure; the printout the mean and spread over training seeds.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import tempfile
from collections.abc import Iterator
from unittest import mock

import numpy as np
import torch
import torch.nn.functional as F

from raybackfill.compat import losses
from raybackfill.data import storage
from raybackfill.data.schema import EMBEDDING, ID, LABEL, vectors_of
from raybackfill.demo.configs import QUICK
from raybackfill.demo.pipeline import DemoLayout, rows_of_ids
from raybackfill.eval.metrics import EvalConfig, evaluate
from raybackfill.eval.offline import Embeddings, LoadedTables, OfflineConfig, method_spaces, order_run
from raybackfill.models.artifacts import load_model
from raybackfill.models.transformations import apply_transformation
from raybackfill.runtime import init_ray
from raybackfill.train.api import train_reverse
from raybackfill.train.trainer import TrainConfig
from raybackfill.types import Method

VARIANTS = ("paper", "with_psi_psi")


def paper_loss(
    psi_new: torch.Tensor, old: torch.Tensor, new: torch.Tensor, labels: torch.Tensor, tau: float = 0.05
) -> torch.Tensor:
    """Seo et al.'s candidates only: a_ij = p_i.o_j (all j) and b_ij = n_i.n_j (j != i), positives by label."""
    p, o, n = F.normalize(psi_new, dim=1), F.normalize(old.detach(), dim=1), F.normalize(new, dim=1)
    self_pair = torch.eye(p.shape[0], dtype=torch.bool, device=p.device)
    same_label = labels[:, None] == labels[None, :]
    scores = torch.cat([p @ o.T, (n @ n.T).masked_fill(self_pair, float("-inf"))], dim=1) / tau
    positives = torch.cat([same_label, same_label & ~self_pair], dim=1)
    log_prob = scores - torch.logsumexp(scores, dim=1, keepdim=True)
    return (-(log_prob.masked_fill(~positives, 0.0).sum(1) / positives.sum(1))).mean()


@contextlib.contextmanager
def variant(name: str) -> Iterator[None]:
    """The reverse training loop (in the driver: Ray Train local mode) uses this variant's loss."""
    if name == "with_psi_psi":  # raybackfill's own
        yield
        return
    with mock.patch.object(losses, "metric_compatible_loss", paper_loss):
        yield


def measure(demo_out: str, train_seeds: list[int], random_orders: int) -> dict:
    layout = DemoLayout(demo_out)
    table = storage.read_table(layout.path("embeddings", "all"))
    labels = {s: storage.read_table(layout.split(s), columns=[ID, LABEL]) for s in ("query", "gallery")}
    ids = {s: labels[s].column(ID).to_numpy() for s in labels}
    rows = {s: table.take(rows_of_ids(table, ids[s])) for s in labels}
    q_labels, g_labels = (labels[s].column(LABEL).to_numpy() for s in ("query", "gallery"))
    old = {s: vectors_of(rows[s], EMBEDDING) for s in rows}
    new = {s: vectors_of(rows[s], "new") for s in rows}
    eval_config = EvalConfig()
    old_old = evaluate(old["query"], old["gallery"], q_labels, g_labels, eval_config)
    fit = QUICK.reverse
    results: dict = {v: [] for v in VARIANTS}
    with tempfile.TemporaryDirectory() as scratch:
        for seed in train_seeds:
            for name in VARIANTS:
                out = f"{scratch}/{name}-{seed}"
                train = TrainConfig(name=f"psi-{name}-{seed}", storage_path=f"{scratch}/runs", num_workers=0,
                                    epochs=fit.epochs, batch_size=fit.batch_size, lr=fit.lr, seed=seed)  # fmt: skip
                with variant(name):
                    train_reverse(layout.embeddings("old", "train"), layout.embeddings("new", "train"), out,
                                  train=train)  # fmt: skip
                psi = apply_transformation(load_model(out).module, new["query"])[0]
                anchor = evaluate(psi, old["gallery"], q_labels, g_labels, eval_config)
                tables = LoadedTables(
                    q_labels,
                    g_labels,
                    queries={"old": Embeddings(ids["query"], old["query"], None),
                             "new": Embeddings(ids["query"], new["query"], None),
                             "psi": Embeddings(ids["query"], psi, None)},
                    gallery={"old": Embeddings(ids["gallery"], old["gallery"], None),
                             "new": Embeddings(ids["gallery"], new["gallery"], None)},
                )  # fmt: skip
                config = OfflineConfig(Method.RANK_MERGE_PSI, beta_points=QUICK.beta_points, random_seeds=random_orders)
                run = order_run(config.orders[0], method_spaces(Method.RANK_MERGE_PSI, tables), tables, config,
                                old_old, eval_config)  # fmt: skip
                aucs = np.array(list(run.seed_aucs.values()))
                results[name].append({
                    "train_seed": seed,
                    "psi_old_top1": anchor.top1,
                    "psi_old_map": anchor.map,
                    "auc_top1": float(aucs[:, 0].mean()),
                    "auc_map": float(aucs[:, 1].mean()),
                })  # fmt: skip
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("demos", nargs="+", metavar="DEMO_OUT", help="out directories of finished demos")
    parser.add_argument("--train-seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--random-orders", type=int, default=QUICK.random_seeds)
    parser.add_argument("--out", required=True, help="JSON file with every figure")
    args = parser.parse_args()
    torch.set_num_threads(1)
    init_ray()
    everything = {demo: measure(demo, args.train_seeds, args.random_orders) for demo in args.demos}
    with open(args.out, "w") as f:
        json.dump(everything, f, indent=2)
    keys = ("psi_old_top1", "psi_old_map", "auc_top1", "auc_map")
    print(f"mean ± sd over training seeds {args.train_seeds}")
    for demo, results in everything.items():
        for name in VARIANTS:
            cells = []
            for key in keys:
                values = [r[key] for r in results[name]]
                sd = statistics.stdev(values) if len(values) > 1 else 0.0
                cells.append(f"{key} {statistics.mean(values):.3f} ± {sd:.3f}")
            print(f"{demo} {name:>13}: " + ", ".join(cells))


if __name__ == "__main__":
    main()
