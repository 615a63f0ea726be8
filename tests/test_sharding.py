"""Full-size FLUX.1 traces, shards and compiles on 8 simulated CPU devices without allocating it;
a tiny model gives the same output sharded as on one device."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from pico_jax.model.flux import FluxConfig, FluxTransformer, abstract_model
from pico_jax.parallel import (
    MeshError,
    batch_sharding,
    make_mesh,
    parse_mesh_spec,
    replicated,
    shard_state,
    spec_for,
    state_shardings,
)

S = jax.ShapeDtypeStruct


def _abstract_inputs(cfg, b, n, t, dtype=jnp.bfloat16):
    return (
        S((b, n, cfg.in_channels), dtype),
        S((b, t, cfg.context_dim), dtype),
        S((b, cfg.pooled_dim), dtype),
        S((b,), jnp.float32),
        S((n, 3), jnp.float32),
        S((t, 3), jnp.float32),
        S((b,), jnp.float32) if cfg.guidance_embeds else None,
    )


def _sharded_forward(cfg, mesh_spec, b=8, n=256, t=64, traced_on_mesh=False):
    """The full-size forward, lowered for the mesh; traced_on_mesh: under it as the context mesh
    (`parallel.on_mesh`, as the trainer and the pipeline trace), which gathers each layer over fsdp."""
    from pico_jax.parallel import on_mesh

    model = abstract_model(cfg)
    graphdef, state = nnx.split(model)
    mesh = make_mesh(mesh_spec)

    def fwd(state, *args):
        return nnx.merge(graphdef, state)(*args)

    bs = lambda nd: batch_sharding(mesh, nd)
    ins = (state_shardings(state, mesh), bs(3), bs(3), bs(2), bs(1), replicated(mesh), replicated(mesh), bs(1))
    jitted = jax.jit(fwd, in_shardings=ins)
    return (on_mesh(jitted, mesh) if traced_on_mesh else jitted).lower(state, *_abstract_inputs(cfg, b, n, t))


def test_flux1_dev_compiles_sharded_on_8_devices():
    assert len(jax.devices()) == 8
    compiled = _sharded_forward(FluxConfig.flux1_dev(remat="full"), "fsdp=4,tensor=2").compile()
    per_device = compiled.memory_analysis().argument_size_in_bytes
    total_bf16 = 11_901_408_320 * 2
    # Parameters dominate the arguments; each device holds about 1/8 of them.
    assert total_bf16 / 8 <= per_device < total_bf16 / 8 * 1.05


def _is_modulation(key_path) -> bool:
    return "'mod'" in jax.tree_util.keystr(key_path)


def _stacked_bytes(state) -> tuple[int, int]:
    """Bytes of the scanned stacks' parameters, and of those the layer scan gathers over fsdp:
    all but the modulation kernels (`flux.layer_modulations` multiplies those before the scan)."""
    leaves = [(k, v.size * v.dtype.itemsize) for k, v in jax.tree.leaves_with_path(state)
              if "blocks" in jax.tree_util.keystr(k)]
    return sum(n for _, n in leaves), sum(n for k, n in leaves if not _is_modulation(k))


def test_fsdp_gathers_each_layers_weights_not_the_activations():
    """Over data x fsdp, the full-size forward traced under the mesh (parallel.on_mesh) all-gathers each
    scanned layer's token-wise weights once, and not its modulation kernels (27 % of FLUX.1's
    parameters): every layer's modulation is computed before the scan on each device's rows of
    those kernels, and only the partial (layers, batch, width) results are all-reduced. Left alone,
    XLA's partitioner gathered the activations over 'fsdp' and all-reduced every product's fp32
    output (84 GiB per device); given the stacked modulation kernels, it gathered them whole in fp32."""
    from pico_jax.parallel import collective_bytes

    cfg = FluxConfig.flux1_fill_dev(remat="full")
    b = 8
    compiled = _sharded_forward(cfg, "data=2,fsdp=4", b, 1024, 64, traced_on_mesh=True).compile()
    moved = collective_bytes(compiled.as_text())
    state = nnx.state(abstract_model(cfg))
    stacked, token_wise = _stacked_bytes(state)
    assert 0.7 * stacked < token_wise < 0.75 * stacked  # the modulation kernels: 27 %
    assert token_wise * 0.99 <= moved.get("all-gather", 0) <= token_wise * 1.05, (moved, token_wise)
    # the modulations' partial sums, fp32: (layers, batch, out) of every stack, for each of the
    # two copies of the batch a bf16 product takes on CPU (`flux.layer_modulations`)
    kernels = [v for k, v in jax.tree.leaves_with_path(state) if _is_modulation(k) and "'kernel']" in jax.tree_util.keystr(k)]
    partial_sums = 2 * 4 * b * sum(v.shape[0] * v.shape[-1] for v in kernels)
    assert moved.get("all-reduce", 0) <= 1.1 * partial_sums < 0.005 * stacked, (moved, partial_sums)
    assert compiled.memory_analysis().temp_size_in_bytes < 1.5 * 2**30  # 3.1 GiB without the gather


def test_fsdp_with_remat_none_gathers_again_instead_of_keeping_the_gathered_weights():
    """A LoRA gradient over fsdp=8 with remat "none": the backward gathers each layer's weights again
    (parallel.save_all_but_gathered_weights). Before, autodiff kept every layer's gathered weights
    as residuals: 3.39 GiB of temporaries against 2.32 GiB of stacked weights here, gathered once."""
    from pico_jax.model.lora import add_lora
    from pico_jax.parallel import collective_bytes, on_mesh

    cfg = FluxConfig.flux1_dev(num_double=2, num_single=4, remat="none")
    model = abstract_model(cfg)
    add_lora(model, 16)
    graphdef, lora, base = nnx.split(model, nnx.LoRAParam, ...)
    mesh = make_mesh("fsdp=8")

    def loss(lora, base, *args):
        *inputs, target = args
        return jnp.mean((nnx.merge(graphdef, lora, base)(*inputs).astype(jnp.float32) - target) ** 2)

    bs = lambda nd: batch_sharding(mesh, nd)
    grad = jax.jit(jax.grad(loss), in_shardings=(state_shardings(lora, mesh), state_shardings(base, mesh), bs(3), bs(3),
                                                 bs(2), bs(1), replicated(mesh), replicated(mesh), bs(1), bs(3)))
    b, n = 8, 1024
    compiled = on_mesh(grad, mesh).lower(lora, base, *_abstract_inputs(cfg, b, n, 64),
                                         S((b, n, cfg.output_channels), jnp.float32)).compile()
    stacked, token_wise = _stacked_bytes(base)
    # forward and backward (the modulation kernels are not gathered: `flux.layer_modulations`)
    assert collective_bytes(compiled.as_text())["all-gather"] > 1.5 * token_wise
    assert compiled.memory_analysis().temp_size_in_bytes < 0.9 * stacked  # 1.77 GiB; 3.39 before


def test_a_whole_bf16_model_gathered_at_once_moves_its_bf16_bytes():
    """fsdp_gather_model (the sampler's gather_weights="per_call") of FLUX.1-dev-width bf16 weights
    over fsdp=8 gathers their bf16 bytes once. XLA:CPU widened a bf16 all-gather to fp32: twice the
    bytes, and an fp32 copy of the model planned beside the bf16 one (2.6 GiB of temporaries here)."""
    from pico_jax.parallel import collective_bytes, fsdp_gather_model, on_mesh

    state = nnx.state(abstract_model(FluxConfig.flux1_dev(num_double=1, num_single=1)))
    mesh = make_mesh("fsdp=8")
    weights = sum(v.size * v.dtype.itemsize for v in jax.tree.leaves(state))

    def sums(state):  # every gathered leaf read whole, so nothing can be gathered later or partially
        return jax.tree.map(lambda x: jnp.sum(x.astype(jnp.float32) ** 2), fsdp_gather_model(state, jnp.bfloat16))

    compiled = on_mesh(jax.jit(sums, in_shardings=(state_shardings(state, mesh),)), mesh).lower(state).compile()
    assert 0.9 * weights < collective_bytes(compiled.as_text())["all-gather"] <= 1.05 * weights
    assert compiled.memory_analysis().temp_size_in_bytes < 1.5 * weights


def test_tensor_parallelism_moves_only_megatrons_all_reduces():
    """Over 'tensor' alone, the full-size forward moves what Megatron-style tensor parallelism must:
    each row-parallel product's output reduced once (XLA:CPU writes it as an all-reduce plus an
    all-gather of the same size), nothing reshuffled. With BFL's [q | k | v | mlp] column order
    the fused outputs were split across heads: 24.6 GiB all-gathered and 10.9 GiB permuted here."""
    from pico_jax.parallel import collective_bytes

    cfg = FluxConfig.flux1_dev(remat="full")
    b, n, t = 8, 1024, 64
    compiled = _sharded_forward(cfg, "tensor=8", b, n, t, traced_on_mesh=True).compile()
    moved = collective_bytes(compiled.as_text())
    # Row-parallel products: proj and mlp_out of both streams per double block, linear2 per single block.
    needed = (2 * cfg.num_double * b * (n + t) + cfg.num_single * b * (n + t)) * cfg.width * 4
    assert needed <= moved["all-reduce"] <= 1.01 * needed, (moved, needed)
    assert moved.get("all-gather", 0) <= 1.01 * needed, (moved, needed)
    reshuffled = moved.get("collective-permute", 0) + moved.get("all-to-all", 0)
    assert reshuffled < 0.01 * needed, moved  # the modulation vectors' split, a few MiB


@pytest.mark.parametrize("kind", ["qkv", "linear1", "linear2"])
def test_fused_order_gives_every_tensor_shard_whole_heads(kind):
    """Split our fused axis into t contiguous shards (what NamedSharding does over 'tensor'): each
    shard holds, for H / t heads, exactly those heads' q, k, v (and MLP share) columns."""
    from pico_jax.model.flux import fused_order

    cfg = FluxConfig.flux1_dev()
    H, hd, D, M = cfg.num_heads, cfg.head_dim, cfg.width, cfg.mlp_width
    order = fused_order(cfg, kind)
    assert sorted(order) == list(range(len(order)))  # a permutation of the checkpoint's axis

    def head_of(i):  # checkpoint index → (part, head)
        if kind == "linear2":
            return ("attn", i // hd) if i < D else ("mlp", (i - D) // (M // H))
        return (("q", "k", "v")[i // D], i % D // hd) if i < 3 * D else ("mlp", (i - 3 * D) // (M // H))

    for t in (2, 3, 8, 24):
        for shard in np.split(order, t):
            parts = {}
            for i in shard:
                part, head = head_of(int(i))
                parts.setdefault(part, set()).add(head)
            heads = set.union(*parts.values())
            assert len(heads) == H // t and all(p == heads for p in parts.values()), (kind, t, parts)


def test_head_loops_on_a_tensor_mesh_equal_one_device():
    """Traced under a tensor=4 context mesh the head-by-head kernels loop over each device's own heads
    (`map_heads`); outputs, gradients and hook statistics equal the plain loop's."""
    from pico_jax.model.attention import AttentionHooks, explicit_attention, head_groups, headwise_attention
    from pico_jax.parallel import on_mesh

    g = np.random.default_rng(0)
    q, k, v = (jnp.asarray(g.standard_normal((2, 12, 8, 16)), jnp.float32) for _ in range(3))
    hooks = AttentionHooks.make(np.arange(12) % 3, num_layers=1, num_groups=3, capture_layers=[0],
                                logit_bias=g.standard_normal((3, 3)))

    def run(q, k, v):
        loss = lambda q, k, v: jnp.sum(headwise_attention(q, k, v) ** 2)
        out, stats = explicit_attention(q, k, v, hooks, True, True)
        return headwise_attention(q, k, v), jax.grad(loss, (0, 1, 2))(q, k, v), out, stats, head_groups(8)

    *want, groups = jax.jit(run)(q, k, v)
    mesh = make_mesh("data=2,tensor=4")
    heads = jax.NamedSharding(mesh, jax.P(None, None, "tensor", None))
    *got, groups_on_mesh = on_mesh(jax.jit(run), mesh)(*(jax.device_put(x, heads) for x in (q, k, v)))
    assert int(groups) == 1 and int(groups_on_mesh) == 4
    for w, o in zip(jax.tree.leaves(want), jax.tree.leaves(got)):
        np.testing.assert_allclose(np.asarray(o), np.asarray(w), rtol=1e-5, atol=1e-6)


def test_a_tensor_size_that_cuts_through_heads_warns():
    from pico_jax.parallel import shard_module

    cfg = FluxConfig(num_double=1, num_single=1, num_heads=2, head_dim=16, axes_dims_rope=(4, 6, 6),
                     in_channels=16, context_dim=32, pooled_dim=16)
    with pytest.warns(UserWarning, match="tensor=4 does not divide FluxTransformer's 2 heads"):
        shard_module(FluxTransformer(cfg, rngs=nnx.Rngs(0)), make_mesh("data=2,tensor=4"))


def test_collective_bytes_counts_loops_by_trip_count_and_the_costliest_branch():
    from pico_jax.parallel import collective_bytes

    hlo = """HloModule m

%branch_a (p: f32[4]) -> f32[4] {
  %p = f32[4]{0} parameter(0)
  ROOT %ag = f32[4]{0} all-gather(f32[1]{0} %p), dimensions={0}
}

%branch_b (p: f32[4]) -> f32[4] {
  ROOT %p = f32[4]{0} parameter(0)
}

%body (t: (s32[], f32[4,4])) -> (s32[], f32[4,4]) {
  %t = (s32[], f32[4,4]{1,0}) parameter(0)
  %ar = f32[4,4]{1,0} all-reduce(f32[4,4]{1,0} %x), to_apply=%add
  %c = f32[4]{0} conditional(s32[] %i, f32[4]{0} %y, f32[4]{0} %y), branch_computations={%branch_a, %branch_b}
  %f = bf16[8]{0} fusion(%z), kind=kLoop, calls=%fused
}

%fused (q: bf16[8]) -> bf16[8] {
  ROOT %cp = bf16[8]{0} collective-permute(bf16[8]{0} %q), source_target_pairs={{0,1}}
}

ENTRY %main (a: f32[4,4]) -> f32[4,4] {
  %w = (s32[], f32[4,4]{1,0}) while(%init), condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"3"}}
  %w2 = (s32[], f32[4,4]{1,0}) while(%init), condition=%cond, body=%body
  %big = (f32[1]{0}, f32[1]{0}, f32[1]{0}, f32[1]{0}, f32[1]{0}, /*index=5*/f32[100]{0}) all-reduce(%a, %b, %c, %d, %e, /*index=5*/%f), to_apply=%add
  ROOT %rs = (bf16[2,2]{1,0}, f32[2]{0}) reduce-scatter(%a, %b), dimensions={0}
}
"""
    got = collective_bytes(hlo)
    # A combined all-reduce of six arrays counts whole (XLA marks the sixth with /*index=5*/).
    assert got == {"all-reduce": 64 * 4 + 105 * 4, "all-gather": 16 * 4, "collective-permute": 16 * 4,
                   "reduce-scatter": 8 + 8, "loops of unknown trip count": 1}


def test_flux1_fill_dev_lowers_sharded():
    text = _sharded_forward(FluxConfig.flux1_fill_dev(), "data=2,fsdp=4").as_text()
    assert "sharding" in text


def test_rules_shard_the_big_matrices():
    mesh = make_mesh("fsdp=4,tensor=2")
    assert spec_for("double_blocks.img.qkv.kernel", (19, 3072, 9216), mesh) == jax.P(None, "fsdp", "tensor")
    assert spec_for("single_blocks.linear2.kernel", (38, 15360, 3072), mesh) == jax.P(None, "tensor", "fsdp")
    assert spec_for("img_in.kernel", (64, 3072), mesh) == jax.P("fsdp", "tensor")
    # A dimension the mesh axis does not divide is replicated, not an error.
    assert spec_for("img_in.kernel", (6, 3072), mesh) == jax.P(None, "tensor")
    assert spec_for("single_blocks.q_norm.scale", (38, 128), mesh) == jax.P(None, None)


def test_lora_factors_split_like_their_kernel_and_over_fsdp_too():
    """A LoRA factor keeps its kernel's axis on its side (A (in, r), B (r, out)); the side that
    'tensor' splits is split over 'fsdp' as well, dropping 'fsdp' first where both do not divide."""
    from pico_jax.parallel import without_fsdp

    mesh = make_mesh("fsdp=4,tensor=2")
    both = ("tensor", "fsdp")
    # Column-parallel (qkv: kernel (embed, mlp)): A along the width over fsdp, B's outputs over both.
    assert spec_for("double_blocks.img.qkv.lora_a", (19, 3072, 32), mesh) == jax.P(None, "fsdp", None)
    assert spec_for("double_blocks.img.qkv.lora_b", (19, 32, 9216), mesh) == jax.P(None, None, both)
    # Row-parallel (linear2: kernel (mlp, embed)): A along the contracted width over both, B's outputs over fsdp.
    assert spec_for("single_blocks.linear2.lora_a", (38, 15360, 32), mesh) == jax.P(None, both, None)
    assert spec_for("single_blocks.linear2.lora_b", (38, 32, 3072), mesh) == jax.P(None, None, "fsdp")
    assert spec_for("single_blocks.linear2.lora_b", (38, 32, 6), mesh) == jax.P(None, None, None)
    assert spec_for("img_in.lora_b", (32, 6), mesh) == jax.P(None, "tensor")  # 8 does not divide 6, 2 does
    assert spec_for("img_in.lora_b", (32, 3072), make_mesh("fsdp=8")) == jax.P(None, "fsdp")
    # Gathered over fsdp (the layer scan's gather), each lands on its kernel's tensor split.
    assert without_fsdp(jax.P(None, both, None)) == jax.P(None, "tensor", None)
    assert without_fsdp(jax.P(None, None, "fsdp")) == jax.P(None, None, None)
    assert without_fsdp(jax.P(("data", "fsdp"), "tensor")) == jax.P("data", "tensor")


@pytest.mark.parametrize("mesh_spec", ["fsdp=8", "fsdp=4,tensor=2"])
def test_flux1_dev_lora_factors_are_split_over_fsdp(mesh_spec):
    """Every factor of FLUX.1-dev's rank-32 LoRA (so its gradient and Adam moments) is split over
    'fsdp': on fsdp=8 each device holds exactly 1/8. Before, every B (57 % of the factors) was
    whole on every fsdp device: 5.0x the share on fsdp=8, and on
    fsdp=4,tensor=2 3.1/8 of the factors per device (now 1.2/8: A of a column-parallel kernel and B
    of a row-parallel one are whole over 'tensor', as Megatron has them)."""
    from pico_jax.model.lora import add_lora

    model = abstract_model(FluxConfig.flux1_dev())
    add_lora(model, 32)
    lora = nnx.state(model, nnx.LoRAParam)
    mesh = make_mesh(mesh_spec)
    leaves = jax.tree.leaves(lora)
    total = sum(v.size for v in leaves)
    per_device = sum(int(np.prod(s.shard_shape(v.shape))) for v, s in zip(leaves, jax.tree.leaves(state_shardings(lora, mesh))))
    assert total > 100e6
    assert per_device <= total / mesh.shape["fsdp"], (per_device, total)
    if mesh.shape["fsdp"] == 8:
        assert per_device == total // 8, (per_device, total)


def test_fp32_master_weights_are_gathered_in_the_compute_dtype(tmp_path):
    """fp32 parameters under bf16 compute (the trainer's master weights) are cast before the layer
    scan's fsdp gather, as the layers would cast them after it: XLA's SPMD partitioner then gathers
    bf16. (Read after partitioning: XLA:CPU later widens bf16 collectives to fp32.) Without the
    cast, or with it but no barrier (the partitioner moved the gather above the convert), the
    gathers were 86 % fp32 bytes here. With the cast, 22 % remained: gradients that autodiff's
    transpose of the gather had XLA compute on another layout and gather in fp32. The gather's own
    gradient rule now sends them straight to their shards; the only fp32 gather left is the
    batch's 8 timesteps."""
    import glob
    import re

    from pico_jax.parallel import on_mesh

    cfg = FluxConfig(num_double=1, num_single=1, num_heads=2, head_dim=64, axes_dims_rope=(16, 24, 24),
                     in_channels=64, context_dim=64, pooled_dim=64, remat="full")
    graphdef, params = nnx.split(abstract_model(cfg, dtype=jnp.bfloat16, param_dtype=jnp.float32), nnx.Param)
    mesh = make_mesh("fsdp=8")

    def loss(p, *args):
        *inputs, target = args
        return jnp.mean((nnx.merge(graphdef, p)(*inputs).astype(jnp.float32) - target) ** 2)

    bs = lambda nd: batch_sharding(mesh, nd)
    grad = jax.jit(jax.grad(loss), in_shardings=(state_shardings(params, mesh), bs(3), bs(3), bs(2), bs(1),
                                                 replicated(mesh), replicated(mesh), bs(1), bs(3)))
    b, n = 8, 64
    lowered = on_mesh(grad, mesh).lower(params, *_abstract_inputs(cfg, b, n, 8),
                                        S((b, n, cfg.output_channels), jnp.float32))
    # A hit in the suite's persistent cache would compile nothing and dump nothing (the cache key
    # leaves the dump options out), so this program is never written to it.
    min_time = jax.config.jax_persistent_cache_min_compile_time_secs
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1e9)
    try:
        lowered.compile(compiler_options={"xla_dump_to": str(tmp_path), "xla_dump_hlo_pass_re": "spmd-partitioning"})
    finally:
        jax.config.update("jax_persistent_cache_min_compile_time_secs", min_time)
    (partitioned,) = glob.glob(str(tmp_path / "*after_spmd-partitioning*.txt"))
    gathered = {"bf16": 0, "f32": 0}
    for dtype, shape in re.findall(r"= (bf16|f32)\[([\d,]+)\]\S* all-gather\(", open(partitioned).read()):
        gathered[dtype] += int(np.prod([int(d) for d in shape.split(",")])) * (2 if dtype == "bf16" else 4)
    assert gathered["bf16"] > 1000 * gathered["f32"], gathered


def test_t5_xxl_and_clip_l_compile_sharded_on_8_devices():
    """The text encoders at full size shard by the same rules: each device holds about 1/8 of T5-XXL."""
    from pico_jax.model.clip import CLIPTextConfig, abstract_clip_text_encoder
    from pico_jax.model.t5 import T5Config, abstract_t5_encoder, param_count

    mesh = make_mesh("fsdp=4,tensor=2")
    for model, length in ((abstract_t5_encoder(T5Config(), dtype=jnp.bfloat16), 512),
                          (abstract_clip_text_encoder(CLIPTextConfig(), dtype=jnp.bfloat16), 77)):
        graphdef, state = nnx.split(model)
        fwd = jax.jit(lambda s, ids: nnx.merge(graphdef, s)(ids),
                      in_shardings=(state_shardings(state, mesh), replicated(mesh)))
        compiled = fwd.lower(state, S((8, length), jnp.int32)).compile()
        per_device = compiled.memory_analysis().argument_size_in_bytes
        total = sum(v.size * v.dtype.itemsize for v in jax.tree.leaves(state))
        assert total >= 2 * param_count(model) - 1e6  # bf16 weights (norms and T5's bias table are fp32)
        assert total / 8 <= per_device < total / 8 * 1.05, (type(model).__name__, per_device, total)


def test_mesh_spec_parsing_and_errors():
    assert parse_mesh_spec("data=2,fsdp=4", 8) == {"data": 2, "fsdp": 4, "tensor": 1}
    assert parse_mesh_spec("data=2", 8) == {"data": 2, "fsdp": 4, "tensor": 1}
    assert parse_mesh_spec(None, 8) == {"data": 1, "fsdp": 8, "tensor": 1}
    with pytest.raises(MeshError, match="does not divide"):
        parse_mesh_spec("data=3", 8)
    with pytest.raises(MeshError, match="could not read 'dp=2'"):
        parse_mesh_spec("dp=2", 8)
    with pytest.raises(MeshError, match="idle"):
        parse_mesh_spec("data=2,fsdp=2,tensor=1", 8)


@pytest.mark.parametrize("spec", ["data=8", "fsdp=8", "data=2,fsdp=4", "fsdp=4,tensor=2"])
def test_tiny_model_sharded_equals_single_device(spec):
    cfg = FluxConfig(num_double=1, num_single=2, num_heads=2, head_dim=16, axes_dims_rope=(4, 6, 6),
                     in_channels=16, context_dim=32, pooled_dim=16)
    model = FluxTransformer(cfg, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    g = np.random.default_rng(0)
    args = (g.standard_normal((8, 16, 16), np.float32), g.standard_normal((8, 4, 32), np.float32),
            g.standard_normal((8, 16), np.float32), g.uniform(size=8).astype(np.float32),
            np.zeros((16, 3), np.float32), np.zeros((4, 3), np.float32), np.full(8, 2.0, np.float32))
    fwd = jax.jit(lambda st, *a: nnx.merge(graphdef, st)(*a))
    want = fwd(state, *args)
    mesh = make_mesh(spec)
    sharded = shard_state(state, mesh)
    placed = [jax.device_put(a, batch_sharding(mesh, a.ndim)) if a.shape[0] == 8 else a for a in args]
    got = fwd(sharded, *placed)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
