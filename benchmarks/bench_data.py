"""The training input pipeline's throughput, read as the Trainer reads it: a train config's batches
(this host's share of each global batch, augmentation as configured), timed in steady state, for
each `data_threads` x `data_workers` setting asked for. With --step-s, whether each keeps a step
of that many seconds fed (a step waits for its batch when the pipeline is slower).

    python benchmarks/bench_data.py                                  # the paper config, procedural episodes
    python benchmarks/bench_data.py --threads 1,2,4,8 --step-s 0.6   # does a 0.6 s step starve?
    python benchmarks/bench_data.py --threads 1,2 --workers 0,2,4    # threads in worker processes
    python benchmarks/bench_data.py --threads 2 --workers 0,2 --rounds 5   # a noisy host: medians
    python benchmarks/bench_data.py --config configs/flux_dev_lora.py \\
        --set 'data={"kind": "visrel", "data_dir": "/data/visrel_tfds"}' --hosts 2
    python benchmarks/bench_data.py --build-visrel 12                # the TFDS reader, on no data

--build-visrel N writes N procedural episodes per training family as a VisRel folder of PNGs at
the config's panel size, builds the TFDS dataset from it (both in a temporary directory, removed
after) and times the reader of that dataset: the PNG decoding a real VisRel run pays, which
procedural episodes do not. The files are small and freshly written, so they are read from the
page cache: this is the decoding's rate, not a disk's.

The pipeline prefetches up to 32 examples in the background, so the first batches after a pause
come from that buffer: the script drains it before timing, and times the batches after.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import statistics
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
    ap.add_argument("--workers", help="comma-separated data_workers values to time, each with every --threads value "
                                      "(worker processes per host, each with its own read threads; default: the config's)")
    ap.add_argument("--build-visrel", type=int, metavar="EPISODES",
                    help="time the TFDS VisRel reader on this many procedural episodes per training family, written "
                         "and built in a temporary directory (replaces the config's data)")
    ap.add_argument("--batches", type=int, default=8, help="timed batches per setting (default 8)")
    ap.add_argument("--rounds", type=int, default=1,
                    help="time every setting this many times, interleaved, and print each one's median (default 1)")
    ap.add_argument("--hosts", type=int, default=1, help="processes sharing each global batch (default 1)")
    ap.add_argument("--step-s", type=float, metavar="SECONDS",
                    help="a training step's time: report whether each setting keeps up with it")
    args = ap.parse_args(argv)
    if args.batches < 1 or args.hosts < 1 or args.rounds < 1:
        ap.error("--batches, --rounds and --hosts must be >= 1")
    if args.build_visrel is not None and args.build_visrel < 1:
        ap.error("--build-visrel must be >= 1")
    if args.step_s is not None and args.step_s <= 0:
        ap.error("--step-s must be positive")
    args.threads = _int_list(ap, "--threads", args.threads, minimum=1)
    args.workers = _int_list(ap, "--workers", args.workers, minimum=0)
    return args


def _int_list(ap: argparse.ArgumentParser, flag: str, text: str | None, minimum: int) -> list[int] | None:
    if not text:
        return None
    try:
        values = [int(t) for t in text.split(",")]
    except ValueError:
        ap.error(f"{flag} {text!r}: comma-separated integers, e.g. 1,2,4")
    if min(values) < minimum:
        ap.error(f"{flag}: every value must be >= {minimum}")
    return values


def load_config(args: argparse.Namespace):
    from pico_jax.train_cli import load_config_file, parse_set_flags
    from pico_jax.trainer import apply_overrides

    cfg = load_config_file(args.config)
    try:
        overrides = parse_set_flags(args.set)
    except ValueError as e:
        raise SystemExit(f"bench_data.py: error: {e}")
    if args.build_visrel is None and "data" not in overrides and cfg.data.get("kind") == "visrel" \
            and not os.path.isdir(cfg.data.get("data_dir", "")):
        print(f"note: {cfg.data['data_dir']} is not here; timing procedural episodes instead", flush=True)
        overrides["data"] = '{"kind": "procedural"}'
    try:
        return apply_overrides(cfg, overrides)
    except ValueError as e:
        raise SystemExit(f"bench_data.py: error: --set: {e}")


def build_visrel(cfg, episodes: int, root: str):
    """`cfg` reading a VisRel TFDS dataset of procedural episodes built under `root` (the training
    families of cfg.data, `episodes` each, at the panel size)."""
    from pico_jax.data import relations
    from pico_jax.data.visrel import build_visrel as build

    fams = cfg.data.get("families", "train") if cfg.data.get("kind") == "procedural" else "train"
    names = sorted(relations.SPLITS[fams] if isinstance(fams, str) else fams)
    t0 = time.perf_counter()
    relations.write_visrel_folder(os.path.join(root, "src"), names, episodes, size=cfg.panel)
    written = time.perf_counter() - t0
    build(os.path.join(root, "src"), os.path.join(root, "tfds"), cfg.panel)
    print(f"visrel: {episodes * len(names)} episodes of {len(names)} families as {cfg.panel}-px PNGs "
          f"(written in {written:.1f} s, built into TFDS in {time.perf_counter() - t0 - written:.1f} s)", flush=True)
    return dataclasses.replace(cfg, data={"kind": "visrel", "data_dir": os.path.join(root, "tfds")})


def time_pipeline(cfg, hosts: int, batches: int) -> tuple[float, float]:
    """(seconds for the first batch, steady-state seconds per batch) of host 0's stream."""
    from pico_jax.data.input_pipeline import close_iterator
    from pico_jax.trainer import make_data

    iterator = iter(make_data(cfg, shard_index=0, shard_count=hosts))
    try:
        t0 = time.perf_counter()
        next(iterator)
        first = time.perf_counter() - t0
        per_host = cfg.batch_size // hosts
        # Drain what was prefetched meanwhile (each worker keeps its own buffer).
        for _ in range(math.ceil(PREFETCH_EXAMPLES * max(cfg.data_workers, 1) / per_host)):
            next(iterator)
        t0 = time.perf_counter()
        for _ in range(batches):
            next(iterator)
        return first, (time.perf_counter() - t0) / batches
    finally:
        close_iterator(iterator)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cfg = load_config(args)
    if cfg.batch_size % args.hosts:
        raise SystemExit(f"bench_data.py: error: batch_size {cfg.batch_size} does not split over --hosts {args.hosts}")
    if args.build_visrel is None:
        return time_settings(cfg, args)
    import tempfile

    with tempfile.TemporaryDirectory(prefix="bench_data_visrel_") as root:
        return time_settings(build_visrel(cfg, args.build_visrel, root), args)


def time_settings(cfg, args: argparse.Namespace) -> int:
    per_host = cfg.batch_size // args.hosts
    print(f"data: {cfg.data.get('kind')}, panel {cfg.panel} (a {2 * cfg.panel}^2 canvas), batch {per_host} per host "
          f"(global {cfg.batch_size} over {args.hosts}), augment {'on' if cfg.augment else 'off'}; "
          f"{os.cpu_count()} CPU cores here", flush=True)
    needed = per_host / args.step_s if args.step_s else None
    settings = [dataclasses.replace(cfg, data_threads=t, data_workers=w)
                for w in args.workers or [cfg.data_workers] for t in args.threads or [cfg.data_threads]]
    times: dict[int, list[tuple[float, float]]] = {i: [] for i in range(len(settings))}
    for r in range(args.rounds):  # every setting once per round, so a slow minute hits them all
        for i, setting in enumerate(settings):
            first, per_batch = time_pipeline(setting, args.hosts, args.batches)
            times[i].append((first, per_batch))
            what = f"mean over {args.batches} batches; the first took {first:.1f} s"
            prefix = f"round {r + 1}/{args.rounds}: " if args.rounds > 1 else ""
            print(prefix + _rate_line(setting, per_batch, what, per_host, needed, args.step_s), flush=True)
    if args.rounds > 1:
        for i, setting in enumerate(settings):
            rates = sorted(per_host / b for _, b in times[i])
            per_batch = statistics.median(b for _, b in times[i])
            what = f"median of {args.rounds} rounds of {args.batches} batches; {rates[0]:.1f} to {rates[-1]:.1f}/s"
            print(_rate_line(setting, per_batch, what, per_host, needed, args.step_s), flush=True)
    return 0


def _rate_line(cfg, per_batch: float, what: str, per_host: int, needed: float | None, step_s: float | None) -> str:
    rate = per_host / per_batch
    line = (f"data_threads {cfg.data_threads}, data_workers {cfg.data_workers}: {per_batch * 1e3:.0f} ms per batch = "
            f"{rate:.1f} examples/s ({what})")
    if needed:
        line += (f"; a {step_s:g} s step needs {needed:.1f}/s: "
                 f"{'keeps up' if rate >= needed else 'TOO SLOW, the step would wait'} ({rate / needed:.2f}x)")
    return line


if __name__ == "__main__":
    sys.exit(main())
