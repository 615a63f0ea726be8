"""Procedural visual relations ("VisRel" families): episodes, splits and the VisRel folder writer.

An *episode* is one exemplar pair (A -> A_out) and one query pair (B -> B_out) of the same task.
Every family draws its task parameters (noise level, mask colour, which colour is "mine", rotation
direction, ...) ONCE per episode and applies them identically to both pairs; A and B are drawn
independently (for "objects like mine" families B is constrained to contain such an object), so the
exemplar is needed to know the task. All panels are float32 ``HxWx3`` arrays in [0, 1].

Public API::

    FAMILIES: dict[str, Family]          # 31 families, 4 categories (see CATEGORIES)
    SPLITS: {"train": [...], "heldout": [...]}   # fixed; >= 3 held-out families per category
    sample_episode(family, seed, size=32) -> Episode   # deterministic per (family, seed, size)
    mask_from_output(image) -> bool HxW  # for output_kind == "mask" families
    write_visrel_folder(root, families, episodes_per_family, size, seed)

Seed convention: seeds ``< EVAL_SEED_START`` (= 10**6) are training seeds; seeds
``>= EVAL_SEED_START`` are evaluation seeds and must never be produced by training iterators (use
:func:`train_seed` / :func:`eval_seed` to map an index to a seed). Held-out *families* are never
trained on at all, whatever the seed.

Mask outputs are rendered as the episode's mask colour (a saturated colour from
:data:`MASK_COLORS`, every one with max channel 1) on black; :func:`mask_from_output` thresholds
the max channel at 0.5.
"""

from __future__ import annotations

import json
import os
import tempfile
import zlib
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Iterable

import numpy as np
from scipy import fft as _fft
from scipy import ndimage as _ndi

from pico_jax.data import scenes as S
from pico_jax.data.scenes import COLORS, ObjSpec, Scene

__all__ = [
    "CATEGORIES",
    "MASK_COLORS",
    "EVAL_SEED_START",
    "Episode",
    "Family",
    "FAMILIES",
    "SPLITS",
    "sample_episode",
    "mask_from_output",
    "render_mask",
    "train_seed",
    "eval_seed",
    "is_eval_seed",
    "families_in",
    "write_visrel_folder",
]

CATEGORIES: tuple[str, ...] = ("restoration", "geometry", "semantic", "generative")

EVAL_SEED_START = 10**6
"""Seeds >= this are evaluation seeds; training iterators only use seeds in [0, EVAL_SEED_START)."""

MASK_COLORS: dict[str, tuple[float, float, float]] = {
    "white": (1.0, 1.0, 1.0),
    "red": (1.0, 0.15, 0.15),
    "green": (0.15, 1.0, 0.15),
    "yellow": (1.0, 1.0, 0.15),
    "cyan": (0.15, 1.0, 1.0),
    "magenta": (1.0, 0.15, 1.0),
}

Params = dict[str, Any]
PairFn = Callable[[np.random.Generator, int, Params, str], "tuple[np.ndarray, np.ndarray, Scene | None]"]


def train_seed(index: int) -> int:
    """The ``index``-th training seed (wraps inside [0, EVAL_SEED_START))."""
    return int(index) % EVAL_SEED_START


def eval_seed(index: int) -> int:
    """The ``index``-th evaluation seed (>= EVAL_SEED_START)."""
    return EVAL_SEED_START + int(index)


def is_eval_seed(seed: int) -> bool:
    return int(seed) >= EVAL_SEED_START


# ----------------------------------------------------------------------------------------------
# Episode / Family
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class Episode:
    """One in-context episode. ``params``: the task parameters shared by both pairs (JSON-able).
    ``scenes``: the structure of the A and B inputs (:class:`~pico_jax.data.scenes.Scene`, for
    ground-truth checks and evaluation; not part of the VisRel format)."""

    family: str
    seed: int
    size: int
    A: np.ndarray
    A_out: np.ndarray
    B: np.ndarray
    B_out: np.ndarray
    params: Params
    scenes: tuple = field(default=(None, None), compare=False, repr=False)

    def panels(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        return self.A, self.A_out, self.B, self.B_out

    def canvas(self) -> np.ndarray:
        """The 2x2 canvas [[A, A_out], [B, B_out]] (2H x 2W x 3)."""
        return np.concatenate(
            [np.concatenate([self.A, self.A_out], 1), np.concatenate([self.B, self.B_out], 1)], 0
        )


@dataclass(frozen=True)
class Family:
    """A relation family.

    ``sample_params(rng) -> dict`` draws the per-episode task parameters; ``make_pair(rng, size,
    params, role) -> (input, output, input_scene)`` draws one pair under those parameters
    (``role`` is "A" for the exemplar, "B" for the query: some families make the exemplar more
    informative, e.g. two highlighted instances instead of one).
    """

    name: str
    category: str
    output_kind: str  # "image" | "mask"
    label: str
    augment_flip: bool
    sample_params: Callable[[np.random.Generator], Params]
    make_pair: PairFn
    description: str = ""

    def pair(self, rng: np.random.Generator, size: int, params: Params, role: str = "B"):
        inp, out, scene = self.make_pair(rng, size, params, role)
        return _as_img(inp), _as_img(out), scene

    def episode(self, rng: np.random.Generator, size: int, seed: int = -1) -> Episode:
        seeds = rng.integers(0, 2**63 - 1, size=3)
        params = self.sample_params(np.random.default_rng(int(seeds[0])))
        a, a_out, sa = self.pair(np.random.default_rng(int(seeds[1])), size, params, "A")
        b, b_out, sb = self.pair(np.random.default_rng(int(seeds[2])), size, params, "B")
        return Episode(self.name, int(seed), int(size), a, a_out, b, b_out, params, (sa, sb))


FAMILIES: dict[str, Family] = {}


def _family(name: str, category: str, output_kind: str, label: str, augment_flip: bool,
            params: Callable[[np.random.Generator], Params] | None = None):
    assert category in CATEGORIES and output_kind in ("image", "mask")

    def deco(fn: PairFn) -> PairFn:
        FAMILIES[name] = Family(name, category, output_kind, label, augment_flip,
                                params or (lambda rng: {}), fn, (fn.__doc__ or "").strip())
        return fn

    return deco


def _family_rng(family: str, seed: int, size: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([zlib.crc32(family.encode()), int(seed), int(size)]))


def sample_episode(family: str, seed: int, size: int = 32) -> Episode:
    """Deterministic episode of ``family`` for (seed, size)."""
    if family not in FAMILIES:
        raise KeyError(f"unknown family {family!r}; known: {sorted(FAMILIES)}")
    return FAMILIES[family].episode(_family_rng(family, seed, size), size, seed)


def families_in(category: str) -> list[str]:
    return [n for n, f in FAMILIES.items() if f.category == category]


# ----------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------


def _as_img(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float32)
    if x.ndim == 2:
        x = np.repeat(x[..., None], 3, -1)
    return np.ascontiguousarray(np.clip(x, 0.0, 1.0), dtype=np.float32)


def render_mask(mask: np.ndarray, color: str | tuple = "white") -> np.ndarray:
    """Bool HxW -> float32 HxWx3: ``color`` (a :data:`MASK_COLORS` name or RGB) on black."""
    rgb = np.asarray(MASK_COLORS[color] if isinstance(color, str) else color, np.float32)
    return (mask.astype(np.float32)[..., None] * rgb[None, None]).astype(np.float32)


def mask_from_output(image: np.ndarray) -> np.ndarray:
    """Bool HxW mask from a mask-family output (or a model's prediction of one): max channel > 0.5."""
    img = np.asarray(image, np.float32)
    if img.ndim == 2:
        return img > 0.5
    return img.max(-1) > 0.5


def _choice(rng: np.random.Generator, seq, k: int | None = None, replace: bool = False):
    seq = list(seq)
    if k is None:
        return seq[int(rng.integers(len(seq)))]
    idx = rng.choice(len(seq), size=k, replace=replace)
    return [seq[i] for i in idx]


def _p_mask_color(rng: np.random.Generator) -> Params:
    return {"mask_color": _choice(rng, MASK_COLORS)}


def _scale(size: int) -> float:
    return size / 32.0


def _natural(rng: np.random.Generator, size: int, photo_prob: float = 0.5) -> Scene:
    return S.natural_scene(rng, size, photo_prob)


# ==============================================================================================
# Restoration / enhancement: input = degraded, output = clean scene.
# ==============================================================================================


@_family("denoise", "restoration", "image", "remove the noise", True,
         lambda rng: {"sigma": float(rng.uniform(0.06, 0.2)), "color_noise": bool(rng.uniform() < 0.5)})
def _denoise(rng, size, p, role):
    """Additive Gaussian noise of std ``sigma`` (per-channel if ``color_noise`` else gray)."""
    sc = _natural(rng, size)
    shape = (size, size, 3) if p["color_noise"] else (size, size, 1)
    noisy = sc.image + p["sigma"] * rng.standard_normal(shape).astype(np.float32)
    return noisy, sc.image, sc


@_family("deblur", "restoration", "image", "sharpen the blurred image", True,
         lambda rng: {"sigma": float(rng.uniform(0.6, 1.3))})
def _deblur(rng, size, p, role):
    """Gaussian blur of std ``sigma`` * size/32 pixels."""
    sc = _natural(rng, size)
    s = p["sigma"] * _scale(size)
    return _ndi.gaussian_filter(sc.image, (s, s, 0), mode="nearest"), sc.image, sc


@_family("lowlight_enhance", "restoration", "image", "brighten the dark image", True,
         lambda rng: {"gain": float(rng.uniform(0.12, 0.35)), "gamma": float(rng.uniform(1.0, 1.8))})
def _lowlight(rng, size, p, role):
    """Input = gain * clean ** gamma."""
    sc = _natural(rng, size)
    return p["gain"] * sc.image ** p["gamma"], sc.image, sc


HOLE_COLORS = {"black": (0.0, 0.0, 0.0), "white": (1.0, 1.0, 1.0), "gray": (0.5, 0.5, 0.5),
               "magenta": (1.0, 0.0, 1.0), "green": (0.0, 1.0, 0.0)}


@_family("inpaint_hole", "restoration", "image", "fill in the missing region", True,
         lambda rng: {"hole_color": _choice(rng, HOLE_COLORS), "hole_frac": float(rng.uniform(0.22, 0.38)),
                      "hole_shape": _choice(rng, ["square", "circle"])})
def _inpaint(rng, size, p, role):
    """A ``hole_shape`` hole of side ``hole_frac`` * size, painted ``hole_color``, at a random place."""
    sc = _natural(rng, size)
    side = p["hole_frac"] * size
    cy, cx = rng.uniform(side / 2, size - side / 2, 2)
    hole = S.shape_mask("square" if p["hole_shape"] == "square" else "circle", size, (cy, cx),
                        side / (2 * 0.80) if p["hole_shape"] == "square" else side / 2)
    inp = sc.image.copy()
    inp[hole] = HOLE_COLORS[p["hole_color"]]
    return inp, sc.image, sc


def jpeg_like(img: np.ndarray, block: int, q: float) -> np.ndarray:
    """Blockwise orthonormal DCT (``block`` x ``block``) with frequency-weighted quantisation."""
    h, w, c = img.shape
    x = img.reshape(h // block, block, w // block, block, c).transpose(0, 2, 4, 1, 3)
    coef = _fft.dctn(x, axes=(-2, -1), norm="ortho")
    u = np.arange(block)
    step = q * (1.0 + 2.0 * (u[:, None] + u[None, :]) / block)
    coef = np.round(coef / step) * step
    rec = _fft.idctn(coef, axes=(-2, -1), norm="ortho")
    return rec.transpose(0, 3, 1, 4, 2).reshape(h, w, c).astype(np.float32)


@_family("deblock_jpeg", "restoration", "image", "remove the compression artifacts", True,
         lambda rng: {"block": _choice(rng, [4, 8]), "q": float(rng.uniform(0.15, 0.35))})
def _deblock(rng, size, p, role):
    """JPEG-like blocking: ``block`` x ``block`` DCT quantised with base step ``q``."""
    sc = _natural(rng, size, 0.6)
    block = p["block"]
    while size % block:
        block //= 2
    return jpeg_like(sc.image, block, p["q"]), sc.image, sc


def _streaks(rng: np.random.Generator, size: int, angle_deg: float, density: float, length: float) -> np.ndarray:
    """Float HxW streak coverage: thin parallel line segments at ``angle_deg`` from vertical."""
    a = np.deg2rad(angle_deg)
    d = np.array([np.cos(a), np.sin(a)])  # (dy, dx)
    L = length * size
    n = max(1, int(round(density * size * size / L)))  # ~density of the pixels covered
    cov = np.zeros((size, size), np.float32)
    t = np.linspace(0, 1, int(L * 2) + 2)
    for _ in range(n):
        y0, x0 = rng.uniform(-0.3 * size, size, 2)
        ly = rng.uniform(0.6, 1.0) * L
        ys = np.round(y0 + t * ly * d[0]).astype(int)
        xs = np.round(x0 + t * ly * d[1]).astype(int)
        ok = (ys >= 0) & (ys < size) & (xs >= 0) & (xs < size)
        cov[ys[ok], xs[ok]] = 1.0
    return cov


@_family("derain", "restoration", "image", "remove the rain streaks", True,
         lambda rng: {"angle": float(rng.uniform(-35, 35)), "density": float(rng.uniform(0.06, 0.12)),
                      "length": float(rng.uniform(0.2, 0.4)), "alpha": float(rng.uniform(0.5, 0.8)),
                      "tint": [float(v) for v in rng.uniform(0.75, 1.0, 3)]})
def _derain(rng, size, p, role):
    """Parallel bright streaks at ``angle`` degrees from vertical, blended with opacity ``alpha``."""
    sc = _natural(rng, size)
    cov = _streaks(rng, size, p["angle"], p["density"], p["length"])[..., None] * p["alpha"]
    inp = sc.image * (1 - cov) + np.asarray(p["tint"], np.float32) * cov
    return inp, sc.image, sc


@_family("dehaze", "restoration", "image", "remove the haze", True,
         lambda rng: {"airlight": [float(v) for v in np.clip(rng.uniform(0.7, 0.95) + rng.uniform(-0.08, 0.08, 3), 0, 1)],
                      "t_top": float(rng.uniform(0.2, 0.4)), "t_bottom": float(rng.uniform(0.5, 0.8))})
def _dehaze(rng, size, p, role):
    """Input = clean * t + airlight * (1 - t), transmission t linear from ``t_top`` to ``t_bottom``."""
    sc = _natural(rng, size)
    t = np.linspace(p["t_top"], p["t_bottom"], size, dtype=np.float32)[:, None, None]
    return sc.image * t + np.asarray(p["airlight"], np.float32) * (1 - t), sc.image, sc


COLOR_CASTS = {"warm": (1.0, 0.78, 0.5), "cool": (0.55, 0.78, 1.0), "green": (0.7, 1.0, 0.62),
               "magenta": (1.0, 0.62, 0.95)}


def _p_cast(rng) -> Params:
    cast = _choice(rng, COLOR_CASTS)
    return {"cast": cast, "gains": [float(g * rng.uniform(0.93, 1.0)) for g in COLOR_CASTS[cast]]}


@_family("white_balance", "restoration", "image", "correct the colour cast", True, _p_cast)
def _white_balance(rng, size, p, role):
    """Input = clean * per-channel ``gains`` (a warm / cool / green / magenta cast)."""
    sc = _natural(rng, size)
    return sc.image * np.asarray(p["gains"], np.float32), sc.image, sc


# ==============================================================================================
# Physical / geometric estimation
# ==============================================================================================

DEPTH_LEVELS = (1.0, 0.75, 0.5, 0.25)  # front-most object first; background = 0


def _distinct_color_specs(rng, n: int) -> list[ObjSpec]:
    return [ObjSpec(color=c) for c in _choice(rng, COLORS, n)]


@_family("depth_layers", "geometry", "image", "depth order of the layers as gray levels", True,
         lambda rng: {"near_bright": bool(rng.uniform() < 0.5)})
def _depth_layers(rng, size, p, role):
    """Overlapping shapes (each occludes the previous one, so the order is visible); output the
    visible part of the k-th object from the front at gray DEPTH_LEVELS[k], background 0
    (inverted when not ``near_bright``)."""
    n = int(rng.integers(2, 4 if size < 48 else 5))
    sc = S.compose_scene(rng, size, _distinct_color_specs(rng, n), overlap="chain", min_visible=0.45,
                         textures=("flat", "flat", "stripes", "dots"), shuffle=False)
    lab = sc.label_map()
    out = np.zeros((size, size), np.float32)
    for i, o in enumerate(sc.objects):
        out[lab == i] = DEPTH_LEVELS[n - 1 - o.depth]
    if not p["near_bright"]:
        out = 1 - out
    return sc.image, out, sc


@_family("height_map", "geometry", "image", "height of the solids as gray levels", True,
         lambda rng: {"near_bright": bool(rng.uniform() < 0.5)})
def _height_map(rng, size, p, role):
    """Spheres / cylinders; output their visible height above the ground, z / (0.4 * size)."""
    sc = S.solids_scene(rng, size)
    lab = sc.label_map()
    out = np.zeros((size, size), np.float32)
    for i, o in enumerate(sc.objects):
        out[lab == i] = o.height[lab == i] / (0.4 * size)
    out = np.clip(out, 0, 1)
    if not p["near_bright"]:
        out = 1 - out
    return sc.image, out, sc


@_family("surface_normals", "geometry", "image", "surface normal map", False)
def _normals(rng, size, p, role):
    """Spheres / cylinders; output RGB = (n + 1) / 2 (x right, y up, z to viewer); ground (0,0,1)."""
    sc = S.solids_scene(rng, size)
    lab = sc.label_map()
    n = np.zeros((size, size, 3), np.float32)
    n[..., 2] = 1.0
    for i, o in enumerate(sc.objects):
        n[lab == i] = o.normal[lab == i]
    return sc.image, (n + 1) / 2, sc


def object_edges(scene: Scene) -> np.ndarray:
    """Inner boundary pixels of every visible object region (occlusion contours included)."""
    lab = scene.label_map()
    pad = np.pad(lab, 1, mode="edge")
    diff = np.zeros(lab.shape, bool)
    for dy, dx in ((0, 1), (2, 1), (1, 0), (1, 2)):
        diff |= pad[dy:dy + lab.shape[0], dx:dx + lab.shape[1]] != lab
    return diff & (lab >= 0)


@_family("edges", "geometry", "mask", "object contours", True, _p_mask_color)
def _edges(rng, size, p, role):
    """Object contours (not texture edges), 1 px inner boundary, in ``mask_color``."""
    sc = S.compose_scene(rng, size, int(rng.integers(2, 5)), overlap="allow")
    return sc.image, render_mask(object_edges(sc), p["mask_color"]), sc


@_family("flip", "geometry", "image", "mirror the image", True,
         lambda rng: {"axis": _choice(rng, ["horizontal", "vertical"])})
def _flip(rng, size, p, role):
    """Mirror left-right (``horizontal``) or top-bottom (``vertical``)."""
    sc = _natural(rng, size, 0.5)
    out = sc.image[:, ::-1] if p["axis"] == "horizontal" else sc.image[::-1]
    return sc.image, out, sc


@_family("rotate", "geometry", "image", "rotate the image", False,
         lambda rng: {"k": _choice(rng, [1, 2, 3])})
def _rotate(rng, size, p, role):
    """np.rot90 by ``k`` quarter turns counter-clockwise (k=3: 90 degrees clockwise)."""
    sc = _natural(rng, size, 0.5)
    return sc.image, np.rot90(sc.image, p["k"]), sc


QUADRANTS = ("top_left", "top_right", "bottom_left", "bottom_right")


@_family("zoom_quadrant", "geometry", "image", "zoom into one quadrant", False,
         lambda rng: {"quadrant": _choice(rng, QUADRANTS)})
def _zoom(rng, size, p, role):
    """Output = the ``quadrant`` of the input enlarged 2x (pixel repetition)."""
    sc = _natural(rng, size, 0.8)
    h = size // 2
    qy, qx = divmod(QUADRANTS.index(p["quadrant"]), 2)
    crop = sc.image[qy * h:(qy + 1) * h, qx * h:(qx + 1) * h]
    return sc.image, np.repeat(np.repeat(crop, 2, 0), 2, 1), sc


# ==============================================================================================
# Semantic perception
# ==============================================================================================

SEG_TEXTURES = ("flat", "stripes", "checker", "dots")


def _attr_scene(rng, size, attr: str, value: str, role: str, pools: dict[str, tuple]) -> Scene:
    """Objects with ``attr == value`` (targets) and distractors without it. The exemplar (role A)
    gets two targets that differ in every other attribute and distractors that reuse the targets'
    other attributes, so only ``attr`` explains the highlighted set."""
    others = [a for a in ("shape", "color", "texture") if a != attr]
    n_t = 2 if role == "A" else int(rng.integers(1, 3))
    n_d = int(rng.integers(1, 3)) if n_t == 2 else 2
    targets = []
    vals = {a: _choice(rng, pools[a], n_t) for a in others}  # distinct other attributes
    for i in range(n_t):
        targets.append(ObjSpec(**{attr: value, others[0]: vals[others[0]][i], others[1]: vals[others[1]][i]}))
    distract = []
    notv = [v for v in pools[attr] if v != value]
    for _ in range(n_d):
        kw = {attr: _choice(rng, notv)}
        for a in others:  # reuse a target's attribute half of the time
            kw[a] = _choice(rng, vals[a]) if rng.uniform() < 0.6 else _choice(rng, pools[a])
        distract.append(ObjSpec(**kw))
    return S.compose_scene(rng, size, targets + distract, overlap="avoid")


def _attr_mask(sc: Scene, attr: str, value: str) -> np.ndarray:
    vis = sc.visible_masks()
    m = np.zeros((sc.size, sc.size), bool)
    for o, v in zip(sc.objects, vis):
        if getattr(o, attr) == value:
            m |= v
    return m


_POOLS = {"shape": ("circle", "square", "triangle", "star", "cross", "ring"), "color": tuple(COLORS),
          "texture": SEG_TEXTURES}


@_family("segment_color", "semantic", "mask", "segment the objects of the highlighted colour", True,
         lambda rng: {"color": _choice(rng, COLORS), **_p_mask_color(rng)})
def _seg_color(rng, size, p, role):
    """Mask every object whose colour is ``color``."""
    sc = _attr_scene(rng, size, "color", p["color"], role, _POOLS)
    return sc.image, render_mask(_attr_mask(sc, "color", p["color"]), p["mask_color"]), sc


@_family("segment_shape", "semantic", "mask", "segment the objects of the highlighted shape", True,
         lambda rng: {"shape": _choice(rng, _POOLS["shape"]), **_p_mask_color(rng)})
def _seg_shape(rng, size, p, role):
    """Mask every object whose shape is ``shape``."""
    sc = _attr_scene(rng, size, "shape", p["shape"], role, _POOLS)
    return sc.image, render_mask(_attr_mask(sc, "shape", p["shape"]), p["mask_color"]), sc


@_family("segment_texture", "semantic", "mask", "segment the objects of the highlighted texture", True,
         lambda rng: {"texture": _choice(rng, SEG_TEXTURES), **_p_mask_color(rng)})
def _seg_texture(rng, size, p, role):
    """Mask every object whose texture is ``texture``."""
    sc = _attr_scene(rng, size, "texture", p["texture"], role, _POOLS)
    return sc.image, render_mask(_attr_mask(sc, "texture", p["texture"]), p["mask_color"]), sc


@_family("foreground_mask", "semantic", "mask", "segment all objects", True, _p_mask_color)
def _foreground(rng, size, p, role):
    """Mask of all objects (union of visible object pixels) on a textured background."""
    sc = S.compose_scene(rng, size, int(rng.integers(1, 5)), overlap="allow",
                         background=_choice(rng, ["texture", "gradient", "radial"]))
    return sc.image, render_mask(sc.foreground_mask(), p["mask_color"]), sc


def _box_outline(size: int, box: tuple[int, int, int, int], t: int) -> np.ndarray:
    y0, x0, y1, x1 = box
    y0, x0, y1, x1 = max(0, y0 - t), max(0, x0 - t), min(size - 1, y1 + t), min(size - 1, x1 + t)
    m = np.zeros((size, size), bool)
    m[y0:y1 + 1, x0:x1 + 1] = True
    m[y0 + t:y1 + 1 - t, x0 + t:x1 + 1 - t] = False
    return m


@_family("bounding_boxes", "semantic", "image", "draw a box around each object", True,
         lambda rng: {"box_color": _choice(rng, MASK_COLORS)})
def _bboxes(rng, size, p, role):
    """Input with a ``box_color`` rectangle outline just outside each object's bounding box."""
    t = max(1, size // 32)
    n = int(rng.integers(1, 4))
    for _ in range(50):  # redraw until every box lies inside the canvas and off every object
        sc = S.compose_scene(rng, size, n, overlap="avoid", radius=(0.12 * size, 0.18 * size))
        boxes = np.zeros((size, size), bool)
        for i in range(n):
            y0, x0, y1, x1 = sc.bbox(i)
            if min(y0, x0) < t or max(y1, x1) > size - 1 - t:
                break
            boxes |= _box_outline(size, (y0, x0, y1, x1), t)
        else:
            if not (boxes & sc.foreground_mask()).any():
                break
    out = sc.image.copy()
    out[boxes] = MASK_COLORS[p["box_color"]]
    return sc.image, out, sc


def count_dots_mask(n: int, size: int) -> np.ndarray:
    """n dots in a centred horizontal row (the ``count_dots`` output layout)."""
    yy, xx = np.meshgrid(np.arange(size) + 0.5, np.arange(size) + 0.5, indexing="ij")
    sp, r = size / 5.2, 0.05 * size + 0.3
    m = np.zeros((size, size), bool)
    for k in range(n):
        cx = size / 2 + (k - (n - 1) / 2) * sp
        m |= (yy - size / 2) ** 2 + (xx - cx) ** 2 <= r * r
    return m


@_family("count_dots", "semantic", "mask", "count the objects as dots", True, _p_mask_color)
def _count(rng, size, p, role):
    """1-5 separate objects; output that many dots in a row (``count_dots_mask``)."""
    n = int(rng.integers(1, 6))
    sc = S.compose_scene(rng, size, n, overlap="avoid", radius=(0.1 * size, 0.15 * size))
    return sc.image, render_mask(count_dots_mask(n, size), p["mask_color"]), sc


def centroid_mask(scene: Scene) -> np.ndarray:
    """A small square (3 px at 32, 5 px at 64) at the centroid of each object's visible region."""
    size = scene.size
    h = max(1, int(round(size / 24)))
    m = np.zeros((size, size), bool)
    for v in scene.visible_masks():
        ys, xs = np.nonzero(v)
        if len(ys) == 0:
            continue
        cy, cx = int(round(ys.mean())), int(round(xs.mean()))
        m[max(0, cy - h):cy + h + 1, max(0, cx - h):cx + h + 1] = True
    return m


@_family("centroid_dots", "semantic", "mask", "mark the centre of each object", True, _p_mask_color)
def _centroids(rng, size, p, role):
    """A dot at the centroid of each (separate) object."""
    sc = S.compose_scene(rng, size, int(rng.integers(1, 5)), overlap="avoid")
    return sc.image, render_mask(centroid_mask(sc), p["mask_color"]), sc


def _p_classmap(rng) -> Params:
    shapes = _choice(rng, _POOLS["shape"], 3)
    colors = _choice(rng, COLORS, 3)
    return {"classes": dict(zip(shapes, colors))}


@_family("shape_classmap", "semantic", "image", "paint each object by its shape class", True, _p_classmap)
def _classmap(rng, size, p, role):
    """Black canvas; each object filled with the colour its shape maps to in ``classes``
    (the exemplar shows all three shapes; the query uses a subset)."""
    shapes = list(p["classes"])
    if role == "A":
        specs = [ObjSpec(shape=s) for s in shapes]
    else:
        specs = [ObjSpec(shape=s) for s in _choice(rng, shapes, int(rng.integers(2, 4)), replace=True)]
    sc = S.compose_scene(rng, size, specs, overlap="avoid")
    out = np.zeros((size, size, 3), np.float32)
    for o, v in zip(sc.objects, sc.visible_masks()):
        out[v] = COLORS[p["classes"][o.shape]]
    return sc.image, out, sc


# ==============================================================================================
# Generative manipulation
# ==============================================================================================


def _with(o: S.SceneObject, **kw) -> S.SceneObject:
    return replace(o, **kw)


@_family("recolor", "generative", "image", "recolour the objects of one colour", True,
         lambda rng: dict(zip(("src", "dst"), _choice(rng, COLORS, 2))))
def _recolor(rng, size, p, role):
    """Objects of colour ``src`` become ``dst`` (texture and shape kept); others unchanged."""
    others = [c for c in COLORS if c not in (p["src"], p["dst"])]
    n_src = 2 if role == "A" else int(rng.integers(1, 3))
    specs = [ObjSpec(color=p["src"]) for _ in range(n_src)]
    specs += [ObjSpec(color=_choice(rng, others)) for _ in range(int(rng.integers(1, 3)))]
    sc = S.compose_scene(rng, size, specs, overlap="allow")
    objs = [_with(o, color=p["dst"], rgb=COLORS[p["dst"]]) if o.color == p["src"] else o for o in sc.objects]
    return sc.image, sc.render(objs), sc


@_family("remove_object", "generative", "image", "remove the objects of one colour", True,
         lambda rng: {"color": _choice(rng, COLORS)})
def _remove(rng, size, p, role):
    """Objects of colour ``color`` disappear (what they hid is revealed)."""
    others = [c for c in COLORS if c != p["color"]]
    specs = [ObjSpec(color=p["color"]) for _ in range(int(rng.integers(1, 3)))]
    specs += [ObjSpec(color=_choice(rng, others)) for _ in range(int(rng.integers(1, 3)))]
    sc = S.compose_scene(rng, size, specs, overlap="allow")
    return sc.image, sc.render([o for o in sc.objects if o.color != p["color"]]), sc


def _p_add(rng) -> Params:
    return {"shape": _choice(rng, S.SHAPES), "color": _choice(rng, COLORS),
            "texture": _choice(rng, SEG_TEXTURES), "corner": _choice(rng, QUADRANTS)}


@_family("add_object", "generative", "image", "add an object", False, _p_add)
def _add(rng, size, p, role):
    """Paint a ``shape``/``color``/``texture`` object (radius 0.17*size) on top, centred in ``corner``."""
    sc = S.compose_scene(rng, size, int(rng.integers(1, 4)), overlap="allow",
                         colors=tuple(c for c in COLORS if c != p["color"]))
    qy, qx = divmod(QUADRANTS.index(p["corner"]), 2)
    c = ((0.25 + 0.5 * qy) * size, (0.25 + 0.5 * qx) * size)
    r = 0.17 * size
    pat = S.texture_pattern(p["texture"], size, np.random.default_rng(0))  # same texture phase always
    new = S.SceneObject(p["shape"], p["color"], COLORS[p["color"]], p["texture"], c, r, 0.0,
                        S.shape_mask(p["shape"], size, c, r, 0.0), pat, len(sc.objects))
    return sc.image, sc.render(sc.objects + [new]), sc


SHADOW_DIRS = {"right": (0, 1), "left": (0, -1), "down": (1, 0), "up": (-1, 0),
               "down_right": (1, 1), "down_left": (1, -1), "up_right": (-1, 1), "up_left": (-1, -1)}


@_family("drop_shadow", "generative", "image", "add drop shadows", False,
         lambda rng: {"direction": _choice(rng, SHADOW_DIRS), "darkness": float(rng.uniform(0.35, 0.6))})
def _shadow(rng, size, p, role):
    """Each object casts a hard shadow offset 0.08*size towards ``direction``, darkening the
    background by ``darkness``."""
    sc = S.compose_scene(rng, size, int(rng.integers(1, 4)), overlap="avoid",
                         background=_choice(rng, ["flat", "gradient", "radial"]))
    dy, dx = SHADOW_DIRS[p["direction"]]
    off = max(1, int(round(0.08 * size)))
    fg = np.zeros((size, size), bool)
    for o in sc.objects:
        fg |= o.mask
    sh = np.zeros_like(fg)
    ys, xs = np.nonzero(fg)
    ys2, xs2 = ys + dy * off, xs + dx * off
    ok = (ys2 >= 0) & (ys2 < size) & (xs2 >= 0) & (xs2 < size)
    sh[ys2[ok], xs2[ok]] = True
    bg = sc.background.copy()
    bg[sh] *= 1 - p["darkness"]
    return sc.image, sc.render(background=bg), sc


@_family("posterize", "generative", "image", "posterize the colours", True,
         lambda rng: {"levels": _choice(rng, [2, 3, 4])})
def _posterize(rng, size, p, role):
    """Natural photo; each channel quantised to ``levels`` values: round(x * (L-1)) / (L-1)."""
    sc = S.photo_scene(rng, size)
    L = p["levels"] - 1
    return sc.image, np.round(sc.image * L) / L, sc


CHANNEL_PERMS = ((0, 2, 1), (1, 0, 2), (1, 2, 0), (2, 0, 1), (2, 1, 0))


@_family("channel_swap", "generative", "image", "swap the colour channels", True,
         lambda rng: {"perm": list(_choice(rng, CHANNEL_PERMS))})
def _channel_swap(rng, size, p, role):
    """Output = input[..., perm] (a palette swap)."""
    sc = _natural(rng, size, 0.6)
    return sc.image, sc.image[..., p["perm"]], sc


@_family("colorize", "generative", "image", "colorize the grayscale image", True)
def _colorize(rng, size, p, role):
    """Input = Rec.601 luma of a natural photo (fractal fallback without photos); output = colour."""
    sc = S.photo_scene(rng, size)
    return S.to_gray(sc.image), sc.image, sc


@_family("flatten_texture", "generative", "image", "remove one kind of texture", True,
         lambda rng: {"texture": _choice(rng, ("stripes", "checker", "dots", "noise"))})
def _flatten(rng, size, p, role):
    """Objects with texture ``texture`` become flat-coloured; other objects unchanged."""
    others = [t for t in S.TEXTURES if t not in ("flat", p["texture"])]
    n_t = 2 if role == "A" else int(rng.integers(1, 3))
    specs = [ObjSpec(texture=p["texture"]) for _ in range(n_t)]
    specs += [ObjSpec(texture=_choice(rng, others)) for _ in range(int(rng.integers(1, 3)))]
    sc = S.compose_scene(rng, size, specs, overlap="avoid")
    flat = np.zeros((size, size), np.float32)
    objs = [_with(o, texture="flat", pattern=flat) if o.texture == p["texture"] else o for o in sc.objects]
    return sc.image, sc.render(objs), sc


# ----------------------------------------------------------------------------------------------
# Splits
# ----------------------------------------------------------------------------------------------

HELDOUT: tuple[str, ...] = (
    # restoration
    "deblock_jpeg", "dehaze", "white_balance",
    # geometry
    "height_map", "rotate", "zoom_quadrant",
    # semantic
    "segment_texture", "centroid_dots", "bounding_boxes",
    # generative
    "remove_object", "channel_swap", "flatten_texture",
)
"""Held-out families: each has a trained sibling (deblur/denoise, depth_layers/surface_normals,
flip, segment_color/shape, count_dots, recolor, posterize ...) but a task never seen in training."""

SPLITS: dict[str, list[str]] = {
    "train": [n for n in FAMILIES if n not in HELDOUT],
    "heldout": list(HELDOUT),
}


# ----------------------------------------------------------------------------------------------
# VisRel folder writer
# ----------------------------------------------------------------------------------------------


def _to_uint8(img: np.ndarray) -> np.ndarray:
    return (np.clip(img, 0, 1) * 255.0 + 0.5).astype(np.uint8)


def _atomic_write_bytes(path: str, data: bytes) -> None:
    d = os.path.dirname(path)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=d)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _atomic_write_png(path: str, img: np.ndarray) -> None:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(_to_uint8(img)).save(buf, format="PNG")
    _atomic_write_bytes(path, buf.getvalue())


def write_visrel_folder(root: str, families: Iterable[str] | None = None, episodes_per_family: int = 100,
                        size: int = 32, seed: int = 0, id_width: int = 6) -> dict[str, int]:
    """Write episodes in the VisRel folder format::

        root/<family>/task.json   {"label", "category", "output_kind", "augment_flip"}
        root/<family>/quads/<id>.A.png, <id>.A_out.png, <id>.B.png, <id>.B_out.png

    Episode ``i`` of a family is ``sample_episode(family, seed + i, size)`` and gets
    ``<id> = str(i).zfill(id_width)``. Use ``seed >= EVAL_SEED_START`` for evaluation sets. Every
    file is written to a temporary name and renamed into place. No ``pairs/`` folder is written
    (episodes carry per-episode task parameters, so two pairs of different episodes need not share
    a task). Returns {family: episodes written}.
    """
    families = list(FAMILIES) if families is None else list(families)
    written = {}
    for name in families:
        fam = FAMILIES[name]
        tdir = os.path.join(root, name)
        qdir = os.path.join(tdir, "quads")
        os.makedirs(qdir, exist_ok=True)
        meta = {"label": fam.label, "category": fam.category, "output_kind": fam.output_kind,
                "augment_flip": bool(fam.augment_flip)}
        _atomic_write_bytes(os.path.join(tdir, "task.json"), (json.dumps(meta, indent=2) + "\n").encode())
        for i in range(episodes_per_family):
            ep = sample_episode(name, seed + i, size)
            eid = str(i).zfill(id_width)
            for key, img in zip(("A", "A_out", "B", "B_out"), ep.panels()):
                _atomic_write_png(os.path.join(qdir, f"{eid}.{key}.png"), img)
        written[name] = episodes_per_family
    return written
