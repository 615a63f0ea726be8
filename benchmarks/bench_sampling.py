#!/usr/bin/env python
"""Wall time of PICO sampling modes on a reduced FLUX-Fill-style transformer.

Times (after compilation; median of --repeat interleaved rounds, block_until_ready) one jitted `sample()` call
for one query:
  one    selection="random": 1 seed, T steps, no scoring (the baseline)
  full   selection="full":   S seeds × T steps, all captured and scored, best m kept
  early  selection="early":  S seeds × k captured steps, the best m finish T - k steps
and the cost of the attention-capture hook: a single-seed T-step run with capture on the scored
layers at every step (selection="full", S = 1) against the same run without hooks ("one"), and
early selection with the consensus scorer (no hooks; the seeds' clean estimates are compared).

Also prints the ideal model-call ratio early/one = (S·k + m·(T−k)) / T and the model calls and
matmul FLOPs counted in each traced program (scan trip counts and the vmapped seed axis included).

    python benchmarks/bench_sampling.py                       # panel 64 (1024 image tokens), T=20, S=8
    python benchmarks/bench_sampling.py --panel 32 --repeat 3 # 256 tokens, for slow CPUs
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pico_jax import grid
from pico_jax.model.autoencoder import PixelAutoencoder
from pico_jax.model.flux import FluxConfig, FluxTransformer, count_params
from pico_jax.pipeline import CanvasLayout, SamplingPlan, TextConditioning, fill_condition, sample, seed_batch_for_backend
from pico_jax.scorer import ScorerConfig


def dot_flops(jaxpr, weight_in: int | None = None) -> float:
    """Matmul FLOPs of a jaxpr with loop trip counts (cond: the dearer branch). With weight_in,
    only dots against a (weight_in, ·) weight: the model's input projection, once per call."""
    total = 0.0
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name == "dot_general":
            lhs, rhs = (v.aval.shape for v in eqn.invars)
            (lc, _), _ = eqn.params["dimension_numbers"]
            if weight_in is None or (len(rhs) == 2 and rhs[0] == weight_in):
                total += 2.0 * math.prod(eqn.outvars[0].aval.shape) * math.prod(lhs[d] for d in lc)
            continue
        subs = []
        for p in eqn.params.values():
            for q in p if isinstance(p, (tuple, list)) else (p,):
                if isinstance(q, jax.extend.core.ClosedJaxpr):
                    subs.append(q.jaxpr)
                elif isinstance(q, jax.extend.core.Jaxpr):
                    subs.append(q)
        counts = [dot_flops(s, weight_in) for s in subs]
        if name == "cond":
            total += max(counts)
        elif counts:
            total += sum(counts) * (eqn.params["length"] if name == "scan" else 1)
    return total


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=20, help="denoising steps T")
    ap.add_argument("--seeds", type=int, default=8, help="seeds S (best-of-S)")
    ap.add_argument("--keep", type=int, default=1, help="seeds finished by early selection (m)")
    ap.add_argument("--score-steps", type=int, default=2, help="scorer steps k")
    ap.add_argument("--panel", type=int, default=64, help="panel size P (canvas 2P x 2P, PixelAutoencoder(2))")
    ap.add_argument("--repeat", type=int, default=5,
                    help="timed rounds; each round runs every mode once (interleaved); medians reported")
    ap.add_argument("--double", type=int, default=2, help="double-stream blocks")
    ap.add_argument("--single", type=int, default=4, help="single-stream blocks")
    ap.add_argument("--seed-batch", type=int, default=None,
                    help="seeds run together in the scored phase (default: the backend's choice, "
                         "pipeline.seed_batch_for_backend); an extra early-selection row always runs all S together")
    ap.add_argument("--skip-full", action="store_true",
                    help="skip best-of-S full sampling (the slowest mode; its ratios are not printed)")
    args = ap.parse_args()
    T, S, m, k = args.steps, args.seeds, args.keep, args.score_steps

    ae = PixelAutoencoder(2)
    in_ch = 2 * 4 * ae.latent_channels + 4 * ae.downsample_factor**2  # [noisy | masked canvas | mask]
    cfg = FluxConfig(num_double=args.double, num_single=args.single, num_heads=8, head_dim=64,
                     axes_dims_rope=(8, 28, 28), in_channels=in_ch, out_channels=4 * ae.latent_channels,
                     context_dim=64, pooled_dim=64, guidance_embeds=False)
    model = FluxTransformer(cfg, rngs=nnx.Rngs(0))
    layout = CanvasLayout(args.panel, ae.downsample_factor)
    text = TextConditioning.empty(1, cfg.context_dim, cfg.pooled_dim)
    rng = np.random.default_rng(0)
    imgs = [rng.random((args.panel, args.panel, 3)).astype(np.float32) for _ in range(3)]
    canvas = jnp.asarray(grid.compose(*imgs, panel=args.panel, multiple=4).image[None] * 2.0 - 1.0)
    cond, known = fill_condition(ae, canvas, layout)
    seeds = jnp.arange(S, dtype=jnp.uint32)

    print(f"device: {jax.devices()[0].device_kind} ({jax.default_backend()}), {os.cpu_count()} CPU cores, "
          f"jax {jax.__version__}, {platform.machine()}")
    print(f"model: FLUX-Fill-style, {cfg.num_double} double + {cfg.num_single} single blocks, width {cfg.width} "
          f"({cfg.num_heads} heads x {cfg.head_dim}, rope axes {cfg.axes_dims_rope}), in {cfg.in_channels} -> out "
          f"{cfg.output_channels} channels, {count_params(nnx.state(model)) / 1e6:.1f} M params, fp32")
    print(f"canvas: panel {args.panel} -> {2 * args.panel}^2 pixels, PixelAutoencoder(2) -> "
          f"{layout.num_tokens} image tokens + 1 text token; batch 1 query")
    print(f"sampling: T={T} steps, S={S} seeds, k={k} scorer steps (all {cfg.num_layers} layers captured), m={m} kept; "
          f"median of {args.repeat} interleaved round(s) after compile")

    graphdef, state = nnx.split(model)
    sb = args.seed_batch or seed_batch_for_backend(S)
    print(f"seed batch (scored phase): {sb} of {S} seeds at a time")
    ONE, FULL, EARLY, EARLY_ALL, CAPTURE, CONSENSUS = "one", "full", "early", "early_all", "capture", "consensus"
    plans = {
        ONE: ("one (random)", SamplingPlan(steps=T, seeds=S, keep=1, selection="random"), seeds),
        FULL: (f"best-of-{S} full", SamplingPlan(steps=T, seeds=S, keep=m, selection="full", seed_batch=sb,
                                                 scorer=ScorerConfig(steps=k)), seeds),
        EARLY: (f"best-of-{S} early (m={m})", SamplingPlan(steps=T, seeds=S, keep=m, selection="early", seed_batch=sb,
                                                          scorer=ScorerConfig(steps=k)), seeds),
        EARLY_ALL: (f"  same, {S} seeds vmapped", SamplingPlan(steps=T, seeds=S, keep=m, selection="early",
                                                              seed_batch=S, scorer=ScorerConfig(steps=k)), seeds),
        CAPTURE: ("1 seed full + capture", SamplingPlan(steps=T, seeds=1, keep=1, selection="full"), seeds[:1]),
        CONSENSUS: (f"best-of-{S} early consensus", SamplingPlan(steps=T, seeds=S, keep=m, selection="early",
                                                                 seed_batch=sb,
                                                                 scorer=ScorerConfig(steps=k, signal="consensus")), seeds),
    }
    if args.skip_full:
        del plans[FULL]
    if sb == S:
        del plans[EARLY_ALL]
    calls, flops, compiled, first = {}, {}, {}, {}  # keyed by mode
    for key, (name, plan, sd) in plans.items():
        plan = plan.validate()
        fn = jax.jit(lambda st, c, kn, s, plan=plan: sample(nnx.merge(graphdef, st), c, kn, text, s, layout, plan))
        jaxpr = jax.make_jaxpr(fn)(state, cond, known, sd).jaxpr
        per_call = 2.0 * layout.num_tokens * cfg.in_channels * cfg.width
        calls[key] = dot_flops(jaxpr, cfg.in_channels) / per_call
        flops[key] = dot_flops(jaxpr)
        t0 = time.perf_counter()
        compiled[key] = fn.lower(state, cond, known, sd).compile()
        jax.block_until_ready(compiled[key](state, cond, known, sd))
        first[key] = time.perf_counter() - t0
    # Interleaved rounds (every mode once per round), so the machine's drift (a shared host)
    # spreads over all modes instead of biasing whichever ran last.
    runs = {key: [] for key in plans}
    for _ in range(args.repeat):
        for key, (_, _, sd) in plans.items():
            t0 = time.perf_counter()
            jax.block_until_ready(compiled[key](state, cond, known, sd))
            runs[key].append(time.perf_counter() - t0)
    t = {key: statistics.median(r) for key, r in runs.items()}
    for key, (name, _, _) in plans.items():
        print(f"  {name:<26} {t[key]:8.3f} s  (runs {', '.join(f'{r:.3f}' for r in runs[key])}; "
              f"compile+first {first[key]:.1f} s)  model calls {calls[key]:.0f}, matmul {flops[key] / 1e12:.3f} TFLOP",
              flush=True)
    # Per-round ratios against the same round's one-sample run: drift within a round is small.
    per_round = {key: [r / o for r, o in zip(runs[key], runs[ONE])] for key in plans}
    f = flops

    ideal = (S * k + m * (T - k)) / T
    print("ratios (wall time):")
    print(f"  early / one  = {t[EARLY] / t[ONE]:6.2f}   (ideal model-call ratio (S·k + m·(T−k))/T = {ideal:.2f})")
    if EARLY_ALL in t:
        print(f"  early, all {S} seeds vmapped / one = {t[EARLY_ALL] / t[ONE]:6.2f}   "
              f"(seed batch {sb} is {t[EARLY_ALL] / t[EARLY]:.2f}x faster)")
    if FULL in t:
        print(f"  full  / one  = {t[FULL] / t[ONE]:6.2f}   (ideal S = {S})")
        print(f"  early / full = {t[EARLY] / t[FULL]:6.3f}   (ideal {ideal / S:.3f})")
    print(f"  early consensus / one = {t[CONSENSUS] / t[ONE]:6.2f}   (no attention capture; same ideal {ideal:.2f})")
    cap = per_round[CAPTURE]
    print(f"  capture hook: 1 seed, {T} steps, capture on all steps / no hooks = {t[CAPTURE] / t[ONE]:.3f} "
          f"({100 * (t[CAPTURE] / t[ONE] - 1):+.1f} %; per round {', '.join(f'{100 * (c - 1):+.1f}' for c in cap)} %)")
    cons = per_round[CONSENSUS]
    early_rounds = per_round[EARLY]
    print(f"  per round: early / one {', '.join(f'{r:.2f}' for r in early_rounds)}; "
          f"consensus / one {', '.join(f'{r:.2f}' for r in cons)}")
    full_flops = f", full/one {f[FULL] / f[ONE]:.2f}, early/full {f[EARLY] / f[FULL]:.3f}" if FULL in f else ""
    print(f"ratios (traced matmul FLOPs): early/one {f[EARLY] / f[ONE]:.2f}{full_flops}, "
          f"capture/none {f[CAPTURE] / f[ONE]:.2f}")


if __name__ == "__main__":
    main()
