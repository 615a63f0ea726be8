"""FLOPs of a traced program, counted in its jaxpr: XLA's `cost_analysis` counts a while loop's
body once, so a scanned layer stack reads as one layer."""

from __future__ import annotations

import math

import jax


def matmul_flops(jaxpr, weight_in: int | None = None, while_loops: str = "once") -> float:
    """FLOPs of every dot_general and convolution in `jaxpr` (a Jaxpr or ClosedJaxpr), 2 per
    multiply-add, each loop's body multiplied by its trip count (scan; a cond counts its dearer
    branch), after dead-code elimination, as XLA would run it: a custom VJP's backward computes
    gradients nobody asked for (a frozen kernel's, in a LoRA step: a third of FLUX.1-Fill-dev's
    step on CPU). With `weight_in`, only dots whose right operand is a (weight_in, ·) matrix,
    which counts how often a model's input projection runs, i.e. model calls. A while loop's trip
    count is unknown: `while_loops` "once" counts its body once, "error" raises instead."""
    from jax._src.interpreters import partial_eval as pe  # dce_jaxpr: not in jax.extend (jax 0.10)

    jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
    jaxpr, _ = pe.dce_jaxpr(jaxpr, [True] * len(jaxpr.outvars))
    return _count(jaxpr, weight_in, while_loops)


def program_flops(fn, *args, recompute: bool = True) -> float:
    """`matmul_flops` of `fn(*args)`'s program (`args` may be ShapeDtypeStructs): what the device
    runs. Every fused attention is traced as visible JAX ops doing its kernel's products
    (`attention.counted_as_run`), so a cuDNN or splash kernel counts as what it computes rather
    than as an opaque call, its backward's recomputation of the logits included. Tracing only; it
    clears JAX's in-memory caches (see `forced_attention`), so count before compiling.

    recompute=False counts the program as if nothing were recomputed: no scanned stack
    rematerialised (`flux.without_remat`) and attention as XLA's, whose gradient reuses the
    forward's probabilities. That is a training step's model FLOPs, the numerator of MFU as
    MaxText and PaLM's paper count it; remat "full" adds one forward of the blocks to a step's ~3,
    a flash kernel one (N, N) product per attention backward."""
    from pico_jax.model.attention import counted_as_run, forced_attention
    from pico_jax.model.flux import without_remat

    if recompute:
        with counted_as_run():
            return matmul_flops(jax.make_jaxpr(fn)(*args))
    with forced_attention("xla"), without_remat():
        return matmul_flops(jax.make_jaxpr(fn)(*args))


# Dense (no structured sparsity) bf16/fp16 tensor-core peaks per device, TFLOP/s, from the vendors'
# data sheets, keyed by JAX's `device.device_kind`. A TPU device is one chip ("TPU v5 lite" is
# v5e, "TPU v5" is v5p, "TPU v6 lite" is v6e). Only what the sheets state; anything else needs
# `peak` given by hand (TrainConfig.peak_tflops_per_device).
TPU_PEAK_TFLOPS = {"TPU v4": 275.0, "TPU v5 lite": 197.0, "TPU v5e": 197.0, "TPU v5": 459.0, "TPU v5p": 459.0,
                   "TPU v6 lite": 918.0, "TPU v6e": 918.0}
# NVIDIA kinds name the board ("NVIDIA H100 80GB HBM3" is the SXM part); first match wins. The
# sheets quote sparse rates (1,979 for H100 SXM); these are half of them.
GPU_PEAK_TFLOPS = (("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H200 NVL", 835.0), ("H100", 989.0),
                   ("H200", 989.0), ("A100", 312.0))


def peak_tflops(device_kind: str, dtype) -> float | None:
    """The device's dense bf16/fp16 matmul peak in TFLOP/s (MFU's denominator), or None when the
    kind is not in the tables or `dtype` is not a 16-bit float: an fp32 program's peak depends on
    whether its products run as TF32, bf16 passes or true fp32."""
    import jax.numpy as jnp

    if jnp.dtype(dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
        return None
    if device_kind in TPU_PEAK_TFLOPS:
        return TPU_PEAK_TFLOPS[device_kind]
    kind = device_kind.lower()
    return next((peak for name, peak in GPU_PEAK_TFLOPS if name.lower() in kind), None)


def _count(jaxpr, weight_in: int | None, while_loops: str) -> float:
    total = 0.0
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name == "dot_general":
            lhs, rhs = (v.aval.shape for v in eqn.invars)
            (contracted, _), _ = eqn.params["dimension_numbers"]
            if weight_in is None or (len(rhs) == 2 and rhs[0] == weight_in):
                total += 2.0 * math.prod(eqn.outvars[0].aval.shape) * math.prod(lhs[d] for d in contracted)
            continue
        if name == "conv_general_dilated":
            if weight_in is None:
                kernel = eqn.invars[1].aval.shape
                _, rhs_spec, _ = eqn.params["dimension_numbers"]
                per_output = kernel[rhs_spec[1]] * math.prod(kernel[d] for d in rhs_spec[2:])
                total += 2.0 * math.prod(eqn.outvars[0].aval.shape) * per_output
            continue
        if name == "while" and while_loops == "error":
            raise ValueError("a while loop of unknown trip count in the program")
        counts = [_count(sub, weight_in, while_loops) for sub in _sub_jaxprs(eqn)]
        if name == "cond":
            total += max(counts)
        elif counts:
            total += sum(counts) * (eqn.params["length"] if name == "scan" else 1)
    return total


def _sub_jaxprs(eqn) -> list:
    subs = []
    for p in eqn.params.values():
        for q in p if isinstance(p, (tuple, list)) else (p,):
            if isinstance(q, jax.extend.core.ClosedJaxpr):
                subs.append(q.jaxpr)
            elif isinstance(q, jax.extend.core.Jaxpr):
                subs.append(q)
    return subs
