"""LoRA on a FLUX.1-Fill-dev base at 1024² canvases (512-px panels), the paper's setting.

python train.py --config configs/flux_dev_lora.py --workdir runs/flux-lora \
    --set base_checkpoint=/path/to/FLUX.1-Fill-dev/transformer \
    --set 'autoencoder={"kind": "diffusers", "root": "/path/to/FLUX.1-Fill-dev", "path": "vae"}' \
    --set 'text={"kind": "prompt", "prompt": "", "t5": "/path/.../text_encoder_2", "clip": "/path/.../text_encoder"}' \
    --set 'data={"kind": "visrel", "data_dir": "/data/visrel_tfds"}' --mesh fsdp=8

On devices that hold the bf16 base (24 GB; an 80 GB GPU), --mesh data=8 plans 23.5 + 5.9 GiB per
device and moves only the factors' gradient (0.42 GiB a step); fsdp=8 plans 3.0 + 5.6 GiB and
all-gathers 45 GiB per device a step (bench_compile.py --step train, benchmarks/RESULTS.md).
"""

from pico_jax.model.flux import FluxConfig
from pico_jax.trainer import TrainConfig


def get_config() -> TrainConfig:
    return TrainConfig(
        model=FluxConfig.flux1_fill_dev(),
        base_checkpoint=None,  # set to the Fill-dev transformer directory
        autoencoder={"kind": "diffusers", "root": ".", "path": "vae"},
        text={"kind": "zeros", "length": 512},
        panel=512,
        dtype="bfloat16",
        remat="full",
        lora_rank=32,
        lora_alpha=32.0,
        steps=2000,
        batch_size=8,
        lr=1e-4,
        warmup_steps=100,
        shift_mu=None,  # FLUX's resolution-dependent shift
        checkpoint_every=250,
        data={"kind": "visrel", "data_dir": "data/visrel_tfds"},
    )
