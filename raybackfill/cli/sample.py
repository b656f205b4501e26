"""`raybackfill sample`: a paired sample of the gallery, embedded by the old and the new encoder in one pass."""

from __future__ import annotations

import argparse

from raybackfill.cli.encoder import add_pool_arguments, add_trust_arguments, pool_from, trust_from
from raybackfill.runtime import init_ray


def register(subparsers: argparse._SubParsersAction) -> None:
    sample = subparsers.add_parser(
        "sample",
        help="embed N gallery items with the old and the new encoder (one pass): the pairs adapters are fitted on",
        description="Choose N gallery ids (uniformly, or in proportion to each class of --stratify-by), embed "
        "them with both encoders (and the side-information model) in one Ray Data pass and write one paired "
        "table: id, old, new, [side], [label], old_model, new_model. `raybackfill train adapter --paired OUT` "
        "fits adapters on it. Items that do not decode or embed to NaN go to OUT/_quarantine; OUT/_sample.json "
        "records the choice.",
    )
    sample.add_argument("--gallery", required=True, metavar="URI", help="gallery table: id + image or text")
    sample.add_argument("--old-encoder", required=True, metavar="DIR", help="the old encoder artefact (any kind)")
    sample.add_argument("--new-encoder", required=True, metavar="DIR", help="the new encoder artefact (any kind)")
    sample.add_argument("--side-info-model", metavar="DIR", help="side-information artefact -> column 'side'")
    sample.add_argument("--n", type=int, required=True, help="items to sample (all, when the gallery has fewer)")
    sample.add_argument(
        "--stratify-by", metavar="COLUMN", help="an integer class column (e.g. label): sample each class in proportion"
    )
    sample.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    sample.add_argument("--out", required=True, metavar="URI", help="the paired table to write (a new URI)")
    add_pool_arguments(sample)
    sample.add_argument("--address", help="Ray address (default: RAY_ADDRESS, else a local cluster)")
    add_trust_arguments(sample)
    sample.set_defaults(func=_sample)


def _sample(args: argparse.Namespace) -> int:
    from raybackfill.adapters.sample import paired_sample

    if args.n < 1:
        raise ValueError(f"--n must be at least 1, got {args.n}")
    pool = pool_from(args)  # checked before Ray starts
    init_ray(args.address, py_modules=args.py_module)
    result = paired_sample(
        args.gallery, args.old_encoder, args.new_encoder, args.n, args.out, stratify_by=args.stratify_by,
        seed=args.seed, side_info_encoder=args.side_info_model, pool=pool, trust=trust_from(args),
    )  # fmt: skip
    print(f"wrote {result.rows} pairs to {result.uri} ({result.requested} sampled, {result.quarantined} quarantined)")
    if result.per_class:
        print("per class: " + ", ".join(f"{c}: {k}" for c, k in sorted(result.per_class.items())))
    return 0
