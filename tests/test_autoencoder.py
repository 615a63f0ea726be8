"""The NNX AutoencoderKL against diffusers' PyTorch one, the checkpoint errors, and PixelAutoencoder."""

from __future__ import annotations

import copy
import json
import re
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from pico_jax.model.autoencoder import (
    FLUX_VAE_PARAM_COUNT,
    Autoencoder,
    PixelAutoencoder,
    flux_vae_config,
    load_autoencoder,
)
from pico_jax.safetensors_io import CheckpointError

import diffusers  # noqa: E402  the test extra's references: a missing one fails, never skips
import torch  # noqa: E402

# Tiny configs that still exercise every code path: quant convs or not, 16 and 4 latent channels,
# 2 and 3 resolution levels, groups 8 and 32, mid-block attention or not, conv_shortcut (channel changes).
CONFIGS = {
    "flux_like": dict(
        block_out_channels=(32, 64),
        layers_per_block=2,
        latent_channels=16,
        norm_num_groups=8,
        use_quant_conv=False,
        use_post_quant_conv=False,
        scaling_factor=0.3611,
        shift_factor=0.1159,
    ),
    "sd_like": dict(
        block_out_channels=(32, 64),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=32,
        use_quant_conv=True,
        use_post_quant_conv=True,
        scaling_factor=0.18215,
    ),
    "three_levels_no_attn": dict(
        block_out_channels=(16, 32, 32),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        mid_block_add_attention=False,
    ),
}


def _torch_vae(name: str, seed: int = 0):
    cfg = CONFIGS[name]
    n = len(cfg["block_out_channels"])
    torch.manual_seed(seed)
    model = diffusers.AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n, **cfg
    ).eval()
    # Perturb every tensor, norms included, so a transposed or misplaced weight cannot go unnoticed.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """name -> (torch model, diffusers checkpoint dir)."""
    out = {}
    for name in CONFIGS:
        model = _torch_vae(name)
        d = tmp_path_factory.mktemp(name)
        model.save_pretrained(d, safe_serialization=True)
        out[name] = (model, d)
    return out


def _inputs(model, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(2, 3, 32, 48, generator=g) * 2 - 1
    f = 2 ** (len(model.config.block_out_channels) - 1)
    z = torch.randn(2, model.config.latent_channels, 32 // f, 48 // f, generator=g)
    return x, z


def _nhwc(t) -> np.ndarray:
    return t.detach().float().numpy().transpose(0, 2, 3, 1)


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def _reference(model, x, z):
    with torch.no_grad():
        return _nhwc(model.encode(x).latent_dist.mean), _nhwc(model.decode(z).sample)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_matches_diffusers_fp32(saved, name):
    model, d = saved[name]
    x, z = _inputs(model)
    ref_lat, ref_img = _reference(model, x, z)

    ae = load_autoencoder(d)
    lat = ae.encode(jnp.asarray(_nhwc(x)))
    img = ae.decode(jnp.asarray(_nhwc(z)))
    assert lat.shape == ref_lat.shape and lat.dtype == jnp.float32
    assert img.shape == ref_img.shape
    assert _rel(lat, ref_lat) < 1e-5, _rel(lat, ref_lat)
    assert _rel(img, ref_img) < 1e-5, _rel(img, ref_img)

    cfg = CONFIGS[name]
    assert ae.latent_channels == cfg["latent_channels"]
    assert ae.downsample_factor == 2 ** (len(cfg["block_out_channels"]) - 1)
    assert ae.scaling_factor == pytest.approx(cfg.get("scaling_factor", 0.18215))
    assert ae.shift_factor == pytest.approx(cfg.get("shift_factor", 0.0))
    np.testing.assert_allclose(ae.unscale(ae.scale(lat)), lat, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ae.scale(lat), (lat - ae.shift_factor) * ae.scaling_factor, rtol=1e-6)


@pytest.mark.parametrize("name", ["flux_like", "sd_like"])
def test_matches_diffusers_bf16(saved, name):
    model, d = saved[name]
    x, z = _inputs(model)
    ref_lat, ref_img = _reference(model, x, z)

    ae = load_autoencoder(d, dtype=jnp.bfloat16)
    assert {v.dtype for v in jax.tree.leaves(nnx.state(ae, nnx.Param))} == {jnp.dtype(jnp.bfloat16)}
    lat = ae.encode(jnp.asarray(_nhwc(x)))
    img = ae.decode(jnp.asarray(_nhwc(z)))
    assert lat.dtype == jnp.bfloat16 and img.dtype == jnp.bfloat16
    # bf16 has an 8-bit mantissa (rel. step 2**-8 ~ 4e-3) and errors compound over ~20 layers: measure the
    # tolerance as PyTorch's own bf16 error against its fp32 output (~1.5e-2 here) and allow twice that.
    mb = copy.deepcopy(model).to(torch.bfloat16)
    torch_lat, torch_img = _reference(mb, x.bfloat16(), z.bfloat16())
    tol_lat, tol_img = 2 * _rel(torch_lat, ref_lat), 2 * _rel(torch_img, ref_img)
    assert tol_lat < 5e-2 and tol_img < 5e-2  # the measured bf16 noise itself is sane
    assert _rel(lat, ref_lat) < tol_lat, (_rel(lat, ref_lat), tol_lat)
    assert _rel(img, ref_img) < tol_img, (_rel(img, ref_img), tol_img)


def test_pipeline_dir_and_sharded(saved, tmp_path):
    model, d = saved["sd_like"]
    # A pipeline dir: the VAE sits in vae/, saved sharded with an index.
    model.save_pretrained(tmp_path / "vae", safe_serialization=True, max_shard_size="100KB")
    (tmp_path / "model_index.json").write_text("{}")
    assert list((tmp_path / "vae").glob("*.safetensors.index.json"))
    x, z = _inputs(model)
    ref_lat, _ = _reference(model, x, z)
    ae = load_autoencoder(tmp_path)
    assert _rel(ae.encode(jnp.asarray(_nhwc(x))), ref_lat) < 1e-5


def test_flux_param_count():
    abstract = nnx.eval_shape(lambda: Autoencoder(flux_vae_config()))
    n = sum(v.size for v in jax.tree.leaves(nnx.state(abstract, nnx.Param)))
    assert n == FLUX_VAE_PARAM_COUNT == 83_819_683
    assert abstract.downsample_factor == 8 and abstract.latent_channels == 16
    assert abstract.quant_conv is None and abstract.post_quant_conv is None
    with torch.device("meta"):
        ref = diffusers.AutoencoderKL(**{k: v for k, v in flux_vae_config().items() if not k.startswith("_")})
    assert n == sum(p.numel() for p in ref.parameters())


# ---------------------------------------------------------------------------------------------- errors


def _copy(saved, tmp_path) -> Path:
    d = tmp_path / "vae"
    shutil.copytree(saved["sd_like"][1], d)
    return d


def _edit_weights(d: Path, fn) -> None:
    from safetensors.numpy import load_file, save_file

    f = d / "diffusion_pytorch_model.safetensors"
    tensors = load_file(str(f))
    fn(tensors)
    save_file(tensors, str(f))


def test_missing_key(saved, tmp_path):
    d = _copy(saved, tmp_path)
    key = "decoder.up_blocks.0.resnets.1.conv2.weight"
    _edit_weights(d, lambda t: t.pop(key))
    with pytest.raises(CheckpointError, match=re.escape(key)) as e:
        load_autoencoder(d)
    assert "missing" in str(e.value) and str(d) in str(e.value)


def test_unexpected_key(saved, tmp_path):
    d = _copy(saved, tmp_path)
    key = "encoder.mid_block.attentions.0.extra.weight"
    _edit_weights(d, lambda t: t.__setitem__(key, np.zeros(3, np.float32)))
    with pytest.raises(CheckpointError, match=re.escape(key)) as e:
        load_autoencoder(d)
    assert "unexpected" in str(e.value)


def test_wrong_shape(saved, tmp_path):
    d = _copy(saved, tmp_path)
    key = "encoder.mid_block.attentions.0.to_q.weight"
    _edit_weights(d, lambda t: t.__setitem__(key, np.zeros((64, 32), np.float32)))
    with pytest.raises(CheckpointError, match=re.escape(key)) as e:
        load_autoencoder(d)
    assert "(64, 32)" in str(e.value) and "(64, 64)" in str(e.value)


def test_config_does_not_match_weights(saved, tmp_path):
    d = _copy(saved, tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    cfg["use_quant_conv"] = False
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=re.escape("quant_conv.weight")):
        load_autoencoder(d)


def test_not_safetensors(saved, tmp_path):
    d = _copy(saved, tmp_path)
    (d / "diffusion_pytorch_model.safetensors").write_bytes(b"this is not a safetensors file" * 10)
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        load_autoencoder(d)


def test_missing_config(saved, tmp_path):
    d = _copy(saved, tmp_path)
    (d / "config.json").unlink()
    with pytest.raises(CheckpointError, match="config.json"):
        load_autoencoder(d)


def test_no_weights(saved, tmp_path):
    d = _copy(saved, tmp_path)
    (d / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="safetensors"):
        load_autoencoder(d)


def test_unsupported_config(saved, tmp_path):
    d = _copy(saved, tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    cfg["up_block_types"] = ["AttnUpDecoderBlock2D", "UpDecoderBlock2D"]
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="AttnUpDecoderBlock2D"):
        load_autoencoder(d)


def test_bad_input_shape(saved):
    ae = load_autoencoder(saved["sd_like"][1])
    with pytest.raises(ValueError, match="NHWC"):
        ae.encode(jnp.zeros((1, 3, 32, 32)))


# ---------------------------------------------------------------------------------------------- pixel space


@pytest.mark.parametrize("factor,channels", [(1, 3), (2, 3), (4, 1), (8, 3)])
def test_pixel_autoencoder_roundtrip(factor, channels):
    ae = PixelAutoencoder(factor, channels)
    x = jax.random.normal(jax.random.key(0), (2, 8 * 3, 8 * 5, channels))
    z = ae.encode(x)
    assert z.shape == (2, 24 // factor, 40 // factor, channels * factor**2)
    assert ae.latent_channels == channels * factor**2 and ae.downsample_factor == factor
    assert ae.scaling_factor == 1.0 and ae.shift_factor == 0.0
    np.testing.assert_array_equal(ae.decode(z), x)
    np.testing.assert_array_equal(ae.unscale(ae.scale(z)), z)


def test_pixel_autoencoder_channel_order():
    # Documented order: latents[b, i, j, c*f*f + dy*f + dx] == images[b, i*f+dy, j*f+dx, c] (= pixel_unshuffle).
    f = 2
    x = np.random.default_rng(0).normal(size=(2, 8, 12, 3)).astype(np.float32)
    z = np.asarray(PixelAutoencoder(f).encode(jnp.asarray(x)))
    ref = torch.nn.functional.pixel_unshuffle(torch.from_numpy(x).permute(0, 3, 1, 2), f)
    np.testing.assert_array_equal(z, _nhwc(ref))
    assert z[1, 2, 3, 1 * 4 + 1 * 2 + 0] == x[1, 5, 6, 1]


def test_pixel_autoencoder_rejects_indivisible():
    with pytest.raises(ValueError, match="divisible"):
        PixelAutoencoder(4).encode(jnp.zeros((1, 10, 16, 3)))
