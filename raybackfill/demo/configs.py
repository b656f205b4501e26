"""The demo's configuration as data: what one run does (:class:`DemoConfig`), how big it is
(:class:`DemoScale`, with the two built-in sizes :data:`QUICK` and :data:`FULL`; the text demo's
:class:`TextScale`, :data:`TEXT_QUICK` and :data:`TEXT_FULL`) and how the online phase serves and paces its
backfill (:class:`OnlineConfig`).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass, field

from raybackfill.types import MODEL_METRICS, Method, Metric, Policy, Strategy, Tokenizer, parse


@dataclass(frozen=True)
class Fit:
    """How one kind of model trains: epochs, global batch size, peak learning rate (cosine schedule) and,
    for the supervised backbones, whether batches are augmented (see ``train_backbone``)."""

    epochs: int
    batch_size: int
    lr: float
    augment: bool = True


@dataclass(frozen=True)
class OnlineConfig:
    """The online phase: a live index serves the old gallery while a backfill runs into it and a client
    queries it.

    ``min_seconds`` paces the backfill to last at least that long (its phases, the instant transformation
    and the re-embedding, move at most ``items / min_seconds`` items per second, counting each item once
    per phase), so a small gallery does not finish before the client has taken enough readings to draw
    the live quality as curves. ``None`` runs unpaced. ``batch_size`` is the rows per upsert: smaller
    batches make more, smaller steps in those curves.
    """

    method: Method = Method.FASTFILL
    policy: Policy = Policy.UNCERTAINTY
    # rank_merge serves old/old while every item is still old, the transformed/new vectors once moved, and a
    # merge of the two parts in between (a `compatible` query would score new-model queries against old
    # vectors before the instant phase).
    strategy: Strategy = Strategy.RANK_MERGE
    shards: int = 2
    k: int = 10
    max_probes: int = 200
    pause_s: float = 0.2  # between two probe batches, so the client does not starve the backfill
    tiers: int = 4
    min_seconds: float | None = 60.0
    batch_size: int = 16

    def __post_init__(self) -> None:
        for name, kind in (("method", Method), ("policy", Policy), ("strategy", Strategy)):
            object.__setattr__(self, name, parse(kind, getattr(self, name), what=name))
        if self.min_seconds is not None and self.min_seconds <= 0:
            raise ValueError(f"min_seconds must be positive (or None for no pacing), got {self.min_seconds}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {self.batch_size}")


@dataclass(frozen=True)
class DemoScale:
    """How big the demo is: built-in data size, model sizes and how each kind of model trains.

    Epoch counts are budgets, not choices: every run holds out a validation share of its own training rows
    and keeps the epoch that split chooses (see :class:`raybackfill.train.trainer.Monitor`); the backbones'
    learning rate is chosen among ``backbone_lrs`` on the old model's validation split. What stays fixed is
    the shape of the search: small batches for the backbones (more optimizer steps per epoch at the same cost
    on a CPU) and no augmentation (so the new models fit their training set, which this project supposes
    FastFill's head relies on; the papers' reference code trains with augmentation and label smoothing).
    The full size's 50 classes x 140 images give 1,400 queries, so that one query is 0.07 points of top-1.
    """

    classes: int = 50  # built-in data only (ignored with --data)
    per_class: int = 140
    image_size: int = 32
    width: int = 16  # small_cnn trunk width of the backbones
    embedding_dim: int = 64
    # As wide as the old embedding, as in FCT's reference architecture (128-d old and side-information).
    side_info_dim: int = 64
    # Learning rates the old model is trained at; its validation split picks the one every backbone uses (the
    # ``lr`` of ``old`` and ``new`` is then replaced). A single rate skips the search.
    backbone_lrs: tuple[float, ...] = (3e-3, 1e-3, 1e-2)
    old: Fit = Fit(epochs=8, batch_size=32, lr=3e-3, augment=False)
    new: Fit = Fit(epochs=40, batch_size=32, lr=3e-3, augment=False)  # the new (independent), BCT, RACT backbones
    side_info: Fit = Fit(epochs=10, batch_size=128, lr=3e-3)  # SimCLR wants many in-batch negatives
    transformation: Fit = Fit(epochs=20, batch_size=64, lr=1e-3)  # FCT / FastFill
    reverse: Fit = Fit(epochs=15, batch_size=128, lr=1e-3)  # psi
    ract_tau: float = 0.01  # RACT's temperature: the paper's value, not tuned here
    hidden_dim: int = 128  # transformation branches
    mixer_dim: int = 512
    beta_points: int = 21
    random_seeds: int = 8  # random orders the other orders are compared with (report: seed_aucs)
    online: OnlineConfig = OnlineConfig()
    # `demo --chain`'s third backbone v3: the new model's recipe (every train class) with a wider trunk, so a
    # better model than v2; None: twice ``width``. ``v3``: how it trains (None: as ``new``, at the chosen rate).
    v3_width: int | None = None
    v3: Fit | None = None

    def resolved_v3_width(self) -> int:
        return self.v3_width if self.v3_width is not None else 2 * self.width


FULL = DemoScale()
QUICK = DemoScale(
    classes=20,
    per_class=100,
    old=Fit(epochs=6, batch_size=32, lr=3e-3, augment=False),
    new=Fit(epochs=30, batch_size=32, lr=3e-3, augment=False),
    side_info=Fit(epochs=12, batch_size=128, lr=3e-3),
    transformation=Fit(epochs=15, batch_size=64, lr=1e-3),
    reverse=Fit(epochs=10, batch_size=128, lr=1e-3),
    beta_points=11,
    random_seeds=4,
    online=OnlineConfig(min_seconds=40.0),
)


@dataclass(frozen=True)
class TextEncoderSpec:
    """One text encoder of the text demo: its architecture (:mod:`raybackfill.models.text`), builder arguments,
    the tokenizer it reads (with ``max_length`` and, for hashed words, ``vocab_size``) and how it trains."""

    architecture: str
    kwargs: dict
    tokenizer: Tokenizer
    max_length: int
    fit: Fit
    vocab_size: int = 32_768


@dataclass(frozen=True)
class TextScale:
    """How big `raybackfill demo --text` is: the standard-library docstring corpus (``classes`` modules, at most
    ``per_class`` docstrings each), the two encoders, the paired sample and the label-free adapters.

    v1 is a hashed bag of words trained on the old classes only (as the image demo's old model), v2 character
    n-grams trained on every class, with a different width: the two spaces share nothing. ``min_recall`` is the
    gate the adapter the backfill runs must pass (recall@10 of new queries on its held-out pairs); ``sample``
    is how many train items the paired sample embeds with both models (None: every train item).
    """

    classes: int = 24
    per_class: int = 200
    v1: TextEncoderSpec = TextEncoderSpec(
        "text_hashed_words",
        {"word_dim": 64, "embedding_dim": 48},
        Tokenizer.HASHED_WORDS,
        64,
        Fit(epochs=25, batch_size=32, lr=1e-2, augment=False),
        vocab_size=16_384,
    )
    v2: TextEncoderSpec = TextEncoderSpec(
        "text_char_ngrams",
        {"buckets": 32_768, "lengths": [3, 4, 5], "gram_dim": 64, "hidden_dim": 128, "embedding_dim": 96},
        Tokenizer.BYTES,
        256,
        Fit(epochs=25, batch_size=32, lr=1e-2, augment=False),
    )
    sample: int | None = None
    adapter: Fit = Fit(epochs=30, batch_size=64, lr=1e-3)  # mlp / fastfill adapters
    min_recall: float = 0.3
    beta_points: int = 21
    random_seeds: int = 8
    online: OnlineConfig = OnlineConfig(min_seconds=40.0)


TEXT_FULL = TextScale()
TEXT_QUICK = TextScale(
    classes=8,
    per_class=90,
    v1=dataclasses.replace(TEXT_FULL.v1, fit=Fit(epochs=15, batch_size=32, lr=1e-2, augment=False)),
    v2=dataclasses.replace(TEXT_FULL.v2, fit=Fit(epochs=15, batch_size=32, lr=1e-2, augment=False)),
    adapter=Fit(epochs=20, batch_size=64, lr=1e-3),
    beta_points=11,
    random_seeds=6,
    online=OnlineConfig(min_seconds=10.0, max_probes=100),
)


@dataclass(frozen=True)
class DemoConfig:
    """One demo run. ``data=None`` uses the built-in synthetic dataset at ``scale``.

    ``metric``: how every figure of the report is scored (cosine, or l2 distance as the reference code
    does). ``chain``: add the chained upgrade v1 -> v2 -> v3 (see :mod:`raybackfill.demo.chain`).
    ``diagnostics``: add the research diagnostics of :mod:`raybackfill.eval.diagnostics` (the
    uncertainty head's rank agreement with its true error, and the oracle order it is bounded by).
    """

    out: str = "raybackfill-demo"
    quick: bool = False
    # any labelled image table (id, image, label), local or s3://; the text demo: a text table (id, text, label)
    data: str | None = None
    old_classes: str = "half"  # classes the old model is trained on: "half", "0-49", "0,1,5-9"
    seed: int = 0  # data, splits, training and the random policy
    scale: DemoScale | None = None  # None: QUICK or FULL by ``quick``
    text_scale: TextScale | None = None  # the text demo's; None: TEXT_QUICK or TEXT_FULL by ``quick``
    fractions: dict[str, float] = field(default_factory=lambda: {"train": 0.5, "gallery": 0.3, "query": 0.2})
    num_workers: int = 0  # Ray Train workers per model; 0 = local mode in the driver (fastest on 2 cores)
    cpus_per_worker: float = 1.0
    # torch intra-op threads of the driver, which trains in local mode: a second thread competes with Ray
    # Data's batch iteration threads for the same cores.
    torch_threads: int = 1
    metric: Metric = Metric.COSINE
    diagnostics: bool = False
    # Stop with ModelDidNotLearnError when a backbone ends near chance on its validation split. Off only for
    # structural tests on data too small to tell (a few images per class).
    require_learning: bool = True
    # Also evaluate a chained upgrade v1 -> v2 -> v3 (report section ``chain``, chain_curves.png): a third,
    # better backbone v3 and a FastFill transformation h23 (v2 -> v3); the v3 upgrade starts while v2's
    # backfill has re-embedded ``chain_v2_fraction`` of the gallery (and, for comparison, after it finished).
    chain: bool = False
    chain_v2_fraction: float = 0.5

    def __post_init__(self) -> None:
        object.__setattr__(self, "metric", parse(Metric, self.metric, among=MODEL_METRICS))
        if not 0.0 <= self.chain_v2_fraction <= 1.0:
            raise ValueError(f"chain_v2_fraction must lie in [0, 1], got {self.chain_v2_fraction}")

    def resolved_scale(self) -> DemoScale:
        if self.scale is not None:
            return self.scale
        return QUICK if self.quick else FULL

    def resolved_text_scale(self) -> TextScale:
        if self.text_scale is not None:
            return self.text_scale
        return TEXT_QUICK if self.quick else TEXT_FULL


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run a demo with ``n`` torch threads in this process, and give the caller its own count back after."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)
