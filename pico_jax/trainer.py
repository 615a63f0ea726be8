"""PICO training: flow matching on four-panel canvases, LoRA or full fine-tuning, sharded over a
device mesh, with Orbax checkpoints that resume exactly (parameters, optimizer, step, RNG and the
data iterator position).

The step is one `jax.jit` over ('data', 'fsdp', 'tensor'): parameters (the frozen base too) are
sharded by `pico_jax.parallel`'s rules, the batch over data×fsdp. It is a pure function of
(trainable, frozen, opt_state, batch, step) — randomness is `fold_in(seed, step)`, so a resumed
run draws exactly the noise and timesteps the uninterrupted run would have.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from pico_jax import grid
from pico_jax.flow import flow_loss, flux_mu, interpolate, sample_timesteps
from pico_jax.model.flux import PARAM_LAYOUT, FluxConfig, FluxTransformer
from pico_jax.pipeline import (
    CanvasLayout,
    SamplingPlan,
    TextConditioning,
    check_gather_weights,
    encode_tokens,
    fill_condition,
    fill_in_channels,
)
from pico_jax.profiling import StepProfiler
from pico_jax.safetensors_io import CheckpointError


# --------------------------------------------------------------------------------- config
@dataclasses.dataclass
class TrainConfig:
    """Everything a run needs. Configs in configs/*.py return one of these (get_config())."""

    model: FluxConfig = dataclasses.field(default_factory=FluxConfig)
    base_checkpoint: str | None = None  # diffusers dir or BFL file; None: random init (small models)
    autoencoder: dict = dataclasses.field(default_factory=lambda: {"kind": "pixel", "factor": 2})
    text: dict = dataclasses.field(default_factory=lambda: {"kind": "zeros", "length": 1})
    panel: int = 32
    query_hint: bool = False  # Fill condition shows B under the B' mask (see CanvasLayout); keep False for FLUX.1-Fill
    prediction: str = "velocity"  # network output: 'velocity' (FLUX) or 'x0_residual' (see flow.velocity_from_output)
    dtype: str = "float32"  # compute dtype, and the frozen base's parameters'
    # what is trained
    lora_rank: int = 0  # 0: full fine-tuning
    lora_alpha: float | None = None
    lora_targets: str = "default"  # add_lora's: a regex of Dense paths, or a preset ('default', 'all')
    # The trained parameters' dtype (the LoRA factors, or with lora_rank 0 every parameter), so
    # their gradients' and Adam moments' too: fp32 master weights whatever `dtype` is (the forward
    # casts them to it), as diffusers' scripts upcast their trainable parameters. In bf16, AdamW's
    # small steps round away: at lr 1e-5, the paper config's cosine floor, ten steps moved 22 % of
    # a fresh LoRA A's elements, a quarter of the way (benchmarks/RESULTS.md, twenty-fifth session).
    master_dtype: str = "float32"
    # optimization
    steps: int = 1000
    batch_size: int = 16  # global, per optimizer step
    # Each step's batch in this many equal micro-batches, one after another inside the step, their
    # gradients averaged: the activation memory of batch_size / grad_accum_steps, the update of
    # batch_size (the same draws and, up to summation order, the same gradient).
    grad_accum_steps: int = 1
    lr: float = 3e-4
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    ema_decay: float = 0.0  # 0: no EMA
    timestep_sampling: str = "logit_normal"
    shift_mu: float | None = 0.0  # None: FLUX's resolution-dependent shift
    # data
    data: dict = dataclasses.field(default_factory=lambda: {"kind": "procedural", "families": "train"})
    augment: bool = True
    # Threads per host reading and augmenting examples (grain's read threads; the batches do not
    # depend on it). Procedural 512-px episodes scale with cores (benchmarks/bench_data.py: 9.6
    # examples/s on one thread, 16.5 on two): raise it on a many-core host that feeds fast steps.
    data_threads: int = 4
    # Worker processes per host (grain's mp_prefetch), each with data_threads read threads, for
    # where threads stop scaling (the GIL, or many cores). 0: none, everything in this process.
    # The batches do not depend on it, and a run resumes with any value (the data restarts at
    # the batch of the restored step).
    data_workers: int = 0
    # parallelism / bookkeeping
    mesh: str | None = None
    # How the layer stacks trade memory for recomputation (FluxConfig.remat): "none" keeps every
    # activation, "dots" recomputes all but the products, "full" recomputes each block in the
    # backward (~1/3 more work). "auto": the least recomputation whose compiled step fits the
    # devices' memory by XLA's own plan (`REMAT_AUTO_ORDER`, within memory.HEADROOM of it), found
    # by compiling before the first step; the compiled program it picks is the one that runs.
    remat: str = "none"
    # The memory per device remat="auto" plans against, GiB. 0: each device's own (its allocator's
    # limit on GPU/TPU; on CPU the host's RAM over its devices), the smallest over all processes.
    device_memory_gib: float = 0.0
    seed: int = 0
    log_every: int = 10
    checkpoint_every: int = 200
    keep_checkpoints: int = 3
    sample_every: int = 0  # 0: only at the end
    sample_steps: int = 12
    # Over 'fsdp', when the sample sheets' sampler gathers the weights (Pipeline's gather_weights):
    # "per_layer" at every model call, "per_call", the whole model once per sheet, or "auto",
    # per_call where XLA's plan fits the device's memory less the training state the sampler does
    # not read (Adam's moments, the weights not sampled: `Trainer.pipeline`).
    sample_gather_weights: str = "auto"
    # MFU's denominator: the device's dense matmul peak in TFLOP/s. 0: looked up from the device
    # kind (flops.peak_tflops: H100, H200, A100, TPU v4 / v5e / v5p / v6e, for a bf16/fp16 dtype);
    # metrics rows carry "mfu" only when a peak is known.
    peak_tflops_per_device: float = 0.0
    # A jax.profiler trace of steps [profile_start_step, + profile_steps) into DIR/profile
    # (TensorBoard's profile plugin, Perfetto or XProf read it); -1: none. Start after the first
    # step, which compiles.
    profile_start_step: int = -1
    profile_steps: int = 3
    # The sampling defaults written into an exported checkpoint's pico.json: SamplingPlan fields
    # over (steps=sample_steps, mu=0), "scorer" a dict of ScorerConfig fields; e.g.
    # {"steps": 12, "scorer": {"signal": "consensus"}}. Checked when the Trainer is built.
    export_sampling: dict = dataclasses.field(default_factory=dict)
    inject_nan_at_step: int = -1  # testing aid: make the loss NaN at this step

    def to_json(self) -> dict:
        d = dataclasses.asdict(self)
        d["model"] = dataclasses.asdict(self.model)
        return d


def apply_overrides(cfg: TrainConfig, overrides: dict[str, str]) -> TrainConfig:
    """`key=value` overrides (dotted for the model: model.num_double=4), typed from the defaults.

    Model fields are replaced together, so a consistent set (head_dim with axes_dims_rope) works."""
    model_updates = {}
    for key, raw in overrides.items():
        target, field = (cfg.model, key.split(".", 1)[1]) if key.startswith("model.") else (cfg, key)
        if not hasattr(target, field):
            raise ValueError(f"unknown config key {key!r}")
        value = _parse_like(raw, getattr(target, field), key)
        if target is cfg.model:
            model_updates[field] = value
        else:
            setattr(cfg, field, value)
    if model_updates:
        cfg.model = dataclasses.replace(cfg.model, **model_updates)
    return cfg


def _parse_like(raw: str, current: Any, key: str):
    if isinstance(current, bool):
        if raw.lower() not in ("true", "false", "1", "0"):
            raise ValueError(f"{key}: expected true/false, got {raw!r}")
        return raw.lower() in ("true", "1")
    if isinstance(current, (dict, list, tuple)) or current is None:
        try:
            v = json.loads(raw)
        except json.JSONDecodeError:
            v = raw
        return tuple(v) if isinstance(current, tuple) else v
    try:
        return type(current)(raw)
    except ValueError:
        raise ValueError(f"{key}: cannot read {raw!r} as {type(current).__name__}") from None


def export_plan(cfg: TrainConfig) -> SamplingPlan:
    """The sampling plan an export writes: (steps=sample_steps, mu=0) with cfg.export_sampling
    applied. Errors name the export_sampling key."""
    from pico_jax.checkpoints import plan_from_json
    from pico_jax.scorer import ScorerConfig

    over = dict(cfg.export_sampling or {})
    scorer_over = over.get("scorer") or {}
    if not isinstance(scorer_over, dict):
        raise ValueError(f"export_sampling.scorer must be a dict of ScorerConfig fields (got {scorer_over!r})")
    for where, keys, cls in (("export_sampling", over, SamplingPlan), ("export_sampling.scorer", scorer_over, ScorerConfig)):
        fields = {f.name for f in dataclasses.fields(cls)}
        for key in keys:
            if key not in fields:
                raise ValueError(f"{where}: unknown key {key!r} ({cls.__name__} fields: {', '.join(sorted(fields))})")
    try:
        plan = plan_from_json({"steps": cfg.sample_steps, "mu": 0.0, **over})
        plan.scorer.weight_vector()
        return plan.validate()
    except (TypeError, ValueError) as e:
        raise ValueError(f"export_sampling: {e}") from None


# ------------------------------------------------------------------------------ building
def build_text(spec: dict, cfg: FluxConfig) -> TextConditioning:
    if spec.get("kind") == "zeros":
        return TextConditioning.empty(int(spec.get("length", 1)), cfg.context_dim, cfg.pooled_dim)
    if spec.get("kind") == "prompt":
        # A FLUX base: embed the task prompt once, through the on-disk cache.
        from pico_jax.model.text import PromptCache, TextEncoderLoader, cached_encode

        loader = TextEncoderLoader(spec["t5"], spec["clip"])
        emb = cached_encode([spec.get("prompt", "")], loader, PromptCache(spec.get("cache", ".cache/prompts")))
        return TextConditioning(jnp.asarray(emb.prompt_embeds), jnp.asarray(emb.pooled_prompt_embeds))
    raise ValueError(f"text.kind must be 'zeros' or 'prompt' (got {spec.get('kind')!r})")


DTYPES = ("float32", "bfloat16", "float16")


def device_peak_tflops(cfg: TrainConfig, mesh) -> float | None:
    """MFU's denominator for `cfg` on `mesh`'s devices: `peak_tflops_per_device` if set, else the
    devices' table peak for the compute dtype (`flops.peak_tflops`), else None (no "mfu" logged)."""
    from pico_jax.flops import peak_tflops

    if cfg.peak_tflops_per_device < 0:
        raise ValueError(f"peak_tflops_per_device must be > 0, or 0 to look it up (got {cfg.peak_tflops_per_device})")
    if cfg.peak_tflops_per_device:
        return float(cfg.peak_tflops_per_device)
    kinds = {d.device_kind for d in mesh.devices.flat}
    return peak_tflops(kinds.pop(), config_dtype(cfg, "dtype")) if len(kinds) == 1 else None


def config_dtype(cfg: TrainConfig, key: str) -> jnp.dtype:
    """The dtype a config field names, or a ValueError naming the field."""
    name = getattr(cfg, key)
    if name not in DTYPES:
        raise ValueError(f"{key}: expected one of {', '.join(DTYPES)} (got {name!r})")
    return jnp.dtype(name)


def build_model(cfg: TrainConfig, place=None) -> FluxTransformer:
    dtype, master = config_dtype(cfg, "dtype"), config_dtype(cfg, "master_dtype")
    base_dtype = dtype if cfg.lora_rank > 0 else master  # the base is what is trained in full fine-tuning
    remat = check_remat(cfg)
    remat = "none" if remat == "auto" else remat  # auto builds each candidate's step from this model
    if cfg.base_checkpoint:
        from pico_jax.convert import load_flux_transformer

        model = load_flux_transformer(cfg.base_checkpoint, dtype=dtype, param_dtype=base_dtype, place=place,
                                      remat=remat)
    else:
        model = FluxTransformer(cfg.model.replace(remat=remat), rngs=nnx.Rngs(cfg.seed), dtype=dtype,
                                param_dtype=base_dtype)
        if cfg.prediction == "x0_residual":
            # Zero output = "B' is B": a fresh residual model starts exactly at the copy-B baseline
            # and learns only the change the exemplar shows (DiT zero-initialises this layer too).
            model.final_proj.kernel[...] = jnp.zeros_like(model.final_proj.kernel[...])
            model.final_proj.bias[...] = jnp.zeros_like(model.final_proj.bias[...])
    if cfg.lora_rank > 0:
        from pico_jax.model.lora import add_lora

        add_lora(model, cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets, rngs=nnx.Rngs(cfg.seed + 1), dtype=master)
    return model


REMAT_POLICIES = ("none", "dots", "full", "nothing")
# remat="auto" tries these in order, least recomputation first, and takes the first that fits
# (within memory.HEADROOM of the device's memory).
REMAT_AUTO_ORDER = ("none", "dots", "full")


def check_remat(cfg: TrainConfig) -> str:
    if cfg.remat not in (*REMAT_POLICIES, "auto"):
        raise ValueError(f"remat: expected one of {', '.join(REMAT_POLICIES)} or auto (got {cfg.remat!r})")
    if cfg.device_memory_gib < 0:
        raise ValueError(f"device_memory_gib must be > 0, or 0 for the devices' own (got {cfg.device_memory_gib})")
    return cfg.remat


def graphdef_with_remat(graphdef, states: tuple, filters: tuple, policy: str):
    """`graphdef` with the layer stacks' remat policy set to `policy`: the model merged from
    `states`, its static config changed, split again by `filters` (the same states, no copies)."""
    model = nnx.merge(graphdef, *states)
    model.config = model.config.replace(remat=policy)
    return nnx.split(model, *filters)[0]


def trainable_filter(cfg: TrainConfig):
    return nnx.LoRAParam if cfg.lora_rank > 0 else nnx.Param


def make_optimizer(cfg: TrainConfig) -> optax.GradientTransformation:
    decay_steps = max(cfg.steps - cfg.warmup_steps, 1)
    # Start warmup above zero: optax counts updates from 0, and lr(0) = 0 would waste the first step.
    schedule = optax.warmup_cosine_decay_schedule(
        cfg.lr / max(cfg.warmup_steps, 1), cfg.lr, cfg.warmup_steps, cfg.warmup_steps + decay_steps, end_value=cfg.lr * cfg.min_lr_ratio
    )
    return optax.chain(
        optax.clip_by_global_norm(cfg.grad_clip),
        optax.adamw(schedule, b1=0.9, b2=0.999, weight_decay=cfg.weight_decay),
    ), schedule


def optimizer_state_shardings(tx: optax.GradientTransformation, params, mesh) -> Any:
    """Where each leaf of `tx.init(params)` lives: a copy of the parameters (Adam's moments) is
    sharded as they are, the rest (step counts) replicated. Left to itself, `jax.jit(tx.init)`
    puts the state on one device, since its zeros depend on no input's values; spread over the mesh
    that was every device holding all of Adam's moments, where FSDP means each holds 1/fsdp."""
    from pico_jax.parallel import replicated

    return optax.tree_map_params(
        tx, lambda _, p: p.sharding, jax.eval_shape(tx.init, params), params,
        transform_non_params=lambda _: replicated(mesh),
    )


# ------------------------------------------------------------------------------ the step
def canvas_from_batch(batch: dict) -> jax.Array:
    """Panels (B, P, P, 3) in [-1, 1] → canvases (B, 2P, 2P, 3)."""
    top = jnp.concatenate([batch["A"], batch["A_out"]], axis=2)
    bottom = jnp.concatenate([batch["B"], batch["B_out"]], axis=2)
    return jnp.concatenate([top, bottom], axis=1)


def loss_fn(model: FluxTransformer, ae, text: TextConditioning, layout: CanvasLayout, batch: dict, t: jax.Array,
            noise: jax.Array):
    """The flow loss of one batch of canvases at timesteps `t` (B,) with `noise` shaped as their
    latent tokens (`draw_noise`)."""
    canvas = canvas_from_batch(batch).astype(jnp.float32)
    b = canvas.shape[0]
    x0 = encode_tokens(ae, canvas).astype(model.dtype)
    cond, known = fill_condition(ae, canvas, layout)
    noise = noise.astype(x0.dtype)
    xt = interpolate(x0, noise, t)
    prompt = jnp.broadcast_to(text.prompt_embeds, (b, *text.prompt_embeds.shape[1:])).astype(model.dtype)
    pooled = jnp.broadcast_to(text.pooled, (b, text.pooled.shape[-1])).astype(model.dtype)
    guidance = jnp.ones((b,), jnp.float32) if model.config.guidance_embeds else None
    pred = model(
        jnp.concatenate([xt, cond.astype(xt.dtype)], -1),
        prompt,
        pooled,
        t,
        jnp.asarray(layout.img_ids()),
        jnp.zeros((prompt.shape[1], 3), jnp.float32),
        guidance,
    )
    return flow_loss(layout.velocity(pred, xt, t, known), x0, noise, jnp.asarray(layout.bprime_tokens()))


def draw_noise(ae, layout: CanvasLayout, batch_size: int, key, mu: float, kind: str) -> tuple[jax.Array, jax.Array]:
    """The step's random draws for the whole batch: timesteps (B,) and fp32 noise shaped as the
    canvases' packed latent tokens (B, N, 4·C). Drawn once per step, before any split into
    micro-batches, so that accumulating gradients over micro-batches sees the same draws as one
    big batch."""
    k_t, k_n = jax.random.split(key)
    noise = jax.random.normal(k_n, (batch_size, layout.num_tokens, 4 * ae.latent_channels), jnp.float32)
    return sample_timesteps(k_t, batch_size, kind=kind, mu=mu), noise


def accumulated_value_and_grad(f, params, data, micro_batches: int):
    """`jax.value_and_grad(f)(params, *data)` for an `f` that is a mean over the leading (batch)
    axis of every array in `data`, computed over `micro_batches` equal slices of that batch one
    after another (a `lax.scan`), so only one slice's activations are alive at a time. Slice i
    takes the examples i, i + m, i + 2m, ... (m = micro_batches): each device's contiguous share
    of a batch split over devices splits the same way, so no example moves between devices. The
    gradients are summed in at least fp32 and come back in their parameters' dtypes."""
    if micro_batches == 1:
        return jax.value_and_grad(f)(params, *data)

    def interleave(x):
        return jnp.swapaxes(x.reshape(x.shape[0] // micro_batches, micro_batches, *x.shape[1:]), 0, 1)

    wide = lambda p: jnp.promote_types(p.dtype, jnp.float32)
    zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, wide(p)), params)

    def add_one(carry, micro):
        loss_sum, grad_sum = carry
        loss, grads = jax.value_and_grad(f)(params, *micro)
        grad_sum = jax.tree.map(lambda a, g: a + g.astype(a.dtype), grad_sum, grads)
        return (loss_sum + loss.astype(jnp.float32), grad_sum), None

    (loss_sum, grad_sum), _ = jax.lax.scan(add_one, (jnp.zeros((), jnp.float32), zeros), jax.tree.map(interleave, data))
    grads = jax.tree.map(lambda a, p: (a / micro_batches).astype(p.dtype), grad_sum, params)
    return loss_sum / micro_batches, grads


def make_train_step(graphdef, ae_graphdef, layout, cfg: TrainConfig, tx, schedule):
    """The training step: `step_fn(trainable, frozen, conditioning, opt_state, ema, batch, step)`,
    `conditioning` = (the autoencoder's state, the TextConditioning). Both come in as arguments:
    arrays a jitted function closes over are baked into its program as constants (jax 0.10), and
    the FLUX VAE's encoder made the step's StableHLO 131 MiB larger and its compile slower."""
    mu = cfg.shift_mu if cfg.shift_mu is not None else flux_mu(layout.num_tokens)

    def step_fn(trainable, frozen, conditioning, opt_state, ema, batch, step):
        key = jax.random.fold_in(jax.random.key(cfg.seed), step)
        ae_state, text = conditioning
        ae = nnx.merge(ae_graphdef, ae_state)
        t, noise = draw_noise(ae, layout, batch["A"].shape[0], key, mu, cfg.timestep_sampling)

        def loss_of(trainable, batch, t, noise):
            model = nnx.merge(graphdef, trainable, frozen)
            return loss_fn(model, ae, text, layout, batch, t, noise)

        loss, grads = accumulated_value_and_grad(loss_of, trainable, (batch, t, noise), cfg.grad_accum_steps)
        loss = jnp.where(step == cfg.inject_nan_at_step, jnp.nan, loss)
        updates, opt_state = tx.update(grads, opt_state, trainable)
        trainable = optax.apply_updates(trainable, updates)
        if cfg.ema_decay > 0:
            ema = jax.tree.map(lambda e, p: cfg.ema_decay * e + (1 - cfg.ema_decay) * p, ema, trainable)
        metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads), "lr": schedule(step)}
        return trainable, opt_state, ema, metrics

    return step_fn


def jit_train_step(step_fn, trainable, opt_shardings, ema, mesh):
    """`step_fn` jitted as the Trainer runs it (and bench_compile.py --step train compiles it): the
    state buffers donated, and the state leaving the step laid out as it came in, so the first
    step's executable serves every later one (unpinned, XLA's choice for the outputs differed from
    the inputs' and the second step compiled the program again). `trainable` and `ema` may be
    arrays or ShapeDtypeStructs with shardings; trace the result under the mesh (`on_mesh`)."""
    from pico_jax.parallel import replicated

    keep = lambda tree: jax.tree.map(lambda x: x.sharding, tree)
    return jax.jit(step_fn, donate_argnums=(0, 3, 4),
                   out_shardings=(keep(trainable), opt_shardings, keep(ema), replicated(mesh)))


# ------------------------------------------------------------------------------ data
def make_data(cfg: TrainConfig, shard_index=None, shard_count=None, start_batch: int = 0):
    from pico_jax.data.input_pipeline import FunctionSource, make_dataset

    kind = cfg.data.get("kind")
    per_host = cfg.batch_size // (shard_count or jax.process_count())
    if kind == "procedural":
        from pico_jax.data import relations

        fams = cfg.data.get("families", "train")
        names = sorted(relations.SPLITS[fams] if isinstance(fams, str) else fams)
        unknown = [f for f in names if f not in relations.FAMILIES]
        if unknown:
            raise ValueError(f"data.families: unknown relation families {unknown}")
        source = FunctionSource(
            _ProceduralExample(tuple(names), cfg.panel, int(cfg.data.get("pool", 0))),
            length=int(cfg.data.get("length", 10**6)),
            task_names=names,
        )
    elif kind == "visrel":
        from pico_jax.data.visrel import load_visrel

        source = load_visrel(cfg.data["data_dir"], cfg.data.get("name"))
    else:
        raise ValueError(f"data.kind must be 'procedural' or 'visrel' (got {kind!r})")
    check_data_threads(cfg)
    return make_dataset(
        source, batch_size=per_host, seed=cfg.seed, image_size=cfg.panel, augment=cfg.augment,
        shard_index=shard_index, shard_count=shard_count, num_threads=cfg.data_threads,
        worker_count=cfg.data_workers, start_batch=start_batch,
    )


def check_data_threads(cfg: TrainConfig) -> None:
    if cfg.data_threads < 1:
        raise ValueError(f"data_threads must be >= 1 (got {cfg.data_threads})")
    if cfg.data_workers < 0:
        raise ValueError(f"data_workers must be >= 0 (got {cfg.data_workers})")


@dataclasses.dataclass(frozen=True)
class _ProceduralExample:
    """Index → an episode of family i mod F with a training seed; `pool` > 0 limits the number of
    distinct episodes per family (the 'scale' axis of the diversity-vs-scale experiment)."""

    families: tuple[str, ...]
    size: int
    pool: int = 0

    def __call__(self, i: int) -> dict:
        from pico_jax.data.input_pipeline import episode_to_example
        from pico_jax.data.relations import FAMILIES, sample_episode, train_seed

        fam = self.families[i % len(self.families)]
        j = i // len(self.families)
        seed = train_seed(j % self.pool if self.pool else j)
        return episode_to_example(sample_episode(fam, seed, self.size), fam, augment_flip=FAMILIES[fam].augment_flip)


# ------------------------------------------------------------------------------ the loop
class NonFiniteLoss(RuntimeError):
    pass


class Trainer:
    """Holds the state of a run; `run()` trains to cfg.steps, resuming from workdir if possible."""

    def __init__(self, cfg: TrainConfig, workdir: str | os.PathLike, progress: bool = True, devices=None):
        from pico_jax.parallel import make_mesh

        self.cfg, self.workdir, self.progress = cfg, Path(workdir), progress
        if cfg.batch_size % max(jax.process_count(), 1):
            raise ValueError(f"batch_size {cfg.batch_size} is not divisible by {jax.process_count()} hosts")
        export_plan(cfg)  # a bad export_sampling fails now, not after the run
        self.mesh = make_mesh(cfg.mesh, devices)
        dp = self.mesh.shape["data"] * self.mesh.shape["fsdp"]
        if cfg.batch_size % dp:
            raise ValueError(f"batch_size {cfg.batch_size} must be divisible by data×fsdp = {dp} of mesh {dict(self.mesh.shape)}")
        check_gather_weights(cfg.sample_gather_weights, "sample_gather_weights")
        if cfg.profile_steps < 1:
            raise ValueError(f"profile_steps must be >= 1 (got {cfg.profile_steps})")
        check_data_threads(cfg)
        check_remat(cfg)
        if cfg.grad_accum_steps < 1 or cfg.batch_size % (cfg.grad_accum_steps * dp):
            raise ValueError(f"grad_accum_steps {cfg.grad_accum_steps}: batch_size {cfg.batch_size} must split into that many "
                             f"micro-batches, each divisible by data×fsdp = {dp} of mesh {dict(self.mesh.shape)}")
        dtype = config_dtype(cfg, "dtype")
        config_dtype(cfg, "master_dtype")  # a bad value fails before anything is built
        self.peak_tflops = device_peak_tflops(cfg, self.mesh)
        from pico_jax.checkpoints import build_autoencoder

        self.ae = build_autoencoder(cfg.autoencoder, Path(cfg.autoencoder.get("root", ".")), dtype)
        self.layout = CanvasLayout(cfg.panel, self.ae.downsample_factor, cfg.query_hint, cfg.prediction)
        self._build_state()

    def _build_state(self):
        from pico_jax.parallel import param_placer, replicate, shard_state, warn_unless_tensor_divides_heads

        cfg = self.cfg
        model = build_model(cfg, place=param_placer(self.mesh))
        warn_unless_tensor_divides_heads(self.mesh, model.config.num_heads)
        expected = fill_in_channels(self.ae)
        if model.config.in_channels != expected:  # checked for loaded bases too, before any tracing
            raise ValueError(f"the transformer takes {model.config.in_channels} input channels; Fill-style conditioning "
                             f"with this autoencoder needs {expected} (set model.in_channels or the autoencoder)")
        self.model_config = model.config
        self.text = build_text(cfg.text, model.config)
        self.graphdef, trainable, frozen = nnx.split(model, trainable_filter(cfg), ...)
        self.trainable = shard_state(trainable, self.mesh)
        self.frozen = shard_state(frozen, self.mesh)
        self.tx, self.schedule = make_optimizer(cfg)
        opt_shardings = optimizer_state_shardings(self.tx, self.trainable, self.mesh)
        self.opt_state = jax.jit(self.tx.init, out_shardings=opt_shardings)(self.trainable)
        self.ema = jax.tree.map(jnp.copy, self.trainable) if cfg.ema_decay > 0 else None
        ae_graphdef, ae_state = nnx.split(self.ae)
        self.conditioning = replicate(self.mesh, (ae_state, self.text))
        # One copy of the autoencoder and the text: the replicated one serves the step and the samples.
        self.ae, self.text = nnx.merge(ae_graphdef, self.conditioning[0]), self.conditioning[1]
        self._ae_graphdef, self._opt_shardings = ae_graphdef, opt_shardings
        self._step_body, self.step_fn = self._jitted_step(self.graphdef)
        # remat="auto": which policy runs is decided by compiling at the first batch (`resolve_remat`).
        self.remat = None if cfg.remat == "auto" else cfg.remat
        self.remat_plans: dict[str, int | None] = {}  # auto's planned bytes per device, by policy
        self._budget: tuple[float, int | None] = (math.inf, None)  # auto's (budget, device limit), once resolved
        self.step = 0
        self._sample_pipelines: dict[int, Any] = {}  # save_samples' pipeline per sheet size, compiled once

    def _jitted_step(self, graphdef):
        """(the step's body, the step jitted as it runs) for the model `graphdef` describes."""
        from pico_jax.parallel import on_mesh

        body = make_train_step(graphdef, self._ae_graphdef, self.layout, self.cfg, self.tx, self.schedule)
        # Traced under the mesh so the scanned layers gather their weights over 'fsdp' (parallel.on_mesh).
        return body, on_mesh(jit_train_step(body, self.trainable, self._opt_shardings, self.ema, self.mesh), self.mesh)

    def resolve_remat(self, batch: dict) -> str:
        """remat="auto": the step compiled for each policy of REMAT_AUTO_ORDER in turn, on `batch`'s
        shapes, until XLA's plan for one fits `memory.memory_budget` (`memory.first_that_fits`);
        that compiled step is the one that runs. Collective: every process calls it. If none fits,
        the one planning the least runs, with a warning. A policy that fits costs one compile, as
        the first step would."""
        import warnings

        from pico_jax.memory import GiB, first_that_fits, memory_budget

        if self.remat is not None:
            return self.remat
        self._budget = budget, _ = memory_budget(self.cfg.device_memory_gib)  # collective: asked once
        args = (self.trainable, self.frozen, self.conditioning, self.opt_state, self.ema, batch, jnp.int32(self.step))
        graphdefs = {p: graphdef_with_remat(self.graphdef, (self.trainable, self.frozen), (trainable_filter(self.cfg), ...), p)
                     for p in REMAT_AUTO_ORDER}
        bodies = {}

        def compile_one(policy):
            bodies[policy], jitted = self._jitted_step(graphdefs[policy])
            return jitted.lower(*args).compile()

        chosen, compiled, self.remat_plans, fits = first_that_fits(REMAT_AUTO_ORDER, compile_one, budget)
        if not fits:
            gib = lambda b: "unknown" if b is None or b == math.inf else f"{b / GiB:.2f} GiB"
            warnings.warn(f"remat auto: no policy's step fits {gib(budget)} per device ("
                          + ", ".join(f"{p} {gib(b)}" for p, b in self.remat_plans.items())
                          + f"); running {chosen!r}, the smallest. Lower batch_size, raise grad_accum_steps "
                          "or shard the model (--mesh fsdp=N).", stacklevel=2)
        self.remat, self.graphdef, self._step_body, self.step_fn = chosen, graphdefs[chosen], bodies[chosen], compiled
        return self.remat

    def remat_report(self) -> dict:
        """What remat="auto" decided, for config.json: the policy, the bytes per device XLA planned
        for each policy tried, the budget and the device limit it is a share of."""
        from pico_jax.memory import HEADROOM

        budget, limit = self._budget
        return {"chosen": self.remat, "planned_bytes_per_device": dict(self.remat_plans),
                "budget_bytes_per_device": None if budget == math.inf else budget, "device_limit_bytes": limit,
                "headroom": HEADROOM}

    # --- checkpoints ---------------------------------------------------------------------
    def _manager(self):
        import orbax.checkpoint as ocp

        opts = ocp.CheckpointManagerOptions(max_to_keep=self.cfg.keep_checkpoints, enable_async_checkpointing=True,
                                            create=True)
        return ocp.CheckpointManager(self.workdir.absolute() / "checkpoints", options=opts)

    def save(self, mngr, force=False):
        import orbax.checkpoint as ocp

        state = {"trainable": self.trainable, "opt_state": self.opt_state, "step": self.step}
        if self.ema is not None:
            state["ema"] = self.ema
        mngr.save(
            self.step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state),
                # The data resumes at batch `step` of the host's stream (one batch a step), with any
                # data_threads and data_workers; grain's iterator state would tie it to the workers.
                data=ocp.args.JsonSave({"batches_read": self.step,
                                        "rng": {"seed": self.cfg.seed, "fold_in": "step"},
                                        "param_layout": PARAM_LAYOUT}),
            ),
            force=force,
        )

    def restore(self, mngr) -> bool:
        """The latest checkpoint's state, if any (True); the data then resumes at batch self.step."""
        import orbax.checkpoint as ocp

        latest = mngr.latest_step()
        if latest is None:
            return False
        target = {"trainable": self.trainable, "opt_state": self.opt_state, "step": 0}
        if self.ema is not None:
            target["ema"] = self.ema
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
        restored = mngr.restore(latest, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract),
                                                                data=ocp.args.JsonRestore()))
        layout = restored["data"].get("param_layout", "bfl-columns")
        if layout != PARAM_LAYOUT:
            raise CheckpointError(
                f"{self.workdir / 'checkpoints' / str(latest)}: written with the {layout!r} parameter layout, this pico_jax uses "
                f"{PARAM_LAYOUT!r} (fused qkv / linear1 / linear2 columns grouped by head since the eighteenth "
                "session); its weights would load permuted. Export it with the pico_jax that wrote it "
                "(Trainer.export or save_lora_diffusers) and start from that file.")
        st = restored["state"]
        step = int(st["step"])
        check_data_position(restored["data"], step, self.cfg.batch_size // jax.process_count(),
                            self.workdir / "checkpoints" / str(latest))
        self.trainable, self.opt_state, self.step = st["trainable"], st["opt_state"], step
        self.ema = st.get("ema")
        return True

    # --- export ----------------------------------------------------------------------------
    def model(self, use_ema: bool = True) -> FluxTransformer:
        trainable = self.ema if (use_ema and self.ema is not None) else self.trainable
        return nnx.merge(self.graphdef, trainable, self.frozen)

    def export(self, out_dir, plan: SamplingPlan | None = None, extra: dict | None = None):
        """A pico checkpoint directory (LoRA merged into the base) that infer.py loads."""
        from pico_jax.checkpoints import save_pico

        model = self.model()
        if self.cfg.lora_rank > 0:
            from pico_jax.model.lora import merge_lora

            model = merge_lora(model)
        return save_pico(out_dir, model, panel=self.cfg.panel, autoencoder=self.cfg.autoencoder, text=self.cfg.text,
                         plan=plan or export_plan(self.cfg), extra=extra,
                         dtype=self.cfg.dtype, query_hint=self.cfg.query_hint, prediction=self.cfg.prediction)

    def save_lora(self, path):
        from pico_jax.model.lora import save_lora_diffusers

        save_lora_diffusers(self.model(), path)

    def pipeline(self, plan: SamplingPlan | None = None, batch_size: int = 4, use_ema: bool = True):
        """An inference Pipeline over the current (EMA) weights, with this run's canvas conventions,
        on the training mesh (the weights stay where they are; the batch is rounded up to a
        multiple of data x fsdp, padded as any partial batch is)."""
        from pico_jax.parallel import data_parallel_size
        from pico_jax.pipeline import Pipeline

        dp = data_parallel_size(self.mesh)
        return Pipeline(self.model(use_ema), self.ae, self.text, self.cfg.panel, batch_size=-(-batch_size // dp) * dp,
                        plan=plan or SamplingPlan(steps=self.cfg.sample_steps, mu=0.0),
                        query_hint=self.cfg.query_hint, prediction=self.cfg.prediction, mesh=self.mesh,
                        gather_weights=self.cfg.sample_gather_weights,
                        device_memory_gib=self.sampler_memory_gib(use_ema))

    def sampler_memory_gib(self, use_ema: bool = True) -> float:
        """GiB per device a sampler on the training mesh may plan against (its Pipeline's
        `device_memory_gib`; 0: unknown, the device's own): the device's memory less what the run
        keeps there that the sampler does not read, the optimizer state and the weights it does
        not sample (the live ones when it samples the EMA, or the EMA). XLA's plan for the sampler
        counts its own arguments, so these are what it would otherwise leave out (full fine-tuning
        with Adam: twice the trainable weights in fp32). Collective on a multi-host mesh."""
        from pico_jax.memory import GiB, agreed, bytes_per_device, memory_budget

        _, limit = memory_budget(self.cfg.device_memory_gib)
        sampled_ema = use_ema and self.ema is not None
        beside = agreed(bytes_per_device((self.opt_state, self.trainable if sampled_ema else self.ema)), max)
        return 0.0 if limit is None else max(limit - beside, 1) / GiB

    # --- samples ---------------------------------------------------------------------------
    def save_samples(self, batch: dict, path: Path, n: int = 4):
        from pico_jax.imageio import save_png_atomic

        # One pipeline for the run, given the current weights each time: its sampler compiles once,
        # not once per sample sheet (a FLUX.1-dev sampler's compile is the expensive part).
        pipe = self._sample_pipelines.get(n)
        if pipe is None:
            plan = SamplingPlan(steps=self.cfg.sample_steps, seeds=1, keep=1, selection="random", mu=0.0)
            pipe = self._sample_pipelines[n] = self.pipeline(plan, batch_size=n)
        else:
            pipe.update_weights(self.model())
        a, a2, b, b2 = (np.asarray(batch[k][:n]) * 0.5 + 0.5 for k in ("A", "A_out", "B", "B_out"))
        canvases = [grid.compose(a[i], a2[i], b[i], panel=self.cfg.panel) for i in range(len(a))]
        res = pipe.run_canvases(canvases, pipe.plan)  # on every process: the sampler is one collective program
        if jax.process_index() == 0:
            path.parent.mkdir(parents=True, exist_ok=True)
            rows = [np.concatenate([a[i], a2[i], b[i], r.image, b2[i]], 1) for i, r in enumerate(res)]
            save_png_atomic(np.concatenate(rows, 0), path)

    # --- main loop -------------------------------------------------------------------------
    def step_flops(self, batch: dict, recompute: bool = True) -> float:
        """Matmul and convolution FLOPs of one training step on `batch` (all devices together), counted
        in its jaxpr (`flops.matmul_flops`), each attention as the products of the kernel that runs
        it (`attention.counted_as_run`): what the step computes, remat's recomputation and a flash
        kernel's recomputed logits included. recompute=False: the model FLOPs, without either
        (MFU's numerator). A trace, no compile; it clears JAX's in-memory caches
        (`flops.program_flops`), so call it before the step compiles, as `run` does."""
        from pico_jax.flops import program_flops

        return program_flops(self._step_body, self.trainable, self.frozen, self.conditioning, self.opt_state,
                             self.ema, batch, jnp.int32(self.step), recompute=recompute)

    def run(self) -> dict:
        from tqdm import tqdm

        from pico_jax.parallel import batch_sharding

        cfg = self.cfg
        # Every process of a multi-host run executes this loop (the steps and checkpoints are
        # collective); only the first writes the logs, the metrics and the sample sheets.
        logs = jax.process_index() == 0
        self.workdir.mkdir(parents=True, exist_ok=True)
        mngr = self._manager()
        try:
            resumed = self.restore(mngr)
        except BaseException:
            mngr.close()
            raise
        from pico_jax.data.input_pipeline import close_iterator

        iterator = iter(make_data(cfg, start_batch=self.step))
        if logs:  # after the restore: a checkpoint this run cannot resume leaves the run's config as it was
            (self.workdir / "config.json").write_text(json.dumps(cfg.to_json(), indent=2, default=str))
        metrics_path = self.workdir / "metrics.jsonl"
        if resumed and logs:
            _truncate_metrics(metrics_path, self.step)
        writer = _tensorboard(self.workdir) if logs else None
        stop = {"signal": None}
        old = signal.signal(signal.SIGTERM, lambda s, f: stop.update(signal=s))
        shard = lambda x: jax.make_array_from_process_local_data(batch_sharding(self.mesh, x.ndim), x)
        bar = tqdm(total=cfg.steps, initial=self.step, disable=not self.progress, desc="train", unit="step")
        last = {"step": self.step, "time": time.time()}
        sample_batch = None
        status = "finished"
        # The metrics of the last step dispatched whose loss is not read yet. Reading a loss waits
        # for its step, so each step's loss is read after the next step is dispatched: the host
        # fetches and shards the next batch while the device runs, instead of the device idling
        # while it does. Before anything is written (log row, checkpoint, sample sheet) the
        # pending loss is read, so a non-finite loss still stops the run before it is saved.
        unread = None
        profiler = StepProfiler(self.workdir / "profile", cfg.profile_start_step, cfg.profile_steps)
        flops_per_step = None  # counted once, on the first batch (a trace, no compile)

        def read_loss() -> float:
            nonlocal unread
            step, m = unread
            unread = None
            loss = float(m["loss"])
            if not math.isfinite(loss):
                raise NonFiniteLoss(
                    f"loss is {loss} at step {step}; stopping. The last good checkpoint "
                    f"(step {mngr.latest_step()}) in {self.workdir / 'checkpoints'} is intact; lower --lr or check the data."
                )
            return loss

        try:
            with open(metrics_path if logs else os.devnull, "a") as mf:
                while self.step < cfg.steps:
                    if stop["signal"] is not None:
                        status = "preempted"
                        break
                    host = next(iterator)
                    if sample_batch is None:
                        sample_batch = _first_of_global_batch(host, 4)
                    batch = {k: shard(v) for k, v in host.items() if k in ("A", "A_out", "B", "B_out")}
                    if self.remat is None:  # remat="auto": compiles the step (the FLOP counts then trace the choice)
                        self.resolve_remat(batch)
                        if logs:
                            report = self.remat_report()
                            bar.write(_remat_line(report))
                            config = {**cfg.to_json(), "remat_auto": report}
                            (self.workdir / "config.json").write_text(json.dumps(config, indent=2, default=str))
                    if flops_per_step is None:  # what the device runs, and the model's share of it
                        flops_per_step = self.step_flops(batch)
                        model_flops_per_step = self.step_flops(batch, recompute=False)
                    profiler.before(self.step)
                    with jax.profiler.StepTraceAnnotation("train", step_num=self.step):
                        self.trainable, self.opt_state, self.ema, m = self.step_fn(
                            self.trainable, self.frozen, self.conditioning, self.opt_state, self.ema, batch,
                            jnp.int32(self.step)
                        )
                    profiler.after(self.step, m)
                    if unread is not None:
                        read_loss()  # the step before this one
                    unread = (self.step, m)
                    self.step += 1
                    bar.update(1)
                    log_due = self.step % cfg.log_every == 0 or self.step == cfg.steps
                    checkpoint_due = self.step % cfg.checkpoint_every == 0
                    sample_due = bool(cfg.sample_every) and self.step % cfg.sample_every == 0
                    if log_due or checkpoint_due or sample_due:
                        loss = read_loss()
                    if log_due:
                        now = time.time()
                        sps = (self.step - last["step"]) / max(now - last["time"], 1e-9)
                        last.update(step=self.step, time=now)
                        row = {"step": self.step, "loss": loss, "grad_norm": float(m["grad_norm"]),
                               "lr": float(m["lr"]), "steps_per_sec": sps, "examples_per_sec": sps * cfg.batch_size,
                               "tflops_per_sec_per_device": sps * flops_per_step / self.mesh.size / 1e12,
                               "model_tflops_per_sec_per_device": sps * model_flops_per_step / self.mesh.size / 1e12}
                        if self.peak_tflops:
                            row["mfu"] = row["model_tflops_per_sec_per_device"] / self.peak_tflops
                        mf.write(json.dumps(row) + "\n")
                        mf.flush()
                        bar.set_postfix(loss=f"{loss:.4f}", **({"mfu": f"{row['mfu']:.1%}"} if "mfu" in row else {}))
                        if writer:
                            for k, v in row.items():
                                if k != "step":
                                    writer.add_scalar(f"train/{k}", v, self.step)
                    if checkpoint_due:
                        self.save(mngr)
                    if sample_due:
                        self.save_samples(sample_batch, self.workdir / "samples" / f"step_{self.step:06d}.png")
            if unread is not None:
                read_loss()
            if mngr.latest_step() != self.step:
                self.save(mngr, force=True)
            mngr.wait_until_finished()
        finally:
            profiler.stop()
            close_iterator(iterator)
            mngr.close()
            bar.close()
            signal.signal(signal.SIGTERM, old)
            if writer:
                writer.close()
        if status == "finished" and sample_batch is not None:
            self.save_samples(sample_batch, self.workdir / "samples" / f"step_{self.step:06d}.png")
        return {"status": status, "step": self.step}


def _remat_line(report: dict) -> str:
    """'remat auto: dots (XLA's plan per device: none 41.2 GiB, dots 33.9 GiB; budget 36 GiB, 90 % of 40 GiB)'."""
    gib = lambda b: "unknown" if b is None else f"{b / 2**30:.3g} GiB"
    plans = ", ".join(f"{p} {gib(b)}" for p, b in report["planned_bytes_per_device"].items())
    budget = ("no limit known" if report["budget_bytes_per_device"] is None else
              f"budget {gib(report['budget_bytes_per_device'])}, {report['headroom']:.0%} of {gib(report['device_limit_bytes'])}")
    return f"remat auto: {report['chosen']} (XLA's plan per device: {plans}; {budget})"


def check_data_position(saved: dict, step: int, per_host: int, where) -> None:
    """A checkpoint's data had read one batch a step. Its record says how many it read
    ("batches_read", or before that a threads-only grain state's examples read); one that does not
    match its step is refused, since resuming at batch `step` would then not continue its stream."""
    read = saved.get("batches_read")
    if read is None:
        grain_state = json.loads(saved.get("iterator", "{}"))
        if set(grain_state) != {"next_index"}:
            return  # no position to compare with (not the threads-only state earlier versions wrote)
        examples = grain_state["next_index"]
        read = examples / per_host
    if read != step:
        raise CheckpointError(f"{where}: saved at step {step} with its data stream at batch {read:g}, but the Trainer "
                              "reads one batch a step, so this run cannot continue that stream. Start a new workdir "
                              "from its weights (Trainer.export).")


def _first_of_global_batch(host: dict, n: int) -> dict:
    """The first n examples of the global batch, the same on every process (the hosts' batches
    gathered; one host: its own batch), so every process samples the same preview sheet."""
    panels = {k: host[k] for k in ("A", "A_out", "B", "B_out")}
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        panels = multihost_utils.process_allgather(panels, tiled=True)
    return {k: np.array(v[:n]) for k, v in panels.items()}  # a copy: a worker's batch lives in shared memory


def _truncate_metrics(path: Path, step: int):
    """After a resume, drop logged rows past the restored step (they will be logged again)."""
    if not path.exists():
        return
    rows = [l for l in path.read_text().splitlines() if l.strip() and json.loads(l)["step"] <= step]
    path.write_text("".join(r + "\n" for r in rows))


def _tensorboard(workdir: Path):
    try:
        from tensorboardX import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(str(workdir / "tensorboard"))
