"""Raw queries (image bytes, texts) -> the query vectors a strategy needs, with the encoders of each space.

One implementation for every client that embeds its own queries: `raybackfill query --image/--text` and the
HTTP service. A strategy needs an old-space query (``old``, ``rank_merge``), a new-space query
(``compatible``, ``rank_merge``) or both (:data:`~raybackfill.index.serving.QUERY_SPACES`). The new-space query
comes from the new encoder; the old-space one from the old encoder, or, when the old model is retired, from the
reverse transformation psi applied to the new query (method ``rank_merge_psi``).

Each encoder prepares its input as it declares (resize, crop, normalisation; tokenisation). A model raybackfill
trained before image sizes were recorded has no crop: it gets ``image_size`` when given, else each image's
own shorter side (what `raybackfill query --image` always did). Rows that cannot be prepared (corrupt image,
empty text) are reported by position with their reason, so one bad query never fails the others of a batch.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from raybackfill.data.preprocessing import ImagePreprocessing, Prepared, decode_image
from raybackfill.encoders import Encoder, EntrypointTrust, load_encoder
from raybackfill.index.serving import QUERY_SPACES
from raybackfill.models.artifacts import ArtifactError, load_model
from raybackfill.models.registry import TRANSFORMATION_INPUTS
from raybackfill.models.transformations import apply_transformation
from raybackfill.types import Space, Strategy, parse

logger = logging.getLogger(__name__)


class MissingEncoderError(ValueError):
    """A strategy needs a query space that no loaded encoder (or psi) produces."""

    def __init__(self, strategy: Strategy, spaces: Sequence[Space]) -> None:
        self.strategy, self.spaces = strategy, tuple(spaces)
        super().__init__(
            f"strategy {strategy.value!r} needs an encoder for the {' and '.join(s.value for s in spaces)} space"
        )


class EncoderMismatchError(ValueError):
    """An encoder's version (or psi's dimensions) is not the one the index's space holds."""


@dataclass
class EmbeddedQueries:
    """One row per raw query: old- and new-space vectors (None when not asked), and the rows that failed."""

    old: np.ndarray | None
    new: np.ndarray | None
    failed: dict[int, str]  # row -> why it could not be prepared

    def rows(self, rows: Sequence[int]) -> tuple[np.ndarray | None, np.ndarray | None]:
        """(queries_old, queries_new) of some rows, for ``router.search``."""
        index = np.asarray(rows, dtype=np.int64)
        return (None if self.old is None else self.old[index]), (None if self.new is None else self.new[index])


class QueryEncoders:
    """The encoders that embed raw queries for each space: ``old``, ``new`` and psi (new -> old).

    Build it with :meth:`load` (encoders by role, as the HTTP service is configured) or :meth:`matching` (a list
    of encoders whose versions pick their space, as `raybackfill query --model` works).
    """

    def __init__(
        self,
        old: Encoder | None = None,
        new: Encoder | None = None,
        psi: torch.nn.Module | None = None,
        *,
        psi_version: str | None = None,
        image_size: int | None = None,
        device: torch.device | str = "cpu",
    ) -> None:
        if image_size is not None and image_size <= 0:
            raise ValueError(f"image_size must be positive, got {image_size}")
        if psi is not None and new is None:
            raise ValueError("psi maps new-space queries to the old space: it needs the new encoder")
        self.old, self.new, self.psi = old, new, psi
        self.psi_version = psi_version
        self.image_size = image_size
        self.device = torch.device(device)

    # ------------------------------------------------------------------ construction
    @classmethod
    def load(
        cls,
        *,
        old: str | None = None,
        new: str | None = None,
        psi: str | None = None,
        trust: EntrypointTrust | None = None,
        device: torch.device | str = "cpu",
        image_size: int | None = None,
    ) -> QueryEncoders:
        """Load the encoders by role.

        Args:
            old: the old model's encoder artefact (queries in the old space).
            new: the new model's encoder artefact (queries in the new space).
            psi: a reverse transformation artefact (``raybackfill train reverse``): old-space queries from the new
                encoder, so the old model need not run.
            trust: the entrypoints the operator trusts (user encoders).
            device: where the models run (a GPU when the process has one).
            image_size: the crop of image models that recorded none (default: each image's own shorter side).

        Returns:
            The loaded encoders.

        Example:
            >>> encoders = QueryEncoders.load(old="models/old", new="models/new")  # doctest: +SKIP
            >>> q_old, q_new = encoders.embed([png_bytes], Strategy.RANK_MERGE).rows([0])  # doctest: +SKIP
        """
        if not (old or new):
            raise ValueError("give the old or the new encoder (or both)")
        loaded = {
            role: load_encoder(uri, trust=trust, device=device) if uri else None
            for role, uri in ((Space.OLD, old), (Space.NEW, new))
        }
        module, version = None, None
        if psi:
            model = load_model(psi)
            if TRANSFORMATION_INPUTS.get(model.spec.architecture) is not Space.NEW:
                raise ArtifactError(
                    f"{psi}: architecture {model.spec.architecture!r} does not map the new space to the old one "
                    "(psi: a reverse transformation or a new-to-old adapter)"
                )
            module, version = model.module.to(device), model.spec.version
        return cls(
            loaded[Space.OLD], loaded[Space.NEW], module, psi_version=version, image_size=image_size, device=device
        )

    @classmethod
    def matching(
        cls, models: Sequence[str], spaces: dict, *, trust: EntrypointTrust | None = None, device: str = "cpu"
    ) -> QueryEncoders:
        """Load each encoder and put it in the space whose model version it carries.

        Args:
            models: encoder artefacts (one per space the queries need).
            spaces: the router's ``health()`` (its ``old_space`` / ``new_space`` provenance).
            trust: the entrypoints the operator trusts.
            device: where the models run.

        Returns:
            The encoders by space.

        Example:
            >>> QueryEncoders.matching(["models/v1"], get(router.health.remote()))  # doctest: +SKIP
        """
        slots: dict[Space, Encoder | None] = dict.fromkeys((Space.OLD, Space.NEW))
        for uri in models:
            encoder = load_encoder(uri, trust=trust, device=device)
            slot = next((s for s in slots if (spaces.get(f"{s}_space") or {}).get("version") == encoder.version), None)
            if slot is None:
                raise EncoderMismatchError(
                    f"{uri}: encoder version {encoder.version!r} is neither the old space's "
                    f"({spaces.get('old_space')}) nor the new space's ({spaces.get('new_space')})"
                )
            slots[slot] = encoder
        if not spaces.get("new_space") and slots[Space.NEW] is None:
            # One space only (before an upgrade, or just promoted): a compatible query against it is the same
            # as an old query, so the serving generation's encoder makes both.
            slots[Space.NEW] = slots[Space.OLD]
        return cls(slots[Space.OLD], slots[Space.NEW], device=device)

    # ------------------------------------------------------------------ what it can answer
    @property
    def query_spaces(self) -> tuple[Space, ...]:
        """The spaces this set of encoders makes queries for."""
        made = []
        if self.old is not None or self.psi is not None:
            made.append(Space.OLD)
        if self.new is not None:
            made.append(Space.NEW)
        return tuple(made)

    def missing(self, strategy: Strategy | str) -> tuple[Space, ...]:
        """The spaces ``strategy`` needs that these encoders cannot make (empty: it can be answered)."""
        return tuple(s for s in QUERY_SPACES[parse(Strategy, strategy)] if s not in self.query_spaces)

    def check_index(self, health: dict, strategy: Strategy | str | None = None) -> None:
        """Refuse encoders the index's spaces were not embedded with (versions, dims); spaces not created yet pass.
        With ``strategy``, only the encoders it uses are checked (after a promote the old encoder of the
        previous upgrade is no longer the serving generation's, but a compatible query does not use it).

        Raises:
            EncoderMismatchError: naming the space, the index's version and the encoder's.
        """
        old_space, new_space = health.get("old_space"), health.get("new_space")
        used = QUERY_SPACES[parse(Strategy, strategy)] if strategy is not None else (Space.OLD, Space.NEW)
        for space, held, encoder in ((Space.OLD, old_space, self.old), (Space.NEW, new_space, self.new)):
            if space in used and held and encoder is not None and held["version"] != encoder.version:
                raise EncoderMismatchError(
                    f"the index's {space} space holds model {held['version']!r}; this {space} encoder is "
                    f"{encoder.version!r}"
                )
        if self.psi is not None and old_space:
            out_dim = getattr(self.psi, "old_dim", None)
            if out_dim is not None and out_dim != old_space["dim"]:
                raise EncoderMismatchError(
                    f"psi {self.psi_version!r} maps to dim {out_dim}; the index's old space has dim {old_space['dim']}"
                )

    # ------------------------------------------------------------------ embedding
    def embed(self, contents: Sequence[bytes | str], strategy: Strategy | str) -> EmbeddedQueries:
        """Embed raw queries for ``strategy``: rows aligned with ``contents``; rows that failed are zero.

        Raises:
            MissingEncoderError: the strategy needs a space no encoder makes.
        """
        strategy = parse(Strategy, strategy)
        missing = self.missing(strategy)
        if missing:
            raise MissingEncoderError(strategy, missing)
        needs = QUERY_SPACES[strategy]
        failed: dict[int, str] = {}
        new = self._embed_with(self.new, contents, failed) if Space.NEW in needs or self._old_from_psi(needs) else None
        old = None
        if Space.OLD in needs:
            if self.old is not None:
                old = self._embed_with(self.old, contents, failed)
            else:
                assert new is not None and self.psi is not None  # missing() checked it
                old, _ = apply_transformation(self.psi, new, device=self.device)
                old = old.astype(np.float32, copy=False)
        return EmbeddedQueries(old, new if Space.NEW in needs else None, failed)

    def _old_from_psi(self, needs: tuple[Space, ...]) -> bool:
        return Space.OLD in needs and self.old is None and self.psi is not None

    def _embed_with(
        self, encoder: Encoder | None, contents: Sequence[bytes | str], failed: dict[int, str]
    ) -> np.ndarray:
        """(n, d) vectors of ``encoder`` for every row; rows that do not prepare go to ``failed`` (zeros)."""
        assert encoder is not None
        n = len(contents)
        wants_bytes = isinstance(encoder.preprocessing, ImagePreprocessing)
        for row, content in enumerate(contents):
            if isinstance(content, bytes) != wants_bytes:
                failed[row] = f"this {encoder.modality} encoder cannot embed a {'text' if wants_bytes else 'image'}"
        groups = self._size_groups(encoder, contents, failed)
        out: np.ndarray | None = None
        for preprocessing, rows in groups:
            rows = [r for r in rows if r not in failed]
            if not rows:
                continue
            prepared = preprocessing.prepare([contents[r] for r in rows])
            for r, ok, reason in zip(rows, prepared.ok, _reasons(prepared), strict=True):
                if not ok:
                    failed[r] = reason
            good = [r for r, ok in zip(rows, prepared.ok, strict=True) if ok]
            if not good:
                continue
            vectors = encoder.embed(prepared.values)
            if not np.isfinite(vectors).all():
                bad = ~np.isfinite(vectors).all(axis=1)
                for r in np.asarray(good)[bad]:
                    failed[int(r)] = "the encoder returned a non-finite embedding"
            if out is None:
                out = np.zeros((n, vectors.shape[1]), dtype=np.float32)
            out[good] = vectors
        if out is None:
            out = np.zeros((n, encoder.dim or 1), dtype=np.float32)
        return out

    def _size_groups(self, encoder: Encoder, contents: Sequence[bytes | str], failed: dict[int, str]) -> list:
        """(preprocessing, rows) groups: one group, or one per image size for a model that recorded no crop."""
        preprocessing = encoder.preprocessing
        if not (isinstance(preprocessing, ImagePreprocessing) and preprocessing.crop is None):
            return [(preprocessing, list(range(len(contents))))]
        if self.image_size is not None:
            return [(preprocessing.resolved(self.image_size), list(range(len(contents))))]
        by_size: dict[int, list[int]] = {}
        for row, content in enumerate(contents):
            if row in failed or not isinstance(content, bytes):
                continue
            try:
                size = min(decode_image(content).size)
            except ValueError as err:
                failed[row] = str(err)
                continue
            by_size.setdefault(size, []).append(row)
        return [(preprocessing.resolved(size), rows) for size, rows in by_size.items()]


def _reasons(prepared: Prepared) -> list[str]:
    """One reason per row ("" for rows that prepared): ``Prepared.reasons`` holds one per row that did not."""
    bad = iter(prepared.reasons)
    return ["" if ok else str(next(bad, "cannot prepare the query")) for ok in prepared.ok]
