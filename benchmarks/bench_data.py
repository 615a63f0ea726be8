"""The training input pipeline's throughput, read as the Trainer reads it: a train config's batches
(this host's share of each global batch, augmentation as configured), timed in steady state, for
one or more `data_threads` settings. With --step-s, whether each keeps a step of that many seconds
fed (a step waits for its batch when the pipeline is slower).

    python benchmarks/bench_data.py                                  # the paper config, procedural episodes
    python benchmarks/bench_data.py --threads 1,2,4,8 --step-s 0.6   # does a 0.6 s step starve?
    python benchmarks/bench_data.py --config configs/flux_dev_lora.py \\
        --set 'data={"kind": "visrel", "data_dir": "/data/visrel_tfds"}' --hosts 2

The pipeline prefetches up to 32 examples in the background, so the first batches after a pause
come from that buffer: the script drains it before timing, and times the batches after.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

PREFETCH_EXAMPLES = 32  # make_dataset's prefetch_buffer_size


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/flux_dev_lora.py", help="a train.py config (default: the paper's)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a config field, as train.py --set (default here: data={\"kind\": \"procedural\"} "
                         "when the config's data is a directory that is not there)")
    ap.add_argument("--threads", help="comma-separated data_threads values to time (default: the config's)")
    ap.add_argument("--batches", type=int, default=8, help="timed batches per setting (default 8)")
    ap.add_argument("--hosts", type=int, default=1, help="processes sharing each global batch (default 1)")
    ap.add_argument("--step-s", type=float, metavar="SECONDS",
                    help="a training step's time: report whether each setting keeps up with it")
    args = ap.parse_args(argv)
    if args.batches < 1 or args.hosts < 1:
        ap.error("--batches and --hosts must be >= 1")
    if args.step_s is not None and args.step_s <= 0:
        ap.error("--step-s must be positive")
    try:
        args.threads = [int(t) for t in args.threads.split(",")] if args.threads else None
    except ValueError:
        ap.error(f"--threads {args.threads!r}: comma-separated integers, e.g. 1,2,4")
    if args.threads and min(args.threads) < 1:
        ap.error("--threads: every value must be >= 1")
    return args


def load_config(args: argparse.Namespace):
    from pico_jax.train_cli import load_config_file, parse_set_flags
    from pico_jax.trainer import apply_overrides

    cfg = load_config_file(args.config)
    try:
        overrides = parse_set_flags(args.set)
    except ValueError as e:
        raise SystemExit(f"bench_data.py: error: {e}")
    if "data" not in overrides and cfg.data.get("kind") == "visrel" and not os.path.isdir(cfg.data.get("data_dir", "")):
        print(f"note: {cfg.data['data_dir']} is not here; timing procedural episodes instead", flush=True)
        overrides["data"] = '{"kind": "procedural"}'
    try:
        return apply_overrides(cfg, overrides)
    except ValueError as e:
        raise SystemExit(f"bench_data.py: error: --set: {e}")


def time_pipeline(cfg, hosts: int, batches: int) -> tuple[float, float]:
    """(seconds for the first batch, steady-state seconds per batch) of host 0's stream."""
    from pico_jax.trainer import make_data

    iterator = iter(make_data(cfg, shard_index=0, shard_count=hosts))
    t0 = time.perf_counter()
    next(iterator)
    first = time.perf_counter() - t0
    per_host = cfg.batch_size // hosts
    for _ in range(math.ceil(PREFETCH_EXAMPLES / per_host)):  # drain what was prefetched meanwhile
        next(iterator)
    t0 = time.perf_counter()
    for _ in range(batches):
        next(iterator)
    return first, (time.perf_counter() - t0) / batches


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cfg = load_config(args)
    if cfg.batch_size % args.hosts:
        raise SystemExit(f"bench_data.py: error: batch_size {cfg.batch_size} does not split over --hosts {args.hosts}")
    per_host = cfg.batch_size // args.hosts
    print(f"data: {cfg.data.get('kind')}, panel {cfg.panel} (a {2 * cfg.panel}^2 canvas), batch {per_host} per host "
          f"(global {cfg.batch_size} over {args.hosts}), augment {'on' if cfg.augment else 'off'}; "
          f"{os.cpu_count()} CPU cores here", flush=True)
    needed = per_host / args.step_s if args.step_s else None
    for threads in args.threads or [cfg.data_threads]:
        first, per_batch = time_pipeline(dataclasses.replace(cfg, data_threads=threads), args.hosts, args.batches)
        rate = per_host / per_batch
        line = (f"data_threads {threads}: {per_batch * 1e3:.0f} ms per batch = {rate:.1f} examples/s "
                f"(mean over {args.batches} batches; the first took {first:.1f} s)")
        if needed:
            line += (f"; a {args.step_s:g} s step needs {needed:.1f}/s: "
                     f"{'keeps up' if rate >= needed else 'TOO SLOW, the step would wait'} ({rate / needed:.2f}x)")
        print(line, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
