"""The backfill plan: every gallery row, ranked by a priority policy and cut into tiers of Parquet files.

Why tiers of pre-sorted files instead of ``Dataset.sort``: a sort is an all-to-all shuffle that
materialises the whole gallery before the first batch reaches a GPU (no streaming), and Ray Data's
checkpointing rejects it, so a killed job would sort again from scratch. Ranking needs only one number
per id (16 bytes), so the driver ranks the whole gallery in memory, and one streaming pass copies each
gallery row into the file of its tier. The backfill then reads tier after tier: the order holds at tier
granularity (no item of tier t before tier t-1 is complete) and each tier streams freely inside.

Why the plan carries the gallery rows (image bytes included) rather than filtering the gallery by a
tier's ids: a filter would re-scan the whole gallery once per tier (T full scans), while the copy costs
one scan and makes every tier a plain read of its own files. Files are written into a fresh
attempt directory and ``plan.json`` (written last) lists them, so a plan killed half-way is ignored and
rebuilt, and a committed plan is reused by every later run of the same backfill.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import uuid
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads

from raybackfill.backfill.policies import CLASSIFIER_POLICIES, OLD_EMBEDDING_POLICIES, priority_order, priority_scores
from raybackfill.data import storage
from raybackfill.data.loading import read_gallery, read_shards, write_quarantine
from raybackfill.data.schema import EMBEDDING, ID, SIDE_INFO, check_unique_ids, vectors_of
from raybackfill.data.storage import TableFiles
from raybackfill.types import Policy, Stage, locate_sorted, parse

PLAN_JSON = "plan.json"
RANK = "rank"


@dataclass(frozen=True)
class PlanConfig:
    """What decides the order; a committed plan is reused only by a run asking for the same one."""

    gallery: str
    old_embeddings: str
    policy: Policy = Policy.UNCERTAINTY
    tiers: int = 8
    seed: int = 0
    transformation: str | None = None  # FastFill artefact, for policy "uncertainty"
    old_model: str | None = None  # old backbone artefact (its classifier), for "entropy" / "least_confidence"

    def __post_init__(self) -> None:
        object.__setattr__(self, "policy", parse(Policy, self.policy))
        if self.tiers <= 0:
            raise ValueError(f"tiers must be positive, got {self.tiers}")
        if self.policy is Policy.UNCERTAINTY and not self.transformation:
            raise ValueError("policy 'uncertainty' needs the FastFill transformation (--transformation)")
        if self.policy in CLASSIFIER_POLICIES and not self.old_model:
            raise ValueError(f"policy {self.policy.value!r} needs the old model's classifier (--old-model)")


@dataclass(frozen=True)
class Tier:
    index: int
    rows: int
    files: list[str]  # URIs of the tier's Parquet files (id, image, rank, ...), rows sorted by rank


@dataclass(frozen=True)
class Plan:
    uri: str
    config: PlanConfig
    total: int  # gallery rows in the plan (ids with an old embedding and an image)
    tiers: list[Tier]


def read_plan(uri: str) -> Plan | None:
    """The committed plan under ``uri``, or None when no plan was committed there."""
    json_uri = storage.join(uri, PLAN_JSON)
    if not storage.exists(json_uri):
        return None
    raw = json.loads(storage.read_bytes(json_uri))
    tiers = [Tier(t["index"], t["rows"], [storage.join(uri, f) for f in t["files"]]) for t in raw["tiers"]]
    return Plan(uri, PlanConfig(**raw["config"]), raw["total"], tiers)


def ensure_plan(
    config: PlanConfig,
    uri: str,
    quarantine_uri: str,
    *,
    batch_size: int = 65_536,
    gallery: TableFiles | None = None,
    old_embeddings: TableFiles | None = None,
) -> Plan:
    """Reuse the plan committed under ``uri`` (it must be for the same config), or build and commit one.

    ``gallery`` and ``old_embeddings``: the config's tables already resolved by the caller (else resolved here)."""
    plan = read_plan(uri)
    if plan is not None:
        if plan.config != config:
            raise ValueError(
                f"{uri}: holds a plan for {plan.config}, not {config}; use a new --out to change "
                f"the policy, tiers or inputs of a backfill"
            )
        return plan
    ids, scores = score_gallery(config, batch_size=batch_size, old_embeddings=old_embeddings)
    rank = np.empty(len(ids), dtype=np.int64)
    rank[priority_order(scores, ids)] = np.arange(len(ids), dtype=np.int64)
    attempt = storage.join(uri, f"attempt-{uuid.uuid4().hex[:12]}")
    files = _write_tiers(config, ids, rank, attempt, quarantine_uri, gallery or config.gallery)
    total = _quarantine_missing(ids, files, quarantine_uri)
    tiers = []
    for t in range(config.tiers):
        mine = [f for f in files if f["tier"] == t]
        tiers.append(Tier(t, sum(f["rows"] for f in mine), sorted(f["file"] for f in mine)))
    prefix = len(uri.rstrip("/")) + 1
    manifest = {
        "config": dataclasses.asdict(config),
        "total": total,
        "tiers": [{"index": t.index, "rows": t.rows, "files": [f[prefix:] for f in t.files]} for t in tiers],
    }
    try:
        storage.write_bytes(storage.join(uri, PLAN_JSON), json.dumps(manifest, indent=1).encode(), if_exists="error")
    except FileExistsError:
        return ensure_plan(config, uri, quarantine_uri, batch_size=batch_size)  # a concurrent run committed first
    return Plan(uri, config, total, tiers)


def _score_batch(batch: pa.Table, config: PlanConfig) -> dict[str, np.ndarray]:
    """One priority score per stored old embedding.

    For a policy that reads vectors, a row whose stored vectors are not finite has no usable old embedding:
    it gets the top score, so it is re-embedded first, instead of failing the whole plan. Models are loaded
    per batch (a task, not an actor): the batches are large (the policy models are small MLPs/heads) and
    tasks reuse warm workers.
    """
    # Imported here, not at the top: the workers that copy the gallery into tiers (_split_block) import this
    # module too, and importing torch there would cost each new worker seconds of CPU.
    from raybackfill.models.artifacts import load_model

    ids = batch.column(ID).to_numpy()
    transformation = None
    if config.policy is Policy.UNCERTAINTY:
        assert config.transformation is not None  # PlanConfig requires it for this policy
        transformation = load_model(config.transformation).module
    classifier = None
    if config.policy in CLASSIFIER_POLICIES:
        assert config.old_model is not None  # PlanConfig requires it for these policies
        head = load_model(config.old_model).classifier
        classifier = (head.weight.detach().numpy(), head.bias.detach().numpy())
    old = vectors_of(batch, EMBEDDING)
    uses_side = bool(getattr(transformation, "uses_side_info", False))
    side = vectors_of(batch, SIDE_INFO) if uses_side else None
    finite = np.isfinite(old).all(axis=1) & (True if side is None else np.isfinite(side).all(axis=1))
    scores = np.full(len(ids), np.inf)
    scores[finite] = priority_scores(
        config.policy,
        ids[finite],
        old=old[finite],
        side=None if side is None else side[finite],
        classifier=classifier,
        transformation=transformation,
        seed=config.seed,
    )
    return {ID: ids, "score": scores}


def score_gallery(
    config: PlanConfig, *, batch_size: int = 65_536, old_embeddings: TableFiles | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """(ids, scores) of every stored old embedding: a Ray Data pass, collected to the driver (16 B/id).
    Policies of the id alone read only the id column, in the driver (8 MB for 1M ids: a Ray Data pass would
    start workers to read 512 MB of vectors these policies ignore)."""
    table = storage.open_table(old_embeddings or config.old_embeddings)
    if config.policy not in OLD_EMBEDDING_POLICIES:  # ranked by the id alone
        ids = table.read([ID]).column(ID).to_numpy().astype(np.int64)
        check_unique_ids(ids, config.old_embeddings)
        return ids, priority_scores(config.policy, ids, seed=config.seed).astype(np.float64)
    columns = [ID, EMBEDDING] + ([SIDE_INFO] if SIDE_INFO in table.schema.names else [])
    ds = read_shards(table, columns=columns).map_batches(
        _score_batch,  # type: ignore[arg-type]  # ray's UDF type omits fn_kwargs
        fn_kwargs={"config": config},
        batch_size=batch_size,
        batch_format="pyarrow",
        num_cpus=0.5,
    )
    parts = list(ds.iter_batches(batch_format="numpy", batch_size=None))
    ids = np.concatenate([p[ID] for p in parts]).astype(np.int64)
    scores = np.concatenate([p["score"] for p in parts]).astype(np.float64)
    check_unique_ids(ids, config.old_embeddings)
    return ids, scores


def _split_block(
    block: pa.Table, sorted_ids: np.ndarray, sorted_ranks: np.ndarray, tier_size: int, attempt: str, quarantine_uri: str
) -> dict[str, np.ndarray]:
    """Write one gallery block's rows into its tiers' files (rows sorted by rank); quarantine unknown ids."""
    ids = block.column(ID).to_numpy()
    pos = locate_sorted(sorted_ids, ids, missing="mask")
    known = pos >= 0
    if not known.all():
        bad = ids[~known]
        write_quarantine(quarantine_uri, bad, ["unknown id: no stored old embedding"] * len(bad), stage=Stage.PLAN)
    ranks = sorted_ranks[pos[known]]
    block = block.filter(pa.array(known)).append_column(RANK, pa.array(ranks, type=pa.int64()))
    block = block.take(pc.sort_indices(block, sort_keys=[(RANK, "ascending")]))
    ranks = block.column(RANK).to_numpy()
    tiers = ranks // tier_size
    bounds = np.flatnonzero(np.diff(tiers)) + 1
    out: dict[str, list] = {"tier": [], "rows": [], "file": []}
    for start, stop in zip(np.r_[0, bounds], np.r_[bounds, len(ranks)], strict=True):
        if stop == start:
            continue
        part = block.slice(start, stop - start)
        tier = int(tiers[start])
        digest = hashlib.sha1(part.column(ID).to_numpy().tobytes()).hexdigest()[:20]
        directory = storage.join(attempt, f"tier-{tier:05d}")
        out["file"].append(storage.write_shard(part, directory, f"part-{digest}.parquet", if_exists="skip"))
        out["tier"].append(tier)
        out["rows"].append(part.num_rows)
    return {
        "tier": np.array(out["tier"], dtype=np.int64),
        "rows": np.array(out["rows"], dtype=np.int64),
        "file": np.array(out["file"], dtype=object),
    }


def _write_tiers(
    config: PlanConfig, ids: np.ndarray, rank: np.ndarray, attempt: str, quarantine_uri: str, gallery: str | TableFiles
) -> list[dict]:
    """One streaming pass over the gallery: each block writes its rows into the files of their tiers."""
    order = np.argsort(ids)
    tier_size = max(1, -(-len(ids) // config.tiers))
    ds = read_gallery(gallery).map_batches(
        _split_block,  # type: ignore[arg-type]  # ray's UDF type omits fn_kwargs
        fn_kwargs={
            "sorted_ids": ids[order],
            "sorted_ranks": rank[order],
            "tier_size": tier_size,
            "attempt": attempt,
            "quarantine_uri": quarantine_uri,
        },
        batch_format="pyarrow",
        batch_size=None,
        num_cpus=0.5,
    )
    parts = list(ds.iter_batches(batch_format="numpy", batch_size=None))
    if not parts:
        return []
    tiers, rows, names = (np.concatenate([p[k] for p in parts]) for k in ("tier", "rows", "file"))
    return [{"tier": int(t), "rows": int(r), "file": str(f)} for t, r, f in zip(tiers, rows, names, strict=True)]


def _quarantine_missing(ids: np.ndarray, files: list[dict], quarantine_uri: str) -> int:
    """Ids with an old embedding but no image cannot be re-embedded: quarantined. Returns the rows planned."""
    planned = np.zeros(0, dtype=np.int64)
    if files:
        fs, _ = storage.resolve(files[0]["file"])
        paths = [storage.resolve(f["file"])[1] for f in files]
        planned = pads.dataset(paths, filesystem=fs, format="parquet").to_table(columns=[ID]).column(ID).to_numpy()
    check_unique_ids(planned, "gallery")
    missing = np.setdiff1d(ids, planned)
    if len(missing):
        write_quarantine(quarantine_uri, missing, ["no image in the gallery"] * len(missing), stage=Stage.PLAN)
    return len(planned)
