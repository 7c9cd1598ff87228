"""Deterministic synthetic "shapes" dataset: the embedded default data of spp_jax.

It stands in for ImageNet (classification), Pascal VOC (detection and
multi-label classification) and Caltech101 (many-class few-shot transfer), so
every experiment runs with no download. Everything here is pure NumPy + OpenCV.

Samples
-------
A sample is a pure function of ``(variant, split, index, seed)``: its random
generator is ``numpy.random.default_rng([seed, VARIANT_ID, SPLIT_ID, index])``,
so any sample can be (re)generated on its own, in any order, in parallel, and
bit-exactly on every machine (NumPy's PCG64 stream and OpenCV's integer
rasteriser are platform independent).

Images are ``uint8`` RGB arrays of shape ``(H, W, 3)``. The shorter side is
log-uniform in ``[MIN_SIDE, MAX_SIDE] = [120, 500]`` px and the aspect ratio
``W / H`` is log-uniform in ``[1/2, 2]`` (so the longer side is at most 1000 px).

Classes
-------
The class of an object is its **shape** (``CLASS_NAMES``, 10 classes); colour,
fill texture (``FILL_STYLES``), scale, mild anisotropic stretch, position and
rotation are nuisance factors drawn at random. The background is a smooth
random colour field with pixel noise (``_background`` can add stroke clutter,
which version 1.0.0 of the data had; see the README for why it is off). Objects often sit near or partly over the border, so
a centre crop can cut them.

Objects
-------
Each object records

* ``bbox``: ``int32 (4,)`` = ``(x1, y1, x2, y2)`` in **0-based, inclusive pixel
  corners, clipped to the image** (the convention of SPP-net / R-CNN code after
  subtracting 1 from VOC's 1-based boxes). A box is *tight*: it is computed from
  the object's visible rendered pixels (after clipping to the image and after
  occlusion by later objects), so every box edge touches an object pixel.
* ``label``: ``int64``, the class index in the variant's label space.
* ``difficult``: ``bool``, True when the object is tiny (shorter box side
  < ``DIFFICULT_MIN_SIDE`` px) or heavily truncated/occluded (less than
  ``DIFFICULT_MIN_VISIBLE`` of its full rendered area is visible).

Variants (``VARIANTS``)
-----------------------
``"classification"`` (ImageNet-like, 10 classes, single label)
    ``label`` = one shape class; 1-3 objects, **all of that class** (so the
    label is unambiguous); the first (dominant) object has a radius of
    0.22-0.5 x the shorter image side and at least half of it lies inside the
    image (smaller companions may hide at most 30 % of it).
``"classification_wide"`` (the same 10 classes, objects over a wider range of scales)
    ``"classification"`` with the dominant object's radius drawn log-uniformly in
    0.1-0.5 x the shorter side (a 5x range of object sizes instead of 2.3x): made
    to test whether multi-size training gains where object scale varies more
    (README, "The paper's claims over seeds"). Image ``i`` uses the random stream
    of ``"classification"``'s image ``i`` (same size, class, colours, textures; the
    radius is the same draw mapped to the wider range), so the two variants differ
    in object scale (and what placement that changes) only.
``"detection"`` (VOC-detection-like, 10 classes)
    1-5 objects of independent, uniformly drawn classes and log-uniform sizes
    (radius 0.035-0.4 x shorter side; some are small), boxes + difficult flags.
    Objects may overlap, but a new object may hide at most 40 % of an earlier
    one, so boxes stay meaningful.
``"multilabel"`` (VOC-classification-like, 10 classes)
    Same generator as ``"detection"`` (but other images: the variant is part
    of the seed) plus ``labels``: a
    ``bool (10,)`` multi-hot vector of the classes of all annotated objects,
    difficult ones included (VOC instead marks a class present only through
    difficult objects as "0 = ignore"; derive that from ``objects`` if needed).
``"fine"`` (Caltech101-like, ``10 x 3 = 30`` classes, single label)
    class ``k = 3 * shape + style`` where ``shape`` indexes ``CLASS_NAMES`` and
    ``style`` indexes ``FINE_FILL_STYLES = ("solid", "stripes", "checker")``;
    e.g. 0 = circle/solid, 1 = circle/stripes, 5 = square/checker. Names are in
    ``FINE_CLASS_NAMES``. One large, mostly centred object (rarely two, of the
    same class), like Caltech101's object-centred photos. Colours still vary.

Splits
------
``SPLITS = ("train", "validation", "test", "trainval")``. Every split is an
independent, unbounded index space (index ``i`` of ``"train"`` and of
``"test"`` are unrelated images); split *sizes* are chosen by the caller (see
``shapes_tfds.ShapesConfig``). Conventionally classification / fine use
train / validation / test and detection / multilabel use trainval / test, as
VOC 2007 does, but any split name is accepted for any variant.
"""

from __future__ import annotations

import math
import time
from typing import Any

import cv2
import numpy as np

__all__ = [
    "CLASS_NAMES",
    "FILL_STYLES",
    "FINE_FILL_STYLES",
    "FINE_CLASS_NAMES",
    "VARIANTS",
    "SINGLE_LABEL_VARIANTS",
    "SPLITS",
    "MIN_SIDE",
    "MAX_SIDE",
    "MAX_ASPECT",
    "DIFFICULT_MIN_SIDE",
    "DIFFICULT_MIN_VISIBLE",
    "num_classes",
    "class_names",
    "generate",
    "ShapesSource",
    "main_object_scales",
    "render_speed",
]

# --------------------------------------------------------------------------
# Public constants
# --------------------------------------------------------------------------

#: The 10 shape classes; index = class id of "classification"/"detection"/"multilabel".
CLASS_NAMES: tuple[str, ...] = (
    "circle",
    "square",
    "triangle",
    "star",
    "cross",
    "ring",
    "hexagon",
    "crescent",
    "arrow",
    "heart",
)

#: Fill textures of objects. Nuisance factor except in the "fine" variant.
FILL_STYLES: tuple[str, ...] = ("solid", "stripes", "checker", "noise", "gradient")

#: Fill styles that define the "fine" classes (class = 3 * shape + style).
FINE_FILL_STYLES: tuple[str, ...] = ("solid", "stripes", "checker")

#: Names of the 30 "fine" classes, e.g. "circle/solid", index = 3 * shape + style.
FINE_CLASS_NAMES: tuple[str, ...] = tuple(
    f"{shape}/{style}" for shape in CLASS_NAMES for style in FINE_FILL_STYLES
)

VARIANTS: tuple[str, ...] = ("classification", "detection", "multilabel", "fine", "classification_wide")
#: The variants whose images have one class label (``"label"``); the others are multi-object.
SINGLE_LABEL_VARIANTS: tuple[str, ...] = ("classification", "classification_wide", "fine")
SPLITS: tuple[str, ...] = ("train", "validation", "test", "trainval")

MIN_SIDE = 120  # px, smallest shorter image side
MAX_SIDE = 500  # px, largest shorter image side
MAX_ASPECT = 2.0  # W/H lies in [1/MAX_ASPECT, MAX_ASPECT]

DIFFICULT_MIN_SIDE = 12  # px; objects whose tight box is thinner are "difficult"
DIFFICULT_MIN_VISIBLE = 0.45  # objects with less visible area fraction are "difficult"

# Objects with fewer visible pixels than this are dropped (never annotated).
_MIN_VISIBLE_PIXELS = 24

_VARIANT_ID = {v: i for i, v in enumerate(VARIANTS)}
# classification_wide draws from classification's stream (see the module docstring).
_VARIANT_ID["classification_wide"] = _VARIANT_ID["classification"]
# Main-object radius / shorter side: classification draws it uniformly in this range;
# classification_wide maps that same draw log-uniformly onto WIDE_RADIUS.
CLASSIFICATION_RADIUS = (0.22, 0.5)
WIDE_RADIUS = (0.1, 0.5)
_SPLIT_ID = {s: i for i, s in enumerate(SPLITS)}


def num_classes(variant: str) -> int:
    """Number of classes of ``variant``: 10, or 30 for ``"fine"``."""
    _check_variant(variant)
    return len(FINE_CLASS_NAMES) if variant == "fine" else len(CLASS_NAMES)


def class_names(variant: str) -> tuple[str, ...]:
    """Class names of ``variant`` (index = class id)."""
    _check_variant(variant)
    return FINE_CLASS_NAMES if variant == "fine" else CLASS_NAMES


def _check_variant(variant: str) -> None:
    if variant not in _VARIANT_ID:
        raise ValueError(f"unknown variant {variant!r}; expected one of {VARIANTS}")


# --------------------------------------------------------------------------
# Shape outlines in unit coordinates
# --------------------------------------------------------------------------
# Each shape is a list of (polygon, value) drawing operations on a mask: value 1
# paints the shape, value 0 cuts a hole (ring, crescent). Polygons are float
# arrays (N, 2) of (x, y) with y pointing down, roughly inside the unit disc.


def _circle_pts(r: float = 1.0, cx: float = 0.0, cy: float = 0.0, n: int = 64) -> np.ndarray:
    t = np.linspace(0.0, 2.0 * np.pi, n, endpoint=False)
    return np.stack([cx + r * np.cos(t), cy + r * np.sin(t)], axis=1)


def _regular_pts(n: int, r: float = 1.0, phase: float = -np.pi / 2) -> np.ndarray:
    t = phase + np.arange(n) * (2.0 * np.pi / n)
    return np.stack([r * np.cos(t), r * np.sin(t)], axis=1)


def _star_pts(points: int = 5, r_out: float = 1.0, r_in: float = 0.42) -> np.ndarray:
    t = -np.pi / 2 + np.arange(2 * points) * (np.pi / points)
    r = np.where(np.arange(2 * points) % 2 == 0, r_out, r_in)
    return np.stack([r * np.cos(t), r * np.sin(t)], axis=1)


def _heart_pts(n: int = 64) -> np.ndarray:
    # Classic parametric heart; scaled to about the unit disc, point down.
    t = np.linspace(0.0, 2.0 * np.pi, n, endpoint=False)
    x = 16 * np.sin(t) ** 3
    y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))
    return np.stack([x / 17.0, (y + 2.5) / 17.0], axis=1)


_A = 0.32  # half width of the cross arms
_SHAPES: dict[str, list[tuple[np.ndarray, int]]] = {
    "circle": [(_circle_pts(), 1)],
    "square": [(np.array([[-0.8, -0.8], [0.8, -0.8], [0.8, 0.8], [-0.8, 0.8]]), 1)],
    "triangle": [(_regular_pts(3, 1.0) + np.array([0.0, 0.2]), 1)],
    "star": [(_star_pts(), 1)],
    "cross": [
        (
            np.array(
                [
                    [-_A, -1], [_A, -1], [_A, -_A], [1, -_A], [1, _A], [_A, _A],
                    [_A, 1], [-_A, 1], [-_A, _A], [-1, _A], [-1, -_A], [-_A, -_A],
                ],
                dtype=np.float64,
            ),
            1,
        )
    ],
    "ring": [(_circle_pts(1.0), 1), (_circle_pts(0.55), 0)],
    "hexagon": [(_regular_pts(6, 1.0, phase=0.0), 1)],
    "crescent": [(_circle_pts(1.0), 1), (_circle_pts(0.82, cx=0.5, cy=-0.1), 0)],
    "arrow": [
        (
            np.array(
                [[-1, -0.22], [0.15, -0.22], [0.15, -0.62], [1, 0], [0.15, 0.62], [0.15, 0.22], [-1, 0.22]],
                dtype=np.float64,
            ),
            1,
        )
    ],
    "heart": [(_heart_pts(), 1)],
}
assert tuple(_SHAPES) == CLASS_NAMES

_SUBPIX_SHIFT = 3  # cv2.fillPoly fractional bits: vertices are placed to 1/8 px.


# --------------------------------------------------------------------------
# Colours and textures
# --------------------------------------------------------------------------


def _random_color(rng: np.random.Generator, sat_lo: float = 0.45) -> np.ndarray:
    """A random RGB colour with saturation >= ``sat_lo``: float32 (3,) in [0, 255]."""
    hsv = np.array(
        [[[rng.uniform(0.0, 360.0), rng.uniform(sat_lo, 1.0), rng.uniform(0.3, 1.0)]]],
        dtype=np.float32,
    )
    # Float HSV in OpenCV: H in degrees [0, 360), S and V in [0, 1]; RGB out in [0, 1].
    return cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)[0, 0] * np.float32(255.0)


def _contrasting_color(rng: np.random.Generator, avoid: np.ndarray, min_dist: float = 90.0) -> np.ndarray:
    """A random colour at least ``min_dist`` (RGB L2) from ``avoid`` if possible."""
    best, best_d = None, -1.0
    for _ in range(8):
        c = _random_color(rng)
        d = float(np.linalg.norm(c - avoid))
        if d >= min_dist:
            return c
        if d > best_d:
            best, best_d = c, d
    return best


def _texture(
    rng: np.random.Generator, style: str, h: int, w: int, x0: int, y0: int, c1: np.ndarray, c2: np.ndarray
) -> np.ndarray:
    """Fill texture of an object's crop.

    Args:
      rng: the sample's generator.
      style: one of ``FILL_STYLES``.
      h, w: crop size in px.
      x0, y0: image coordinates of the crop's top-left pixel (so patterns are
        anchored to the image, not the crop).
      c1, c2: float32 (3,) primary / secondary RGB colours in [0, 255].

    Returns:
      float32 array (h, w, 3) in about [0, 255] (clipped later).
    """
    if style == "noise":
        # Blotchy two-colour noise: coarse random field, bilinearly upsampled.
        cell = rng.uniform(3.0, 10.0)
        gh, gw = max(2, int(h / cell) + 2), max(2, int(w / cell) + 2)
        field = rng.random((gh, gw), dtype=np.float32)
        t = cv2.resize(field, (w, h), interpolation=cv2.INTER_LINEAR)[..., None]
        return c1 + (c2 - c1) * t
    xs = np.arange(x0, x0 + w, dtype=np.float32)[None, :]
    ys = np.arange(y0, y0 + h, dtype=np.float32)[:, None]
    ang = rng.uniform(0.0, np.pi)
    ca, sa = math.cos(ang), math.sin(ang)
    if style == "solid":
        # One colour with soft linear shading (so "solid" is not perfectly flat).
        amp = rng.uniform(0.0, 0.35) / max(h, w, 1)
        t = (xs * ca + ys * sa) * amp
        t = t - t.mean()
        return c1 * (1.0 + t)[..., None]
    if style == "gradient":
        u = xs * ca + ys * sa
        t = (u - u.min()) / max(float(u.max() - u.min()), 1.0)
        return c1 + (c2 - c1) * t[..., None]
    period = rng.uniform(4.0, 14.0)
    u = xs * ca + ys * sa
    if style == "stripes":
        sel = (np.floor(u * (1.0 / period)).astype(np.int32) & 1).astype(bool)
    elif style == "checker":
        v = ys * ca - xs * sa
        sel = ((np.floor(u * (1.0 / period)).astype(np.int32) + np.floor(v * (1.0 / period)).astype(np.int32)) & 1).astype(bool)
    else:
        raise ValueError(f"unknown fill style {style!r}")
    return np.where(sel[..., None], c1, c2)


def _background(rng: np.random.Generator, h: int, w: int, strokes: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Background: smooth colour field, plus random strokes if ``strokes``.

    Returns ``(img, mean)``: uint8 (h, w, 3) image and float32 (3,) approximate
    mean colour (of the coarse colour grid; cheaper than averaging the image).
    """
    base = _random_color(rng, sat_lo=0.0)
    gh, gw = int(rng.integers(2, 7)), int(rng.integers(2, 7))
    grid = base + rng.normal(0.0, rng.uniform(15.0, 60.0), (gh, gw, 3)).astype(np.float32)
    grid = np.clip(grid, 0, 255)
    img = cv2.resize(grid.astype(np.uint8), (w, h), interpolation=cv2.INTER_CUBIC)
    # Stroke clutter (lines and wiggly curves): edges everywhere, but nothing that
    # looks like a filled shape of one of the classes.
    n_strokes = int(rng.integers(4, 20)) if strokes else 0
    scale = min(h, w)
    for _ in range(n_strokes):
        color = tuple(int(c) for c in rng.integers(0, 256, 3))
        thickness = int(rng.integers(1, 4))
        if rng.random() < 0.5:
            p = rng.uniform([0, 0], [w, h], (2, 2))
            cv2.line(img, tuple(int(v) for v in p[0]), tuple(int(v) for v in p[1]), color, thickness, cv2.LINE_AA)
        else:
            n = int(rng.integers(3, 8))
            steps = rng.normal(0.0, 0.12 * scale, (n, 2))
            pts = (rng.uniform([0, 0], [w, h]) + np.cumsum(steps, axis=0)).astype(np.int32)
            cv2.polylines(img, [pts.reshape(-1, 1, 2)], False, color, thickness, cv2.LINE_AA)
    return img, grid.reshape(-1, 3).mean(axis=0)


# --------------------------------------------------------------------------
# Object placement and rasterisation
# --------------------------------------------------------------------------


class _Placed:
    """A rasterised object (internal)."""

    __slots__ = ("cls", "style", "x0", "y0", "mask", "full_area")

    def __init__(self, cls: int, style: int, x0: int, y0: int, mask: np.ndarray, full_area: int):
        self.cls = cls  # shape class index into CLASS_NAMES
        self.style = style  # index into FILL_STYLES
        self.x0, self.y0 = x0, y0  # image coords of mask[0, 0] (may be < 0)
        self.mask = mask  # uint8 (h, w) full unclipped mask, 1 = shape
        self.full_area = full_area  # pixels of the unclipped shape


def _rasterise(rng: np.random.Generator, cls: int, cx: float, cy: float, radius: float) -> tuple[int, int, np.ndarray]:
    """Draw shape ``cls`` (random rotation/stretch) into a tight local mask.

    Returns ``(x0, y0, mask)``: mask is uint8 (h, w) with 1 on the shape and its
    pixel [0, 0] lies at image coordinates (x0, y0) (possibly outside the image).
    """
    theta = rng.uniform(0.0, 2.0 * np.pi)
    stretch = math.exp(rng.uniform(-0.15, 0.15))  # mild anisotropy keeps classes distinct
    c, s = math.cos(theta), math.sin(theta)
    lin = np.array([[c, -s], [s, c]]) @ np.diag([radius * stretch, radius / stretch])
    ops = [(pts @ lin.T + (cx, cy), val) for pts, val in _SHAPES[CLASS_NAMES[cls]]]
    allp = np.concatenate([p for p, _ in ops])
    x0, y0 = int(math.floor(allp[:, 0].min())), int(math.floor(allp[:, 1].min()))
    x1, y1 = int(math.ceil(allp[:, 0].max())), int(math.ceil(allp[:, 1].max()))
    mask = np.zeros((y1 - y0 + 1, x1 - x0 + 1), np.uint8)
    f = float(1 << _SUBPIX_SHIFT)
    for pts, val in ops:
        # Pixel centres sit at integer coordinates; shift so the local origin is (x0, y0).
        q = np.round((pts - (x0, y0)) * f).astype(np.int32)
        cv2.fillPoly(mask, [q.reshape(-1, 1, 2)], val, cv2.LINE_8, _SUBPIX_SHIFT)
    return x0, y0, mask


def _clip_window(x0: int, y0: int, mask: np.ndarray, h: int, w: int):
    """Intersection of a local mask with the image.

    Returns ``(ix0, iy0, ix1, iy1, sub)`` with image window [ix0, ix1) x [iy0, iy1)
    and ``sub`` the matching view of ``mask``; or None if they do not overlap.
    """
    mh, mw = mask.shape
    ix0, iy0 = max(x0, 0), max(y0, 0)
    ix1, iy1 = min(x0 + mw, w), min(y0 + mh, h)
    if ix0 >= ix1 or iy0 >= iy1:
        return None
    return ix0, iy0, ix1, iy1, mask[iy0 - y0 : iy1 - y0, ix0 - x0 : ix1 - x0]


def _sample_center(rng: np.random.Generator, h: int, w: int, radius: float, p_border: float, spread: float = 1.0):
    """Object centre: near/over a border with prob. ``p_border``, else inside."""
    if rng.random() < p_border:
        # Centre within [-0.35 r, 0.6 r] of a random edge: the object is cut by it.
        side = int(rng.integers(4))
        d = rng.uniform(-0.35, 0.6) * radius
        if side == 0:
            return d, rng.uniform(0, h)
        if side == 1:
            return w - 1 - d, rng.uniform(0, h)
        if side == 2:
            return rng.uniform(0, w), d
        return rng.uniform(0, w), h - 1 - d
    # Otherwise uniform over the image shrunk by ``spread`` around the centre.
    mx = min(radius * 0.6, w / 2)
    my = min(radius * 0.6, h / 2)
    cx = w / 2 + spread * rng.uniform(mx - w / 2, w / 2 - mx)
    cy = h / 2 + spread * rng.uniform(my - h / 2, h / 2 - my)
    return cx, cy


def _try_place(
    rng: np.random.Generator,
    owner: np.ndarray,
    placed: list[_Placed],
    visible: list[int],
    cls: int,
    style: int,
    radius: float,
    p_border: float,
    min_visible: float,
    max_hide: float,
    spread: float = 1.0,
    tries: int = 12,
) -> _Placed | None:
    """Rasterise an object that passes the visibility / occlusion constraints.

    ``owner`` is the int16 (H, W) map of which object owns each pixel (-1 =
    background) and ``visible`` the current visible pixel count of each placed
    object; both are updated in place when the object is accepted.
    """
    h, w = owner.shape
    for _ in range(tries):
        cx, cy = _sample_center(rng, h, w, radius, p_border, spread)
        x0, y0, mask = _rasterise(rng, cls, cx, cy, radius)
        full = int(np.count_nonzero(mask))
        win = _clip_window(x0, y0, mask, h, w)
        if full == 0 or win is None:
            continue
        ix0, iy0, ix1, iy1, sub = win
        sel = sub.astype(bool)
        n_in = int(np.count_nonzero(sel))
        if n_in < max(_MIN_VISIBLE_PIXELS, min_visible * full):
            continue
        if placed:
            # How much of each earlier object would this one hide?
            hidden = np.bincount(owner[iy0:iy1, ix0:ix1][sel] + 1, minlength=len(placed) + 1)[1:]
            if np.any(hidden > max_hide * np.maximum(np.asarray(visible), 1)):
                continue
            for k in np.nonzero(hidden)[0]:
                visible[k] -= int(hidden[k])
        owner[iy0:iy1, ix0:ix1][sel] = len(placed)
        visible.append(n_in)
        return _Placed(cls, style, x0, y0, mask, full)
    return None


# --------------------------------------------------------------------------
# Sample generation
# --------------------------------------------------------------------------


def _rng_for(variant: str, split: str, index: int, seed: int) -> np.random.Generator:
    if split not in _SPLIT_ID:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    if index < 0:
        raise ValueError(f"index must be >= 0, got {index}")
    return np.random.default_rng([int(seed), _VARIANT_ID[variant], _SPLIT_ID[split], int(index)])


def _main_radius(u: float, variant: str) -> float:
    """The dominant object's radius / shorter side from classification's uniform draw ``u``:
    ``u`` itself, or for classification_wide the same quantile of the log-uniform range."""
    if variant != "classification_wide":
        return u
    lo, hi = CLASSIFICATION_RADIUS
    wlo, whi = WIDE_RADIUS
    return wlo * (whi / wlo) ** ((u - lo) / (hi - lo))


def _image_size(rng: np.random.Generator) -> tuple[int, int]:
    short = math.exp(rng.uniform(math.log(MIN_SIDE), math.log(MAX_SIDE)))
    aspect = math.exp(rng.uniform(-math.log(MAX_ASPECT), math.log(MAX_ASPECT)))  # W / H
    if aspect >= 1.0:
        h, w = round(short), round(short * aspect)
    else:
        h, w = round(short / aspect), round(short)
    return int(h), int(w)


def generate(
    variant: str,
    split: str,
    index: int,
    seed: int = 0,
    return_mask: bool = False,
) -> dict[str, Any]:
    """Render sample ``index`` of ``split`` of ``variant`` deterministically.

    Args:
      variant: one of ``VARIANTS``.
      split: one of ``SPLITS``.
      index: sample index >= 0 (unbounded).
      seed: global dataset seed (different seeds = different datasets).
      return_mask: also return the instance map (costs H*W*2 bytes).

    Returns:
      dict with

      * ``"image"``: uint8 (H, W, 3) RGB.
      * ``"index"``: int, = ``index``.
      * ``"objects"``: dict of ``"bbox"`` int32 (N, 4) ``(x1, y1, x2, y2)``
        0-based inclusive pixel corners clipped to the image; ``"label"`` int64
        (N,) class ids in the variant's label space; ``"difficult"`` bool (N,).
        N >= 1. Objects are in drawing order (later ones on top).
      * ``"label"``: int class id (``"classification"``, ``"classification_wide"`` and
        ``"fine"`` only).
      * ``"labels"``: bool (10,) multi-hot (``"multilabel"`` only).
      * ``"mask"`` (if ``return_mask``): int16 (H, W), value k on the visible
        pixels of object k (row k of ``objects``), -1 elsewhere.
    """
    _check_variant(variant)
    rng = _rng_for(variant, split, index, seed)
    h, w = _image_size(rng)
    short = min(h, w)
    owner = np.full((h, w), -1, np.int16)
    if variant in SINGLE_LABEL_VARIANTS:
        placed, label = _place_single_label(rng, owner, variant, short)
    else:  # detection / multilabel share the generator
        placed, label = _place_detection(rng, owner, short), None
    if not placed:  # pragma: no cover - the centred fallback cannot fail
        raise RuntimeError(f"no object could be placed for {variant}/{split}/{index}")
    img = _paint(rng, owner, placed, h, w)
    objects, keep = _annotate(owner, placed, variant, h, w)
    out: dict[str, Any] = {"image": img, "index": int(index), "objects": objects}
    if label is not None:
        out["label"] = int(label)
    if variant == "multilabel":
        multi = np.zeros(len(CLASS_NAMES), bool)
        multi[objects["label"]] = True
        out["labels"] = multi
    if return_mask:
        # Renumber owners so mask value k matches row k of the kept objects.
        remap = np.full(len(placed) + 1, -1, np.int16)
        remap[np.asarray(keep) + 1] = np.arange(len(keep), dtype=np.int16)
        out["mask"] = remap[owner + 1]
    return out


def _place_single_label(rng: np.random.Generator, owner: np.ndarray, variant: str, short: int
                        ) -> tuple[list[_Placed], int]:
    """The classification / fine objects (1-3, one class; the first dominant) drawn into
    ``owner`` (the instance map, updated in place); returns them and the image's label."""
    placed: list[_Placed] = []
    visible: list[int] = []
    shape = int(rng.integers(len(CLASS_NAMES)))
    if variant == "fine":
        fine_style = int(rng.integers(len(FINE_FILL_STYLES)))
        style_ids = [FILL_STYLES.index(FINE_FILL_STYLES[fine_style])]
        n_obj = 1 if rng.random() < 0.85 else 2
        radius = short * rng.uniform(0.28, 0.46)
        p_border, spread = 0.1, 0.4  # Caltech-like: large and mostly centred
    else:
        style_ids = list(range(len(FILL_STYLES)))
        n_obj = int(rng.choice([1, 2, 3], p=[0.6, 0.3, 0.1]))
        radius = short * _main_radius(rng.uniform(*CLASSIFICATION_RADIUS), variant)
        p_border, spread = 0.3, 1.0
    for k in range(n_obj):
        r = radius if k == 0 else radius * rng.uniform(0.3, 0.7)
        obj = _try_place(
            rng, owner, placed, visible, shape, int(rng.choice(style_ids)), r,
            p_border=p_border if k == 0 else 0.3,
            min_visible=0.5 if k == 0 else 0.2,
            max_hide=0.3, spread=spread if k == 0 else 1.0, tries=12 if k == 0 else 6,
        )
        if obj is None and k == 0:
            # Fallback that always succeeds: centred, fully inside the image.
            obj = _try_place(rng, owner, placed, visible, shape, style_ids[0], short * 0.3,
                             p_border=0.0, min_visible=0.5, max_hide=1.0, spread=0.0, tries=50)
        if obj is not None:
            placed.append(obj)
    return placed, shape * len(FINE_FILL_STYLES) + fine_style if variant == "fine" else shape


def _place_detection(rng: np.random.Generator, owner: np.ndarray, short: int) -> list[_Placed]:
    """The detection / multilabel objects (1-5, independent classes, log-uniform sizes)."""
    placed: list[_Placed] = []
    visible: list[int] = []
    n_obj = int(rng.choice([1, 2, 3, 4, 5], p=[0.3, 0.25, 0.2, 0.15, 0.1]))
    for _ in range(n_obj):
        cls = int(rng.integers(len(CLASS_NAMES)))
        r = short * math.exp(rng.uniform(math.log(0.035), math.log(0.4)))
        obj = _try_place(
            rng, owner, placed, visible, cls, int(rng.integers(len(FILL_STYLES))), r,
            p_border=0.3, min_visible=0.2, max_hide=0.4, tries=8,
        )
        if obj is None and not placed:
            obj = _try_place(rng, owner, placed, visible, cls, 0, short * 0.2,
                             p_border=0.0, min_visible=0.5, max_hide=1.0, spread=0.0, tries=50)
        if obj is not None:
            placed.append(obj)
    return placed


def _paint(rng: np.random.Generator, owner: np.ndarray, placed: list[_Placed], h: int, w: int
           ) -> np.ndarray:
    """uint8 (h, w, 3): the background, each object's visible pixels, then blur and noise."""
    # No stroke clutter: with it, from-scratch training of the embedded classifiers
    # stalled at chance for thousands of steps (README, "The embedded default"), and
    # detectors built on those classifiers should see the same kind of images.
    img, bg_mean = _background(rng, h, w, strokes=False)
    for k, obj in enumerate(placed):
        ix0, iy0, ix1, iy1, _ = _clip_window(obj.x0, obj.y0, obj.mask, h, w)
        # Only the pixels this object still owns get painted: same result as
        # painting in order, and keeps colours and owner map consistent.
        sel = owner[iy0:iy1, ix0:ix1] == k
        c1 = _contrasting_color(rng, bg_mean)
        c2 = _contrasting_color(rng, c1, min_dist=70.0)
        tex = _texture(rng, FILL_STYLES[obj.style], iy1 - iy0, ix1 - ix0, ix0, iy0, c1, c2)
        np.clip(tex, 0, 255, out=tex)
        np.copyto(img[iy0:iy1, ix0:ix1], tex.astype(np.uint8), where=sel[..., None])
    # Global sensor-like degradations, applied to objects and background alike.
    if rng.random() < 0.3:
        img = cv2.GaussianBlur(img, (3, 3), 0)
    amp = int(rng.integers(2, 14))
    # Uniform noise in [-amp, amp] via two saturating uint8 ops (faster than int16 math).
    noise = rng.integers(0, 2 * amp + 1, img.shape, dtype=np.uint8)
    return cv2.subtract(cv2.add(img, noise), (amp, amp, amp, 0))


def _annotate(owner: np.ndarray, placed: list[_Placed], variant: str, h: int, w: int
              ) -> tuple[dict[str, np.ndarray], list[int]]:
    """Tight boxes of the visible pixels, labels and difficult flags of the objects that
    stay visible (hidden ones are removed from ``owner``); also the kept objects' indices."""
    boxes, labels, difficult, keep = [], [], [], []
    for k, obj in enumerate(placed):
        ix0, iy0, ix1, iy1, _ = _clip_window(obj.x0, obj.y0, obj.mask, h, w)
        sel = owner[iy0:iy1, ix0:ix1] == k
        n_vis = int(np.count_nonzero(sel))
        if n_vis < _MIN_VISIBLE_PIXELS:
            # Hidden behind later objects: unannotatable, so remove from the map.
            owner[iy0:iy1, ix0:ix1][sel] = -1
            continue
        rows = np.flatnonzero(sel.any(axis=1))
        cols = np.flatnonzero(sel.any(axis=0))
        box = [ix0 + cols[0], iy0 + rows[0], ix0 + cols[-1], iy0 + rows[-1]]
        bw, bh = box[2] - box[0] + 1, box[3] - box[1] + 1
        diff = min(bw, bh) < DIFFICULT_MIN_SIDE or n_vis < DIFFICULT_MIN_VISIBLE * obj.full_area
        if variant == "fine":
            lab = obj.cls * len(FINE_FILL_STYLES) + FINE_FILL_STYLES.index(FILL_STYLES[obj.style])
        else:
            lab = obj.cls
        boxes.append(box)
        labels.append(lab)
        difficult.append(diff)
        keep.append(k)
    objects = {"bbox": np.asarray(boxes, np.int32).reshape(-1, 4),
               "label": np.asarray(labels, np.int64), "difficult": np.asarray(difficult, bool)}
    return objects, keep


class ShapesSource:
    """In-memory random-access source (no files, no TFDS): ``src[i]`` renders
    ``generate(variant, split, i, seed)`` on demand.

    Has ``__len__`` and ``__getitem__`` (ints, negative ints allowed), so it
    works as a grain ``RandomAccessDataSource``; it is picklable (holds only
    its arguments), so grain worker processes can use it too. Items are the
    same dicts as from the TFDS files (no ``"mask"``).
    """

    def __init__(self, variant: str, split: str, size: int, seed: int = 0):
        _check_variant(variant)
        if split not in _SPLIT_ID:
            raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
        self.variant, self.split, self.size, self.seed = variant, split, int(size), int(seed)

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, i: int) -> dict[str, Any]:
        i = int(i)
        if i < 0:
            i += self.size
        if not 0 <= i < self.size:
            raise IndexError(f"index {i} out of range for size {self.size}")
        return generate(self.variant, self.split, i, self.seed)

    def __repr__(self) -> str:
        return f"ShapesSource({self.variant!r}, {self.split!r}, size={self.size}, seed={self.seed})"


def main_object_scales(variant: str, split: str, n: int, seed: int = 0) -> np.ndarray:
    """(n,) float: for images 0..n-1 of a split, the first (in a classification variant,
    the dominant) object's longer box side over the image's shorter side.  The objects'
    size at any test scale: at shorter side s the box spans about ``s * scale`` pixels.
    (Regenerates the images: ~2.5 ms each.)"""
    out = np.empty(n)
    for i in range(n):
        ex = generate(variant, split, i, seed)
        x1, y1, x2, y2 = ex["objects"]["bbox"][0]
        out[i] = max(x2 - x1 + 1, y2 - y1 + 1) / min(ex["image"].shape[:2])
    return out


def render_speed(variant: str = "detection", n: int = 50, short_side: int | None = 300) -> float:
    """Mean wall time in ms to render one sample (a quick benchmark).

    With ``short_side`` set, only samples whose shorter side is within 10 % of
    it are timed (indices are scanned until ``n`` such samples are found).
    """
    times, i = [], 0
    while len(times) < n and i < 100 * n:
        rng = _rng_for(variant, "train", i, 0)
        h, w = _image_size(rng)
        i += 1
        if short_side is not None and abs(min(h, w) - short_side) > 0.1 * short_side:
            continue
        t0 = time.perf_counter()
        generate(variant, "train", i - 1)
        times.append(time.perf_counter() - t0)
    return 1000.0 * float(np.mean(times))
