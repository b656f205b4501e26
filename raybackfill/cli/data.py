"""`raybackfill data ...`: make, import, split and describe gallery tables (images or texts)."""

from __future__ import annotations

import argparse
import time

import numpy as np

from raybackfill.data.importers import ImportResult, import_cifar, import_idx, import_image_folder, import_text
from raybackfill.data.info import table_info
from raybackfill.data.schema import LABEL, validate_image_table
from raybackfill.data.splits import DEFAULT_FRACTIONS, parse_fractions, split_table, write_splits
from raybackfill.data.storage import WriteResult, read_table
from raybackfill.data.synth import write_synthetic

ROWS_PER_SHARD = 10_000


def register(subparsers: argparse._SubParsersAction) -> None:
    data = subparsers.add_parser(
        "data",
        help="make, import, split and inspect datasets",
        description="Create image tables (Parquet: id, image, label) and inspect stored tables.",
    )
    sub = data.add_subparsers(dest="data_command", metavar="SUBCOMMAND", required=True)

    synth = sub.add_parser(
        "synth",
        help="generate the built-in synthetic image dataset",
        description="Generate procedural class-conditional images (shape x texture x colours, heavily "
        "jittered). The same seed always gives identical bytes.",
    )
    _out(synth)
    synth.add_argument("--classes", type=int, default=100, help="number of classes (default 100)")
    synth.add_argument("--per-class", type=int, default=60, help="images per class (default 60)")
    synth.add_argument("--size", type=int, default=32, help="image side in pixels (default 32)")
    synth.add_argument("--seed", type=int, default=0, help="generator seed (default 0)")
    synth.set_defaults(func=_synth)

    imp = sub.add_parser(
        "import",
        help="import a gallery (image folder, public dataset, texts) into a table",
        description="Import an ImageFolder tree, CIFAR-10/100 python pickles or MNIST-style IDX files into an "
        "image table, or a JSONL/CSV/Parquet file of texts into a text table. Rows that cannot be used (an "
        "image that does not decode, an empty text) are left out and listed with their reason in "
        "OUT/_quarantine.",
    )
    formats = imp.add_subparsers(dest="format", metavar="FORMAT", required=True)
    folder = formats.add_parser(
        "imagefolder",
        help="SRC/<class>/<image> (torchvision ImageFolder layout)",
        description="Labels are the sorted class directory names (kept in the table metadata); a "
        "'path' column keeps each file's relative path. Files are read and checked on Ray (SRC must be "
        "readable by every worker); images of any format, size and mode keep their original bytes.",
    )
    folder.add_argument("src", metavar="SRC", help="root directory with one subdirectory per class")
    folder.add_argument("--size", type=int, help="resize (shorter side) and centre-crop every image to SIZE")
    folder.add_argument("--address", help="Ray address (default: RAY_ADDRESS, else a local cluster)")
    cifar = formats.add_parser(
        "cifar",
        help="CIFAR-10/100 python version",
        description="SRC is the extracted cifar-10-batches-py or cifar-100-python directory, or one batch file.",
    )
    cifar.add_argument("src", metavar="SRC", help="CIFAR directory or batch file")
    idx = formats.add_parser(
        "idx",
        help="MNIST-family IDX files (plain or .gz)",
        description="SRC is an *images-idx3-ubyte[.gz] file (its labels-idx1 sibling is found by name) "
        "or a directory holding the files. Grey images are stored as RGB.",
    )
    idx.add_argument("src", metavar="SRC", help="IDX images file or directory")
    for parser in (cifar, idx):
        parser.add_argument("--split", choices=("train", "test"), default="train", help="which split (default train)")
    text = formats.add_parser(
        "text",
        help="texts from a JSONL, CSV or Parquet file",
        description="One row per JSON object (JSONL), CSV row (after the header) or Parquet row. Ids come from "
        "the id column (integers, unique) unless --assign-ids numbers the rows 0..N-1 in file order. Labels are "
        "optional: integers are kept, class names become the indexes of the sorted names (kept in the table "
        "metadata). Rows with a missing or empty text are quarantined.",
    )
    text.add_argument("src", metavar="SRC", help="a .jsonl/.ndjson, .csv or .parquet/.pq file")
    text.add_argument(
        "--format",
        dest="text_format",
        choices=("jsonl", "csv", "parquet"),
        help="the file's format (default: from its extension)",
    )
    text.add_argument("--id-column", default="id", metavar="NAME", help="column holding the ids (default id)")
    text.add_argument("--text-column", default="text", metavar="NAME", help="column holding the texts (default text)")
    text.add_argument(
        "--label-column",
        default="label",
        metavar="NAME",
        help="column holding the labels, if the file has it (default label)",
    )
    text.add_argument("--assign-ids", action="store_true", help="number the rows 0..N-1 in file order")
    for parser in (folder, cifar, idx, text):
        _out(parser)
        parser.add_argument("--limit", type=int, help="import only the first N images or texts")
        parser.set_defaults(func=_import)

    split = sub.add_parser(
        "split",
        help="split a table into train/gallery/query per class",
        description="Stratified, seeded split of every class's rows, written to OUT/<split>/. With "
        "--old-classes, OUT/train_old/ holds the train rows of those classes (for the old model).",
    )
    split.add_argument("src", metavar="SRC", help="image table URI (directory of shards, local or s3://)")
    _out(split)
    split.add_argument(
        "--old-classes",
        metavar="SPEC",
        help="classes the old model trains on: 'half' (lower half of the class ids), '0-49', '0,1,5-9', or "
        "'named:WORD,...' (every class whose name holds one of the words, e.g. named:disk,ring)",
    )
    default_fractions = ",".join(f"{name}={value}" for name, value in DEFAULT_FRACTIONS.items())
    split.add_argument(
        "--fractions",
        default=default_fractions,
        help=f"NAME=FRACTION,... summing to 1 (default {default_fractions})",
    )
    split.add_argument("--seed", type=int, default=0, help="shuffle seed (default 0)")
    split.set_defaults(func=_split)

    info = sub.add_parser(
        "info",
        help="describe a stored table",
        description="Rows, shards, columns, classes and embedding dim, read from the Parquet footers.",
    )
    info.add_argument("uri", metavar="URI", help="table URI (directory of shards or one file, local or s3://)")
    info.set_defaults(func=_info)


def _out(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, metavar="URI", help="output table URI (local path or s3://...)")
    parser.add_argument(
        "--rows-per-shard",
        type=int,
        default=ROWS_PER_SHARD,
        metavar="N",
        help=f"rows per Parquet shard (default {ROWS_PER_SHARD})",
    )


def _synth(args: argparse.Namespace) -> None:
    start = time.perf_counter()
    result = write_synthetic(
        args.out,
        classes=args.classes,
        per_class=args.per_class,
        size=args.size,
        seed=args.seed,
        rows_per_shard=args.rows_per_shard,
        progress=True,
    )
    detail = f"{args.classes} classes x {args.per_class}, {args.size}x{args.size}, seed {args.seed}"
    print(f"{_wrote(result)} ({detail}) in {time.perf_counter() - start:.1f}s")


def _import(args: argparse.Namespace) -> None:
    common = {"limit": args.limit, "rows_per_shard": args.rows_per_shard, "progress": True}
    result: ImportResult
    if args.format == "imagefolder":
        from raybackfill.runtime import init_ray  # imports Ray: only this importer runs on it

        init_ray(args.address)
        result = import_image_folder(args.src, args.out, size=args.size, **common)
    elif args.format == "cifar":
        result = import_cifar(args.src, args.out, split=args.split, **common)
    elif args.format == "idx":
        result = import_idx(args.src, args.out, split=args.split, **common)
    else:
        result = import_text(
            args.src,
            args.out,
            format=args.text_format,
            id_column=args.id_column,
            text_column=args.text_column,
            label_column=args.label_column,
            assign_ids=args.assign_ids,
            **common,
        )
    print(f"{_wrote(result)} from {args.format} {args.src}")
    if result.quarantined:
        print(f"quarantined {result.quarantined} row(s) that could not be used; reasons in {result.quarantine_uri}")


def _split(args: argparse.Namespace) -> None:
    fractions = parse_fractions(args.fractions)
    table = validate_image_table(read_table(args.src), args.src, require_label=True)
    splits = split_table(table, fractions, old_classes=args.old_classes, seed=args.seed, source=args.src)
    for name, result in write_splits(splits, args.out, rows_per_shard=args.rows_per_shard).items():
        classes = len(np.unique(splits[name].column(LABEL).to_numpy()))
        print(f"{name}: {_wrote(result)}, {classes} classes")


def _info(args: argparse.Namespace) -> None:
    info = table_info(args.uri)
    print(f"{info.uri}: {info.rows} rows in {info.shards} shard(s)")
    print("columns: " + ", ".join(f"{name} {kind}" for name, kind in info.columns.items()))
    if info.classes is not None:
        print(f"classes: {info.classes}")
    if info.class_names:
        more = ", ..." if len(info.class_names) > 5 else ""
        print(f"class names ({len(info.class_names)}): {', '.join(info.class_names[:5])}{more}")
    if info.embedding_dim is not None:
        print(f"embedding dim: {info.embedding_dim}")


def _wrote(result: WriteResult) -> str:
    return f"wrote {result.rows} rows in {len(result.shards)} shard(s) to {result.uri}"
