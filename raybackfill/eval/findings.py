"""The papers' directional findings, read off one evaluation report, each with its noise.

A difference only counts when it stands clear of the noise of the measurement: the spread of random backfill
orders (areas under backfill curves) or the binomial standard error of a share of queries (top-1, flip rates).
Each finding is HOLDS (z >= Z_CLEAR), REVERSED (z <= -Z_CLEAR), NOISE in between, or MISSING when the report
lacks the runs it needs. The directions are those of the papers behind each method:
BCT (Shen et al. 2020), RACT (Zhang et al. 2022), FCT (Ramanujan et al. 2022), FastFill (Jaeckle et al. 2023)
and online backfilling with metric-compatible training (Seo et al. 2025).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum

from raybackfill.types import Method, Policy

Z_CLEAR = 2.0
NFR_BETA = 0.5


class Verdict(StrEnum):
    HOLDS = "holds"
    NOISE = "noise"
    REVERSED = "reversed"
    MISSING = "missing"


@dataclass(frozen=True)
class Finding:
    """``claim``: the paper's direction; ``a`` is expected above ``b`` (below, for flip rates, where
    ``lower_is_better``); ``z`` is the signed gap in the measurement's standard errors (positive: as claimed)."""

    claim: str
    a_label: str
    a: float | None
    b_label: str
    b: float | None
    z: float | None
    verdict: Verdict
    lower_is_better: bool = False


def verdict(z: float | None) -> Verdict:
    """holds at z >= Z_CLEAR, reversed at z <= -Z_CLEAR, noise in between (missing without a z)."""
    if z is None:
        return Verdict.MISSING
    if z >= Z_CLEAR:
        return Verdict.HOLDS
    return Verdict.REVERSED if z <= -Z_CLEAR else Verdict.NOISE


def share_se(p: float, n: int) -> float:
    """Binomial standard error of a share ``p`` of ``n`` queries."""
    return math.sqrt(max(p * (1.0 - p), 0.0) / max(n, 1))


def _gap(a: float, b: float, se: float) -> float | None:
    if se > 0:
        return (a - b) / se
    return None if a == b else math.copysign(math.inf, a - b)


def _runs(report: Mapping) -> dict[tuple[str, str], Mapping]:
    return {(run["method"], run["policy"]): run for run in report["runs"]}


def _first(runs: Mapping, method: Method, policies: tuple[Policy, ...]) -> Mapping | None:
    return next((runs[(method, p)] for p in policies if (method, p) in runs), None)


def random_sd(run: Mapping | None, key: str) -> float | None:
    """Sample standard deviation of a random-order run's areas over its seeds (None without several)."""
    spread = (run or {}).get("seed_aucs")
    if not spread or len(spread[key]) < 2:
        return None
    values = spread[key]
    mean = sum(values) / len(values)
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def _at_beta(run: Mapping, key: str, beta: float) -> float:
    i = min(range(len(run["betas"])), key=lambda j: abs(run["betas"][j] - beta))
    return run[key][i]


def _area(claim: str, a_run: Mapping | None, a_label: str, b_run: Mapping | None, b_label: str,
          sd: float | None, key: str = "auc_map") -> Finding:  # fmt: skip
    if a_run is None or b_run is None or sd is None:
        a_value, b_value = (None if run is None else run[key] for run in (a_run, b_run))
        return Finding(claim, a_label, a_value, b_label, b_value, None, Verdict.MISSING)
    z = _gap(a_run[key], b_run[key], sd)
    return Finding(claim, a_label, a_run[key], b_label, b_run[key], z, verdict(z))


def findings(report: Mapping) -> list[Finding]:
    """Every finding the report has the runs for (MISSING for the others), in a fixed order."""
    anchors, runs, n = report["anchors"], _runs(report), report["queries"]["evaluated"]
    out = []
    oo, nn = anchors["old_old"], anchors["new_new"]
    for metric in ("top1", "map"):
        se = math.sqrt(2) * share_se((oo["top1"] + nn["top1"]) / 2, n)  # mAP gets top-1's scale: no closed form
        z = _gap(nn[metric], oo[metric], se)
        out.append(Finding(f"the new model retrieves better than the old ({metric})", "new/new", nn[metric],
                           "old/old", oo[metric], z, verdict(z)))  # fmt: skip
    if "bct_old" in anchors:
        bo = anchors["bct_old"]["top1"]
        z = _gap(bo, oo["top1"], math.sqrt(2) * share_se((bo + oo["top1"]) / 2, n))
        out.append(Finding("BCT: the new query on the old gallery beats old/old (top-1)", "BCT query/old gallery", bo,
                           "old/old", oo["top1"], z, verdict(z)))  # fmt: skip
    else:
        out.append(Finding("BCT: the new query on the old gallery beats old/old (top-1)", "BCT query/old gallery",
                           None, "old/old", oo["top1"], None, Verdict.MISSING))  # fmt: skip
    ract, bct = (_first(runs, m, (Policy.ENTROPY, Policy.RANDOM)) for m in (Method.RACT, Method.BCT))
    claim = f"RACT flips fewer queries than BCT (NFR at beta {NFR_BETA:g})"
    if ract is None or bct is None:
        out.append(Finding(claim, "ract", None, "bct", None, None, Verdict.MISSING, lower_is_better=True))
    else:
        r, b = _at_beta(ract, "nfr", NFR_BETA), _at_beta(bct, "nfr", NFR_BETA)
        z = _gap(b, r, math.sqrt(share_se(r, n) ** 2 + share_se(b, n) ** 2))
        out.append(Finding(claim, f"ract/{ract['policy']}", r, f"bct/{bct['policy']}", b, z, verdict(z),
                           lower_is_better=True))  # fmt: skip
    ff_random = runs.get((Method.FASTFILL, Policy.RANDOM))
    ff_ordered = runs.get((Method.FASTFILL, Policy.UNCERTAINTY))
    band = random_sd(ff_random, "auc_map")
    out.append(_area("FastFill: the uncertainty order beats random orders (mAP area)",
                     ff_ordered, "fastfill/uncertainty", ff_random, "fastfill/random", band))  # fmt: skip
    out.append(_area("FastFill with its order beats FCT with a random one (mAP area)",
                     ff_ordered, "fastfill/uncertainty", runs.get((Method.FCT, Policy.RANDOM)), "fct/random",
                     band))  # fmt: skip
    out.append(_area("FCT: side-information helps (mAP area)", runs.get((Method.FCT_SIDE_INFO, Policy.RANDOM)),
                     "fct_side_info/random", runs.get((Method.FCT, Policy.RANDOM)), "fct/random", band))  # fmt: skip
    psi, plain = runs.get((Method.RANK_MERGE_PSI, Policy.RANDOM)), runs.get((Method.RANK_MERGE, Policy.RANDOM))
    sd_psi, sd_plain = random_sd(psi, "auc_map"), random_sd(plain, "auc_map")
    pooled = math.sqrt(sd_psi**2 + sd_plain**2) if sd_psi is not None and sd_plain is not None else None
    out.append(_area("rank merge: psi (metric-compatible) beats the plain merge (mAP area)", psi,
                     "rank_merge_psi/random", plain, "rank_merge/random", pooled))  # fmt: skip
    return out
