"""Trace, lower and compile full-size FLUX.1-dev (bf16, scanned blocks) sharded over a simulated
8-device CPU mesh, without allocating it; prints the times and the per-device bytes XLA plans.

    python benchmarks/bench_compile.py [--mesh fsdp=4,tensor=2] [--tokens 4096 --text 512 --batch 8]
    python benchmarks/bench_compile.py --step lora --batch 1 --remat none   # a LoRA gradient instead

--step forward (default): the forward pass with remat=full (the issue's compile-time target).
--step lora: the gradient of a PICO-style LoRA loss (rank --rank on the default targets, MSE on
the output) w.r.t. the LoRA factors only: what a training step compiles, minus the optimizer.
Its temporaries are the activation memory the remat policy leaves (XLA:CPU's plan; a GPU plan
differs in detail, not in what is stored).
--step sample: PICO's whole sampler (`pico_jax.pipeline.sample`) on FLUX.1-Fill-dev (--config
is ignored): --steps Euler steps, --seeds seeds scored by the attention hook over the first
--score-steps and the best one finished, --seed-batch of them at a time (default all: the GPU/TPU
program), over --batch canvases of --tokens image tokens sharded over data x fsdp. The autoencoder
is not in it (the condition tokens are inputs), as in bench_gpu_flux.py's sample section.

    python benchmarks/bench_compile.py --step sample --batch 8 --mesh data=2,fsdp=4

--step train: the trainer's whole step (`pico_jax.trainer.make_train_step`, as `train.py` runs
it) with configs/flux_dev_lora.py's settings: FLUX.1-Fill-dev (--config is ignored) with LoRA
rank --rank, the FLUX VAE encoding the --batch canvases (random abstract weights), the flow loss's
gradient and AdamW (the config keeps no EMA). Every state leaf is placed as the Trainer places it
(the Adam moments on their factors' shards, `trainer.optimizer_state_shardings`) and the step is
jitted by the Trainer's own `jit_train_step`, so the per-device arguments are what a run holds
between steps and the temporaries what a step adds.

    python benchmarks/bench_compile.py --step train --batch 8 --rank 32 --mesh fsdp=8

--remat auto (--step train): the step compiled with remat none, dots and full in turn, each one's
planned peak per device, and the policy `TrainConfig(remat="auto")` would run on devices of each
--device-memory-gib (the first in that order within 90 % of it).

    python benchmarks/bench_compile.py --step train --batch 8 --rank 32 --mesh data=8 --remat auto

--gather-weights auto (--step sample): the sampler compiled with the weights gathered per call,
then per layer, each one's planned peak per device, and what `Pipeline(gather_weights="auto")`
would run on devices of each --device-memory-gib.

    python benchmarks/bench_compile.py --step sample --batch 8 --mesh data=2,fsdp=4 --gather-weights auto

--platform cuda / tpu: the same programs traced for a GPU / TPU (cuDNN flash / Pallas splash
attention, none of the CPU work-arounds) and lowered for it on this host, without compiling:
a check that what a device would run traces, shards and lowers, before device time is spent.

    python benchmarks/bench_compile.py --platform tpu --step lora --remat dots
"""

import argparse
import os
import sys
import time

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def main(argv=None):
    from pico_jax.infer import GATHER_WEIGHTS_CHOICES  # the CLIs' choices, without importing jax

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mesh", default="fsdp=4,tensor=2")
    ap.add_argument("--config", default="flux1-dev")
    ap.add_argument("--tokens", type=int, default=4096, help="image tokens (4096 = a 1024x1024 canvas)")
    ap.add_argument("--text", type=int, default=512)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--step", choices=("forward", "lora", "sample", "train"), default="forward",
                    help="what to compile (see above)")
    ap.add_argument("--remat", choices=("full", "dots", "nothing", "none", "auto"), default="full",
                    help="FluxConfig.remat of the layer stacks (default full); auto, with --step train: each of "
                         "none, dots, full, and which the trainer's remat='auto' would pick (see above)")
    ap.add_argument("--device-memory-gib", type=float, nargs="+", default=[59.7, 75.7], metavar="GIB",
                    help="--remat auto, --gather-weights auto: device limits to choose for, GiB (default 59.7 75.7: an 80 GB H100's "
                         "79.65 GiB under JAX's default preallocation of 75 %%, and with "
                         "XLA_PYTHON_CLIENT_MEM_FRACTION=0.95)")
    ap.add_argument("--rank", type=int, default=16, help="LoRA rank for --step lora and --step train")
    ap.add_argument("--grad-accum", type=int, default=1,
                    help="--step train: the --batch canvases in this many micro-batches (TrainConfig.grad_accum_steps)")
    ap.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16",
                    help="parameters and activations (default bfloat16). On CPU a bf16 product runs through "
                         "flux.narrow_product (fp32 accumulation, a custom VJP); float32 takes the plain dot "
                         "that GPU and TPU programs use for bf16 too")
    ap.add_argument("--steps", type=int, default=28, help="sampling steps for --step sample (default 28)")
    ap.add_argument("--seeds", type=int, default=8, help="seeds for --step sample (default 8)")
    ap.add_argument("--score-steps", type=int, default=4, help="scored early steps for --step sample (default 4)")
    ap.add_argument("--seed-batch", type=int, default=None,
                    help="seeds run together for --step sample (default: all, the GPU/TPU program)")
    ap.add_argument("--gather-weights", choices=GATHER_WEIGHTS_CHOICES, default="per_layer",
                    help="for --step sample over 'fsdp': each layer's weights gathered at every model call "
                         "(per_layer, the default here) or the whole model once per call (per_call), as "
                         "Pipeline(gather_weights=...) runs them; auto: both, and which the Pipeline's default "
                         "(auto) would run on devices of each --device-memory-gib")
    ap.add_argument("--no-gather", action="store_true",
                    help="trace without the context mesh, so the layers do not gather their weights over 'fsdp': "
                         "the plan XLA's partitioner picks alone (what every program had before the seventeenth "
                         "session), for comparison")
    ap.add_argument("--platform", choices=("cpu", "cuda", "tpu"), default="cpu",
                    help="cpu (default): lower and compile for this host's simulated devices. cuda / tpu: trace "
                         "the program a GPU / TPU would run (pico_jax.backend.traced_for: cuDNN flash or Pallas "
                         "splash attention, no CPU work-arounds) and lower it for that platform; nothing is "
                         "compiled (that needs the device), so it prints the lowering time and the custom calls")
    ap.add_argument("--assume-cudnn-version", type=int, default=91000,
                    help="for --platform cuda on a host without cuDNN: the version JAX's cuDNN attention checks "
                         "its features against (default 91000 = 9.10; ignored where cuDNN is installed)")
    args = ap.parse_args(argv)
    if args.remat == "auto":
        if args.step != "train" or args.platform != "cpu":
            ap.error("--remat auto needs --step train and --platform cpu (it compiles each policy)")
        return _auto_remat(args)
    if args.gather_weights == "auto":
        if args.step != "sample" or args.platform != "cpu":
            ap.error("--gather-weights auto needs --step sample and --platform cpu (it compiles both programs)")
        return _auto_gather(args)
    measure(args)


def _auto_gather(args) -> None:
    """--gather-weights auto: both sampler programs measured, then the Pipeline's choice per limit."""
    from pico_jax.pipeline import GATHER_AUTO_ORDER

    _choose_by_plan(args, "gather_weights", GATHER_AUTO_ORDER)


def _auto_remat(args) -> None:
    """--remat auto: every policy of REMAT_AUTO_ORDER measured, then the trainer's choice per limit."""
    from pico_jax.trainer import REMAT_AUTO_ORDER

    _choose_by_plan(args, "remat", REMAT_AUTO_ORDER)


def _choose_by_plan(args, setting: str, order) -> None:
    """`args.<setting>` set to each of `order` in turn and measured; then what an "auto" choice
    (`memory.first_within`, as the trainer's remat and the Pipeline's gather choose) would run on
    devices of each --device-memory-gib."""
    from pico_jax.memory import HEADROOM, GiB, first_within

    plans = {choice: measure(_with(args, **{setting: choice})) for choice in order}
    for gib in args.device_memory_gib:
        budget = HEADROOM * gib * GiB
        chosen = first_within(order, plans, budget)
        print(f"{setting} auto on {gib:g} GiB per device (budget {budget / GiB:.1f} GiB): "
              + (chosen if chosen else f"none fits; it would run the smallest, {min(plans, key=plans.get)}"))


def _with(args, **changes):
    new = argparse.Namespace(**vars(args))
    for k, v in changes.items():
        setattr(new, k, v)
    return new


def measure(args) -> int:
    """Compile (or with --platform cuda/tpu, lower) the program `args` name and print what it
    costs; returns the compiled program's planned peak bytes per device (0 when only lowered)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from pico_jax.flops import program_flops
    from pico_jax.memory import planned_peak_bytes
    from pico_jax.model.flux import FluxConfig, abstract_model, count_params
    from pico_jax.model.lora import add_lora
    from pico_jax.parallel import (MeshError, batch_sharding, check_batch_size, collective_bytes, make_mesh, on_mesh,
                                   replicated, state_shardings)

    t0 = time.perf_counter()
    if args.step in ("sample", "train"):
        args.config = "flux1-fill-dev"  # the sampler's and the trainer's Fill-style input: 384 channels
    cfg = FluxConfig.named(args.config).replace(remat=args.remat)

    dtype = getattr(jnp, args.dtype)
    abstract = abstract_model(cfg, dtype=dtype, param_dtype=dtype)
    if args.step == "lora":
        add_lora(abstract, args.rank)  # on an abstract model the factors are ShapeDtypeStructs too
    t_trace = time.perf_counter() - t0
    mesh = make_mesh(args.mesh)
    try:
        check_batch_size(args.batch, mesh, "--batch")
    except MeshError as e:
        raise SystemExit(f"bench_compile.py: error: {e}") from None
    S = jax.ShapeDtypeStruct
    B, N, T = args.batch, args.tokens, args.text
    inputs = (S((B, N, cfg.in_channels), dtype), S((B, T, cfg.context_dim), dtype),
              S((B, cfg.pooled_dim), dtype), S((B,), jnp.float32), S((N, 3), jnp.float32),
              S((T, 3), jnp.float32), S((B,), jnp.float32))
    bs = lambda nd: batch_sharding(mesh, nd)
    input_shardings = (bs(3), bs(3), bs(2), bs(1), replicated(mesh), replicated(mesh), bs(1))
    if args.step == "sample":
        fn, operands, what, n_params = _sampler(args, cfg, abstract, mesh)
    elif args.step == "train":
        fn, operands, what, n_params = _train_step(args, cfg, abstract, mesh)
    elif args.step == "forward":
        graphdef, state = nnx.split(abstract)
        fn = jax.jit(lambda st, *a: nnx.merge(graphdef, st)(*a),
                     in_shardings=(state_shardings(state, mesh), *input_shardings))
        operands = (state, *inputs)
        what, n_params = "forward", count_params(state)
    else:
        # LoRAParam first: it is a subclass of Param, so `...` then takes only the frozen base.
        graphdef, lora, base = nnx.split(abstract, nnx.LoRAParam, ...)

        def loss(lora, base, *a):
            *model_inputs, target = a
            out = nnx.merge(graphdef, lora, base)(*model_inputs)
            return jnp.mean(jnp.square(out.astype(jnp.float32) - target))

        target = S((B, N, cfg.output_channels), jnp.float32)
        fn = jax.jit(jax.grad(loss), in_shardings=(state_shardings(lora, mesh), state_shardings(base, mesh),
                                                   *input_shardings, bs(3)))
        operands = (lora, base, *inputs, target)
        what = f"LoRA gradient (rank {args.rank}, {count_params(lora) / 1e6:.1f} M trainable)"
        n_params = count_params(lora) + count_params(base)
    if args.platform != "cpu":
        _lower_for_platform(args, fn, operands, mesh, what, n_params, cfg)
        return 0
    unmeshed = fn  # for the FLOP count: jax.set_mesh cannot run inside make_jaxpr, and it moves no FLOPs
    if not args.no_gather:  # traced under the mesh: each scanned layer gathers its weights over 'fsdp'
        fn = on_mesh(fn, mesh)
    t0 = time.perf_counter()
    lowered = fn.lower(*operands)
    t_lower = time.perf_counter() - t0
    t0 = time.perf_counter()
    compiled = lowered.compile()
    t_compile = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    print(f"{args.config}: {n_params:,} parameters, {args.dtype}, {what}, remat={cfg.remat}, batch {B}, "
          f"{N} image + {T} text tokens")
    print(f"mesh {dict(mesh.shape)} on {len(jax.devices())} simulated {jax.devices()[0].platform} devices")
    target_note = " (target: < 60 s)" if args.step == "forward" else ""
    print(f"  abstract model {t_trace:.1f} s, lower {t_lower:.1f} s, compile {t_compile:.1f} s{target_note}")
    peak = planned_peak_bytes(compiled)
    print(f"  per device: arguments {mem.argument_size_in_bytes / 2**30:.2f} GiB, temporaries {mem.temp_size_in_bytes / 2**30:.2f} GiB; "
          f"planned peak {peak / 2**30:.2f} GiB (arguments + outputs not written in place + temporaries + code)")
    flops = program_flops(unmeshed, *operands)
    print(f"  matmul + conv FLOPs per call (jaxpr count, attention as its kernel's products): {flops / 1e12:,.1f} TFLOP, "
          f"{flops / mesh.size / 1e12:,.1f} per device")
    if args.step in ("lora", "train"):
        model_flops = program_flops(unmeshed, *operands, recompute=False)
        print(f"  of which the model's (without remat's or the attention kernel's recomputation; MFU's numerator): "
              f"{model_flops / 1e12:,.1f} TFLOP")
    moved = collective_bytes(compiled.as_text())
    unknown = moved.pop("loops of unknown trip count", 0)
    parts = ", ".join(f"{kind} {n / 2**30:.2f} GiB" for kind, n in sorted(moved.items()) if n) or "none"
    print(f"  collectives per device per call (result bytes; XLA's plan{', no fsdp gather' if args.no_gather else ''}): "
          f"{parts}" + (f" ({unknown} loop(s) of unknown trip count counted once)" if unknown else ""))
    return peak


def _lower_for_platform(args, fn, operands, mesh, what, n_params, cfg) -> None:
    """--platform cuda / tpu: the program lowered for that platform, and the kernels in it."""
    import contextlib

    import jax

    from pico_jax.backend import custom_call_counts, lower_for

    t0 = time.perf_counter()
    with contextlib.nullcontext() if args.no_gather else jax.set_mesh(mesh):
        lowered = lower_for(fn, args.platform, *operands, assume_cudnn_version=args.assume_cudnn_version)
    text = lowered.as_text()
    t_lower = time.perf_counter() - t0
    print(f"{args.config}: {n_params:,} parameters, {args.dtype}, {what}, remat={cfg.remat}, batch {args.batch}, "
          f"{args.tokens} image + {args.text} text tokens")
    print(f"mesh {dict(mesh.shape)}; lowered for {args.platform}, not compiled (that needs the device)")
    print(f"  trace + lower {t_lower:.1f} s; StableHLO {len(text) / 2**20:.2f} MiB of text")
    kernels = custom_call_counts(text)
    print("  custom call sites (a scanned stack holds one for all its layers): "
          + (", ".join(f"{name} x{n}" for name, n in kernels.items()) or "none"))
    if args.platform == "cuda" and mesh.size > 1:
        print("  (over a mesh, cuDNN attention is a CustomSPMDPartitioning site until XLA compiles it)")


def _sampler(args, cfg, abstract, mesh):
    """(jitted sampler, abstract operands, description, parameter count) for --step sample."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from pico_jax.model.flux import count_params
    from pico_jax.parallel import batch_sharding, fsdp_gather_model, replicated, state_shardings
    from pico_jax.pipeline import CanvasLayout, SamplingPlan, TextConditioning, sample
    from pico_jax.scorer import ScorerConfig

    side = int(round(np.sqrt(args.tokens)))
    if side * side != args.tokens:
        raise SystemExit(f"--tokens {args.tokens}: --step sample needs a square canvas (e.g. 4096 = 64 x 64)")
    layout = CanvasLayout(panel=side * 16 // 2, ae_factor=8)  # FLUX: 8x VAE, 2x2 packing; panels are a half side
    plan = SamplingPlan(steps=args.steps, seeds=args.seeds, keep=1, selection="early",
                        scorer=ScorerConfig(steps=args.score_steps), guidance=30.0 if cfg.guidance_embeds else None,
                        seed_batch=args.seed_batch or args.seeds).validate()
    graphdef, state = nnx.split(abstract)
    S, B, N = jax.ShapeDtypeStruct, args.batch, args.tokens
    c_lat = cfg.output_channels
    bs = lambda nd: batch_sharding(mesh, nd)

    def run(state, cond, known, text, seeds):
        if args.gather_weights == "per_call":
            state = fsdp_gather_model(state, getattr(jnp, args.dtype))
        return sample(nnx.merge(graphdef, state), cond, known, text, seeds, layout, plan)

    text = TextConditioning(S((1, args.text, cfg.context_dim), getattr(jnp, args.dtype)), S((1, cfg.pooled_dim), getattr(jnp, args.dtype)))
    everywhere = replicated(mesh)
    fn = jax.jit(run, in_shardings=(state_shardings(state, mesh), bs(3), bs(3),
                                    TextConditioning(everywhere, everywhere), everywhere))
    operands = (state, S((B, N, cfg.in_channels - c_lat), getattr(jnp, args.dtype)), S((B, N, c_lat), getattr(jnp, args.dtype)), text,
                S((args.seeds,), jnp.uint32))
    what = (f"PICO sampler ({plan.steps} steps, {plan.seeds} seeds scored over {plan.scorer.steps} and the best "
            f"finished, {plan.seed_batch} at a time; weights gathered {args.gather_weights.replace('_', ' ')})")
    return fn, operands, what, count_params(state)


def _train_step(args, cfg, abstract, mesh):
    """(jitted training step, abstract operands, description, parameter count) for --step train."""
    import dataclasses

    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from pico_jax.model.autoencoder import Autoencoder, AutoencoderConfig, flux_vae_config
    from pico_jax.model.flux import count_params
    from pico_jax.parallel import batch_sharding, replicated, state_shardings
    from pico_jax.pipeline import CanvasLayout, TextConditioning, fill_in_channels
    from pico_jax.model.lora import add_lora
    from pico_jax.trainer import (config_dtype, jit_train_step, make_optimizer, make_train_step,
                                  optimizer_state_shardings, trainable_filter)

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "configs"))
    import flux_dev_lora

    side = int(round(np.sqrt(args.tokens)))
    if side * side != args.tokens:
        raise SystemExit(f"--tokens {args.tokens}: --step train needs a square canvas (e.g. 4096 = 64 x 64)")
    tcfg = dataclasses.replace(flux_dev_lora.get_config(), lora_rank=args.rank, batch_size=args.batch,
                               grad_accum_steps=args.grad_accum, panel=side * 16 // 2, dtype=args.dtype, remat=cfg.remat)
    dp = mesh.shape["data"] * mesh.shape["fsdp"]
    if args.batch % (args.grad_accum * dp):
        raise SystemExit(f"--batch {args.batch} must split into --grad-accum {args.grad_accum} micro-batches, "
                         f"each divisible by the mesh's data x fsdp = {dp}")
    # The factors as the Trainer adds them (`trainer.build_model`): its targets, alpha and fp32 master dtype.
    add_lora(abstract, tcfg.lora_rank, tcfg.lora_alpha, tcfg.lora_targets, dtype=config_dtype(tcfg, "master_dtype"))
    dtype = getattr(jnp, args.dtype)
    ae = nnx.eval_shape(lambda: Autoencoder(AutoencoderConfig.from_dict(flux_vae_config()), dtype=dtype,
                                            rngs=nnx.Rngs(0)))
    assert fill_in_channels(ae) == cfg.in_channels
    layout = CanvasLayout(tcfg.panel, ae.downsample_factor)
    S = jax.ShapeDtypeStruct
    placed = lambda tree, shardings: jax.tree.map(lambda x, s: S(x.shape, x.dtype, sharding=s), tree, shardings)
    graphdef, trainable, frozen = nnx.split(abstract, trainable_filter(tcfg), ...)
    trainable = placed(trainable, state_shardings(trainable, mesh))
    frozen = placed(frozen, state_shardings(frozen, mesh))
    tx, schedule = make_optimizer(tcfg)
    opt_state = placed(jax.eval_shape(tx.init, trainable), optimizer_state_shardings(tx, trainable, mesh))
    everywhere = replicated(mesh)
    ae_graphdef, ae_state = nnx.split(ae)
    text = TextConditioning(S((1, args.text, cfg.context_dim), dtype), S((1, cfg.pooled_dim), dtype))
    conditioning = jax.tree.map(lambda x: S(x.shape, x.dtype, sharding=everywhere), (ae_state, text))
    panel = S((args.batch, tcfg.panel, tcfg.panel, 3), jnp.float32, sharding=batch_sharding(mesh, 4))
    batch = {k: panel for k in ("A", "A_out", "B", "B_out")}
    ema = trainable if tcfg.ema_decay > 0 else None
    step_fn = make_train_step(graphdef, ae_graphdef, layout, tcfg, tx, schedule)
    fn = jit_train_step(step_fn, trainable, jax.tree.map(lambda x: x.sharding, opt_state), ema, mesh)
    operands = (trainable, frozen, conditioning, opt_state, ema, batch, S((), jnp.int32, sharding=everywhere))
    micro = f" in {args.grad_accum} micro-batches" if args.grad_accum > 1 else ""
    what = (f"training step (LoRA rank {args.rank}, {count_params(trainable) / 1e6:.1f} M trainable; FLUX VAE encode "
            f"of {args.batch} {2 * tcfg.panel}^2 canvases{micro}, AdamW{', EMA' if ema is not None else ''})")
    return fn, operands, what, count_params(trainable) + count_params(frozen) + count_params(ae_state)


if __name__ == "__main__":
    main()
