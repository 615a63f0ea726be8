"""The PICO sampler and pipeline on a tiny random FLUX-Fill-style model: seeds under vmap equal
seeds one by one, outputs depend only on (query, seed), early selection finishes only the kept
seeds (same trajectories, fewer model calls), the scorer's definition, known panels held at
their exact noisy interpolation, Fill conditioning, and the pico checkpoint round trip."""

import dataclasses
import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from pico_jax import grid
from pico_jax.checkpoints import load_pico, save_pico
from pico_jax.flops import matmul_flops
from pico_jax.flow import flux_mu, flux_schedule
from pico_jax.model.autoencoder import PixelAutoencoder
from pico_jax.model.flux import FluxConfig, FluxTransformer
from pico_jax.pipeline import (
    CanvasLayout,
    FittedProgram,
    Pipeline,
    SamplingPlan,
    TextConditioning,
    decode_tokens,
    ensemble_panels,
    encode_tokens,
    fill_condition,
    sample,
    seed_batch_for_backend,
    seed_noise,
)
from pico_jax.safetensors_io import CheckpointError
from pico_jax.scorer import BPRIME, PRESETS, ScorerConfig, choose, score_from_group_mass

PANEL, AE = 16, 2  # canvas 32² → latents 16² × 12 → 8×8 = 64 tokens of 48 channels
CFG = FluxConfig(num_double=1, num_single=1, num_heads=2, head_dim=16, axes_dims_rope=(4, 6, 6), in_channels=112,
                 out_channels=48, context_dim=16, pooled_dim=16, guidance_embeds=False)
C_LAT = 48
T, S, K = 4, 4, 2


@pytest.fixture(scope="module")
def model():
    return FluxTransformer(CFG, rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def ae():
    return PixelAutoencoder(AE)


@pytest.fixture(scope="module")
def layout():
    return CanvasLayout(PANEL, AE)


@pytest.fixture(scope="module")
def text():
    return TextConditioning.empty(1, CFG.context_dim, CFG.pooled_dim)


def _images(n, seed=0, size=(PANEL, PANEL)):
    rng = np.random.default_rng(seed)
    return [rng.random((*size, 3)).astype(np.float32) for _ in range(n)]


@pytest.fixture(scope="module")
def canvases():
    """Three canvases (B = 3) in [-1, 1] sharing the exemplar pair, different queries."""
    a, a_out, *qs = _images(5, seed=1)
    return np.stack([grid.compose(a, a_out, q, panel=PANEL, multiple=2 * AE).image for q in qs]) * 2.0 - 1.0


@pytest.fixture(scope="module")
def conditioned(ae, layout, canvases):
    cond, known = fill_condition(ae, jnp.asarray(canvases), layout)
    return cond, known


_JITTED: dict = {}


def run_sample(model, cond, known, text, seeds, layout, plan):
    """sample() jitted once per plan (every model here has the same structure; its parameters are
    an argument, so a model with other weights reuses the compiled function)."""
    key = (nnx.graphdef(model), plan)
    if key not in _JITTED:
        graphdef, _ = nnx.split(model)

        @jax.jit
        def fn(state, cond, known, text, seeds):
            return sample(nnx.merge(graphdef, state), cond, known, text, seeds, layout, plan)

        _JITTED[key] = fn
    return _JITTED[key](nnx.state(model), cond, known, text, jnp.asarray(seeds, jnp.uint32))


def _plan(selection, seeds=S, keep=1, steps=T, k=K, **scorer):
    return SamplingPlan(steps=steps, seeds=seeds, keep=keep, selection=selection, scorer=ScorerConfig(steps=k, **scorer))


def _by_seed(samples, seeds):
    """{seed: (B, N, C) final tokens} from a run that kept every seed."""
    tokens, chosen = np.asarray(samples.tokens), np.asarray(samples.chosen)
    out = {}
    for s_idx, s in enumerate(seeds):
        rows = [tokens[np.where(chosen[:, b] == s_idx)[0][0], b] for b in range(tokens.shape[1])]
        out[s] = np.stack(rows)
    return out


# --------------------------------------------------------------------------- seeds and batches
def test_vmap_over_seeds_equals_seeds_one_by_one(model, conditioned, text, layout):
    cond, known = conditioned
    seeds = [3, 5, 11, 12]
    together = run_sample(model, cond, known, text, seeds, layout, _plan("full", keep=S))
    assert together.tokens.shape == (S, 3, layout.num_tokens, C_LAT)
    by_seed = _by_seed(together, seeds)
    for j, s in enumerate(seeds):
        alone = run_sample(model, cond, known, text, [s], layout, _plan("full", seeds=1, keep=1))
        np.testing.assert_allclose(alone.tokens[0], by_seed[s], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(alone.scores[0], together.scores[j], rtol=1e-5, atol=1e-6)
    # Different seeds really give different samples (the comparison above is not vacuous).
    assert np.abs(by_seed[3] - by_seed[5]).max() > 1e-2
    # Scores are in [0, 1] for the "context" weights (a fraction of attention mass) and not all equal.
    sc = np.asarray(together.scores)
    assert np.all((sc > 0) & (sc < 1)) and np.ptp(sc) > 0
    # The kept order is best first.
    assert np.all(np.diff(np.take_along_axis(sc, np.asarray(together.chosen), 0), axis=0) <= 0)


@pytest.mark.parametrize("selection", ["full", "early"])
def test_seed_batch_changes_speed_not_results(selection, model, conditioned, text, layout):
    """Seeds in a loop one at a time, in chunks with a remainder (3 + 1), or all vmapped together:
    the same scores, choices and samples (seed_batch only moves work between loop and batch)."""
    cond, known = conditioned
    seeds = [3, 5, 11, 12]
    keep = S if selection == "full" else 2
    runs = {sb: run_sample(model, cond, known, text, seeds, layout,
                           dataclasses.replace(_plan(selection, keep=keep), seed_batch=sb)) for sb in (1, 3, S)}
    for sb in (1, 3):
        np.testing.assert_array_equal(runs[sb].chosen, runs[S].chosen)
        np.testing.assert_allclose(runs[sb].scores, runs[S].scores, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(runs[sb].tokens, runs[S].tokens, rtol=1e-5, atol=1e-5)
    assert np.ptp(np.asarray(runs[1].scores)) > 0  # the seeds really differ, so the order is a real check


def test_seed_batch_default_per_backend():
    assert seed_batch_for_backend(8, "cpu") == 1
    assert seed_batch_for_backend(8, "gpu") == 8 and seed_batch_for_backend(8, "tpu") == 8


def test_an_open_seed_batch_runs_the_most_seeds_together_that_fit_the_memory(model, ae, text, monkeypatch):
    """Where a plan leaving seed_batch open runs every seed together (a GPU or TPU; simulated here
    by the per-backend default), a program over the memory budget runs its seeds in halves,
    quarters, ...: the first that fits, with the results of that seed batch named. Under every
    budget: one seed at a time, with a warning; with room: all together, compiled once."""
    import pico_jax.pipeline as pipeline_module
    from pico_jax.memory import HEADROOM, GiB

    monkeypatch.setattr(pipeline_module, "seed_batch_for_backend", lambda seeds, backend=None: seeds)
    plan = _plan("early", seeds=4, keep=2)
    a, a_out, *qs = _images(4, seed=3)
    make = lambda **kw: Pipeline(model, ae, text, panel=PANEL, plan=kw.pop("plan", plan), batch_size=2, **kw)

    cramped = make(device_memory_gib=1e-6)
    with pytest.warns(UserWarning, match="even with one seed at a time"):
        cramped(a, a_out, qs)
    fit = cramped.fitted[plan]
    tried = {k: b for (k, _), b in fit.tried.items()}  # one device: nothing to gather, per_layer only
    assert (fit.seed_batch, fit.gather_weights, fit.open) == (1, "per_layer", ("seed_batch",))
    assert list(fit.tried) == [(4, "per_layer"), (2, "per_layer"), (1, "per_layer")] and fit.planned == tried[1]
    assert tried[4] > tried[2] > tried[1], tried

    fitted = make(device_memory_gib=(tried[2] + tried[4]) / 2 / HEADROOM / GiB)  # 2 together fit, 4 do not
    results = fitted(a, a_out, qs)
    assert fitted.fitted[plan] == FittedProgram(2, "per_layer", {(4, "per_layer"): tried[4], (2, "per_layer"): tried[2]},
                                                ("seed_batch",))
    named = make(plan=dataclasses.replace(plan, seed_batch=2))(a, a_out, qs)
    for r, n in zip(results, named):
        np.testing.assert_array_equal(r.image, n.image)
        assert r.scores == n.scores and r.candidate_seeds == n.candidate_seeds

    roomy = make(device_memory_gib=1000.0)
    roomy(a, a_out, qs)
    assert roomy.fitted[plan] == FittedProgram(4, "per_layer", {(4, "per_layer"): tried[4]}, ("seed_batch",))
    with pytest.raises(ValueError, match="device_memory_gib must be > 0"):
        make(device_memory_gib=-1.0)


def test_query_hint_shows_b_under_the_bprime_mask_and_changes_nothing_else(ae, layout, canvases):
    canvases = jnp.asarray(canvases)
    plain, known_plain = fill_condition(ae, canvases, layout)
    hinted, _ = fill_condition(ae, canvases, dataclasses.replace(layout, query_hint=True))
    idx = grid.panel_token_indices(*layout.tokens_hw)
    c = known_plain.shape[-1]
    # B' latent channels: blank without the hint, exactly B's latents (same relative position) with it.
    np.testing.assert_array_equal(plain[:, idx[3], :c], 0.0)
    np.testing.assert_allclose(hinted[:, idx[3], :c], plain[:, idx[2], :c], rtol=0, atol=1e-6)
    assert np.abs(np.asarray(hinted[:, idx[2], :c])).max() > 0.1  # B is not blank, so the check above bites
    # Every other token and the mask channels are unchanged.
    others = np.concatenate(idx[:3])
    np.testing.assert_array_equal(hinted[:, others], plain[:, others])
    np.testing.assert_array_equal(hinted[..., c:], plain[..., c:])


def test_seed_noise_depends_only_on_the_seed():
    a = seed_noise(jnp.array([4, 9], jnp.uint32), (8, 3), jnp.float32)
    b = seed_noise(jnp.array([9], jnp.uint32), (8, 3), jnp.float32)
    np.testing.assert_array_equal(a[1], b[0])
    assert not np.allclose(a[0], a[1])


@pytest.fixture(scope="module")
def pipe(model, ae, text):
    return Pipeline(model, ae, text, panel=PANEL, plan=_plan("early", keep=2), batch_size=2)


def test_same_seed_same_output_and_independent_of_batch(pipe):
    a, a_out, q1, q2, q3 = _images(5, seed=2)
    q_odd = _images(1, seed=3, size=(12, 20))[0]  # a non-square query in the batch
    r1 = pipe(a, a_out, [q1, q2], seed=7)
    r1b = pipe(a, a_out, [q1, q2], seed=7)
    np.testing.assert_array_equal(r1[0].image, r1b[0].image)
    assert r1[0].scores == r1b[0].scores and r1[0].chosen_seed == r1b[0].chosen_seed
    # q1 second in a batch with other mates (and a padded partial batch: 3 queries, batch size 2).
    r2 = pipe(a, a_out, [q3, q_odd, q1], seed=7)
    np.testing.assert_allclose(r2[2].image, r1[0].image, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(r2[2].scores, r1[0].scores, rtol=1e-5, atol=1e-6)
    assert r2[2].chosen_seed == r1[0].chosen_seed
    assert r1[0].seeds == list(range(7, 7 + S))
    assert r2[1].image.shape == (12, 20, 3)  # B' at the query's original size
    # Another first seed gives other samples.
    r3 = pipe(a, a_out, [q1], seed=100)
    assert np.abs(r3[0].image - r1[0].image).max() > 1e-3


@pytest.mark.parametrize("spec, batch", [("data=8", 8), ("fsdp=4,tensor=2", 4)])
def test_pipeline_on_a_mesh_matches_one_device(spec, batch, model, ae, text, pipe):
    """Pipeline(mesh=...): queries split over data x fsdp, the model sharded by the training rules;
    the same images, scores and chosen seeds as on one device, for a padded partial batch too."""
    from pico_jax.parallel import make_mesh

    mesh = make_mesh(spec)
    # per_layer, the sampler that holds the least; per_call (and auto's choice) in the tests below
    sharded = Pipeline(model, ae, text, panel=PANEL, plan=pipe.plan, batch_size=batch, mesh=mesh, gather_weights="per_layer")
    qkv = sharded.transformer.double_blocks.img.qkv.kernel[...]
    assert len(qkv.sharding.device_set) == 8
    if "tensor" in spec:  # (layers, width 32 over fsdp=4, 3 x 32 over tensor=2: one head's q, k, v each)
        assert qkv.sharding.spec == jax.P(None, "fsdp", "tensor")
        assert {sh.data.shape for sh in qkv.addressable_shards} == {(1, 8, 48)}
    a, a_out, *queries = _images(5, seed=2)
    want, got = pipe(a, a_out, queries, seed=7), sharded(a, a_out, queries, seed=7)
    assert len(got) == 3
    for w, g in zip(want, got):
        np.testing.assert_allclose(g.image, w.image, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(g.scores, w.scores, rtol=1e-4, atol=1e-6)
        assert g.chosen_seed == w.chosen_seed and g.candidate_seeds == w.candidate_seeds


def _all_gather_bytes(pipeline: Pipeline) -> int:
    """The all-gather bytes per device of `pipeline`'s compiled sampling program (loops by trip count)."""
    from pico_jax.parallel import collective_bytes

    batch = np.zeros((pipeline.batch_size, 2 * PANEL, 2 * PANEL, 3), np.float32)
    seeds = np.arange(pipeline.plan.seeds, dtype=np.uint32)
    lowered = pipeline._fn(pipeline.plan, pipeline.gather_weights).lower(pipeline._state, pipeline._ae_state, *pipeline._inputs(batch, seeds))
    return collective_bytes(lowered.compile().as_text())["all-gather"]


def test_weights_gathered_once_per_call_give_the_same_samples_and_gather_a_model_call_s_worth(ae, text):
    """gather_weights="per_call" on data=2,fsdp=4: the images, scores and seeds of one device, and
    the program gathers about the model's weights once, where per_layer gathers them again at each
    of the sampler's model calls (here 4 seeds x 2 scored steps one seed at a time, then 2 finishing).
    Two layers a stack: with one, XLA hoists the layer's gathers out of the sampler's loops itself."""
    from pico_jax.parallel import make_mesh

    model = FluxTransformer(dataclasses.replace(CFG, num_double=2, num_single=2), rngs=nnx.Rngs(1))
    pipe = Pipeline(model, ae, text, panel=PANEL, plan=_plan("early", keep=2), batch_size=2)
    mesh = make_mesh("data=2,fsdp=4")
    once = Pipeline(model, ae, text, panel=PANEL, plan=pipe.plan, batch_size=8, mesh=mesh, gather_weights="per_call")
    a, a_out, *queries = _images(5, seed=2)
    for w, g in zip(pipe(a, a_out, queries, seed=7), once(a, a_out, queries, seed=7)):
        np.testing.assert_allclose(g.image, w.image, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(g.scores, w.scores, rtol=1e-4, atol=1e-6)
        assert g.chosen_seed == w.chosen_seed and g.candidate_seeds == w.candidate_seeds
    per_layer = Pipeline(model, ae, text, panel=PANEL, plan=pipe.plan, batch_size=8, mesh=mesh, gather_weights="per_layer")
    weights = sum(x.nbytes for x in jax.tree.leaves(nnx.state(model)))
    # what each model call's layers gather: not their modulation kernels (`flux.layer_modulations`)
    token_wise = sum(x.nbytes for k, x in jax.tree.leaves_with_path(nnx.state(model))
                     if "blocks" in jax.tree_util.keystr(k) and "'mod'" not in jax.tree_util.keystr(k))
    outputs = pipe.plan.keep * 8 * (2 * PANEL) ** 2 * 3 * 4  # the kept canvases, gathered to every device
    gathered_once, gathered_per_layer = _all_gather_bytes(once), _all_gather_bytes(per_layer)
    assert 0.5 * weights < gathered_once - outputs <= weights, (gathered_once, weights)
    assert gathered_per_layer - outputs > 8 * token_wise, (gathered_per_layer, token_wise)


def test_auto_gathers_the_weights_once_per_call_where_that_fits_else_per_layer(ae, text):
    """gather_weights="auto" (the default) on data=2,fsdp=4: with room, the per_call program, compiled
    once; with a budget between the two plans, per_layer, without a warning; under every budget, the
    plan that holds least (per_layer), with a warning naming it. The images are the same each time.
    Without 'fsdp' nothing is fitted: there is nothing to gather."""
    import warnings

    from pico_jax.memory import HEADROOM, GiB
    from pico_jax.parallel import make_mesh

    model = FluxTransformer(dataclasses.replace(CFG, num_double=2, num_single=2), rngs=nnx.Rngs(1))
    plan, mesh = _plan("early", keep=2), make_mesh("data=2,fsdp=4")
    make = lambda **kw: Pipeline(model, ae, text, panel=PANEL, plan=plan, batch_size=8, **kw)
    a, a_out, *queries = _images(3, seed=2)

    roomy = make(mesh=mesh, device_memory_gib=1000.0)
    assert roomy.gather_weights == "auto"
    want = roomy(a, a_out, queries, seed=7)
    (per_call,) = roomy.fitted[plan].tried.values()
    assert roomy.fitted[plan] == FittedProgram(None, "per_call", {(None, "per_call"): per_call}, ("gather_weights",))

    cramped = make(mesh=mesh, device_memory_gib=1e-6)
    with pytest.warns(UserWarning, match="even with the weights gathered per layer, over the"):
        got = cramped(a, a_out, queries, seed=7)
    tried = cramped.fitted[plan].tried
    assert cramped.fitted[plan].gather_weights == "per_layer" and list(tried) == [(None, "per_call"), (None, "per_layer")]
    assert tried[(None, "per_call")] == per_call > tried[(None, "per_layer")], tried  # the whole model on every device

    between = make(mesh=mesh, device_memory_gib=(per_call + tried[(None, "per_layer")]) / 2 / HEADROOM / GiB)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        also = between(a, a_out, queries, seed=7)
    assert between.fitted[plan] == FittedProgram(None, "per_layer", tried, ("gather_weights",))
    for w, g, h in zip(want, got, also):
        np.testing.assert_allclose(g.image, w.image, rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(h.image, g.image)
        assert g.chosen_seed == w.chosen_seed == h.chosen_seed

    no_fsdp = make(mesh=make_mesh("data=8"))
    no_fsdp(a, a_out, queries[:1], seed=7)
    assert plan not in no_fsdp.fitted and no_fsdp._gathers() == ["per_layer"]


def test_with_both_open_more_seeds_together_come_before_the_gather_once(model, ae, text, monkeypatch):
    """An open seed batch on a GPU-like default and gather_weights="auto" over fsdp: the candidates
    tried in order are all seeds gathered per call, all per layer, half per call, ... (the order of
    `first_that_fits`'s list, read without compiling)."""
    import pico_jax.memory as memory
    import pico_jax.pipeline as pipeline_module
    from pico_jax.parallel import make_mesh

    class Listed(Exception):
        pass

    def listed(candidates, compile_one, budget):
        raise Listed(list(candidates))

    monkeypatch.setattr(pipeline_module, "seed_batch_for_backend", lambda seeds, backend=None: seeds)
    monkeypatch.setattr(memory, "first_that_fits", listed)
    pipe = Pipeline(model, ae, text, panel=PANEL, plan=_plan("early", seeds=3), batch_size=8, mesh=make_mesh("data=2,fsdp=4"))
    with pytest.raises(Listed) as e:
        pipe._program(pipe.plan, ())
    assert e.value.args[0] == [(3, "per_call"), (3, "per_layer"), (2, "per_call"), (2, "per_layer"),
                               (1, "per_call"), (1, "per_layer")]


def test_gather_weights_must_be_a_known_choice(model, ae, text):
    from pico_jax.infer import GATHER_WEIGHTS_CHOICES
    from pico_jax.pipeline import GATHER_WEIGHTS

    assert GATHER_WEIGHTS_CHOICES == GATHER_WEIGHTS  # the CLIs' copy, kept so that --help needs no jax
    with pytest.raises(ValueError, match=r"gather_weights 'once': one of auto, per_layer, per_call"):
        Pipeline(model, ae, text, panel=PANEL, gather_weights="once")
    with pytest.raises(ValueError, match=r"gather_weights 'once'") as e:
        Pipeline.load(gather_weights="once")
    assert not isinstance(e.value, CheckpointError)  # an argument, not a bad checkpoint


def test_pipeline_mesh_needs_a_batch_its_data_devices_divide(model, ae, text):
    from pico_jax.parallel import make_mesh

    with pytest.raises(ValueError, match=r"batch_size 4 must be a multiple of the mesh's data x fsdp = 8"):
        Pipeline(model, ae, text, panel=PANEL, batch_size=4, mesh=make_mesh("data=2,fsdp=4"))


def test_loading_onto_a_mesh_the_batch_does_not_divide_is_a_mesh_error_not_a_bad_checkpoint():
    from pico_jax.checkpoints import CheckpointError
    from pico_jax.parallel import MeshError, make_mesh

    with pytest.raises(MeshError, match=r"^batch_size 2 must be a multiple of the mesh's data x fsdp = 8") as e:
        Pipeline.load(batch_size=2, mesh=make_mesh("data=2,fsdp=4"))
    assert not isinstance(e.value, CheckpointError)


# ----------------------------------------------------------------------------- early selection
def test_early_selection_finishes_the_best_m_with_unchanged_trajectories(model, conditioned, text, layout, pipe):
    cond, known = conditioned
    seeds = [0, 1, 2, 3]
    m = 2
    early = run_sample(model, cond, known, text, seeds, layout, _plan("early", keep=m))
    assert early.tokens.shape == (m, 3, layout.num_tokens, C_LAT) and early.chosen.shape == (m, 3)
    np.testing.assert_array_equal(early.chosen, np.argsort(-np.asarray(early.scores), axis=0, kind="stable")[:m])
    # Every seed's trajectory is deterministic: the early-selected seeds end exactly where the
    # same seeds end in a full run (all seeds finished).
    full = _by_seed(run_sample(model, cond, known, text, seeds, layout, _plan("full", keep=S)), seeds)
    for i in range(m):
        for b in range(3):
            s = seeds[int(early.chosen[i, b])]
            np.testing.assert_allclose(early.tokens[i, b], full[s][b], rtol=1e-5, atol=1e-5)
    # The pipeline keeps m candidates, best first, and the first is the result.
    a, a_out, q = _images(3, seed=4)
    res = pipe(a, a_out, [q], keep=m)[0]
    assert len(res.candidates) == m
    np.testing.assert_array_equal(res.canvas[PANEL:, PANEL:], res.candidates[0])
    assert res.chosen_seed == int(np.argmax(res.scores))


@pytest.mark.parametrize("how", ["median", "mean"])
def test_ensemble_returns_the_statistic_of_the_kept_candidates(how, pipe):
    a, a_out, q = _images(3, seed=4)
    q_odd = _images(1, seed=5, size=(12, 20))[0]
    plain = pipe(a, a_out, [q, q_odd], keep=3)
    n_compiled = len(pipe._compiled)
    ens = pipe(a, a_out, [q, q_odd], keep=3, ensemble=how)
    assert len(pipe._compiled) == n_compiled  # the same program: the ensemble is taken on the host
    stat = np.median if how == "median" else np.mean
    for p, e in zip(plain, ens):
        assert e.candidate_seeds == p.candidate_seeds and e.chosen_seed == p.chosen_seed and len(e.candidates) == 3
        for c_p, c_e in zip(p.candidates, e.candidates):  # candidates stay individual
            np.testing.assert_array_equal(c_p, c_e)
        panel = stat(np.stack(p.candidates), 0)
        np.testing.assert_allclose(e.canvas[PANEL:, PANEL:], panel, atol=1e-6)
        np.testing.assert_array_equal(e.canvas[:PANEL], p.canvas[:PANEL])  # A, A' and B untouched
        assert e.image.shape == p.image.shape
        # ...and differs from the best candidate (three different seeds do not agree everywhere)
        assert np.abs(e.canvas[PANEL:, PANEL:] - p.candidates[0]).max() > 1e-4
    np.testing.assert_allclose(ens[0].image, ens[0].canvas[PANEL:, PANEL:], atol=1e-6)  # square query: no resize


def test_ensemble_panels_statistics_and_errors():
    panels = [np.full((2, 2, 3), v, np.float32) for v in (0.0, 0.1, 0.9)]
    np.testing.assert_allclose(ensemble_panels(panels, "median"), 0.1)
    np.testing.assert_allclose(ensemble_panels(panels, "mean"), 1.0 / 3.0, rtol=1e-6)
    with pytest.raises(ValueError, match="unknown ensemble"):
        ensemble_panels(panels, "mode")


def test_early_scores_are_the_documented_attention_statistic(model, conditioned, text, layout):
    """k = 1: the score is Σ_j w_j · group_mass[B', j] of the very first model call (t = 1, where
    every token, known or not, is the seed's noise), averaged over the scored layers."""
    cond, known = conditioned
    seeds = [21, 22]
    plan = _plan("early", seeds=2, k=1, layers=(-1,), weights="exemplar")
    got = run_sample(model, cond, known, text, seeds, layout, plan).scores  # (S, B)
    b, n = cond.shape[:2]
    hooks = layout.hooks(1, CFG.num_layers, [CFG.num_layers - 1])
    eps = seed_noise(jnp.asarray(seeds, jnp.uint32), (n, C_LAT), jnp.float32)
    w = np.asarray(PRESETS["exemplar"])
    graphdef, state = nnx.split(model)

    @jax.jit
    def first_call(state, eps):
        x = jnp.broadcast_to(eps, (b, n, C_LAT))
        return nnx.merge(graphdef, state)(jnp.concatenate([x, cond], -1), jnp.zeros((b, 1, 16)), jnp.zeros((b, 16)),
                                          jnp.ones(b), layout.img_ids(), np.zeros((1, 3), np.float32), None, hooks=hooks)

    for j in range(2):
        _, cap = first_call(state, eps[j])
        want = np.asarray(cap.group_mass)[-1, :, BPRIME] @ w  # (B,)
        assert np.asarray(cap.group_mass)[0].sum() == 0  # layer 0 not captured
        np.testing.assert_allclose(got[j], want, rtol=1e-5, atol=1e-6)


def test_early_selection_costs_fewer_model_calls(model, conditioned, text, layout):
    """Count model invocations in the traced program: every call runs the input projection
    (in_channels → width) once per example, so its flops / (2·B·N·in·width) = model calls,
    with scan trip counts and the vmapped seed axis accounted for."""
    cond, known = conditioned
    b, n = cond.shape[:2]
    seeds = jnp.arange(S, dtype=jnp.uint32)
    per_call = 2.0 * b * n * CFG.in_channels * CFG.width
    calls, flops = {}, {}
    m, t, k = 1, 8, 2
    for sel in ("random", "full", "early"):
        plan = _plan(sel, keep=m, steps=t, k=k)
        jaxpr = jax.make_jaxpr(lambda c, kn: sample(model, c, kn, text, seeds, layout, plan))(cond, known).jaxpr
        calls[sel] = matmul_flops(jaxpr, CFG.in_channels, while_loops="error") / per_call
        flops[sel] = matmul_flops(jaxpr, while_loops="error")
    assert calls == {"random": t, "full": S * t, "early": S * k + m * (t - k)}
    assert flops["early"] < 0.5 * flops["full"]
    ideal = (S * k + m * (t - k)) / (S * t)
    assert flops["early"] / flops["full"] == pytest.approx(ideal, rel=0.15)
    assert flops["random"] < flops["early"]


# ------------------------------------------------------------------------------------ scorer
def test_score_from_group_mass_hand_built():
    steps, L, B, G = 2, 3, 2, 5
    gm = np.full((steps, L, B, G, G), 99.0, np.float32)  # garbage everywhere ...
    captured = np.array([[True, False, True], [False, False, True]])
    rows = {(0, 0): [0.1, 0.2, 0.3, 0.1, 0.3], (0, 2): [0.0, 0.5, 0.0, 0.0, 0.5], (1, 2): [0.2, 0.2, 0.2, 0.2, 0.2]}
    for (s, l), r in rows.items():
        gm[s, l, :, BPRIME] = r  # ... except the B' rows of captured (step, layer) pairs
        gm[s, l, 1, BPRIME] = np.asarray(r)[::-1]  # query 1: reversed rows
    w = PRESETS["context"]
    got = np.asarray(score_from_group_mass(jnp.asarray(gm), jnp.asarray(captured), w))
    q0 = ((0.2 + 0.3 + 0.1) + (0.5) + (0.6)) / 3
    q1 = ((0.1 + 0.3 + 0.2) + (0.0 + 0.5 + 0.0) + 0.6) / 3
    np.testing.assert_allclose(got, [q0, q1], rtol=1e-6)
    # "self" prefers less B'→B' attention; "query" reads only B.
    np.testing.assert_allclose(score_from_group_mass(jnp.asarray(gm), jnp.asarray(captured), PRESETS["self"]),
                               [-(0.3 + 0.5 + 0.2) / 3, -(0.1 + 0.0 + 0.2) / 3], rtol=1e-6)
    np.testing.assert_allclose(score_from_group_mass(jnp.asarray(gm), jnp.asarray(captured), PRESETS["query"]),
                               [(0.1 + 0 + 0.2) / 3, (0.2 + 0.5 + 0.2) / 3], rtol=1e-6)


def test_choose_orders_best_first():
    scores = jnp.array([[0.1, 0.9], [0.7, 0.2], [0.4, 0.5], [0.8, 0.0]])  # (S=4, B=2)
    np.testing.assert_array_equal(choose(scores, 2), [[3, 0], [1, 2]])
    np.testing.assert_array_equal(choose(scores, 4)[:, 1], [0, 2, 1, 3])
    assert choose(scores, 1).shape == (1, 2)


def test_scorer_config_presets_and_errors():
    for name, w in PRESETS.items():
        np.testing.assert_array_equal(ScorerConfig(weights=name).weight_vector(), w)
    np.testing.assert_array_equal(ScorerConfig(weights=(1, 0, 0, 0, 2)).weight_vector(), [1, 0, 0, 0, 2])
    with pytest.raises(ValueError, match="unknown scorer weights 'contxt'"):
        ScorerConfig(weights="contxt").weight_vector()
    with pytest.raises(ValueError, match="need 5 entries"):
        ScorerConfig(weights=(1.0, 2.0)).weight_vector()
    assert ScorerConfig().layer_list(4) == (0, 1, 2, 3)
    assert ScorerConfig(layers=(0, -1)).layer_list(57) == (0, 56)
    with pytest.raises(ValueError, match="out of range"):
        ScorerConfig(layers=(60,)).layer_list(57)
    with pytest.raises(ValueError, match="out of range"):
        ScorerConfig(layers=(-58,)).layer_list(57)


def test_sampling_plan_validation():
    SamplingPlan().validate()
    with pytest.raises(ValueError, match="selection"):
        SamplingPlan(selection="best").validate()
    with pytest.raises(ValueError, match=">= 1"):
        SamplingPlan(seeds=0).validate()
    with pytest.raises(ValueError, match="cannot keep 3 of 2"):
        SamplingPlan(seeds=2, keep=3).validate()
    with pytest.raises(ValueError, match="scorer steps"):
        SamplingPlan(steps=4, scorer=ScorerConfig(steps=5)).validate()
    SamplingPlan(steps=4, selection="full", scorer=ScorerConfig(steps=5)).validate()  # k unused by full
    with pytest.raises(ValueError, match="seed_batch"):
        SamplingPlan(seed_batch=0).validate()
    SamplingPlan(seeds=4, keep=2, ensemble="median").validate()
    SamplingPlan(seeds=4, keep=4, selection="full", ensemble="mean").validate()
    with pytest.raises(ValueError, match="keep >= 2"):
        SamplingPlan(seeds=4, keep=1, ensemble="median").validate()
    with pytest.raises(ValueError, match="keep >= 2"):
        SamplingPlan(seeds=4, keep=1, selection="random", ensemble="median").validate()
    with pytest.raises(ValueError, match="--ensemble"):
        SamplingPlan(seeds=4, keep=2, ensemble="average").validate()


def test_consensus_over_two_seeds_warns_that_it_cannot_rank_them():
    import warnings

    consensus = ScorerConfig(steps=1, signal="consensus")
    with pytest.warns(UserWarning, match="cannot rank 2 seeds"):
        SamplingPlan(steps=2, seeds=2, scorer=consensus).validate()
    # the scores really tie: each of two estimates is equally far from their mean
    from pico_jax.scorer import consensus_scores

    x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 1, 5, 3)), jnp.float32)
    s = np.asarray(consensus_scores(x))
    assert s[0, 0] == pytest.approx(s[1, 0], rel=1e-6)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        SamplingPlan(steps=2, seeds=3, scorer=consensus).validate()
        SamplingPlan(steps=2, seeds=2, scorer=ScorerConfig(steps=1)).validate()  # attention scores differ
        SamplingPlan(steps=2, seeds=2, selection="random", scorer=consensus).validate()


def test_override_adapts_the_fields_the_caller_did_not_name():
    default = SamplingPlan(seeds=8, keep=4, ensemble="median").validate()  # the bundled pico-tiny's shape
    assert default.override(seeds=2) == dataclasses.replace(default, seeds=2, keep=2)  # still an ensemble of 2
    assert default.override(seeds=1) == dataclasses.replace(default, seeds=1, keep=1, ensemble=None)
    assert default.override(keep=1).ensemble is None
    assert default.override(selection="random").ensemble is None
    assert default.override(seeds=16) == dataclasses.replace(default, seeds=16)  # nothing else moves
    assert default.override(ensemble=None) == dataclasses.replace(default, ensemble=None)
    # what the caller named is never rewritten: a conflict among named fields is an error
    with pytest.raises(ValueError, match="cannot keep 4 of 2"):
        default.override(seeds=2, keep=4)
    with pytest.raises(ValueError, match="keep >= 2"):
        default.override(keep=1, ensemble="median")


# ----------------------------------------------------------------------------- known panels
class _GarbageModel:
    """Velocity = large nonsense; records (step input, t) through a debug callback."""

    def __init__(self, record):
        self.config, self.dtype, self.record = CFG, jnp.float32, record

    def __call__(self, inp, prompt, pooled, t, img_ids, txt_ids, guidance, hooks=None):
        jax.debug.callback(lambda x, tt: self.record.append((np.asarray(x), float(tt[0]))), inp[..., :C_LAT], t)
        return jnp.sin(inp[..., :C_LAT] * 13.0) * 50.0


def test_known_panels_are_the_exact_noisy_truth_at_every_step(conditioned, text, layout):
    cond, known = conditioned
    record = []
    s = sample(_GarbageModel(record), cond, known, text, jnp.array([5], jnp.uint32), layout, _plan("random", seeds=1))
    jax.block_until_ready(s.tokens)
    times = flux_schedule(T, mu=flux_mu(layout.num_tokens))
    assert [round(t, 6) for _, t in record] == [round(float(t), 6) for t in times[:-1]]
    eps = np.asarray(seed_noise(jnp.array([5], jnp.uint32), (layout.num_tokens, C_LAT), jnp.float32))[0]
    kn = np.asarray(known)
    bm = layout.bprime_tokens() > 0
    for x, t in record:
        np.testing.assert_allclose(x[:, ~bm], ((1 - t) * kn + t * eps)[:, ~bm], rtol=1e-6, atol=1e-6)
    assert np.abs(record[-1][0][:, bm] - record[0][0][:, bm]).max() > 1.0  # B' moved (garbage)
    # At t = 0 the known panels are the clean latents.
    np.testing.assert_array_equal(np.asarray(s.tokens[0])[:, ~bm], kn[:, ~bm])


@pytest.mark.parametrize("selection", ["random", "full", "early"])
def test_decoded_known_panels_equal_inputs_with_garbage_model(selection, model, ae, conditioned, canvases, text, layout):
    bad = nnx.clone(model)
    bad.final_proj.kernel[...] = bad.final_proj.kernel[...] * 1000.0  # velocity in the thousands
    cond, known = conditioned
    plan = {"random": _plan("random"), "full": _plan("full", keep=S), "early": _plan("early", keep=2)}[selection]
    s = run_sample(bad, cond, known, text, [0, 1, 2, 3], layout, plan)  # plans compiled by the tests above
    for tok in s.tokens:
        img = np.asarray(decode_tokens(ae, tok, layout))
        for p in range(3):  # A, A', B
            np.testing.assert_allclose(grid.split(img, PANEL)[p], grid.split(canvases, PANEL)[p], atol=1e-5)
        assert np.abs(grid.split(img, PANEL)[3]).max() > 10.0  # B' is the garbage model's


# ------------------------------------------------------------------------------ conditioning
def test_fill_condition_layout(ae, layout, canvases):
    cond, known = fill_condition(ae, jnp.asarray(canvases), layout)
    n = layout.num_tokens
    assert cond.shape == (3, n, C_LAT + 4 * AE**2) and known.shape == (3, n, C_LAT)
    bm = layout.bprime_tokens() > 0
    masked = canvases * (1.0 - grid.bprime_mask(PANEL)[None, :, :, None])
    np.testing.assert_array_equal(cond[..., :C_LAT], known)
    np.testing.assert_allclose(known, encode_tokens(ae, jnp.asarray(masked)), atol=1e-6)
    np.testing.assert_allclose(known[:, ~bm], encode_tokens(ae, jnp.asarray(canvases))[:, ~bm], atol=1e-6)
    assert not np.any(np.asarray(known)[:, bm])  # B' blanked (0 in [-1, 1])
    mask_part = np.asarray(cond[..., C_LAT:])
    np.testing.assert_array_equal(mask_part[:, bm], 1.0)
    np.testing.assert_array_equal(mask_part[:, ~bm], 0.0)
    np.testing.assert_array_equal(mask_part, grid.pack_mask(np.broadcast_to(grid.bprime_mask(PANEL), (3, 2 * PANEL, 2 * PANEL)), AE))


def test_in_channels_mismatch_is_an_error(ae, text):
    wrong = FluxTransformer(CFG.replace(in_channels=96), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="96 input channels.*gives 112"):
        Pipeline(wrong, ae, text, panel=PANEL)


# ------------------------------------------------------------------------------- checkpoints
def test_save_load_pico_round_trip(tmp_path, model, pipe):
    fancy = _plan("full", keep=3, layers=(0, -1), weights=(0.0, 1.0, 0.5, 0.0, 0.0))
    d = save_pico(tmp_path / "ck", model, panel=PANEL, autoencoder={"kind": "pixel", "factor": AE}, plan=fancy)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]  # no temp dir left
    assert load_pico(d).plan == fancy  # tuples survive JSON
    # Overwrite (atomic replace) with the plan `pipe` runs, and compare outputs.
    save_pico(d, model, panel=PANEL, autoencoder={"kind": "pixel", "factor": AE}, plan=pipe.plan)
    loaded = load_pico(d, batch_size=2)
    assert loaded.plan == pipe.plan and loaded.layout == pipe.layout
    a, a_out, q = _images(3, seed=9)
    want = pipe(a, a_out, [q])[0]
    got = loaded(a, a_out, [q])[0]
    np.testing.assert_array_equal(got.image, want.image)
    assert got.scores == want.scores and got.chosen_seed == want.chosen_seed
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]


def test_query_hint_round_trips_and_changes_the_result(tmp_path, model, pipe):
    d = save_pico(tmp_path / "ck", model, panel=PANEL, autoencoder={"kind": "pixel", "factor": AE}, plan=pipe.plan,
                  query_hint=True)
    hinted = load_pico(d, batch_size=2)
    assert hinted.layout == dataclasses.replace(pipe.layout, query_hint=True) and not pipe.layout.query_hint
    a, a_out, q = _images(3, seed=9)
    assert np.abs(hinted(a, a_out, [q])[0].image - pipe(a, a_out, [q])[0].image).max() > 1e-3


def _write_meta(d, **changes):
    meta = json.loads((d / "pico.json").read_text())
    for k, v in changes.items():
        if v is None:
            meta.pop(k)
        else:
            meta[k] = v
    (d / "pico.json").write_text(json.dumps(meta))


@pytest.mark.parametrize("change,match", [
    (dict(format="diffusers"), "'format' must be"),
    (dict(panel=None), r"missing key\(s\) \['panel'\]"),
    (dict(autoencoder=None), r"missing key\(s\) \['autoencoder'\]"),
    (dict(panel="big"), "invalid pico.json"),
    (dict(autoencoder={"kind": "magic"}), "autoencoder.kind"),
    (dict(autoencoder={"kind": "pixel"}), "inconsistent checkpoint"),
    (dict(autoencoder={"kind": "pixel", "factor": 4}), "input channels"),
    (dict(text={"kind": "prompt"}), "text.kind"),
    (dict(sampling={"steps": 4, "sede": 3}), "invalid pico.json"),
    (dict(sampling={"seeds": 2, "keep": 3}), "cannot keep 3 of 2"),
    (dict(sampling={"scorer": {"layers": [0, 7]}}), r"scorer layers \[7\] out of range"),
    (dict(dtype="float99"), "invalid pico.json"),
    (dict(query_hint="yes"), "query_hint must be true or false"),
    (dict(prediction="epsilon"), "prediction must be one of"),
])
def test_bad_pico_json_errors(tmp_path, model, change, match):
    d = save_pico(tmp_path / "ck", model, panel=PANEL, autoencoder={"kind": "pixel", "factor": AE})
    _write_meta(d, **change)
    with pytest.raises(CheckpointError, match=match) as e:
        load_pico(d)
    assert "pico.json" in str(e.value)


def test_not_a_pico_checkpoint(tmp_path, model):
    with pytest.raises(CheckpointError, match="not a pico checkpoint"):
        load_pico(tmp_path)
    (tmp_path / "pico.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_pico(tmp_path)
    (tmp_path / "pico.json").write_text("[1, 2]")
    with pytest.raises(CheckpointError, match="'format' must be"):
        load_pico(tmp_path)
    d = save_pico(tmp_path / "ck", model, panel=PANEL, autoencoder={"kind": "pixel", "factor": AE})
    shutil.rmtree(d / "transformer")
    with pytest.raises(CheckpointError, match="transformer"):
        load_pico(d)


# ------------------------------------------------------------------------ x0-residual prediction
def test_residual_base_puts_the_query_tokens_at_the_bprime_positions(layout, conditioned):
    _, known = conditioned
    idx = grid.panel_token_indices(*layout.tokens_hw)
    base = np.asarray(layout.residual_base(known))
    np.testing.assert_array_equal(base[:, idx[3]], np.asarray(known)[:, idx[2]])
    for p in range(3):
        np.testing.assert_array_equal(base[:, idx[p]], np.asarray(known)[:, idx[p]])


def test_x0_residual_velocity_lands_on_base_plus_output():
    from pico_jax.flow import velocity_from_output

    rng = np.random.default_rng(0)
    xt, base, out = (jnp.asarray(rng.standard_normal((2, 5, 3)), jnp.float32) for _ in range(3))
    t = jnp.asarray([0.7, 0.2])
    v = velocity_from_output(out, xt, t, base, "x0_residual")
    # one Euler step from t to 0 is x_t - t·v = x̂0 = base + out, for each example's own t
    np.testing.assert_allclose(xt - t[:, None, None] * v, base + out, rtol=1e-5, atol=1e-5)
    assert velocity_from_output(out, xt, t, base, "velocity") is out
    with pytest.raises(ValueError, match="prediction must be one of"):
        velocity_from_output(out, xt, t, base, "eps")


def test_zero_residual_model_paints_exactly_the_query(tmp_path, ae, text):
    """A zero-output x0_residual model means 'B' = B': every schedule ends on B exactly, which is
    why a fresh residual model starts at the copy-B baseline (trainer zero-initialises it)."""
    from pico_jax.trainer import TrainConfig, build_model

    zero = build_model(TrainConfig(model=CFG, prediction="x0_residual"))
    assert not np.any(np.asarray(zero.final_proj.kernel[...]))
    d = save_pico(tmp_path / "ck", zero, panel=PANEL, autoencoder={"kind": "pixel", "factor": AE},
                  plan=SamplingPlan(steps=T, seeds=2, keep=1, selection="early"), prediction="x0_residual")
    pipe = load_pico(d, batch_size=1)
    assert pipe.layout.prediction == "x0_residual"
    a, a_out, q = _images(3, seed=4)
    np.testing.assert_allclose(pipe(a, a_out, [q])[0].image, q, atol=1e-5)


# ------------------------------------------------------------------------------ consensus scorer
def test_consensus_scores_prefer_the_seed_nearest_the_mean():
    from pico_jax.scorer import consensus_scores

    x = np.zeros((4, 2, 3, 5), np.float32)  # (S, B, n, C)
    x[1] += 0.1
    x[2] -= 0.1
    x[3, 0] += 3.0  # an outlier in query 0 only
    s = np.asarray(consensus_scores(jnp.asarray(x)))
    assert s.shape == (4, 2)
    assert np.argmin(s[:, 0]) == 3 and np.argmax(s[:, 0]) in (0, 1, 2)
    np.testing.assert_allclose(s[:, 1], -np.mean(np.square(x[:, 1] - x[:, 1].mean(0)), axis=(1, 2)), rtol=1e-6)


@pytest.mark.parametrize("selection", ["early", "full"])
def test_consensus_selection_scores_the_clean_estimates(selection, model, conditioned, text, layout):
    """The consensus score of each seed is recomputed by hand from its trajectory: x̂0 = x_t - t·v of
    the B' tokens at the last scored step; the chosen seed is the best and its trajectory is the
    full run's."""
    from pico_jax.flow import flux_mu, flux_schedule
    from pico_jax.scorer import consensus_scores

    cond, known = conditioned
    seeds = [0, 1, 2, 3]
    plan = _plan(selection, keep=1, signal="consensus")
    got = run_sample(model, cond, known, text, seeds, layout, plan)
    n = cond.shape[1]
    times = flux_schedule(T, mu=flux_mu(n))
    last = K - 1 if selection == "early" else T - 1
    bmask = jnp.asarray(layout.bprime_tokens())[None, :, None]
    bidx = grid.panel_token_indices(*layout.tokens_hw)[3]
    x0_hats = []
    for s in seeds:
        eps = seed_noise(jnp.asarray([s], jnp.uint32), (n, C_LAT), jnp.float32)[0]
        x = jnp.broadcast_to(eps, known.shape)
        for i in range(last + 1):
            t = times[i]
            x = jnp.where(bmask > 0, x, (1 - t) * known + t * eps)
            v = model(jnp.concatenate([x, cond], -1), jnp.broadcast_to(text.prompt_embeds, (3, 1, CFG.context_dim)),
                      jnp.broadcast_to(text.pooled, (3, CFG.pooled_dim)), jnp.full((3,), t), jnp.asarray(layout.img_ids()),
                      jnp.zeros((1, 3)), None)
            if i == last:
                x0_hats.append((x - t * v)[:, bidx])
            x = x + (times[i + 1] - t) * v
    want = consensus_scores(jnp.stack(x0_hats))
    np.testing.assert_allclose(got.scores, want, rtol=1e-4, atol=1e-6)
    np.testing.assert_array_equal(got.chosen[0], np.argmax(np.asarray(want), axis=0))


def test_scorer_from_name():
    from pico_jax.scorer import scorer_from_name

    base = ScorerConfig(steps=3, layers=(0,))
    assert scorer_from_name(base, "consensus") == ScorerConfig(steps=3, layers=(0,), signal="consensus")
    assert scorer_from_name(base, "focus").weights == "focus"
    with pytest.raises(ValueError, match="unknown scorer 'best'"):
        scorer_from_name(base, "best")
    with pytest.raises(ValueError, match="scorer signal must be one of"):
        ScorerConfig(signal="vibes")
