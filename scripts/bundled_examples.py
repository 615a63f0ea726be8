"""Run a pico checkpoint (default: the bundled pico-tiny) on the bundled example triples and write
a picture sheet: one row per example, A | A' | B | ours | truth, with the family's score (PSNR,
or IoU for mask families) of ours and of copying B printed beside each row.

    python scripts/bundled_examples.py [--checkpoint DIR] [--seeds N] [--out results/bundled_examples.png]

Sampling is the checkpoint's default (the bundled pico-tiny: 8 seeds, early selection, median of
the best 4), so the sheet shows what `infer.py` writes; --seeds N overrides the seed count.

The examples are assets/examples/<family>/{A,A_out,B,B_out}.png (scripts/make_examples.py writes
them from evaluation seeds, which no training run sees).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

ROOT = Path(__file__).resolve().parent.parent


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", help="a pico checkpoint directory (default: the bundled pico-tiny)")
    ap.add_argument("--examples", default=str(ROOT / "assets" / "examples"), help="folder of <family>/ triples")
    ap.add_argument("--seeds", type=int, help="candidates per query (default: the checkpoint's)")
    ap.add_argument("--out", default=str(ROOT / "results" / "bundled_examples.png"))
    args = ap.parse_args(argv)

    from pico_jax import Pipeline
    from pico_jax.data.relations import FAMILIES
    from pico_jax.eval import make_sheet, metrics_for
    from pico_jax.imageio import load_image, save_png_atomic

    folders = sorted(p for p in Path(args.examples).iterdir() if p.is_dir() and (p / "B_out.png").exists())
    if not folders:
        print(f"bundled_examples.py: error: no <family>/B_out.png triples under {args.examples}", file=sys.stderr)
        return 2
    pipe = Pipeline.load(args.checkpoint)
    rows = []
    for d in folders:
        a, a_out, b, truth = (load_image(d / f"{n}.png") for n in ("A", "A_out", "B", "B_out"))
        res = pipe(a, a_out, [b], **({"seeds": args.seeds} if args.seeds else {}))[0]
        ours = np.clip(res.image, 0, 1)
        kind = FAMILIES[d.name].output_kind if d.name in FAMILIES else "image"
        fmt = (lambda v: f"IoU {v:.2f}") if kind == "mask" else (lambda v: f"{v:.1f} dB")
        ours_s, copy_s = (metrics_for(kind, x, truth)["score"] for x in (ours, b))
        rows.append({"panels": [a, a_out, b, ours, truth], "lines": [d.name, f"ours {fmt(ours_s)}", f"copy B {fmt(copy_s)}"]})
        print(f"{d.name}: ours {fmt(ours_s)}, copy B {fmt(copy_s)}", flush=True)
    sheet = make_sheet(rows, titles=("A", "A'", "B", "ours", "truth"))
    save_png_atomic(sheet, args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
