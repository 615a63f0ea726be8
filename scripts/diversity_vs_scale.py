"""The paper's claim at our scale: task diversity vs scale.

Two identical small models are trained for the same number of steps on the same number of
examples (steps × batch): one on a quarter of the training relation families (stratified by
category, so each family is seen ~4× as often: more examples per task), one on all of them (more
tasks). Both are evaluated on the held-out families, which neither has seen.

    python scripts/diversity_vs_scale.py --workdir runs/diversity [--steps 600 --episodes 6 --seeds 2]

Both arms use the bundled pico-tiny's recipe (configs/pico_tiny.py; --config for another) with
only the step count and the families changed.

Writes WORKDIR/diversity.md and WORKDIR/diversity.json. Training runs resume from WORKDIR.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def quarter_of(families: list[str]) -> list[str]:
    """A category-stratified quarter: the first round(n/4) (at least 1) families (sorted) of each category."""
    from pico_jax.data.relations import FAMILIES

    by_cat: dict[str, list[str]] = {}
    for f in sorted(families):
        by_cat.setdefault(FAMILIES[f].category, []).append(f)
    return sorted(f for fams in by_cat.values() for f in fams[: max(1, round(len(fams) / 4))])


def base_config(steps: int, families: list[str], config: str = "configs/pico_tiny.py", query_hint: bool | None = None):
    """The recipe of `config` (default: the bundled pico-tiny's), trained for `steps` on `families`."""
    from pico_jax.train_cli import load_config_file

    cfg = load_config_file(config)
    return dataclasses.replace(
        cfg, steps=steps, warmup_steps=min(cfg.warmup_steps, max(steps // 10, 1)), log_every=25,
        checkpoint_every=steps, sample_every=0, sample_steps=12, data={"kind": "procedural", "families": families},
        query_hint=cfg.query_hint if query_hint is None else query_hint,
    )


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", default="runs/diversity")
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--episodes", type=int, default=6)
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--sample-steps", type=int, default=12)
    ap.add_argument("--config", default="configs/pico_tiny.py",
                    help="the training recipe both arms use (default: the bundled pico-tiny's, steps overridden)")
    ap.add_argument("--no-query-hint", dest="query_hint", action="store_false", default=None,
                    help="blank B' in the Fill condition (FLUX.1-Fill's convention) instead of showing B there, "
                         "as pico-tiny does (see CanvasLayout.query_hint)")
    args = ap.parse_args(argv)

    from pico_jax.data.relations import SPLITS
    from pico_jax.eval import bootstrap_mean_ci, evaluate
    from pico_jax.pipeline import SamplingPlan
    from pico_jax.trainer import Trainer

    work = Path(args.workdir)
    train = sorted(SPLITS["train"])
    arms = {"quarter": quarter_of(train), "all": train}
    heldout = sorted(SPLITS["heldout"])
    results = {}
    for name, fams in arms.items():
        tr = Trainer(base_config(args.steps, fams, args.config, args.query_hint), work / name, progress=True)
        tr.run()
        pipe = tr.pipeline(SamplingPlan(steps=args.sample_steps, seeds=args.seeds, mu=0.0), batch_size=8)
        res = evaluate(pipe, heldout, args.episodes, args.seeds, steps=args.sample_steps, score_steps=2,
                       out_dir=work / f"eval_{name}", split="heldout", progress=True)
        results[name] = {"families": fams, "eval": res}

    rows, diffs = [], {"mask": [], "image": []}
    for f in heldout:
        q, a = (results[k]["eval"]["families"][f] for k in ("quarter", "all"))
        sq = np.array([e["metrics"]["ours_full"]["score"] for e in q["episodes"]])
        sa = np.array([e["metrics"]["ours_full"]["score"] for e in a["episodes"]])
        diffs[q["kind"]].append(sa - sq)
        best = results["all"]["eval"]["summary"]["families"][f]["best_baseline"]
        rows.append((f, q["category"], q["metric"], sq.mean(), sa.mean(), best["method"], best["score"]))
    lines = [
        f"Training: {args.steps} steps × batch 16 for both models (same examples seen); quarter = {len(arms['quarter'])} "
        f"families ({', '.join(arms['quarter'])}), all = {len(train)} families. Evaluation: the {len(heldout)} held-out "
        f"families, {args.episodes} episodes each (evaluation seeds), {args.seeds} seeds, {args.sample_steps} steps, "
        f"full-run scorer choice. Recipe: `{args.config}` (width {tr.cfg.model.width}, {tr.cfg.model.num_double}+"
        f"{tr.cfg.model.num_single} blocks, prediction {tr.cfg.prediction}, query hint "
        f"{'on' if tr.cfg.query_hint else 'off'}).", "",
        "| held-out family | category | metric | quarter of families | all families | best no-learning baseline |",
        "|---|---|---|---|---|---|",
    ]
    fmt = lambda m, v: f"{v:.3f}" if m == "iou" else f"{v:.2f}"  # noqa: E731
    for f, cat, m, q, a, bm, bs in rows:
        lines.append(f"| {f} | {cat} | {m.upper()} | {fmt(m, q)} | {fmt(m, a)} | {bm} {fmt(m, bs)} |")
    lines.append("")
    summary = {}
    for kind, ds in diffs.items():
        if ds:
            ci = bootstrap_mean_ci(ds)
            summary[kind] = ci
            unit = "IoU" if kind == "mask" else "dB PSNR"
            lines.append(f"- {kind} families: all − quarter = {ci['mean']:+.3f} {unit} "
                         f"[95% CI {ci['ci_low']:+.3f}, {ci['ci_high']:+.3f}] over {ci['n']} episodes")
    (work / "diversity.md").write_text("\n".join(lines) + "\n")
    (work / "diversity.json").write_text(json.dumps({"arms": arms, "rows": rows, "summary": summary}, indent=2, default=float))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
