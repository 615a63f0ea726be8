"""Minimal reproduction of an XLA:CPU bug, for an upstream report (and to learn when it is fixed).

    python scripts/repro_xla_cpu_bf16_transposed_dot.py      # exit 1: still present, 0: fixed

A bf16 x bf16 -> fp32 product whose result is transposed compiles, then fails at run time:

    UNIMPLEMENTED: Unsupported element type for DotThunk::Execute: BF16 x BF16 = F32

XLA folds the transpose into the dot by swapping its operands; that form is not one YNNPACK takes,
so it falls back to the generic DotThunk, which has no bf16 x bf16 -> f32 kernel. The same product
without the transpose, or with the transpose behind `lax.optimization_barrier`, runs. pico_jax's
LoRA backward (`pico_jax/model/flux.py: _lora_delta_bwd_narrow`) uses the barrier; drop it once
this script says the bug is fixed (and re-measure the bf16 LoRA step with benchmarks/ab_compare.py).
Seen with jax/jaxlib 0.10.2 on x86_64 (AMD EPYC Zen 4, AVX512_BF16), 2026-12-04.
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402


def product(p: jax.Array, q: jax.Array) -> jax.Array:
    """(r, n) x (n, k) -> (r, k), accumulated and returned in fp32."""
    return jax.lax.dot_general(p, q, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32)


def run(name: str, fn, p: jax.Array, q: jax.Array) -> bool:
    try:
        out = jax.jit(fn)(p, q).block_until_ready()
    except Exception as e:  # the bug surfaces as an XlaRuntimeError at run time
        print(f"  {name:32s} FAILS: {str(e).splitlines()[0]}")
        return False
    print(f"  {name:32s} ok, {out.dtype}{list(out.shape)}, [0, 0] = {float(out[0, 0])} (expected {p.shape[1]}.0)")
    return True


def main() -> int:
    print(f"jax {jax.__version__}, backend {jax.default_backend()}, {jax.devices()[0].device_kind}")
    p, q = jnp.ones((8, 96), jnp.bfloat16), jnp.ones((96, 80), jnp.bfloat16)
    run("product(p, q)", product, p, q)
    run("barrier(product(p, q)).T", lambda p, q: jax.lax.optimization_barrier(product(p, q)).T, p, q)
    fixed = run("product(p, q).T", lambda p, q: product(p, q).T, p, q)
    print("the bug is fixed in this jax" if fixed else "the bug is present in this jax")
    return 0 if fixed else 1


if __name__ == "__main__":
    sys.exit(main())
