"""`raybackfill train ...`: fit backbones, side-information, transformations and psi on Ray Train."""

from __future__ import annotations

import argparse
import sys

from raybackfill.compat.recipes import RECIPES
from raybackfill.runtime import init_ray
from raybackfill.types import BackboneLoss, Method


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

    for parser in (backbone, side, transformation, reverse):
        _common(parser)


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


def _config(args: argparse.Namespace):
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
