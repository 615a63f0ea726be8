"""LoRA on a FLUX.1-Fill-dev base at 1024² canvases (512-px panels), the paper's setting.

python train.py --config configs/flux_dev_lora.py --workdir runs/flux-lora \
    --set base_checkpoint=/path/to/FLUX.1-Fill-dev/transformer \
    --set 'autoencoder={"kind": "diffusers", "root": "/path/to/FLUX.1-Fill-dev", "path": "vae"}' \
    --set 'text={"kind": "prompt", "prompt": "", "t5": "/path/.../text_encoder_2", "clip": "/path/.../text_encoder"}' \
    --set 'data={"kind": "visrel", "data_dir": "/data/visrel_tfds"}' --mesh fsdp=8

remat="auto" runs the step with the least recomputation that fits the devices' memory, by XLA's
plan, compiled before the first step (XLA:CPU's plans, bench_compile.py --step train --remat auto):

  --mesh fsdp=8  remat none 37.3 GiB per device, all-gather 38.5 GiB per step; full 8.7 GiB, 45.0
  --mesh data=8  remat none 54.7 GiB per device (the bf16 base on every device); full 29.4 GiB;
                 only the factors' gradient moves (0.42 GiB a step)

On 80 GB GPUs both pick "none" (1,468 TFLOP a step instead of full's 1,884) once JAX may use the
memory: data=8 needs XLA_PYTHON_CLIENT_MEM_FRACTION=0.95 (under JAX's default 75 % pool, 59.7 GiB,
it runs "full"). --set remat=full forces the old setting.
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
