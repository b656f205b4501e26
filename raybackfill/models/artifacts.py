"""Model artefacts: a directory (local or s3://) holding ``model.json`` and the model's file.

model.json records the model's *kind* (:class:`~raybackfill.types.EncoderKind`): raybackfill's own models name
a registered architecture and its keyword arguments, so any job rebuilds the module without importing or executing
anything from the artefact; weights are safetensors (no pickle). A legacy ``model.pt`` is read only through
``torch.load(weights_only=True)``, which refuses arbitrary objects. Encoders brought from elsewhere
(TorchScript, torch.export, torchvision with the user's weights, a user entrypoint) are described here and
loaded by :mod:`raybackfill.encoders`; an entrypoint is only ever imported when the user trusts it.
Artefacts are versioned and never overwritten: model.json is written last and marks a committed artefact.
"""

from __future__ import annotations

import dataclasses
import io
import json
import pickle
import re
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import nn

from raybackfill.data.storage import exists, join, read_bytes, write_bytes
from raybackfill.models.registry import BUILDERS, build_model
from raybackfill.types import MODEL_METRICS, EncoderKind, Method, Metric, Modality, parse

MODEL_JSON = "model.json"
SAFETENSORS_FILE = "model.safetensors"
STATE_DICT_FILE = "model.pt"
TORCHSCRIPT_FILE = "model.torchscript"
EXPORT_FILE = "model.pt2"
WEIGHTS_FILES = (SAFETENSORS_FILE, STATE_DICT_FILE)


# The file names each kind may keep its model in (none for an entrypoint); the first is the default.
KIND_FILES: dict[EncoderKind, tuple[str, ...]] = {
    EncoderKind.RAYBACKFILL: WEIGHTS_FILES,
    EncoderKind.TORCHVISION: WEIGHTS_FILES,
    EncoderKind.TORCHSCRIPT: (TORCHSCRIPT_FILE,),
    EncoderKind.TORCH_EXPORT: (EXPORT_FILE,),
    EncoderKind.ENTRYPOINT: ("",),
}

ENTRYPOINT_PATTERN = re.compile(r"^[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*:[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*$")
FORMAT_VERSION = 1


class ArtifactError(ValueError):
    """An artefact is missing, malformed, or does not match its architecture; the message names the file."""


class ArtifactExistsError(FileExistsError):
    """Refusing to overwrite a committed artefact."""


@dataclass(frozen=True)
class ModelSpec:
    """What model.json says about a model.

    ``dims`` (e.g. {"embedding": 128} or {"old": 64, "side": 32, "new": 128}) and ``created`` (UTC,
    ISO 8601) are filled in by :func:`save_model` from the module and the clock.
    """

    architecture: str
    version: str
    kwargs: dict[str, Any] = field(default_factory=dict)
    metric: Metric = Metric.COSINE
    method: Method = Method.INDEPENDENT
    training_data: str | None = None
    parent: str | None = None
    dims: dict[str, int] = field(default_factory=dict)
    created: str | None = None
    weights: str = SAFETENSORS_FILE
    # How the run went (see raybackfill.train.api.training_summary): epochs, the best epoch and its training
    # and validation figures. Empty for models saved outside raybackfill's training.
    training: dict[str, Any] = field(default_factory=dict)
    kind: EncoderKind = EncoderKind.RAYBACKFILL
    # What the encoder does to a row first (raybackfill.data.preprocessing, as a dict). Empty for an image
    # model raybackfill trained before sizes were recorded: the gallery's first image gives the size.
    preprocessing: dict[str, Any] = field(default_factory=dict)
    embedding_layer: str | None = None  # torchvision: the graph node giving the embedding (None: penultimate)
    entrypoint: str | None = None  # "package.module:factory" (kind entrypoint only)
    # A map fitted between two encoders' spaces on a paired sample (raybackfill.adapters): its kind, direction,
    # the encoders' versions, what the fit chose and its quality-gate score on held-out pairs. Empty otherwise.
    adapter: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        problems = []
        try:
            object.__setattr__(self, "kind", parse(EncoderKind, self.kind, what="kind"))
        except ValueError as err:
            raise ArtifactError(str(err)) from None
        if self.weights == SAFETENSORS_FILE and self.weights not in KIND_FILES[self.kind]:
            # the default file name, for a kind that keeps its model elsewhere: the kind's own file
            object.__setattr__(self, "weights", KIND_FILES[self.kind][0])
        if self.kind is EncoderKind.RAYBACKFILL and self.architecture not in BUILDERS:
            problems.append(f"unknown architecture {self.architecture!r} (valid: {', '.join(sorted(BUILDERS))})")
        if self.kind is EncoderKind.TORCHVISION and not _is_torchvision_model(self.architecture):
            problems.append(
                f"unknown torchvision architecture {self.architecture!r} "
                "(torchvision.models.list_models() names the valid ones)"
            )
        if not isinstance(self.architecture, str):
            problems.append("architecture must be a string")
        if (self.entrypoint is not None) != (self.kind is EncoderKind.ENTRYPOINT):
            problems.append("entrypoint is required for kind 'entrypoint' and allowed for no other kind")
        elif self.entrypoint is not None and not ENTRYPOINT_PATTERN.match(str(self.entrypoint)):
            problems.append(f"entrypoint must look like 'package.module:factory', got {self.entrypoint!r}")
        if self.embedding_layer is not None and self.kind is not EncoderKind.TORCHVISION:
            problems.append("embedding_layer applies to kind 'torchvision' only")
        if not isinstance(self.preprocessing, dict):
            problems.append("preprocessing must be an object")
        if not isinstance(self.version, str) or not self.version:
            problems.append("version must be a non-empty string")
        if not isinstance(self.kwargs, dict):
            problems.append("kwargs must be an object")
        for name, kind, among in (("metric", Metric, MODEL_METRICS), ("method", Method, None)):
            try:
                object.__setattr__(self, name, parse(kind, getattr(self, name), among=among))
            except ValueError as err:
                problems.append(str(err))
        if self.weights not in KIND_FILES[self.kind]:
            problems.append(
                f"weights must be one of {KIND_FILES[self.kind]} for kind {self.kind.value!r}, got {self.weights!r}"
            )
        if not isinstance(self.dims, dict) or not all(isinstance(v, int) for v in self.dims.values()):
            problems.append("dims must map names to integers")
        if not isinstance(self.training, dict):
            problems.append("training must be an object")
        if not isinstance(self.adapter, dict):
            problems.append("adapter must be an object")
        if problems:
            raise ArtifactError("; ".join(problems))

    def to_json(self) -> str:
        fields = {**dataclasses.asdict(self), "kind": self.kind.value}
        return json.dumps({"format_version": FORMAT_VERSION, **fields}, indent=2, sort_keys=True)

    @property
    def modality(self) -> Modality:
        """``image`` or ``text``: the gallery column the model reads."""
        return parse(Modality, self.preprocessing.get("modality", Modality.IMAGE))

    @classmethod
    def from_json(cls, text: str | bytes, source: str) -> ModelSpec:
        try:
            raw = json.loads(text)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ArtifactError(f"{source}: not valid JSON ({err})") from err
        if not isinstance(raw, dict):
            raise ArtifactError(f"{source}: expected a JSON object, found {type(raw).__name__}")
        if raw.pop("format_version", None) != FORMAT_VERSION:
            raise ArtifactError(f"{source}: missing or unsupported format_version (this code reads {FORMAT_VERSION})")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise ArtifactError(f"{source}: unknown keys {unknown}")
        try:
            return cls(**raw)
        except TypeError as err:
            raise ArtifactError(f"{source}: missing keys ({err})") from err
        except ArtifactError as err:
            raise ArtifactError(f"{source}: {err}") from err


@dataclass(frozen=True)
class LoadedModel:
    module: nn.Module  # in eval mode, on the CPU
    spec: ModelSpec

    @property
    def classifier(self) -> nn.Linear:
        """The backbone's linear classifier head (BCT, the FastFill loss and the classifier orders read it)."""
        head = getattr(self.module, "classifier", None)
        if not isinstance(head, nn.Linear):
            raise ArtifactError(f"model {self.spec.version!r} ({self.spec.architecture}) has no linear classifier")
        return head


def _is_torchvision_model(name: str) -> bool:
    from torchvision.models import list_models  # imported here: only torchvision specs need it

    return isinstance(name, str) and name in list_models()


def save_model(module: nn.Module, uri: str, spec: ModelSpec) -> ModelSpec:
    """Write ``module`` as a new artefact at ``uri`` and return the spec as written.

    Refuses to overwrite a committed artefact, and refuses a module that the spec's architecture and
    kwargs would not rebuild (checked now, not discovered later by the job that loads it).
    """
    if spec.kind is not EncoderKind.RAYBACKFILL:
        raise ArtifactError(
            f"{uri}: save_model writes raybackfill's own models; register a {spec.kind.value} "
            "encoder with raybackfill.encoders.register"
        )
    json_uri = join(uri, MODEL_JSON)
    if exists(json_uri):  # before writing weights, so a committed artefact's weights are never replaced
        raise _already_committed(json_uri)
    state = {name: t.detach().cpu().contiguous() for name, t in module.state_dict().items()}
    expected = {name: tuple(t.shape) for name, t in build_model(spec.architecture, **spec.kwargs).state_dict().items()}
    found = {name: tuple(t.shape) for name, t in state.items()}
    if expected != found:
        diff = sorted(set(expected.items()) ^ set(found.items()))[:5]
        raise ArtifactError(
            f"{uri}: module does not match architecture {spec.architecture!r} with kwargs {spec.kwargs} "
            f"(first differing parameters: {diff})"
        )
    final = dataclasses.replace(
        spec,
        dims=dict(getattr(module, "dims", {})),
        created=datetime.now(UTC).isoformat(timespec="seconds"),
        weights=SAFETENSORS_FILE,
    )
    return commit_artifact(uri, final, {SAFETENSORS_FILE: save_safetensors(state)})


def commit_artifact(uri: str, spec: ModelSpec, files: dict[str, bytes]) -> ModelSpec:
    """Write ``files`` under ``uri``, then model.json, whose presence commits the artefact; never overwrites."""
    json_uri = join(uri, MODEL_JSON)
    if exists(json_uri):  # before writing any file, so a committed artefact's files are never replaced
        raise _already_committed(json_uri)
    for name, data in files.items():
        write_bytes(join(uri, name), data)
    try:
        # Last. "error" also refuses a concurrent save that committed first.
        write_bytes(json_uri, spec.to_json().encode(), if_exists="error")
    except FileExistsError as err:
        raise _already_committed(json_uri) from err
    return spec


def _already_committed(json_uri: str) -> ArtifactExistsError:
    return ArtifactExistsError(f"{json_uri}: artefact already exists; save under a new version instead")


def read_spec(uri: str) -> ModelSpec:
    """Read and validate model.json only (cheap: no weights)."""
    json_uri = join(uri, MODEL_JSON)
    return ModelSpec.from_json(read_bytes(json_uri), json_uri)


def load_model(uri: str) -> LoadedModel:
    """Rebuild the module named by model.json and load its weights; never executes stored code."""
    spec = read_spec(uri)
    json_uri = join(uri, MODEL_JSON)
    if spec.kind is not EncoderKind.RAYBACKFILL:
        raise ArtifactError(
            f"{json_uri}: a {spec.kind.value} encoder, not a model raybackfill trained: load it with "
            "raybackfill.encoders.load_encoder (this step needs raybackfill's own model)"
        )
    try:
        module = build_model(spec.architecture, **spec.kwargs)
    except ValueError as err:
        raise ArtifactError(f"{json_uri}: {err}") from err
    weights_uri = join(uri, spec.weights)
    state = decode_weights(read_bytes(weights_uri), weights_uri)
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise ArtifactError(f"{weights_uri}: weights do not match architecture {spec.architecture!r} ({err})") from err
    module.eval()
    return LoadedModel(module, spec)


def decode_weights(data: bytes, source: str) -> dict[str, torch.Tensor]:
    if source.endswith(".safetensors"):
        try:
            return load_safetensors(data)
        except SafetensorError as err:
            raise ArtifactError(f"{source}: not a readable safetensors file, truncated or corrupt ({err})") from err
    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as err:
        raise ArtifactError(f"{source}: refused: not a plain tensor checkpoint or truncated ({err})") from err
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ArtifactError(f"{source}: expected a mapping of parameter names to tensors")
    return state
