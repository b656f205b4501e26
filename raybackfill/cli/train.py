"""`raybackfill train ...`: fit backbones, side-information, transformations and psi on Ray Train."""

from __future__ import annotations

import argparse
import sys

from raybackfill.compat.recipes import RECIPES
from raybackfill.runtime import init_ray
from raybackfill.types import (
    CLOSED_FORM_ADAPTERS,
    AdapterDirection,
    AdapterKind,
    AdapterLoss,
    BackboneLoss,
    Method,
    Metric,
)

AUTO = "auto"  # `train adapter --kind auto`: every kind that applies, the best kept
ADAPTER_EPOCHS = 30  # a paired sample is small: an adapter's MLP needs more epochs than a model on a whole table


def register(subparsers: argparse._SubParsersAction) -> None:
    train = subparsers.add_parser(
        "train",
        help="train backbones, side-information, transformations and psi on Ray Train",
        description="Each subcommand trains one model on Ray Train and writes a versioned artefact "
        "(model.json + safetensors) to OUT. Each run holds out --validation-fraction of its rows: every "
        "epoch is scored on them and the artefact keeps the epoch they choose (model.json 'training' records "
        "every epoch). A backbone that ends near chance is an error. Re-running the same command with the "
        "same --name and --storage resumes from the run's latest epoch checkpoint.",
    )
    sub = train.add_subparsers(dest="train_command", metavar="MODEL", required=True)

    backbone = sub.add_parser("backbone", help="an image backbone: independent, bct or ract")
    backbone.add_argument("--images", required=True, help="labelled image table (local path or s3://)")
    backbone.add_argument(
        "--method",
        default=Method.INDEPENDENT.value,
        choices=[m.value for m, r in RECIPES.items() if r.backbone_loss is not BackboneLoss.CLASSIFICATION]
        + [Method.INDEPENDENT.value],
        help="training loss (default independent)",
    )
    backbone.add_argument("--old-model", help="old model artefact (needed by bct and ract)")
    backbone.add_argument(
        "--architecture", default="small_cnn", choices=("small_cnn", "resnet18", "resnet50"), help="backbone"
    )
    backbone.add_argument("--embedding-dim", type=int, default=128, help="embedding dimension (default 128)")
    _image_size(backbone)
    backbone.add_argument("--num-classes", type=int, help="classifier size (default: max label + 1)")
    backbone.add_argument("--tau", type=float, default=0.01, help="RACT temperature (default 0.01)")
    backbone.add_argument("--k", type=int, default=10, help="RACT hardest negatives per kind (default 10)")
    backbone.add_argument(
        "--no-augment", dest="augment", action="store_false", help="train on the images as stored (no crops, jitter)"
    )
    backbone.set_defaults(func=_backbone)

    side = sub.add_parser("side-info", help="self-supervised side-information model (SimCLR)")
    side.add_argument("--images", required=True, help="the old model's training images")
    side.add_argument("--embedding-dim", type=int, default=32, help="side-info dimension (default 32)")
    _image_size(side)
    side.set_defaults(func=_side_info)

    transformation = sub.add_parser("transformation", help="FCT / FastFill forward transformation old -> new")
    _pair(transformation)
    transformation.add_argument("--new-model", required=True, help="new model artefact (its classifier)")
    transformation.add_argument("--side-info", action="store_true", help="use the old table's side_info column")
    transformation.add_argument("--uncertainty", action="store_true", help="FastFill: add the uncertainty head")
    transformation.add_argument("--hidden-dim", type=int, default=128, help="branch width (reference 256)")
    transformation.add_argument("--mixer-dim", type=int, default=512, help="mixer width (reference 2048)")
    transformation.set_defaults(func=_transformation)

    reverse = sub.add_parser("reverse", help="reverse transformation psi new -> old (metric-compatible)")
    _pair(reverse)
    reverse.add_argument("--hidden-dim", type=int, default=256, help="hidden width (default 256)")
    reverse.add_argument("--tau", type=float, default=0.05, help="contrastive temperature (default 0.05)")
    reverse.set_defaults(func=_reverse)

    adapter = sub.add_parser(
        "adapter",
        help="an adapter between two encoders, fitted on a paired sample without labels, gated on held-out pairs",
        description="Fit a map between the old and the new encoder's spaces on a paired table (`raybackfill "
        "sample`): closed form (procrustes, affine, lowrank) or trained on Ray Train with a label-free loss (mlp: "
        "the FCT MLP, or psi's for new-to-old; fastfill: plus the uncertainty head that orders the backfill). "
        "--test-fraction of the pairs is held out; the gate compares new-model queries against the adapted "
        "gallery with the same queries against the truly re-embedded one (recall@k; psi: psi queries against "
        "the old model's). The score goes into model.json, which the backfill's --min-adapter-recall reads. "
        "Below --min-recall nothing is written and the command exits 1. --kind auto fits every kind, prints "
        "the table and keeps the best.",
    )
    adapter.add_argument("--paired", required=True, metavar="URI", help="the paired table (raybackfill sample)")
    adapter.add_argument(
        "--kind", required=True, choices=[k.value for k in AdapterKind] + [AUTO], help="the adapter, or auto"
    )
    adapter.add_argument(
        "--direction",
        choices=[d.value for d in AdapterDirection],
        default=AdapterDirection.OLD_TO_NEW.value,
        help="old-to-new (phi: the gallery's instant phase, default) or new-to-old (psi: old-space queries)",
    )
    adapter.add_argument(
        "--min-recall", type=float, required=True, metavar="R",
        help="the gate: refuse an adapter whose held-out recall@k is below R (0 keeps any; no default: the bar "
        "is the user's call, see docs/concepts.md for figures)",
    )  # fmt: skip
    adapter.add_argument("--k", type=int, default=10, help="the gate's recall@k (default 10)")
    adapter.add_argument(
        "--metric", choices=[Metric.COSINE.value, Metric.L2.value], default=Metric.COSINE.value,
        help="how the index scores (cosine: inputs and targets are L2-normalised for the fit; default cosine)",
    )  # fmt: skip
    adapter.add_argument(
        "--test-fraction", type=float, default=0.2, metavar="F", help="pairs held out for the gate (default 0.2)"
    )
    adapter.add_argument("--rank", type=int, help="lowrank: the rank (default: chosen on validation pairs)")
    adapter.add_argument(
        "--loss", choices=[loss.value for loss in AdapterLoss], default=AdapterLoss.MSE_COSINE.value,
        help="mlp / fastfill: the label-free loss (default mse_cosine)",
    )  # fmt: skip
    adapter.add_argument(
        "--side-info", action="store_true", help="old-to-new: also read the pairs' 'side' column (side-information)"
    )
    adapter.add_argument("--hidden-dim", type=int, default=128, help="mlp / fastfill: MLP width (default 128)")
    adapter.add_argument("--mixer-dim", type=int, default=512, help="old-to-new MLP mixer width (default 512)")
    adapter.set_defaults(func=_adapter)

    for parser in (backbone, side, transformation, reverse, adapter):
        _common(parser)
    adapter.set_defaults(epochs=ADAPTER_EPOCHS)
    for action in adapter._actions:  # the help shows the adapter's own default
        if action.dest == "epochs":
            action.help = f"mlp / fastfill epochs (default {ADAPTER_EPOCHS})"


def _image_size(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--image-size",
        type=int,
        metavar="N",
        help="train on N x N images: each is resized (shorter side) and centre-cropped, and the model "
        "records it (default: the shorter side of the table's first image)",
    )


def _pair(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--old-embeddings", required=True, help="old embedding table with a label column")
    parser.add_argument("--new-embeddings", required=True, help="new embedding table (same ids)")


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, help="artefact directory to create (never overwritten)")
    parser.add_argument("--version", help="version tag (default: the last part of --out)")
    parser.add_argument("--name", help="Ray Train run name (default: the version); same name = resume")
    parser.add_argument("--storage", default="./runs", help="Ray Train storage path, local or s3:// (./runs)")
    parser.add_argument("--workers", type=int, default=1, help="Ray Train workers; 0 = local mode (default 1)")
    parser.add_argument("--cpus-per-worker", type=float, default=1.0, help="CPUs per worker (default 1)")
    parser.add_argument("--gpu", action=argparse.BooleanOptionalAction, default=None, help="default: if present")
    parser.add_argument("--epochs", type=int, default=5, help="epochs (default 5)")
    parser.add_argument("--batch-size", type=int, default=128, help="global batch size (default 128)")
    parser.add_argument("--lr", type=float, default=1e-3, help="learning rate (default 1e-3)")
    parser.add_argument("--seed", type=int, default=0, help="seed (default 0)")
    parser.add_argument(
        "--validation-fraction", type=float, default=0.1, metavar="F",
        help="share of the training rows held out (per class) to choose the epoch kept and to tell whether a "
        "backbone learned; 0 keeps the last epoch (default 0.1)",
    )  # fmt: skip
    parser.add_argument("--address", help="Ray address (default: RAY_ADDRESS, else a local cluster)")


def _config(args: argparse.Namespace, *, start_ray: bool = True):
    from raybackfill.train.trainer import TrainConfig

    version = args.version or args.out.rstrip("/").rsplit("/", 1)[-1]
    config = TrainConfig(
        name=args.name or version,
        storage_path=args.storage,
        num_workers=args.workers,
        use_gpu=args.gpu,
        cpus_per_worker=args.cpus_per_worker,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        seed=args.seed,
        validation_fraction=args.validation_fraction,
    )  # checked before Ray starts
    if start_ray:
        init_ray(args.address, log_to_driver=True)  # the loops' per-epoch lines
    return config


def _print(spec) -> int:
    """The artefact, the epoch kept and its figures; for a classifier that did not learn, the error and 1."""
    from raybackfill.train.quality import ModelDidNotLearnError, require_learned

    print(f"wrote {spec.architecture} model {spec.version!r} (method {spec.method}, dims {spec.dims})")
    t = spec.training
    figures = ", ".join(f"{k} {t[k]:.4g}" for k in sorted(t) if k.startswith(("val_", "train_", "loss", "mse")))
    print(f"kept epoch {t['best_epoch'] + 1} of {t['epochs']}: {figures}")
    if "val_accuracy" in t:
        try:
            require_learned(t, spec.version)
        except ModelDidNotLearnError as err:
            print(f"raybackfill train: error: {err}", file=sys.stderr)
            return 1
    return 0


def _backbone(args: argparse.Namespace) -> int:
    from raybackfill.train.api import train_backbone

    train = _config(args)
    return _print(
        train_backbone(
            args.images, args.out, method=args.method, architecture=args.architecture,
            embedding_dim=args.embedding_dim, num_classes=args.num_classes, old_model=args.old_model,
            version=args.version, train=train, tau=args.tau, k=args.k, augment=args.augment,
            image_size=args.image_size,
        )
    )  # fmt: skip


def _side_info(args: argparse.Namespace) -> int:
    from raybackfill.train.api import train_side_info

    train = _config(args)
    spec = train_side_info(
        args.images,
        args.out,
        embedding_dim=args.embedding_dim,
        version=args.version,
        train=train,
        image_size=args.image_size,
    )
    return _print(spec)


def _transformation(args: argparse.Namespace) -> int:
    from raybackfill.train.api import train_transformation

    train = _config(args)
    return _print(
        train_transformation(
            args.old_embeddings, args.new_embeddings, args.out, new_model=args.new_model,
            side_info=args.side_info, uncertainty=args.uncertainty, hidden_dim=args.hidden_dim,
            mixer_dim=args.mixer_dim, version=args.version, train=train,
        )
    )  # fmt: skip


def _reverse(args: argparse.Namespace) -> int:
    from raybackfill.train.api import train_reverse

    train = _config(args)
    return _print(
        train_reverse(
            args.old_embeddings, args.new_embeddings, args.out, hidden_dim=args.hidden_dim, tau=args.tau,
            version=args.version, train=train,
        )
    )  # fmt: skip


def _adapter(args: argparse.Namespace) -> int:
    """Fit, print the table of held-out figures, write the kept adapter; exit 1 below the bar."""
    from raybackfill.adapters.fit import AdapterConfig, auto_kinds, train_adapter

    config = AdapterConfig(
        direction=args.direction, metric=args.metric, k=args.k, min_recall=args.min_recall,
        test_fraction=args.test_fraction, validation_fraction=args.validation_fraction, seed=args.seed,
        side_info=args.side_info, rank=args.rank, loss=args.loss, hidden_dim=args.hidden_dim,
        mixer_dim=args.mixer_dim,
    )  # fmt: skip
    kinds = auto_kinds(config.direction) if args.kind == AUTO else [AdapterKind(args.kind)]
    trained = any(k not in CLOSED_FORM_ADAPTERS for k in kinds)
    train = _config(args, start_ray=trained)  # closed-form fits need no cluster
    report = train_adapter(args.paired, args.out, kinds, config, train=train, version=args.version)
    print(report.table())
    chosen = report.chosen
    assert chosen is not None  # at least one kind was fitted
    score = chosen.score
    if not report.passed:
        print(
            f"raybackfill train: error: the best adapter ({chosen.kind.value}) has recall@{score.k} "
            f"{score.recall:.4f} on {score.pairs} held-out pairs, below --min-recall {args.min_recall}; "
            "nothing written",
            file=sys.stderr,
        )
        return 1
    spec = report.spec
    assert spec is not None  # passed
    print(
        f"wrote {chosen.kind.value} adapter {spec.version!r} ({config.direction.value}, {spec.architecture}, "
        f"dims {spec.dims}) to {args.out}: recall@{score.k} {score.recall:.4f}, pair top-1 {score.pair_top1:.4f} "
        f"on {score.pairs} held-out pairs"
    )
    return 0
