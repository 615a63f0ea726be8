"""Evaluation harness: PICO on procedural relation episodes with evaluation seeds.

    python -m pico_jax.eval --checkpoint DIR --split heldout --episodes 20 --seeds 8 --out DIR
    python -m pico_jax.eval --split train --families denoise,flip --episodes 4 --seeds 4 --out DIR

For every family of the split, ``--episodes`` episodes are drawn with EVALUATION seeds
(``relations.eval_seed(i)``, never produced by training iterators; the exemplar pair and the
query are drawn independently by ``sample_episode``) at the model's panel size (or
``--panel-size``), and B' is predicted by

  ours_early   the scorer's choice with early selection (selection="early", keep=1)
  ours_full    the scorer's choice after full sampling (selection="full"; its full-run score)
  random_seed  one uniformly random seed of the full run (index from a fixed RNG per episode):
               the unbiased single-sample baseline (seeds are iid)
  oracle       the best of the N full-run candidates BY THE METRIC AGAINST THE TRUTH (an upper
               bound of any seed selection; it peeks at the answer)
  ensemble_early  the per-pixel median of the K seeds early selection keeps (K = --ensemble-keep,
               default N/2; what selection="early", keep=K, ensemble="median" returns)
  ensemble_full   the per-pixel median of all N full-run candidates
  copy_B       B' = B
  analogy      B' = clip(B + (A' - A), 0, 1)
  threshold_B  (mask families) the best global threshold of B's luminance, both polarities,
               chosen per episode WITH THE TRUTH (an oracle threshold: optimistic baseline)

ours_full, random_seed and oracle come from ONE full-selection run that keeps all N candidates;
ours_early from one early-selection run with the same seeds (so both choose among the same N
trajectories). ensemble_early takes the K best seeds by the early run's scores and the full-run
candidates of those seeds: a seed's trajectory does not depend on which others are kept (checked:
`early_vs_full_same_seed_max_abs_diff`), so this is the early plan's ensemble without a third run. Metrics: see :func:`metrics_for`. Statistics: see :func:`summarize`.

Outputs (all written atomically): OUT/results.json, OUT/results.md, OUT/sheet_<split>.png.
API: :func:`evaluate` (used by the CLI; training experiments can call it on a Pipeline).

Evaluations of the same checkpoint and settings over disjoint episode ranges (``--episode-offset``,
e.g. run on several machines, or a fresh confirmation set next to the reported one) pool into one
table, with every statistic recomputed over all their episodes (:func:`merge_results`):

    python -m pico_jax.eval --merge runs/a/results.json runs/b/results.json --out runs/ab
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage as _ndi

from pico_jax.compile_cache import HELP as COMPILE_CACHE_HELP, enable_compile_cache
from pico_jax.infer import GATHER_WEIGHTS_CHOICES, GATHER_WEIGHTS_FLAG_HELP, MESH_FLAG_HELP

__all__ = [
    "METHODS",
    "LEARNED",
    "BASELINES",
    "iou",
    "psnr",
    "l1",
    "ssim",
    "metrics_for",
    "threshold_oracle",
    "bootstrap_mean_ci",
    "win_rate",
    "evaluate",
    "summarize",
    "write_outputs",
    "render_markdown",
    "make_sheet",
    "main",
]

LEARNED = ("ours_early", "ours_full", "random_seed", "oracle", "ensemble_early", "ensemble_full")
# the rows that count as "ours" (oracle peeks at the truth; random_seed is the unscored baseline)
OURS = ("ours_early", "ours_full", "ensemble_early", "ensemble_full")
ENSEMBLE = "median"
BASELINES = ("copy_B", "analogy", "threshold_B")
METHODS = LEARNED + BASELINES
MASK_METRICS = ("iou",)
IMAGE_METRICS = ("psnr", "ssim", "l1")
PSNR_CAP = 100.0  # dB; an exact reconstruction (MSE = 0) scores this instead of +inf
TIE_TOL = 1e-6  # |a - b| <= TIE_TOL counts as a tie in win rates


# ============================================================================ metrics
def iou(pred_mask: np.ndarray, true_mask: np.ndarray) -> float:
    """|P ∩ T| / |P ∪ T| of two bool masks; two empty masks have IoU 1."""
    p, t = np.asarray(pred_mask, bool), np.asarray(true_mask, bool)
    if p.shape != t.shape:
        raise ValueError(f"mask shapes differ: {p.shape} vs {t.shape}")
    union = np.logical_or(p, t).sum()
    if union == 0:
        return 1.0
    return float(np.logical_and(p, t).sum() / union)


def _pair(pred, truth) -> tuple[np.ndarray, np.ndarray]:
    p = np.clip(np.asarray(pred, np.float64), 0.0, 1.0)
    t = np.clip(np.asarray(truth, np.float64), 0.0, 1.0)
    if p.shape != t.shape:
        raise ValueError(f"image shapes differ: {p.shape} vs {t.shape}")
    return p, t


def psnr(pred, truth) -> float:
    """10·log10(1 / MSE) over all pixels and channels, both images clipped to [0, 1] (data range
    1); capped at PSNR_CAP dB (an exact match)."""
    p, t = _pair(pred, truth)
    mse = float(np.mean((p - t) ** 2))
    if mse <= 10 ** (-PSNR_CAP / 10):
        return PSNR_CAP
    return float(10.0 * math.log10(1.0 / mse))


def l1(pred, truth) -> float:
    """Mean absolute error over all pixels and channels (images clipped to [0, 1])."""
    p, t = _pair(pred, truth)
    return float(np.mean(np.abs(p - t)))


def ssim(pred, truth, sigma: float = 1.5, truncate: float = 3.5) -> float:
    """Gaussian-window SSIM (Wang et al. 2004): sigma 1.5 (an 11-tap window), K1 = 0.01,
    K2 = 0.03, data range 1, population (co)variances, 'reflect' borders; the SSIM map is averaged
    over every pixel (borders included) and the channels. On the interior pixels this equals
    skimage's ``structural_similarity(..., gaussian_weights=True, use_sample_covariance=False)``."""
    return float(ssim_map(pred, truth, sigma, truncate).mean())


def ssim_map(pred, truth, sigma: float = 1.5, truncate: float = 3.5) -> np.ndarray:
    p, t = _pair(pred, truth)
    if p.ndim == 2:
        p, t = p[..., None], t[..., None]
    c1, c2 = 0.01**2, 0.03**2

    def blur(x):
        return np.stack([_ndi.gaussian_filter(x[..., c], sigma, mode="reflect", truncate=truncate)
                         for c in range(x.shape[-1])], -1)

    mp, mt = blur(p), blur(t)
    vp = blur(p * p) - mp * mp
    vt = blur(t * t) - mt * mt
    cov = blur(p * t) - mp * mt
    return ((2 * mp * mt + c1) * (2 * cov + c2)) / ((mp * mp + mt * mt + c1) * (vp + vt + c2))


def metrics_for(kind: str, pred, truth) -> dict[str, float]:
    """The metrics of one prediction. "mask": {"iou", "score"} with the masks taken by
    ``relations.mask_from_output`` (max channel > 0.5) of both; "image": {"psnr", "ssim", "l1",
    "score"}. "score" is the family's summary number: IoU for masks, PSNR for images."""
    from pico_jax.data.relations import mask_from_output

    if kind == "mask":
        v = iou(mask_from_output(pred), mask_from_output(truth))
        return {"iou": v, "score": v}
    if kind == "image":
        out = {"psnr": psnr(pred, truth), "ssim": ssim(pred, truth), "l1": l1(pred, truth)}
        out["score"] = out["psnr"]
        return out
    raise ValueError(f"unknown output kind {kind!r}")


def luminance(img) -> np.ndarray:
    a = np.asarray(img, np.float64)
    return a if a.ndim == 2 else a[..., :3] @ np.array([0.299, 0.587, 0.114])


def threshold_oracle(image, true_mask) -> tuple[np.ndarray, float, str, float]:
    """The best global threshold of ``image``'s luminance for ``true_mask`` (an oracle: it looks
    at the truth). Both polarities (bright objects: L > t; dark objects: L < t) and every
    threshold that changes the mask (all-empty and all-full included) are tried.

    Returns (mask, threshold, polarity "above"|"below", IoU)."""
    lum = luminance(image).ravel()
    truth = np.asarray(true_mask, bool).ravel()
    n, n_true = lum.size, int(truth.sum())
    best = (-1.0, 0, "above", None)
    for polarity, order in (("above", np.argsort(-lum, kind="stable")), ("below", np.argsort(lum, kind="stable"))):
        vals = lum[order]
        inter = np.concatenate([[0], np.cumsum(truth[order])])  # |top-j ∩ T| for j = 0..n
        j = np.arange(n + 1)
        union = j + n_true - inter
        with np.errstate(invalid="ignore", divide="ignore"):
            scores = np.where(union == 0, 1.0, inter / np.maximum(union, 1))
        valid = np.ones(n + 1, bool)  # cut only between distinct values (ties go together)
        valid[1:n] = vals[1:] != vals[:-1]
        scores = np.where(valid, scores, -1.0)
        k = int(np.argmax(scores))
        if scores[k] > best[0]:
            best = (float(scores[k]), k, polarity, order)
    score, k, polarity, order = best
    mask = np.zeros(n, bool)
    mask[order[:k]] = True
    vals = lum[order]
    if k == 0:
        thr = float(vals[0] + 1e-6) if polarity == "above" else float(vals[0] - 1e-6)
    elif k == n:
        thr = float(vals[-1] - 1e-6) if polarity == "above" else float(vals[-1] + 1e-6)
    else:
        thr = float((vals[k - 1] + vals[k]) / 2)
    return mask.reshape(np.shape(true_mask)), thr, polarity, score


# ============================================================================ statistics
def bootstrap_mean_ci(groups: Sequence[Sequence[float]], n_boot: int = 10000, seed: int = 0,
                      level: float = 0.95) -> dict[str, Any]:
    """Mean of all values with a percentile bootstrap CI, stratified by group: every replicate
    resamples each group's values (episodes of one family) with replacement, so each family keeps
    its number of episodes. Fixed RNG (``seed``)."""
    gs = [np.asarray(g, np.float64) for g in groups if len(g)]
    if not gs:
        return {"mean": None, "ci_low": None, "ci_high": None, "n": 0, "level": level, "n_boot": n_boot}
    allv = np.concatenate(gs)
    rng = np.random.default_rng(seed)
    total = np.zeros(n_boot)
    for g in gs:
        for start in range(0, n_boot, 1000):  # bounded memory for many episodes
            m = min(1000, n_boot - start)
            total[start:start + m] += g[rng.integers(0, len(g), (m, len(g)))].sum(1)
    boots = total / allv.size
    lo, hi = np.quantile(boots, [(1 - level) / 2, 1 - (1 - level) / 2])
    mean = float(allv.mean())
    # Constant data: the replicate means equal the mean only up to rounding; keep mean inside.
    lo = min(float(lo), mean) if np.isclose(lo, mean) else float(lo)
    hi = max(float(hi), mean) if np.isclose(hi, mean) else float(hi)
    return {"mean": mean, "ci_low": lo, "ci_high": hi, "n": int(allv.size), "level": level, "n_boot": n_boot}


def win_rate(a: Sequence[float], b: Sequence[float], tol: float = TIE_TOL) -> dict[str, Any]:
    """Episodes where a > b (wins), |a - b| <= tol (ties), a < b (losses);
    win_rate = (wins + ties / 2) / n."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    d = a - b
    wins, ties = int(np.sum(d > tol)), int(np.sum(np.abs(d) <= tol))
    n = int(d.size)
    return {"wins": wins, "ties": ties, "losses": n - wins - ties,
            "win_rate": (wins + ties / 2) / n if n else None, "n": n}


# ============================================================================ running
def _family_info(name: str) -> dict[str, str]:
    from pico_jax.data.relations import FAMILIES, SPLITS

    f = FAMILIES[name]
    return {"category": f.category, "kind": f.output_kind, "metric": "iou" if f.output_kind == "mask" else "psnr",
            "split": "heldout" if name in SPLITS["heldout"] else "train"}


def _random_index(family: str, episode_index: int, n: int, seed: int) -> int:
    """The random_seed baseline's candidate: fixed per (family, episode, RNG seed), independent of
    which other families or how many episodes are evaluated."""
    rng = np.random.default_rng([zlib.crc32(family.encode()), int(episode_index), int(seed)])
    return int(rng.integers(n))


def _plans(pipeline, seeds: int, steps: int | None, score_steps: int | None):
    base = pipeline.plan
    if steps is not None:
        base = dataclasses.replace(base, steps=int(steps))
    scorer = base.scorer
    if score_steps is not None:
        scorer = dataclasses.replace(scorer, steps=int(score_steps))
    base = dataclasses.replace(base, seeds=int(seeds), scorer=scorer, keep=1, ensemble=None)
    early = dataclasses.replace(base, selection="early", keep=1).validate()
    full = dataclasses.replace(base, selection="full", keep=int(seeds)).validate()
    return early, full


def _jsonable(x):
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.ndarray):
        return _jsonable(x.tolist())
    if isinstance(x, (np.bool_, bool)):
        return bool(x)
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (float, np.floating)):
        v = float(x)
        return v if math.isfinite(v) else None  # JSON has no NaN/inf: a non-finite metric is null
    return x


def evaluate(
    pipeline,
    families: Sequence[str],
    episodes: int = 20,
    seeds: int = 8,
    *,
    steps: int | None = None,
    score_steps: int | None = None,
    panel_size: int | None = None,
    sample_seed: int = 0,
    episode_offset: int = 0,
    random_seed_rng: int = 0,
    ensemble_keep: int | None = None,
    n_boot: int = 10000,
    stats_seed: int = 0,
    sheet_episodes: int = 3,
    out_dir: str | os.PathLike | None = None,
    split: str | None = None,
    progress: bool = True,
    settings_extra: dict | None = None,
) -> dict[str, Any]:
    """Evaluate ``pipeline`` (a :class:`pico_jax.pipeline.Pipeline`) on ``families``.

    Episode i of a family is ``sample_episode(family, eval_seed(episode_offset + i), size)`` with
    size = ``panel_size`` or the model's panel. Diffusion seeds are sample_seed .. sample_seed+N-1
    for every episode and both runs. Returns a JSON-able dict::

        {"settings": {...}, "families": {name: {"category", "split", "kind", "metric",
            "episodes": [{"index", "seed", "params", "seeds", "scores_early", "scores_full",
                          "chosen": {method: seed}, "candidates": [{"seed", "score", "metrics"}],
                          "metrics": {method: {metric: value, "score": value}}, ...}]}},
         "summary": summarize(...)}

    With ``out_dir`` it also writes results.json, results.md and sheet_<split>.png there."""
    from tqdm import tqdm

    from pico_jax import grid
    from pico_jax.data.relations import FAMILIES, SPLITS, eval_seed, mask_from_output, render_mask, sample_episode

    families = list(families)
    unknown = [f for f in families if f not in FAMILIES]
    if unknown:
        raise KeyError(f"unknown families {unknown}; known: {sorted(FAMILIES)}")
    if episodes < 1 or seeds < 1:
        raise ValueError(f"episodes and seeds must be >= 1 (got {episodes}, {seeds})")
    early_plan, full_plan = _plans(pipeline, seeds, steps, score_steps)
    keep_ens = max(2, seeds // 2) if ensemble_keep is None else int(ensemble_keep)
    if seeds >= 2 and not 2 <= keep_ens <= seeds:
        raise ValueError(f"ensemble_keep (--ensemble-keep) must be within 2..{seeds} seeds (got {keep_ens})")
    from pico_jax.pipeline import ensemble_panels
    panel = pipeline.layout.panel
    size = int(panel_size or panel)
    if split is None:
        split = next((s for s in ("heldout", "train") if set(families) <= set(SPLITS[s])), "mixed")

    results: dict[str, Any] = {"families": {}}
    sheet_rows: list[dict] = []
    max_seed_mismatch = 0.0
    t_early = t_full = 0.0
    bar = tqdm(total=len(families) * episodes, unit="episode", desc="eval", disable=not progress)
    t0 = time.time()
    for fam in families:
        info = _family_info(fam)
        kind = info["kind"]
        bar.set_postfix_str(fam)
        eps = [sample_episode(fam, eval_seed(episode_offset + i), size) for i in range(episodes)]
        records = []
        for start in range(0, episodes, pipeline.batch_size):
            chunk = eps[start:start + pipeline.batch_size]
            canvases = [grid.compose(e.A, e.A_out, e.B, panel=panel, policy=pipeline.policy,
                                     multiple=2 * pipeline.layout.ae_factor) for e in chunk]
            t = time.time()
            early = pipeline.run_canvases(canvases, early_plan, seed=sample_seed)
            t_early += time.time() - t
            t = time.time()
            full = pipeline.run_canvases(canvases, full_plan, seed=sample_seed)
            t_full += time.time() - t
            for j, (ep, cv, re, rf) in enumerate(zip(chunk, canvases, early, full)):
                i = start + j
                seed_list = list(rf.seeds)
                # Result.candidates are best first; Result has no seed per candidate, so rebuild
                # the order the sampler used (scorer.choose = a stable argsort of -scores; the
                # float32 scores survive the float round trip exactly) and check it against
                # chosen_seed.
                order = np.argsort(-np.asarray(rf.scores, np.float32), kind="stable")
                if seed_list[int(order[0])] != rf.chosen_seed:
                    raise RuntimeError(f"{fam} episode {i}: cannot map full-run candidates to seeds "
                                       f"(chosen {rf.chosen_seed}, reconstructed {seed_list[int(order[0])]})")
                by_seed = {seed_list[int(o)]: np.clip(cv.restore_output(c), 0, 1) for o, c in zip(order, rf.candidates)}
                truth = ep.B_out
                cand = [{"seed": s, "score": float(rf.scores[k]), "metrics": metrics_for(kind, by_seed[s], truth)}
                        for k, s in enumerate(seed_list)]
                r_idx = _random_index(fam, episode_offset + i, len(seed_list), random_seed_rng)
                o_idx = int(np.argmax([c["metrics"]["score"] for c in cand]))  # first best on ties
                early_img = np.clip(re.image, 0, 1)
                if re.chosen_seed in by_seed:  # same seed, same trajectory: a consistency check
                    max_seed_mismatch = max(max_seed_mismatch, float(np.abs(early_img - by_seed[re.chosen_seed]).max()))
                preds = {
                    "ours_early": early_img,
                    "ours_full": by_seed[rf.chosen_seed],
                    "copy_B": ep.B,
                    "analogy": np.clip(ep.B + (ep.A_out - ep.A), 0.0, 1.0),
                }
                m = {k: metrics_for(kind, v, truth) for k, v in preds.items()}
                m["random_seed"] = dict(cand[r_idx]["metrics"])
                m["oracle"] = dict(cand[o_idx]["metrics"])
                ens_seeds = []
                if len(seed_list) >= 2:
                    e_order = np.argsort(-np.asarray(re.scores, np.float32), kind="stable")[:keep_ens]
                    ens_seeds = [seed_list[int(o)] for o in e_order]
                    preds_ens = {"ensemble_early": ensemble_panels([by_seed[s] for s in ens_seeds], ENSEMBLE),
                                 "ensemble_full": ensemble_panels([by_seed[s] for s in seed_list], ENSEMBLE)}
                    m.update({k: metrics_for(kind, v, truth) for k, v in preds_ens.items()})
                rec: dict[str, Any] = {
                    "index": episode_offset + i, "seed": ep.seed, "params": ep.params, "seeds": seed_list,
                    "scores_early": list(re.scores), "scores_full": list(rf.scores),
                    "chosen": {"ours_early": re.chosen_seed, "ours_full": rf.chosen_seed,
                               "random_seed": seed_list[r_idx], "oracle": seed_list[o_idx]},
                    "ensemble_early_seeds": ens_seeds,
                    "candidates": cand,
                }
                if kind == "mask":
                    tmask, thr, pol, _ = threshold_oracle(ep.B, mask_from_output(truth))
                    m["threshold_B"] = metrics_for(kind, render_mask(tmask), truth)
                    rec["threshold_B"] = {"threshold": thr, "polarity": pol}
                rec["metrics"] = {k: m[k] for k in METHODS if k in m}
                records.append(rec)
                if i < sheet_episodes:
                    ens_img = preds_ens["ensemble_early"] if ens_seeds else early_img
                    sheet_rows.append({"family": fam, "index": episode_offset + i, **info,
                                       "panels": [ep.A, ep.A_out, ep.B, early_img, ens_img, truth]})
            bar.update(len(chunk))
        results["families"][fam] = {**info, "episodes": records}
    bar.close()

    cost = lambda p, early: p.seeds * p.scorer.steps + (p.steps - p.scorer.steps) if early else p.seeds * p.steps  # noqa: E731
    results["settings"] = {
        "families": families, "split": split, "episodes": episodes, "seeds": seeds,
        "episode_seeds": f"relations.eval_seed(i) = {eval_seed(0)} + i for i in "
                         f"[{episode_offset}, {episode_offset + episodes})",
        "episode_size": size, "model_panel": panel, "ae_factor": pipeline.layout.ae_factor, "policy": pipeline.policy,
        "batch_size": pipeline.batch_size,
        "diffusion_seeds": list(range(sample_seed, sample_seed + seeds)),
        "plan_early": _jsonable(dataclasses.asdict(early_plan)),
        "plan_full": _jsonable(dataclasses.asdict(full_plan)),
        "model_calls_per_episode": {"ours_early": cost(early_plan, True), "full_run": cost(full_plan, False),
                                    "ensemble_early": cost(early_plan, True) + (keep_ens - 1) * (early_plan.steps - early_plan.scorer.steps)},
        "ensemble": {"how": ENSEMBLE, "early_keep": keep_ens},
        "random_seed_rng": f"np.random.default_rng([crc32(family), episode index, {random_seed_rng}]).integers(N)",
        "bootstrap": {"n_boot": n_boot, "seed": stats_seed, "level": 0.95, "kind": "percentile, stratified by family"},
        "psnr_cap_db": PSNR_CAP, "tie_tolerance": TIE_TOL,
        "seconds": {"total": round(time.time() - t0, 2), "early_runs": round(t_early, 2), "full_runs": round(t_full, 2),
                    "note": "includes jit compilation of each plan"},
        "early_vs_full_same_seed_max_abs_diff": max_seed_mismatch,
        # what the device's memory chose for each plan's sampler, where something was open (the
        # seed batch, the gather over fsdp); it changes speed and memory, not the results
        "sampler_fitted": {name: pipeline.fitted[plan].to_json() for name, plan in
                           (("plan_early", early_plan), ("plan_full", full_plan)) if plan in pipeline.fitted},
        **(settings_extra or {}),
    }
    results["summary"] = summarize(results["families"], n_boot=n_boot, seed=stats_seed)
    results = _jsonable(results)
    import jax

    # Over several processes every one holds the same (replicated) results; the first writes them.
    if out_dir is not None and jax.process_index() == 0:
        write_outputs(results, out_dir, sheet_rows)
    return results


# ============================================================================ summaries
def _scores(fam: dict, method: str) -> np.ndarray | None:
    eps = fam["episodes"]
    if not eps or method not in eps[0]["metrics"]:
        return None
    return np.array([e["metrics"][method]["score"] for e in eps], np.float64)


def summarize(families: dict[str, dict], n_boot: int = 10000, seed: int = 0) -> dict[str, Any]:
    """Per family: the mean of every metric per method, the best no-learning baseline (highest
    mean score; for mask families threshold_B is itself an oracle threshold), early - random with
    a bootstrap CI, and win rates. Groups ("overall/<kind>", "<category>/<kind>"; scores are
    only pooled within one output kind, since IoU and PSNR have different units): the
    differences ours_early - random_seed and ours_early - ours_full per episode with 95%
    bootstrap CIs (stratified by family), and win rates."""
    per_family: dict[str, Any] = {}
    groups: dict[str, list[str]] = {}
    for name, fam in families.items():
        eps = fam["episodes"]
        methods = [m for m in METHODS if eps and m in eps[0]["metrics"]]
        means = {m: {k: float(np.mean([e["metrics"][m][k] for e in eps])) for k in eps[0]["metrics"][m]} for m in methods}
        base = {m: means[m]["score"] for m in BASELINES if m in means}
        best = max(base, key=base.get)
        s = {m: _scores(fam, m) for m in methods}
        per_family[name] = {
            "category": fam["category"], "split": fam["split"], "kind": fam["kind"], "metric": fam["metric"],
            "n": len(eps), "means": means, "score": {m: means[m]["score"] for m in methods},
            "score_sem": {m: float(np.std(s[m], ddof=1) / np.sqrt(len(eps))) if len(eps) > 1 else None for m in methods},
            "best_baseline": {"method": best, "score": base[best]},
            "early_minus_random": bootstrap_mean_ci([s["ours_early"] - s["random_seed"]], n_boot, seed),
            "early_minus_full": bootstrap_mean_ci([s["ours_early"] - s["ours_full"]], n_boot, seed),
            "win_rates": {
                "early_vs_random": win_rate(s["ours_early"], s["random_seed"]),
                "early_vs_full": win_rate(s["ours_early"], s["ours_full"]),
                "full_vs_random": win_rate(s["ours_full"], s["random_seed"]),
                "early_vs_best_baseline": win_rate(s["ours_early"], s[best]),
            },
            "beats_best_baseline": {m: bool(means[m]["score"] > base[best]) for m in OURS if m in means},
        }
        groups.setdefault(f"overall/{fam['kind']}", []).append(name)
        groups.setdefault(f"{fam['category']}/{fam['kind']}", []).append(name)

    group_stats = {}
    for g, names in groups.items():
        e = [_scores(families[n], "ours_early") for n in names]
        r = [_scores(families[n], "random_seed") for n in names]
        f = [_scores(families[n], "ours_full") for n in names]
        ens = [_scores(families[n], "ensemble_early") for n in names]
        cat = lambda xs: np.concatenate(xs)  # noqa: E731
        group_stats[g] = {
            "families": names, "metric": "iou" if g.endswith("/mask") else "psnr",
            "early_minus_random": bootstrap_mean_ci([a - b for a, b in zip(e, r)], n_boot, seed),
            "early_minus_full": bootstrap_mean_ci([a - b for a, b in zip(e, f)], n_boot, seed),
            "full_minus_random": bootstrap_mean_ci([a - b for a, b in zip(f, r)], n_boot, seed),
            "win_rates": {"early_vs_random": win_rate(cat(e), cat(r)), "early_vs_full": win_rate(cat(e), cat(f)),
                          "full_vs_random": win_rate(cat(f), cat(r))},
        }
        if all(x is not None for x in ens):  # absent in evaluations written before the ensemble rows
            group_stats[g]["ensemble_early_minus_early"] = bootstrap_mean_ci([a - b for a, b in zip(ens, e)], n_boot, seed)
            group_stats[g]["win_rates"]["ensemble_early_vs_early"] = win_rate(cat(ens), cat(e))
    rows = [m for m in OURS if all(m in p["beats_best_baseline"] for p in per_family.values())]
    beats = {m: {"families": [n for n, p in per_family.items() if p["beats_best_baseline"][m]],
                 "of": len(per_family)} for m in rows}
    for m in beats:
        beats[m]["count"] = len(beats[m]["families"])
    return {"families": per_family, "groups": group_stats, "beats_best_baseline": beats}


# ============================================================================ writing
def _fmt(v, metric: str) -> str:
    if v is None:
        return "–"
    return f"{v:.2f}" if metric == "psnr" else f"{v:.3f}"


def _fmt_ci(d: dict, metric: str) -> str:
    if d.get("mean") is None:
        return "–"
    unit = " dB" if metric == "psnr" else ""
    f = (lambda x: f"{x:+.2f}") if metric == "psnr" else (lambda x: f"{x:+.3f}")
    return f"{f(d['mean'])}{unit} [{f(d['ci_low'])}, {f(d['ci_high'])}]"


def render_markdown(results: dict) -> str:
    from pico_jax.data.relations import CATEGORIES

    st, summ = results["settings"], results["summary"]
    fams = summ["families"]
    L = [f"# PICO evaluation — split `{st['split']}`", ""]
    L.append(f"{st['episodes']} episodes per family (evaluation seeds: {st['episode_seeds']}), "
             f"{st['seeds']} diffusion seeds, {st['plan_full']['steps']} steps, early selection after "
             f"{st['plan_early']['scorer']['steps']} scored steps; episodes {st['episode_size']} px, model panel "
             f"{st['model_panel']} px. Model calls per episode: early {st['model_calls_per_episode']['ours_early']}, "
             f"full run {st['model_calls_per_episode']['full_run']}"
             + (f", ensemble (early) {st['model_calls_per_episode']['ensemble_early']}: the per-pixel "
                f"{st['ensemble']['how']} of the {st['ensemble']['early_keep']} seeds early selection keeps; "
                f"ensemble (full): of all {st['seeds']}" if st.get("ensemble") else "") + ".")
    if st.get("checkpoint"):
        L.append(f"Checkpoint: `{st['checkpoint']}`.")
    sc = st["plan_early"]["scorer"]
    signal = sc.get("signal", "attention")
    L.append(f"Seed scorer: {'consensus' if signal == 'consensus' else 'attention, weights ' + repr(sc['weights'])}.")
    L += ["", "Score: **IoU** (mask families, masks = max channel > 0.5) or **PSNR dB** (image families). "
          "Bold: best non-oracle entry. `oracle` picks the best of the N candidates with the truth (upper bound of "
          "seed selection); `threshold_B` is an *oracle* global luminance threshold (chosen with the truth); "
          "best baseline = the no-learning baseline with the highest mean on that family (also chosen with the truth).", ""]
    cols = [m for m in METHODS if any(m in p["score"] for p in fams.values())]
    L.append("| family | split | metric | " + " | ".join(cols) + " | best baseline | early − random [95% CI] |")
    L.append("|" + "---|" * (len(cols) + 5))
    order = [c for c in CATEGORIES if any(p["category"] == c for p in fams.values())]
    for cat in order:
        L.append(f"| **{cat}** |" + " |" * (len(cols) + 4))
        for name, p in fams.items():
            if p["category"] != cat:
                continue
            metric = p["metric"]
            cand = {m: v for m, v in p["score"].items() if m != "oracle"}
            top = max(cand.values())
            cells = []
            for m in cols:
                v = p["score"].get(m)
                s = _fmt(v, metric)
                cells.append(f"**{s}**" if v is not None and m != "oracle" and v >= top - 1e-12 else s)
            bb = p["best_baseline"]
            split = "held-out" if p["split"] == "heldout" else "train"
            L.append(f"| {name} | {split} | {'IoU' if metric == 'iou' else 'PSNR'} | " + " | ".join(cells)
                     + f" | {bb['method']} {_fmt(bb['score'], metric)} | {_fmt_ci(p['early_minus_random'], metric)} |")
    img = [n for n, p in fams.items() if p["kind"] == "image"]
    if img:
        L += ["", "Image families, all metrics (PSNR dB ↑ / SSIM ↑ / L1 ↓):", ""]
        L.append("| family | " + " | ".join(cols) + " |")
        L.append("|" + "---|" * (len(cols) + 1))
        for n in img:
            mm = fams[n]["means"]
            L.append(f"| {n} | " + " | ".join(
                f"{mm[m]['psnr']:.2f} / {mm[m]['ssim']:.3f} / {mm[m]['l1']:.3f}" if m in mm else "–" for m in cols) + " |")
    L += ["", "## Summary", ""]
    for m, label in (("ours_early", "ours (early)"), ("ours_full", "ours (full)"),
                     ("ensemble_early", "ensemble (early)"), ("ensemble_full", "ensemble (full)")):
        if m not in summ["beats_best_baseline"]:
            continue
        b = summ["beats_best_baseline"][m]
        L.append(f"- {label} beats the best no-learning baseline on **{b['count']} of {b['of']}** families.")
    for g, d in summ["groups"].items():
        metric = d["metric"]
        wr = d["win_rates"]
        L.append(f"- `{g}` ({len(d['families'])} families, {d['early_minus_random']['n']} episodes, "
                 f"{'IoU' if metric == 'iou' else 'PSNR'}): early − random {_fmt_ci(d['early_minus_random'], metric)}, "
                 f"win rate {wr['early_vs_random']['win_rate']:.2f}; early − full {_fmt_ci(d['early_minus_full'], metric)}, "
                 f"win rate {wr['early_vs_full']['win_rate']:.2f}; full − random {_fmt_ci(d['full_minus_random'], metric)}"
                 + (f"; ensemble (early) − early {_fmt_ci(d['ensemble_early_minus_early'], metric)}, win rate "
                    f"{wr['ensemble_early_vs_early']['win_rate']:.2f}" if "ensemble_early_minus_early" in d else "") + ".")
    calls = st["model_calls_per_episode"]
    L.append(f"- Early vs full: early selection costs {calls['ours_early']} model calls per episode vs "
             f"{calls['full_run']} for the full run ({calls['ours_early'] / calls['full_run']:.2f}×).")
    L += ["", "Win rate = (wins + ties/2) / episodes (tie: |Δ| ≤ 1e-6). CIs: 95% percentile bootstrap "
          f"({st['bootstrap']['n_boot']} replicates, episodes resampled within each family, fixed RNG seed "
          f"{st['bootstrap']['seed']}). Scores are pooled only within one output kind (IoU and PSNR have different units).", ""]
    return "\n".join(L)


def make_sheet(rows: list[dict], min_cell: int = 96,
               titles: tuple[str, ...] = ("A", "A'", "B", "ours (early)", "ensemble", "truth")) -> np.ndarray:
    """A picture sheet: one row per episode, columns A | A' | B | ours (early) | ensemble (early) | truth, with the
    family name (category, split, episode) as the row label, or the row's own ``lines`` where it
    has them; panels upscaled with nearest neighbour to at least ``min_cell`` px."""
    from PIL import Image, ImageDraw

    from pico_jax.imageio import to_uint8

    p = rows[0]["panels"][0].shape[0]
    scale = max(1, math.ceil(min_cell / p))
    cell, gap, label_w, head_h = p * scale, 4, 170, 20
    w = label_w + len(titles) * (cell + gap) + gap
    h = head_h + len(rows) * (cell + gap) + gap
    sheet = Image.new("RGB", (w, h), (235, 235, 235))
    draw = ImageDraw.Draw(sheet)
    for c, t in enumerate(titles):
        draw.text((label_w + gap + c * (cell + gap) + 4, 4), t, fill=(0, 0, 0))
    for r, row in enumerate(rows):
        y = head_h + gap + r * (cell + gap)
        lines = row.get("lines") or [row["family"], f"{row['category']}, {'held-out' if row['split'] == 'heldout' else 'train'}",
                                     f"episode {row['index']}"]
        for j, text in enumerate(lines):
            draw.text((6, y + 4 + 14 * j), text, fill=(0, 0, 0) if j == 0 else (80, 80, 80))
        for c, panel in enumerate(row["panels"]):
            a = to_uint8(np.nan_to_num(np.asarray(panel, np.float32)))
            im = Image.fromarray(np.ascontiguousarray(a)).resize((a.shape[1] * scale, a.shape[0] * scale), Image.NEAREST)
            sheet.paste(im, (label_w + gap + c * (cell + gap), y))
    return np.asarray(sheet)


def _write_text_atomic(text: str, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_outputs(results: dict, out_dir: str | os.PathLike, sheet_rows: list[dict] | None = None) -> dict[str, str]:
    """results.json, results.md and (given sheet rows) sheet_<split>.png in out_dir, each atomic."""
    from pico_jax.imageio import save_png_atomic

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "results.json", "markdown": out / "results.md"}
    _write_text_atomic(json.dumps(_jsonable(results), indent=1, allow_nan=False), paths["json"])
    _write_text_atomic(render_markdown(results), paths["markdown"])
    if sheet_rows:
        paths["sheet"] = out / f"sheet_{results['settings']['split']}.png"
        save_png_atomic(make_sheet(sheet_rows), paths["sheet"])
    return {k: str(v) for k, v in paths.items()}


# ============================================================================ merging
# Settings that must agree for episodes to be pooled (the plans without seed_batch, which only
# moves work between a loop and a batch).
MERGE_KEYS = ("split", "seeds", "episode_size", "model_panel", "ae_factor", "policy", "diffusion_seeds",
              "plan_early", "plan_full", "random_seed_rng", "psnr_cap_db", "tie_tolerance", "checkpoint_identity", "ensemble")


def _merge_view(settings: dict, key: str):
    if key == "checkpoint_identity":  # by content; results written before the fingerprint: by path
        return settings.get("checkpoint_sha256") or settings.get("checkpoint")
    v = settings.get(key)
    if key.startswith("plan_") and isinstance(v, dict):
        v = {k: x for k, x in v.items() if k != "seed_batch"}
    return v


def merge_results(parts: Sequence[dict], names: Sequence[str] | None = None,
                  n_boot: int = 10000, stats_seed: int = 0) -> dict:
    """Pool the episodes of several `evaluate` results of the same checkpoint and settings (same
    families, disjoint episode indices) and summarize them again. `names` label the parts in
    errors and in settings["merged_from"]. Raises ValueError naming the part, key or family."""
    if len(parts) < 2:
        raise ValueError("merging needs at least two results")
    names = list(names) if names is not None else [f"part {i}" for i in range(len(parts))]
    first, ref = parts[0], parts[0]["settings"]
    for name, part in zip(names[1:], parts[1:]):
        for key in MERGE_KEYS:
            if _merge_view(part["settings"], key) != _merge_view(ref, key):
                label = "checkpoint_sha256" if key == "checkpoint_identity" else key
                raise ValueError(f"{name}: settings[{label!r}] = {_merge_view(part['settings'], key)!r} differs from "
                                 f"{names[0]}'s {_merge_view(ref, key)!r}; only evaluations of the same checkpoint "
                                 "and settings can be pooled")
        if list(part["families"]) != list(first["families"]):
            raise ValueError(f"{name}: families {list(part['families'])} differ from {names[0]}'s {list(first['families'])}")
    families = {}
    for fam, info in first["families"].items():
        episodes, seen = [], {}
        for name, part in zip(names, parts):
            for ep in part["families"][fam]["episodes"]:
                if ep["index"] in seen:
                    raise ValueError(f"{name}: family {fam!r} episode {ep['index']} is also in {seen[ep['index']]}; "
                                     "merged evaluations must cover disjoint episodes (--episode-offset)")
                seen[ep["index"]] = name
                episodes.append(ep)
        families[fam] = {**{k: v for k, v in info.items() if k != "episodes"},
                         "episodes": sorted(episodes, key=lambda e: e["index"])}
    counts = {len(f["episodes"]) for f in families.values()}
    settings = {
        **ref,
        "episodes": counts.pop() if len(counts) == 1 else sorted(counts),
        "episode_seeds": "; ".join(p["settings"]["episode_seeds"] for p in parts),
        "bootstrap": {**ref["bootstrap"], "n_boot": n_boot, "seed": stats_seed},
        "seconds": {"total": round(sum(p["settings"]["seconds"]["total"] for p in parts), 2),
                    "note": "sum over the merged evaluations"},
        "sampler_fitted": {name: p["settings"].get("sampler_fitted", {}) for name, p in zip(names, parts)},  # each part's own
        "merged_from": names,
    }
    results = {"families": families, "settings": settings}
    results["summary"] = summarize(families, n_boot=n_boot, seed=stats_seed)
    return _jsonable(results)


def merge_main(paths: Sequence[str], out_dir: str, n_boot: int) -> int:
    parts = []
    for path in paths:
        try:
            with open(path) as f:
                parts.append(json.load(f))
        except (OSError, json.JSONDecodeError) as e:
            print(f"pico_jax.eval: error: --merge {path}: {e}", file=sys.stderr)
            return 2
        if not isinstance(parts[-1], dict) or not {"families", "settings"} <= set(parts[-1]):
            print(f"pico_jax.eval: error: --merge {path}: not an evaluation results.json", file=sys.stderr)
            return 2
    try:
        res = merge_results(parts, names=list(paths), n_boot=n_boot)
    except (ValueError, KeyError) as e:
        print(f"pico_jax.eval: error: --merge: {e}", file=sys.stderr)
        return 2
    write_outputs(res, out_dir)
    b = res["summary"]["beats_best_baseline"]
    print(f"merged {len(parts)} evaluations ({res['settings']['episodes']} episodes per family): ours (early) beats "
          f"the best no-learning baseline on {b['ours_early']['count']} of {b['ours_early']['of']} families, "
          f"ours (full) on {b['ours_full']['count']}"
          + (f", ensemble (early) on {b['ensemble_early']['count']}" if "ensemble_early" in b else "")
          + f"; wrote {out_dir}/results.json, results.md")
    return 0


# ============================================================================ CLI
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m pico_jax.eval",
        description="Evaluate a PICO checkpoint on procedural relation episodes (evaluation seeds): "
                    "ours (early / full selection), test-time ensembles (per-pixel median of the kept seeds), a "
                    "random seed, the oracle seed and no-learning baselines. "
                    "Writes OUT/results.json, OUT/results.md and OUT/sheet_<split>.png.")
    p.add_argument("--checkpoint", metavar="DIR", help="a pico checkpoint directory (default: the bundled pico-tiny)")
    p.add_argument("--split", choices=["heldout", "train"], default="heldout", help="family split (default heldout)")
    p.add_argument("--families", metavar="A,B,...", help="comma-separated families (default: every family of --split)")
    p.add_argument("--episodes", type=int, default=20, help="episodes per family (default 20)")
    p.add_argument("--seeds", type=int, default=8, help="diffusion seeds (candidates) per episode (default 8)")
    p.add_argument("--steps", type=int, help="denoising steps (default: the checkpoint's)")
    p.add_argument("--score-steps", type=int, help="steps the scorer reads / early-selection point k (default: the checkpoint's)")
    p.add_argument("--scorer", metavar="NAME", help="seed scorer: an attention preset (context, focus, ...) or "
                                                    "consensus (default: the checkpoint's)")
    p.add_argument("--ensemble-keep", type=int, metavar="K",
                   help="seeds early selection keeps for the ensemble_early row (default: half of --seeds, at least 2)")
    p.add_argument("--panel-size", type=int, help="episode image size in px (default: the model's panel)")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory")
    p.add_argument("--batch-size", type=int, default=4, help="episodes per compiled batch (default 4)")
    p.add_argument("--mesh", metavar="SPEC", help=MESH_FLAG_HELP)
    p.add_argument("--gather-weights", choices=GATHER_WEIGHTS_CHOICES, default="auto", help=GATHER_WEIGHTS_FLAG_HELP)
    p.add_argument("--sample-seed", type=int, default=0, help="first diffusion seed (default 0)")
    p.add_argument("--episode-offset", type=int, default=0, help="first evaluation-seed index (default 0)")
    p.add_argument("--sheet-episodes", type=int, default=3, help="episodes per family on the picture sheet (default 3)")
    p.add_argument("--bootstrap", type=int, default=10000, help="bootstrap replicates (default 10000)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--compile-cache", metavar="DIR", help=COMPILE_CACHE_HELP)
    p.add_argument("--merge", nargs="+", metavar="RESULTS_JSON",
                   help="evaluate nothing: pool these results.json files (same checkpoint and settings, disjoint "
                        "episodes) into OUT/results.json and results.md")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from pico_jax.data.relations import FAMILIES, SPLITS

    def fail(msg: str) -> int:
        print(f"pico_jax.eval: error: {msg}", file=sys.stderr)
        return 2

    for flag in ("episodes", "seeds", "steps", "score_steps", "panel_size", "batch_size", "bootstrap"):
        v = getattr(args, flag)
        if v is not None and v < 1:
            return fail(f"--{flag.replace('_', '-')} must be at least 1 (got {v})")
    if not (0 <= args.sample_seed and args.sample_seed + args.seeds <= 2**31):
        return fail(f"--sample-seed must be in 0..2**31-seeds (got {args.sample_seed})")
    if args.ensemble_keep is not None and not 2 <= args.ensemble_keep <= args.seeds:
        return fail(f"--ensemble-keep must be within 2..--seeds ({args.seeds}) (got {args.ensemble_keep})")
    if args.episode_offset < 0:
        return fail(f"--episode-offset must be >= 0 (got {args.episode_offset})")
    if args.merge:
        return merge_main(args.merge, args.out, args.bootstrap)
    if args.families:
        families = [f.strip() for f in args.families.split(",") if f.strip()]
        bad = [f for f in families if f not in FAMILIES]
        if bad:
            return fail(f"unknown families {bad}; known: {', '.join(sorted(FAMILIES))}")
    else:
        families = list(SPLITS[args.split])

    from pico_jax.checkpoints import checkpoint_fingerprint, load_pico
    from pico_jax.safetensors_io import CheckpointError

    enable_compile_cache(args.compile_cache, prog="pico_jax.eval")
    mesh = None
    if args.mesh:
        from pico_jax.parallel import MeshError, mesh_for_cli

        try:
            mesh = mesh_for_cli(args.mesh, args.batch_size)
        except MeshError as e:
            return fail(str(e))
    try:
        pipe = load_pico(args.checkpoint, batch_size=args.batch_size, mesh=mesh, gather_weights=args.gather_weights)
    except CheckpointError as e:
        return fail(str(e))
    if args.scorer:
        from pico_jax.scorer import scorer_from_name

        try:
            pipe.plan = dataclasses.replace(pipe.plan, scorer=scorer_from_name(pipe.plan.scorer, args.scorer))
        except ValueError as e:
            return fail(f"--scorer: {e}")
    try:
        res = evaluate(pipe, families, args.episodes, args.seeds, steps=args.steps, score_steps=args.score_steps,
                       panel_size=args.panel_size, sample_seed=args.sample_seed, episode_offset=args.episode_offset,
                       ensemble_keep=args.ensemble_keep, n_boot=args.bootstrap, sheet_episodes=args.sheet_episodes, out_dir=args.out,
                       split=None if args.families else args.split,
                       progress=not args.no_progress and _first_process(),
                       settings_extra={"checkpoint": str(args.checkpoint or "bundled pico-tiny"),
                                       "checkpoint_sha256": checkpoint_fingerprint(args.checkpoint)})
    except ValueError as e:  # e.g. --score-steps > --steps
        return fail(str(e))
    if not _first_process():
        return 0
    beats = res["summary"]["beats_best_baseline"]
    b = beats["ours_early"]
    ens = f", ensemble (early) on {beats['ensemble_early']['count']}" if "ensemble_early" in beats else ""
    print(f"ours (early) beats the best no-learning baseline on {b['count']} of {b['of']} families{ens}; "
          f"wrote {args.out}/results.json, results.md, sheet_{res['settings']['split']}.png")
    return 0


def _first_process() -> bool:
    import jax

    return jax.process_index() == 0


if __name__ == "__main__":
    sys.exit(main())
