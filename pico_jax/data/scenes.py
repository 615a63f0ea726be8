"""Procedural scenes with exact structure, for the project's generated visual relations.

Every generator takes a ``numpy.random.Generator`` and a panel ``size`` and returns a
:class:`Scene`: the rendered float32 ``HxWx3`` image in [0, 1] *and* its structure (background
image, the objects in paint order with their full silhouettes, colours, shapes, textures, depth,
per-pixel texture patterns, and for shaded solids heights and surface normals). Relations compute
their ground truth from this structure, and can re-render a modified scene (``Scene.render``)
to get exact manipulation targets (recolour, remove, flatten textures, ...).

Generators (all pure numpy and deterministic given the generator's state):

* :func:`compose_scene`  - flat 2-D shapes (:data:`SHAPES`) in palette colours (:data:`COLORS`)
  with textures (:data:`TEXTURES`) on a background (:data:`BACKGROUNDS`), layered back to front.
* :func:`solids_scene`   - Lambert-shaded spheres and cylinders, z-buffered, with exact heights
  and unit surface normals.
* :func:`photo_scene`    - random crop/resize of one of the natural photographs that ship inside
  the scikit-image wheel (``skimage/data/*.png|jpg``, read with PIL - nothing is downloaded).
  When scikit-image is not installed it falls back to :func:`fractal_scene` (coloured fBm noise);
  :func:`natural_photos_available` tells which one you get.
* :func:`fractal_scene`  - smooth multi-octave colour noise with a few shapes: "natural-ish" clutter.

Coordinates: row ``y`` grows downwards, column ``x`` to the right; pixel centres are at ``i+0.5``.
"""

from __future__ import annotations

import colorsys
import functools
import importlib.util
import os
from dataclasses import dataclass, field, replace

import numpy as np

__all__ = [
    "COLORS",
    "SHAPES",
    "TEXTURES",
    "BACKGROUNDS",
    "PHOTO_NAMES",
    "SceneObject",
    "Scene",
    "ObjSpec",
    "shape_mask",
    "texture_pattern",
    "make_background",
    "compose_scene",
    "solids_scene",
    "photo_scene",
    "fractal_scene",
    "natural_scene",
    "natural_photos_available",
    "smooth_noise",
    "to_gray",
]

# Saturated, well separated object colours (name -> RGB). Backgrounds are kept muted
# (low saturation, mid/low value) so these always stand out.
COLORS: dict[str, tuple[float, float, float]] = {
    "red": (0.90, 0.12, 0.10),
    "green": (0.10, 0.75, 0.20),
    "blue": (0.15, 0.35, 0.95),
    "yellow": (0.97, 0.87, 0.10),
    "magenta": (0.90, 0.20, 0.85),
    "cyan": (0.10, 0.85, 0.90),
    "orange": (1.00, 0.55, 0.05),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "ring", "cross")
TEXTURES: tuple[str, ...] = ("flat", "stripes", "checker", "dots", "noise")
BACKGROUNDS: tuple[str, ...] = ("flat", "gradient", "radial", "texture")

# How dark the "ink" of a texture is: pixel = rgb * (1 - TEXTURE_CONTRAST * pattern).
TEXTURE_CONTRAST = 0.55

# Colour photographs shipped in the scikit-image wheel (file names under skimage/data/).
PHOTO_NAMES: tuple[str, ...] = (
    "astronaut.png",
    "chelsea.png",
    "coffee.png",
    "rocket.jpg",
    "motorcycle_left.png",
    "ihc.png",
)
_PHOTO_MAX_SIDE = 256  # photos are cached downsized to this longest side


# ----------------------------------------------------------------------------------------------
# Structure
# ----------------------------------------------------------------------------------------------


@dataclass
class SceneObject:
    """One object of a scene.

    ``mask`` is the object's full (un-occluded) silhouette; what is visible depends on the
    objects in front of it (see :meth:`Scene.visible_masks`). ``depth`` is the paint order
    (0 = backmost). ``pattern`` is the texture ink in [0, 1] over the whole canvas (only read
    inside ``mask``); ``shade`` multiplies the colour (Lambert shading of solids, else None).
    Solids also carry ``height`` (z above the ground plane, pixels; only valid inside ``mask``)
    and ``normal`` (HxWx3 unit normals, x right, y up, z towards the viewer).
    """

    shape: str
    color: str
    rgb: tuple[float, float, float]
    texture: str
    center: tuple[float, float]  # (y, x) in pixels
    radius: float
    angle: float
    mask: np.ndarray
    pattern: np.ndarray
    depth: int = 0
    shade: np.ndarray | None = None
    height: np.ndarray | None = None
    normal: np.ndarray | None = None

    def appearance(self) -> np.ndarray:
        """HxWx3 colour of the object where it is painted (valid inside ``mask``)."""
        col = np.asarray(self.rgb, np.float32)[None, None, :] * (
            1.0 - TEXTURE_CONTRAST * self.pattern[..., None]
        )
        if self.shade is not None:
            col = col * self.shade[..., None]
        return col.astype(np.float32)


@dataclass
class Scene:
    """A rendered scene and its structure. ``image``: float32 HxWx3 in [0, 1]."""

    image: np.ndarray
    background: np.ndarray
    objects: list[SceneObject] = field(default_factory=list)
    kind: str = "shapes"  # "shapes" | "solids" | "photo" | "fractal"
    zbuffer: bool = False  # solids: visibility by height instead of paint order
    meta: dict = field(default_factory=dict)

    @property
    def size(self) -> int:
        return int(self.image.shape[0])

    def label_map(self) -> np.ndarray:
        """int HxW: index (into ``objects``) of the visible object at each pixel, -1 for background."""
        h, w = self.image.shape[:2]
        lab = np.full((h, w), -1, np.int32)
        if self.zbuffer:
            best = np.full((h, w), -np.inf, np.float32)
            for i, o in enumerate(self.objects):
                z = np.where(o.mask, o.height, -np.inf)
                upd = z > best
                lab[upd] = i
                best = np.maximum(best, z)
        else:
            for i in sorted(range(len(self.objects)), key=lambda j: self.objects[j].depth):
                lab[self.objects[i].mask] = i
        return lab

    def visible_masks(self) -> list[np.ndarray]:
        lab = self.label_map()
        return [lab == i for i in range(len(self.objects))]

    def foreground_mask(self) -> np.ndarray:
        return self.label_map() >= 0

    def bbox(self, i: int, visible: bool = True) -> tuple[int, int, int, int] | None:
        """(y0, x0, y1, x1) inclusive pixel box of object ``i`` (visible part by default)."""
        m = self.visible_masks()[i] if visible else self.objects[i].mask
        ys, xs = np.nonzero(m)
        if len(ys) == 0:
            return None
        return int(ys.min()), int(xs.min()), int(ys.max()), int(xs.max())

    def render(self, objects: list[SceneObject] | None = None, background: np.ndarray | None = None) -> np.ndarray:
        """Re-render with (possibly modified) objects / background. Same rules as the original."""
        objs = self.objects if objects is None else objects
        bg = self.background if background is None else background
        tmp = Scene(image=bg, background=bg, objects=objs, kind=self.kind, zbuffer=self.zbuffer)
        return _paint(bg, objs, tmp.label_map())

    def with_objects(self, objects: list[SceneObject]) -> "Scene":
        """A new scene with these objects (re-rendered)."""
        new = replace(self, objects=list(objects))
        new.image = new.render()
        return new


@dataclass(frozen=True)
class ObjSpec:
    """Constraints for one object of :func:`compose_scene`; ``None`` fields are drawn at random."""

    shape: str | None = None
    color: str | None = None
    texture: str | None = None


def _paint(bg: np.ndarray, objects: list[SceneObject], lab: np.ndarray) -> np.ndarray:
    img = bg.astype(np.float32).copy()
    for i, o in enumerate(objects):
        sel = lab == i
        if sel.any():
            img[sel] = o.appearance()[sel]
    return np.clip(img, 0.0, 1.0).astype(np.float32)


# ----------------------------------------------------------------------------------------------
# Primitives
# ----------------------------------------------------------------------------------------------


def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    c = np.arange(size, dtype=np.float32) + 0.5
    return np.meshgrid(c, c, indexing="ij")  # yy, xx


def _poly_mask(yy: np.ndarray, xx: np.ndarray, verts: np.ndarray) -> np.ndarray:
    """Even-odd point-in-polygon test, vectorised over pixels. verts: (N, 2) as (x, y)."""
    inside = np.zeros(yy.shape, bool)
    n = len(verts)
    for k in range(n):
        x1, y1 = verts[k]
        x2, y2 = verts[(k + 1) % n]
        cond = (y1 > yy) != (y2 > yy)
        with np.errstate(divide="ignore", invalid="ignore"):
            xint = (x2 - x1) * (yy - y1) / (y2 - y1 + 1e-12) + x1
        inside ^= cond & (xx < xint)
    return inside


def shape_mask(shape: str, size: int, center: tuple[float, float], radius: float, angle: float = 0.0) -> np.ndarray:
    """Boolean HxW silhouette of ``shape`` with circumradius ``radius`` rotated by ``angle`` (rad)."""
    yy, xx = _grid(size)
    cy, cx = center
    dy, dx = yy - cy, xx - cx
    d = np.sqrt(dx * dx + dy * dy)
    ca, sa = np.cos(angle), np.sin(angle)
    u = ca * dx + sa * dy  # rotated coordinates
    v = -sa * dx + ca * dy
    r = radius
    if shape == "circle":
        return d <= r
    if shape == "ring":
        return (d <= r) & (d >= 0.52 * r)
    if shape == "square":
        s = 0.80 * r
        return (np.abs(u) <= s) & (np.abs(v) <= s)
    if shape == "cross":
        t = 0.34 * r
        s = 0.95 * r
        return ((np.abs(u) <= t) & (np.abs(v) <= s)) | ((np.abs(v) <= t) & (np.abs(u) <= s))
    if shape == "triangle":
        a = angle - np.pi / 2 + np.arange(3) * 2 * np.pi / 3  # one vertex up at angle 0
        rr = 1.1 * r
        verts = np.stack([cx + rr * np.cos(a), cy + rr * np.sin(a) + 0.25 * r], -1)
        return _poly_mask(yy, xx, verts)
    if shape == "star":
        k = np.arange(10)
        a = angle - np.pi / 2 + k * np.pi / 5
        rad = np.where(k % 2 == 0, 1.12 * r, 0.48 * r)
        verts = np.stack([cx + rad * np.cos(a), cy + rad * np.sin(a) + 0.1 * r], -1)
        return _poly_mask(yy, xx, verts)
    raise ValueError(f"unknown shape {shape!r}")


def texture_pattern(texture: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """Texture ink in [0, 1] over a ``size`` canvas; scale adapts to ``size``."""
    yy, xx = _grid(size)
    if texture == "flat":
        return np.zeros((size, size), np.float32)
    if texture == "stripes":
        period = max(3.0, size / 9.0)
        a = rng.choice([0.0, 45.0, 90.0, 135.0]) * np.pi / 180 + rng.uniform(-0.15, 0.15)
        t = xx * np.cos(a) + yy * np.sin(a) + rng.uniform(0, period)
        return ((t % period) < period / 2).astype(np.float32)
    if texture == "checker":
        cell = max(2, int(round(size / 11)))
        oy, ox = rng.integers(0, cell, 2)
        return ((((yy.astype(int) + oy) // cell) + ((xx.astype(int) + ox) // cell)) % 2).astype(np.float32)
    if texture == "dots":
        sp = max(5.0, size / 6.4)
        oy, ox = rng.uniform(0, sp, 2)
        fy = ((yy + oy) % sp) - sp / 2
        fx = ((xx + ox) % sp) - sp / 2
        return (fy * fy + fx * fx <= (0.22 * sp) ** 2 + 0.3).astype(np.float32)
    if texture == "noise":
        cell = 1 if size < 48 else 2
        n = rng.uniform(0, 1, (size // cell + 1, size // cell + 1)).astype(np.float32)
        n = np.repeat(np.repeat(n, cell, 0), cell, 1)[:size, :size]
        return (n > 0.5).astype(np.float32) * 0.85 + 0.15 * n
    raise ValueError(f"unknown texture {texture!r}")


def _upsample_bilinear(grid: np.ndarray, size: int) -> np.ndarray:
    """Bilinear upsampling of a small (g, g[, c]) grid to (size, size[, c]), pure numpy."""
    g = grid.shape[0]
    pos = (np.arange(size) + 0.5) / size * (g - 1)
    i0 = np.clip(np.floor(pos).astype(int), 0, g - 2)
    f = (pos - i0).astype(np.float32)
    extra = (1,) * (grid.ndim - 2)
    fr = f.reshape((size, 1) + extra)
    fc = f.reshape((1, size) + extra)
    rows = grid[i0] * (1 - fr) + grid[i0 + 1] * fr
    cols = rows[:, i0] * (1 - fc) + rows[:, i0 + 1] * fc
    return cols.astype(np.float32)


def smooth_noise(rng: np.random.Generator, size: int, cells: int = 4, channels: int | None = None, octaves: int = 1) -> np.ndarray:
    """Smooth value noise in [0, 1] (bilinear lattice noise, optionally fractal)."""
    out = 0.0
    amp, tot = 1.0, 0.0
    for o in range(octaves):
        g = cells * (2**o) + 1
        shape = (g, g) if channels is None else (g, g, channels)
        out = out + amp * _upsample_bilinear(rng.uniform(0, 1, shape).astype(np.float32), size)
        tot += amp
        amp *= 0.5
    out = out / tot
    lo, hi = out.min(), out.max()
    return ((out - lo) / max(hi - lo, 1e-6)).astype(np.float32)


def _muted_color(rng: np.random.Generator) -> np.ndarray:
    h = rng.uniform(0, 1)
    s = rng.uniform(0.0, 0.35)
    v = rng.uniform(0.22, 0.62)
    return np.array(colorsys.hsv_to_rgb(h, s, v), np.float32)


def make_background(rng: np.random.Generator, size: int, kind: str | None = None) -> np.ndarray:
    """Muted background: ``flat`` colour, linear ``gradient``, ``radial`` gradient or ``texture``."""
    kind = kind or str(rng.choice(BACKGROUNDS))
    yy, xx = _grid(size)
    c1 = _muted_color(rng)
    if kind == "flat":
        return np.broadcast_to(c1, (size, size, 3)).astype(np.float32).copy()
    if kind == "gradient":
        c2 = _muted_color(rng)
        a = rng.uniform(0, 2 * np.pi)
        t = ((xx - size / 2) * np.cos(a) + (yy - size / 2) * np.sin(a)) / size + 0.5
        t = np.clip(t, 0, 1)[..., None]
        return (c1 * (1 - t) + c2 * t).astype(np.float32)
    if kind == "radial":
        c2 = _muted_color(rng)
        cy, cx = rng.uniform(0.2, 0.8, 2) * size
        t = np.clip(np.sqrt((yy - cy) ** 2 + (xx - cx) ** 2) / (0.8 * size), 0, 1)[..., None]
        return (c1 * (1 - t) + c2 * t).astype(np.float32)
    if kind == "texture":
        n = smooth_noise(rng, size, cells=int(rng.integers(3, 7)), octaves=3)[..., None]
        c2 = np.clip(c1 * rng.uniform(0.55, 0.8) + rng.uniform(-0.05, 0.05, 3), 0, 1).astype(np.float32)
        return (c1 * (1 - n) + c2 * n).astype(np.float32)
    raise ValueError(f"unknown background {kind!r}")


# ----------------------------------------------------------------------------------------------
# Scene generators
# ----------------------------------------------------------------------------------------------


def _radius_range(size: int, n: int) -> tuple[float, float]:
    if n <= 2:
        return 0.16 * size, 0.25 * size
    if n == 3:
        return 0.145 * size, 0.21 * size
    if n == 4:
        return 0.13 * size, 0.18 * size
    return 0.11 * size, 0.15 * size


def compose_scene(
    rng: np.random.Generator,
    size: int,
    specs: list[ObjSpec] | int | None = None,
    *,
    shapes: tuple[str, ...] = SHAPES,
    colors: tuple[str, ...] = tuple(COLORS),
    textures: tuple[str, ...] = TEXTURES,
    background: str | np.ndarray | None = None,
    overlap: str = "allow",
    min_visible: float = 0.6,
    radius: tuple[float, float] | None = None,
    shuffle: bool = True,
) -> Scene:
    """Flat shapes on a background.

    ``specs``: list of :class:`ObjSpec` (``None`` fields drawn from ``shapes`` / ``colors`` /
    ``textures``), or a count (default: 2-4 random objects). ``overlap``: ``"avoid"`` (objects
    never touch), ``"allow"`` (overlap allowed, every object keeps at least ``min_visible`` of its
    area visible) or ``"chain"`` (each object overlaps the one painted before it, so the whole depth
    order is visible from occlusions; implies distinct colours are advisable). Objects are placed in
    random order (``shuffle``) so spec order does not leak into depth. Deterministic given ``rng``.
    """
    if specs is None:
        specs = int(rng.integers(2, 5))
    if isinstance(specs, int):
        specs = [ObjSpec() for _ in range(specs)]
    specs = list(specs)
    if shuffle:
        specs = [specs[i] for i in rng.permutation(len(specs))]
    n = len(specs)
    if isinstance(background, np.ndarray):
        bg = background.astype(np.float32)
    else:
        bg = make_background(rng, size, background)
    rlo, rhi = radius if radius is not None else _radius_range(size, n)

    objects: list[SceneObject] = []
    for depth, sp in enumerate(specs):
        shape = sp.shape or str(rng.choice(shapes))
        color = sp.color or str(rng.choice(colors))
        texture = sp.texture or str(rng.choice(textures))
        pattern = texture_pattern(texture, size, rng)
        obj = None
        for attempt in range(200):
            shrink = 1.0 - 0.3 * min(attempt, 150) / 150  # relax size if placement is hard
            r = rng.uniform(rlo, rhi) * shrink
            margin = r * 0.9
            if overlap == "chain" and objects:
                prev = objects[-1]
                a = rng.uniform(0, 2 * np.pi)
                dist = rng.uniform(0.7, 1.25) * (prev.radius + r) * 0.75
                cy = prev.center[0] + dist * np.sin(a)
                cx = prev.center[1] + dist * np.cos(a)
                if not (margin <= cy <= size - margin and margin <= cx <= size - margin):
                    continue
            else:
                cy, cx = rng.uniform(margin, size - margin, 2)
            ang = rng.uniform(-0.3, 0.3)  # near-upright: shapes stay recognisable at 32 px
            m = shape_mask(shape, size, (cy, cx), r, ang)
            if m.sum() < 6:
                continue
            if overlap == "avoid":
                occupied = np.zeros((size, size), bool)
                for o in objects:
                    occupied |= _dilate(o.mask)
                if (m & occupied).any():
                    continue
            cand = SceneObject(shape, color, COLORS[color], texture, (float(cy), float(cx)), float(r), float(ang), m, pattern, depth)
            if overlap in ("allow", "chain"):
                allm = [o.mask for o in objects] + [m]
                ok = True
                for i, mi in enumerate(allm):
                    front = np.zeros((size, size), bool)
                    for mj in allm[i + 1:]:
                        front |= mj
                    if (mi & ~front).sum() < min_visible * mi.sum():
                        ok = False
                        break
                if overlap == "chain" and objects and not ok:
                    continue
                if overlap == "chain" and objects:
                    ov = (m & objects[-1].mask).sum()
                    if ov < 0.08 * min(m.sum(), objects[-1].mask.sum()) or ov < 3:
                        continue
                if not ok:
                    continue
            obj = cand
            break
        if obj is None:  # could not place under the constraints: place anyway, smallest size
            r = rlo * 0.7
            cy, cx = rng.uniform(r, size - r, 2)
            m = shape_mask(shape, size, (cy, cx), r, 0.0)
            obj = SceneObject(shape, color, COLORS[color], texture, (float(cy), float(cx)), float(r), 0.0, m, pattern, depth)
        objects.append(obj)
    scene = Scene(image=bg, background=bg, objects=objects, kind="shapes")
    scene.image = scene.render()
    return scene


def _dilate(m: np.ndarray) -> np.ndarray:
    """3x3 (8-neighbour) binary dilation."""
    out = m.copy()
    out[1:] |= m[:-1]
    out[:-1] |= m[1:]
    row = out.copy()
    out[:, 1:] |= row[:, :-1]
    out[:, :-1] |= row[:, 1:]
    return out


def solids_scene(rng: np.random.Generator, size: int, n: int | None = None) -> Scene:
    """Lambert-shaded spheres and cylinders on a flat muted ground, z-buffered.

    Each solid sits on a random pedestal height; its ``height`` is pedestal + surface height and
    its ``normal`` the exact unit normal (x right, y up, z to the viewer). The light direction is
    drawn per scene (stored in ``meta["light"]``); the ground is lit as a plane facing the viewer.
    """
    n = int(rng.integers(2, 4)) if n is None else n
    yy, xx = _grid(size)
    light = np.array([rng.uniform(-0.7, 0.7), rng.uniform(-0.1, 0.8), 1.0], np.float32)
    light /= np.linalg.norm(light)
    ambient = 0.22
    bg = make_background(rng, size, "flat")
    bg = bg * (ambient + (1 - ambient) * light[2])
    objects = []
    for i in range(n):
        kind = "sphere" if rng.uniform() < 0.6 else "cylinder"
        color = str(rng.choice(list(COLORS)))
        base = rng.uniform(0.0, 0.12) * size
        if kind == "sphere":
            r = rng.uniform(0.15, 0.26) * size
            cy, cx = rng.uniform(r * 0.8, size - r * 0.8, 2)
            dy, dx = yy - cy, xx - cx
            q = 1 - (dx * dx + dy * dy) / (r * r)
            mask = q > 0
            zs = np.sqrt(np.clip(q, 0, 1))
            nrm = np.stack([dx / r, -dy / r, zs], -1)
            height = base + r * zs
            ang = 0.0
        else:
            r = rng.uniform(0.09, 0.15) * size
            half = rng.uniform(0.25, 0.42) * size
            vertical = rng.uniform() < 0.5
            cy, cx = rng.uniform(size * 0.3, size * 0.7, 2)
            along, across = (yy - cy, xx - cx) if vertical else (xx - cx, yy - cy)
            q = 1 - across**2 / (r * r)
            mask = (q > 0) & (np.abs(along) <= half)
            zs = np.sqrt(np.clip(q, 0, 1))
            if vertical:
                nrm = np.stack([across / r, np.zeros_like(zs), zs], -1)
            else:
                nrm = np.stack([np.zeros_like(zs), -across / r, zs], -1)
            height = base + r * zs
            ang = 0.0 if vertical else np.pi / 2
        nrm = nrm / np.maximum(np.linalg.norm(nrm, axis=-1, keepdims=True), 1e-6)
        shade = ambient + (1 - ambient) * np.clip((nrm * light).sum(-1), 0, 1)
        objects.append(
            SceneObject(kind, color, COLORS[color], "flat", (float(cy), float(cx)), float(r), ang, mask,
                        np.zeros((size, size), np.float32), i, shade.astype(np.float32),
                        height.astype(np.float32), nrm.astype(np.float32))
        )
    scene = Scene(image=bg, background=bg.astype(np.float32), objects=objects, kind="solids", zbuffer=True,
                  meta={"light": light.tolist()})
    scene.image = scene.render()
    return scene


def fractal_scene(rng: np.random.Generator, size: int) -> Scene:
    """Natural-ish clutter: coloured multi-octave noise plus 1-2 textured shapes."""
    base = smooth_noise(rng, size, cells=int(rng.integers(2, 5)), channels=3, octaves=4)
    tint = rng.uniform(0.3, 1.0, 3).astype(np.float32)
    bg = np.clip(0.1 + 0.85 * base * tint, 0, 1).astype(np.float32)
    scene = compose_scene(rng, size, int(rng.integers(1, 3)), background=bg)
    scene.kind = "fractal"
    return scene


def _skimage_data_dir() -> str | None:
    try:
        spec = importlib.util.find_spec("skimage")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    d = os.path.join(list(spec.submodule_search_locations)[0], "data")
    return d if os.path.isdir(d) else None


@functools.lru_cache(maxsize=None)
def _photos() -> tuple[tuple[str, np.ndarray], ...]:
    from PIL import Image

    d = _skimage_data_dir()
    if d is None:
        return ()
    out = []
    for name in PHOTO_NAMES:
        path = os.path.join(d, name)
        if not os.path.isfile(path):
            continue
        try:
            with Image.open(path) as im:
                im = im.convert("RGB")
                s = _PHOTO_MAX_SIDE / max(im.size)
                if s < 1:
                    im = im.resize((max(1, round(im.size[0] * s)), max(1, round(im.size[1] * s))), Image.BOX)
                out.append((name, np.asarray(im, np.uint8).copy()))
        except OSError:
            continue
    return tuple(out)


def natural_photos_available() -> bool:
    """True when the natural photographs (shipped in the scikit-image wheel) can be read."""
    return len(_photos()) > 0


def photo_scene(rng: np.random.Generator, size: int) -> Scene:
    """Random crop (35-100% of the short side, random position, random h-flip) of a natural photo,
    resized to ``size`` with a box filter. Falls back to :func:`fractal_scene` without photos."""
    photos = _photos()
    if not photos:
        return fractal_scene(rng, size)
    from PIL import Image

    name, arr = photos[int(rng.integers(len(photos)))]
    h, w = arr.shape[:2]
    side = int(round(min(h, w) * rng.uniform(0.35, 1.0)))
    side = max(side, min(size, h, w))
    y0 = int(rng.integers(0, h - side + 1))
    x0 = int(rng.integers(0, w - side + 1))
    crop = Image.fromarray(arr[y0:y0 + side, x0:x0 + side]).resize((size, size), Image.BOX)
    img = np.asarray(crop, np.float32) / 255.0
    flip = bool(rng.uniform() < 0.5)
    if flip:
        img = img[:, ::-1]
    img = np.ascontiguousarray(img, dtype=np.float32)
    return Scene(image=img, background=img, objects=[], kind="photo",
                 meta={"photo": name, "crop": [y0, x0, side], "flip": flip})


def natural_scene(rng: np.random.Generator, size: int, photo_prob: float = 0.5) -> Scene:
    """A photo (or its fractal fallback) with probability ``photo_prob``, else a shapes scene."""
    if rng.uniform() < photo_prob:
        return photo_scene(rng, size)
    return compose_scene(rng, size, int(rng.integers(2, 5)))


def to_gray(img: np.ndarray) -> np.ndarray:
    """Rec. 601 luma, HxW float32."""
    return (img[..., 0] * 0.299 + img[..., 1] * 0.587 + img[..., 2] * 0.114).astype(np.float32)
