"""LoRA on the FLUX transformer: attach/merge, and files that diffusers/PEFT write and read."""


import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from pico_jax import load_flux_transformer
from pico_jax.convert import bfl_table
from pico_jax.model.flux import Dense, FluxConfig, abstract_model, fused_order
from pico_jax.model.lora import (
    DEFAULT_TARGETS,
    add_lora,
    dense_layers,
    load_lora,
    lora_paths,
    lora_state,
    lora_state_dict_diffusers,
    merge_lora,
    remove_lora,
    save_lora_diffusers,
)
from pico_jax.safetensors_io import CheckpointError, save_safetensors_atomic
from tests.test_flux import make_inputs, make_torch_flux, rel_err, torch_forward

ALL_TORCH_LINEAR = [  # every nn.Linear of diffusers' FluxTransformer2DModel
    "to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
    "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2", "proj_mlp", "proj_out",
    "norm1.linear", "norm1_context.linear", "norm.linear", "norm_out.linear", "x_embedder",
    "context_embedder", "linear_1", "linear_2",
]  # fmt: skip


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A tiny random diffusers FLUX saved to disk, its inputs and its reference output."""
    d = tmp_path_factory.mktemp("flux")
    tm = make_torch_flux()
    tm.save_pretrained(d)
    inputs = make_inputs(tm)
    return d, inputs, torch_forward(tm, inputs)


_forward = jax.jit(lambda state, inputs, graphdef: nnx.merge(graphdef, state)(**inputs), static_argnames="graphdef")


def in_checkpoint_order(x, cfg, kind, axis):
    """One of our fused axes (head-grouped, `fused_order`) back in the checkpoints' [q | k | v | mlp] order."""
    return np.take(x, np.argsort(fused_order(cfg, kind)), axis=axis) if kind else x


def forward(model, inputs):
    """The model's output; one compilation per model structure for the whole module (the
    graphdef, LoRA ranks and scales included, is the cache key)."""
    graphdef, state = nnx.split(model)
    return np.asarray(_forward(state, inputs, graphdef=graphdef))


def ours(base_dir, dtype=jnp.float32):
    return load_flux_transformer(base_dir, dtype=dtype)


def randomize_lora(model, seed=0, scale=0.1):
    """Random A and B on every attached LoRA (as after some training), via the trainer's split."""
    graphdef, lora, rest = nnx.split(model, nnx.LoRAParam, ...)
    g = np.random.default_rng(seed)
    lora = jax.tree.map(lambda x: jnp.asarray(g.standard_normal(x.shape) * scale, x.dtype), lora)
    return nnx.merge(graphdef, lora, rest)


def params_without_lora(model):
    return nnx.to_pure_dict(nnx.state(model, nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam))))


# --------------------------------------------------------------------------- attach and merge
def test_fresh_lora_changes_nothing_and_only_lora_params_train(base):
    d, inputs, want = base
    model = ours(d)
    y0 = forward(model, inputs)
    before = params_without_lora(model)
    paths = add_lora(model, rank=4, alpha=8.0, targets="all", rngs=nnx.Rngs(3))
    assert paths == sorted(dense_layers(model)) and lora_paths(model) == paths
    qkv = model.double_blocks.img.qkv
    assert qkv.lora_a.shape == (2, 32, 4) and qkv.lora_b.shape == (2, 4, 96) and qkv.lora_scale == 2.0
    assert model.img_in.lora_a.shape == (16, 4) and model.single_blocks.linear1.lora_b.shape == (3, 4, 224)
    assert not np.any(np.asarray(qkv.lora_b[...])) and np.std(np.asarray(qkv.lora_a[...])) > 0
    # B = 0: each layer's output is exactly the base's (eager), the whole model's up to XLA
    # compiling a different program (fusion order), i.e. float rounding.
    x = jnp.asarray(np.random.default_rng(0).standard_normal((5, 32)), jnp.float32)
    base_qkv = jnp.dot(x, qkv.kernel[...][0]) + qkv.bias[...][0]
    with_lora = Dense(32, 96, rngs=nnx.Rngs(0))
    with_lora.kernel.set_value(qkv.kernel[...][0])
    with_lora.bias.set_value(qkv.bias[...][0])
    with_lora.lora_a = nnx.data(nnx.LoRAParam(qkv.lora_a[...][0]))
    with_lora.lora_b = nnx.data(nnx.LoRAParam(qkv.lora_b[...][0]))
    with_lora.lora_scale = qkv.lora_scale
    np.testing.assert_array_equal(with_lora(x), base_qkv)
    assert rel_err(forward(model, inputs), np.asarray(y0)) < 1e-6

    # The trainer's split: the LoRA factors alone are the differentiable state; B's gradient is
    # nonzero (shown on the embedders, to keep the test fast), the frozen base gets none.
    graphdef, lora, rest = nnx.split(model, nnx.LoRAParam, ...)
    assert len(jax.tree.leaves(lora)) == 2 * len(paths)
    assert not jax.tree.leaves(nnx.state(rest, nnx.LoRAParam))

    def loss(lora):
        m = nnx.merge(graphdef, lora, rest)
        return jnp.mean(m.img_in(inputs["hidden_states"]) ** 2) + jnp.mean(m.final_mod(m.img_in(inputs["hidden_states"])) ** 2)

    grads = jax.grad(loss)(lora)
    assert jax.tree.structure(grads) == jax.tree.structure(lora)
    assert float(jnp.abs(grads["img_in"]["lora_b"][...]).max()) > 0
    assert float(jnp.abs(grads["final_mod"]["lora_b"][...]).max()) > 0

    model = randomize_lora(model)
    y1 = forward(model, inputs)
    assert rel_err(y1, np.asarray(y0)) > 1e-2  # the LoRA now matters
    after = params_without_lora(model)
    jax.tree.map(np.testing.assert_array_equal, after, before)  # the base is untouched
    assert len(jax.tree.leaves(lora_state(model))) == 2 * len(paths)

    merged = merge_lora(model)
    assert lora_paths(merged) == [] and not jax.tree.leaves(lora_state(merged))
    assert rel_err(forward(merged, inputs), np.asarray(y1)) < 1e-5
    # After merging the parameter tree is the base model's again (same paths and shapes).
    assert jax.tree.map(np.shape, params_without_lora(merged)) == jax.tree.map(np.shape, before)


def test_targets_dtypes_and_abstract_models():
    cfg = FluxConfig(num_double=2, num_single=1, num_heads=2, head_dim=16, context_dim=8, pooled_dim=8, axes_dims_rope=(4, 6, 6))
    model = abstract_model(cfg, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)  # nnx.eval_shape: no allocation
    got = add_lora(model, 2)
    assert got == [
        f"double_blocks.{s}.{n}" for s in ("img", "txt") for n in ("mlp_in", "mlp_out", "proj", "qkv")
    ] + ["single_blocks.linear1", "single_blocks.linear2"]
    assert got == add_lora(model, 2, targets=DEFAULT_TARGETS) == add_lora(model, 2, targets="default")
    a = model.single_blocks.linear1.lora_a.get_value()
    assert isinstance(a, jax.ShapeDtypeStruct) and a.shape == (1, 32, 2) and a.dtype == jnp.bfloat16  # param dtype
    remove_lora(model)
    assert lora_paths(model) == []
    assert add_lora(model, 2, targets=[r"^img_in$", r"final_"], dtype=jnp.float32) == ["final_mod", "final_proj", "img_in"]
    assert model.img_in.lora_a.get_value().dtype == jnp.float32 and model.img_in.kernel.get_value().dtype == jnp.bfloat16
    assert len(add_lora(model, 2, targets="all")) == 10 + 2 * 5 + 3  # embedders+final, double, single
    with pytest.raises(ValueError, match="match no Dense layer.*img_in"):
        add_lora(model, 2, targets=r"attn\.to_q")
    # Factors placed by the sharding rules; merging keeps the kernel's sharding.
    from pico_jax.parallel import make_mesh, param_placer, param_sharding

    mesh = make_mesh("fsdp=8")
    small = nnx.Dict(img_in=Dense(8, 16, rngs=nnx.Rngs(0)))
    small.img_in.kernel.set_value(jax.device_put(small.img_in.kernel[...], param_sharding("img_in.kernel", (8, 16), mesh)))
    add_lora(small, 4, targets="all", place=param_placer(mesh))
    assert small.img_in.lora_a.get_value().sharding.spec == jax.sharding.PartitionSpec("fsdp", None)
    small = randomize_lora(small)
    y = small.img_in(jnp.ones((2, 8)))
    merge_lora(small)
    assert small.img_in.kernel.get_value().sharding.spec == jax.sharding.PartitionSpec("fsdp", None)
    np.testing.assert_allclose(small.img_in(jnp.ones((2, 8))), y, rtol=1e-5)
    # A concrete bf16 layer with an fp32 LoRA computes in the layer's dtype.
    dense = Dense(8, 4, rngs=nnx.Rngs(0), dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    add_lora(dense, 2, dtype=jnp.float32, targets=".*")
    assert dense.lora_a.dtype == jnp.float32 and dense(jnp.ones((3, 8))).dtype == jnp.bfloat16


# ------------------------------------------------------------------------------ export to diffusers
def test_exported_lora_loads_into_diffusers(base, tmp_path):
    from diffusers import FluxPipeline

    d, inputs, _ = base
    model = ours(d)
    add_lora(model, rank=4, alpha=8.0, targets="all")  # scale 2, baked into the exported B
    model = randomize_lora(model, seed=1, scale=0.2)
    y_lora = forward(model, inputs)
    f = save_lora_diffusers(model, tmp_path / "lora", metadata={"trained_with": "pico_jax", "steps": 3})
    assert f.name == "pytorch_lora_weights.safetensors"

    from safetensors import safe_open

    with safe_open(str(f), "np") as h:
        keys, meta = set(h.keys()), h.metadata()
        qkv_a = np.asarray(model.double_blocks.img.qkv.lora_a[...])[1]
        qkv_b = in_checkpoint_order(np.asarray(model.double_blocks.img.qkv.lora_b[...])[1] * 2.0, model.config, "qkv", 1)
        for j, proj in enumerate(("to_q", "to_k", "to_v")):
            k = f"transformer.transformer_blocks.1.attn.{proj}"
            np.testing.assert_array_equal(h.get_tensor(f"{k}.lora_A.weight"), qkv_a.T)  # same A for q, k, v
            np.testing.assert_allclose(h.get_tensor(f"{k}.lora_B.weight"), qkv_b[:, 32 * j : 32 * (j + 1)].T, rtol=1e-6)
        fm_b = np.asarray(model.final_mod.lora_b[...]) * 2.0
        np.testing.assert_allclose(  # diffusers' norm_out is (scale, shift), ours (shift, scale)
            h.get_tensor("transformer.norm_out.linear.lora_B.weight"), np.concatenate([fm_b[:, 32:], fm_b[:, :32]], 1).T, rtol=1e-6
        )
    assert meta["trained_with"] == "pico_jax" and meta["steps"] == "3" and meta["format"] == "pt"
    assert "transformer.single_transformer_blocks.2.proj_mlp.lora_A.weight" in keys
    assert "transformer.time_text_embed.guidance_embedder.linear_2.lora_B.weight" in keys
    assert all(k.startswith("transformer.") and (".lora_A." in k or ".lora_B." in k) for k in keys)
    assert len(keys) == 2 * (10 + 2 * 14 + 3 * 6)  # every nn.Linear of the diffusers model

    # FluxPipeline.load_lora_weights' route (state dict, alphas, transformer) ...
    tm = make_torch_flux()
    sd, alphas = FluxPipeline.lora_state_dict(str(tmp_path / "lora"), return_alphas=True)
    FluxPipeline.load_lora_into_transformer(sd, network_alphas=alphas, transformer=tm)
    want = torch_forward(tm, inputs)
    assert rel_err(y_lora, want) < 1e-4
    # ... and the model-level loader agree with our unmerged and merged model.
    tm2 = make_torch_flux()
    tm2.load_lora_adapter(str(f), prefix="transformer")
    np.testing.assert_allclose(torch_forward(tm2, inputs), want, rtol=0, atol=1e-6)
    merged = merge_lora(model)
    err = rel_err(forward(merged, inputs), want)
    print(f"exported LoRA: diffusers vs ours (merged) rel err {err:.2e}")
    assert err < 1e-4

    # Reading our own export back gives the same rank-4 fused factors and the same output.
    again = ours(d)
    assert load_lora(again, f) == sorted(dense_layers(again))
    assert again.double_blocks.img.qkv.lora_a.shape == (2, 32, 4) and again.single_blocks.linear1.lora_a.shape == (3, 32, 4)
    assert rel_err(forward(again, inputs), y_lora) < 1e-5


# ------------------------------------------------------------------------------ import from PEFT
def _torch_lora(cfg_kwargs, seed=0):
    from peft import LoraConfig

    tm = make_torch_flux()
    tm.add_adapter(LoraConfig(init_lora_weights="gaussian", **cfg_kwargs))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in tm.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return tm


@pytest.mark.parametrize("how", ["pipeline", "model"])
def test_peft_lora_imports_exactly(base, tmp_path, how):
    from diffusers import FluxPipeline
    from peft.utils import get_peft_model_state_dict

    d, inputs, _ = base
    if how == "pipeline":  # everything, ranks and alphas vary by module, saved as a pipeline LoRA
        cfg = dict(r=4, lora_alpha=8, target_modules=ALL_TORCH_LINEAR, rank_pattern={"to_k": 2, "add_v_proj": 3},
                   alpha_pattern={"proj_mlp": 3, "norm_out.linear": 1})  # fmt: skip
        tm = _torch_lora(cfg)
        FluxPipeline.save_lora_weights(
            tmp_path, transformer_lora_layers=get_peft_model_state_dict(tm), transformer_lora_adapter_metadata=tm.peft_config["default"].to_dict()
        )
    else:  # some projections of some layers, rsLoRA, saved by the model (no 'transformer.' prefix)
        cfg = dict(r=3, lora_alpha=5, use_rslora=True, target_modules=r"(transformer_blocks\.1\.attn\.(to_q|to_v|add_k_proj)|single_transformer_blocks\.[02]\.(attn\.to_k|proj_mlp))")  # fmt: skip
        tm = _torch_lora(cfg, seed=1)
        tm.save_lora_adapter(tmp_path)
    f = tmp_path / "pytorch_lora_weights.safetensors"
    want = torch_forward(tm, inputs)
    assert rel_err(want, base[2]) > 1e-2  # the LoRA matters

    model = ours(d)
    paths = load_lora(model, f)
    if how == "model":
        assert paths == ["double_blocks.img.qkv", "double_blocks.txt.qkv", "single_blocks.linear1"]
        # distinct A per projection: fused as [A_q | A_v] (rank 6) with a block-diagonal B
        assert model.double_blocks.img.qkv.lora_a.shape == (2, 32, 6)
        b = in_checkpoint_order(np.asarray(model.double_blocks.img.qkv.lora_b[...]), model.config, "qkv", 2)
        assert not b[0].any() and not b[1, :3, 32:].any() and not b[1, 3:, :64].any()
    else:
        assert model.double_blocks.img.qkv.lora_a.shape == (2, 32, 4 + 2 + 4)
    got = forward(model, inputs)
    err = rel_err(got, want)
    print(f"PEFT LoRA ({how}) in our model: rel err {err:.2e}")
    assert err < 1e-4

    merged = ours(d)
    load_lora(merged, f, merge=True)
    assert lora_paths(merged) == []
    assert rel_err(forward(merged, inputs), want) < 1e-4

    # Re-exported, the block-diagonal fusion splits back into the original ranks.
    out = save_lora_diffusers(model, tmp_path / "again.safetensors")
    sd = lora_state_dict_diffusers(model)
    if how == "model":
        assert sd["transformer.transformer_blocks.1.attn.to_q.lora_A.weight"].shape == (3, 32)
        assert "transformer.transformer_blocks.0.attn.to_q.lora_A.weight" in sd  # zero, still exported
        assert not any(".to_k." in k for k in sd if k.startswith("transformer.transformer_blocks."))
    else:
        assert sd["transformer.transformer_blocks.1.attn.to_k.lora_A.weight"].shape == (2, 32)
    tm2 = make_torch_flux()
    tm2.load_lora_adapter(str(out), prefix="transformer")
    assert rel_err(torch_forward(tm2, inputs), want) < 1e-5


# ------------------------------------------------------------------------------------------ kohya
def test_kohya_format_with_alpha(base, tmp_path):
    """sd-scripts names (BFL modules, `lora_unet_` + underscores), lora_down/lora_up and alpha."""
    from diffusers import FluxPipeline

    d, inputs, _ = base
    model = ours(d)
    add_lora(model, rank=4, alpha=8.0, targets=[r"^double_blocks", r"^single_blocks", r"^final_mod$"])
    model = randomize_lora(model, seed=2)
    want = forward(model, inputs)
    table = bfl_table(model.config)
    kohya = {}
    for path, dense in dense_layers(model).items():
        if dense.lora_a is None:
            continue
        src = table[f"{path}.kernel"]
        (key,) = src.keys
        a = in_checkpoint_order(np.asarray(dense.lora_a[...]), model.config, src.in_order, -2)
        b = in_checkpoint_order(np.asarray(dense.lora_b[...]), model.config, src.out_order, -1)
        for i in range(a.shape[0]) if a.ndim == 3 else [None]:
            name = "lora_unet_" + key[: -len(".weight")].format(i=i).replace(".", "_")
            ai, bi = (a[i], b[i]) if i is not None else (a, b)
            kohya[f"{name}.lora_down.weight"] = ai.T
            kohya[f"{name}.lora_up.weight"] = bi.T
            kohya[f"{name}.alpha"] = np.asarray(8.0, np.float32)  # scale alpha / rank = 2, as ours
    kohya["lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight"] = np.zeros((4, 8), np.float32)
    f = tmp_path / "kohya.safetensors"
    save_safetensors_atomic(kohya, f)
    fresh = ours(d)
    with pytest.raises(CheckpointError, match="lora_te1_text_model"):
        load_lora(fresh, f)
    assert len(load_lora(fresh, f, ignore=r"^lora_te")) == 10 + 3 + 1
    assert fresh.double_blocks.img.qkv.lora_scale == 2.0
    assert rel_err(forward(fresh, inputs), want) < 1e-6

    # diffusers' own kohya converter agrees on the blocks (it hard-codes FLUX.1's width for the
    # single blocks' linear1 and drops the final layer's LoRA, so those are left out here).
    subset = {k: v for k, v in kohya.items() if "linear1" not in k and "final_layer" not in k and "lora_te" not in k}
    save_safetensors_atomic(subset, tmp_path / "subset.safetensors")
    tm = make_torch_flux()
    sd, alphas = FluxPipeline.lora_state_dict(str(tmp_path / "subset.safetensors"), return_alphas=True)
    FluxPipeline.load_lora_into_transformer(sd, network_alphas=alphas, transformer=tm)
    mine = ours(d)
    load_lora(mine, tmp_path / "subset.safetensors")
    assert rel_err(forward(mine, inputs), torch_forward(tm, inputs)) < 1e-4


# ----------------------------------------------------------------------------------------- errors
def test_bad_files_are_named(base, tmp_path):
    d, _, _ = base
    model = ours(d)
    a, b = np.zeros((2, 32), np.float32), np.zeros((32, 2), np.float32)
    good = {"transformer.transformer_blocks.0.attn.to_q.lora_A.weight": a, "transformer.transformer_blocks.0.attn.to_q.lora_B.weight": b}

    def try_load(extra, match):
        save_safetensors_atomic(good | extra, tmp_path / "bad.safetensors")
        with pytest.raises(CheckpointError, match=match) as e:
            load_lora(model, tmp_path / "bad.safetensors")
        return str(e.value)

    msg = try_load(
        {"transformer.transformer_blocks.7.attn.to_q.lora_A.weight": a, "transformer.foo.lora_B.weight": b, "transformer.transformer_blocks.0.attn.to_q.weight": b},
        "not LoRA factors of a layer",
    )  # fmt: skip
    for k in ("transformer_blocks.7.attn.to_q.lora_A", "transformer.foo.lora_B", "transformer_blocks.0.attn.to_q.weight"):
        assert k in msg
    try_load({"transformer.proj_out.lora_A.weight": a}, r"without both.*'proj_out'")
    try_load(
        {"transformer.x_embedder.lora_A.weight": np.zeros((2, 17), np.float32), "transformer.x_embedder.lora_B.weight": b},
        r"x_embedder\.lora_A\.weight.*in=17.*img_in.*in=16",
    )
    try_load({"transformer.proj_out.lora_A.weight": a, "transformer.proj_out.lora_B.weight": a}, r"proj_out.*not LoRA factors")
    with pytest.raises(CheckpointError, match="no such file"):
        load_lora(model, tmp_path / "missing.safetensors")
    with pytest.raises(ValueError, match="no LoRA factors to export"):
        save_lora_diffusers(model, tmp_path / "x.safetensors")
    assert not (tmp_path / "x.safetensors").exists()


@pytest.mark.parametrize("shape", [(37, 24), (2, 19, 24)])
def test_lora_delta_narrow_gradient_matches_fp32(shape):
    """bf16 operands with fp32 accumulation (what `Dense` asks for on CPU): the forward and the
    written-out narrow backward agree with fp32 autodiff of the same bf16 values, to bf16
    rounding (the output and the (N, r) intermediates are rounded once each)."""
    from pico_jax.model.flux import lora_delta

    kx, ka, kb, kg = jax.random.split(jax.random.key(5), 4)
    bf = jnp.bfloat16
    x = jax.random.normal(kx, shape).astype(bf)
    a, b = (jax.random.normal(ka, (24, 4)) * 0.3).astype(bf), (jax.random.normal(kb, (4, 40)) * 0.3).astype(bf)
    w = jax.random.normal(kg, (*shape[:-1], 40))
    f32 = lambda t: t.astype(jnp.float32)

    def loss(f):
        return lambda x, a, b: jnp.sum(jnp.sin(f(x, a, b)) * w)

    plain = lambda x, a, b: jnp.dot(jnp.dot(f32(x), f32(a)), f32(b)) * 0.375
    out = lora_delta(x, a, b, 0.375, jnp.float32)
    assert out.dtype == bf
    np.testing.assert_allclose(f32(out), plain(x, a, b), rtol=2e-2, atol=2e-2)
    got = jax.grad(loss(lambda x, a, b: lora_delta(x, a, b, 0.375, jnp.float32)), (0, 1, 2))(x, a, b)
    want = jax.grad(loss(plain), (0, 1, 2))(x, a, b)
    for g, h, v in zip(got, want, (x, a, b)):
        assert g.shape == v.shape and g.dtype == bf
        err = float(jnp.max(jnp.abs(f32(g) - h)) / jnp.max(jnp.abs(h)))
        assert err < 2e-2, err


def test_lora_delta_narrow_backward_makes_no_fp32_copy_of_big_operands():
    """XLA:CPU multiplies a product it cannot run natively in bf16 over fp32 copies of both
    operands; the narrow backward keeps every product native, so no fp32 array of the input's
    (N, K) or the gradient's (N, O) size is made (the autodiff-style forms made four)."""
    import re

    from pico_jax.model.flux import lora_delta

    if jax.default_backend() != "cpu":
        pytest.skip("the fp32 upcast is XLA:CPU's")
    n, k, o = 96, 80, 112
    x = jnp.ones((1, n, k), jnp.bfloat16)
    a, b = jnp.ones((k, 8), jnp.bfloat16), jnp.ones((8, o), jnp.bfloat16)
    g = jnp.ones((1, n, o), jnp.float32)

    def loss(x, a, b):
        return jnp.sum(lora_delta(x, a, b, 0.5, jnp.float32) * g)

    hlo = jax.jit(jax.grad(loss, (0, 1, 2))).lower(x, a, b).compile().as_text()
    big = re.findall(rf"= f32\[(?:1,)?{n},(?:{k}|{o})\]\S* (?:fusion|convert)\(", hlo)
    # the one allowed: dx's own fp32 product output (N, K) before it is rounded to bf16
    assert len(big) <= 1, big
    assert np.all(np.isfinite(np.asarray(jax.jit(jax.grad(loss, (0, 1, 2)))(x, a, b)[1], np.float32)))


@pytest.mark.parametrize("shape", [(37, 24), (2, 19, 24)])
def test_lora_delta_gradient_equals_autodiff(shape):
    """The hand-written LoRA backward (chosen for XLA:CPU layouts) is the exact gradient."""
    from pico_jax.model.flux import lora_delta

    kx, ka, kb, kg = jax.random.split(jax.random.key(3), 4)
    x, a, b = jax.random.normal(kx, shape), jax.random.normal(ka, (24, 4)), jax.random.normal(kb, (4, 40))
    w = jax.random.normal(kg, (*shape[:-1], 40))

    def loss(f):
        return lambda x, a, b: jnp.sum(jnp.sin(f(x, a, b)) * w)

    plain = lambda x, a, b: jnp.dot(jnp.dot(x, a), b) * 0.375
    np.testing.assert_allclose(lora_delta(x, a, b, 0.375), plain(x, a, b), rtol=1e-6, atol=1e-5)
    got = jax.grad(loss(lambda x, a, b: lora_delta(x, a, b, 0.375)), (0, 1, 2))(x, a, b)
    want = jax.grad(loss(plain), (0, 1, 2))(x, a, b)
    for g, h in zip(got, want):
        assert g.shape == h.shape
        np.testing.assert_allclose(g, h, rtol=1e-5, atol=1e-4)
