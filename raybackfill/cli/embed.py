"""`raybackfill embed`: embed a gallery table (images or texts) with an encoder on a Ray Data actor pool."""

from __future__ import annotations

import argparse

from raybackfill.cli.encoder import add_pool_arguments, add_trust_arguments, pool_from, trust_from
from raybackfill.runtime import init_ray


def register(subparsers: argparse._SubParsersAction) -> None:
    embed = subparsers.add_parser(
        "embed",
        help="embed a gallery table (images or texts) with an encoder (Ray Data actor pool)",
        description="Stream a gallery table (images or texts) through an actor pool running the encoder (GPU "
        "actors when the cluster has GPUs, or --gpus-per-actor) and write an embedding table. Images of any size "
        "and mode are prepared by the encoder's declared preprocessing; undecodable images, empty texts and "
        "non-finite outputs are quarantined under OUT/_quarantine. Re-running the same command after a kill "
        "continues where it stopped (committed shards are kept and their ids skipped); OUT/_manifest.json "
        "marks a finished table, which a re-run leaves as it is.",
    )
    embed.add_argument(
        "--gallery", required=True, help="gallery table: id + image (bytes) or text (local path or s3://)"
    )
    embed.add_argument("--model", required=True, help="encoder artefact (any kind) -> column 'embedding'")
    embed.add_argument("--side-info-model", help="side-info artefact -> column 'side_info' (same pass)")
    embed.add_argument("--out", required=True, help="output embedding table (same URI and models = resume)")
    add_pool_arguments(embed)
    embed.add_argument(
        "--rows-per-shard",
        type=int,
        default=50_000,
        help="rows per output shard, also the most work a kill loses (default 50000)",
    )
    embed.add_argument("--address", help="Ray address (default: RAY_ADDRESS, else a local cluster)")
    add_trust_arguments(embed)
    embed.set_defaults(func=_embed)


def _embed(args: argparse.Namespace) -> None:
    from raybackfill.embed.pipeline import embed_gallery

    models = {"embedding": args.model, **({"side_info": args.side_info_model} if args.side_info_model else {})}
    pool = pool_from(args, rows_per_shard=args.rows_per_shard)  # checked before Ray starts
    init_ray(args.address, py_modules=args.py_module)
    result = embed_gallery(args.gallery, models, args.out, pool=pool, trust=trust_from(args))
    if result.already_complete:
        print(
            f"{result.uri} is already complete ({result.rows} embeddings, {result.quarantined} quarantined): "
            "nothing to do"
        )
    else:
        print(
            f"wrote {result.written} embeddings to {result.uri} ({result.rows} in the table, "
            f"{result.quarantined} quarantined)"
        )
