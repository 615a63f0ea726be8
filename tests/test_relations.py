"""Tests for the procedural relations (pico_jax.data.scenes / pico_jax.data.relations).

The per-family checks below re-derive each relation independently from the panels, the episode's
task parameters and the input scene's structure, and are applied to BOTH the exemplar pair
(A -> A_out) and the query pair (B -> B_out): this is what "the exemplar and the query share the
task parameters" means operationally.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage as ndi

from pico_jax.data import relations as R
from pico_jax.data import scenes as S
from pico_jax.data.relations import FAMILIES, SPLITS, mask_from_output, render_mask, sample_episode

SIZES = (32, 64)
SEEDS = (0, 1, 7)
ALL = sorted(FAMILIES)


# ----------------------------------------------------------------------------------------------
# Registry and splits
# ----------------------------------------------------------------------------------------------


def test_registry():
    assert len(FAMILIES) >= 24
    for cat in R.CATEGORIES:
        assert len(R.families_in(cat)) >= 6, cat
    for name, f in FAMILIES.items():
        assert f.name == name
        assert f.category in R.CATEGORIES
        assert f.output_kind in ("image", "mask")
        assert isinstance(f.label, str) and f.label
        assert isinstance(f.augment_flip, bool)
    assert not FAMILIES["rotate"].augment_flip
    assert FAMILIES["flip"].augment_flip


def test_splits():
    train, held = SPLITS["train"], SPLITS["heldout"]
    assert set(SPLITS) == {"train", "heldout"}
    assert not set(train) & set(held)
    assert set(train) | set(held) == set(FAMILIES)
    assert len(train) == len(set(train)) and len(held) == len(set(held))
    for cat in R.CATEGORIES:
        assert sum(FAMILIES[n].category == cat for n in held) >= 3, cat
        assert sum(FAMILIES[n].category == cat for n in train) >= 3, cat


def test_seed_convention():
    assert R.EVAL_SEED_START == 10**6
    assert not R.is_eval_seed(R.train_seed(10**9 + 5))
    assert R.is_eval_seed(R.eval_seed(0))
    assert R.train_seed(3) == 3 and R.eval_seed(3) == 10**6 + 3


# ----------------------------------------------------------------------------------------------
# Determinism, shapes, dtypes
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ALL)
def test_deterministic_and_well_formed(name):
    for size in SIZES:
        e1 = sample_episode(name, 5, size)
        e2 = sample_episode(name, 5, size)
        assert e1.params == e2.params
        for a, b in zip(e1.panels(), e2.panels()):
            np.testing.assert_array_equal(a, b)
            assert a.shape == (size, size, 3) and a.dtype == np.float32
            assert np.isfinite(a).all() and a.min() >= 0.0 and a.max() <= 1.0
        json.dumps(e1.params)  # JSON-able
        assert not np.array_equal(e1.A, e1.B), "A and B must be drawn independently"
        e3 = sample_episode(name, 6, size)
        assert not np.array_equal(e1.A, e3.A)
        assert e1.canvas().shape == (2 * size, 2 * size, 3)


@pytest.mark.parametrize("name", ALL)
def test_params_vary_across_seeds(name):
    params = [json.dumps(sample_episode(name, s, 32).params, sort_keys=True) for s in range(12)]
    if name in ("surface_normals", "colorize"):  # parameter-free families
        assert set(params) == {"{}"}
    else:
        assert len(set(params)) >= 2


def test_eval_seeds_differ_from_train_seeds():
    a = sample_episode("denoise", R.train_seed(0), 32)
    b = sample_episode("denoise", R.eval_seed(0), 32)
    assert not np.array_equal(a.A, b.A)


# ----------------------------------------------------------------------------------------------
# The relation holds on A -> A_out and on B -> B_out with the episode's parameters
# ----------------------------------------------------------------------------------------------

TOL = 2e-5


def _close(a, b, atol=TOL):
    np.testing.assert_allclose(a, b, atol=atol, rtol=0)


def _target_mask(sc, attr, value):
    m = np.zeros((sc.size, sc.size), bool)
    n = 0
    for o, v in zip(sc.objects, sc.visible_masks()):
        if getattr(o, attr) == value:
            m |= v
            n += 1
    return m, n


def _check_mask_colour(out, color):
    m = mask_from_output(out)
    _close(out[m], np.broadcast_to(R.MASK_COLORS[color], (int(m.sum()), 3)))
    assert (out[~m] == 0).all()
    return m


def chk_denoise(i, o, p, sc, role):
    r = (i - o)
    ok = ((i > 0) & (i < 1)).all(-1)
    assert abs(r[ok].std() - p["sigma"]) < 0.3 * p["sigma"]
    if not p["color_noise"]:
        _close(r[ok][:, 0], r[ok][:, 1], 1e-5)


def chk_deblur(i, o, p, sc, role):
    s = p["sigma"] * sc.size / 32
    _close(i, np.clip(ndi.gaussian_filter(o, (s, s, 0), mode="nearest"), 0, 1))
    assert np.abs(i - o).max() > 0.005


def chk_lowlight(i, o, p, sc, role):
    _close(i, p["gain"] * o ** p["gamma"], 1e-5)
    assert i.max() <= p["gain"] + 1e-6


def chk_inpaint(i, o, p, sc, role):
    col = np.asarray(R.HOLE_COLORS[p["hole_color"]], np.float32)
    hole = (i == col).all(-1)
    changed = (i != o).any(-1)
    assert (hole | ~changed).all()  # every change is a hole pixel
    side = p["hole_frac"] * sc.size
    area = side * side * (1.0 if p["hole_shape"] == "square" else np.pi / 4)
    assert hole.sum() >= 0.7 * area
    ys, xs = np.nonzero(hole & changed)
    assert ys.max() - ys.min() <= side + 2 and xs.max() - xs.min() <= side + 2


def chk_deblock(i, o, p, sc, role):
    _close(i, np.clip(R.jpeg_like(o, p["block"], p["q"]), 0, 1), 1e-5)
    assert np.abs(i - o).max() > 0.01


def chk_derain(i, o, p, sc, role):
    ch = np.abs(i - o).max(-1) > 1e-6
    assert ch.sum() > 0
    a = p["alpha"]
    _close(i[ch], o[ch] * (1 - a) + np.asarray(p["tint"], np.float32) * a, 1e-5)


def chk_dehaze(i, o, p, sc, role):
    t = np.linspace(p["t_top"], p["t_bottom"], sc.size)[:, None, None]
    _close(i, o * t + np.asarray(p["airlight"]) * (1 - t), 1e-5)


def chk_white_balance(i, o, p, sc, role):
    _close(i, o * np.asarray(p["gains"]), 1e-5)
    assert min(p["gains"]) < 0.9


def chk_depth_layers(i, o, p, sc, role):
    g = o[..., 0]
    _close(o[..., 0], o[..., 1])
    if not p["near_bright"]:
        g = 1 - g
    lab = sc.label_map()
    assert (g[lab < 0] == 0).all()
    n = len(sc.objects)
    # paint order = depth; every object visible, constant level, front-most brightest
    levels = []
    for k in sorted(range(n), key=lambda j: -sc.objects[j].depth):
        vals = np.unique(g[lab == k])
        assert len(vals) == 1
        levels.append(float(vals[0]))
    assert levels[0] == 1.0 and all(a > b for a, b in zip(levels, levels[1:]))
    # the occlusion chain makes the order visible: each object overlaps the one behind it
    objs = sorted(sc.objects, key=lambda ob: ob.depth)
    for back, front in zip(objs, objs[1:]):
        assert (back.mask & front.mask).any()


def chk_height_map(i, o, p, sc, role):
    g = o[..., 0] if p["near_bright"] else 1 - o[..., 0]
    lab = sc.label_map()
    assert (g[lab < 0] == 0).all() and (g[lab >= 0] > 0).all()
    for k, ob in enumerate(sc.objects):  # height above the ground, scaled by 0.4 * size
        v = lab == k
        _close(g[v], np.clip(ob.height[v] / (0.4 * sc.size), 0, 1), 1e-5)
        if ob.shape == "sphere" and v.sum() > 10:
            assert g[v].max() > g[v].min()


def chk_surface_normals(i, o, p, sc, role):
    n = 2 * o - 1
    lab = sc.label_map()
    _close(n[lab < 0], np.broadcast_to([0, 0, 1], n[lab < 0].shape), 1e-5)
    norm = np.linalg.norm(n[lab >= 0], axis=-1)
    assert np.abs(norm - 1).max() < 1e-3
    assert (n[..., 2] >= -1e-5).all()
    # spheres: normal x grows to the right, y grows upwards across the visible region
    for k, ob in enumerate(sc.objects):
        if ob.shape == "sphere":
            v = lab == k
            ys, xs = np.nonzero(v)
            if len(ys) > 10:
                assert np.corrcoef(xs, n[v][:, 0])[0, 1] > 0.5
                assert np.corrcoef(ys, n[v][:, 1])[0, 1] < -0.5


def chk_edges(i, o, p, sc, role):
    m = _check_mask_colour(o, p["mask_color"])
    lab = sc.label_map()
    assert not (m & (lab < 0)).any()
    inner = ndi.binary_erosion(lab >= 0, structure=ndi.generate_binary_structure(2, 1), border_value=1)
    for k in range(len(sc.objects)):
        v = lab == k
        if v.any():
            assert (m & v).any()
            assert not (m & v & ndi.binary_erosion(v, border_value=1)).any()  # only boundary pixels
    assert m.sum() > 0 and not (m & inner & (lab == np.roll(lab, 1, 0)) & (lab == np.roll(lab, -1, 0))
                                & (lab == np.roll(lab, 1, 1)) & (lab == np.roll(lab, -1, 1))).any()


def chk_flip(i, o, p, sc, role):
    np.testing.assert_array_equal(o, i[:, ::-1] if p["axis"] == "horizontal" else i[::-1])


def chk_rotate(i, o, p, sc, role):
    k = p["k"]
    ref = {1: np.transpose(i, (1, 0, 2))[::-1], 2: i[::-1, ::-1], 3: np.transpose(i, (1, 0, 2))[:, ::-1]}[k]
    np.testing.assert_array_equal(o, ref)


def chk_zoom(i, o, p, sc, role):
    h = sc.size // 2
    qy, qx = {"top_left": (0, 0), "top_right": (0, 1), "bottom_left": (1, 0), "bottom_right": (1, 1)}[p["quadrant"]]
    np.testing.assert_array_equal(o[::2, ::2], i[qy * h:(qy + 1) * h, qx * h:(qx + 1) * h])
    np.testing.assert_array_equal(o[1::2, 1::2], o[::2, ::2])


def _chk_attr(attr, key):
    def chk(i, o, p, sc, role):
        m = _check_mask_colour(o, p["mask_color"])
        tm, n = _target_mask(sc, attr, p[key])
        np.testing.assert_array_equal(m, tm)
        assert n >= (2 if role == "A" else 1)
        assert len(sc.objects) > n  # there are distractors
        if role == "A":  # the two highlighted instances differ in the other attributes
            tg = [ob for ob in sc.objects if getattr(ob, attr) == p[key]]
            for other in {"shape", "color", "texture"} - {attr}:
                assert getattr(tg[0], other) != getattr(tg[1], other)
        # what the mask covers is visible in the image: the target colour is present there
        if attr == "color":
            rgb = np.asarray(S.COLORS[p["color"]])
            assert np.isclose(i[m], rgb, atol=1e-5).all(-1).any() or sc.objects[0].texture != "flat"
    return chk


def chk_foreground(i, o, p, sc, role):
    m = _check_mask_colour(o, p["mask_color"])
    np.testing.assert_array_equal(m, sc.label_map() >= 0)
    assert not np.isclose(i[m], sc.background[m], atol=1e-6).all()


def chk_bboxes(i, o, p, sc, role):
    col = np.asarray(R.MASK_COLORS[p["box_color"]], np.float32)
    ch = (o != i).any(-1)
    assert (o[ch] == col).all()
    lab = sc.label_map()
    assert not (ch & (lab >= 0)).any()  # boxes never cover objects
    for k in range(len(sc.objects)):
        ys, xs = np.nonzero(lab == k)
        # a box pixel right outside each extreme of the object
        t = max(1, sc.size // 32)
        y0, y1, x0, x1 = ys.min(), ys.max(), xs.min(), xs.max()
        for yy, xx in ((y0 - t, (x0 + x1) // 2), (y1 + t, (x0 + x1) // 2), ((y0 + y1) // 2, x0 - t), ((y0 + y1) // 2, x1 + t)):
            yy, xx = int(np.clip(yy, 0, sc.size - 1)), int(np.clip(xx, 0, sc.size - 1))
            assert (o[yy, xx] == col).all() or lab[yy, xx] >= 0


def chk_count(i, o, p, sc, role):
    m = _check_mask_colour(o, p["mask_color"])
    comps, n = ndi.label(m)
    assert n == len(sc.objects) >= 1
    # the objects are separate (each one its own connected component in the image structure)
    _, nobj = ndi.label(sc.label_map() >= 0, structure=np.ones((3, 3)))
    assert nobj == len(sc.objects)
    cys = ndi.center_of_mass(m, comps, range(1, n + 1))
    assert all(abs(cy - sc.size / 2 + 0.5) < 1 for cy, _ in cys)


def chk_centroids(i, o, p, sc, role):
    m = _check_mask_colour(o, p["mask_color"])
    comps, n = ndi.label(m)
    assert n == len(sc.objects)
    got = np.array(ndi.center_of_mass(m, comps, range(1, n + 1)))
    want = np.array([(np.nonzero(v)[0].mean(), np.nonzero(v)[1].mean()) for v in sc.visible_masks()])
    d = np.abs(got[:, None] - want[None]).max(-1)  # each dot sits on exactly one object's centroid
    assert ((d < 1.0).sum(0) == 1).all() and ((d < 1.0).sum(1) == 1).all()


def chk_classmap(i, o, p, sc, role):
    lab = sc.label_map()
    assert (o[lab < 0] == 0).all()
    shapes = {ob.shape for ob in sc.objects}
    assert shapes <= set(p["classes"])
    if role == "A":
        assert shapes == set(p["classes"])
    for k, ob in enumerate(sc.objects):
        _close(o[lab == k], np.broadcast_to(S.COLORS[p["classes"][ob.shape]], o[lab == k].shape))


def chk_recolor(i, o, p, sc, role):
    lab = sc.label_map()
    src = np.zeros(lab.shape, bool)
    for k, ob in enumerate(sc.objects):
        if ob.color == p["src"]:
            src |= lab == k
    assert src.any()
    np.testing.assert_array_equal(o[~src], i[~src])
    a, b = np.asarray(S.COLORS[p["src"]]), np.asarray(S.COLORS[p["dst"]])
    _close(o[src] * a, i[src] * b, 1e-5)  # same texture modulation, new base colour


def chk_remove(i, o, p, sc, role):
    lab = sc.label_map()
    gone = np.zeros(lab.shape, bool)
    for k, ob in enumerate(sc.objects):
        if ob.color == p["color"]:
            gone |= lab == k
    assert gone.any() and len(sc.objects) > 1
    np.testing.assert_array_equal(o[~gone], i[~gone])
    rgb = np.asarray(S.COLORS[p["color"]])
    # no pixel of the removed colour (or its texture ink) remains where it was
    for f in (1.0, 1 - S.TEXTURE_CONTRAST):
        assert not np.isclose(o[gone], rgb * f, atol=1e-5).all(-1).any()


def chk_add(i, o, p, sc, role):
    qy, qx = {"top_left": (0, 0), "top_right": (0, 1), "bottom_left": (1, 0), "bottom_right": (1, 1)}[p["corner"]]
    c = ((0.25 + 0.5 * qy) * sc.size, (0.25 + 0.5 * qx) * sc.size)
    new = S.shape_mask(p["shape"], sc.size, c, 0.17 * sc.size, 0.0)
    np.testing.assert_array_equal(o[~new], i[~new])
    rgb = np.asarray(S.COLORS[p["color"]])
    ok = np.isclose(o[new], rgb, atol=1e-5).all(-1) | np.isclose(o[new], rgb * (1 - S.TEXTURE_CONTRAST), atol=1e-5).all(-1)
    assert ok.all()


def chk_shadow(i, o, p, sc, role):
    dy, dx = R.SHADOW_DIRS[p["direction"]]
    off = max(1, int(round(0.08 * sc.size)))
    fg = sc.label_map() >= 0
    ch = (o != i).any(-1)
    assert ch.any()
    shifted = np.zeros_like(fg)
    ys, xs = np.nonzero(fg)
    ok = (ys + dy * off >= 0) & (ys + dy * off < sc.size) & (xs + dx * off >= 0) & (xs + dx * off < sc.size)
    shifted[ys[ok] + dy * off, xs[ok] + dx * off] = True
    np.testing.assert_array_equal(ch, shifted & ~fg & (i.max(-1) > 0))
    _close(o[ch], i[ch] * (1 - p["darkness"]), 1e-5)


def chk_posterize(i, o, p, sc, role):
    L = p["levels"] - 1
    _close(o, np.round(i * L) / L, 1e-6)
    assert len(np.unique(o)) <= p["levels"]


def chk_channel_swap(i, o, p, sc, role):
    assert sorted(p["perm"]) == [0, 1, 2] and p["perm"] != [0, 1, 2]
    np.testing.assert_array_equal(o, i[..., p["perm"]])


def chk_colorize(i, o, p, sc, role):
    np.testing.assert_array_equal(i[..., 0], i[..., 1])
    np.testing.assert_array_equal(i[..., 0], i[..., 2])
    _close(i[..., 0], 0.299 * o[..., 0] + 0.587 * o[..., 1] + 0.114 * o[..., 2], 1e-5)


def chk_flatten(i, o, p, sc, role):
    lab = sc.label_map()
    tex = np.zeros(lab.shape, bool)
    n = 0
    for k, ob in enumerate(sc.objects):
        if ob.texture == p["texture"]:
            tex |= lab == k
            n += 1
            _close(o[lab == k], np.broadcast_to(ob.rgb, o[lab == k].shape), 1e-6)
    assert n >= (2 if role == "A" else 1) and len(sc.objects) > n
    np.testing.assert_array_equal(o[~tex], i[~tex])
    assert (o[tex] != i[tex]).any()


CHECKS = {
    "denoise": chk_denoise, "deblur": chk_deblur, "lowlight_enhance": chk_lowlight,
    "inpaint_hole": chk_inpaint, "deblock_jpeg": chk_deblock, "derain": chk_derain,
    "dehaze": chk_dehaze, "white_balance": chk_white_balance,
    "depth_layers": chk_depth_layers, "height_map": chk_height_map, "surface_normals": chk_surface_normals,
    "edges": chk_edges, "flip": chk_flip, "rotate": chk_rotate, "zoom_quadrant": chk_zoom,
    "segment_color": _chk_attr("color", "color"), "segment_shape": _chk_attr("shape", "shape"),
    "segment_texture": _chk_attr("texture", "texture"), "foreground_mask": chk_foreground,
    "bounding_boxes": chk_bboxes, "count_dots": chk_count, "centroid_dots": chk_centroids,
    "shape_classmap": chk_classmap,
    "recolor": chk_recolor, "remove_object": chk_remove, "add_object": chk_add, "drop_shadow": chk_shadow,
    "posterize": chk_posterize, "channel_swap": chk_channel_swap, "colorize": chk_colorize,
    "flatten_texture": chk_flatten,
}


def test_every_family_has_a_check():
    assert set(CHECKS) == set(FAMILIES)


@pytest.mark.parametrize("name", ALL)
def test_relation_holds_on_exemplar_and_query(name):
    for size in SIZES:
        for seed in SEEDS:
            ep = sample_episode(name, seed, size)
            sa, sb = ep.scenes
            CHECKS[name](ep.A, ep.A_out, ep.params, sa, "A")
            CHECKS[name](ep.B, ep.B_out, ep.params, sb, "B")


@pytest.mark.parametrize("name", ALL)
def test_query_pair_depends_on_the_exemplar_params(name):
    """Re-drawing the query pair with the same pair-rng but another episode's params changes the
    pair (for families with parameters): the task is only defined by the exemplar."""
    fam = FAMILIES[name]
    if name in ("surface_normals", "colorize"):
        return
    base = sample_episode(name, 0, 32).params
    others = [sample_episode(name, s, 32).params for s in range(1, 30)]
    other = next(o for o in others if o != base)
    differ = 0
    for s in range(6):
        try:
            i1, o1, _ = fam.pair(np.random.default_rng(s), 32, base, "B")
            i2, o2, _ = fam.pair(np.random.default_rng(s), 32, other, "B")
        except Exception:  # noqa: BLE001  (params of another episode may not fit: fine)
            continue
        differ += not (np.array_equal(i1, i2) and np.array_equal(o1, o2))
    assert differ >= 1


# ----------------------------------------------------------------------------------------------
# Masks
# ----------------------------------------------------------------------------------------------


def test_mask_from_output_roundtrip():
    rng = np.random.default_rng(0)
    m = rng.uniform(size=(32, 32)) < 0.3
    for c in R.MASK_COLORS:
        img = render_mask(m, c)
        assert img.dtype == np.float32 and img.shape == (32, 32, 3)
        np.testing.assert_array_equal(mask_from_output(img), m)
        # robust to a noisy prediction and to uint8 round trips
        noisy = np.clip(img + rng.normal(0, 0.1, img.shape), 0, 1)
        assert (mask_from_output(noisy) == m).mean() > 0.99
        np.testing.assert_array_equal(mask_from_output(np.round(img * 255) / 255), m)
    np.testing.assert_array_equal(mask_from_output(m.astype(np.float32)), m)


@pytest.mark.parametrize("name", [n for n in ALL if FAMILIES[n].output_kind == "mask"])
def test_mask_outputs(name):
    for seed in SEEDS:
        ep = sample_episode(name, seed, 32)
        for out in (ep.A_out, ep.B_out):
            m = mask_from_output(out)
            assert m.any() and not m.all()
            np.testing.assert_array_equal(render_mask(m, ep.params["mask_color"]), out)


# ----------------------------------------------------------------------------------------------
# Scenes
# ----------------------------------------------------------------------------------------------


def test_scene_structure():
    rng = np.random.default_rng(0)
    sc = S.compose_scene(rng, 48, 4, overlap="allow")
    lab = sc.label_map()
    assert len(sc.objects) == 4
    for k, ob in enumerate(sc.objects):
        assert ob.shape in S.SHAPES and ob.color in S.COLORS and ob.texture in S.TEXTURES
        assert ob.mask.dtype == bool and (lab == k).sum() >= 0.6 * ob.mask.sum() - 1
        assert sc.bbox(k) is not None
    np.testing.assert_array_equal(sc.image, sc.render())
    sc2 = S.compose_scene(np.random.default_rng(0), 48, 4, overlap="allow")
    np.testing.assert_array_equal(sc.image, sc2.image)
    for shape in S.SHAPES:
        assert S.shape_mask(shape, 32, (16, 16), 10).sum() > 40


def test_photo_scene_and_fallback(monkeypatch):
    a = S.photo_scene(np.random.default_rng(3), 32)
    b = S.photo_scene(np.random.default_rng(3), 32)
    np.testing.assert_array_equal(a.image, b.image)
    assert a.image.shape == (32, 32, 3) and a.image.dtype == np.float32
    assert a.kind == ("photo" if S.natural_photos_available() else "fractal")
    monkeypatch.setattr(S, "_photos", lambda: ())
    c = S.photo_scene(np.random.default_rng(3), 32)
    assert c.kind == "fractal" and c.image.shape == (32, 32, 3)


# ----------------------------------------------------------------------------------------------
# VisRel folder writer
# ----------------------------------------------------------------------------------------------


def test_write_visrel_folder(tmp_path):
    fams = ["denoise", "segment_color", "rotate"]
    out = R.write_visrel_folder(str(tmp_path), fams, episodes_per_family=2, size=32, seed=R.eval_seed(0))
    assert out == {f: 2 for f in fams}
    assert sorted(os.listdir(tmp_path)) == sorted(fams)
    for f in fams:
        meta = json.loads((tmp_path / f / "task.json").read_text())
        fam = FAMILIES[f]
        assert meta == {"label": fam.label, "category": fam.category, "output_kind": fam.output_kind,
                        "augment_flip": fam.augment_flip}
        assert sorted(os.listdir(tmp_path / f)) == ["quads", "task.json"]
        files = sorted(os.listdir(tmp_path / f / "quads"))
        assert files == sorted(f"{i:06d}.{k}.png" for i in range(2) for k in ("A", "A_out", "B", "B_out"))
        ep = sample_episode(f, R.eval_seed(1), 32)
        for k, img in zip(("A", "A_out", "B", "B_out"), ep.panels()):
            with Image.open(tmp_path / f / "quads" / f"000001.{k}.png") as im:
                assert im.mode == "RGB" and im.size == (32, 32)
                np.testing.assert_array_equal(np.asarray(im), (img * 255 + 0.5).astype(np.uint8))
    assert json.loads((tmp_path / "rotate" / "task.json").read_text())["augment_flip"] is False
