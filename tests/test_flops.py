"""The FLOP counter the trainer logs and the benchmarks report: loops by their trip counts, convs,
and a whole FLUX forward equal to the analytic count the benchmarks use."""

import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest

from pico_jax.flops import matmul_flops
from pico_jax.model.attention import attention_implementation, forced_attention
from pico_jax.model.flux import FluxConfig, abstract_model

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
S = jax.ShapeDtypeStruct


def _stack(w, x):
    return jax.lax.scan(lambda c, wi: (jnp.tanh(c @ wi), None), x, w)[0]


def test_a_scanned_stack_counts_every_layer_where_xla_counts_one():
    w, x = S((4, 256, 256), jnp.float32), S((128, 256), jnp.float32)
    per_layer = 2 * 128 * 256 * 256
    assert matmul_flops(jax.make_jaxpr(_stack)(w, x)) == 4 * per_layer
    assert jax.jit(_stack).lower(w, x).compile().cost_analysis()["flops"] == per_layer  # why we count ourselves


def test_convolutions_branches_and_while_loops():
    x, k = S((2, 16, 16, 8), jnp.float32), S((3, 3, 8, 32), jnp.float32)
    conv = lambda x, k: jax.lax.conv_general_dilated(x, k, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
    assert matmul_flops(jax.make_jaxpr(conv)(x, k)) == 2 * (2 * 16 * 16 * 32) * (8 * 3 * 3)

    a = S((64, 64), jnp.float32)
    branches = lambda p, a: jax.lax.cond(p, lambda a: a @ a @ a, lambda a: a @ a, a)
    assert matmul_flops(jax.make_jaxpr(branches)(True, a)) == 2 * 2 * 64**3  # the dearer branch
    loop = lambda a: jax.lax.while_loop(lambda c: c[1] < 3, lambda c: (c[0] @ c[0], c[1] + 1), (a, 0))[0]
    assert matmul_flops(jax.make_jaxpr(loop)(a)) == 2 * 64**3
    with pytest.raises(ValueError, match="while loop"):
        matmul_flops(jax.make_jaxpr(loop)(a), while_loops="error")


def test_flux_forward_counts_what_the_benchmarks_analytic_formula_says():
    """The issue's reduced FLUX (2 double + 4 single blocks, width 512, 32x32 + 32 tokens): within
    0.1 % of bench_forward.forward_flops (which leaves out the per-example modulation products),
    with attention as XLA's products or as the CPU's head-by-head loop."""
    from bench_forward import forward_flops

    cfg = FluxConfig(num_double=2, num_single=4, num_heads=8, head_dim=64, axes_dims_rope=(8, 28, 28),
                     in_channels=64, context_dim=128, pooled_dim=64, guidance_embeds=False)
    n, t = 1024, 32
    args = (S((1, n, 64), jnp.float32), S((1, t, 128), jnp.float32), S((1, 64), jnp.float32),
            S((1,), jnp.float32), S((n, 3), jnp.float32), S((t, 3), jnp.float32), None)
    want = forward_flops(512, 2, 4, n, t, 64, 128, cfg.output_channels)
    for impl in ("xla", "headwise"):
        with forced_attention(impl):
            got = matmul_flops(jax.make_jaxpr(lambda m, *a: m(*a))(abstract_model(cfg), *args))
        assert want <= got <= 1.001 * want, (impl, got, want)


def test_forced_attention_wins_over_the_environment_and_is_checked(monkeypatch):
    monkeypatch.setenv("PICO_JAX_ATTENTION", "headwise")
    with forced_attention("xla"):
        assert attention_implementation(jnp.bfloat16, 128, 4096, backend="gpu") == "xla"
    assert attention_implementation(jnp.bfloat16, 128, 4096, backend="gpu") == "headwise"
    with pytest.raises(ValueError, match="'flash'"):
        with forced_attention("flash"):
            pass


def test_peak_tflops_reads_the_data_sheets_by_device_kind():
    from pico_jax.flops import peak_tflops

    bf16 = jnp.bfloat16
    assert peak_tflops("NVIDIA H100 80GB HBM3", bf16) == 989.0  # SXM
    assert peak_tflops("NVIDIA H100 PCIe", jnp.float16) == 756.0
    assert (peak_tflops("NVIDIA H200", bf16), peak_tflops("NVIDIA H200 NVL", bf16)) == (989.0, 835.0)
    assert peak_tflops("NVIDIA A100-SXM4-80GB", bf16) == 312.0
    assert (peak_tflops("TPU v5 lite", bf16), peak_tflops("TPU v5", bf16), peak_tflops("TPU v6 lite", bf16)) == (197.0, 459.0, 918.0)
    assert peak_tflops("TPU v4 lite", bf16) is None  # not v4's 275: an unknown kind is not guessed
    assert peak_tflops("NVIDIA H100 80GB HBM3", jnp.float32) is None  # TF32 or not: unknown
    assert peak_tflops("cpu", bf16) is None


@pytest.mark.parametrize("platform, dtype, kernel_recomputes", [
    ("cuda", jnp.bfloat16, True),  # cuDNN flash attention
    ("tpu", jnp.bfloat16, True),  # splash (counted as flash's 5 backward products)
    ("cpu", jnp.float32, True),  # the head-by-head kernel
    ("cuda", jnp.float32, False),  # XLA's attention: autodiff keeps the probabilities
])
def test_the_device_count_has_the_attention_kernels_recomputed_logits(platform, dtype, kernel_recomputes):
    """An attention gradient: forward QKᵀ and PV, then dV, dP, dQ, dK (6 products of 2·B·H·N²·D
    FLOPs each, the model count), plus the logits again where the kernel that would run is a
    flash kernel (7): program_flops counts each kernel by a visible stand-in doing its products."""
    from pico_jax.backend import traced_for
    from pico_jax.flops import program_flops
    from pico_jax.model.attention import fused_attention

    b, n, h, d = 2, 256, 2, 128
    qkv = [S((b, n, h, d), dtype)] * 3
    loss = lambda q, k, v: jnp.sum(fused_attention(q, k, v).astype(jnp.float32))  # noqa: E731
    grad = jax.value_and_grad(loss, argnums=(0, 1, 2))  # the value too: else the PV product is dead code
    product = 2.0 * b * h * n * n * d
    with traced_for(platform):
        device, model = program_flops(grad, *qkv), program_flops(grad, *qkv, recompute=False)
    assert model == 6 * product
    assert device == (7 if kernel_recomputes else 6) * product
    with traced_for(platform), forced_attention("xla"):  # what runs, e.g. bench_gpu_flux's fallback
        assert program_flops(grad, *qkv) == 6 * product
