"""Image file I/O: robust loading to float RGB and atomic PNG writing.

Conventions
-----------
* In memory an image is a numpy ``float32`` array of shape ``(H, W, 3)`` with values in ``[0, 1]``,
  channels last, RGB order, row 0 at the top.
* Transparency is composited over a **white** background by default (``background=1.0``), i.e.
  ``rgb * alpha + background * (1 - alpha)`` in linear float arithmetic on the stored (gamma encoded)
  values. White matches how most viewers and web pages show transparent PNGs; pass
  ``background=0.0`` (or an RGB triple) for black / another colour. This covers RGBA, LA, PA,
  premultiplied RGBa / La and palette or grey images with a ``transparency`` (tRNS) entry.
* Grey images (1, L, I;16*, I, F) are replicated to three channels. 16-bit modes (``I;16``,
  ``I;16B``, ``I;16L``, ``I;16N``) and 32-bit integer ``I`` (which is how Pillow may hand back
  16-bit PNGs / TIFFs) are scaled by ``1 / 65535`` -- *not* clipped to 8 bits the way
  ``Image.convert("L")`` would; ``I`` values outside ``[0, 65535]`` are clipped after scaling.
  Float ``F`` images are taken to be in ``[0, 1]`` already and clipped.
* Palette, CMYK, YCbCr, LAB, HSV, ... go through Pillow's own conversion to RGB.
* EXIF orientation is applied (``ImageOps.exif_transpose``) so the array is upright as a viewer
  shows it. Multi-frame files (GIF, APNG, TIFF stacks) give their first frame.

Every failure to load raises :class:`ImageError` (a ``ValueError``) whose message names the path.
"""

from __future__ import annotations

import os
import secrets
from typing import Any, Sequence

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

__all__ = [
    "ImageError",
    "load_image",
    "pil_to_array",
    "save_png_atomic",
    "to_uint8",
    "to_pil",
    "from_minus1_1",
    "to_minus1_1",
]

_SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N")
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")


class ImageError(ValueError):
    """An image could not be loaded or is unusable (missing, not an image, truncated, empty)."""


def _background_rgb(background: float | Sequence[float]) -> np.ndarray:
    bg = np.asarray(background, dtype=np.float32).reshape(-1)
    if bg.size == 1:
        bg = np.repeat(bg, 3)
    if bg.size != 3 or not np.all(np.isfinite(bg)):
        raise ValueError(f"background must be a scalar or an RGB triple of finite floats, got {background!r}")
    return bg


def _grey_to_float(img: Image.Image) -> np.ndarray:
    """Single-channel Pillow image -> float32 (H, W) in [0, 1] without 8-bit truncation."""
    mode = img.mode
    if mode in _SIXTEEN_BIT_MODES:
        return np.asarray(img).astype(np.float32) / np.float32(65535.0)
    if mode == "I":
        a = np.asarray(img).astype(np.float64) / 65535.0
        return np.clip(a, 0.0, 1.0).astype(np.float32)
    if mode == "F":
        a = np.asarray(img).astype(np.float32)
        return np.clip(np.nan_to_num(a, nan=0.0), 0.0, 1.0)
    if mode == "1":
        return np.asarray(img, dtype=np.float32)  # bool -> {0, 1}
    if mode == "L":
        return np.asarray(img).astype(np.float32) / np.float32(255.0)
    raise AssertionError(mode)  # pragma: no cover


def pil_to_array(
    img: Image.Image, *, background: float | Sequence[float] = 1.0, name: str | os.PathLike | None = None
) -> np.ndarray:
    """Convert an (already opened) Pillow image to float32 ``(H, W, 3)`` in ``[0, 1]``.

    See the module docstring for the per-mode rules. ``name`` is only used in error messages.
    Does *not* apply EXIF orientation (``load_image`` does that before calling this).
    """
    label = f" {os.fspath(name)!r}" if name is not None else ""
    bg = _background_rgb(background)
    w, h = img.size
    if w <= 0 or h <= 0:
        raise ImageError(f"image{label} is empty ({w}x{h} pixels)")

    mode = img.mode
    has_trns = "transparency" in img.info
    if mode in ("1", "L", "I", "F") + _SIXTEEN_BIT_MODES and not (has_trns and mode in ("1", "L")):
        g = _grey_to_float(img)
        return np.repeat(g[:, :, None], 3, axis=2)

    palette_alpha = mode == "P" and img.palette is not None and img.palette.mode == "RGBA"
    if mode in _ALPHA_MODES or has_trns or palette_alpha:
        if mode == "RGBa":
            img = img.convert("RGBA")  # un-premultiply
        elif mode == "La":
            img = img.convert("LA")
        rgba = np.asarray(img.convert("RGBA")).astype(np.float32) / np.float32(255.0)
        rgb, a = rgba[..., :3], rgba[..., 3:4]
        out = rgb * a + bg * (np.float32(1.0) - a)
        return np.clip(out, 0.0, 1.0).astype(np.float32)

    if mode != "RGB":
        img = img.convert("RGB")  # P, CMYK, YCbCr, LAB, HSV, ...
    return np.asarray(img).astype(np.float32) / np.float32(255.0)


def load_image(path: str | os.PathLike, *, background: float | Sequence[float] = 1.0) -> np.ndarray:
    """Load an image file as float32 ``(H, W, 3)`` RGB in ``[0, 1]``.

    Alpha is composited over ``background`` (default white, 1.0). Raises :class:`ImageError` naming
    ``path`` if the file is missing, is a directory, is empty, is not a recognised image, is
    truncated/corrupt, or decodes to zero pixels.
    """
    p = os.fspath(path)
    if not os.path.exists(p):
        raise ImageError(f"image file not found: {p!r}")
    if os.path.isdir(p):
        raise ImageError(f"image path is a directory, not a file: {p!r}")
    try:
        if os.path.getsize(p) == 0:
            raise ImageError(f"image file is empty (0 bytes): {p!r}")
        with Image.open(p) as img:
            img.load()  # force full decode inside the try: truncation surfaces here
            img = ImageOps.exif_transpose(img)
            return pil_to_array(img, background=background, name=p)
    except ImageError:
        raise
    except UnidentifiedImageError as e:
        raise ImageError(f"not a recognised image file: {p!r}") from e
    except Image.DecompressionBombError as e:
        raise ImageError(f"image {p!r} is too large to load safely: {e}") from e
    except (OSError, SyntaxError, ValueError, EOFError) as e:  # truncated / corrupt data
        raise ImageError(f"could not decode image {p!r} (truncated or corrupt?): {e}") from e


# ----------------------------------------------------------------------------------------------
# array <-> uint8 helpers


def to_uint8(image: Any) -> np.ndarray:
    """Float image in ``[0, 1]`` (clipped, rounded to nearest) or uint8 -> uint8 array.

    ``bool`` maps to {0, 255}. Non-finite floats raise ``ValueError`` (a NaN in a generated image is
    a bug upstream that should not be saved silently as black). Other integer dtypes raise
    ``TypeError`` because their range is ambiguous.
    """
    a = np.asarray(image)
    if a.dtype == np.uint8:
        return a
    if a.dtype == np.bool_:
        return a.astype(np.uint8) * np.uint8(255)
    if np.issubdtype(a.dtype, np.floating) or a.dtype.name == "bfloat16":
        a = a.astype(np.float32)
        if not np.all(np.isfinite(a)):
            raise ValueError("image contains non-finite values (NaN/inf); refusing to convert to uint8")
        return np.round(np.clip(a, 0.0, 1.0) * np.float32(255.0)).astype(np.uint8)
    raise TypeError(f"expected a float image in [0, 1] or uint8, got dtype {a.dtype}")


def to_pil(image: Any) -> Image.Image:
    """Array ``(H, W)``, ``(H, W, 1)``, ``(H, W, 3)`` or ``(H, W, 4)`` (float [0,1] or uint8) -> PIL."""
    if isinstance(image, Image.Image):
        return image
    a = to_uint8(image)
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[:, :, 0]
    if a.ndim == 2:
        mode = "L"
    elif a.ndim == 3 and a.shape[2] in (3, 4):
        mode = "RGB" if a.shape[2] == 3 else "RGBA"
    else:
        raise ValueError(f"cannot make an image from an array of shape {a.shape}; expected (H, W[, 1|3|4])")
    if a.shape[0] == 0 or a.shape[1] == 0:
        raise ValueError(f"cannot save an empty image (shape {a.shape})")
    return Image.fromarray(np.ascontiguousarray(a), mode=mode)


def from_minus1_1(x: Any) -> Any:
    """``[-1, 1]`` -> ``[0, 1]`` (no clipping; works on numpy and jax arrays)."""
    return (x + 1.0) * 0.5


def to_minus1_1(x: Any) -> Any:
    """``[0, 1]`` -> ``[-1, 1]`` (no clipping; works on numpy and jax arrays)."""
    return x * 2.0 - 1.0


# ----------------------------------------------------------------------------------------------
# atomic PNG writing


def save_png_atomic(image: Any, path: str | os.PathLike) -> str:
    """Write ``image`` as a PNG at ``path`` atomically; returns the path as ``str``.

    ``image`` is a PIL image or an array (float in [0, 1], clipped, or uint8; see :func:`to_pil`).
    The data goes to a hidden temp file in the same directory which is fsync'ed and then moved over
    ``path`` with ``os.replace``; on any error (including ``KeyboardInterrupt``) the temp file is
    removed and an existing file at ``path`` is left untouched, so no half-written PNG can appear.
    The format is always PNG whatever the extension. The parent directory must exist.
    """
    p = os.fspath(path)
    pil = to_pil(image)  # validate/convert before touching the filesystem
    directory = os.path.dirname(os.path.abspath(p))
    base = os.path.basename(p)
    while True:  # O_EXCL with a random name: unique, and the process umask applies as for open()
        tmp = os.path.join(directory, f".{base}.{secrets.token_hex(6)}.tmp")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
            break
        except FileExistsError:  # pragma: no cover - astronomically unlikely
            continue
    try:
        with os.fdopen(fd, "wb") as f:
            pil.save(f, format="PNG")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, p)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return p
