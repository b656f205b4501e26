"""A built-in, procedurally generated image dataset, so every demo and test runs without downloads.

Each class is a conjunction of four shared attributes (shape family, texture, hue, colour scheme), so
classes are confusable: telling two apart often needs one fine attribute (a hue 30 degrees away, a
texture twice as fine). Each image then gets strong nuisance variation (position, scale, rotation,
aspect, colour shifts, background gradient, clutter shapes, an occluding line, noise). A small CNN
trained on all classes retrieves well above chance, while one trained on half the classes has never
seen many attribute combinations and lags behind: the gap a model upgrade is meant to close.

Every image is drawn from a numpy Generator seeded by ``(seed, id)``, so any subset or chunk of ids can
be rendered independently (in parallel, or resumed) and still give identical bytes. Drawing is
vectorised over a chunk of images with coordinate grids and masks.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
from tqdm import tqdm

from raybackfill.data.images import encode_png
from raybackfill.data.info import with_class_names
from raybackfill.data.schema import image_table
from raybackfill.data.storage import WriteResult, write_table

SHAPES = ("disk", "square", "triangle", "ring", "cross", "star", "halfdisk", "bar", "hexagon")
# (pattern, cycles per object radius): coarse and fine versions of each pattern share features.
TEXTURES = tuple((p, f) for p in ("stripes", "checker", "dots", "rings") for f in (1.1, 2.0))
HUES = 12  # primary hue on a 30-degree grid
SCHEMES = ("complement", "analogous", "shade")  # how the secondary colour relates to the primary

# Stream tags keep the class-table stream and the per-image streams apart for the same seed.
_CLASS_STREAM = 0
_IMAGE_STREAM = 1
_CHUNK = 1024  # images rendered per vectorised step: bounds memory at ~50 MB for 32x32
_DISTRACTORS = 3

# Per-image nuisance parameters: name -> (low, high) of a uniform draw. The order is part of the
# format: changing it changes every image for a given seed.
_PARAMS: dict[str, tuple[float, float]] = {
    "cx": (0.32, 0.68),
    "cy": (0.32, 0.68),
    "radius": (0.2, 0.34),
    "angle": (0.0, 2 * np.pi),
    "aspect": (0.8, 1.2),
    "hue_shift": (-0.035, 0.035),
    "saturation": (0.55, 1.0),
    "value": (0.6, 1.0),
    "phase_u": (0.0, 1.0),
    "phase_v": (0.0, 1.0),
    "freq_scale": (0.85, 1.15),
    "bg_hue_a": (0.0, 1.0),
    "bg_sat_a": (0.0, 0.45),
    "bg_val_a": (0.2, 0.95),
    "bg_hue_b": (0.0, 1.0),
    "bg_sat_b": (0.0, 0.45),
    "bg_val_b": (0.2, 0.95),
    "bg_angle": (0.0, 2 * np.pi),
    "contrast": (0.75, 1.15),
    "brightness": (-0.1, 0.1),
    "noise": (0.015, 0.07),
    "line_on": (0.0, 1.0),
    "line_x": (0.2, 0.8),
    "line_y": (0.2, 0.8),
    "line_angle": (0.0, np.pi),
    "line_width": (0.03, 0.07),
    "line_hue": (0.0, 1.0),
    "line_sat": (0.0, 0.7),
    "line_val": (0.1, 1.0),
}
for _k in range(_DISTRACTORS):
    _PARAMS |= {
        f"d{_k}_on": (0.0, 1.0),
        f"d{_k}_x": (0.05, 0.95),
        f"d{_k}_y": (0.05, 0.95),
        f"d{_k}_radius": (0.07, 0.15),
        f"d{_k}_shape": (0.0, len(SHAPES)),
        f"d{_k}_angle": (0.0, 2 * np.pi),
        f"d{_k}_hue": (0.0, 1.0),
        f"d{_k}_sat": (0.2, 1.0),
        f"d{_k}_val": (0.25, 1.0),
    }
_LINE_P = 0.45
_DISTRACTOR_P = 0.6


@dataclass(frozen=True)
class ClassAttributes:
    """One row per class: indexes into SHAPES, TEXTURES, the hue grid and SCHEMES."""

    shape: np.ndarray
    texture: np.ndarray
    hue: np.ndarray
    scheme: np.ndarray

    def name(self, label: int) -> str:
        pattern, freq = TEXTURES[self.texture[label]]
        fineness = "fine" if freq > 1.5 else "coarse"
        return (
            f"{SHAPES[self.shape[label]]}-{pattern}-{fineness}-hue{int(self.hue[label]) * 30:03d}"
            f"-{SCHEMES[self.scheme[label]]}"
        )


def attribute_space() -> int:
    """How many distinct classes the generator can make."""
    return len(SHAPES) * len(TEXTURES) * HUES * len(SCHEMES)


def class_attributes(classes: int, seed: int = 0) -> ClassAttributes:
    """Pick ``classes`` distinct attribute combinations at random (for a seed).

    Random rather than enumerated so that any half of the class ids covers every shape, texture and
    hue, but only some of their combinations.
    """
    space = attribute_space()
    if not 1 <= classes <= space:
        raise ValueError(f"classes must be in 1..{space} (distinct attribute combinations), got {classes}")
    rng = np.random.default_rng([_check_seed(seed), _CLASS_STREAM, 0])
    combo = rng.choice(space, size=classes, replace=False)
    combo, scheme = np.divmod(combo, len(SCHEMES))
    combo, hue = np.divmod(combo, HUES)
    shape, texture = np.divmod(combo, len(TEXTURES))
    return ClassAttributes(shape=shape, texture=texture, hue=hue, scheme=scheme)


def render(ids: np.ndarray, labels: np.ndarray, attrs: ClassAttributes, size: int, seed: int) -> np.ndarray:
    """Images for the given ids and labels, (N, size, size, 3) uint8; depends only on (seed, id, label).

    Bit-identical for a seed on one platform; numpy's SIMD float32 sin/cos may differ in the last bit
    across CPU families, which can move a pixel by one level.
    """
    ids = np.asarray(ids, dtype=np.int64)
    labels = np.asarray(labels, dtype=np.int64)
    seed = _check_seed(seed)
    n = len(ids)
    lows = np.array([lo for lo, _ in _PARAMS.values()], dtype=np.float32)
    spans = np.array([hi - lo for lo, hi in _PARAMS.values()], dtype=np.float32)
    uniforms = np.empty((n, len(_PARAMS)), dtype=np.float32)
    noise = np.empty((n, 3, size, size), dtype=np.float32)
    for i, image_id in enumerate(ids):
        rng = np.random.default_rng([seed, _IMAGE_STREAM, int(image_id)])
        uniforms[i] = rng.random(len(_PARAMS), dtype=np.float32)
        noise[i] = rng.standard_normal((3, size, size), dtype=np.float32)
    values = lows + uniforms * spans
    p = {name: values[:, j, None, None] for j, name in enumerate(_PARAMS)}  # (n, 1, 1) each

    grid = (np.arange(size, dtype=np.float32) + 0.5) / size
    yy, xx = grid[None, :, None], grid[None, None, :]

    # Background: a linear gradient between two muted colours.
    along = (xx - 0.5) * np.cos(p["bg_angle"]) + (yy - 0.5) * np.sin(p["bg_angle"]) + 0.5
    bg_a = _hsv_to_rgb(p["bg_hue_a"], p["bg_sat_a"], p["bg_val_a"])
    bg_b = _hsv_to_rgb(p["bg_hue_b"], p["bg_sat_b"], p["bg_val_b"])
    image = _mix(bg_a, bg_b, np.clip(along, 0.0, 1.0)[:, None])

    # Clutter: plain small shapes of any family, beneath the object.
    for k in range(_DISTRACTORS):
        u, v = _local(xx, yy, p[f"d{k}_x"], p[f"d{k}_y"], p[f"d{k}_radius"], p[f"d{k}_angle"], 1.0)
        shape = np.minimum(p[f"d{k}_shape"][:, 0, 0].astype(np.int64), len(SHAPES) - 1)
        alpha = _coverage(_sdf(shape, u, v), p[f"d{k}_radius"] * size) * (p[f"d{k}_on"] < _DISTRACTOR_P)[:, None]
        colour = _hsv_to_rgb(p[f"d{k}_hue"], p[f"d{k}_sat"], p[f"d{k}_val"])
        image = _mix(image, colour, alpha)

    # The object: class shape filled with the class texture in the class colours, jittered.
    radius = p["radius"]
    u, v = _local(xx, yy, p["cx"], p["cy"], radius, p["angle"], p["aspect"])
    alpha = _coverage(_sdf(attrs.shape[labels], u, v), radius * size)
    freq = np.array([f for _, f in TEXTURES], dtype=np.float32)[attrs.texture[labels]][:, None, None]
    t = _texture(attrs.texture[labels], u, v, freq * p["freq_scale"], p["phase_u"], p["phase_v"], radius * size)
    primary, secondary = _class_colours(attrs, labels, p)
    image = _mix(image, _mix(primary, secondary, t), alpha)

    # An occluding line across the image, in about half of the images.
    dist = np.abs((xx - p["line_x"]) * np.sin(p["line_angle"]) - (yy - p["line_y"]) * np.cos(p["line_angle"]))
    line_alpha = _coverage((dist - p["line_width"] / 2) * size, 1.0) * (p["line_on"] < _LINE_P)[:, None]
    image = _mix(image, _hsv_to_rgb(p["line_hue"], p["line_sat"], p["line_val"]), line_alpha)

    image = (image - 0.5) * p["contrast"][:, None] + 0.5 + p["brightness"][:, None]
    image += noise * p["noise"][:, None]
    return np.clip(np.rint(image * 255.0), 0, 255).astype(np.uint8).transpose(0, 2, 3, 1)


def synthesize(
    classes: int = 100, per_class: int = 60, size: int = 32, seed: int = 0, progress: bool = False
) -> pa.Table:
    """The synthetic image table: ids 0..N-1 in order, label = id % classes, PNG images.

    Labels cycle with the id so that any prefix of ids is class-balanced.
    """
    return pa.concat_tables(list(_chunks(classes, per_class, size, seed, progress)))


def write_synthetic(
    out_uri: str,
    classes: int = 100,
    per_class: int = 60,
    size: int = 32,
    seed: int = 0,
    rows_per_shard: int = 10_000,
    progress: bool = False,
) -> WriteResult:
    """Generate the dataset and write it as Parquet shards under ``out_uri``."""
    table = synthesize(classes, per_class, size, seed, progress)
    return write_table(table, out_uri, rows_per_shard=rows_per_shard)


def _chunks(classes: int, per_class: int, size: int, seed: int, progress: bool) -> Iterator[pa.Table]:
    if per_class < 1:
        raise ValueError(f"per_class must be at least 1, got {per_class}")
    if size < 8:
        raise ValueError(f"size must be at least 8 pixels, got {size}")
    attrs = class_attributes(classes, seed)
    names = [attrs.name(label) for label in range(classes)]
    total = classes * per_class
    starts = range(0, total, _CHUNK)
    bar = tqdm(total=total, desc="synthesize", unit="img", delay=1.0, disable=not progress)
    with bar:
        for start in starts:
            ids = np.arange(start, min(start + _CHUNK, total), dtype=np.int64)
            labels = ids % classes
            pixels = render(ids, labels, attrs, size, seed)
            images = [encode_png(img) for img in pixels]
            bar.update(len(ids))
            yield with_class_names(image_table(ids, images, labels), names)


def _check_seed(seed: int) -> int:
    if seed < 0:
        raise ValueError(f"seed must be non-negative, got {seed}")
    return int(seed)


def _local(xx, yy, cx, cy, radius, angle, aspect) -> tuple[np.ndarray, np.ndarray]:
    """Pixel coordinates in an object's frame: rotated, scaled so its radius is 1, squashed by aspect."""
    dx, dy = xx - cx, yy - cy
    cos, sin = np.cos(angle), np.sin(angle)
    return (cos * dx + sin * dy) / radius, (cos * dy - sin * dx) / (radius * aspect)


def _sdf(shape: np.ndarray, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Signed distance (in object radii, negative inside) to each image's shape family."""
    out = np.empty(np.broadcast_shapes(u.shape, v.shape), dtype=np.float32)
    u, v = np.broadcast_to(u, out.shape), np.broadcast_to(v, out.shape)
    for index in np.unique(shape):
        sel = shape == index
        out[sel] = _SDF[SHAPES[index]](u[sel], v[sel])
    return out


def _polygon(u: np.ndarray, v: np.ndarray, sides: int, apothem: float) -> np.ndarray:
    angles = np.pi / 2 + 2 * np.pi * np.arange(sides) / sides
    planes = [u * np.cos(a) + v * np.sin(a) for a in angles]
    return np.max(planes, axis=0) - apothem


def _box(u: np.ndarray, v: np.ndarray, half_u: float, half_v: float) -> np.ndarray:
    return np.maximum(np.abs(u) - half_u, np.abs(v) - half_v)


_SDF = {
    "disk": lambda u, v: np.hypot(u, v) - 1.0,
    "square": lambda u, v: _box(u, v, 0.82, 0.82),
    "triangle": lambda u, v: _polygon(u, v, 3, 0.55),
    "ring": lambda u, v: np.abs(np.hypot(u, v) - 0.72) - 0.28,
    "cross": lambda u, v: np.minimum(_box(u, v, 1.0, 0.34), _box(u, v, 0.34, 1.0)),
    "star": lambda u, v: np.hypot(u, v) - (0.72 + 0.3 * np.cos(5 * np.arctan2(v, u))),
    "halfdisk": lambda u, v: np.maximum(np.hypot(u, v + 0.35) - 1.0, -(v + 0.35)),
    "bar": lambda u, v: _box(u, v, 1.05, 0.42),
    "hexagon": lambda u, v: _polygon(u, v, 6, 0.88),
}


def _coverage(distance: np.ndarray, pixels_per_unit) -> np.ndarray:
    """Anti-aliased inside-ness: the signed distance converted to pixels, ramped over one pixel."""
    return np.clip(0.5 - distance * pixels_per_unit, 0.0, 1.0)[:, None]


def _texture(texture, u, v, freq, phase_u, phase_v, radius_px) -> np.ndarray:
    """Mixing weight between the two class colours, in the object's frame so it moves with it."""
    out = np.empty(u.shape, dtype=np.float32)
    for index in np.unique(texture):
        sel = texture == index
        f, pu, pv, su, sv = freq[sel], phase_u[sel], phase_v[sel], u[sel], v[sel]
        pattern = TEXTURES[index][0]
        if pattern == "stripes":
            t = np.sin(2 * np.pi * (f * su + pu))
        elif pattern == "checker":
            t = np.sin(np.pi * (f * su + 2 * pu)) * np.sin(np.pi * (f * sv + 2 * pv))
        elif pattern == "rings":
            t = np.sin(2 * np.pi * (f * np.hypot(su, sv) + pu))
        else:  # dots on a lattice: distance to the nearest lattice point, in lattice cells
            du = (f * su + pu) % 1.0 - 0.5
            dv = (f * sv + pv) % 1.0 - 0.5
            t = (0.3 - np.hypot(du, dv)) * radius_px[sel] / f
        out[sel] = np.clip(0.5 + 2.0 * t, 0.0, 1.0)
    return out[:, None]


def _class_colours(attrs: ClassAttributes, labels: np.ndarray, p: dict) -> tuple[np.ndarray, np.ndarray]:
    hue = attrs.hue[labels][:, None, None] / HUES + p["hue_shift"]
    scheme = attrs.scheme[labels][:, None, None]
    sat, val = p["saturation"], p["value"]
    second_hue = hue + np.where(scheme == 0, 0.5, np.where(scheme == 1, 1 / 6, 0.0))
    second_val = np.where(scheme == 2, 0.4 * val, val)
    return _hsv_to_rgb(hue, sat, val), _hsv_to_rgb(second_hue, sat, second_val)


def _hsv_to_rgb(h, s, v) -> np.ndarray:
    """Vectorised HSV -> RGB in [0, 1] for per-image (n, 1, 1) inputs; returns (n, 3, 1, 1)."""
    h, s, v = (np.asarray(x, dtype=np.float32)[:, None] for x in (h, s, v))
    k = (np.array([5.0, 3.0, 1.0], dtype=np.float32)[:, None, None] + (h % 1.0) * 6.0) % 6.0
    return v - v * s * np.clip(np.minimum(k, 4.0 - k), 0.0, 1.0)


def _mix(a: np.ndarray, b: np.ndarray, t: np.ndarray) -> np.ndarray:
    return a + (b - a) * t
