"""A few-second smoke configuration: a 2+2-block pixel-space model on 16-px panels, CPU friendly.

python train.py --config configs/tiny.py --workdir /tmp/run
"""

from pico_jax.model.flux import FluxConfig
from pico_jax.trainer import TrainConfig


def get_config() -> TrainConfig:
    return TrainConfig(
        # PixelAutoencoder(2): 12 latent channels; Fill input = 4·12 noisy + 4·12 masked + 4·2² mask = 112
        model=FluxConfig(num_double=1, num_single=2, num_heads=2, head_dim=32, axes_dims_rope=(8, 12, 12),
                         in_channels=112, out_channels=48, context_dim=32, pooled_dim=32, guidance_embeds=False),
        autoencoder={"kind": "pixel", "factor": 2},
        text={"kind": "zeros", "length": 1},
        panel=16,
        steps=60,
        batch_size=8,
        lr=1e-3,
        warmup_steps=10,
        log_every=5,
        checkpoint_every=20,
        sample_steps=6,
        data={"kind": "procedural", "families": "train"},
    )
