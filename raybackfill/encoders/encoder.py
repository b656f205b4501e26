"""One interface for every model that embeds: prepared rows in, a float32 ``(n, d)`` array out.

An :class:`Encoder` is loaded from an artefact directory (``model.json`` + the model's file) of any
:class:`~raybackfill.types.EncoderKind`. Everything that embeds (embed jobs, the backfill, queries)
goes through :func:`load_encoder`, so a model trained by raybackfill and a user's TorchScript export are used
the same way.

Trust: a ``model.json`` of kind ``entrypoint`` names user code. It is imported only when the user trusts it
(:class:`EntrypointTrust`: named on the command line, or every entrypoint with an explicit flag). The check
runs in the driver before any job starts (:func:`check_trusted`) and again wherever the encoder is loaded.
"""

from __future__ import annotations

import importlib
import io
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from raybackfill.data.preprocessing import (
    ImagePreprocessing,
    Prepared,
    Preprocessing,
    preprocessing_from_dict,
)
from raybackfill.data.storage import join, read_bytes
from raybackfill.models.artifacts import (
    MODEL_JSON,
    ArtifactError,
    ModelSpec,
    decode_weights,
    load_model,
    read_spec,
)
from raybackfill.types import EncoderKind, Interpolation, Modality, parse

__all__ = [
    "Encoder",
    "EntrypointTrust",
    "UntrustedEntrypointError",
    "check_trusted",
    "load_encoder",
    "encoder_preprocessing",
    "torchvision_preprocessing",
]

logger = logging.getLogger(__name__)

PENULTIMATE = "penultimate"


class UntrustedEntrypointError(PermissionError):
    """A model.json names user code that the user did not trust on the command line."""


@dataclass(frozen=True)
class EntrypointTrust:
    """Which entrypoints may be imported: those named (``--trust-entrypoint pkg.mod:factory``), or all of them
    (``--trust-entrypoints``). The default trusts none, so a model.json alone never runs code."""

    entrypoints: tuple[str, ...] = ()
    trust_all: bool = False

    def allows(self, entrypoint: str) -> bool:
        return self.trust_all or entrypoint in self.entrypoints


def check_trusted(spec: ModelSpec, trust: EntrypointTrust, source: str) -> None:
    """Refuse an entrypoint encoder the user did not trust, naming what to pass; a no-op for other kinds."""
    if spec.kind is EncoderKind.ENTRYPOINT and not trust.allows(str(spec.entrypoint)):
        raise UntrustedEntrypointError(
            f"{source}: names the entrypoint {spec.entrypoint!r}, which would import and run that code on every "
            f"node; refused. Pass --trust-entrypoint {spec.entrypoint} (or --trust-entrypoints) if you trust it."
        )


def encoder_preprocessing(spec: ModelSpec, source: str = MODEL_JSON) -> Preprocessing:
    """The preprocessing model.json declares; raybackfill's own image models default to their 0.5/0.25
    normalisation with the size left to the gallery (:meth:`ImagePreprocessing.resolved`)."""
    if not spec.preprocessing:
        if spec.kind in (EncoderKind.RAYBACKFILL,):
            return ImagePreprocessing()
        if spec.kind is EncoderKind.TORCHVISION:
            return torchvision_preprocessing(spec.architecture)
        raise ArtifactError(f"{source}: a {spec.kind.value} encoder must declare its preprocessing")
    try:
        return preprocessing_from_dict(spec.preprocessing, f"{source}: preprocessing")
    except ValueError as err:
        raise ArtifactError(str(err)) from err


def torchvision_preprocessing(architecture: str) -> ImagePreprocessing:
    """The architecture's own evaluation preset (resize, centre crop, mean/std, interpolation), read from its
    default weights' transforms (no download: the preset is built from constants)."""
    from torchvision.models import get_model_weights

    try:
        preset = get_model_weights(architecture).DEFAULT.transforms()
    except (ValueError, KeyError, AttributeError) as err:
        raise ArtifactError(f"torchvision {architecture!r} has no default preset; declare preprocessing") from err
    crop, resize = int(preset.crop_size[0]), int(preset.resize_size[0])
    interpolation = parse(Interpolation, str(preset.interpolation.value))
    return ImagePreprocessing(
        resize=resize, crop=crop, mean=tuple(preset.mean), std=tuple(preset.std), interpolation=interpolation
    )


class Encoder:
    """A loaded model with its declared preprocessing.

    ``prepare`` turns raw column values (image bytes, texts) into model inputs, ``embed`` turns prepared inputs
    into float32 vectors. ``embed_rows`` does both and reports the rows that could not be prepared.
    """

    def __init__(
        self,
        spec: ModelSpec,
        fn: Callable[[Any], Any],
        preprocessing: Preprocessing,
        module: nn.Module | None = None,
        *,
        device: torch.device | str = "cpu",
        chunk: int = 256,
    ) -> None:
        self.spec = spec
        self.preprocessing = preprocessing
        self.module = module
        self.fn = fn
        self.chunk = chunk
        self.device = torch.device(device)
        if module is not None:
            module.to(self.device)
            if spec.kind is not EncoderKind.TORCH_EXPORT:  # an exported program's mode was fixed when exported
                module.eval()

    @property
    def version(self) -> str:
        return self.spec.version

    @property
    def modality(self) -> Modality:
        return self.preprocessing.modality

    @property
    def input_column(self) -> str:
        """The gallery column this encoder reads (``image`` or ``text``)."""
        return self.modality.column

    @property
    def dim(self) -> int | None:
        return self.spec.dims.get("embedding")

    def with_size(self, size: int) -> Encoder:
        """For an image encoder whose crop is left to the gallery: the same encoder at ``size``."""
        if isinstance(self.preprocessing, ImagePreprocessing) and self.preprocessing.crop is None:
            self.preprocessing = self.preprocessing.resolved(size)
        return self

    def prepare(self, values: list | np.ndarray) -> Prepared:
        return self.preprocessing.prepare(values)

    def embed(self, inputs: np.ndarray) -> np.ndarray:
        """Prepared inputs (as :meth:`prepare` makes them) -> (n, d) float32, in chunks of ``chunk`` rows."""
        parts = [self._embed_chunk(inputs[start : start + self.chunk]) for start in range(0, len(inputs), self.chunk)]
        if not parts:
            return np.zeros((0, self.dim or 0), dtype=np.float32)
        return np.concatenate(parts).astype(np.float32, copy=False)

    def embed_rows(self, values: list | np.ndarray) -> tuple[np.ndarray, np.ndarray, list[str]]:
        """Raw column values -> (vectors of the rows that prepared, ok mask, reasons of the others)."""
        prepared = self.prepare(values)
        return self.embed(prepared.values), prepared.ok, prepared.reasons

    def _embed_chunk(self, chunk: np.ndarray) -> np.ndarray:
        if self.module is None and self.spec.kind is EncoderKind.ENTRYPOINT:
            raw = chunk.tolist() if chunk.dtype == object else chunk  # texts as list[str], arrays as numpy
            return _as_matrix(self.fn(raw), len(chunk), self.spec)
        with torch.inference_mode():
            if chunk.dtype == object:  # an nn.Module entrypoint that takes texts
                out = self.fn(chunk.tolist())
            else:
                out = self.fn(torch.from_numpy(np.ascontiguousarray(chunk)).to(self.device))
        return _as_matrix(out, len(chunk), self.spec)


def _as_matrix(out: Any, rows: int, spec: ModelSpec) -> np.ndarray:
    """A model's output -> (rows, d) float32 numpy, or a clear error naming the model."""
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        out = out[0]  # (embedding, logits) style outputs: the first is the embedding
    if isinstance(out, dict):
        raise ArtifactError(f"encoder {spec.version!r} returned a dict; return the embedding array")
    if isinstance(out, torch.Tensor):
        out = out.detach().float().cpu().numpy()
    matrix = np.asarray(out, dtype=np.float32)
    if matrix.ndim > 2:
        matrix = matrix.reshape(len(matrix), -1)
    if matrix.ndim != 2 or len(matrix) != rows:
        raise ArtifactError(
            f"encoder {spec.version!r} returned shape {matrix.shape} for {rows} inputs; expected (n, d)"
        )
    return matrix


def load_encoder(
    uri: str, *, trust: EntrypointTrust | None = None, device: torch.device | str = "cpu", chunk: int = 256
) -> Encoder:
    """Load the encoder at ``uri`` (any kind) on ``device``.

    Args:
        uri: artefact directory, local or ``s3://``.
        trust: the entrypoints the user trusts; an untrusted entrypoint raises before anything is imported.
        device: where the model runs (the actor's GPU when it has one).
        chunk: rows per forward pass.

    Returns:
        The :class:`Encoder`. raybackfill's own models without a recorded size still need
        :meth:`Encoder.with_size` before they prepare images.

    Examples:
        >>> encoder = load_encoder("models/old")  # doctest: +SKIP
        >>> vectors, ok, reasons = encoder.with_size(32).embed_rows(image_bytes)  # doctest: +SKIP
    """
    spec = read_spec(uri)
    source = join(uri, MODEL_JSON)
    check_trusted(spec, trust or EntrypointTrust(), source)  # before any import or file read
    preprocessing = encoder_preprocessing(spec, source)
    kind = spec.kind
    if kind is EncoderKind.RAYBACKFILL:
        module = load_model(uri).module
        return Encoder(spec, module.embed, preprocessing, module, device=device, chunk=chunk)  # type: ignore[arg-type]  # torch: Module.__getattr__
    if kind is EncoderKind.ENTRYPOINT:
        made = _call_entrypoint(str(spec.entrypoint), spec.kwargs, source)
        if isinstance(made, nn.Module):
            return Encoder(spec, getattr(made, "embed", made), preprocessing, made, device=device, chunk=chunk)
        fn = getattr(made, "embed", made)
        if not callable(fn):
            raise ArtifactError(f"{source}: {spec.entrypoint} returned {type(made).__name__}, which is not callable")
        return Encoder(spec, fn, preprocessing, device=device, chunk=chunk)
    data_uri = join(uri, spec.weights)
    data = read_bytes(data_uri)
    if kind is EncoderKind.TORCHSCRIPT:
        try:
            module = torch.jit.load(io.BytesIO(data), map_location="cpu")
        except RuntimeError as err:
            raise ArtifactError(f"{data_uri}: not a readable TorchScript file ({err})") from err
        return Encoder(spec, module, preprocessing, module, device=device, chunk=chunk)
    if kind is EncoderKind.TORCH_EXPORT:
        try:
            module = torch.export.load(io.BytesIO(data)).module()
        except Exception as err:  # torch.export raises many types for a bad archive; all mean the same here
            raise ArtifactError(
                f"{data_uri}: not a readable torch.export program ({type(err).__name__}: {err})"
            ) from err
        return Encoder(spec, module, preprocessing, module, device=device, chunk=chunk)
    module, fn = torchvision_embedder(
        spec.architecture, spec.kwargs, spec.embedding_layer, decode_weights(data, data_uri), data_uri
    )
    return Encoder(spec, fn, preprocessing, module, device=device, chunk=chunk)


def _call_entrypoint(entrypoint: str, kwargs: dict[str, Any], source: str) -> Any:
    module_name, _, attr = entrypoint.partition(":")
    try:
        target: Any = importlib.import_module(module_name)
        for part in attr.split("."):
            target = getattr(target, part)
    except (ImportError, AttributeError) as err:
        raise ArtifactError(
            f"{source}: cannot import entrypoint {entrypoint!r} ({err}); ship its code with the job "
            "(ray job submit --working-dir, or runtime_env py_modules)"
        ) from err
    logger.info("calling entrypoint %s", entrypoint)
    return target(**kwargs)


def torchvision_embedder(
    architecture: str, kwargs: dict[str, Any], layer: str | None, state: dict[str, torch.Tensor], source: str
) -> tuple[nn.Module, Callable]:
    """A torchvision architecture with ``state`` loaded, and a function giving the named layer's output
    (flattened per row); ``None``/``"penultimate"`` means the input of the last linear layer (the features the
    classifier reads)."""
    from torchvision.models import get_model
    from torchvision.models.feature_extraction import create_feature_extractor

    try:
        net = get_model(architecture, weights=None, **kwargs)
    except (TypeError, ValueError) as err:
        raise ArtifactError(f"{source}: torchvision {architecture!r} with {kwargs}: {err}") from err
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise ArtifactError(f"{source}: weights do not match torchvision {architecture!r} ({err})") from err
    net.eval()
    if layer in (None, PENULTIMATE):
        return net, _penultimate(net, architecture, source)
    try:
        extractor = create_feature_extractor(net, return_nodes={layer: "embedding"})
    except (ValueError, RuntimeError) as err:
        raise ArtifactError(
            f"{source}: torchvision {architecture!r} has no layer {layer!r} ({err}); "
            "torchvision.models.feature_extraction.get_graph_node_names lists them"
        ) from err
    return extractor, lambda x: extractor(x)["embedding"].flatten(1)


def _penultimate(net: nn.Module, architecture: str, source: str) -> Callable:
    linears = [m for m in net.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ArtifactError(f"{source}: torchvision {architecture!r} has no linear layer; name an embedding_layer")
    last = linears[-1]

    def embed(x: torch.Tensor) -> torch.Tensor:
        captured: list[torch.Tensor] = []
        handle = last.register_forward_hook(lambda _m, inputs, _out: captured.append(inputs[0]))
        try:
            net(x)
        finally:
            handle.remove()
        return captured[-1].flatten(1)

    return embed
