"""(A, A', B) → B' for many queries × many seeds in one jitted call.

Data flow: images → 2×2 canvas (grid) → autoencoder → packed tokens → FLUX-Fill-style input
[noisy latents | masked-canvas latents | packed B' mask] → Euler sampler (lax.scan) with the
capture hook on the first k steps → seed scores → the best m seeds finish → decode → B' panel
cropped and restored to B's original size.

The known panels (A, A', B) are never generated: at every step their tokens are set to the exact
noisy interpolation (1 - t)·x0 + t·ε of their true latents, which is what the model saw in
training (the loss covers B' only), so sampling and training see the same distribution.

Selection modes (`selection=`):
  "early"  – all S seeds run the first k steps with capture; the m best by score finish (cost
             ≈ S·k + m·(T - k) model calls instead of S·T);
  "full"   – all S seeds run all T steps, scored on every step; best m kept;
  "random" – one seed (the first) is run; no scoring (the baseline).

Ensembling (`ensemble="median"` or `"mean"`, any selection with keep ≥ 2): the returned B' is
the per-pixel median (or mean) of the m kept candidates' decoded panels (test-time ensembling, as
Marigold does for depth). It cancels the sampling noise that costs a single sample its PSNR on
near-identity relations (denoise, derain); the median also ignores the odd failed seed, which
the mean averages in (README, "Ensembling"). A mask rendered from the median is a per-pixel
majority vote. The candidates stay individual.
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from pico_jax import grid
from pico_jax.backend import target_backend
from pico_jax.flow import PREDICTIONS, euler_sample, flux_mu, flux_schedule, velocity_from_output
from pico_jax.model.attention import AttentionHooks
from pico_jax.model.flux import FluxTransformer
from pico_jax.parallel import (batch_sharding, check_batch_size, fsdp_gather_model, global_array, on_mesh, replicate,
                               replicated, shard_module)
from pico_jax.scorer import ScorerConfig, choose, consensus_scores, score_from_group_mass


# ------------------------------------------------------------------------------ conditioning
@dataclasses.dataclass(frozen=True)
class CanvasLayout:
    """Token geometry of a 2P × 2P canvas for an autoencoder with downsample `ae_factor`, and the
    two per-checkpoint conventions of its Fill-style model (what the condition shows in the B'
    region, and what the network's output means).

    query_hint: how the Fill condition shows the B' region. False (FLUX.1-Fill's convention, and
    what a pretrained Fill model expects): blanked. True: a copy of B, so every B' token sees the
    query pixels at its own position in its condition channels. It adds no information (B is on
    the canvas either way) but a small model no longer has to learn the B→B' spatial lookup
    through attention before it can do anything; the model must be trained with the same
    setting.

    prediction: what the network outputs ('velocity', FLUX's convention; or 'x0_residual', the
    clean B' as an offset from B — see flow.velocity_from_output)."""

    panel: int
    ae_factor: int
    query_hint: bool = False
    prediction: str = "velocity"

    def __post_init__(self):
        if self.prediction not in PREDICTIONS:
            raise ValueError(f"prediction must be one of {PREDICTIONS} (got {self.prediction!r})")

    @property
    def tokens_hw(self) -> tuple[int, int]:
        return grid.canvas_token_grid(self.panel, self.ae_factor)

    @property
    def num_tokens(self) -> int:
        h, w = self.tokens_hw
        return h * w

    def img_ids(self) -> np.ndarray:
        return grid.latent_image_ids(*self.tokens_hw)

    def bprime_tokens(self) -> np.ndarray:
        """(N,) float mask, 1 on the B' panel's tokens."""
        m = np.zeros(self.num_tokens, np.float32)
        m[grid.panel_token_indices(*self.tokens_hw)[3]] = 1.0
        return m

    def residual_base(self, known: jax.Array) -> jax.Array:
        """The tokens an 'x0_residual' output is an offset from: `known` (B, N, C) with the query
        panel B's tokens copied to the B' positions (the same raster order within each panel)."""
        idx = grid.panel_token_indices(*self.tokens_hw)
        source = np.arange(self.num_tokens)
        source[idx[3]] = idx[2]  # a static permutation: one gather, no scatter
        return jnp.take(known, jnp.asarray(source), axis=1)

    def velocity(self, out: jax.Array, xt: jax.Array, t, known: jax.Array) -> jax.Array:
        """The velocity the model's output `out` stands for under this layout's prediction."""
        if self.prediction == "velocity":
            return out
        return velocity_from_output(out, xt, t, self.residual_base(known), self.prediction)

    def hooks(self, num_text: int, num_layers: int, capture_layers: Sequence[int]) -> AttentionHooks:
        h, w = self.tokens_hw
        return AttentionHooks.make(
            grid.token_groups(num_text, h, w),
            num_layers,
            len(grid.GROUP_NAMES),
            capture_layers=capture_layers,
            panel_tokens=grid.panel_token_indices(h, w) + num_text,
            key_maps=False,  # the scorers read group_mass only
        )


def encode_tokens(autoencoder, images: jax.Array) -> jax.Array:
    """Images (B, H, W, 3) in [-1, 1] → packed, scaled latent tokens (B, N, 4·C)."""
    return grid.pack_latents(autoencoder.scale(autoencoder.encode(images)))


def decode_tokens(autoencoder, tokens: jax.Array, layout: CanvasLayout) -> jax.Array:
    h, w = layout.tokens_hw
    z = grid.unpack_latents(tokens, 2 * h, 2 * w)
    return autoencoder.decode(autoencoder.unscale(z))


def fill_condition(autoencoder, canvas: jax.Array, layout: CanvasLayout) -> tuple[jax.Array, jax.Array]:
    """FLUX.1-Fill conditioning of canvases (B, 2P, 2P, 3) in [-1, 1].

    Returns (cond, known): cond = [latents of the canvas with B' blanked (or showing B, with
    layout.query_hint) | packed B' mask]
    (B, N, 4C + 4f²), and known = those masked-canvas latents (B, N, 4C), the clean latents of
    the known panels (the B' part is unused)."""
    mask = jnp.asarray(grid.bprime_mask(layout.panel))  # (2P, 2P), 1 on B'
    masked = canvas * (1.0 - mask[None, :, :, None])
    if layout.query_hint:
        p = layout.panel
        masked = masked.at[:, p:, p:].set(canvas[:, p:, :p])
    known = encode_tokens(autoencoder, masked)
    mask_tokens = grid.pack_mask(jnp.broadcast_to(mask, canvas.shape[:3]), layout.ae_factor)
    return jnp.concatenate([known, mask_tokens.astype(known.dtype)], -1), known


def fill_in_channels(autoencoder) -> int:
    """Transformer input width for Fill-style conditioning with this autoencoder:
    packed noisy latents (4C) + packed masked-canvas latents (4C) + packed mask (4f²); 384 for FLUX."""
    return 2 * 4 * autoencoder.latent_channels + 4 * autoencoder.downsample_factor**2


class TextConditioning(NamedTuple):
    """Precomputed text embeddings (one prompt, broadcast over the batch)."""

    prompt_embeds: jax.Array  # (1 or B, T, context_dim)
    pooled: jax.Array  # (1 or B, pooled_dim)

    @classmethod
    def empty(cls, length: int, context_dim: int, pooled_dim: int) -> "TextConditioning":
        return cls(jnp.zeros((1, length, context_dim)), jnp.zeros((1, pooled_dim)))


# ------------------------------------------------------------------------------ the sampler
@dataclasses.dataclass(frozen=True)
class SamplingPlan:
    steps: int = 20
    seeds: int = 8
    keep: int = 1
    selection: str = "early"  # early | full | random
    scorer: ScorerConfig = ScorerConfig()
    guidance: float | None = None
    mu: float | None = None  # schedule shift; None: FLUX's resolution-dependent value
    # Seeds run together (vmapped) in the scored phase; the rest of the seeds wait in a loop.
    # None: per backend (seed_batch_for_backend). The result does not depend on it.
    seed_batch: int | None = None
    # None, or "median" / "mean": B' = that per-pixel statistic of the `keep` kept candidates
    # (module docstring, "Ensembling").
    ensemble: str | None = None

    def validate(self) -> "SamplingPlan":
        if self.selection not in ("early", "full", "random"):
            raise ValueError(f"selection must be early, full or random (got {self.selection!r})")
        if self.seeds < 1 or self.keep < 1:
            raise ValueError(f"--seeds and keep must be >= 1 (got seeds={self.seeds}, keep={self.keep})")
        if self.keep > self.seeds:
            raise ValueError(f"cannot keep {self.keep} of {self.seeds} seeds (--keep must not exceed --seeds)")
        if self.selection == "early" and not 1 <= self.scorer.steps <= self.steps:
            raise ValueError(f"scorer steps k={self.scorer.steps} (--score-steps) must be within 1..{self.steps} "
                             "denoising steps (--steps)")
        if self.ensemble not in ENSEMBLES:
            raise ValueError(f"ensemble (--ensemble) must be one of {sorted(k for k in ENSEMBLES if k)} or None "
                             f"(got {self.ensemble!r})")
        if self.ensemble and (self.selection == "random" or self.keep < 2):
            raise ValueError(f"ensemble combines the kept candidates, so it needs selection early or full and keep >= 2 "
                             f"(--keep; got selection={self.selection!r}, keep={self.keep})")
        if self.seed_batch is not None and self.seed_batch < 1:
            raise ValueError(f"seed_batch (--seed-batch) must be >= 1 (got {self.seed_batch})")
        if self.seeds == 2 and self.selection != "random" and self.scorer.signal == "consensus":
            # Each seed's distance to the mean of two is the same: the scores tie, rounding picks.
            warnings.warn("the consensus scorer cannot rank 2 seeds (their distances to the mean are equal), so "
                          "which one is kept is arbitrary; use 3 or more seeds (--seeds) or an attention scorer",
                          UserWarning, stacklevel=2)
        return self

    def override(self, **changes) -> "SamplingPlan":
        """This plan with `changes` applied, validated. Fields the caller did not name follow the
        ones it did: a default keep larger than the new seeds shrinks to seeds, and a default
        ensemble is dropped when what was asked leaves nothing to combine (keep < 2, or selection
        random), so `seeds=1` on a checkpoint whose default ensembles 4 of 8 seeds just works.
        A conflict between fields the caller named is still an error."""
        plan = dataclasses.replace(self, **changes)
        if "keep" not in changes and plan.keep > plan.seeds:
            plan = dataclasses.replace(plan, keep=plan.seeds)
        if "ensemble" not in changes and plan.ensemble and (plan.keep < 2 or plan.selection == "random"):
            plan = dataclasses.replace(plan, ensemble=None)
        return plan.validate()


def seed_batch_for_backend(seeds: int, backend: str | None = None) -> int:
    """How many seeds to run at once when the plan leaves it open: one at a time on CPU, all
    together elsewhere. On CPU a single 1k-token canvas already keeps every core's matmul units
    busy, and a batch of seeds only makes the per-layer activations and attention maps fall out
    of cache (bench_sampling: 8 vmapped seeds cost ~1.4x per seed what one does); on a GPU or
    TPU, one canvas leaves most of the chip idle and the batch is what fills it."""
    backend = backend or target_backend()
    return 1 if backend == "cpu" else seeds


ENSEMBLES = (None, "median", "mean")


def ensemble_panels(panels: Sequence[np.ndarray], how: str) -> np.ndarray:
    """The per-pixel median or mean of candidate images (each already clipped to [0, 1], so the
    result is a combination of images a user could have been shown)."""
    stack = np.stack([np.asarray(p, np.float32) for p in panels])
    if how == "median":
        return np.median(stack, 0).astype(np.float32)
    if how == "mean":
        return stack.mean(0, dtype=np.float32)
    raise ValueError(f"unknown ensemble {how!r}; expected one of {[k for k in ENSEMBLES if k]}")


class Samples(NamedTuple):
    tokens: jax.Array  # (m, B, N, C) final latents of the kept seeds, best first
    chosen: jax.Array  # (m, B) seed index (into the seed list) of each kept sample
    scores: jax.Array  # (S, B) every seed's score (zeros for "random")


def seed_noise(seeds: jax.Array, shape: tuple[int, ...], dtype) -> jax.Array:
    """Noise per seed (S, *shape): a seed's noise depends only on the seed, never on the batch."""
    return jax.vmap(lambda s: jax.random.normal(jax.random.key(s), shape, jnp.float32))(seeds).astype(dtype)


def sample(
    model: FluxTransformer,
    cond: jax.Array,
    known: jax.Array,
    text: TextConditioning,
    seeds: jax.Array,
    layout: CanvasLayout,
    plan: SamplingPlan,
) -> Samples:
    """Run the plan for a batch of conditioned canvases. Pure; jit it with `plan` static (and,
    over a mesh with 'fsdp', call it through `pico_jax.parallel.on_mesh`, as Pipeline does)."""
    cfg = model.config
    b, n, _ = cond.shape
    c_lat = known.shape[-1]
    times = jnp.asarray(flux_schedule(plan.steps, mu=plan.mu if plan.mu is not None else flux_mu(n)))
    bmask = jnp.asarray(layout.bprime_tokens())[None, :, None]
    prompt = jnp.broadcast_to(text.prompt_embeds, (b, *text.prompt_embeds.shape[1:]))
    pooled = jnp.broadcast_to(text.pooled, (b, text.pooled.shape[-1]))
    txt_ids = jnp.zeros((prompt.shape[1], 3), jnp.float32)
    img_ids = jnp.asarray(layout.img_ids())
    guidance = None if plan.guidance is None else jnp.full((b,), plan.guidance, jnp.float32)
    dtype = model.dtype
    noise = seed_noise(seeds, (n, c_lat), dtype)  # (S, N, C), shared by all queries
    score_steps = plan.scorer.steps if plan.selection == "early" else plan.steps
    hooks = layout.hooks(prompt.shape[1], cfg.num_layers, plan.scorer.layer_list(cfg.num_layers))
    weights = plan.scorer.weight_vector()
    consensus = plan.scorer.signal == "consensus"
    bprime_idx = jnp.asarray(grid.panel_token_indices(*layout.tokens_hw)[3])
    seed_batch = min(plan.seed_batch or seed_batch_for_backend(len(seeds)), len(seeds))

    def over_seeds(f, eps):  # f applied to every seed's noise; seed_batch of them at a time
        if seed_batch == 1:  # a loop over single seeds, without a batch axis (not a vmap of one)
            return jax.lax.map(f, eps)
        if seed_batch >= eps.shape[0]:  # one batch: no loop around it
            return jax.vmap(f)(eps)
        return jax.lax.map(f, eps, batch_size=seed_batch)

    def velocity(eps, capture: bool):
        def v(x, t, step):
            x = jnp.where(bmask > 0, x, (1 - t) * known + t * eps)  # known panels: exact x_t
            inp = jnp.concatenate([x, cond.astype(x.dtype)], -1)
            tb = jnp.full((b,), t, jnp.float32)
            if not capture:
                return layout.velocity(model(inp, prompt, pooled, tb, img_ids, txt_ids, guidance), x, t, known), ()
            if consensus:  # no hooks: the score reads the clean estimate x̂0 = x_t - t·v of B'
                vel = layout.velocity(model(inp, prompt, pooled, tb, img_ids, txt_ids, guidance), x, t, known)
                return vel, (x - t * vel)[:, bprime_idx]
            out, cap = model(inp, prompt, pooled, tb, img_ids, txt_ids, guidance, hooks=hooks.gated(step < score_steps))
            return layout.velocity(out, x, t, known), (cap.group_mass, cap.captured)

        return v

    def run(eps, start, stop, capture):
        return euler_sample(velocity(eps, capture), jnp.broadcast_to(eps, (b, n, c_lat)), times, start, stop)

    def with_known(x):
        # The last Euler step moves every token with the model's velocity; at t = 0 the known
        # panels are their clean latents x0 (the loop only pastes them in at the *input* of each
        # step), so paste them once more: otherwise the decoder sees the model's unconstrained
        # output next to B' (a convolutional VAE decoder bleeds it across the panel border).
        return jnp.where(bmask > 0, x, known.astype(x.dtype))

    if plan.selection == "random":
        x, _ = run(noise[0], 0, None, False)
        return Samples(with_known(x)[None], jnp.zeros((1, b), jnp.int32), jnp.zeros((len(seeds), b)))

    def scores_of(aux):
        group_mass, captured = aux  # (steps, L, B, G, G), (steps, L)
        return score_from_group_mass(group_mass, captured, weights)

    def all_scores(aux):  # aux stacked over seeds → (S, B)
        if consensus:
            return consensus_scores(aux[:, -1])  # the last scored step's estimates (S, B, n, C)
        return jax.vmap(scores_of)(aux)

    if plan.selection == "full":
        x, aux = over_seeds(lambda e: run(e, 0, None, True), noise)
        scores = all_scores(aux)  # (S, B)
        idx = choose(scores, plan.keep)
        return Samples(with_known(x[idx, jnp.arange(b)[None]]), idx, scores)

    k = plan.scorer.steps
    x_k, aux = over_seeds(lambda e: run(e, 0, k, True), noise)
    scores = all_scores(aux)
    idx = choose(scores, plan.keep)  # (m, B)
    x_sel = x_k[idx, jnp.arange(b)[None]]  # (m, B, N, C)
    eps_sel = noise[idx]  # (m, B, N, C)

    def finish(x0, eps):
        v = velocity(eps, False)
        return euler_sample(v, x0, times, k, None)[0]

    # eps differs per query here (each query kept its own seeds), so the velocity closes over a batch.
    x = jax.vmap(finish)(x_sel, eps_sel)
    return Samples(with_known(x), idx, scores)


# ------------------------------------------------------------------------------- the pipeline
def _place_on_mesh(transformer: FluxTransformer, autoencoder, text: TextConditioning, mesh: Mesh):
    """The transformer sharded by `pico_jax.parallel`'s rules (a no-op for parameters a loader already
    placed with `param_placer`); the autoencoder and the text conditioning replicated on the mesh."""
    transformer = shard_module(transformer, mesh)
    ae_graphdef, ae_state = nnx.split(autoencoder)
    return transformer, nnx.merge(ae_graphdef, replicate(mesh, ae_state)), replicate(mesh, text)


@dataclasses.dataclass
class Result:
    """One query's output."""

    image: np.ndarray  # B' at B's original size, float32 HxWx3 in [0, 1] (the kept candidates' mean if ensembled)
    canvas: np.ndarray  # the 2P × 2P canvas with that B' painted in, [0, 1]
    chosen_seed: int
    seeds: list[int]
    scores: list[float]  # per seed (zeros for selection="random")
    candidates: list[np.ndarray] = dataclasses.field(default_factory=list)  # kept B' panels, best first
    candidate_seeds: list[int] = dataclasses.field(default_factory=list)  # the seed of each candidate


GATHER_WEIGHTS = ("auto", "per_layer", "per_call")  # also pico_jax.infer.GATHER_WEIGHTS_CHOICES, for a --help without jax


GATHER_AUTO_ORDER = ("per_call", "per_layer")  # what gather_weights="auto" tries over 'fsdp', best first


@dataclasses.dataclass(frozen=True)
class FittedProgram:
    """What a plan's sampler was fitted to the device's memory as (`Pipeline.fitted`): the seeds run
    together, when the weights are gathered over 'fsdp', XLA's plan per device (bytes; None: not
    reported) for each (seed batch, gather_weights) compiled, in the order tried, and which of
    the two the memory chose (`open`; the other is the plan's or the Pipeline's)."""

    seed_batch: int | None  # None: the backend's default
    gather_weights: str
    tried: dict[tuple[int | None, str], int | None]
    open: tuple[str, ...]  # "seed_batch", "gather_weights"

    @property
    def planned(self) -> int | None:
        """XLA's plan per device for what ran."""
        return self.tried[(self.seed_batch, self.gather_weights)]

    def to_json(self) -> dict[str, Any]:
        """A JSON-able record of it (for a results file): what ran, what the memory chose, and
        every plan tried, in GiB per device."""
        gib = lambda b: None if b is None else round(b / 2**30, 3)
        return {"seed_batch": self.seed_batch, "gather_weights": self.gather_weights, "chosen_by_memory": list(self.open),
                "plans_gib": [{"seed_batch": k, "gather_weights": g, "planned": gib(b)} for (k, g), b in self.tried.items()]}


def check_gather_weights(value: str, name: str = "gather_weights") -> str:
    """`value` if it is one of GATHER_WEIGHTS (`Pipeline`'s `gather_weights`), else a ValueError naming `name`."""
    if value not in GATHER_WEIGHTS:
        raise ValueError(f"{name} {value!r}: one of {', '.join(GATHER_WEIGHTS)}")
    return value


class Pipeline:
    """PICO inference: `Pipeline.load(path)(exemplar, exemplar_out, queries)`.

    Holds a FLUX(-Fill-style) transformer, an autoencoder, a text conditioning and the canvas
    settings; compiles one function per (batch size, plan) and reuses it.

    With `mesh` (`pico_jax.parallel.make_mesh`), the transformer is sharded over it by the same
    rules as training (FSDP over 'fsdp', so FLUX.1-dev need not fit on one device; 'tensor' works
    too but reshards the fused projections, README "What is not done yet") and each batch of
    queries is split over 'data' x 'fsdp'; the results are the same as on one device.

    `gather_weights` says when a mesh with 'fsdp' gathers the weights: "per_layer" gathers each
    layer's just before it runs, at every model call of a sample (FLUX.1-dev on data=2,fsdp=4:
    455 GiB of all-gather per device per 28-step call), so no device holds more than a layer of
    them; "per_call" gathers the whole model once per call (22 GiB there) and holds it, in the
    compute dtype, on every device while the call runs; "auto" (default) runs per_call where XLA's
    plan for it fits the device's memory, else per_layer. Without 'fsdp' there is nothing to gather.

    A plan that leaves `seed_batch` open runs every seed together on a GPU or TPU; when XLA's plan
    for that program does not fit the device's memory (`memory.memory_budget`, or
    `device_memory_gib`), the seeds run in smaller groups, halving until one fits. With both open,
    more seeds together comes first: all seeds gathered per call, all seeds per layer, half the
    seeds per call, ... (the first batch compiles each try; `fitted` records what ran). The
    results do not depend on either.
    """

    def __init__(
        self,
        transformer: FluxTransformer,
        autoencoder,
        text: TextConditioning,
        panel: int,
        policy: str = "pad",
        plan: SamplingPlan = SamplingPlan(),
        batch_size: int = 4,
        query_hint: bool = False,
        prediction: str = "velocity",
        mesh: Mesh | None = None,
        gather_weights: str = "auto",
        device_memory_gib: float = 0.0,
    ):
        self.gather_weights = check_gather_weights(gather_weights)
        if device_memory_gib < 0:
            raise ValueError(f"device_memory_gib must be > 0, or 0 for the devices' own (got {device_memory_gib})")
        self.device_memory_gib = device_memory_gib
        if mesh is not None:
            check_batch_size(batch_size, mesh, "batch_size")  # a MeshError, which is a ValueError
            transformer, autoencoder, text = _place_on_mesh(transformer, autoencoder, text, mesh)
        self.mesh = mesh
        self.transformer, self.autoencoder, self.text = transformer, autoencoder, text
        self.layout = CanvasLayout(panel, autoencoder.downsample_factor, query_hint, prediction)
        expected = fill_in_channels(autoencoder)
        if transformer.config.in_channels != expected:
            raise ValueError(
                f"the transformer takes {transformer.config.in_channels} input channels, but Fill-style conditioning with "
                f"this autoencoder ({autoencoder.latent_channels} latent channels, factor {autoencoder.downsample_factor}) "
                f"gives {expected}"
            )
        self.policy, self.plan, self.batch_size = policy, plan.validate(), batch_size
        self.plan.scorer.layer_list(transformer.config.num_layers)  # scorer layers in range, now rather than at trace time
        self._graphdef, self._state = nnx.split(transformer)
        self._ae_graphdef, self._ae_state = nnx.split(autoencoder)
        self._compiled: dict[Any, Any] = {}
        self._programs: dict[Any, Any] = {}  # plan -> what runs it (`_program`)
        # plan -> how its sampler was fitted to the memory, where its seed batch or the gather was open
        self.fitted: dict[SamplingPlan, FittedProgram] = {}

    def update_weights(self, transformer: FluxTransformer) -> None:
        """Sample with new weights for the same model (a training run's current or EMA weights):
        the programs already compiled serve them, where a new Pipeline would compile its own."""
        if self.mesh is not None:
            transformer = shard_module(transformer, self.mesh)
        graphdef, state = nnx.split(transformer)
        if graphdef != self._graphdef:
            raise ValueError("update_weights: the new transformer is not the same model as the pipeline's "
                             "(its modules or parameter names differ); build a new Pipeline for it")
        mismatch = [f"{'.'.join(map(str, path))}: {old.shape} {old.dtype} -> {new.shape} {new.dtype}"
                    for (path, old), new in zip(jax.tree_util.tree_leaves_with_path(self._state), jax.tree.leaves(state))
                    if (old.shape, old.dtype) != (new.shape, new.dtype)]
        if mismatch:
            raise ValueError(f"update_weights: parameters differ in shape or dtype: {'; '.join(mismatch[:3])}")
        self.transformer, self._state = transformer, state

    # --- loading ---------------------------------------------------------------------------
    @classmethod
    def load(cls, path: str | os.PathLike | None = None, **overrides) -> "Pipeline":
        """Load a pico checkpoint directory (pico.json + transformer/ [+ vae/]); None = bundled pico-tiny."""
        from pico_jax.checkpoints import load_pico

        return load_pico(path, **overrides)

    # --- running ---------------------------------------------------------------------------
    def _fn(self, plan: SamplingPlan, gather_weights: str):
        """The jitted sampler for `plan` (ensembling aside) with the weights gathered as
        `gather_weights` says ("per_layer" or "per_call"; only over 'fsdp' does it matter)."""
        plan = dataclasses.replace(plan, ensemble=None)  # ensembling happens on the host: same program
        key = (plan, gather_weights)
        if key not in self._compiled:
            graphdef, ae_graphdef, layout = self._graphdef, self._ae_graphdef, self.layout
            gather_once, compute_dtype = gather_weights == "per_call", self.transformer.dtype

            def run(state, ae_state, canvas, text, seeds):
                if gather_once:  # before the sampler's loops: each layer's own gather is then a no-op
                    state = fsdp_gather_model(state, compute_dtype)
                model, ae = nnx.merge(graphdef, state), nnx.merge(ae_graphdef, ae_state)
                cond, known = fill_condition(ae, canvas, layout)
                s = sample(model, cond.astype(model.dtype), known.astype(model.dtype), text, seeds, layout, plan)
                images = jax.vmap(lambda t: decode_tokens(ae, t, layout))(s.tokens)
                return images, s.chosen, s.scores

            if self.mesh is None:
                self._compiled[key] = jax.jit(run)
            else:  # results replicated (small, readable on every host); traced under the mesh (on_mesh)
                self._compiled[key] = on_mesh(jax.jit(run, out_shardings=replicated(self.mesh)), self.mesh)
        return self._compiled[key]

    def _gathers(self) -> list[str]:
        """The gathers to try, best first: per_call before per_layer where `gather_weights` is
        "auto" and the mesh has 'fsdp' (a sampler calls the model 28 times or more, and per_layer
        gathers every layer at each call); where nothing is gathered, per_layer, which adds nothing."""
        fsdp = self.mesh is not None and dict(self.mesh.shape).get("fsdp", 1) > 1
        if self.gather_weights != "auto":
            return [self.gather_weights]
        return list(GATHER_AUTO_ORDER) if fsdp else ["per_layer"]

    def _program(self, plan: SamplingPlan, inputs: tuple) -> Any:
        """What runs `plan` on `inputs` (the compiled function's arguments): its jitted sampler, or,
        where the plan leaves something to the memory (every seed together on a GPU or TPU, or the
        gather over 'fsdp'), the first compiled candidate whose plan fits (`_fitted_to_memory`)."""
        key = dataclasses.replace(plan, ensemble=None)
        if key not in self._programs:
            one_at_a_time = plan.seeds == 1 or plan.selection == "random"  # one seed is sampled
            if one_at_a_time or plan.seed_batch is not None or seed_batch_for_backend(plan.seeds) < plan.seeds:
                sizes = [plan.seed_batch]  # as the plan says (None: the backend's default)
            else:
                sizes = [plan.seeds]
                while sizes[-1] > 1:
                    sizes.append(-(-sizes[-1] // 2))
            candidates = [(k, g) for k in sizes for g in self._gathers()]
            if len(candidates) == 1:
                k, g = candidates[0]
                self._programs[key] = self._fn(dataclasses.replace(key, seed_batch=k), g)  # compiles at its first call
            else:
                self._programs[key] = self._fitted_to_memory(key, candidates, inputs)
        return self._programs[key]

    def _fitted_to_memory(self, plan: SamplingPlan, candidates: list[tuple[int | None, str]], inputs: tuple) -> Any:
        """The sampler compiled for each (seed batch, gather_weights) candidate in order until XLA's
        plan per device fits the budget (`memory.first_that_fits`); with a warning if none does.
        Collective on a multi-host mesh."""
        from pico_jax.memory import GiB, first_that_fits, memory_budget

        budget, _ = memory_budget(self.device_memory_gib)
        compile_one = lambda c: self._fn(dataclasses.replace(plan, seed_batch=c[0]), c[1]).lower(*inputs).compile()
        (k, gather), compiled, tried, fits = first_that_fits(candidates, compile_one, budget)
        fitted = FittedProgram(k, gather, tried, open=tuple(
            name for name, i in (("seed_batch", 0), ("gather_weights", 1)) if len({c[i] for c in candidates}) > 1))
        if not fits:
            planned = "an unknown amount" if fitted.planned is None else f"{fitted.planned / GiB:.2f} GiB"
            least = {"seed_batch": "one seed at a time" if k == 1 else f"{k} seeds at a time",
                     "gather_weights": f"the weights gathered {gather.replace('_', ' ')}"}
            warnings.warn(f"the sampler plans {planned} per device even with "
                          f"{' and '.join(least[name] for name in fitted.open)}, over the {budget / GiB:.2f} GiB budget: "
                          "it may run out of memory. Lower the batch size or split the model further (--mesh fsdp=N)",
                          stacklevel=3)
        self.fitted[plan] = fitted
        return compiled

    def canvases(self, exemplar, exemplar_out, queries: Sequence[Any]) -> list[grid.Canvas]:
        return [
            grid.compose(exemplar, exemplar_out, q, panel=self.layout.panel, policy=self.policy,
                         multiple=2 * self.layout.ae_factor)
            for q in queries
        ]

    def __call__(
        self,
        exemplar,
        exemplar_out,
        queries: Sequence[Any],
        seed: int = 0,
        progress=None,
        **plan_overrides,
    ) -> list[Result]:
        """Paint B' for every query. Images are arrays in [0, 1], PIL images or paths.

        seed: the first seed; seeds are seed, seed+1, ..., seed+S-1. plan_overrides: fields of
        SamplingPlan (steps, seeds, keep, selection, scorer, guidance, mu, seed_batch, ensemble),
        applied with SamplingPlan.override (unnamed fields follow the named ones)."""
        plan = self.plan.override(**plan_overrides)
        canvases = self.canvases(exemplar, exemplar_out, queries)
        return self.run_canvases(canvases, plan, seed, progress)

    def run_canvases(self, canvases: list[grid.Canvas], plan: SamplingPlan, seed: int = 0, progress=None) -> list[Result]:
        seeds = np.arange(seed, seed + plan.seeds, dtype=np.uint32)
        results: list[Result] = []
        for start in range(0, len(canvases), self.batch_size):
            chunk = canvases[start : start + self.batch_size]
            batch = np.stack([c.image for c in chunk]) * 2.0 - 1.0
            pad = self.batch_size - len(chunk)  # keep one compiled shape for every batch
            if pad:
                batch = np.concatenate([batch, np.repeat(batch[-1:], pad, 0)])
            inputs = (self._state, self._ae_state, *self._inputs(batch, seeds))
            images, chosen, scores = jax.device_get(self._program(plan, inputs)(*inputs))
            for i, c in enumerate(chunk):
                results.append(self._result(c, images[:, i], chosen[:, i], scores[:, i], seeds, plan.ensemble))
            if progress is not None:
                progress(len(chunk))
        return results

    def _inputs(self, batch: np.ndarray, seeds: np.ndarray) -> tuple[jax.Array, TextConditioning, jax.Array]:
        """(canvases, text, seeds) as the compiled function takes them: on a mesh, the canvases
        split over its data x fsdp devices and the seeds replicated; every host holds the whole batch."""
        if self.mesh is None:
            return jnp.asarray(batch), self.text, jnp.asarray(seeds)
        return (global_array(batch, batch_sharding(self.mesh, batch.ndim)), self.text,
                global_array(seeds, replicated(self.mesh)))

    def _result(self, canvas: grid.Canvas, images, chosen, scores, seeds, ensemble: str | None = None) -> Result:
        painted = np.clip((images + 1.0) / 2.0, 0.0, 1.0)  # (m, 2P, 2P, 3)
        panels = [grid.split(p, self.layout.panel)[3] for p in painted]
        out = ensemble_panels(panels, ensemble) if ensemble else panels[0]
        full = canvas.image.copy()
        p = self.layout.panel
        full[p:, p:] = out
        return Result(
            image=canvas.restore_output(out),
            canvas=full,
            chosen_seed=int(seeds[int(chosen[0])]),
            seeds=[int(s) for s in seeds],
            scores=[float(s) for s in scores],
            candidates=panels,
            candidate_seeds=[int(seeds[int(c)]) for c in chosen],
        )
