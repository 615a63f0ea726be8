#!/usr/bin/env python
"""Wall time of PICO sampling modes on a reduced FLUX-Fill-style transformer.

Times (after compilation; median of --repeat interleaved rounds, block_until_ready) one jitted `sample()` call
for one query:
  one    selection="random": 1 seed, T steps, no scoring (the baseline)
  full   selection="full":   S seeds × T steps, all captured and scored, best m kept
  early  selection="early":  S seeds × k captured steps, the best m finish T - k steps
and the cost of the attention-capture hook: in the run that uses it (early selection against the
same program with no layer captured), and at its worst, a single-seed T-step run with capture on
all layers at every step (selection="full", S = 1) against the same run without hooks ("one"); and
early selection with the consensus scorer (no hooks; the seeds' clean estimates are compared).

Also prints the ideal model-call ratio early/one = (S·k + m·(T−k)) / T and the model calls and
matmul FLOPs counted in each traced program (scan trip counts and the vmapped seed axis included).

    python benchmarks/bench_sampling.py                       # panel 64 (1024 image tokens), T=20, S=8
    python benchmarks/bench_sampling.py --panel 32 --repeat 3 # 256 tokens, for slow CPUs
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pico_jax import grid
from pico_jax.flops import matmul_flops
from pico_jax.model.attention import explicit_attention, fused_attention
from pico_jax.model.autoencoder import PixelAutoencoder
from pico_jax.model.flux import FluxConfig, FluxTransformer, count_params
from pico_jax.pipeline import CanvasLayout, SamplingPlan, TextConditioning, fill_condition, sample, seed_batch_for_backend
from pico_jax.scorer import ScorerConfig


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
    ap.add_argument("--hook-pairs", type=int, default=30,
                    help="paired timings of the capture hook (0: skip): alternating runs with and without "
                         "capture, of a --hook-steps one-seed sample and of one attention layer")
    ap.add_argument("--hook-steps", type=int, default=2, help="denoising steps of the paired hook runs")
    ap.add_argument("--hook-only", action="store_true", help="only the paired capture-hook timings")
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
    ONE, FULL, EARLY, EARLY_ALL, CAPTURE, CONSENSUS, NOCAP = (
        "one", "full", "early", "early_all", "capture", "consensus", "early_nocap")
    plans = {
        ONE: ("one (random)", SamplingPlan(steps=T, seeds=S, keep=1, selection="random"), seeds),
        FULL: (f"best-of-{S} full", SamplingPlan(steps=T, seeds=S, keep=m, selection="full", seed_batch=sb,
                                                 scorer=ScorerConfig(steps=k)), seeds),
        EARLY: (f"best-of-{S} early (m={m})", SamplingPlan(steps=T, seeds=S, keep=m, selection="early", seed_batch=sb,
                                                          scorer=ScorerConfig(steps=k)), seeds),
        EARLY_ALL: (f"  same, {S} seeds vmapped", SamplingPlan(steps=T, seeds=S, keep=m, selection="early",
                                                              seed_batch=S, scorer=ScorerConfig(steps=k)), seeds),
        CAPTURE: ("1 seed full + capture", SamplingPlan(steps=T, seeds=1, keep=1, selection="full"), seeds[:1]),
        # The same early-selection program with the capture switched off (no layer selected, so every
        # layer takes the hook-free branch): early / this is the hook's cost in the run that uses it.
        NOCAP: ("  same, capture off", SamplingPlan(steps=T, seeds=S, keep=m, selection="early", seed_batch=sb,
                                                     scorer=ScorerConfig(steps=k, layers=())), seeds),
        CONSENSUS: (f"best-of-{S} early consensus", SamplingPlan(steps=T, seeds=S, keep=m, selection="early",
                                                                 seed_batch=sb,
                                                                 scorer=ScorerConfig(steps=k, signal="consensus")), seeds),
    }
    if args.skip_full:
        del plans[FULL]
    if sb == S:
        del plans[EARLY_ALL]
    if args.hook_pairs:
        hook_pairs(args, graphdef, state, cond, known, text, layout, cfg)
    if args.hook_only:
        return
    calls, flops, compiled, first = {}, {}, {}, {}  # keyed by mode
    for key, (name, plan, sd) in plans.items():
        plan = plan.validate()
        fn = jax.jit(lambda st, c, kn, s, plan=plan: sample(nnx.merge(graphdef, st), c, kn, text, s, layout, plan))
        jaxpr = jax.make_jaxpr(fn)(state, cond, known, sd).jaxpr
        per_call = 2.0 * layout.num_tokens * cfg.in_channels * cfg.width
        calls[key] = matmul_flops(jaxpr, cfg.in_channels) / per_call
        flops[key] = matmul_flops(jaxpr)
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
    nocap = [a / b for a, b in zip(runs[EARLY], runs[NOCAP])]
    print(f"  capture hook in early selection ({S}x{k} captured calls): early / same with capture off = "
          f"{t[EARLY] / t[NOCAP]:.3f} ({100 * (t[EARLY] / t[NOCAP] - 1):+.1f} %; per round "
          f"{', '.join(f'{100 * (c - 1):+.1f}' for c in nocap)} %)")
    cons = per_round[CONSENSUS]
    early_rounds = per_round[EARLY]
    print(f"  per round: early / one {', '.join(f'{r:.2f}' for r in early_rounds)}; "
          f"consensus / one {', '.join(f'{r:.2f}' for r in cons)}")
    full_flops = f", full/one {f[FULL] / f[ONE]:.2f}, early/full {f[EARLY] / f[FULL]:.3f}" if FULL in f else ""
    print(f"ratios (traced matmul FLOPs): early/one {f[EARLY] / f[ONE]:.2f}{full_flops}, "
          f"capture/none {f[CAPTURE] / f[ONE]:.2f}")


def onehot_column_attention(q, k, v, groups, num_groups):
    """The hook's previous formulation, kept here as the reference: group masses as G one-hot
    columns appended to the value product, e @ [v | one-hot] (capture only, no edits)."""
    b, n, h, d = q.shape
    onehot = jax.nn.one_hot(groups, num_groups, dtype=jnp.float32)
    query_avg = (onehot / jnp.maximum(onehot.sum(0), 1.0)).T

    def one_head(qkv):
        qh, kh, vh = qkv
        logits = jnp.einsum("bqd,bkd->bqk", qh, kh, preferred_element_type=jnp.float32) / np.sqrt(d)
        e = jnp.exp(logits - logits.max(-1, keepdims=True))
        values = jnp.concatenate([vh, jnp.broadcast_to(onehot, (b, n, num_groups))], -1)
        product = jnp.einsum("bqk,bkd->bqd", e, values) / e.sum(-1)[..., None]
        return product[..., :d], jnp.einsum("gq,bqh->bgh", query_avg, product[..., d:])

    out, mass = jax.lax.map(one_head, tuple(jnp.moveaxis(x, 2, 0) for x in (q, k, v)))
    return jnp.moveaxis(out, 0, 2), mass.mean(0)


def paired_ratios(fn_a, fn_b, pairs: int) -> list[float]:
    """time(a) / time(b) for `pairs` back-to-back pairs (order alternating within pairs), so the
    host's drift, slow against one pair, cancels in each ratio."""
    ratios = []
    for i in range(pairs):
        order = (fn_a, fn_b) if i % 2 == 0 else (fn_b, fn_a)
        times = {}
        for fn in order:
            t0 = time.perf_counter()
            jax.block_until_ready(fn())
            times[fn] = time.perf_counter() - t0
        ratios.append(times[fn_a] / times[fn_b])
    return ratios


def _ratio_summary(r: list[float]) -> str:
    """Median per-pair ratio as a percentage, a bootstrap 95 % interval of that median, and the
    quartiles of the pairs (their spread)."""
    if len(r) < 2:
        return f"{100 * (r[0] - 1):+.1f} %"
    q1, med, q3 = statistics.quantiles(r, n=4)
    boot = np.median(np.random.default_rng(0).choice(r, (2000, len(r))), axis=1)
    lo, hi = np.percentile(boot, [2.5, 97.5])
    return (f"{100 * (med - 1):+.1f} % [95 % CI of the median {100 * (lo - 1):+.1f}, {100 * (hi - 1):+.1f}] "
            f"(quartiles {100 * (q1 - 1):+.1f}, {100 * (q3 - 1):+.1f} %)")


def hook_pairs(args, graphdef, state, cond, known, text, layout, cfg):
    """The capture hook's cost from paired runs. A whole 20-step sample drifts by ±20 % between
    rounds on a shared 2-core host, more than the effect measured; adjacent short runs do not."""
    T, S, m, k, P = args.steps, args.seeds, args.keep, args.score_steps, args.hook_pairs
    seeds = jnp.arange(1, dtype=jnp.uint32)
    progs = {}
    for key, plan in (("off", SamplingPlan(steps=args.hook_steps, seeds=1, keep=1, selection="random")),
                      ("on", SamplingPlan(steps=args.hook_steps, seeds=1, keep=1, selection="full"))):
        plan = plan.validate()
        fn = jax.jit(lambda st, c, kn, s, plan=plan: sample(nnx.merge(graphdef, st), c, kn, text, s, layout, plan))
        compiled = fn.lower(state, cond, known, seeds).compile()
        progs[key] = lambda compiled=compiled: compiled(state, cond, known, seeds)
        jax.block_until_ready(progs[key]())
    whole = paired_ratios(progs["on"], progs["off"], P)

    hooks = layout.hooks(1, cfg.num_layers, ())
    n, h, d = layout.num_tokens + 1, cfg.num_heads, cfg.head_dim
    rng = np.random.default_rng(1)
    q, k_, v = (jnp.asarray(rng.standard_normal((1, n, h, d)), jnp.float32) for _ in range(3))
    layer = {
        "fused": jax.jit(lambda q, k, v: fused_attention(q, k, v)),
        "hooked": jax.jit(lambda q, k, v: explicit_attention(q, k, v, hooks, True, False)),
        "onehot_columns": jax.jit(lambda q, k, v: onehot_column_attention(q, k, v, hooks.groups, hooks.num_groups)),
    }
    calls = {key: (lambda f=f: f(q, k_, v)) for key, f in layer.items()}
    for c in calls.values():
        jax.block_until_ready(c())
    hooked = paired_ratios(calls["hooked"], calls["fused"], 4 * P)
    onehot = paired_ratios(calls["onehot_columns"], calls["fused"], 4 * P)

    frac_early = S * k / (S * k + m * (T - k))
    delta = statistics.median(whole) - 1
    print(f"capture hook, paired ({P} pairs of one-seed {args.hook_steps}-step samples, all {cfg.num_layers} "
          f"layers captured at every step vs no hooks; medians of per-pair ratios):")
    print(f"  whole sample, capture / none: {_ratio_summary(whole)}")
    print(f"  one attention layer ({n} tokens, {h} heads x {d}), {4 * P} pairs: hooked / fused {_ratio_summary(hooked)}; "
          f"previous one-hot value columns / fused {_ratio_summary(onehot)}")
    print(f"  => share of a sampling run: every call captured (full best-of-{S}, or capture on every step) "
          f"{100 * delta:+.1f} %; early selection ({S}x{k} of {S * k + m * (T - k)} calls captured) "
          f"{100 * delta * frac_early:+.1f} %", flush=True)


if __name__ == "__main__":
    main()
