"""Turn a model made elsewhere into a raybackfill artefact: its file (or entrypoint), its preprocessing and its
version in ``model.json``, and the embedding dimension measured by running it once on a probe batch.

Registering is where a model is checked: a file that does not load, a layer that does not exist or an output
that is not ``(n, d)`` fails here, not hours into a backfill.
"""

from __future__ import annotations

import dataclasses
import tempfile
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from raybackfill.data.preprocessing import ImagePreprocessing, Preprocessing, probe_image
from raybackfill.encoders.encoder import EntrypointTrust, check_trusted, load_encoder, torchvision_preprocessing
from raybackfill.models.artifacts import (
    EXPORT_FILE,
    KIND_FILES,
    MODEL_JSON,
    SAFETENSORS_FILE,
    STATE_DICT_FILE,
    TORCHSCRIPT_FILE,
    ArtifactError,
    ModelSpec,
    commit_artifact,
    decode_weights,
)
from raybackfill.types import EncoderKind, Metric, Modality

__all__ = ["EncoderSource", "register_encoder"]


@dataclass(frozen=True)
class EncoderSource:
    """A model to register.

    Args:
        kind: where it comes from.
        version: the version the index and the tables record (e.g. ``"clip-b32-2025-06"``).
        path: the TorchScript file, the ``.pt2`` program, or the weights (safetensors, or a state dict read with
            ``weights_only=True``) of a torchvision architecture; none for an entrypoint.
        architecture: torchvision's name of the architecture (``resnet50``); a free description otherwise.
        entrypoint: ``package.module:factory`` (kind entrypoint); called as ``factory(**kwargs)``.
        kwargs: keyword arguments of the torchvision builder or of the factory.
        preprocessing: how rows are prepared; torchvision defaults to the architecture's own preset.
        embedding_layer: torchvision graph node giving the embedding (default: the penultimate features).
        metric: ``cosine`` or ``l2``.
    """

    kind: EncoderKind
    version: str
    path: str | None = None
    architecture: str = ""
    entrypoint: str | None = None
    kwargs: dict[str, Any] = field(default_factory=dict)
    preprocessing: Preprocessing | None = None
    embedding_layer: str | None = None
    metric: Metric = Metric.COSINE


def register_encoder(source: EncoderSource, out_uri: str, *, trust: EntrypointTrust | None = None) -> ModelSpec:
    """Write ``source`` as an artefact at ``out_uri`` and return its spec, with ``dims["embedding"]`` measured.

    The model is loaded and run on a probe batch before ``model.json`` commits the artefact. Registering an
    entrypoint runs it, so it must be trusted like any other use.

    Examples:
        >>> register_encoder(EncoderSource(EncoderKind.TORCHVISION, "v1", path="resnet50.safetensors",
        ...                                architecture="resnet50"), "models/v1")  # doctest: +SKIP
    """
    kind = EncoderKind(source.kind)
    preprocessing = source.preprocessing
    if preprocessing is None:
        if kind is not EncoderKind.TORCHVISION:
            raise ValueError(f"a {kind.value} encoder needs its preprocessing declared")
        preprocessing = torchvision_preprocessing(source.architecture)
    if isinstance(preprocessing, ImagePreprocessing) and preprocessing.crop is None:
        raise ValueError("declare the image size the encoder takes (crop)")
    files: dict[str, bytes] = {}
    weights = KIND_FILES[kind][0]
    if kind is EncoderKind.ENTRYPOINT:
        if source.path is not None:
            raise ValueError("an entrypoint encoder has no model file: its factory loads what it needs")
    else:
        if source.path is None:
            raise ValueError(f"a {kind.value} encoder needs the path of its file")
        data = Path(source.path).read_bytes()
        if kind is EncoderKind.TORCHVISION:
            if source.path.endswith(".safetensors"):
                weights = SAFETENSORS_FILE
            else:
                decode_weights(data, source.path)  # refuses pickled objects before anything is written
                weights = STATE_DICT_FILE
        else:
            weights = {EncoderKind.TORCHSCRIPT: TORCHSCRIPT_FILE, EncoderKind.TORCH_EXPORT: EXPORT_FILE}[kind]
        files[weights] = data
    spec = ModelSpec(
        architecture=source.architecture,
        version=source.version,
        kwargs=dict(source.kwargs),
        metric=source.metric,
        kind=kind,
        weights=weights,
        preprocessing=preprocessing.to_dict(),
        embedding_layer=source.embedding_layer,
        entrypoint=source.entrypoint,
        created=datetime.now(UTC).isoformat(timespec="seconds"),
    )
    check_trusted(spec, trust or EntrypointTrust(), source.entrypoint or "entrypoint")
    dim = _probe_dim(spec, files, trust)
    return commit_artifact(out_uri, dataclasses.replace(spec, dims={"embedding": dim}), files)


def _probe_dim(spec: ModelSpec, files: dict[str, bytes], trust: EntrypointTrust | None) -> int:
    """Load the encoder from a scratch copy of the artefact and embed a probe batch: its width is the dim."""
    with tempfile.TemporaryDirectory(prefix="raybackfill-probe-") as scratch:
        for name, data in files.items():
            Path(scratch, name).write_bytes(data)
        Path(scratch, MODEL_JSON).write_text(spec.to_json())
        encoder = load_encoder(scratch, trust=trust)
        vectors, ok, reasons = encoder.embed_rows(_probe_rows(encoder.modality))
    if not ok.all():
        raise ArtifactError(f"{spec.version}: the probe batch did not prepare ({reasons})")
    if vectors.ndim != 2 or vectors.shape[1] < 1 or not np.isfinite(vectors).all():
        raise ArtifactError(
            f"{spec.version}: the encoder returned {vectors.shape} with non-finite values or no "
            "columns on a probe batch"
        )
    return int(vectors.shape[1])


def _probe_rows(modality: Modality) -> list:
    if modality is Modality.TEXT:
        return ["a probe sentence", "another one"]
    return [probe_image(seed) for seed in (0, 1)]
