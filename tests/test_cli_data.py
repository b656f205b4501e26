from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pytest

from raybackfill.cli.main import main
from raybackfill.data.images import decode_rgb, encode_png
from raybackfill.data.info import class_names
from raybackfill.data.schema import TEXT, validate_gallery_schema, validate_image_table
from raybackfill.data.storage import list_shards, read_table, write_table


def test_data_synth_writes_a_valid_50_row_table(tmp_path, capsys):
    out = str(tmp_path / "synth")
    argv = ["data", "synth", "--out", out, "--classes", "10", "--per-class", "5", "--size", "16"]
    assert main([*argv, "--seed", "2", "--rows-per-shard", "20"]) == 0
    table = validate_image_table(read_table(out), out, require_label=True)
    assert table.num_rows == 50
    assert np.bincount(table.column("label").to_numpy()).tolist() == [5] * 10
    assert decode_rgb(table.column("image")[0].as_py()).shape == (16, 16, 3)
    assert len(list_shards(out)) == 3
    assert f"wrote 50 rows in 3 shard(s) to {out}" in capsys.readouterr().out


def test_data_split_then_info(tmp_path, capsys):
    src, out = str(tmp_path / "synth"), str(tmp_path / "splits")
    assert main(["data", "synth", "--out", src, "--classes", "4", "--per-class", "10", "--size", "8"]) == 0
    argv = ["data", "split", src, "--out", out, "--old-classes", "0-1", "--fractions", "train=0.5,gallery=0.5"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "train: wrote 20 rows" in printed and "train_old: wrote 10 rows" in printed
    assert sorted(set(read_table(f"{out}/train_old").column("label").to_pylist())) == [0, 1]
    assert main(["data", "info", f"{out}/gallery"]) == 0
    printed = capsys.readouterr().out
    assert "20 rows in 1 shard(s)" in printed and "classes: 4" in printed


def test_data_import_imagefolder(ray_cluster, tmp_path, capsys):
    for name in ("a", "b"):
        (tmp_path / "src" / name).mkdir(parents=True)
        (tmp_path / "src" / name / "1.png").write_bytes(encode_png(np.zeros((3, 3, 3), np.uint8)))
    out = str(tmp_path / "out")
    assert main(["data", "import", "imagefolder", str(tmp_path / "src"), "--out", out, "--limit", "1"]) == 0
    assert read_table(out).column("path").to_pylist() == ["a/1.png"]
    printed = capsys.readouterr().out
    assert "wrote 1 rows" in printed and "quarantined" not in printed


def test_data_import_imagefolder_reports_the_quarantined_files(ray_cluster, tmp_path, capsys):
    for name in ("a", "b"):
        (tmp_path / "src" / name).mkdir(parents=True)
        (tmp_path / "src" / name / "1.png").write_bytes(encode_png(np.zeros((3, 3, 3), np.uint8)))
    (tmp_path / "src" / "b" / "2.jpg").write_bytes(b"not a jpeg")
    out = str(tmp_path / "out")
    assert main(["data", "import", "imagefolder", str(tmp_path / "src"), "--out", out]) == 0
    printed = capsys.readouterr().out
    assert f"wrote 2 rows in 1 shard(s) to {out}" in printed
    assert f"quarantined 1 row(s) that could not be used; reasons in {out}/_quarantine" in printed
    assert "b/2.jpg: " in read_table(f"{out}/_quarantine").column("reason")[0].as_py()


def test_data_import_text(tmp_path, capsys):
    src = tmp_path / "reviews.jsonl"
    rows = [{"review": "great", "stars": "good"}, {"review": " "}, {"review": "awful", "stars": "bad"}]
    src.write_text("".join(json.dumps(row) + "\n" for row in rows))
    out = str(tmp_path / "out")
    argv = ["data", "import", "text", str(src), "--out", out, "--text-column", "review", "--label-column", "stars"]
    assert main(argv) == 2  # no id field, and ids are not assigned
    assert "line 1: no 'id'; pass assign_ids=True (--assign-ids)" in capsys.readouterr().err
    assert main([*argv, "--assign-ids"]) == 2  # the empty review has no label either
    assert "line 2: no 'stars'" in capsys.readouterr().err
    rows[1]["stars"] = "good"
    src.write_text("".join(json.dumps(row) + "\n" for row in rows))
    assert main([*argv, "--assign-ids"]) == 0
    printed = capsys.readouterr().out
    assert f"wrote 2 rows in 1 shard(s) to {out} from text {src}" in printed
    assert "quarantined 1 row(s)" in printed
    table = read_table(out)
    validate_gallery_schema(table.schema, out, require_label=True, column=TEXT)
    assert table.to_pydict() == {"id": [0, 2], "text": ["great", "awful"], "label": [1, 0]}
    assert class_names(table.schema) == ["bad", "good"]


def test_data_import_text_format_option(tmp_path, capsys):
    src = tmp_path / "export.txt"
    src.write_text("id,text\n5,hello\n6,world\n")
    out = str(tmp_path / "out")
    assert main(["data", "import", "text", str(src), "--out", out]) == 2
    assert "cannot tell the format" in capsys.readouterr().err
    assert main(["data", "import", "text", str(src), "--out", out, "--format", "csv", "--limit", "1"]) == 0
    assert read_table(out).to_pydict() == {"id": [5], "text": ["hello"]}


def test_errors_are_reported_without_a_traceback(tmp_path, capsys):
    assert main(["data", "import", "cifar", str(tmp_path / "missing"), "--out", str(tmp_path / "o")]) == 2
    assert "missing: no such file or directory" in capsys.readouterr().err
    argv = ["data", "split", str(tmp_path / "none"), "--out", str(tmp_path / "o"), "--fractions", "a=0.2"]
    assert main(argv) == 2
    assert "sum to 1" in capsys.readouterr().err


def test_data_split_refuses_a_table_whose_image_column_is_not_bytes_before_writing(tmp_path, capsys):
    src, out = str(tmp_path / "paths"), tmp_path / "splits"
    write_table(pa.table({"id": pa.array([1, 2], pa.int64()), "image": ["a.png", "b.png"],
                          "label": pa.array([0, 1], pa.int32())}), src)  # fmt: skip
    assert main(["data", "split", src, "--out", str(out)]) == 2
    assert "column 'image' must be binary" in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize(
    "argv",
    [
        ["data"],
        ["data", "synth"],
        ["data", "import"],
        ["data", "import", "idx"],
        ["data", "import", "text"],
        ["data", "split"],
        ["data", "info"],
    ],
)
def test_every_subcommand_has_help(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([*argv, "--help"])
    assert exit_info.value.code == 0
    assert "usage: raybackfill data" in capsys.readouterr().out


def test_data_synth_to_s3(s3_bucket, capsys):
    out = f"{s3_bucket}/synth"
    assert main(["data", "synth", "--out", out, "--classes", "3", "--per-class", "2", "--size", "8"]) == 0
    assert main(["data", "info", out]) == 0
    assert "6 rows in 1 shard(s)" in capsys.readouterr().out
