"""Write example episodes of the procedural relations and a contact sheet.

    python scripts/make_examples.py [--size 64] [--seed 0] [--out assets]

* ``<out>/examples/<family>.png``: A | A_out | B | B_out strips for two families per category
  (query triple A, A_out, B and the target B_out), panels upscaled 2x with pixel repetition.
* ``<out>/examples/<family>/{A,A_out,B,B_out}.png``: separate panels at ``--triple-size`` (the
  bundled model's panel size) from an evaluation seed, for `python infer.py --exemplar ... --query ...`.
* ``<out>/relations_sheet.png``: one episode per family, grouped by category, with the family
  name, category, output kind and split.
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np
from PIL import Image, ImageDraw, ImageFont

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from pico_jax.data.relations import CATEGORIES, FAMILIES, SPLITS, eval_seed, sample_episode  # noqa: E402

EXAMPLE_FAMILIES = ("denoise", "inpaint_hole", "depth_layers", "surface_normals",
                    "segment_shape", "count_dots", "recolor", "add_object")


def _u8(img: np.ndarray) -> np.ndarray:
    return (np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8)


def strip(ep, scale: int = 2, gap: int = 4) -> np.ndarray:
    panels = [np.repeat(np.repeat(_u8(p), scale, 0), scale, 1) for p in ep.panels()]
    h = panels[0].shape[0]
    sep = np.full((h, gap, 3), 255, np.uint8)
    parts = []
    for i, p in enumerate(panels):
        parts.append(p)
        if i < 3:
            parts.append(np.full((h, gap * (3 if i == 1 else 1), 3), 255, np.uint8) if i == 1 else sep)
    return np.concatenate(parts, 1)


def _font(size: int):
    for path in ("/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
                 "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf"):
        if os.path.exists(path):
            return ImageFont.truetype(path, size)
    try:
        return ImageFont.load_default(size=size)
    except TypeError:
        return ImageFont.load_default()


def contact_sheet(size: int, seed: int, columns: int = 3, scale: int | None = None) -> Image.Image:
    scale = scale or max(1, 128 // size)
    names = [n for c in CATEGORIES for n in FAMILIES if FAMILIES[n].category == c]
    label_w, pad = 190, 10
    cell_h = max(size * scale, 100) + pad
    strip_w = 4 * size * scale + 4 * 3 + 4 * 2
    cell_w = label_w + strip_w + 2 * pad
    rows = (len(names) + columns - 1) // columns
    header = 30
    sheet = Image.new("RGB", (columns * cell_w, header + rows * cell_h + pad), "white")
    draw = ImageDraw.Draw(sheet)
    f_big, f_small = _font(15), _font(12)
    draw.text((pad, 6), f"pico_jax procedural relations: A | A' | B | B'  (size {size}, seed {seed}; "
                        f"* = held-out family)", fill="black", font=f_big)
    held = set(SPLITS["heldout"])
    for k, name in enumerate(names):
        col, row = divmod(k, rows)
        x, y = col * cell_w + pad, header + row * cell_h
        fam = FAMILIES[name]
        ep = sample_episode(name, seed, size)
        sheet.paste(Image.fromarray(strip(ep, scale)), (x + label_w, y))
        draw.text((x, y + 4), name + (" *" if name in held else ""), fill="black", font=f_big)
        draw.text((x, y + 24), f"{fam.category} / {fam.output_kind}", fill=(90, 90, 90), font=f_small)
        ptxt = ", ".join(f"{k}={_fmt(v)}" for k, v in ep.params.items())
        for j, line in enumerate(_wrap(ptxt, 26)[:4]):
            draw.text((x, y + 42 + 14 * j), line, fill=(40, 40, 160), font=f_small)
    return sheet


def _fmt(v):
    if isinstance(v, float):
        return f"{v:.2f}"
    if isinstance(v, list):
        return "[" + ",".join(_fmt(a) for a in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{a}:{b}" for a, b in v.items()) + "}"
    return str(v)


def _wrap(text: str, width: int) -> list[str]:
    out, line = [], ""
    for word in text.split(" "):
        if len(line) + len(word) + 1 > width and line:
            out.append(line)
            line = word
        else:
            line = (line + " " + word).strip()
    if line:
        out.append(line)
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--triple-size", type=int, default=32)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "assets"))
    args = ap.parse_args(argv)
    ex_dir = os.path.join(args.out, "examples")
    os.makedirs(ex_dir, exist_ok=True)
    for name in EXAMPLE_FAMILIES:
        ep = sample_episode(name, args.seed, args.size)
        Image.fromarray(strip(ep)).save(os.path.join(ex_dir, f"{name}.png"))
        triple = sample_episode(name, eval_seed(args.seed), args.triple_size)
        os.makedirs(os.path.join(ex_dir, name), exist_ok=True)
        for key, panel in zip(("A", "A_out", "B", "B_out"), triple.panels()):
            Image.fromarray(_u8(panel)).save(os.path.join(ex_dir, name, f"{key}.png"))
    contact_sheet(args.size, args.seed).save(os.path.join(args.out, "relations_sheet.png"))
    print(f"wrote {len(EXAMPLE_FAMILIES)} examples to {ex_dir} and {os.path.join(args.out, 'relations_sheet.png')}")


if __name__ == "__main__":
    main()
