"""A diffusers FLUX-Fill-style pipeline directory (real diffusers transformer + AutoencoderKL saved
to disk) runs through PICO inference end to end."""

import json

import numpy as np
import pytest
import torch

from pico_jax.checkpoints import load_pico, pico_from_flux
from pico_jax.infer import main as infer_main
from pico_jax.safetensors_io import CheckpointError


@pytest.fixture(scope="module")
def flux_dir(tmp_path_factory):
    from diffusers import AutoencoderKL, FluxTransformer2DModel

    root = tmp_path_factory.mktemp("flux_fill")
    torch.manual_seed(0)
    # A tiny VAE with 4 latent channels and downsample 2 → Fill input 4·4 noisy + 4·4 masked + 4·2² mask = 48.
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), latent_channels=4,
                        norm_num_groups=8, layers_per_block=1, use_quant_conv=False, use_post_quant_conv=False,
                        scaling_factor=0.5, shift_factor=0.1)
    vae.save_pretrained(root / "vae")
    tr = FluxTransformer2DModel(num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
                                joint_attention_dim=16, pooled_projection_dim=8, in_channels=48, out_channels=16,
                                guidance_embeds=True, axes_dims_rope=(4, 6, 6))
    tr.save_pretrained(root / "transformer")
    return root


def test_pico_over_a_diffusers_fill_pipeline(flux_dir, tmp_path):
    out = pico_from_flux(flux_dir, tmp_path / "pico", panel=16, text="zeros", text_length=4, dtype="float32")
    meta = json.loads((out / "pico.json").read_text())
    assert meta["transformer"].endswith("transformer") and meta["sampling"]["guidance"] == 30.0
    pipe = load_pico(out, steps=3, seeds=2)
    g = np.random.default_rng(0)
    a, a2, b = (g.uniform(size=(20, 24, 3)).astype(np.float32) for _ in range(3))
    res = pipe(a, a2, [b])
    assert res[0].image.shape == (20, 24, 3) and np.isfinite(res[0].image).all()
    for name, img in zip("ab", (a, b)):
        from PIL import Image
        Image.fromarray((img * 255).astype(np.uint8)).save(tmp_path / f"{name}.png")
    rc = infer_main(["--checkpoint", str(out), "--exemplar", str(tmp_path / "a.png"), str(tmp_path / "a.png"),
                     "--query", str(tmp_path / "b.png"), "--out", str(tmp_path / "res"), "--steps", "2", "--seeds", "2",
                     "--no-progress"])
    assert rc == 0 and (tmp_path / "res" / "b.png").exists()


def test_not_a_pipeline_dir(tmp_path):
    with pytest.raises(CheckpointError, match="no transformer/config.json"):
        pico_from_flux(tmp_path, tmp_path / "out", text="zeros")
