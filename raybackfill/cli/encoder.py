"""`raybackfill encoder register|show`: bring a model made elsewhere, and the trust and actor-pool options every
embedding command shares.

torch and torchvision are imported inside the commands, not at module import: `raybackfill --help` stays fast.
"""

from __future__ import annotations

import argparse
import dataclasses
import json

from raybackfill.types import MODEL_METRICS, EncoderKind, Interpolation, Metric, Tokenizer

# Kinds made elsewhere (raybackfill's own models are written by its training).
REGISTERED_KINDS = [k.value for k in EncoderKind if k is not EncoderKind.RAYBACKFILL]


def add_trust_arguments(parser: argparse.ArgumentParser) -> None:
    """``--trust-entrypoint`` / ``--trust-entrypoints``: the only ways an entrypoint in a model.json is run."""
    parser.add_argument(
        "--trust-entrypoint",
        action="append",
        default=[],
        metavar="PKG.MODULE:FACTORY",
        help="run this entrypoint when a model.json names it (repeatable); it runs on every node",
    )
    parser.add_argument(
        "--trust-entrypoints",
        action="store_true",
        help="run every entrypoint the model.json files name (only for models you made)",
    )
    parser.add_argument(
        "--py-module",
        action="append",
        default=[],
        metavar="PKG_DIR",
        help="ship this local package directory to every node (Ray runtime_env py_modules), so an "
        "entrypoint in it imports there; not needed under `ray job submit --working-dir` when the "
        "code is in that directory",
    )


def add_pool_arguments(parser: argparse.ArgumentParser) -> None:
    """The embedding actor pool's size and resources (see :class:`~raybackfill.embed.pipeline.PoolConfig`)."""
    parser.add_argument("--actors", type=int, default=1, help="embedding actors (default 1)")
    parser.add_argument("--cpus-per-actor", type=float, default=0.5, help="CPUs per actor (default 0.5)")
    parser.add_argument(
        "--gpus-per-actor",
        type=float,
        metavar="N",
        help="GPUs per actor (default: 1 if the cluster has a GPU when the job starts, else 0); "
        "set it on autoscaling clusters, which start without GPU nodes: only a GPU request makes "
        "the autoscaler launch one",
    )
    parser.add_argument("--batch-size", type=int, default=256, help="rows per batch (default 256)")
    parser.add_argument(
        "--nice-increment",
        type=int,
        default=4,
        metavar="N",
        help="nice steps (Linux) the actors run below the queries served on the same nodes (default 4; 0: equal)",
    )


def pool_from(args: argparse.Namespace, **extra):
    """The :class:`~raybackfill.embed.pipeline.PoolConfig` the pool arguments describe (checked before Ray starts)."""
    from raybackfill.embed.pipeline import PoolConfig

    return PoolConfig(
        actors=args.actors,
        cpus_per_actor=args.cpus_per_actor,
        gpus_per_actor=args.gpus_per_actor,
        batch_size=args.batch_size,
        nice_increment=args.nice_increment,
        **extra,
    )


def trust_from(args: argparse.Namespace):
    """The :class:`~raybackfill.encoders.EntrypointTrust` the trust arguments describe."""
    from raybackfill.encoders import EntrypointTrust

    return EntrypointTrust(tuple(args.trust_entrypoint), trust_all=args.trust_entrypoints)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "encoder",
        help="register a model made elsewhere (TorchScript, torch.export, "
        "torchvision + weights, or your own factory) as an encoder artefact",
    )
    sub = parser.add_subparsers(dest="encoder_command", metavar="ACTION", required=True)
    add = sub.add_parser(
        "register",
        help="write an encoder artefact (model.json + the model file), checked by embedding a probe batch",
        description="Write an encoder artefact that embed, backfill, query and the index accept. The model is "
        "loaded and run once on a probe batch, which measures its dimension and catches a bad file now.",
    )
    add.add_argument("--kind", required=True, choices=REGISTERED_KINDS, help="where the model comes from")
    add.add_argument("--version", required=True, help="the version tag tables and the index record")
    add.add_argument("--out", required=True, help="artefact directory to create (never overwritten)")
    add.add_argument("--file", help="TorchScript file, .pt2 program, or torchvision weights (.safetensors/.pt)")
    add.add_argument("--architecture", default="", help="torchvision architecture (resnet50, vit_b_16, ...)")
    add.add_argument("--layer", help="torchvision graph node giving the embedding (default: penultimate features)")
    add.add_argument(
        "--entrypoint",
        metavar="PKG.MODULE:FACTORY",
        help="factory(**kwargs) returning the encoder "
        "(kind entrypoint; naming it here trusts it for this registration)",
    )
    add.add_argument("--kwargs", default="{}", help="JSON keyword arguments of the torchvision builder or factory")
    add.add_argument(
        "--metric",
        choices=[m.value for m in MODEL_METRICS],
        default=Metric.COSINE.value,
        help="similarity (default cosine)",
    )
    image = add.add_argument_group("image preprocessing (torchvision: the architecture's own preset by default)")
    image.add_argument("--resize", type=int, help="resize the shorter side to this (default: the crop)")
    image.add_argument("--crop", type=int, help="centre crop size: the square the model takes")
    image.add_argument(
        "--mean",
        type=float,
        nargs=3,
        help="per-channel mean (torchvision: the architecture's own; otherwise 0.5 0.5 0.5)",
    )
    image.add_argument(
        "--std",
        type=float,
        nargs=3,
        help="per-channel std (torchvision: the architecture's own; otherwise 0.25 0.25 0.25)",
    )
    image.add_argument("--interpolation", choices=[i.value for i in Interpolation], help="default bicubic")
    text = add.add_argument_group("text encoders")
    text.add_argument("--text", action="store_true", help="the encoder embeds the gallery's 'text' column")
    text.add_argument(
        "--tokenizer",
        choices=[t.value for t in Tokenizer],
        default=Tokenizer.NONE.value,
        help="none: the encoder gets the strings (default); bytes / hashed_words: int64 token ids",
    )
    text.add_argument("--max-length", type=int, default=64, help="tokens per text (default 64)")
    text.add_argument("--vocab-size", type=int, default=32_768, help="hashed_words vocabulary (default 32768)")
    add.set_defaults(func=_register)
    show = sub.add_parser("show", help="print an artefact's model.json (reads nothing else, runs nothing)")
    show.add_argument("uri", help="artefact directory (path or s3://)")
    show.set_defaults(func=_show)


def _preprocessing(args: argparse.Namespace):
    from raybackfill.data.preprocessing import ImagePreprocessing, TextPreprocessing

    if args.text:
        return TextPreprocessing(tokenizer=args.tokenizer, max_length=args.max_length, vocab_size=args.vocab_size)
    given = {
        "resize": args.resize,
        "crop": args.crop,
        "mean": args.mean,
        "std": args.std,
        "interpolation": args.interpolation,
    }
    given = {k: tuple(v) if isinstance(v, list) else v for k, v in given.items() if v is not None}
    if args.kind == EncoderKind.TORCHVISION:
        if not given:
            return None  # the architecture's own preset
        from raybackfill.encoders.encoder import torchvision_preprocessing

        # What is given replaces that part of the architecture's preset; the rest stays the architecture's.
        return dataclasses.replace(torchvision_preprocessing(args.architecture), **given)
    if "crop" not in given:
        raise ValueError("declare the image size the encoder takes: --crop N (and --resize, --mean, --std)")
    return ImagePreprocessing(**given)


def _register(args: argparse.Namespace) -> int:
    from raybackfill.encoders import EncoderSource, EntrypointTrust, register_encoder

    try:
        kwargs = json.loads(args.kwargs)
    except json.JSONDecodeError as err:
        raise ValueError(f"--kwargs is not valid JSON ({err})") from err
    if not isinstance(kwargs, dict):
        raise ValueError("--kwargs must be a JSON object")
    source = EncoderSource(
        kind=EncoderKind(args.kind), version=args.version, path=args.file, architecture=args.architecture,
        entrypoint=args.entrypoint, kwargs=kwargs, preprocessing=_preprocessing(args), embedding_layer=args.layer,
        metric=args.metric,
    )  # fmt: skip
    trust = EntrypointTrust((args.entrypoint,)) if args.entrypoint else EntrypointTrust()
    spec = register_encoder(source, args.out, trust=trust)
    print(
        f"registered {spec.kind.value} encoder {spec.version!r} at {args.out}: dim {spec.dims['embedding']}, "
        f"{spec.modality} input, preprocessing {json.dumps(spec.preprocessing)}"
    )
    if spec.entrypoint:
        print(
            f"jobs that use it need --trust-entrypoint {spec.entrypoint}, and its code on every node "
            "(ray job submit --working-dir, or --py-module)"
        )
    return 0


def _show(args: argparse.Namespace) -> int:
    from raybackfill.models.artifacts import read_spec

    print(read_spec(args.uri).to_json())
    return 0
