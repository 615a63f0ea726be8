"""The FLUX transformer matches diffusers' PyTorch FluxTransformer2DModel, loaded from real
checkpoint files (diffusers directory, sharded directory, BFL single file)."""

import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from pico_jax import load_flux_transformer
from pico_jax.convert import bfl_table, flux_state_to_diffusers, export_state
from pico_jax.model.flux import FluxConfig, abstract_model, count_params, jit_forward
from pico_jax.safetensors_io import CheckpointError, save_safetensors_atomic

TINY = dict(
    num_layers=2,
    num_single_layers=3,
    attention_head_dim=16,
    num_attention_heads=2,
    joint_attention_dim=24,
    pooled_projection_dim=20,
    axes_dims_rope=(4, 6, 6),
)


def make_torch_flux(seed=0, **overrides):
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(seed)
    cfg = dict(TINY, in_channels=16, guidance_embeds=True) | overrides
    model = FluxTransformer2DModel(**cfg).eval()
    # diffusers zero-initializes some layers; perturb every weight so each one matters.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    return model


def make_inputs(model, batch=2, n_img=24, n_txt=7, seed=1):
    g = np.random.default_rng(seed)
    cfg = model.config
    ids = np.stack(np.meshgrid(np.arange(4), np.arange(n_img // 4), indexing="ij"), -1).reshape(-1, 2)
    img_ids = np.concatenate([np.zeros((n_img, 1)), ids], 1).astype(np.float32)
    txt_ids = np.zeros((n_txt, 3), np.float32)
    txt_ids[:, 1] = np.arange(n_txt)  # non-zero text ids exercise the text RoPE too
    return dict(
        hidden_states=g.standard_normal((batch, n_img, cfg.in_channels)).astype(np.float32),
        encoder_hidden_states=g.standard_normal((batch, n_txt, cfg.joint_attention_dim)).astype(np.float32),
        pooled_projections=g.standard_normal((batch, cfg.pooled_projection_dim)).astype(np.float32),
        timestep=g.uniform(0, 1, (batch,)).astype(np.float32),
        img_ids=img_ids,
        txt_ids=txt_ids,
        guidance=np.full((batch,), 3.5, np.float32) if cfg.guidance_embeds else None,
    )


def torch_forward(model, inputs):
    t = {k: (torch.from_numpy(v) if v is not None else None) for k, v in inputs.items()}
    with torch.no_grad():
        return model(**t, return_dict=False)[0].numpy()


def rel_err(a, b):
    return float(np.max(np.abs(np.asarray(a, np.float32) - b)) / (np.max(np.abs(b)) + 1e-12))


@pytest.mark.parametrize(
    "overrides,batch,n_img,n_txt",
    [
        (dict(), 2, 24, 7),
        (dict(guidance_embeds=False), 1, 16, 5),
        (dict(in_channels=40, out_channels=8), 3, 32, 9),  # Fill-style: wide input, narrow output
    ],
)
def test_diffusers_checkpoint_parity_fp32(tmp_path, overrides, batch, n_img, n_txt):
    tm = make_torch_flux(**overrides)
    tm.save_pretrained(tmp_path / "transformer")
    inputs = make_inputs(tm, batch, n_img, n_txt)
    want = torch_forward(tm, inputs)
    model = load_flux_transformer(tmp_path / "transformer", dtype=jnp.float32)
    got = jit_forward(model)(**inputs)
    assert got.shape == want.shape
    assert rel_err(got, want) < 5e-5


def test_bf16_within_bf16_tolerance(tmp_path):
    tm = make_torch_flux()
    tm.save_pretrained(tmp_path)
    inputs = make_inputs(tm)
    # t and guidance such that ×1000 is exact in bf16: a bf16 model rounds them the way diffusers
    # and BFL do (test_time_scaling_rounds_like_diffusers), which an fp32 reference does not.
    inputs["timestep"] = np.array([0.5, 0.25], np.float32)
    inputs["guidance"] = np.array([4.0, 4.0], np.float32)
    want = torch_forward(tm, inputs)
    got = jit_forward(load_flux_transformer(tmp_path, dtype=jnp.bfloat16))(**inputs)
    assert got.dtype == jnp.bfloat16
    assert rel_err(got, want) < 5e-2


def test_sharded_checkpoint_and_pipeline_dir(tmp_path):
    tm = make_torch_flux()
    tm.save_pretrained(tmp_path / "pipe" / "transformer", max_shard_size="20KB")
    files = list((tmp_path / "pipe" / "transformer").glob("*.safetensors"))
    assert len(files) > 1 and list((tmp_path / "pipe" / "transformer").glob("*.index.json"))
    inputs = make_inputs(tm)
    got = jit_forward(load_flux_transformer(tmp_path / "pipe", dtype=jnp.float32))(**inputs)
    assert rel_err(got, torch_forward(tm, inputs)) < 5e-5


def bfl_to_diffusers_reference(sd: dict, inner: int, mlp: int) -> dict:
    """An independent BFL → diffusers key mapping, written from the BFL layout (it follows
    diffusers' convert_flux_transformer_checkpoint_to_diffusers, which hard-codes width 3072)."""
    sd = dict(sd)
    out = {}

    def mv(src, dst):
        for s in ("weight", "bias"):
            out[f"{dst}.{s}"] = sd.pop(f"{src}.{s}")

    mv("time_in.in_layer", "time_text_embed.timestep_embedder.linear_1")
    mv("time_in.out_layer", "time_text_embed.timestep_embedder.linear_2")
    mv("vector_in.in_layer", "time_text_embed.text_embedder.linear_1")
    mv("vector_in.out_layer", "time_text_embed.text_embedder.linear_2")
    if "guidance_in.in_layer.weight" in sd:
        mv("guidance_in.in_layer", "time_text_embed.guidance_embedder.linear_1")
        mv("guidance_in.out_layer", "time_text_embed.guidance_embedder.linear_2")
    mv("txt_in", "context_embedder")
    mv("img_in", "x_embedder")
    n_double = len({k.split(".")[1] for k in sd if k.startswith("double_blocks.")})
    n_single = len({k.split(".")[1] for k in sd if k.startswith("single_blocks.")})
    for i in range(n_double):
        b, d = f"double_blocks.{i}", f"transformer_blocks.{i}"
        mv(f"{b}.img_mod.lin", f"{d}.norm1.linear")
        mv(f"{b}.txt_mod.lin", f"{d}.norm1_context.linear")
        for s in ("weight", "bias"):
            q, k, v = np.split(sd.pop(f"{b}.img_attn.qkv.{s}"), 3, axis=0)
            out[f"{d}.attn.to_q.{s}"], out[f"{d}.attn.to_k.{s}"], out[f"{d}.attn.to_v.{s}"] = q, k, v
            q, k, v = np.split(sd.pop(f"{b}.txt_attn.qkv.{s}"), 3, axis=0)
            out[f"{d}.attn.add_q_proj.{s}"], out[f"{d}.attn.add_k_proj.{s}"], out[f"{d}.attn.add_v_proj.{s}"] = q, k, v
        out[f"{d}.attn.norm_q.weight"] = sd.pop(f"{b}.img_attn.norm.query_norm.scale")
        out[f"{d}.attn.norm_k.weight"] = sd.pop(f"{b}.img_attn.norm.key_norm.scale")
        out[f"{d}.attn.norm_added_q.weight"] = sd.pop(f"{b}.txt_attn.norm.query_norm.scale")
        out[f"{d}.attn.norm_added_k.weight"] = sd.pop(f"{b}.txt_attn.norm.key_norm.scale")
        mv(f"{b}.img_mlp.0", f"{d}.ff.net.0.proj")
        mv(f"{b}.img_mlp.2", f"{d}.ff.net.2")
        mv(f"{b}.txt_mlp.0", f"{d}.ff_context.net.0.proj")
        mv(f"{b}.txt_mlp.2", f"{d}.ff_context.net.2")
        mv(f"{b}.img_attn.proj", f"{d}.attn.to_out.0")
        mv(f"{b}.txt_attn.proj", f"{d}.attn.to_add_out")
    for i in range(n_single):
        b, d = f"single_blocks.{i}", f"single_transformer_blocks.{i}"
        mv(f"{b}.modulation.lin", f"{d}.norm.linear")
        for s in ("weight", "bias"):
            q, k, v, m = np.split(sd.pop(f"{b}.linear1.{s}"), np.cumsum([inner, inner, inner]), axis=0)
            out[f"{d}.attn.to_q.{s}"], out[f"{d}.attn.to_k.{s}"], out[f"{d}.attn.to_v.{s}"] = q, k, v
            out[f"{d}.proj_mlp.{s}"] = m
        out[f"{d}.attn.norm_q.weight"] = sd.pop(f"{b}.norm.query_norm.scale")
        out[f"{d}.attn.norm_k.weight"] = sd.pop(f"{b}.norm.key_norm.scale")
        mv(f"{b}.linear2", f"{d}.proj_out")
    mv("final_layer.linear", "proj_out")
    for s in ("weight", "bias"):
        shift, scale = np.split(sd.pop(f"final_layer.adaLN_modulation.1.{s}"), 2, axis=0)
        out[f"norm_out.linear.{s}"] = np.concatenate([scale, shift], 0)
    assert not sd, f"unconverted BFL keys: {sorted(sd)}"
    return out


@pytest.mark.parametrize("prefix", ["", "model.diffusion_model."])
def test_bfl_single_file(tmp_path, prefix):
    tm = make_torch_flux()
    tm.save_pretrained(tmp_path / "diffusers")
    model = load_flux_transformer(tmp_path / "diffusers", dtype=jnp.float32)
    bfl = export_state(model, bfl_table(model.config))
    # Our BFL export, read back by an independent BFL→diffusers mapping, is the torch model's state.
    back = bfl_to_diffusers_reference(bfl, model.config.width, model.config.mlp_width)
    ref = {k: v.numpy() for k, v in tm.state_dict().items()}
    assert set(back) == set(ref)
    for k in ref:
        np.testing.assert_allclose(back[k], ref[k], rtol=0, atol=1e-7, err_msg=k)
    save_safetensors_atomic({prefix + k: v for k, v in bfl.items()}, tmp_path / "flux1-tiny.safetensors")
    cfg = FluxConfig.from_diffusers(dict(tm.config))
    loaded = load_flux_transformer(tmp_path / "flux1-tiny.safetensors", dtype=jnp.float32, config=cfg)
    inputs = make_inputs(tm)
    assert rel_err(jit_forward(loaded)(**inputs), torch_forward(tm, inputs)) < 5e-5


def test_bfl_config_inferred_from_shapes(tmp_path):
    cfg = FluxConfig(num_double=1, num_single=2, num_heads=2, in_channels=12, context_dim=16, pooled_dim=8)
    model = abstract_model(cfg, jnp.float32, jnp.float32)
    bfl = {k: np.zeros(v.shape, np.float32) for k, v in _abstract_export(model, bfl_table(cfg)).items()}
    save_safetensors_atomic(bfl, tmp_path / "m.safetensors")
    loaded = load_flux_transformer(tmp_path / "m.safetensors", dtype=jnp.float32)
    assert loaded.config == cfg


def _abstract_export(model, table):
    """Shapes of the checkpoint tensors an abstract model would export (no allocation)."""
    from pico_jax.convert import _layers_of, _split_sizes

    out = {}
    for key_path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        name = ".".join(map(str, key_path))
        src, shape = table[name], var.get_value().shape
        n = _layers_of(name, model.config)
        per = shape[1:] if n is not None else shape
        per = per[::-1] if src.transpose else per
        sizes = _split_sizes(src, model.config) or [per[0]]
        for i in range(n) if n is not None else [None]:
            for k, s in zip(src.keys, sizes):
                out[k.format(i=i)] = jax.ShapeDtypeStruct((s, *per[1:]), jnp.float32)
    return out


def test_full_size_parameter_counts():
    assert count_params(nnx.state(abstract_model(FluxConfig.flux1_dev()), nnx.Param)) == 11_901_408_320
    assert count_params(nnx.state(abstract_model(FluxConfig.flux1_fill_dev()), nnx.Param)) == 11_902_391_360


# ------------------------------------------------------------------------------------- errors
def test_missing_and_unexpected_keys_are_named(tmp_path):
    tm = make_torch_flux()
    tm.save_pretrained(tmp_path)
    from safetensors.numpy import load_file, save_file

    f = tmp_path / "diffusion_pytorch_model.safetensors"
    sd = load_file(f)
    sd.pop("transformer_blocks.1.attn.to_k.weight")
    sd["transformer_blocks.1.attn.extra.weight"] = np.zeros(3, np.float32)
    save_file(sd, f)
    with pytest.raises(CheckpointError) as e:
        load_flux_transformer(tmp_path, dtype=jnp.float32)
    assert "transformer_blocks.1.attn.to_k.weight" in str(e.value)
    assert "transformer_blocks.1.attn.extra.weight" in str(e.value)
    assert str(tmp_path) in str(e.value)


def test_wrong_shape_is_named(tmp_path):
    tm = make_torch_flux()
    tm.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["pooled_projection_dim"] = 21
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"text_embedder\.linear_1\.weight.*shape"):
        load_flux_transformer(tmp_path, dtype=jnp.float32)


def test_not_safetensors_and_missing_path(tmp_path):
    bad = tmp_path / "flux1-dev.safetensors"
    bad.write_bytes(b"this is not a safetensors file at all")
    with pytest.raises(CheckpointError, match="flux1-dev.safetensors"):
        load_flux_transformer(bad)
    with pytest.raises(CheckpointError, match="no such file"):
        load_flux_transformer(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no \\*.safetensors"):
        load_flux_transformer(tmp_path / "empty")


def test_not_a_flux_checkpoint(tmp_path):
    save_safetensors_atomic({"encoder.conv_in.weight": np.zeros((4, 3, 3, 3), np.float32)}, tmp_path / "vae.safetensors")
    with pytest.raises(CheckpointError, match="not a FLUX transformer checkpoint"):
        load_flux_transformer(tmp_path / "vae.safetensors")


def test_diffusers_export_roundtrip(tmp_path):
    tm = make_torch_flux()
    tm.save_pretrained(tmp_path)
    model = load_flux_transformer(tmp_path, dtype=jnp.float32)
    sd = flux_state_to_diffusers(model)
    ref = tm.state_dict()
    assert set(sd) == set(ref)
    for k, v in ref.items():
        np.testing.assert_array_equal(sd[k], v.numpy(), err_msg=k)


def test_scan_unroll_changes_nothing_but_the_loop(monkeypatch):
    from pico_jax.model.flux import FluxTransformer

    monkeypatch.setenv("PICO_JAX_ATTENTION", "xla")  # the CPU default maps over heads: a loop of its own
    cfg = FluxConfig(num_double=3, num_single=2, num_heads=2, head_dim=16, axes_dims_rope=(4, 6, 6), in_channels=8,
                     context_dim=16, pooled_dim=8, guidance_embeds=False)
    model = FluxTransformer(cfg, rngs=nnx.Rngs(3))
    g = np.random.default_rng(0)
    args = (g.standard_normal((1, 16, 8)).astype(np.float32), g.standard_normal((1, 4, 16)).astype(np.float32),
            g.standard_normal((1, 8)).astype(np.float32), np.array([0.3], np.float32),
            np.stack([np.zeros(16), np.arange(16) // 4, np.arange(16) % 4], 1).astype(np.float32),
            np.zeros((4, 3), np.float32))
    want = np.asarray(jit_forward(model)(*args))
    state = nnx.state(model)
    for unroll in (0, 2):
        other = FluxTransformer(cfg.replace(scan_unroll=unroll), rngs=nnx.Rngs(0))
        nnx.update(other, state)
        np.testing.assert_allclose(np.asarray(jit_forward(other)(*args)), want, rtol=1e-5, atol=1e-6)
        hlo = jax.jit(lambda *a: other(*a)).lower(*args).as_text()
        assert ("while" in hlo) == (unroll != 0)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_time_scaling_rounds_like_diffusers(dtype):
    from pico_jax.model.flux import scaled_time

    values = np.array([0.0, 0.001, 0.35, 0.5, 0.7431, 1.0, 3.5, 4.0], np.float32)
    want = (torch.from_numpy(values).to(getattr(torch, dtype)) * 1000).float().numpy()  # diffusers' arithmetic
    np.testing.assert_array_equal(np.asarray(scaled_time(values, getattr(jnp, dtype))), want)
    if dtype == "bfloat16":
        assert float(scaled_time(np.float32(3.5), jnp.bfloat16)) == 3504.0  # not 3500: bf16 has 8 mantissa bits


@pytest.mark.parametrize("remat", ["none", "full"])
def test_bf16_stacks_read_by_bits_match_plain_slicing(monkeypatch, remat):
    """On CPU a bf16 stack is read layer by layer through its bits (flux.take_layer) and the
    backward's residuals travel as bits too, the layer's weights re-read from the stacks rather
    than kept (flux.call_layer_step), so XLA converts no whole stack to fp32 and stores no second
    copy of one. Values and the layers' gradients must equal plain slicing."""
    from pico_jax.model import flux

    cfg = FluxConfig(num_double=2, num_single=3, num_heads=2, head_dim=16, axes_dims_rope=(4, 6, 6), in_channels=8,
                     context_dim=16, pooled_dim=8, guidance_embeds=False, remat=remat)
    model = flux.FluxTransformer(cfg, rngs=nnx.Rngs(3), dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    graphdef, state = nnx.split(model)
    g = np.random.default_rng(0)
    args = (g.standard_normal((2, 16, 8)).astype(np.float32), g.standard_normal((2, 4, 16)).astype(np.float32),
            g.standard_normal((2, 8)).astype(np.float32), np.array([0.3, 0.7], np.float32),
            np.stack([np.zeros(16), np.arange(16) // 4, np.arange(16) % 4], 1).astype(np.float32),
            np.zeros((4, 3), np.float32))

    def loss(state, *a):
        return jnp.sum(jnp.square(nnx.merge(graphdef, state)(*a).astype(jnp.float32)))

    value_and_grad = jax.jit(jax.value_and_grad(loss))
    assert flux._slices_by_bits(state) and jax.default_backend() == "cpu"
    got_loss, got_grad = value_and_grad(state, *args)
    stack_shapes = {leaf.shape for path, leaf in jax.tree.leaves_with_path(state)
                    if "blocks" in jax.tree_util.keystr(path) and leaf.ndim >= 3}
    # No fp32 copy of a whole stack in the forward, nor in the backward to the inputs (frozen
    # layers, as with LoRA; a full fine-tune's stack gradients are summed in fp32 by XLA).
    for fn in (loss, jax.grad(loss, argnums=1)):
        hlo = jax.jit(fn).lower(state, *args).compile().as_text()
        for shape in stack_shapes:
            assert f"f32[{','.join(map(str, shape))}]" not in hlo, (fn, shape)
            # Nor a uint16 one: the forward's bitcast fuses into each layer's slice, and the
            # backward re-reads the layer's weights instead of the scan stacking them as residuals.
            assert not re.search(rf"= u16\[{','.join(map(str, shape))}\]\S* fusion\(", hlo), (fn, shape)

    monkeypatch.setattr(flux, "_slices_by_bits", lambda state, backend=None: False)
    want_loss, want_grad = jax.jit(jax.value_and_grad(loss))(state, *args)
    assert float(got_loss) == float(want_loss)
    flat_got, flat_want = jax.tree.leaves_with_path(got_grad), jax.tree.leaves(want_grad)
    assert len(flat_got) == len(flat_want) and any(np.any(np.asarray(w) != 0) for w in flat_want)
    for (path, a), b in zip(flat_got, flat_want):
        a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
        if "blocks" in jax.tree_util.keystr(path):  # the scanned layers: bit-equal
            np.testing.assert_array_equal(a, b, err_msg=jax.tree_util.keystr(path))
        else:  # upstream of the modulation vector every layer's cotangent meets; XLA rounds those
            # sums at other points when the residuals travel as bits (call_layer_step): a few bf16
            # ulps of the largest entry (seen: 2 ulps, 0.25 at 31.25)
            np.testing.assert_array_less(np.abs(a - b), 2**-6 * np.abs(b).max() + 1e-30,
                                         err_msg=jax.tree_util.keystr(path))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_take_layer_reads_one_layer_of_every_leaf_and_scatters_its_gradient(dtype):
    """take_layer on a pytree of stacks (mixed dtypes), under jit with a traced index: each leaf's
    layer i exactly, and the gradient is the cotangent in row i of a zero stack."""
    from pico_jax.model.flux import take_layer

    g = np.random.default_rng(1)
    stacks = {"w": jnp.asarray(g.standard_normal((3, 4, 5)), dtype), "b": jnp.asarray(g.standard_normal((3, 5)), jnp.float32)}
    for i in range(3):
        got = jax.jit(take_layer)(stacks, jnp.int32(i))
        for key in stacks:
            assert got[key].dtype == stacks[key].dtype
            np.testing.assert_array_equal(np.asarray(got[key], np.float32), np.asarray(stacks[key][i], np.float32))
        cot = {"w": jnp.full((4, 5), 2.0, dtype), "b": jnp.arange(5.0, dtype=jnp.float32)}
        (d_stacks,) = jax.jit(lambda s, c, i=i: jax.vjp(lambda t: take_layer(t, jnp.int32(i)), s)[1](c))(stacks, cot)
        for key in stacks:
            want = np.zeros(stacks[key].shape, np.float32)
            want[i] = np.asarray(cot[key], np.float32)
            assert d_stacks[key].dtype == stacks[key].dtype
            np.testing.assert_array_equal(np.asarray(d_stacks[key], np.float32), want)


def _gelu_tanh_float64(x):
    x = np.asarray(x, np.float64)
    return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))


def _gelu_tanh_slope_float64(x):
    x, c = np.asarray(x, np.float64), np.sqrt(2 / np.pi)
    t = np.tanh(c * (x + 0.044715 * x**3))
    return 0.5 * (1 + t) + 0.5 * x * (1 - t * t) * c * (1 + 3 * 0.044715 * x * x)


@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 2e-6), (jnp.bfloat16, 1e-2)])
def test_gelu_tanh_value_and_gradient_match_float64(dtype, tol):
    """gelu_tanh's written-out gradient (it keeps only x for the backward) against the tanh
    formula's derivative in float64, over the range where the slope changes; its value
    against the tanh formula in float64: at most two ulps off (or 2e-7 absolute, in the far
    negative tail where the value is ~0)."""
    from pico_jax.model.flux import gelu_tanh

    x = jnp.linspace(-7, 7, 4001).astype(dtype)
    g = jnp.cos(jnp.arange(4001.0)).astype(dtype)  # an arbitrary cotangent
    # not fp32 autodiff of the tanh form: tanh saturates and its slope is 0 below x ~ -4.9
    want = _gelu_tanh_slope_float64(np.asarray(x, np.float32)) * np.asarray(g, np.float64)
    got_y, vjp = jax.vjp(gelu_tanh, x)
    (got,) = vjp(g)
    assert got.dtype == dtype and got_y.dtype == dtype
    exact = _gelu_tanh_float64(np.asarray(x, np.float32))
    ulp = 2.0 ** (np.floor(np.log2(np.maximum(np.abs(exact), 1e-30))) - np.finfo(dtype).nmant)
    np.testing.assert_array_less(np.abs(np.asarray(got_y, np.float64) - exact), np.maximum(2 * ulp, 2e-7))
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), rtol=tol, atol=tol)


def test_bf16_gelu_tanh_is_computed_in_fp32():
    """In bf16 the GELU is rounded once, not after every step: on average nearer the exact value
    than jax.nn.gelu computed in bf16 (the rounding-per-step form, and XLA:CPU's slow one)."""
    from pico_jax.model.flux import gelu_tanh

    x = jnp.asarray(np.random.default_rng(0).standard_normal(20000) * 3, jnp.bfloat16)
    exact = _gelu_tanh_float64(np.asarray(x, np.float32))
    ours = np.abs(np.asarray(gelu_tanh(x), np.float64) - exact).mean()
    per_step = np.abs(np.asarray(jax.nn.gelu(x, approximate=True), np.float64) - exact).mean()
    rounded_once = np.abs(np.asarray(jnp.asarray(exact, jnp.bfloat16), np.float64) - exact).mean()
    assert ours < 0.8 * per_step, (ours, per_step)
    assert ours < 1.05 * rounded_once, (ours, rounded_once)


def _reference_modulate(x, shift, scale):
    xf = x.astype(jnp.float32)
    mean = xf.mean(-1, keepdims=True)
    normed = ((xf - mean) * jax.lax.rsqrt(jnp.mean(jnp.square(xf - mean), -1, keepdims=True) + 1e-6)).astype(x.dtype)
    return normed * (1 + scale) + shift


def _reference_rms_norm(x, scale, eps=1e-6):
    xf = x.astype(jnp.float32)
    xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return (xf * scale.astype(jnp.float32)).astype(x.dtype)


@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 1e-5), (jnp.bfloat16, 2**-6)])
@pytest.mark.parametrize("mod_shape", [(2, 1, 32), (32,)])
def test_modulate_and_rms_norm_gradients_match_autodiff(dtype, tol, mod_shape):
    """The written-out gradient of modulate (adaptive LayerNorm) and the checkpointed rms_norm's
    against autodiff of the plain formulas, computed in fp32 from the same inputs: all inputs'
    gradients, shift/scale broadcast over tokens (the model's (B, 1, D)) or over everything ((D,)).
    The forward is the same program, so its values are bit-equal."""
    from pico_jax.model.flux import modulate, rms_norm

    g = np.random.default_rng(3)
    x = jnp.asarray(3 * g.standard_normal((2, 40, 32)) + 1, dtype)
    shift, scale = (jnp.asarray(g.standard_normal(mod_shape) / 2, dtype) for _ in range(2))
    ct = jnp.asarray(g.standard_normal((2, 40, 32)), dtype)
    f32 = lambda *a: [t.astype(jnp.float32) for t in a]

    np.testing.assert_array_equal(modulate(x, shift, scale), _reference_modulate(x, shift, scale))
    got = jax.vjp(modulate, x, shift, scale)[1](ct)
    want = jax.vjp(_reference_modulate, *f32(x, shift, scale))[1](ct.astype(jnp.float32))
    for a, b, name in zip(got, want, ("x", "shift", "scale")):
        assert a.dtype == dtype, name
        err = float(jnp.max(jnp.abs(a.astype(jnp.float32) - b))) / float(jnp.max(jnp.abs(b)))
        assert err < tol, (name, err)

    w = jnp.asarray(1 + g.standard_normal((32,)) / 4, dtype)
    np.testing.assert_array_equal(rms_norm(x, w, 1e-6), _reference_rms_norm(x, w))
    got = jax.vjp(lambda x, w: rms_norm(x, w, 1e-6), x, w)[1](ct)
    want = jax.vjp(_reference_rms_norm, *f32(x, w))[1](ct.astype(jnp.float32))
    for a, b, name in zip(got, want, ("x", "scale")):
        assert a.dtype == dtype, name
        err = float(jnp.max(jnp.abs(a.astype(jnp.float32) - b))) / float(jnp.max(jnp.abs(b)))
        assert err < tol, (name, err)


def test_bf16_block_keeps_no_fp32_activation_for_its_backward(capsys):
    """A bf16 single block's backward residuals hold nothing in fp32 as large as its activations
    (tokens x width): modulate keeps x in bf16 and (…, 1) fp32 statistics, the checkpointed QK
    rms_norm keeps bf16 q and k. Autodiff of the plain norms kept four such fp32 arrays (x − mean
    and its normalized form; fp32 q and k)."""
    from jax.ad_checkpoint import print_saved_residuals

    from pico_jax.model.flux import SingleBlock, rope_tables

    cfg = FluxConfig(num_double=0, num_single=1, num_heads=2, head_dim=32, axes_dims_rope=(8, 12, 12))
    block = SingleBlock(cfg, rngs=nnx.Rngs(0), dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    graphdef, state = nnx.split(block)
    n = 48
    cos, sin = rope_tables(jnp.zeros((n, 3)), cfg.axes_dims_rope, 10000.0)

    def loss(x):
        out, _ = nnx.merge(graphdef, state)(x, jnp.ones((1, cfg.width), jnp.bfloat16), cos, sin, None, False, False)
        return jnp.sum(out.astype(jnp.float32))

    print_saved_residuals(loss, jnp.ones((1, n, cfg.width), jnp.bfloat16))
    saved = re.findall(r"^(\w+)\[([\d,]*)\](.*)$", capsys.readouterr().out, re.MULTILINE)
    size = lambda dims: int(np.prod([int(d) for d in dims.split(",") if d]))
    big = [(dt, dims, why) for dt, dims, why in saved if size(dims) >= n * cfg.width]
    assert [b for b in big if b[0] == "f32"] == [], big
    assert any(dt == "bf16" for dt, _, _ in big), saved  # the control: the activations themselves


def _dot_operand_dtypes(hlo: str) -> list[tuple[str, str]]:
    """(lhs, rhs) element types of every dot in an optimised HLO module's text."""
    types = {m.group(1): m.group(2) for m in re.finditer(r"%([\w.\-]+) = (\w+)\[", hlo)}
    return [(types.get(a, "?"), types.get(b, "?")) for a, b in re.findall(r" dot\(%([\w.\-]+), %([\w.\-]+)\)", hlo)]


def test_narrow_product_gradient_runs_narrow_and_matches_fp32():
    """narrow_product's written-out gradient: the input gradient's product takes bf16 operands
    (the fp32 cotangent rounded once); both gradients within bf16 rounding of the fp32 ones."""
    from pico_jax.model.flux import narrow_product

    g = np.random.default_rng(0)
    x = jnp.asarray(g.standard_normal((2, 48, 64)), jnp.bfloat16)
    w = jnp.asarray(g.standard_normal((64, 96)) / 8, jnp.bfloat16)
    ct = jnp.asarray(g.standard_normal((2, 48, 96)), jnp.float32)

    def loss(fn):
        return lambda x, w: jnp.sum(fn(x, w) * ct)

    got = jax.grad(loss(narrow_product), (0, 1))(x, w)
    want = jax.grad(loss(lambda x, w: jnp.dot(x.astype(jnp.float32), w.astype(jnp.float32))), (0, 1))(x, w)
    for a, b in zip(got, want):
        assert a.dtype == jnp.bfloat16
        scale = float(jnp.max(jnp.abs(b)))
        assert float(jnp.max(jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32)))) < 2**-6 * scale
    np.testing.assert_array_equal(narrow_product(x, w), jnp.dot(x, w, preferred_element_type=jnp.float32))

    # the input gradient, what a LoRA step needs of a frozen layer (dw is then dead code)
    hlo = jax.jit(jax.grad(loss(narrow_product))).lower(x, w).compile().as_text()
    assert _dot_operand_dtypes(hlo) == [("bf16", "bf16")]
    # the control: autodiff's transpose of the same product multiplies in fp32
    plain = lambda x, w: jnp.dot(x, w, preferred_element_type=jnp.float32)
    hlo = jax.jit(jax.grad(loss(plain))).lower(x, w).compile().as_text()
    assert _dot_operand_dtypes(hlo) == [("f32", "f32")]


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the fp32 conversion is XLA:CPU's")
def test_a_one_row_narrow_product_stays_narrow_and_matches():
    """One row (an embedder or a modulation of one example), vmapped over a stack of kernels: the
    product and its input gradient take bf16 operands and equal the fp32 product's within bf16
    rounding. The control: XLA:CPU multiplies a plain one-row bf16 dot in fp32, converting the
    whole stacked kernel."""
    from pico_jax.model.flux import narrow_product

    g = np.random.default_rng(0)
    x = jnp.asarray(g.standard_normal((3, 1, 64)), jnp.bfloat16)
    w = jnp.asarray(g.standard_normal((3, 64, 96)) / 8, jnp.bfloat16)
    ct = jnp.asarray(g.standard_normal((3, 1, 96)), jnp.float32)
    f32 = lambda a: a.astype(jnp.float32)
    loss = lambda fn: (lambda x, w, ct: jnp.sum(jax.vmap(fn)(x, w) * ct))  # w, ct as arguments: not folded

    got, want = jax.vmap(narrow_product)(x, w), jnp.einsum("lrk,lko->lro", f32(x), f32(w))
    assert got.shape == (3, 1, 96) and got.dtype == jnp.float32
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    dx = jax.grad(loss(narrow_product))(x, w, ct)
    dx_want = jax.grad(loss(lambda x, w: jnp.dot(f32(x), f32(w))))(x, w, ct)
    assert float(jnp.max(jnp.abs(f32(dx) - dx_want))) < 2**-6 * float(jnp.max(jnp.abs(dx_want)))
    np.testing.assert_allclose(narrow_product(x[0, 0], w[0]), want[0, 0], rtol=1e-5, atol=1e-5)  # a vector

    assert set(_dot_operand_dtypes(jax.jit(jax.vmap(narrow_product)).lower(x, w).compile().as_text())) == {("bf16", "bf16")}
    assert set(_dot_operand_dtypes(jax.jit(jax.grad(loss(narrow_product))).lower(x, w, ct).compile().as_text())) == {("bf16", "bf16")}
    plain = jax.vmap(lambda x, w: jnp.dot(x, w, preferred_element_type=jnp.float32))
    assert set(_dot_operand_dtypes(jax.jit(plain).lower(x, w).compile().as_text())) == {("f32", "f32")}


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_every_layers_modulation_at_once_equals_each_layers_own(dtype, monkeypatch):
    """`layer_modulations` (every layer's modulation before the scan) equals each layer's mod Dense
    applied alone, LoRA branch included, and the model's forward equals one whose blocks compute
    their own modulation inside the scan."""
    from pico_jax.model import flux
    from pico_jax.model.flux import FluxTransformer, layer_modulations
    from pico_jax.model.lora import add_lora

    cfg = FluxConfig(num_double=2, num_single=3, num_heads=2, head_dim=16, axes_dims_rope=(4, 6, 6),
                     in_channels=8, context_dim=12, pooled_dim=10)
    model = FluxTransformer(cfg, rngs=nnx.Rngs(0), dtype=dtype, param_dtype=dtype)
    add_lora(model, rank=2, targets="all", rngs=nnx.Rngs(1))
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.LoRAParam)):  # B = 0 would hide the branch
        var.set_value(jnp.asarray(np.random.default_rng(len(path)).standard_normal(var.shape) * 0.3, dtype))
    vec = jnp.asarray(np.random.default_rng(2).standard_normal((2, cfg.width)), dtype)
    for stack in (model.double_blocks.img.mod, model.double_blocks.txt.mod, model.single_blocks.mod):
        graphdef, state = nnx.split(stack)
        got = layer_modulations(stack, vec)
        layers = jax.tree.leaves(state)[0].shape[0]
        want = jnp.stack([nnx.merge(graphdef, jax.tree.map(lambda a: a[i], state))(jax.nn.silu(vec))
                          for i in range(layers)])
        assert got.shape == want.shape == (layers, 2, stack.kernel.shape[-1]) and got.dtype == dtype
        tol = 1e-6 if dtype == jnp.float32 else 1e-2
        np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), rtol=tol, atol=tol)

    g = np.random.default_rng(3)
    n, t = 16, 5
    args = (jnp.asarray(g.standard_normal((2, n, 8)), dtype), jnp.asarray(g.standard_normal((2, t, 12)), dtype),
            jnp.asarray(g.standard_normal((2, 10)), dtype), jnp.asarray([0.3, 0.8]),
            jnp.zeros((n, 3)), jnp.zeros((t, 3)), jnp.asarray([3.5, 3.5]))
    hoisted = model(*args)
    inside = flux.scan_blocks

    def with_own_modulation(body, carry, stacked, xs, *rest, unscanned=None):  # the control
        return inside(lambda block, c, x: body(block, c, (x[0], None)), carry, stacked, xs, *rest)

    monkeypatch.setattr(flux, "scan_blocks", with_own_modulation)
    per_layer = model(*args)
    tol = 1e-5 if dtype == jnp.float32 else 3e-2
    np.testing.assert_allclose(np.asarray(hoisted, np.float32), np.asarray(per_layer, np.float32), rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_split_columns_gradient_concatenates(dtype):
    """split_columns: the same halves and the same gradient as slicing, the gradient built by a
    concatenation (no pad), and in bf16 not through an fp32 copy of the full width."""
    from pico_jax.model.flux import gelu_tanh, split_columns

    g = np.random.default_rng(1)
    h = jnp.asarray(g.standard_normal((1, 40, 24)), dtype)

    def loss(split):
        def f(h):
            a, b = split(h)
            return jnp.sum(jnp.sin(a.astype(jnp.float32))) + jnp.sum(gelu_tanh(b).astype(jnp.float32) ** 2)
        return f

    ours, plain = loss(lambda h: split_columns(h, 10)), loss(lambda h: (h[..., :10], h[..., 10:]))
    for x, y in zip(split_columns(h, 10), (h[..., :10], h[..., 10:])):
        np.testing.assert_array_equal(x, y)
    np.testing.assert_array_equal(jax.grad(ours)(h), jax.grad(plain)(h))
    hlo = jax.jit(jax.grad(ours)).lower(h).compile().as_text()
    assert " pad(" in jax.jit(jax.grad(plain)).lower(h).compile().as_text()  # the control
    assert " pad(" not in hlo and " concatenate(" in hlo
    if dtype == jnp.bfloat16:
        assert not re.search(r"= f32\[[\d,]*\]\S* concatenate\(", hlo)


def test_remat_dots_saves_the_narrow_products_layer_output_in_bf16(capsys):
    """Under remat="dots" a bf16 Dense on CPU (its product behind a custom VJP, which the dots
    policy cannot see into) still has its output saved rather than recomputed, in bf16 as a GPU's
    dot writes it: the fp32 accumulator saved instead made XLA:CPU's dots plan for the FLUX step
    larger than remat "none"'s."""
    from jax.ad_checkpoint import print_saved_residuals

    from pico_jax.model.flux import _REMAT_POLICIES, Dense

    dense = Dense(64, 96, rngs=nnx.Rngs(0), dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    x = jnp.ones((48, 64), jnp.bfloat16)
    f = lambda x: jnp.sum(jnp.sin(dense(x)))
    print_saved_residuals(jax.checkpoint(f, policy=_REMAT_POLICIES["dots"]), x)
    saved = capsys.readouterr().out
    assert "bf16[48,96] named 'narrow_product'" in saved and "f32[48,96]" not in saved, saved
    print_saved_residuals(jax.checkpoint(f, policy=_REMAT_POLICIES["nothing"]), x)
    assert "[48,96]" not in capsys.readouterr().out


def test_remat_dots_keeps_the_lora_output_narrow(capsys):
    """Under remat="dots" the backward of a bf16 LoRA'd Dense on CPU keeps one (N, O) array, the
    layer's output (base product, bias and LoRA branch), in bf16: no fp32 (N, O) (an fp32 branch
    output planned +5.6 GiB per device for the FLUX.1-dev LoRA gradient), and only the small
    (N, r) product of the branch besides."""
    from jax.ad_checkpoint import print_saved_residuals

    from pico_jax.model.flux import _REMAT_POLICIES, Dense
    from pico_jax.model.lora import add_lora

    class One(nnx.Module):
        def __init__(self):
            self.proj = Dense(64, 96, rngs=nnx.Rngs(0), dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)

    model = One()
    add_lora(model, 4, targets=("proj",))
    graphdef, lora, base = nnx.split(model, nnx.LoRAParam, ...)
    x = jnp.ones((48, 64), jnp.bfloat16)

    def f(lora):
        return jnp.sum(jnp.sin(nnx.merge(graphdef, lora, base).proj(x).astype(jnp.float32)))

    print_saved_residuals(jax.checkpoint(f, policy=_REMAT_POLICIES["dots"]), lora)
    saved = capsys.readouterr().out
    assert saved.count("[48,96]") == 1 and "bf16[48,96] named 'narrow_product'" in saved, saved


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_concatenate_columns_matches_jnp_and_skips_fp32(dtype):
    """concatenate_columns: jnp.concatenate's values and gradients; in bf16 the compiled program
    holds no fp32 value at all (XLA:CPU would concatenate bf16 through fp32)."""
    from pico_jax.model.flux import concatenate_columns

    g = np.random.default_rng(2)
    a = jnp.asarray(g.standard_normal((2, 5, 3)), dtype)
    b = jnp.asarray(g.standard_normal((2, 5, 4)), dtype)
    np.testing.assert_array_equal(concatenate_columns(a, b), jnp.concatenate([a, b], -1))
    weights = jnp.arange(7.0)
    ours = lambda a, b: jnp.sum(jnp.sin(concatenate_columns(a, b).astype(jnp.float32)) * weights)
    plain = lambda a, b: jnp.sum(jnp.sin(jnp.concatenate([a, b], -1).astype(jnp.float32)) * weights)
    for x, y in zip(jax.grad(ours, (0, 1))(a, b), jax.grad(plain, (0, 1))(a, b)):
        assert x.dtype == dtype
        np.testing.assert_array_equal(x, y)
    if dtype == jnp.bfloat16:
        assert "f32" not in jax.jit(concatenate_columns).lower(a, b).compile().as_text()
        assert "f32" in jax.jit(lambda a, b: jnp.concatenate([a, b], -1)).lower(a, b).compile().as_text()
