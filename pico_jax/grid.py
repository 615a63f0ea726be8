"""The PICO four-panel canvas and its FLUX token layout.

Canvas layout (pixels, channels last)::

    +--------+--------+
    |   A    |   A'   |      A  -> A'   : the exemplar pair
    +--------+--------+
    |   B    |   B'   |      B  -> B'   : the query and the panel the transformer paints
    +--------+--------+

Every panel is a ``P x P`` square (``P = panel``); the canvas is ``2P x 2P``.

Resize policy (``fit`` / ``restore``)
-------------------------------------
Each input image is fitted to the square panel by one of:

* ``"pad"`` (**default**) -- letterbox: resize keeping the aspect ratio so that the *longer* side
  becomes ``P`` (the shorter one ``round(short * P / long)``, at least 1), centre it
  (``top = (P - h) // 2``, ``left = (P - w) // 2``) and fill the rest with ``pad_value`` (default
  1.0, white). Nothing is lost or distorted, so ``restore`` crops the content box back out and
  resizes it to the original size: B' comes back at B's original size and aspect.
* ``"crop"`` -- take the largest centred square of the original (``side = min(H, W)``,
  ``top = (H - side) // 2``, ``left = (W - side) // 2``) and resize it to ``P x P``. ``restore``
  resizes the panel back to ``side x side`` and pastes it into an original-size image whose cut-away
  margins are filled with ``fill`` (they were never seen).
* ``"stretch"`` -- resize to ``P x P`` ignoring aspect; ``restore`` resizes back (aspect restored).

An image already of size ``P x P`` is passed through untouched by every policy. Resizing is done in
float32 per channel with Pillow (``"F"`` mode, default Lanczos), and the result is clipped to the
input's value range so Lanczos overshoot cannot leave ``[0, 1]``.

Images are float32 ``(H, W, C)`` in ``[0, 1]``; ``compose`` also accepts ``(H, W)`` (one channel),
uint8 arrays, PIL images and paths (loaded with :func:`pico_jax.imageio.load_image`). All four
images must have the same channel count after that conversion.

Token layout (FLUX)
-------------------
The autoencoder downsamples by ``ae_factor`` (8 for FLUX) and FLUX packs the latents 2x2 into
tokens, row-major over the *whole* canvas, so a ``2P x 2P`` canvas gives an ``h x w`` token grid
with ``h = w = 2P / (2 * ae_factor)``; ``P`` must therefore be a multiple of ``2 * ae_factor`` (the
``multiple`` argument, 16 for FLUX) so that panels fall on token boundaries. The joint sequence the
transformer attends over is ``[text tokens, image tokens]``; group ids: 0 = text, 1 = A, 2 = A',
3 = B, 4 = B' (``GROUP_NAMES``).

Packed channel order (identical to diffusers ``FluxPipeline._pack_latents``): token ``(i, j)``
holds latent pixels ``(2i + dy, 2j + dx)``, channel ``c * 4 + dy * 2 + dx``.
"""

from __future__ import annotations

import dataclasses
import operator
import os
from typing import Any, Sequence

import numpy as np
from PIL import Image

__all__ = [
    "GROUP_NAMES",
    "PANEL_NAMES",
    "POLICIES",
    "DEFAULT_PANEL",
    "DEFAULT_MULTIPLE",
    "PanelPlacement",
    "Canvas",
    "resize",
    "fit",
    "placement_for",
    "restore",
    "compose",
    "split",
    "panel_slices",
    "panel_mask",
    "bprime_mask",
    "canvas_token_grid",
    "pack_latents",
    "unpack_latents",
    "latent_image_ids",
    "panel_token_indices",
    "token_groups",
    "pack_mask",
]

GROUP_NAMES = ("text", "A", "A_out", "B", "B_out")
PANEL_NAMES = ("A", "A_out", "B", "B_out")
POLICIES = ("pad", "crop", "stretch")
DEFAULT_PANEL = 512
DEFAULT_MULTIPLE = 16  # FLUX: autoencoder factor 8 x 2x2 packing

# (row, col) of each panel in the 2x2 canvas, order A, A', B, B'.
_PANEL_POS = ((0, 0), (0, 1), (1, 0), (1, 1))

_RESAMPLE = {
    "nearest": Image.Resampling.NEAREST,
    "box": Image.Resampling.BOX,
    "bilinear": Image.Resampling.BILINEAR,
    "hamming": Image.Resampling.HAMMING,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
}


# ----------------------------------------------------------------------------------------------
# validation helpers


def _pos_int(value: Any, name: str) -> int:
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an integer, got {value!r}")
    try:
        v = operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an integer, got {value!r}") from None
    if v <= 0:
        raise ValueError(f"{name} must be positive, got {v}")
    return v


def _check_panel(panel: Any, multiple: Any) -> int:
    m = _pos_int(multiple, "multiple")
    p = _pos_int(panel, "panel")
    if p % m:
        raise ValueError(
            f"panel={p} must be a positive multiple of multiple={m} "
            f"(autoencoder factor x 2 for FLUX packing); nearest valid: {max(m, p // m * m)} or {(p // m + 1) * m}"
        )
    return p


def _check_policy(policy: str) -> str:
    if policy not in POLICIES:
        raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}")
    return policy


def _check_resample(resample: str) -> int:
    try:
        return _RESAMPLE[resample]
    except (KeyError, TypeError):
        raise ValueError(f"resample must be one of {tuple(_RESAMPLE)}, got {resample!r}") from None


def _as_image(x: Any, name: str) -> np.ndarray:
    """Anything image-like -> float32 (H, W, C), with errors naming ``name``."""
    if isinstance(x, (str, os.PathLike)):
        from pico_jax.imageio import load_image

        return load_image(x)
    if isinstance(x, Image.Image):
        from pico_jax.imageio import pil_to_array

        return pil_to_array(x, name=name)
    a = np.asarray(x)
    if a.ndim == 2:
        a = a[:, :, None]
    if a.ndim != 3:
        raise ValueError(f"{name} must be an image of shape (H, W) or (H, W, C), got shape {a.shape}")
    if a.shape[0] == 0 or a.shape[1] == 0 or a.shape[2] == 0:
        raise ValueError(f"{name} is empty (shape {a.shape})")
    if a.dtype == np.uint8:
        return a.astype(np.float32) / np.float32(255.0)
    if a.dtype == np.bool_:
        return a.astype(np.float32)
    if np.issubdtype(a.dtype, np.floating) or a.dtype.name == "bfloat16":
        a = a.astype(np.float32)
        if not np.all(np.isfinite(a)):
            raise ValueError(f"{name} contains non-finite values (NaN/inf)")
        return a
    raise TypeError(f"{name} must be float (values in [0, 1]) or uint8, got dtype {a.dtype}")


def _fill_vector(value: Any, channels: int, name: str) -> np.ndarray:
    v = np.asarray(value, dtype=np.float32).reshape(-1)
    if v.size == 1:
        v = np.repeat(v, channels)
    if v.size != channels or not np.all(np.isfinite(v)):
        raise ValueError(f"{name} must be a finite scalar or one value per channel ({channels}), got {value!r}")
    return v


# ----------------------------------------------------------------------------------------------
# resizing, fitting, restoring


def resize(image: Any, size_hw: tuple[int, int], resample: str = "lanczos") -> np.ndarray:
    """Resize a float ``(H, W, C)`` (or ``(H, W)``) image to ``size_hw`` in float32, per channel.

    Returns a fresh float32 array; a no-op resize returns an exact copy. The output is clipped to
    the input's ``[min, max]`` (removes Lanczos/bicubic overshoot).
    """
    filt = _check_resample(resample)
    a = np.asarray(image, dtype=np.float32)
    squeeze = a.ndim == 2
    if squeeze:
        a = a[:, :, None]
    if a.ndim != 3 or a.shape[0] == 0 or a.shape[1] == 0:
        raise ValueError(f"resize expects a non-empty (H, W[, C]) image, got shape {a.shape}")
    h = _pos_int(size_hw[0], "height")
    w = _pos_int(size_hw[1], "width")
    if a.shape[:2] == (h, w):
        out = a.copy()
    else:
        out = np.empty((h, w, a.shape[2]), np.float32)
        for c in range(a.shape[2]):
            ch = Image.fromarray(np.ascontiguousarray(a[:, :, c]), mode="F")
            out[:, :, c] = np.asarray(ch.resize((w, h), resample=filt), dtype=np.float32)
        if filt not in (Image.Resampling.NEAREST, Image.Resampling.BOX, Image.Resampling.BILINEAR):
            np.clip(out, a.min(), a.max(), out=out)
    return out[:, :, 0] if squeeze else out


@dataclasses.dataclass(frozen=True)
class PanelPlacement:
    """How one image was fitted into a square panel (everything needed to undo it).

    ``content`` is ``(top, left, height, width)`` of the image content inside the panel (the
    non-padding area; the whole panel for "crop" / "stretch"). ``source`` is
    ``(top, left, height, width)`` of the region of the *original* image that the content shows (the
    whole image except for "crop").
    """

    orig_h: int
    orig_w: int
    panel: int
    policy: str
    content: tuple[int, int, int, int]
    source: tuple[int, int, int, int]

    @property
    def orig_size(self) -> tuple[int, int]:
        return (self.orig_h, self.orig_w)


def placement_for(orig_h: int, orig_w: int, panel: int, policy: str = "pad") -> PanelPlacement:
    """The placement ``fit`` uses for an ``orig_h x orig_w`` image (pure geometry, no pixels)."""
    h = _pos_int(orig_h, "image height")
    w = _pos_int(orig_w, "image width")
    p = _pos_int(panel, "panel")
    _check_policy(policy)
    if policy == "pad":
        if h >= w:
            ch, cw = p, max(1, round(w * p / h))
        else:
            ch, cw = max(1, round(h * p / w)), p
        content = ((p - ch) // 2, (p - cw) // 2, ch, cw)
        source = (0, 0, h, w)
    elif policy == "crop":
        side = min(h, w)
        content = (0, 0, p, p)
        source = ((h - side) // 2, (w - side) // 2, side, side)
    else:  # stretch
        content = (0, 0, p, p)
        source = (0, 0, h, w)
    return PanelPlacement(h, w, p, policy, content, source)


def fit(
    image: Any,
    panel: int = DEFAULT_PANEL,
    policy: str = "pad",
    *,
    pad_value: float | Sequence[float] = 1.0,
    resample: str = "lanczos",
    multiple: int = 1,
    name: str = "image",
) -> tuple[np.ndarray, PanelPlacement]:
    """Fit one image into a ``panel x panel`` square; returns ``(panel_image float32 (P,P,C), placement)``."""
    p = _check_panel(panel, multiple)
    _check_policy(policy)
    a = _as_image(image, name)
    pl = placement_for(a.shape[0], a.shape[1], p, policy)
    st, sl, sh, sw = pl.source
    ct, cl, ch, cw = pl.content
    content = resize(a[st : st + sh, sl : sl + sw], (ch, cw), resample)
    if (ch, cw) == (p, p):
        return content, pl
    out = np.empty((p, p, a.shape[2]), np.float32)
    out[...] = _fill_vector(pad_value, a.shape[2], "pad_value")
    out[ct : ct + ch, cl : cl + cw] = content
    return out, pl


def restore(
    panel_image: Any,
    placement: PanelPlacement,
    *,
    resample: str = "lanczos",
    fill: float | Sequence[float] = 1.0,
) -> np.ndarray:
    """Invert :func:`fit`: panel ``(P, P[, C])`` -> image at the original ``(orig_h, orig_w[, C])``.

    "pad": crop the content box, resize to the original size. "stretch": resize back. "crop": the
    panel is resized back to the square it was cut from and placed in an original-size image whose
    never-seen margins are ``fill``.
    """
    a = np.asarray(panel_image, dtype=np.float32)
    squeeze = a.ndim == 2
    if squeeze:
        a = a[:, :, None]
    p = placement.panel
    if a.ndim != 3 or a.shape[:2] != (p, p):
        raise ValueError(
            f"panel_image must have shape ({p}, {p}[, C]) to match the placement, got {np.shape(panel_image)}"
        )
    ct, cl, ch, cw = placement.content
    st, sl, sh, sw = placement.source
    content = resize(a[ct : ct + ch, cl : cl + cw], (sh, sw), resample)
    if (sh, sw) == placement.orig_size:
        out = content
    else:
        out = np.empty((placement.orig_h, placement.orig_w, a.shape[2]), np.float32)
        out[...] = _fill_vector(fill, a.shape[2], "fill")
        out[st : st + sh, sl : sl + sw] = content
    return out[:, :, 0] if squeeze else out


# ----------------------------------------------------------------------------------------------
# the 2x2 canvas


def panel_slices(panel: int) -> tuple[tuple[slice, slice], ...]:
    """``(rows, cols)`` slices of each panel in a ``2P x 2P`` canvas, order A, A', B, B'."""
    p = _pos_int(panel, "panel")
    return tuple((slice(r * p, (r + 1) * p), slice(c * p, (c + 1) * p)) for r, c in _PANEL_POS)


@dataclasses.dataclass(frozen=True, eq=False)
class Canvas:
    """A composed ``2P x 2P x C`` canvas.

    ``placements`` are in panel order (A, A', B, B'); when no B' was given its placement is B's, so
    :meth:`restore_output` returns the painted B' at B's original size and aspect.
    """

    image: np.ndarray
    placements: tuple[PanelPlacement, PanelPlacement, PanelPlacement, PanelPlacement]
    panel: int
    has_target: bool

    def panels(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        return split(self.image, self.panel)

    def mask(self, dtype: Any = np.float32) -> np.ndarray:
        return bprime_mask(self.panel, dtype)

    def token_grid(self, ae_factor: int = 8) -> tuple[int, int]:
        return canvas_token_grid(self.panel, ae_factor)

    def restore_output(self, image: Any, **kwargs: Any) -> np.ndarray:
        """B' at the original size: ``image`` is a full canvas ``(2P, 2P, C)`` or just the B' panel."""
        a = np.asarray(image)
        if a.shape[:2] == (2 * self.panel, 2 * self.panel):
            a = split(a, self.panel)[3]
        return restore(a, self.placements[3], **kwargs)


def compose(
    A: Any,
    A_out: Any,
    B: Any,
    B_out: Any = None,
    *,
    panel: int = DEFAULT_PANEL,
    policy: str = "pad",
    multiple: int = DEFAULT_MULTIPLE,
    pad_value: float | Sequence[float] = 1.0,
    fill: float | Sequence[float] = 0.5,
    resample: str = "lanczos",
) -> Canvas:
    """Lay out ``[[A, A'], [B, B']]`` as one ``2P x 2P x C`` float32 canvas.

    ``B_out=None`` (inference) fills the B' panel with ``fill`` (default 0.5, i.e. 0 in [-1, 1]:
    what FLUX.1-Fill feeds for masked pixels). ``panel`` must be a positive multiple of
    ``multiple`` (16 for FLUX: autoencoder factor 8 x 2x2 packing).
    """
    p = _check_panel(panel, multiple)
    _check_policy(policy)
    _check_resample(resample)
    names = PANEL_NAMES if B_out is not None else PANEL_NAMES[:3]
    imgs = [_as_image(x, n) for x, n in zip((A, A_out, B, B_out), names)]
    chans = {n: im.shape[2] for n, im in zip(names, imgs)}
    if len(set(chans.values())) != 1:
        raise ValueError(f"all images must have the same number of channels after conversion, got {chans}")
    c = imgs[0].shape[2]
    fill_v = _fill_vector(fill, c, "fill")
    _fill_vector(pad_value, c, "pad_value")

    canvas = np.empty((2 * p, 2 * p, c), np.float32)
    placements = []
    sl = panel_slices(p)
    for k, (im, n) in enumerate(zip(imgs, names)):
        fitted, pl = fit(im, p, policy, pad_value=pad_value, resample=resample, name=n)
        canvas[sl[k]] = fitted
        placements.append(pl)
    if B_out is None:
        canvas[sl[3]] = fill_v
        placements.append(placements[2])
    return Canvas(canvas, tuple(placements), p, B_out is not None)


def split(canvas_image: Any, panel: int | None = None) -> tuple[Any, Any, Any, Any]:
    """``(..., 2P, 2P, C)`` (or ``(2P, 2P)``) canvas -> ``(A, A', B, B')`` panels (views, not copies).

    Works on numpy and jax arrays. ``panel=None`` infers ``P`` from the shape.
    """
    shape = np.shape(canvas_image)
    if len(shape) < 2:
        raise ValueError(f"canvas_image must be (2P, 2P) or (..., 2P, 2P, C), got shape {shape}")
    h, w = shape if len(shape) == 2 else shape[-3:-1]
    if panel is None:
        if h != w or h % 2 or h == 0:
            raise ValueError(f"canvas must be a non-empty square of even side, got {h}x{w}")
        panel = h // 2
    p = _pos_int(panel, "panel")
    if (h, w) != (2 * p, 2 * p):
        raise ValueError(f"canvas spatial size must be {2 * p}x{2 * p} for panel={p}, got {h}x{w}")
    if len(shape) == 2:
        return tuple(canvas_image[r, c] for r, c in panel_slices(p))
    return tuple(canvas_image[..., r, c, :] for r, c in panel_slices(p))


def panel_mask(panel: int, which: int | str, dtype: Any = np.float32) -> np.ndarray:
    """``(2P, 2P)`` mask, 1 on panel ``which`` (index 0-3 or a name from ``PANEL_NAMES``), 0 elsewhere."""
    p = _pos_int(panel, "panel")
    k = PANEL_NAMES.index(which) if isinstance(which, str) else operator.index(which)
    if not 0 <= k < 4:
        raise ValueError(f"which must be 0..3 or one of {PANEL_NAMES}, got {which!r}")
    m = np.zeros((2 * p, 2 * p), dtype=dtype)
    m[panel_slices(p)[k]] = 1
    return m


def bprime_mask(panel: int, dtype: Any = np.float32) -> np.ndarray:
    """``(2P, 2P)`` mask, 1 on the B' (bottom-right) panel, 0 elsewhere."""
    return panel_mask(panel, 3, dtype)


# ----------------------------------------------------------------------------------------------
# token layout


def canvas_token_grid(panel: int, ae_factor: int = 8) -> tuple[int, int]:
    """Token grid ``(h_tokens, w_tokens)`` of a ``2P x 2P`` canvas after the autoencoder + 2x2 packing."""
    f = _pos_int(ae_factor, "ae_factor")
    p = _check_panel(panel, 2 * f)
    n = 2 * p // (2 * f)
    return n, n


def pack_latents(z: Any) -> Any:
    """``(B, H, W, C)`` latents -> ``(B, (H/2)*(W/2), 4C)`` tokens (numpy or jax, jit-safe).

    Token ``(i, j)`` (row-major) holds latent pixels ``(2i+dy, 2j+dx)`` at channel ``c*4 + dy*2 + dx``,
    exactly diffusers ``FluxPipeline._pack_latents`` on the NCHW tensor.
    """
    if len(z.shape) != 4:
        raise ValueError(f"pack_latents expects (B, H, W, C) latents, got shape {tuple(z.shape)}")
    b, h, w, c = z.shape
    if h % 2 or w % 2:
        raise ValueError(f"latent height and width must be even for 2x2 packing, got {h}x{w}")
    z = z.reshape(b, h // 2, 2, w // 2, 2, c)
    z = z.transpose(0, 1, 3, 5, 2, 4)  # b, i, j, c, dy, dx
    return z.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(tokens: Any, height: int, width: int) -> Any:
    """Inverse of :func:`pack_latents`: ``(B, (H/2)*(W/2), 4C)`` -> ``(B, H, W, C)``.

    ``height`` / ``width`` are the *latent* size (not pixels, unlike diffusers' ``_unpack_latents``).
    """
    if len(tokens.shape) != 3:
        raise ValueError(f"unpack_latents expects (B, N, 4C) tokens, got shape {tuple(tokens.shape)}")
    h = _pos_int(height, "height")
    w = _pos_int(width, "width")
    b, n, c4 = tokens.shape
    if h % 2 or w % 2:
        raise ValueError(f"latent height and width must be even, got {h}x{w}")
    if n != (h // 2) * (w // 2) or c4 % 4:
        raise ValueError(
            f"tokens of shape {tuple(tokens.shape)} do not unpack to {h}x{w} latents "
            f"(need {(h // 2) * (w // 2)} tokens and channels divisible by 4)"
        )
    z = tokens.reshape(b, h // 2, w // 2, c4 // 4, 2, 2)  # b, i, j, c, dy, dx
    z = z.transpose(0, 1, 4, 2, 5, 3)  # b, i, dy, j, dx, c
    return z.reshape(b, h, w, c4 // 4)


def latent_image_ids(h_tokens: int, w_tokens: int) -> np.ndarray:
    """``(h*w, 3)`` float32 position ids, row-major: ``[0, row, col]`` (diffusers ``_prepare_latent_image_ids``)."""
    h = _pos_int(h_tokens, "h_tokens")
    w = _pos_int(w_tokens, "w_tokens")
    ids = np.zeros((h, w, 3), np.float32)
    ids[..., 1] = np.arange(h, dtype=np.float32)[:, None]
    ids[..., 2] = np.arange(w, dtype=np.float32)[None, :]
    return ids.reshape(h * w, 3)


def _check_even_grid(h_tokens: int, w_tokens: int) -> tuple[int, int]:
    h = _pos_int(h_tokens, "h_tokens")
    w = _pos_int(w_tokens, "w_tokens")
    if h % 2 or w % 2:
        raise ValueError(f"token grid {h}x{w} cannot be split into 2x2 panels: h_tokens and w_tokens must be even")
    return h, w


def panel_token_indices(h_tokens: int, w_tokens: int) -> np.ndarray:
    """int32 ``(4, (h/2)*(w/2))``: row k lists the image-token indices of panel k (A, A', B, B').

    Indices are into the packed image-token sequence (add the text length for the joint sequence)
    and are in raster order within the panel, so ``idx[k][t]`` is the same relative position in
    every panel.
    """
    h, w = _check_even_grid(h_tokens, w_tokens)
    ph, pw = h // 2, w // 2
    grid = np.arange(h * w, dtype=np.int32).reshape(h, w)
    return np.stack([grid[r * ph : (r + 1) * ph, c * pw : (c + 1) * pw].reshape(-1) for r, c in _PANEL_POS])


def token_groups(num_text_tokens: int, h_tokens: int, w_tokens: int) -> np.ndarray:
    """int32 ``(num_text + h*w,)`` group id per token of the joint ``[text, image]`` sequence.

    0 = text, 1 = A, 2 = A', 3 = B, 4 = B' (``GROUP_NAMES``).
    """
    try:
        if isinstance(num_text_tokens, bool):
            raise TypeError
        t = operator.index(num_text_tokens)
    except TypeError:
        raise TypeError(f"num_text_tokens must be an integer, got {num_text_tokens!r}") from None
    if t < 0:
        raise ValueError(f"num_text_tokens must be non-negative, got {t}")
    h, w = _check_even_grid(h_tokens, w_tokens)
    img = np.empty(h * w, np.int32)
    for k, idx in enumerate(panel_token_indices(h, w)):
        img[idx] = k + 1
    return np.concatenate([np.zeros(t, np.int32), img])


def pack_mask(mask: Any, factor: int = 8) -> Any:
    """FLUX.1-Fill mask packing, channels last: pixel mask ``(B, H, W)`` -> ``(B, N, 4 * factor**2)``.

    Same values and order as diffusers ``FluxFillPipeline.prepare_mask_latents``: each latent pixel
    gets its ``factor x factor`` pixel block as channels ``fy * factor + fx``, then the 2x2 packing of
    :func:`pack_latents` (channel ``(fy * factor + fx) * 4 + dy * 2 + dx``). ``H`` and ``W`` must be
    multiples of ``2 * factor``. Works on numpy and jax arrays.
    """
    f = _pos_int(factor, "factor")
    if len(mask.shape) != 3:
        raise ValueError(f"pack_mask expects a (B, H, W) pixel mask, got shape {tuple(mask.shape)}")
    b, hh, ww = mask.shape
    if hh % (2 * f) or ww % (2 * f):
        raise ValueError(f"mask size {hh}x{ww} must be a multiple of 2 * factor = {2 * f} in both dimensions")
    h, w = hh // f, ww // f
    m = mask.reshape(b, h, f, w, f).transpose(0, 1, 3, 2, 4).reshape(b, h, w, f * f)
    return pack_latents(m)
