"""What an encoder does to a gallery row before the network sees it: images of any size and mode -> a fixed
tensor, texts -> token ids (or the strings themselves).

Declared in model.json (``preprocessing``) so every job, actor and query prepares inputs the same way. No
torch here: Ray Data decode tasks import this module, and importing torch costs a fresh worker seconds.

Images follow torchvision's classification presets: EXIF orientation applied, any mode (grey, palette, RGBA,
CMYK, 16-bit) converted to RGB, the shorter side resized to ``resize``, the centre ``crop`` x ``crop`` cut,
scaled to [0, 1] and normalised with ``mean``/``std``. Only bytes that do not decode are refused, each with its
reason.
"""

from __future__ import annotations

import hashlib
import io
import re
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from raybackfill.types import Interpolation, Modality, Tokenizer, parse

__all__ = [
    "ImagePreprocessing",
    "TextPreprocessing",
    "Preprocessing",
    "Prepared",
    "decode_image",
    "probe_image",
    "preprocessing_from_dict",
]


# The normalisation of every model raybackfill trains (and its augmentations undo and redo it).
MEAN = (0.5, 0.5, 0.5)
STD = (0.25, 0.25, 0.25)


_RESAMPLING = {
    Interpolation.BILINEAR: Image.Resampling.BILINEAR,
    Interpolation.BICUBIC: Image.Resampling.BICUBIC,
    Interpolation.NEAREST: Image.Resampling.NEAREST,
}


@dataclass(frozen=True)
class Prepared:
    """A prepared batch: ``values`` for the rows that prepared (``ok``), one reason per row that did not."""

    values: np.ndarray  # images: (n_ok, 3, H, W) float32; token ids: (n_ok, L) int64; texts: (n_ok,) object
    ok: np.ndarray  # (n,) bool
    reasons: list[str]  # in input order, one per False in ok


@dataclass(frozen=True)
class ImagePreprocessing:
    """Resize the shorter side to ``resize``, cut the centre ``crop`` square, normalise with ``mean``/``std``.

    ``crop=None`` means "the size of the gallery's first image" (models raybackfill trained before the size was
    recorded); :meth:`resolved` fills it in. ``resize=None`` resizes the shorter side straight to ``crop``.
    """

    resize: int | None = None
    crop: int | None = None
    mean: tuple[float, float, float] = MEAN
    std: tuple[float, float, float] = STD
    interpolation: Interpolation = Interpolation.BICUBIC
    modality: Modality = field(default=Modality.IMAGE, init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "mean", tuple(float(v) for v in self.mean))
        object.__setattr__(self, "std", tuple(float(v) for v in self.std))
        object.__setattr__(self, "interpolation", parse(Interpolation, self.interpolation))
        for name in ("resize", "crop"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"image preprocessing: {name} must be a positive integer, got {value!r}")
        if self.resize is not None and self.crop is not None and self.resize < self.crop:
            raise ValueError(f"image preprocessing: resize {self.resize} is smaller than crop {self.crop}")
        if len(self.mean) != 3 or len(self.std) != 3:
            raise ValueError("image preprocessing: mean and std need one value per RGB channel")
        if min(self.std) <= 0:
            raise ValueError(f"image preprocessing: std must be positive, got {self.std}")

    def resolved(self, size: int) -> ImagePreprocessing:
        """This preprocessing with an unset crop filled in with ``size``."""
        return (
            self
            if self.crop is not None
            else ImagePreprocessing(self.resize, size, self.mean, self.std, self.interpolation)
        )

    @property
    def output_size(self) -> int:
        if self.crop is None:
            raise ValueError("image preprocessing has no crop size yet: call resolved(size) first")
        return self.crop

    def to_rgb(self, image: Image.Image) -> np.ndarray:
        """A decoded RGB image -> (crop, crop, 3) uint8, with torchvision's ``Resize(int)`` and ``CenterCrop``
        arithmetic (the longer side truncated, the crop offset rounded), so a model sees what it was trained on."""
        size = self.output_size
        shorter = self.resize or size
        width, height = image.size
        if min(width, height) != shorter:
            longer = int(shorter * max(width, height) / min(width, height))
            new = (shorter, longer) if width <= height else (longer, shorter)
            image = image.resize(new, _RESAMPLING[self.interpolation])
            width, height = image.size
        if (width, height) != (size, size):
            left, top = int(round((width - size) / 2.0)), int(round((height - size) / 2.0))
            image = image.crop((left, top, left + size, top + size))
        return np.asarray(image, dtype=np.uint8)

    def normalise(self, rgb: np.ndarray) -> np.ndarray:
        """(N, H, W, 3) uint8 -> (N, 3, H, W) float32 normalised with mean/std."""
        x: np.ndarray = rgb.astype(np.float32) / 255.0
        x = (x - np.asarray(self.mean, np.float32)) / np.asarray(self.std, np.float32)
        return np.ascontiguousarray(x.transpose(0, 3, 1, 2))

    def prepare(self, images: list[bytes] | np.ndarray) -> Prepared:
        """Encoded image bytes -> normalised CHW float32; undecodable rows are reported, not raised."""
        size = self.output_size
        out = np.empty((len(images), size, size, 3), dtype=np.uint8)
        ok = np.zeros(len(images), dtype=bool)
        reasons: list[str] = []
        for i, data in enumerate(images):
            try:
                out[i] = self.to_rgb(decode_image(data))
            except ValueError as err:
                reasons.append(str(err))
                continue
            ok[i] = True
        return Prepared(self.normalise(out[ok]), ok, reasons)

    def to_dict(self) -> dict[str, Any]:
        return {
            **asdict(self),
            "mean": list(self.mean),
            "std": list(self.std),
            "interpolation": self.interpolation.value,
            "modality": self.modality.value,
        }


_WORD = re.compile(r"\w+", re.UNICODE)


@dataclass(frozen=True)
class TextPreprocessing:
    """Texts -> the strings (``tokenizer=none``) or padded int64 token ids; empty or missing texts are refused."""

    tokenizer: Tokenizer = Tokenizer.NONE
    max_length: int = 64
    vocab_size: int = 32_768  # hashed_words only
    lowercase: bool = True
    modality: Modality = field(default=Modality.TEXT, init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "tokenizer", parse(Tokenizer, self.tokenizer))
        if not isinstance(self.max_length, int) or self.max_length < 1:
            raise ValueError(f"text preprocessing: max_length must be a positive integer, got {self.max_length!r}")
        if not isinstance(self.vocab_size, int) or self.vocab_size < 2:
            raise ValueError(f"text preprocessing: vocab_size must be at least 2, got {self.vocab_size!r}")

    def tokens(self, text: str) -> list[int]:
        if self.tokenizer is Tokenizer.BYTES:
            return [b + 1 for b in text.encode("utf-8")[: self.max_length]]
        words = _WORD.findall(text.lower() if self.lowercase else text)[: self.max_length]
        return [
            1 + int.from_bytes(hashlib.blake2b(w.encode(), digest_size=8).digest(), "little") % (self.vocab_size - 1)
            for w in words
        ]

    def prepare(self, texts: list[str | None] | np.ndarray) -> Prepared:
        ok = np.zeros(len(texts), dtype=bool)
        reasons: list[str] = []
        kept: list[str] = []
        for i, text in enumerate(texts):
            if isinstance(text, bytes):
                try:
                    text = text.decode("utf-8")
                except UnicodeDecodeError as err:
                    reasons.append(f"text is not UTF-8 ({err})")
                    continue
            if not isinstance(text, str):
                reasons.append(f"text is {type(text).__name__}, not a string" if text is not None else "missing text")
                continue
            if not text.strip():
                reasons.append("empty text")
                continue
            kept.append(text)
            ok[i] = True
        if self.tokenizer is Tokenizer.NONE:
            values = np.empty(len(kept), dtype=object)
            values[:] = kept
            return Prepared(values, ok, reasons)
        ids = np.zeros((len(kept), self.max_length), dtype=np.int64)
        for row, text in enumerate(kept):
            tokens = self.tokens(text)
            ids[row, : len(tokens)] = tokens
        return Prepared(ids, ok, reasons)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "tokenizer": self.tokenizer.value, "modality": self.modality.value}


Preprocessing = ImagePreprocessing | TextPreprocessing


def preprocessing_from_dict(raw: dict[str, Any], source: str = "preprocessing") -> Preprocessing:
    """The inverse of ``to_dict``; unknown keys and bad values raise ValueError naming ``source``."""
    if not isinstance(raw, dict):
        raise ValueError(f"{source}: expected an object, found {type(raw).__name__}")
    fields = dict(raw)
    try:
        modality = parse(Modality, fields.pop("modality", Modality.IMAGE))
    except ValueError as err:
        raise ValueError(f"{source}: {err}") from err
    cls = ImagePreprocessing if modality is Modality.IMAGE else TextPreprocessing
    try:
        return cls(**fields)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{source}: {err}") from err


def probe_image(seed: int, size: tuple[int, int] = (48, 40)) -> bytes:
    """A small non-square random RGB PNG: what registering an image encoder runs it on once."""
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels, mode="RGB").save(buf, format="PNG")
    return buf.getvalue()


def decode_image(data: bytes | None) -> Image.Image:
    """Encoded bytes -> an upright RGB PIL image; ValueError with the reason for anything undecodable."""
    if data is None or len(data) == 0:
        raise ValueError("empty image bytes")
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            upright = ImageOps.exif_transpose(img)
            return _to_rgb(upright)
    except UnidentifiedImageError as err:  # its message names an in-memory buffer, which says nothing
        raise ValueError("corrupt image bytes (not an image format PIL can read)") from err
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise ValueError(f"corrupt image bytes ({type(err).__name__}: {err})") from err


def _to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB. 16/32-bit greys are scaled to 8 bits (``convert`` would clip them to white)."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        grey = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I;16") else max(float(grey.max()), 1.0)
        img = Image.fromarray(np.clip(grey / top * 255.0 + 0.5, 0, 255).astype(np.uint8), mode="L")
    return img.convert("RGB")
