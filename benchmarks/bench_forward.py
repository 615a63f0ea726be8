"""Forward pass of a reduced FLUX: our jitted JAX vs diffusers' PyTorch FluxTransformer2DModel on
identical weights and inputs, in the same process, plus the fraction of this machine's measured
matmul rate that our forward reaches.

    python benchmarks/bench_forward.py [--double 2 --single 4 --width 512 --tokens 32 --text 32 --repeat 5]
    python benchmarks/bench_forward.py --dtype bfloat16     # both models in bf16 (weights and compute)

Default (the issue's setting): 2 double + 4 single blocks, width 512 (8 heads x 64), a 2x2 canvas of
32x32 tokens (1024 image tokens) + 32 text tokens, batch 1, fp32. Runs are interleaved (ours,
theirs, ours, ...) so background load affects both alike; medians are reported.

With --dtype bfloat16 both sides hold bf16 weights and compute in bf16 (diffusers via
`.to(torch.bfloat16)`, ours via `load_flux_transformer(dtype=bfloat16)`), and the matmul rate is
measured for bf16 operands (jax with fp32 accumulation, torch's bf16 `mm`). The difference is
reported against diffusers' fp32 output scale, so it includes bf16 rounding on both sides.
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import statistics
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def forward_flops(width: int, n_double: int, n_single: int, n_img: int, n_txt: int, in_ch: int, ctx: int, out_ch: int,
                  mlp_ratio: float = 4.0) -> float:
    """Matmul FLOPs of one FLUX forward (batch 1): linear layers 2·in·out per token, attention 4·N²·D."""
    D, M, N = width, int(width * mlp_ratio), n_img + n_txt
    per_token_block = 2 * (3 * D * D + D * D + 2 * D * M)  # qkv, proj, mlp (double) == linear1+linear2 (single)
    attention = 4 * N * N * D
    blocks = (n_double + n_single) * (per_token_block * N + attention)
    io = 2 * (n_img * in_ch * D + n_txt * ctx * D + n_img * D * out_ch)
    return float(blocks + io)


def matmul_rate(n: int = 2048, repeat: int = 5, dtype: str = "float32") -> tuple[float, float]:
    """Peak matmul FLOP/s of this machine as JAX (XLA:CPU) and torch achieve it, for `dtype`
    operands (bf16: jax accumulates in fp32, its fastest bf16 form on CPU)."""
    import jax
    import jax.numpy as jnp
    import torch

    a = jnp.ones((n, n), dtype)
    f = jax.jit(lambda x: jnp.dot(x, x, preferred_element_type=jnp.float32))
    f(a).block_until_ready()
    tj = min(_time(lambda: f(a).block_until_ready()) for _ in range(repeat))
    ta = torch.ones(n, n, dtype=getattr(torch, dtype))
    torch.mm(ta, ta)
    tt = min(_time(lambda: torch.mm(ta, ta)) for _ in range(repeat))
    flops = 2 * n**3
    return flops / tj, flops / tt


def _time(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def add_reduced_flux_args(ap) -> None:
    """The size flags every CPU benchmark shares; defaults are the issue's reduced FLUX."""
    ap.add_argument("--double", type=int, default=2, help="double-stream blocks (default 2)")
    ap.add_argument("--single", type=int, default=4, help="single-stream blocks (default 4)")
    ap.add_argument("--width", type=int, default=512, help="model width, heads x head dim (default 512)")
    ap.add_argument("--head-dim", type=int, default=64, help="per-head width (default 64)")
    ap.add_argument("--tokens", type=int, default=32, help="canvas side in tokens (image tokens = tokens^2; default 32)")
    ap.add_argument("--text", type=int, default=32, help="text tokens (default 32)")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_reduced_flux_args(ap)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                    help="weights and compute dtype of both models (default float32, the issue's setting)")
    args = ap.parse_args(argv)

    import jax
    import jax.numpy as jnp
    import torch
    from diffusers import FluxTransformer2DModel
    from diffusers.utils import logging as diffusers_logging

    from pico_jax import load_flux_transformer
    from pico_jax.model.flux import jit_forward

    heads = args.width // args.head_dim
    rope = (args.head_dim - 2 * (args.head_dim * 7 // 16), args.head_dim * 7 // 16, args.head_dim * 7 // 16)
    # diffusers' .to(dtype) logs that no module is kept in fp32 (there is none in FLUX): noise here
    diffusers_logging.set_verbosity_error()
    torch.manual_seed(0)
    tm = FluxTransformer2DModel(num_layers=args.double, num_single_layers=args.single, attention_head_dim=args.head_dim,
                                num_attention_heads=heads, joint_attention_dim=4096, pooled_projection_dim=768,
                                in_channels=64, guidance_embeds=True, axes_dims_rope=rope).eval()
    with tempfile.TemporaryDirectory() as d:
        tm.save_pretrained(d)  # fp32 on disk; each side casts to the benchmark dtype
        ours = jit_forward(load_flux_transformer(d, dtype=getattr(jnp, args.dtype)))
    reference_fp32 = None
    if args.dtype != "float32":
        reference_fp32, tm = tm, copy.deepcopy(tm).to(getattr(torch, args.dtype))

    n_img, n_txt = args.tokens**2, args.text
    g = np.random.default_rng(0)
    ids = np.stack(np.meshgrid(np.arange(args.tokens), np.arange(args.tokens), indexing="ij"), -1).reshape(-1, 2)
    inputs = dict(
        hidden_states=g.standard_normal((1, n_img, 64)).astype(np.float32),
        encoder_hidden_states=g.standard_normal((1, n_txt, 4096)).astype(np.float32),
        pooled_projections=g.standard_normal((1, 768)).astype(np.float32),
        timestep=np.array([0.5], np.float32),
        img_ids=np.concatenate([np.zeros((n_img, 1)), ids], 1).astype(np.float32),
        txt_ids=np.zeros((n_txt, 3), np.float32),
        guidance=np.array([3.5], np.float32),
    )
    t_in32 = {k: torch.from_numpy(v) for k, v in inputs.items()}
    t_in = {k: v.to(getattr(torch, args.dtype)) for k, v in t_in32.items()}
    j_in = {k: jnp.asarray(v) for k, v in inputs.items()}

    def run_ours():
        return ours(**j_in).block_until_ready()

    def run_theirs():
        with torch.inference_mode():
            return tm(**t_in, return_dict=False)[0]

    t0 = time.perf_counter()
    out_j = np.asarray(run_ours()).astype(np.float32)
    compile_s = time.perf_counter() - t0
    out_t = run_theirs().float().numpy()
    err = float(np.abs(out_j - out_t).max() / np.abs(out_t).max())
    err_ref = {}
    if reference_fp32 is not None:
        with torch.inference_mode():
            out_ref = reference_fp32(**t_in32, return_dict=False)[0].numpy()
        scale = np.abs(out_ref).max()
        err_ref = {"ours": float(np.abs(out_j - out_ref).max() / scale),
                   "diffusers": float(np.abs(out_t - out_ref).max() / scale)}
    tj, tt = [], []
    for _ in range(args.repeat):
        tj.append(_time(run_ours))
        tt.append(_time(run_theirs))
    mj, mt = statistics.median(tj), statistics.median(tt)
    flops = forward_flops(args.width, args.double, args.single, n_img, n_txt, 64, 4096, 64)
    rate_jax, rate_torch = matmul_rate(dtype=args.dtype)
    peak = max(rate_jax, rate_torch)

    print(f"device: {jax.devices()[0].platform}, {os.cpu_count()} cores, {platform.processor() or platform.machine()}, "
          f"jax {jax.__version__}, torch {torch.__version__} ({torch.get_num_threads()} threads)")
    print(f"model: {args.double} double + {args.single} single blocks, width {args.width} ({heads}x{args.head_dim}), "
          f"{n_img} image + {n_txt} text tokens, batch 1, {args.dtype}; {flops / 1e9:.1f} GFLOP per forward")
    print(f"max rel. difference ours vs diffusers: {err:.2e}; our compile+first call {compile_s:.1f} s")
    if err_ref:
        print(f"  vs diffusers in fp32 on the same weights: ours {err_ref['ours']:.2e}, "
              f"diffusers {args.dtype} {err_ref['diffusers']:.2e}")
    print(f"  ours (jax.jit)      {mj * 1e3:8.1f} ms  (runs: {', '.join(f'{t * 1e3:.0f}' for t in tj)})")
    print(f"  diffusers (torch)   {mt * 1e3:8.1f} ms  (runs: {', '.join(f'{t * 1e3:.0f}' for t in tt)})")
    print(f"  speed-up ours/diffusers = {mt / mj:.2f}x")
    print(f"matmul rate (2048^2 {args.dtype}): jax {rate_jax / 1e9:.1f} GFLOP/s, torch {rate_torch / 1e9:.1f} GFLOP/s")
    print(f"  ours reaches {flops / mj / 1e9:.1f} GFLOP/s = {flops / mj / peak:.0%} of the machine's measured matmul rate; "
          f"diffusers {flops / mt / 1e9:.1f} GFLOP/s = {flops / mt / peak:.0%}")


if __name__ == "__main__":
    main()
