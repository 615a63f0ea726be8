"""Image I/O, the 2x2 PICO canvas, and the FLUX token layout (packing / ids / mask vs diffusers)."""

from __future__ import annotations

import os
import types

import numpy as np
import pytest
from PIL import Image

from pico_jax import grid
from pico_jax.grid import (
    GROUP_NAMES,
    Canvas,
    bprime_mask,
    canvas_token_grid,
    compose,
    fit,
    latent_image_ids,
    pack_latents,
    pack_mask,
    panel_token_indices,
    restore,
    split,
    token_groups,
    unpack_latents,
)
from pico_jax.imageio import (
    ImageError,
    from_minus1_1,
    load_image,
    pil_to_array,
    save_png_atomic,
    to_minus1_1,
    to_uint8,
)

RNG = np.random.default_rng(0)


def _img(h, w, c=3):
    return RNG.random((h, w, c), dtype=np.float32)


# ----------------------------------------------------------------------------------------------
# imageio


def test_load_rgb_png_exact(tmp_path):
    a = RNG.integers(0, 256, (5, 7, 3), dtype=np.uint8)
    p = tmp_path / "rgb.png"
    Image.fromarray(a).save(p)
    x = load_image(p)
    assert x.dtype == np.float32 and x.shape == (5, 7, 3)
    np.testing.assert_array_equal(to_uint8(x), a)


def test_load_grayscale(tmp_path):
    g = RNG.integers(0, 256, (4, 6), dtype=np.uint8)
    p = tmp_path / "g.png"
    Image.fromarray(g, mode="L").save(p)
    x = load_image(p)
    assert x.shape == (4, 6, 3)
    for c in range(3):
        np.testing.assert_allclose(x[..., c], g / 255.0, atol=1e-7)
    b = Image.fromarray(g > 128).convert("1")
    np.testing.assert_array_equal(pil_to_array(b)[..., 0], (g > 128).astype(np.float32))


@pytest.mark.parametrize("background,expect", [(1.0, 1.0), (0.0, 0.0)])
def test_load_rgba_and_la_composite(tmp_path, background, expect):
    rgba = np.zeros((2, 3, 4), np.uint8)
    rgba[..., 0] = 255  # pure red
    rgba[0, :, 3] = 255  # opaque row
    rgba[1, :, 3] = 0  # fully transparent row
    rgba[1, 1, 3] = 102  # 40% alpha
    p = tmp_path / "rgba.png"
    Image.fromarray(rgba, mode="RGBA").save(p)
    x = load_image(p, background=background)
    np.testing.assert_allclose(x[0], [[1, 0, 0]] * 3, atol=1e-6)
    np.testing.assert_allclose(x[1, 0], [expect] * 3, atol=1e-6)
    a = 102 / 255
    np.testing.assert_allclose(x[1, 1], [a + (1 - a) * expect, (1 - a) * expect, (1 - a) * expect], atol=1e-6)

    la = np.stack([np.full((2, 2), 0, np.uint8), np.array([[255, 0], [0, 255]], np.uint8)], -1)
    p2 = tmp_path / "la.png"
    Image.fromarray(la, mode="LA").save(p2)
    y = load_image(p2, background=background)
    np.testing.assert_allclose(y[:, :, 0], [[0, expect], [expect, 0]], atol=1e-6)


def test_default_background_is_white(tmp_path):
    p = tmp_path / "t.png"
    Image.new("RGBA", (2, 2), (0, 0, 0, 0)).save(p)
    np.testing.assert_array_equal(load_image(p), np.ones((2, 2, 3), np.float32))


def test_load_palette(tmp_path):
    rgb = RNG.integers(0, 256, (6, 5, 3), dtype=np.uint8)
    pal = Image.fromarray(rgb).quantize(colors=8)
    assert pal.mode == "P"
    p = tmp_path / "p.png"
    pal.save(p)
    np.testing.assert_array_equal(to_uint8(load_image(p)), np.asarray(pal.convert("RGB")))
    # palette with a transparent index -> composited over the background
    pal2 = Image.new("P", (2, 1))
    pal2.putpalette([255, 0, 0, 0, 255, 0] + [0] * 762)
    pal2.putpixel((1, 0), 1)
    p2 = tmp_path / "pt.png"
    pal2.save(p2, transparency=1)
    x = load_image(p2, background=0.0)
    np.testing.assert_allclose(x[0], [[1, 0, 0], [0, 0, 0]])


def test_load_16bit_not_clipped(tmp_path):
    a16 = np.array([[0, 257, 1000], [32768, 60000, 65535]], np.uint16)
    p = tmp_path / "g16.png"
    Image.fromarray(a16).save(p)
    with Image.open(p) as im:
        assert im.mode.startswith("I")
    x = load_image(p)
    np.testing.assert_allclose(x[..., 1], a16 / 65535.0, rtol=1e-6)
    assert len(np.unique(x[..., 0])) == 6  # Image.convert("L") would clip 32768..65535 to 1.0
    # 32-bit "I" (how some 16-bit files come back), via TIFF
    p2 = tmp_path / "i32.tif"
    Image.fromarray(a16.astype(np.int32)).save(p2)
    with Image.open(p2) as im:
        assert im.mode == "I"
    np.testing.assert_allclose(load_image(p2)[..., 2], a16 / 65535.0, rtol=1e-6)


def test_load_cmyk(tmp_path):
    cmyk = np.zeros((1, 3, 4), np.uint8)
    cmyk[0, 1, 3] = 255  # full black
    cmyk[0, 2, 0] = 255  # full cyan
    p = tmp_path / "c.tif"
    Image.fromarray(cmyk, mode="CMYK").save(p)
    x = load_image(p)
    np.testing.assert_allclose(x[0], [[1, 1, 1], [0, 0, 0], [0, 1, 1]], atol=1e-6)


def test_load_errors_name_the_path(tmp_path):
    missing = tmp_path / "nope.png"
    with pytest.raises(ImageError, match="nope.png"):
        load_image(missing)
    text = tmp_path / "notes.png"
    text.write_text("this is not an image")
    with pytest.raises(ImageError, match="notes.png"):
        load_image(text)
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    with pytest.raises(ImageError, match="empty.*empty.png"):
        load_image(empty)
    good = tmp_path / "good.png"
    Image.fromarray(RNG.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(good)
    trunc = tmp_path / "trunc.png"
    trunc.write_bytes(good.read_bytes()[:200])
    with pytest.raises(ImageError, match="trunc.png"):
        load_image(trunc)
    with pytest.raises(ImageError, match="directory"):
        load_image(tmp_path)
    assert issubclass(ImageError, ValueError)
    # 0-pixel image (Pillow refuses to even write / identify such files, so use an in-memory one)
    with pytest.raises(ImageError, match="zero.png.*empty"):
        pil_to_array(Image.new("RGB", (0, 3)), name="zero.png")


def test_uint8_and_range_helpers():
    x = np.array([-0.5, 0.0, 0.5, 1.0, 2.0], np.float32)
    np.testing.assert_array_equal(to_uint8(x), [0, 0, 128, 255, 255])
    u = np.arange(5, dtype=np.uint8)
    assert to_uint8(u) is u
    with pytest.raises(ValueError, match="non-finite"):
        to_uint8(np.array([np.nan], np.float32))
    np.testing.assert_allclose(from_minus1_1(to_minus1_1(x)), x, atol=1e-7)
    np.testing.assert_allclose(to_minus1_1(np.array([0.0, 0.5, 1.0])), [-1, 0, 1])


def test_save_png_atomic_roundtrip(tmp_path):
    x = _img(9, 11)
    p = save_png_atomic(x, tmp_path / "out.png")
    assert os.listdir(tmp_path) == ["out.png"]
    np.testing.assert_array_equal(to_uint8(load_image(p)), to_uint8(x))
    u = RNG.integers(0, 256, (3, 4, 3), dtype=np.uint8)
    save_png_atomic(u, p)  # overwrite
    np.testing.assert_array_equal(to_uint8(load_image(p)), u)
    save_png_atomic(Image.fromarray(u), tmp_path / "pil.png")
    assert sorted(os.listdir(tmp_path)) == ["out.png", "pil.png"]


@pytest.mark.parametrize("exc", [OSError("disk full"), KeyboardInterrupt()])
def test_save_png_atomic_leaves_nothing_on_failure(tmp_path, monkeypatch, exc):
    target = tmp_path / "out.png"
    old = RNG.integers(0, 256, (3, 3, 3), dtype=np.uint8)
    save_png_atomic(old, target)
    before = target.read_bytes()

    real_save = Image.Image.save

    def failing_save(self, fp, *args, **kwargs):
        fp.write(b"\x89PNG\r\n\x1a\n partial garbage")
        raise exc

    monkeypatch.setattr(Image.Image, "save", failing_save)
    with pytest.raises(type(exc)):
        save_png_atomic(_img(4, 4), target)
    with pytest.raises(type(exc)):
        save_png_atomic(_img(4, 4), tmp_path / "new.png")
    monkeypatch.setattr(Image.Image, "save", real_save)
    assert os.listdir(tmp_path) == ["out.png"]  # no temp files, no partial new.png
    assert target.read_bytes() == before  # old file untouched


def test_save_png_rejects_bad_arrays(tmp_path):
    with pytest.raises(ValueError, match="shape"):
        save_png_atomic(np.zeros((2, 2, 5), np.float32), tmp_path / "x.png")
    with pytest.raises(TypeError, match="dtype"):
        save_png_atomic(np.zeros((2, 2, 3), np.int64), tmp_path / "x.png")
    assert os.listdir(tmp_path) == []


# ----------------------------------------------------------------------------------------------
# fitting / canvas


@pytest.mark.parametrize("policy", ["pad", "crop", "stretch"])
@pytest.mark.parametrize("hw", [(48, 80), (80, 48), (64, 64), (33, 17), (200, 120)])
def test_fit_restore_sizes(policy, hw):
    h, w = hw
    x = _img(h, w)
    panel_img, pl = fit(x, 64, policy)
    assert panel_img.shape == (64, 64, 3) and panel_img.dtype == np.float32
    assert pl.orig_size == (h, w)
    y = restore(panel_img, pl)
    assert y.shape == (h, w, 3)
    if (h, w) == (64, 64):
        np.testing.assert_array_equal(panel_img, x)  # passthrough: no resampling at all
        np.testing.assert_array_equal(y, x)
    assert 0.0 <= y.min() and y.max() <= 1.0


def test_pad_placement_geometry_and_restore_accuracy():
    # a smooth image survives down/up sampling well: restore() undoes the letterbox with no shift
    h, w = 60, 100
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    x = np.stack([yy / h, xx / w, 0.5 + 0.3 * np.sin(xx / 15)], -1).astype(np.float32)
    panel_img, pl = fit(x, 50, "pad", pad_value=0.25)
    assert pl.content == (10, 0, 30, 50)  # round(60 * 50 / 100) = 30 rows, centred
    assert pl.source == (0, 0, 60, 100)
    np.testing.assert_array_equal(panel_img[:10], 0.25)
    np.testing.assert_array_equal(panel_img[40:], 0.25)
    y = restore(panel_img, pl)
    assert y.shape == x.shape
    assert np.abs(y - x)[3:-3, 3:-3].max() < 0.03
    # aspect preserved in the panel: the content box has the original aspect ratio
    ct, cl, ch, cw = pl.content
    assert abs(ch / cw - h / w) < 1 / 50


def test_crop_restore_fills_unseen_margins():
    x = _img(40, 100)
    panel_img, pl = fit(x, 32, "crop")
    assert pl.source == (0, 30, 40, 40)
    y = restore(panel_img, pl, fill=0.0)
    assert y.shape == (40, 100, 3)
    np.testing.assert_array_equal(y[:, :30], 0.0)
    np.testing.assert_array_equal(y[:, 70:], 0.0)


def test_compose_split_exact_roundtrip_and_mask():
    P = 32
    A, Ao, B, Bo = _img(50, 70), _img(70, 50), _img(32, 32), _img(100, 40)
    cv = compose(A, Ao, B, Bo, panel=P)
    assert isinstance(cv, Canvas) and cv.has_target
    assert cv.image.shape == (2 * P, 2 * P, 3) and cv.image.dtype == np.float32
    fitted = [fit(im, P, "pad")[0] for im in (A, Ao, B, Bo)]
    parts = split(cv.image, P)
    for got, want in zip(parts, fitted):
        np.testing.assert_array_equal(got, want)  # bit-exact
    np.testing.assert_array_equal(parts[2], B)  # already panel-sized -> untouched
    top, bottom = np.concatenate(parts[:2], 1), np.concatenate(parts[2:], 1)
    np.testing.assert_array_equal(np.concatenate([top, bottom], 0), cv.image)
    # split infers the panel and handles batch dims
    batched = np.stack([cv.image, cv.image])
    for got, want in zip(split(batched), fitted):
        np.testing.assert_array_equal(got[1], want)

    m = bprime_mask(P)
    assert m.shape == (2 * P, 2 * P) and m.dtype == np.float32
    assert m[P:, P:].min() == 1 and m.sum() == P * P
    np.testing.assert_array_equal(cv.mask(), m)
    assert bprime_mask(P, bool).dtype == np.bool_


def test_compose_inference_fill_and_restore_output():
    P = 32
    A, Ao, B = _img(40, 80), _img(40, 80), _img(45, 90)
    cv = compose(A, Ao, B, panel=P, fill=0.5)
    assert not cv.has_target
    np.testing.assert_array_equal(split(cv.image, P)[3], 0.5)
    assert cv.placements[3] == cv.placements[2]
    # pretend the model painted B' = fitted B: restore_output gives B's original size and aspect
    painted = cv.image.copy()
    painted[P:, P:] = painted[P:, :P]
    out = cv.restore_output(painted)
    assert out.shape == B.shape
    np.testing.assert_array_equal(out, cv.restore_output(split(painted, P)[3]))
    np.testing.assert_array_equal(out, restore(split(cv.image, P)[2], cv.placements[2]))


def test_compose_accepts_gray_uint8_pil_and_paths(tmp_path):
    P = 16
    g = (RNG.random((20, 10)) * 255).astype(np.uint8)
    cv = compose(g, g, g, panel=P)
    assert cv.image.shape == (2 * P, 2 * P, 1)
    p = tmp_path / "a.png"
    Image.fromarray(RNG.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(p)
    cv2 = compose(p, Image.open(p), load_image(p), panel=P)
    np.testing.assert_array_equal(split(cv2.image)[0], split(cv2.image)[1])
    np.testing.assert_array_equal(split(cv2.image)[0], split(cv2.image)[2])


def test_compose_errors_name_the_argument():
    x = _img(20, 20)
    with pytest.raises(ValueError, match="panel=40.*multiple=16"):
        compose(x, x, x, panel=40)
    with pytest.raises(ValueError, match="panel must be positive"):
        compose(x, x, x, panel=0)
    with pytest.raises(TypeError, match="panel"):
        compose(x, x, x, panel=32.0)
    with pytest.raises(ValueError, match="multiple must be positive"):
        compose(x, x, x, panel=32, multiple=0)
    with pytest.raises(ValueError, match="policy"):
        compose(x, x, x, panel=32, policy="squash")
    with pytest.raises(ValueError, match="resample"):
        compose(x, x, x, panel=32, resample="cubic")
    with pytest.raises(ValueError, match="A_out is empty"):
        compose(x, np.zeros((0, 5, 3), np.float32), x, panel=32)
    with pytest.raises(ValueError, match="B must be an image"):
        compose(x, x, np.zeros((2, 2, 2, 3), np.float32), panel=32)
    with pytest.raises(ValueError, match="same number of channels.*'B': 1"):
        compose(x, x, x[..., 0], panel=32)
    with pytest.raises(ValueError, match="B_out contains non-finite"):
        compose(x, x, x, np.full((4, 4, 3), np.nan, np.float32), panel=32)
    with pytest.raises(TypeError, match="A must be float"):
        compose(x.astype(np.int32), x, x, panel=32)
    with pytest.raises(ValueError, match="pad_value"):
        compose(x, x, x, panel=32, pad_value=(1.0, 0.0))
    with pytest.raises(ImageError, match="missing.png"):
        compose("missing.png", x, x, panel=32)
    with pytest.raises(ValueError, match="32x32 for panel=16, got 64x64"):
        split(np.zeros((64, 64, 3)), 16)
    with pytest.raises(ValueError, match="shape"):
        restore(np.zeros((8, 8, 3)), fit(x, 16)[1])


# ----------------------------------------------------------------------------------------------
# token layout vs diffusers

import torch  # noqa: E402  the test extra's reference: a missing one fails, never skips


@pytest.fixture(scope="module")
def flux_pipes():
    from diffusers.pipelines.flux.pipeline_flux import FluxPipeline
    from diffusers.pipelines.flux.pipeline_flux_fill import FluxFillPipeline

    return FluxPipeline, FluxFillPipeline


@pytest.mark.parametrize("shape", [(2, 4, 6, 16), (1, 8, 2, 3)])
def test_pack_unpack_matches_diffusers(flux_pipes, shape):
    FluxPipeline, _ = flux_pipes
    b, h, w, c = shape
    z = RNG.standard_normal(shape).astype(np.float32)
    ref = FluxPipeline._pack_latents(torch.from_numpy(z).permute(0, 3, 1, 2).contiguous(), b, c, h, w).numpy()
    tok = pack_latents(z)
    assert tok.shape == (b, (h // 2) * (w // 2), 4 * c)
    np.testing.assert_array_equal(tok, ref)
    back = unpack_latents(tok, h, w)
    np.testing.assert_array_equal(back, z)
    vsf = 8  # diffusers' unpack takes pixel sizes
    ref_un = FluxPipeline._unpack_latents(torch.from_numpy(tok), h * vsf, w * vsf, vsf).permute(0, 2, 3, 1).numpy()
    np.testing.assert_array_equal(back, ref_un)


def test_pack_latents_works_in_jax():
    import jax
    import jax.numpy as jnp

    z = RNG.standard_normal((1, 4, 6, 3)).astype(np.float32)
    tok = jax.jit(pack_latents)(jnp.asarray(z))
    np.testing.assert_array_equal(np.asarray(tok), pack_latents(z))
    back = jax.jit(unpack_latents, static_argnums=(1, 2))(tok, 4, 6)
    np.testing.assert_array_equal(np.asarray(back), z)
    m = (RNG.random((1, 32, 16)) > 0.5).astype(np.float32)
    np.testing.assert_array_equal(np.asarray(jax.jit(pack_mask)(jnp.asarray(m))), pack_mask(m))


def test_latent_image_ids_match_diffusers(flux_pipes):
    FluxPipeline, _ = flux_pipes
    for h, w in [(4, 6), (64, 64), (1, 3)]:
        ref = FluxPipeline._prepare_latent_image_ids(1, h, w, "cpu", torch.float32).numpy()
        got = latent_image_ids(h, w)
        assert got.dtype == np.float32
        np.testing.assert_array_equal(got, ref)


@pytest.mark.parametrize("factor,hw", [(8, (32, 48)), (2, (8, 4))])
def test_pack_mask_matches_fluxfill(flux_pipes, factor, hw):
    FluxPipeline, FluxFillPipeline = flux_pipes
    b = 2
    H, W = hw
    mask = RNG.random((b, H, W)).astype(np.float32)  # random values expose any channel permutation
    h, w = H // factor, W // factor
    nc = 16
    masked_latents = torch.zeros(b, nc, h, w)
    stub = types.SimpleNamespace(
        vae_scale_factor=factor,
        vae=types.SimpleNamespace(config=types.SimpleNamespace(shift_factor=0.0, scaling_factor=1.0)),
        _pack_latents=FluxPipeline._pack_latents,
    )
    ref_mask, _ = FluxFillPipeline.prepare_mask_latents(
        stub, torch.from_numpy(mask)[:, None], masked_latents, b, nc, 1, H, W, torch.float32, "cpu", None
    )
    got = pack_mask(mask, factor)
    assert got.shape == (b, (h // 2) * (w // 2), 4 * factor * factor)
    np.testing.assert_array_equal(got, ref_mask.numpy())


def test_pack_mask_of_bprime_is_bprime_tokens():
    P = 32
    m = bprime_mask(P)[None]
    ht, wt = canvas_token_grid(P)
    assert (ht, wt) == (4, 4)
    tok = pack_mask(m, 8)  # (1, 16, 256)
    groups = token_groups(0, ht, wt)
    np.testing.assert_array_equal(tok[0].min(-1), groups == 4)
    np.testing.assert_array_equal(tok[0].max(-1), groups == 4)


def test_panel_token_indices_and_groups_consistent():
    for h, w, t in [(4, 4, 0), (8, 6, 5), (64, 64, 512)]:
        idx = panel_token_indices(h, w)
        assert idx.dtype == np.int32 and idx.shape == (4, (h // 2) * (w // 2))
        assert sorted(idx.reshape(-1).tolist()) == list(range(h * w))  # a partition
        g = token_groups(t, h, w)
        assert g.dtype == np.int32 and g.shape == (t + h * w,)
        assert (g[:t] == 0).all()
        for k in range(4):
            assert (g[t + idx[k]] == k + 1).all()
        # raster order inside each panel, same relative position across panels
        ids = latent_image_ids(h, w)
        rel = [ids[idx[k], 1:] - ids[idx[k][0], 1:] for k in range(4)]
        for k in range(1, 4):
            np.testing.assert_array_equal(rel[k], rel[0])
        assert (np.diff(idx[0].reshape(h // 2, w // 2), axis=1) == 1).all()
    assert GROUP_NAMES == ("text", "A", "A_out", "B", "B_out")
    # explicit small case: 4x4 grid, A = top-left 2x2 block
    np.testing.assert_array_equal(panel_token_indices(4, 4)[0], [0, 1, 4, 5])
    np.testing.assert_array_equal(panel_token_indices(4, 4)[3], [10, 11, 14, 15])


def test_token_layout_errors():
    with pytest.raises(ValueError, match="even"):
        panel_token_indices(3, 4)
    with pytest.raises(ValueError, match="h_tokens"):
        token_groups(0, 0, 4)
    with pytest.raises(ValueError, match="num_text_tokens"):
        token_groups(-1, 4, 4)
    with pytest.raises(ValueError, match="even"):
        pack_latents(np.zeros((1, 3, 4, 2)))
    with pytest.raises(ValueError, match=r"\(B, H, W, C\)"):
        pack_latents(np.zeros((3, 4, 2)))
    with pytest.raises(ValueError, match="do not unpack"):
        unpack_latents(np.zeros((1, 5, 8)), 4, 4)
    with pytest.raises(ValueError, match="2 \\* factor = 16"):
        pack_mask(np.zeros((1, 24, 32)), 8)
    with pytest.raises(ValueError, match="panel=24"):
        canvas_token_grid(24)
    assert grid.DEFAULT_MULTIPLE == 16
