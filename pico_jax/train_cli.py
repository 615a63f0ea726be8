"""Command-line training: python train.py --config configs/<name>.py --workdir DIR [overrides]."""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path

from pico_jax.compile_cache import HELP as COMPILE_CACHE_HELP, enable_compile_cache

DESCRIPTION = """\
Train a PICO model: flow matching on 2x2 in-context canvases [A | A'] / [B | B'], loss on the
B' panel only. LoRA on a FLUX base (lora_rank > 0) or full fine-tuning of a small model.

The step is one jax.jit over a ('data', 'fsdp', 'tensor') device mesh; the frozen base is
sharded too (FSDP), so FLUX.1-dev fits. Re-running with the same --workdir resumes exactly
where the run stopped (parameters, optimizer, step, RNG, data position). SIGTERM saves a
checkpoint before exiting; a non-finite loss stops the run and keeps the last good checkpoint.

Writes DIR/metrics.jsonl (step, loss, lr, grad_norm, steps/s, examples/s, TFLOP/s per device
run and of model work, and MFU where the device's peak is known: H100, H200, A100, TPU v4 / v5e /
v5p / v6e in bf16, or --set peak_tflops_per_device=...), DIR/tensorboard/,
DIR/samples/step_*.png (rows: A | A' | B | ours | truth), DIR/checkpoints/ (Orbax), and with
--profile, DIR/profile/ (a jax.profiler trace)."""

EPILOG = """\
examples:
  python train.py --config configs/tiny.py --workdir /tmp/run                # seconds, on CPU
  python train.py --config configs/pico_tiny.py --workdir runs/pico-tiny \\
      --export pico_jax/pretrained/pico-tiny                                  # the bundled model
  python train.py --config configs/pico_tiny.py --workdir runs/x --steps 200 --batch-size 16 \\
      --lr 1e-3 --mesh data=2,fsdp=4 --set ema_decay=0.99 --set model.num_double=2
  # a global batch of 32 at 1024^2 in the memory of 8 (4 micro-batches of 1 per device on fsdp=8)
  python train.py --config configs/flux_dev_lora.py --workdir runs/lora --mesh fsdp=8 \\
      --batch-size 32 --grad-accum-steps 4 --set base_checkpoint=...
  # remat: the paper config's "auto" compiles the step with remat none, then dots, then full, and
  # runs the first that XLA plans within 90 % of each device's memory; name one to force it, or
  # give the memory to plan against (a shared GPU, or JAX's pool raised: XLA_PYTHON_CLIENT_MEM_FRACTION)
  python train.py --config configs/flux_dev_lora.py --workdir runs/lora --set remat=full
  python train.py --config configs/flux_dev_lora.py --workdir runs/lora --set device_memory_gib=40
  # more input threads for a many-core host (benchmarks/bench_data.py says whether a step waits),
  # or worker processes, each with its own threads, where threads stop scaling (the same batches,
  # so a run may resume with other values of either)
  python train.py --config configs/flux_dev_lora.py --workdir runs/lora --set data_threads=16
  python train.py --config configs/flux_dev_lora.py --workdir runs/lora --set data_workers=4 --set data_threads=4
  # multi-host: run the same command on every host (jax.distributed is initialized from the
  # environment: JAX_COORDINATOR_ADDRESS + JAX_NUM_PROCESSES + JAX_PROCESS_ID, SLURM or Open MPI,
  # or PICO_MULTIHOST=1 on TPU pods); e.g. on host i of 2:
  JAX_COORDINATOR_ADDRESS=host0:1234 JAX_NUM_PROCESSES=2 JAX_PROCESS_ID=$i \\
      python train.py --config configs/pico_tiny.py --workdir /shared/run --mesh data=2,fsdp=8
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="train.py", description=DESCRIPTION, epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, metavar="FILE", help="a Python file in configs/ with get_config()")
    p.add_argument("--workdir", required=True, metavar="DIR", help="run directory (resumed if it has checkpoints)")
    p.add_argument("--steps", type=int, help="total training steps")
    p.add_argument("--batch-size", type=int, help="global batch size (per optimizer step)")
    p.add_argument("--grad-accum-steps", type=int, metavar="K",
                   help="split each step's batch into K micro-batches run one after another, gradients averaged: "
                        "the activation memory of batch-size / K (default 1)")
    p.add_argument("--lr", type=float, help="peak learning rate")
    p.add_argument("--mesh", help="mesh shape, e.g. 'data=2,fsdp=4' (default: all devices on fsdp)")
    p.add_argument("--lora-rank", type=int, help="LoRA rank (0 = full fine-tuning)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override any config field (model.* for the transformer; JSON for dicts); repeatable")
    p.add_argument("--export", metavar="DIR", help="after training, write a pico checkpoint (LoRA merged) here")
    p.add_argument("--export-lora", metavar="FILE", help="after training, write the LoRA as diffusers safetensors")
    p.add_argument("--profile", type=int, metavar="STEP",
                   help="write a jax.profiler trace of steps STEP.. (3 of them; --set profile_steps=N) to "
                        "DIR/profile, for TensorBoard's profile plugin or Perfetto; pick a step after the first, which compiles")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--compile-cache", metavar="DIR", help=COMPILE_CACHE_HELP)
    return p


def load_config_file(path: str):
    f = Path(path)
    if not f.is_file():
        raise SystemExit(f"train.py: error: --config {path}: no such file")
    spec = importlib.util.spec_from_file_location(f"pico_config_{f.stem}", f)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise SystemExit(f"train.py: error: --config {path} has no get_config() function")
    return module.get_config()


def parse_set_flags(pairs: list[str]) -> dict[str, str]:
    """`--set KEY=VALUE` flags as {key: raw value} (apply_overrides types them); ValueError names a bad one."""
    overrides = {}
    for kv in pairs:
        k, sep, v = kv.partition("=")
        if not sep:
            raise ValueError(f"--set {kv!r}: expected KEY=VALUE")
        overrides[k.strip()] = v
    return overrides


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from pico_jax.parallel import MeshError, maybe_initialize_distributed

    maybe_initialize_distributed()
    enable_compile_cache(args.compile_cache, prog="train.py")
    from pico_jax.safetensors_io import CheckpointError
    from pico_jax.trainer import NonFiniteLoss, Trainer, apply_overrides

    cfg = load_config_file(args.config)
    try:
        overrides = parse_set_flags(args.set)
    except ValueError as e:
        print(f"train.py: error: {e}", file=sys.stderr)
        return 2
    for flag, key in (("steps", "steps"), ("batch_size", "batch_size"), ("grad_accum_steps", "grad_accum_steps"),
                      ("lr", "lr"), ("mesh", "mesh"), ("lora_rank", "lora_rank"), ("profile", "profile_start_step")):
        if getattr(args, flag) is not None:
            overrides[key] = str(getattr(args, flag))
    try:
        cfg = apply_overrides(cfg, overrides)
        if cfg.steps < 1 or cfg.batch_size < 1 or cfg.lr <= 0:
            raise ValueError("--steps and --batch-size must be >= 1 and --lr > 0")
        trainer = Trainer(cfg, args.workdir, progress=not args.no_progress)
    except (ValueError, MeshError) as e:
        print(f"train.py: error: {e}", file=sys.stderr)
        return 2
    try:
        result = trainer.run()
    except NonFiniteLoss as e:
        print(f"train.py: error: {e}", file=sys.stderr)
        return 1
    except CheckpointError as e:  # the workdir's checkpoint does not fit this run; nothing was trained
        print(f"train.py: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(result))
    if result["status"] == "preempted":
        print(f"preempted: checkpoint saved at step {result['step']}; re-run the same command to resume")
        return 0
    if args.export:
        trainer.export(args.export)
        print(f"exported pico checkpoint to {args.export}")
    if args.export_lora:
        trainer.save_lora(args.export_lora)
        print(f"exported LoRA to {args.export_lora}")
    return 0
