"""`raybackfill demo --text`: its corpus, its two text encoders, and the whole label-free upgrade on a real local
Ray cluster (quick size; the figures are checked against each other, never against hard-coded values)."""

from __future__ import annotations

import contextlib
import io
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from raybackfill.adapters.fit import auto_kinds
from raybackfill.cli.main import main
from raybackfill.data import storage
from raybackfill.data.info import class_names
from raybackfill.data.preprocessing import TextPreprocessing
from raybackfill.data.schema import ID, LABEL, TEXT, SchemaError, text_table
from raybackfill.data.stdlib_docs import MIN_CHARS, STDLIB_PACKAGES, docstrings, module_files, stdlib_docstrings
from raybackfill.demo.configs import TEXT_QUICK, DemoConfig
from raybackfill.demo.pipeline import DemoLayout
from raybackfill.demo.text import corpus_table, split_texts
from raybackfill.encoders import load_encoder
from raybackfill.eval.findings import Z_CLEAR
from raybackfill.models.registry import build_model
from raybackfill.models.text import NGRAM_BASE, ngram_ids


def _ngram_reference(row: list[int], n: int, buckets: int) -> list[int]:
    """Brute force: each window's base-257 number, hashed; 0 where the window touches padding."""
    out = []
    for start in range(len(row) - n + 1):
        window = row[start : start + n]
        code = 0
        for b in window:
            code = code * NGRAM_BASE + b
        out.append(0 if 0 in window else code % (buckets - 1) + 1)
    return out


def test_character_ngrams_match_a_brute_force_hash():
    rng = np.random.default_rng(0)
    tokens = rng.integers(1, 257, size=(3, 12))
    tokens[1, 7:] = 0  # a shorter text
    got = ngram_ids(torch.from_numpy(tokens), (2, 3, 5), 1000).numpy()
    for row, ids in zip(tokens.tolist(), got.tolist(), strict=True):
        assert ids == [i for n in (2, 3, 5) for i in _ngram_reference(row, n, 1000)]
    assert got.min() >= 0 and got.max() < 1000


def test_the_two_encoders_are_different_spaces_that_embed_prepared_text():
    words = TextPreprocessing(tokenizer="hashed_words", max_length=16, vocab_size=64)
    raw = TextPreprocessing(tokenizer="bytes", max_length=32)
    texts = ["Return the event loop.", "Parse a MIME header."]
    v1 = build_model("text_hashed_words", vocab_size=64, word_dim=8, embedding_dim=6, num_classes=3)
    v2 = build_model("text_char_ngrams", buckets=128, lengths=[3], gram_dim=8, hidden_dim=8, embedding_dim=10)
    e1, logits = v1(torch.from_numpy(words.prepare(texts).values))
    e2 = v2.embed(torch.from_numpy(raw.prepare(texts).values))
    assert e1.shape == (2, 6) and logits.shape == (2, 3) and e2.shape == (2, 10)
    assert v1.dims == {"embedding": 6} and v2.dims == {"embedding": 10}
    with pytest.raises(ValueError, match="n-gram lengths"):
        build_model("text_char_ngrams", lengths=[])


def test_docstrings_are_read_without_importing_anything():
    source = 'def f():\n    """Add two numbers."""\nclass C:\n    """A class."""\n    def g(self):\n        pass\n'
    assert docstrings(source) == ["Add two numbers.", "A class."]
    assert all(p.suffix == ".py" and "tests" not in p.parts for p in module_files("email"))
    with pytest.raises(ValueError, match="not a standard-library module"):
        module_files("no_such_module_here")


def test_the_stdlib_corpus_is_labelled_by_module_balanced_and_deterministic():
    table = stdlib_docstrings(3, per_class=40, seed=1)
    again = stdlib_docstrings(3, per_class=40, seed=1)
    assert table.equals(again)
    labels = table.column(LABEL).to_numpy()
    assert np.bincount(labels).tolist() == [40, 40, 40]
    assert class_names(table.schema) == list(STDLIB_PACKAGES[:3])
    texts = table.column(TEXT).to_pylist()
    assert len(set(texts)) == len(texts), "a text belongs to one class"
    assert min(len(t) for t in texts) >= MIN_CHARS
    assert table.column(ID).to_pylist() == list(range(len(texts)))
    with pytest.raises(ValueError, match="classes must be between"):
        stdlib_docstrings(1)


def test_a_given_text_table_replaces_the_corpus_and_is_split_like_images(tmp_path):
    texts = [f"document {i} about topic {i % 3} with enough words" for i in range(60)]
    source = str(tmp_path / "mine")
    storage.write_table(text_table(np.arange(60), texts, np.arange(60) % 3), source)
    config = DemoConfig(out=str(tmp_path / "out"), data=source, old_classes="0")
    layout = DemoLayout(config.out)
    uri, record = corpus_table(layout, config, TEXT_QUICK)
    assert uri == source and record == {"source": source, "documents": 60, "classes": 3}
    splits = split_texts(uri, layout, config)
    sizes = {name: storage.read_table(u, columns=[ID]).num_rows for name, u in splits.items()}
    assert sizes == {"train": 30, "gallery": 18, "query": 12, "train_old": 10}
    unlabelled = str(tmp_path / "unlabelled")
    storage.write_table(text_table(np.arange(3), texts[:3]), unlabelled)
    with pytest.raises(SchemaError, match="label"):
        split_texts(unlabelled, layout, config)


@pytest.fixture(scope="module")
def text_demo(ray_cluster, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("text-demo") / "out")
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert main(["demo", "--text", "--quick", "--out", out]) == 0
    with open(os.path.join(out, "report.json")) as f:
        return out, json.load(f), printed.getvalue()


@pytest.mark.slow
def test_the_text_demo_upgrades_without_labels_and_says_how_well(text_demo):
    out, report, printed = text_demo
    anchors, verdicts = report["anchors"], report["text_demo"]["verdicts"]
    old_old, new_new = anchors["old_old"]["top1"], anchors["new_new"]["top1"]
    # the upgrade is worth doing, and the gate's adapter (chosen on held-out pairs, no labels) beats not upgrading
    assert new_new > old_old
    best = report["text_demo"]["gate"]["best"]
    assert verdicts["best_adapter"] == best and best in {k.value for k in auto_kinds("old-to-new")}
    assert anchors[f"new_adapter_{best}"]["top1"] > old_old
    assert verdicts["new_new_above_old_old"] and verdicts["best_adapter_above_old_old"]
    # above, but by how much: the gaps in standard errors, with a verdict a reader can trust
    for gap in (verdicts["new_new_vs_old_old"], verdicts["best_adapter_vs_old_old"]):
        assert gap["z"] > 0 and gap["verdict"] == ("holds" if gap["z"] >= Z_CLEAR else "noise")
    # every adapter kind is in the gate table and in the report's adapters section, all fitted without labels
    gate = report["text_demo"]["gate"]
    assert set(gate["adapters"]) == {k.value for k in auto_kinds("old-to-new")}
    assert all("labelled" not in a["score"] for a in gate["adapters"].values()), "the pairs' labels were dropped"
    rows = {r["name"]: r for r in report["adapters"]["rows"]}
    assert set(rows) == set(gate["adapters"]) and all(r["label_free"] for r in rows.values())
    assert report["adapters"]["below_old_old"] == [n for n, r in rows.items() if r["top1"] <= old_old]
    # the uncertainty order is judged against a band of random orders, its verdict read off its z
    band = verdicts["uncertainty_vs_random"]
    if "z" in band:
        z = band["z"]
        expected = "holds" if z >= Z_CLEAR else "reversed" if z <= -Z_CLEAR else "noise"
        assert band["verdict"] == expected and band["random_orders"] >= 2
        policies = {r["policy"] for r in report["runs"]}
        assert policies == {"uncertainty", "random"}
    # the instant phase and the backfill ran under live queries that never failed
    online = report["online"]
    gallery = storage.read_table(f"{out}/data/splits/gallery", columns=[ID]).num_rows
    assert online["query_errors"] == 0 and online["queries"] > 0
    phases = {p["name"]: p["items"] for p in online["phases"]}
    assert phases.get("backfill") == gallery
    if online["adapter"] is not None:  # the instant phase served every old item through the gated adapter
        assert phases.get("instant") == gallery
    assert online["live_top1_after"] > online["live_top1_before"]  # old/old on the probes, then new/new
    for name in ("report.json", "report.md", "backfill_curves.png", "online_quality.png"):
        assert Path(out, name).stat().st_size > 0, name
    assert "adapters on held-out pairs" in printed and "uncertainty order" in printed


@pytest.mark.slow
def test_the_text_encoders_are_ordinary_encoder_artefacts(text_demo):
    out, report, _ = text_demo
    v1, v2 = load_encoder(f"{out}/models/v1"), load_encoder(f"{out}/models/v2")
    assert (v1.modality, v2.modality) == ("text", "text")
    vectors, ok, _ = v2.embed_rows(["Return a new event loop.", ""])
    assert ok.tolist() == [True, False] and vectors.shape == (1, report["text_demo"]["encoders"]["v2"]["dim"])
    assert v1.dim != v2.dim
