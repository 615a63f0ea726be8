"""Attention hooks: capture returns the documented statistic, an identity edit changes nothing,
a real edit changes exactly the targeted logit block; all inside scan, under jit and vmap."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from pico_jax.grid import panel_token_indices, token_groups
from pico_jax.model.attention import AttentionHooks, Clone, _edit_logits, attention
from pico_jax.model.flux import FluxConfig, FluxTransformer

GROUPS = np.array([0, 0, 1, 1, 2, 2, 3, 3, 4, 4], np.int32)  # text, A, A', B, B' — two tokens each


def _softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def test_capture_on_hand_built_pattern():
    n, h, d = len(GROUPS), 2, 4
    q = np.zeros((1, n, h, d), np.float32)
    k = np.zeros((1, n, h, d), np.float32)
    v = np.random.default_rng(0).standard_normal((1, n, h, d)).astype(np.float32)
    q[0, GROUPS == 4, 0, 0] = 6.0  # head 0: B' queries look for keys with a 1 in channel 0 ...
    k[0, GROUPS == 1, 0, 0] = 1.0  # ... which only A keys have.
    q[0, GROUPS == 4, 1, 1] = 4.0  # head 1: B' queries look at A' keys.
    k[0, GROUPS == 2, 1, 1] = 1.0
    hooks = AttentionHooks.make(GROUPS, num_layers=1, num_groups=5, capture_layers=[0])
    out, (mass, key_map) = attention(q, k, v, hooks, capture_on=True, edit_on=False)

    probs = _softmax(np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(d))  # (1, H, N, N)
    onehot = np.eye(5)[GROUPS]
    want_key_map = np.stack([probs[0, :, GROUPS == g].mean(axis=(0, 1)) for g in range(5)])  # (G, N)
    want_mass = want_key_map @ onehot
    np.testing.assert_allclose(key_map[0], want_key_map, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(mass[0], want_mass, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(mass[0].sum(-1), 1.0, rtol=1e-5)
    # The pattern is visible: B' spends (e^3 / (2 e^3 + 8) per A token on head 0 ...) most mass on A and A'.
    a_mass = (2 * np.exp(3.0) / (2 * np.exp(3.0) + 8) + 2 / (2 * np.exp(2.0) + 8)) / 2
    assert mass[0, 4, 1] == pytest.approx(a_mass, rel=1e-5)
    assert mass[0, 4, 1] > 0.5 * (1 - mass[0, 4, 2]) and mass[0, 4, 3] < 0.1
    # Output equals plain attention.
    np.testing.assert_allclose(out, attention(q, k, v)[0], rtol=1e-5, atol=1e-6)
    # Not captured → zeros.
    _, (mass0, key0) = attention(q, k, v, hooks, capture_on=False, edit_on=False)
    assert not np.any(mass0) and not np.any(key0)


def test_edit_logits_changes_exactly_the_target_block():
    n = len(GROUPS)
    panels = np.array([[2, 3], [4, 5], [6, 7], [8, 9]], np.int32)  # token indices of A, A', B, B'
    logits = jnp.asarray(np.random.default_rng(1).standard_normal((1, n, n)), jnp.float32)
    hooks = AttentionHooks.make(GROUPS, 1, 5, edit_layers=[0], panel_tokens=panels,
                                clones=[Clone(3, 1, 2, 0)], clone_scale=1.3)  # B'→A' := 1.3 (B→A)
    edited = np.asarray(_edit_logits(logits, hooks))
    l = np.asarray(logits)
    changed = np.zeros((n, n), bool)
    changed[np.ix_(panels[3], panels[1])] = True
    np.testing.assert_array_equal(edited[0][~changed], l[0][~changed])
    np.testing.assert_allclose(edited[0][np.ix_(panels[3], panels[1])], 1.3 * l[0][np.ix_(panels[2], panels[0])], rtol=1e-6)

    bias = np.zeros((5, 5), np.float32)
    bias[4, 0] = -5.0  # B' queries pay less attention to text
    hb = AttentionHooks.make(GROUPS, 1, 5, edit_layers=[0], logit_bias=bias)
    eb = np.asarray(_edit_logits(logits, hb))
    mask = (GROUPS[:, None] == 4) & (GROUPS[None, :] == 0)
    np.testing.assert_allclose(eb[0][mask], l[0][mask] - 5.0, rtol=1e-6)
    np.testing.assert_array_equal(eb[0][~mask], l[0][~mask])


def _tiny(n_double=2, n_single=2):
    cfg = FluxConfig(num_double=n_double, num_single=n_single, num_heads=2, head_dim=16, axes_dims_rope=(4, 6, 6),
                     in_channels=16, context_dim=24, pooled_dim=8)
    return FluxTransformer(cfg, rngs=nnx.Rngs(0))


def _inputs(b=2, hw=4, t=4, seed=0):
    g = np.random.default_rng(seed)
    n = hw * hw
    ids = np.stack(np.meshgrid(np.arange(hw), np.arange(hw), indexing="ij"), -1).reshape(-1, 2)
    return dict(hidden_states=g.standard_normal((b, n, 16)).astype(np.float32),
                encoder_hidden_states=g.standard_normal((b, t, 24)).astype(np.float32),
                pooled_projections=g.standard_normal((b, 8)).astype(np.float32),
                timestep=np.full(b, 0.7, np.float32),
                img_ids=np.concatenate([np.zeros((n, 1)), ids], 1).astype(np.float32),
                txt_ids=np.zeros((t, 3), np.float32), guidance=np.full(b, 3.0, np.float32))


def _canvas_hooks(model, **kw):
    t, hw = 4, 4
    groups = token_groups(t, hw, hw)
    panels = panel_token_indices(hw, hw) + t
    return AttentionHooks.make(groups, model.config.num_layers, 5, panel_tokens=panels, **kw)


def test_model_capture_and_identity_edit_leave_output_unchanged():
    model = _tiny()
    x = _inputs()
    graphdef, state = nnx.split(model)
    fwd = jax.jit(lambda st, hooks, x: nnx.merge(graphdef, st)(**x, hooks=hooks))
    plain = jax.jit(lambda st, x: nnx.merge(graphdef, st)(**x))(state, x)
    hooks = _canvas_hooks(model, capture_layers=[1, 3], edit_layers=[0, 1, 2, 3],
                          clones=[Clone(3, 1, 3, 1)], clone_scale=1.0, logit_bias=np.zeros((5, 5)))
    out, cap = fwd(state, hooks, x)
    np.testing.assert_allclose(out, plain, rtol=1e-5, atol=1e-5)
    assert cap.group_mass.shape == (4, 2, 5, 5) and cap.key_map.shape == (4, 2, 5, 4 + 16)
    np.testing.assert_array_equal(np.asarray(cap.captured), [False, True, False, True])
    np.testing.assert_allclose(cap.group_mass[np.array([1, 3])].sum(-1), 1.0, rtol=1e-5)
    assert not np.any(cap.group_mass[np.array([0, 2])])

    real = _canvas_hooks(model, edit_layers=[0], clones=[Clone(3, 1, 2, 0)], clone_scale=1.3)
    edited, _ = fwd(state, real, x)
    diff = np.abs(np.asarray(edited) - np.asarray(plain)).max(-1)[0]
    assert diff.max() > 1e-3  # a real edit does change the prediction


def test_hooks_under_vmap_equal_loop():
    model = _tiny()
    graphdef, state = nnx.split(model)
    hooks = _canvas_hooks(model, capture_layers=[0, 2], edit_layers=[1], clones=[Clone(3, 1, 2, 0)], clone_scale=1.3)
    xs = [_inputs(seed=s) for s in range(3)]
    stacked = jax.tree.map(lambda *a: np.stack(a), *xs)
    fwd = lambda x: nnx.merge(graphdef, state)(**x, hooks=hooks)
    out_v, cap_v = jax.jit(jax.vmap(fwd))(stacked)
    for i, x in enumerate(xs):
        out, cap = jax.jit(fwd)(x)
        np.testing.assert_allclose(out_v[i], out, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(cap_v.group_mass[i], cap.group_mass, rtol=1e-5, atol=1e-6)


def test_hook_layer_out_of_range():
    with pytest.raises(ValueError, match="hook layer 9 out of range"):
        AttentionHooks.make(GROUPS, 4, 5, capture_layers=[9])


# ------------------------------------------------------------------------ kernel choice per backend
@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 1e-5), (jnp.bfloat16, 2e-2)])
def test_headwise_attention_is_exact_values_and_gradients(dtype, tol):
    from pico_jax.model.attention import headwise_attention

    # Inputs rounded to `dtype` first, so the fp32 reference sees the same values.
    q, k, v = (jnp.asarray(3 * jax.random.normal(kk, (2, 300, 3, 16)), dtype).astype(jnp.float32)
               for kk in jax.random.split(jax.random.key(7), 3))
    want = jax.nn.dot_product_attention(q, k, v, implementation="xla")  # fp32 reference
    got = headwise_attention(*(x.astype(dtype) for x in (q, k, v)))
    assert got.shape == want.shape and got.dtype == dtype
    np.testing.assert_allclose(np.asarray(got, np.float32), want, rtol=tol, atol=tol)
    loss = lambda f: lambda q, k, v: jnp.sum(jnp.sin(f(q, k, v).astype(jnp.float32)))
    g_want = jax.grad(loss(lambda *a: jax.nn.dot_product_attention(*a, implementation="xla")), (0, 1, 2))(q, k, v)
    g_got = jax.grad(loss(headwise_attention), (0, 1, 2))(*(x.astype(dtype) for x in (q, k, v)))
    for a, b in zip(g_got, g_want):
        np.testing.assert_allclose(np.asarray(a, np.float32), b, rtol=10 * tol, atol=10 * tol)


def test_headwise_bf16_gradient_upcasts_no_square_factor():
    """XLA:CPU runs a bf16 product that contracts its left operand's leading axis in fp32, over an
    fp32 copy of that (N, N) operand. The backward builds its (N, N) factors keys-first so that dV's
    and dK's products contract trailing axes, and computes dQ transposed from a Kᵀ made before the
    head loop; with queries first, dV's and dK's both were upcast, and dQ = dS·K was until the
    sixteenth session."""
    import re

    from pico_jax.model.attention import headwise_attention

    if jax.default_backend() != "cpu":
        pytest.skip("the fp32 upcast is XLA:CPU's")
    n = 96
    x = jnp.ones((1, n, 2, 32), jnp.bfloat16)
    grad = jax.grad(lambda q, k, v: jnp.sum(headwise_attention(q, k, v).astype(jnp.float32)), (0, 1, 2))
    hlo = jax.jit(grad).lower(x, x, x).compile().as_text()
    # (a leading axis: the batch, with the heads of a loop step folded into it). A convert inside a
    # reduction's fusion is not a copy: the forward's normaliser sums the rounded exponentials so.
    computations = hlo.split("\n\n")
    upcasts = [m for c in computations if not re.search(r"ROOT [^\n]* reduce\(", c)
               for m in re.findall(rf"= f32\[(?:\d+,)?{n},{n}\]\S* convert\(", c)]
    assert re.search(rf"bf16\[(?:\d+,)?{n},{n}\]", hlo)  # the square factors are there, narrow
    assert upcasts == [], upcasts


def test_heads_per_step_fits_each_devices_logits_in_the_budget():
    from pico_jax.model.attention import heads_per_step
    from pico_jax.parallel import make_mesh

    assert heads_per_step(jnp.float32, 8, 1, 1056, 1056) == 1  # fp32: one head a step
    assert heads_per_step(jnp.bfloat16, 8, 1, 1056, 1056) == 2  # 2 x 4.3 MiB of fp32 logits
    assert heads_per_step(jnp.bfloat16, 24, 1, 4608, 4608) == 1  # one head is over the budget already
    assert heads_per_step(jnp.bfloat16, 24, 1, 300, 300) == 24
    assert heads_per_step(jnp.bfloat16, 8, 8, 1056, 1056) == 1
    with jax.set_mesh(make_mesh("data=8")):  # each device holds one of the 8 batch rows
        assert heads_per_step(jnp.bfloat16, 8, 8, 1056, 1056) == 2
    with jax.set_mesh(make_mesh("data=2,tensor=4")):  # and 2 of the 8 heads
        assert heads_per_step(jnp.bfloat16, 8, 2, 300, 300) == 2
        assert heads_per_step(jnp.bfloat16, 8, 3, 1056, 1056) == 1  # 3 rows do not split over 2


@pytest.mark.parametrize("mesh_spec", [None, "data=2,tensor=2"])
def test_map_heads_in_steps_of_several_heads_equals_the_plain_loop(mesh_spec):
    """Several heads a step (folded into the batch axis), bf16 crossing the loop as bits, head groups
    on a tensor mesh: the same numbers as `lax.map` one head at a time."""
    from pico_jax.model.attention import map_heads
    from pico_jax.parallel import make_mesh, on_mesh

    g = np.random.default_rng(3)
    q = jnp.asarray(g.standard_normal((8, 2, 5, 4)), jnp.bfloat16)  # (H, B, N, D)
    w = jnp.asarray(g.standard_normal((8, 2, 5)), jnp.float32)

    def fn(x):
        qh, wh = x
        return (qh * 2).astype(jnp.bfloat16), jnp.sum(qh.astype(jnp.float32), -1) * wh

    want = jax.lax.map(fn, (q, w))
    for steps in (1, 2, 4):
        run = jax.jit(lambda q, w, s=steps: map_heads(fn, (q, w), s))
        got = run(q, w) if mesh_spec is None else on_mesh(run, make_mesh(mesh_spec))(q, w)
        for a, b in zip(got, want):
            assert a.dtype == b.dtype
            np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))
    with pytest.raises(ValueError, match="heads_per_step=3 does not divide the 8 heads"):
        map_heads(fn, (q, w), 3)


def test_headwise_bf16_forward_keeps_no_fp32_copy_of_its_inputs_or_output(monkeypatch):
    """XLA:CPU rewrites a bf16 dynamic-slice / dynamic-update-slice to fp32: the head loop's bf16
    inputs were converted whole to fp32 before it and its output whole to fp32 and back at every
    step, until they crossed the loop as uint16 bits (`map_heads`)."""
    import re

    from pico_jax.model import attention as attention_module

    if jax.default_backend() != "cpu":
        pytest.skip("the fp32 rewrite is XLA:CPU's")
    b, n, h, d = 1, 96, 4, 32
    monkeypatch.setattr(attention_module, "LOGITS_STEP_BYTES", 2 * b * n * n * 4)  # 2 steps of 2 heads
    headwise_attention = attention_module.headwise_attention
    x = jnp.ones((b, n, h, d), jnp.bfloat16)
    hlo = jax.jit(headwise_attention).lower(x, x, x).compile().as_text()
    f32_sizes = [int(np.prod([int(s) for s in dims.split(",")])) for dims in re.findall(r"f32\[([\d,]+)\]", hlo)]
    assert f32_sizes and b * n * h * d not in f32_sizes, sorted(set(f32_sizes))


def test_attention_implementation_per_backend(monkeypatch):
    from pico_jax.model.attention import attention_implementation as impl

    monkeypatch.delenv("PICO_JAX_ATTENTION", raising=False)
    assert impl(jnp.bfloat16, 128, 4608, backend="gpu") == "cudnn"
    assert impl(jnp.float16, 64, 300, backend="gpu") == "cudnn"
    assert impl(jnp.float32, 128, 4608, backend="gpu") == "xla"  # cuDNN flash attention has no fp32
    assert impl(jnp.bfloat16, 256, 4608, backend="gpu") == "xla"  # head_dim above cuDNN's limit
    assert impl(jnp.float32, 64, 1056, backend="cpu") == "headwise"
    assert impl(jnp.bfloat16, 128, 4608, backend="tpu") == "splash"
    assert impl(jnp.bfloat16, 64, 4608, backend="tpu") == "xla"  # below the TPU lane width
    monkeypatch.setenv("PICO_JAX_ATTENTION", "xla")
    assert impl(jnp.bfloat16, 128, 4608, backend="gpu") == "xla"
    monkeypatch.setenv("PICO_JAX_ATTENTION", "flash")
    with pytest.raises(ValueError, match="PICO_JAX_ATTENTION='flash'"):
        impl(jnp.float32, 64, 1056, backend="cpu")


@pytest.mark.parametrize("tokens", [20, 256])  # 20: padded to one 128 block, the padding masked as its own segment
def test_splash_attention_equals_xla_values_gradients_and_on_a_mesh(tokens):
    """The TPU kernel (Pallas splash attention), run here by Pallas' interpreter, against XLA's attention;
    under a data x fsdp x tensor context mesh it runs per device (shard_map) and gathers nothing."""
    from pico_jax.model.attention import splash_attention
    from pico_jax.parallel import make_mesh, on_mesh

    g = np.random.default_rng(tokens)
    q, k, v = (jnp.asarray(g.standard_normal((4, tokens, 2, 128)), jnp.float32) for _ in range(3))
    loss = lambda f: (lambda q, k, v: jnp.sum(f(q, k, v) ** 2))
    want = jax.nn.dot_product_attention(q, k, v)
    np.testing.assert_allclose(jax.jit(splash_attention)(q, k, v), want, atol=1e-5)
    got_g = jax.jit(jax.grad(loss(splash_attention), (0, 1, 2)))(q, k, v)
    for got, ref in zip(got_g, jax.grad(loss(jax.nn.dot_product_attention), (0, 1, 2))(q, k, v)):
        np.testing.assert_allclose(got, ref, atol=5e-5)
    mesh = make_mesh("data=2,fsdp=2,tensor=2")
    sharded = on_mesh(jax.jit(splash_attention), mesh)
    np.testing.assert_allclose(sharded(q, k, v), want, atol=1e-5)
    assert "all-gather" not in sharded.lower(q, k, v).compile().as_text()


def test_flux_forward_with_splash_attention_equals_xla(monkeypatch):
    cfg = FluxConfig(num_double=1, num_single=1, num_heads=2, head_dim=128, axes_dims_rope=(32, 48, 48),
                     in_channels=16, context_dim=32, pooled_dim=16)
    model = FluxTransformer(cfg, rngs=nnx.Rngs(0))
    g = np.random.default_rng(1)
    args = (g.standard_normal((2, 16, 16), np.float32), g.standard_normal((2, 4, 32), np.float32),
            g.standard_normal((2, 16), np.float32), np.array([0.3, 0.8], np.float32),
            g.standard_normal((16, 3)).astype(np.float32), np.zeros((4, 3), np.float32), np.full(2, 3.0, np.float32))
    outs = {}
    for impl in ("xla", "splash"):
        monkeypatch.setenv("PICO_JAX_ATTENTION", impl)
        outs[impl] = np.asarray(nnx.jit(lambda m, *a: m(*a))(model, *args))
    np.testing.assert_allclose(outs["splash"], outs["xla"], rtol=1e-4, atol=1e-4)


def test_capture_without_key_maps_keeps_group_mass():
    """key_maps=False (what the sampler's scorer hooks use) leaves group_mass and the output as they
    are and returns zero key maps."""
    g = np.random.default_rng(4)
    q, k, v = (jnp.asarray(g.standard_normal((2, len(GROUPS), 2, 8)), jnp.float32) for _ in range(3))
    full = AttentionHooks.make(GROUPS, 1, 5, capture_layers=[0])
    lean = AttentionHooks.make(GROUPS, 1, 5, capture_layers=[0], key_maps=False)
    out_f, (mass_f, key_f) = attention(q, k, v, full, capture_on=True, edit_on=False)
    out_l, (mass_l, key_l) = attention(q, k, v, lean, capture_on=True, edit_on=False)
    np.testing.assert_allclose(out_l, out_f, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(mass_l, mass_f, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(mass_l.sum(-1), 1.0, rtol=1e-5)
    assert np.any(key_f) and not np.any(key_l)


def test_capture_in_bf16_matches_fp32():
    """The hooked path keeps the value dtype (bf16 products on GPU) and still captures the same statistic."""
    g = np.random.default_rng(5)
    q, k, v = (jnp.asarray(g.standard_normal((1, len(GROUPS), 2, 8)), jnp.bfloat16) for _ in range(3))
    hooks = AttentionHooks.make(GROUPS, 1, 5, capture_layers=[0], key_maps=False)
    out16, (mass16, _) = attention(q, k, v, hooks, capture_on=True, edit_on=False)
    out32, (mass32, _) = attention(*(x.astype(jnp.float32) for x in (q, k, v)), hooks, capture_on=True, edit_on=False)
    assert out16.dtype == jnp.bfloat16 and mass16.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(out16, np.float32), out32, rtol=2e-2, atol=2e-2)
    np.testing.assert_allclose(mass16, mass32, rtol=2e-2, atol=5e-3)
