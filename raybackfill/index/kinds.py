"""FAISS index kinds from factory strings: validation, how each kind is addressed, and search parameters.

Any ``faiss.index_factory`` string names the index of a space ("Flat", "IVF4096,PQ32", "OPQ16,IVF1024,PQ16",
"HNSW32", "IVF1024,SQ8", "PQ16", ...). The shard needs to know three things about the index it gets:

- its *layout* (:class:`Layout`), which decides how an item is removed when it moves between spaces:
  ``codes`` (one fixed-size code row per vector: Flat, PQ, SQ, RQ, also behind an OPQ/PCA transform) is
  edited row by row; ``ivf`` (an IVF index, also behind a transform) removes by id through a hashtable
  direct map; ``graph`` (HNSW, NSG, a refined index, ...: no cheap removal) marks rows deleted, filters them
  at search time and is rebuilt past a deleted fraction;
- whether an empty index must be trained before anything is added;
- which search parameters it takes (``nprobe`` and ``max_codes`` for IVF, ``efSearch`` for HNSW, ``k_factor``
  for a refined index), turned into a FAISS ``SearchParameters`` object per query, so a query can override
  the configured defaults without touching the shared index;
- which build parameters it takes (``efConstruction`` for HNSW), set on the empty index before anything is
  added, so every index of a space, its rebuilds and its snapshots are built alike.

Pure FAISS, no Ray.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from typing import Any

import faiss

from raybackfill.types import Layout, Metric, parse

# A factory string is checked at construction time, before the data (and so the dimension) is known: it is
# built at these dims, and accepted when any of them builds (PQ32 needs d % 32 == 0, PCA64 needs d >= 64, ...).
# The real dimension is checked when the first vectors arrive.
PROBE_DIMS = (128, 256, 768, 960, 1024, 96, 64, 32)
# Defaults a factory's kind gets unless its config says otherwise (FAISS's own are nprobe=1 and efSearch=16,
# which give poor recall at the sizes this index serves).
DEFAULT_PARAMS = {"nprobe": 16, "efSearch": 64}
# name -> (type, minimum)
PARAM_TYPES: dict[str, tuple[type, float]] = {
    "nprobe": (int, 1),
    "max_codes": (int, 0),
    "efSearch": (int, 1),
    "k_factor": (float, 1.0),
}
# Build parameters a kind gets unless its config says otherwise. A shard grows a graph by many small additions
# (loads and upserts arrive in batches, applied in chunks between searches), and FAISS's own efConstruction of
# 40, made for one large add, then builds a markedly worse graph than one add of the same rows would; at 80,
# small additions build a graph as good as one add (bench_index.py kinds reports recall beside a bare index
# built with the same parameters).
DEFAULT_BUILD_PARAMS = {"efConstruction": 80}
BUILD_PARAM_TYPES: dict[str, tuple[type, float]] = {"efConstruction": (int, 1)}


def faiss_metric(metric: Metric) -> int:
    return faiss.METRIC_L2 if parse(Metric, metric) is Metric.L2 else faiss.METRIC_INNER_PRODUCT


def build(factory: str, dim: int, metric: Metric, build_params: Mapping[str, Any] | None = None) -> faiss.Index:
    """An empty index of ``factory`` at ``dim`` with ``build_params`` set (see :func:`set_build_params`); a string
    FAISS cannot build at this dim is a ValueError."""
    try:
        index = faiss.index_factory(int(dim), factory, faiss_metric(metric))
    except RuntimeError as err:
        reason = str(err).strip().splitlines()[-1]
        raise ValueError(f"index factory {factory!r} does not build an index of dim {dim}: {reason}") from None
    if build_params:
        set_build_params(index, build_params)
    return index


def set_build_params(index: faiss.Index, build_params: Mapping[str, Any]) -> faiss.Index:
    """Set validated build parameters (:func:`check_build_params`) on an empty ``index``; returns it."""
    inner = unwrap(index)
    if "efConstruction" in build_params and isinstance(inner, faiss.IndexHNSW):
        inner.hnsw.efConstruction = int(build_params["efConstruction"])
    return index


def applicable_build_params(index: faiss.Index) -> set[str]:
    """The build parameter names an index takes."""
    return {"efConstruction"} if isinstance(unwrap(index), faiss.IndexHNSW) else set()


def check_build_params(
    params: Mapping[str, Any] | None, factory: str, metric: Metric, what: str = "build_params"
) -> dict:
    """Validated build parameters for an index of ``factory`` (as :func:`check_params` for search parameters).

    Raises:
        ValueError: naming the parameter, the index and the parameters that do apply.
    """
    takes = applicable_build_params(probe(factory, metric))
    return _checked(params, takes, BUILD_PARAM_TYPES, factory, what, "build parameter")


def default_build_params(factory: str, metric: Metric, configured: Mapping[str, Any]) -> dict:
    """The build parameters of an index: DEFAULT_BUILD_PARAMS that apply, then the config's."""
    takes = applicable_build_params(probe(factory, metric))
    return {name: value for name, value in DEFAULT_BUILD_PARAMS.items() if name in takes} | dict(configured)


@functools.lru_cache(maxsize=64)
def probe(factory: str, metric: Metric) -> faiss.Index:
    """An empty index of ``factory`` at the first probe dim it builds at (to learn its kind before any data).

    Raises:
        ValueError: naming the field ``factory`` when FAISS builds it at none of the probe dims.
    """
    if not isinstance(factory, str) or not factory.strip():
        raise ValueError(
            f"factory must be a FAISS index_factory string such as 'Flat' or 'IVF1024,PQ32', got {factory!r}"
        )
    if factory.replace(" ", "").upper().startswith("IDMAP"):
        raise ValueError(f"factory {factory!r}: leave out IDMap, the shard maps ids itself (e.g. use 'Flat')")
    first_error = None
    for dim in PROBE_DIMS:
        try:
            index = build(factory, dim, metric)
        except ValueError as err:
            first_error = first_error or err
            continue
        if isinstance(unwrap(index), faiss.IndexNSG):
            raise ValueError(f"factory {factory!r}: an NSG index is built once and takes no additions; use HNSW")
        return index
    raise ValueError(f"factory {factory!r} is not an index FAISS can build ({first_error})")


def unwrap(index: faiss.Index) -> faiss.Index:
    """The index behind any chain of IndexPreTransform (OPQ, PCA, ...)."""
    while isinstance(index, faiss.IndexPreTransform):
        index = faiss.downcast_index(index.index)
    return index


def layout_of(index: faiss.Index) -> Layout:
    inner = unwrap(index)
    if isinstance(inner, faiss.IndexFlatCodes):
        return Layout.CODES
    if isinstance(inner, faiss.IndexIVF):
        return Layout.IVF
    return Layout.GRAPH


def needs_training(factory: str, metric: Metric) -> bool:
    return not probe(factory, metric).is_trained


def applicable_params(index: faiss.Index) -> set[str]:
    """The search parameter names an index (and the indexes it wraps) takes."""
    index = unwrap(index)
    if isinstance(index, faiss.IndexRefine):
        return {"k_factor"} | applicable_params(faiss.downcast_index(index.base_index))
    if isinstance(index, faiss.IndexIVF):
        return {"nprobe", "max_codes"}
    if isinstance(index, faiss.IndexHNSW):
        return {"efSearch"}
    return set()


def check_params(params: Mapping[str, Any] | None, factory: str, metric: Metric, what: str = "params") -> dict:
    """Validated search parameters for an index of ``factory``: known names that apply to it, positive values.

    Raises:
        ValueError: naming the parameter, the index and the parameters that do apply.
    """
    return _checked(params, applicable_params(probe(factory, metric)), PARAM_TYPES, factory, what, "search parameter")


def _checked(
    params: Mapping[str, Any] | None,
    takes: set[str],
    types: dict[str, tuple[type, float]],
    factory: str,
    what: str,
    noun: str,
) -> dict:
    if params is None:
        return {}
    example = next(iter(types))
    if not isinstance(params, Mapping):
        raise ValueError(f"{what} must be a dict of {noun}s (e.g. {{{example!r}: 32}}), got {params!r}")
    out: dict[str, Any] = {}
    for name, value in params.items():
        if name not in types:
            raise ValueError(f"{what}: unknown {noun} {name!r}; known: {sorted(types)}")
        if name not in takes:
            raise ValueError(
                f"{what}: {name!r} does not apply to index {factory!r} (it takes {sorted(takes) or 'no parameters'})"
            )
        kind, minimum = types[name]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"{what}: {name} must be a number, got {value!r}")
        if kind is int and int(value) != value:
            raise ValueError(f"{what}: {name} must be an integer, got {value!r}")
        if value < minimum:
            raise ValueError(f"{what}: {name} must be at least {minimum}, got {value!r}")
        out[name] = kind(value)
    return out


def default_params(factory: str, metric: Metric, configured: Mapping[str, Any]) -> dict:
    """The parameters a search uses when the query sets none: DEFAULT_PARAMS that apply, then the config's."""
    takes = applicable_params(probe(factory, metric))
    return {name: value for name, value in DEFAULT_PARAMS.items() if name in takes} | dict(configured)


def search_parameters(index: faiss.Index, params: Mapping[str, Any], selector=None, keep: list | None = None):
    """A FAISS SearchParameters object for ``index`` carrying ``params`` and an optional IDSelector (None when
    there is nothing to set). ``keep`` collects every object the result points to: SWIG does not keep them
    alive, so the caller holds ``keep`` until the search returns."""
    keep = [] if keep is None else keep
    out: Any  # one of FAISS's SearchParameters classes (their stubs share no settable base)
    if isinstance(index, faiss.IndexPreTransform):
        inner = search_parameters(faiss.downcast_index(index.index), params, selector, keep)
        if inner is None:
            return None
        out = faiss.SearchParametersPreTransform()
        out.index_params = inner
    elif isinstance(index, faiss.IndexRefine):
        base = search_parameters(faiss.downcast_index(index.base_index), params, selector, keep)
        if base is None and "k_factor" not in params:
            return None
        out = faiss.IndexRefineSearchParameters()
        out.k_factor = float(params.get("k_factor", index.k_factor))
        if base is not None:
            out.base_index_params = base
    elif isinstance(index, faiss.IndexIVF):
        out = faiss.SearchParametersIVF()
        out.nprobe = int(params.get("nprobe", index.nprobe))
        out.max_codes = int(params.get("max_codes", index.max_codes))
    elif isinstance(index, faiss.IndexHNSW):
        out = faiss.SearchParametersHNSW()  # type: ignore[attr-defined]  # missing from faiss's stubs
        out.efSearch = int(params.get("efSearch", index.hnsw.efSearch))
    elif selector is not None:
        out = faiss.SearchParameters()
    else:
        return None
    if selector is not None and not isinstance(index, (faiss.IndexPreTransform, faiss.IndexRefine)):
        out.sel = selector
    keep.append(out)
    return out
