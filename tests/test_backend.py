"""Programs traced for a backend other than the one running the tests (pico_jax.backend).

On this CPU-only machine, the FLUX transformer is lowered (never compiled) for CUDA and TPU: the
GPU program must call cuDNN flash attention and the TPU program Pallas splash attention (through
Pallas' Mosaic TPU lowering, which checks the kernel's blocks), and neither may carry the CPU
work-arounds (the headwise loops, bf16 layer stacks read through their uint16 bits). Without
`traced_for`, lowering on a CPU host for CUDA kept every CPU path.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from pico_jax.backend import custom_call_counts, export_for, lower_for, target_backend, traced_for
from pico_jax.model.flux import FluxConfig, FluxTransformer
from pico_jax.model.lora import add_lora
from pico_jax.parallel import batch_sharding, make_mesh, replicated, state_shardings

CUDNN = 91000  # this host has no cuDNN; JAX's cuDNN attention checks its features against this version
FMHA, FMHA_BWD, MOSAIC = "__cudnn$fmhaSoftmax", "__cudnn$fmhaSoftmaxBackward", "tpu_custom_call"
B, N, T = 4, 64, 16

# head_dim 128: what cuDNN's flash attention and the TPU splash kernel take (FLUX's own)
CFG = FluxConfig(num_double=1, num_single=2, num_heads=2, head_dim=128, axes_dims_rope=(16, 56, 56),
                 in_channels=16, context_dim=32, pooled_dim=16)


def _model_and_inputs(dtype=jnp.bfloat16, lora: bool = False):
    model = FluxTransformer(CFG, dtype=dtype, param_dtype=dtype, rngs=nnx.Rngs(0))
    if lora:
        add_lora(model, 4)
    S = jax.ShapeDtypeStruct
    inputs = (S((B, N, CFG.in_channels), dtype), S((B, T, CFG.context_dim), dtype), S((B, CFG.pooled_dim), dtype),
              S((B,), jnp.float32), S((N, 3), jnp.float32), S((T, 3), jnp.float32), S((B,), jnp.float32))
    return model, inputs


def _forward():
    model, inputs = _model_and_inputs()
    graphdef, state = nnx.split(model)
    return jax.jit(lambda s, *a: nnx.merge(graphdef, s)(*a)), (state, *inputs)


def _lora_gradient():
    model, inputs = _model_and_inputs(lora=True)
    graphdef, lora, base = nnx.split(model, nnx.LoRAParam, ...)

    def loss(lora, base, *a):
        return jnp.mean(jnp.square(nnx.merge(graphdef, lora, base)(*a).astype(jnp.float32)))

    return jax.jit(jax.grad(loss)), (lora, base, *inputs)


def test_traced_for_sets_and_restores_the_target():
    host = jax.default_backend()
    assert target_backend() == host
    with traced_for("cuda") as backend:
        assert backend == target_backend() == "gpu"
        with traced_for("tpu"):
            assert target_backend() == "tpu"
        assert target_backend() == "gpu"
    assert target_backend() == host
    with pytest.raises(ValueError, match="unknown platform 'metal'"):
        with traced_for("metal"):
            pass


@pytest.mark.parametrize("program", [_forward, _lora_gradient], ids=["forward", "lora_gradient"])
def test_gpu_and_tpu_programs_call_their_attention_kernels(program):
    fn, args = program()
    fn.trace(*args)  # a trace for this host, cached by jit: it must not stand in for the others
    cuda = lower_for(fn, "cuda", *args, assume_cudnn_version=CUDNN).as_text()
    tpu = lower_for(fn, "tpu", *args).as_text()
    host = lower_for(fn, "cpu", *args).as_text()

    gpu_calls, tpu_calls = custom_call_counts(cuda), custom_call_counts(tpu)
    assert gpu_calls.get(FMHA) == 2, gpu_calls  # one site per scanned stack: double and single blocks
    if program is _lora_gradient:
        assert gpu_calls.get(FMHA_BWD) == 2, gpu_calls
    assert tpu_calls.get(MOSAIC, 0) >= 1 and FMHA not in tpu_calls, tpu_calls
    assert not custom_call_counts(host).keys() & {FMHA, FMHA_BWD, MOSAIC}
    # The CPU-only work-around for bf16 stacks (read through their uint16 bits) stays on CPU.
    assert "ui16" in host and "ui16" not in cuda and "ui16" not in tpu


def test_export_for_gives_serialisable_gpu_and_sharded_tpu_programs():
    fn, args = _forward()
    gpu = export_for(fn, "cuda", *args, assume_cudnn_version=CUDNN)
    assert gpu.platforms == ("cuda",) and custom_call_counts(gpu.mlir_module()).get(FMHA) == 2
    assert len(gpu.mlir_module_serialized) > 0  # (Exported.serialize() would need flatbuffers)

    # TPU over a mesh: splash runs per device in a shard_map, so the program exports as is.
    mesh = make_mesh("fsdp=4,tensor=2", jax.devices()[:8])
    state, *inputs = args
    state = jax.tree.map(lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh),
                         state, state_shardings(state, mesh))
    shardings = (batch_sharding(mesh, 3), batch_sharding(mesh, 3), batch_sharding(mesh, 2), batch_sharding(mesh, 1),
                 replicated(mesh), replicated(mesh), batch_sharding(mesh, 1))
    inputs = [jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh) for a, sh in zip(inputs, shardings)]
    with jax.set_mesh(mesh):
        tpu = export_for(fn, "tpu", state, *inputs)
    assert tpu.nr_devices == 8 and custom_call_counts(tpu.mlir_module()).get(MOSAIC, 0) >= 1
    assert len(tpu.mlir_module_serialized) > 0
