"""Trace, lower and compile the full-size FLUX.1-dev forward (bf16, remat, scanned blocks) sharded
over a simulated 8-device CPU mesh, without allocating it; prints the times and per-device bytes.

    python benchmarks/bench_compile.py [--mesh fsdp=4,tensor=2] [--tokens 4096 --text 512 --batch 8]
"""

import argparse
import os
import sys
import time

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mesh", default="fsdp=4,tensor=2")
    ap.add_argument("--config", default="flux1-dev")
    ap.add_argument("--tokens", type=int, default=4096, help="image tokens (4096 = a 1024x1024 canvas)")
    ap.add_argument("--text", type=int, default=512)
    ap.add_argument("--batch", type=int, default=8)
    args = ap.parse_args(argv)

    import jax
    import jax.numpy as jnp
    from flax import nnx

    from pico_jax.model.flux import FluxConfig, abstract_model, count_params
    from pico_jax.parallel import batch_sharding, make_mesh, replicated, state_shardings

    t0 = time.perf_counter()
    cfg = FluxConfig.named(args.config).replace(remat="full")
    graphdef, state = nnx.split(abstract_model(cfg))
    t_trace = time.perf_counter() - t0
    mesh = make_mesh(args.mesh)
    S = jax.ShapeDtypeStruct
    B, N, T = args.batch, args.tokens, args.text
    inputs = (S((B, N, cfg.in_channels), jnp.bfloat16), S((B, T, cfg.context_dim), jnp.bfloat16),
              S((B, cfg.pooled_dim), jnp.bfloat16), S((B,), jnp.float32), S((N, 3), jnp.float32),
              S((T, 3), jnp.float32), S((B,), jnp.float32))
    bs = lambda nd: batch_sharding(mesh, nd)
    shardings = (state_shardings(state, mesh), bs(3), bs(3), bs(2), bs(1), replicated(mesh), replicated(mesh), bs(1))
    fwd = jax.jit(lambda st, *a: nnx.merge(graphdef, st)(*a), in_shardings=shardings)
    t0 = time.perf_counter()
    lowered = fwd.lower(state, *inputs)
    t_lower = time.perf_counter() - t0
    t0 = time.perf_counter()
    compiled = lowered.compile()
    t_compile = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    print(f"{args.config}: {count_params(state):,} parameters, bf16, remat=full, batch {B}, {N} image + {T} text tokens")
    print(f"mesh {dict(mesh.shape)} on {len(jax.devices())} simulated {jax.devices()[0].platform} devices")
    print(f"  abstract model {t_trace:.1f} s, lower {t_lower:.1f} s, compile {t_compile:.1f} s (target: < 60 s)")
    print(f"  per device: arguments {mem.argument_size_in_bytes / 2**30:.2f} GiB, temporaries {mem.temp_size_in_bytes / 2**30:.2f} GiB")


if __name__ == "__main__":
    main()
