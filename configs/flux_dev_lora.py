"""LoRA on a FLUX.1-Fill-dev base at 1024² canvases (512-px panels), the paper's setting.

python train.py --config configs/flux_dev_lora.py --workdir runs/flux-lora \
    --set base_checkpoint=/path/to/FLUX.1-Fill-dev/transformer \
    --set 'autoencoder={"kind": "diffusers", "root": "/path/to/FLUX.1-Fill-dev", "path": "vae"}' \
    --set 'text={"kind": "prompt", "prompt": "", "t5": "/path/.../text_encoder_2", "clip": "/path/.../text_encoder"}' \
    --set 'data={"kind": "visrel", "data_dir": "/data/visrel_tfds"}' --mesh fsdp=8

remat="auto" runs the step with the least recomputation that fits the devices' memory, by XLA's
plan, compiled before the first step (XLA:CPU's plans, bench_compile.py --step train --remat auto):

  --mesh fsdp=8  planned per device: none 37.1 GiB, dots 19.8, full 8.7; all-gather 32.5 GiB a
                 step under none, 33.0 under dots and full
  --mesh data=8  none 54.7 GiB (the bf16 base on every device), dots 40.5, full 29.4; only the
                 factors' gradient moves (0.42 GiB a step)

A step is 1,468 TFLOP under none, 1,587 under dots, 1,884 under full (the old setting). On 80 GB
GPUs under JAX's default 75 % pool (59.7 GiB; budget 53.7) fsdp=8 runs none and data=8 dots; with
XLA_PYTHON_CLIENT_MEM_FRACTION=0.95 data=8 runs none too. --set remat=full forces one.
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
        remat="auto",
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
