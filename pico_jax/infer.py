"""Command-line inference: python infer.py --exemplar A.png A_out.png --query B.png --out DIR."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

from pico_jax.compile_cache import HELP as COMPILE_CACHE_HELP, enable_compile_cache

# Shared with pico_jax.eval; here, not in pico_jax.parallel, so that --help need not import jax.
MESH_FLAG_HELP = (
    "run on several devices: axis=size over data, fsdp, tensor, e.g. 'data=8' (8 GPUs, each taking its share of "
    "every batch) or 'fsdp=8' (the model split 8 ways too, for one too big for a device) or 'tensor=T' (every "
    "layer's heads split T ways, Megatron-style; T must divide the model's head count); axes left out absorb the "
    "remaining devices. --batch-size must be a multiple of data x fsdp. Results are the same as on one device. "
    "Default: one device"
)

GATHER_WEIGHTS_CHOICES = ("auto", "per_layer", "per_call")  # pico_jax.pipeline.GATHER_WEIGHTS, without importing jax
GATHER_WEIGHTS_FLAG_HELP = (
    "with --mesh over fsdp: when the sharded weights are gathered. per_layer: each layer's just before it "
    "runs, at every model call, so no device holds more than a layer of them; per_call: the whole model once "
    "per batch, held on every device for the batch (FLUX.1-dev on data=2,fsdp=4: 22 GiB in bf16 instead of "
    "455 GiB gathered per 28-step batch); auto (default): per_call where XLA's plan for it fits the device's "
    "memory, else per_layer (costs a second compile where it does not fit). No effect without fsdp"
)

DESCRIPTION = """\
PICO in-context inference. Show ONE example pair (A -> A') and one or more query images B;
the model paints B' by applying the same transformation to each B. Nothing names the task:
the exemplar defines it (segment *this* object, recolour, denoise, estimate depth, ...).

For every query, writes
  OUT/<query>.png        B' (the ensemble, or the chosen seed), at the query's original size
  OUT/<query>_grid.png   the 2x2 canvas  [A | A'] / [B | B']
and OUT/scores.json     every seed's score, the chosen seed and the ensembled seeds, per query.

Several seeds are sampled per query and an attention-guided scorer picks the best: with
--selection early (default) all seeds run only the first --score-steps steps, the best
--keep finish, which costs far less than sampling every seed to the end. With --ensemble median,
B' is the per-pixel median of the --keep kept candidates instead of the best one (test-time
ensembling: it cancels sampling noise; it helps most on restoration-like relations).

Defaults come from the checkpoint. The bundled pico-tiny's: 12 steps, 8 seeds scored after 2,
the best 4 finished, B' = their median (56 model calls per query; --keep 1: the best seed
alone, 26 calls). Flags you leave out follow the ones you give: --seeds 2 finishes
at most 2, --keep 1 or --selection random outputs one seed without ensembling."""

EPILOG = """\
examples:
  # the bundled pico-tiny model on the bundled example images
  python infer.py --exemplar assets/examples/denoise/A.png assets/examples/denoise/A_out.png \\
                  --query assets/examples/denoise/B.png --out out/

  # 16 seeds, 30 steps, keep and save the 3 best candidates
  python infer.py --exemplar a.png a_out.png --query b.png --query c.png --out out/ \\
                  --seeds 16 --steps 30 --keep 3 --save-candidates

  # the single best seed instead of the default ensemble (about half the time)
  python infer.py --exemplar a.png a_out.png --query b.png --out out/ --keep 1

  # thousands of triples, batched: one JSON object per line
  #   {"exemplar": "a.png", "exemplar_out": "a_out.png", "query": "b.png", "name": "b1"}
  python infer.py --manifest triples.jsonl --out out/ --batch-size 16

  # the same on 8 GPUs: each batch of 16 split 2 queries per device
  python infer.py --manifest triples.jsonl --out out/ --batch-size 16 --mesh data=8

  # where the time goes: a jax.profiler trace of the second batch (TensorBoard, XProf, Perfetto)
  python infer.py --manifest triples.jsonl --out out/ --batch-size 16 --profile prof/

  # on 2 hosts of 8 GPUs: the same command on each (i = 0, 1); only host 0 writes out/
  JAX_COORDINATOR_ADDRESS=host0:1234 JAX_NUM_PROCESSES=2 JAX_PROCESS_ID=$i \\
      python infer.py --manifest triples.jsonl --out out/ --batch-size 32 --mesh data=16

Images may be PNG/JPEG/... of any size; grayscale, RGBA (composited on white) and 16-bit
images are converted. Each is fitted into a square panel without distortion (letterbox) and
B' is returned at B's original size.
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="infer.py", description=DESCRIPTION, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    src = p.add_argument_group("inputs (use --exemplar with --query, or --manifest)")
    src.add_argument("--exemplar", nargs=2, metavar=("A", "A_OUT"), help="the example pair: input and desired output")
    src.add_argument("--query", action="append", default=[], metavar="B", help="a query image (repeatable)")
    src.add_argument("--manifest", metavar="JSONL", help="one {exemplar, exemplar_out, query[, name]} object per line")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory (created if missing)")
    p.add_argument("--checkpoint", metavar="PATH", help="a pico checkpoint directory (default: the bundled pico-tiny)")
    s = p.add_argument_group("sampling (defaults come from the checkpoint)")
    s.add_argument("--seeds", type=int, help="candidates sampled per query (N)")
    s.add_argument("--steps", type=int, help="denoising steps")
    s.add_argument("--keep", type=int, help="how many of the best seeds are finished and kept (m)")
    s.add_argument("--selection", choices=["early", "full", "random"],
                   help="early: score after --score-steps and finish the best; full: finish all, pick best; random: one seed")
    s.add_argument("--ensemble", choices=["median", "mean", "off"],
                   help="output the per-pixel median or mean of the --keep kept candidates (needs --keep >= 2) "
                        "instead of the best one; off: the best one")
    s.add_argument("--score-steps", type=int, help="early steps the scorer reads (k)")
    s.add_argument("--scorer", metavar="NAME",
                   help="how seeds are scored: an attention preset (context, focus, exemplar, query, self) or "
                        "'consensus' (the seed whose clean estimate agrees best with the others')")
    s.add_argument("--seed", type=int, default=0, help="first seed; seeds are seed..seed+N-1 (default 0)")
    s.add_argument("--guidance", type=float, help="guidance value for guidance-distilled FLUX bases")
    s.add_argument("--seed-batch", type=int, metavar="K",
                   help="seeds run together while scoring (default: 1 on CPU; on GPU/TPU all, or where XLA's plan "
                        "for that does not fit the device's memory, the most that do, halving from all: the "
                        "first batch compiles each try); same results, only speed and memory change")
    p.add_argument("--batch-size", type=int, default=4, help="queries per compiled batch (default 4)")
    p.add_argument("--mesh", metavar="SPEC", help=MESH_FLAG_HELP)
    p.add_argument("--gather-weights", choices=GATHER_WEIGHTS_CHOICES, default="auto", help=GATHER_WEIGHTS_FLAG_HELP)
    p.add_argument("--save-candidates", action="store_true", help="also write OUT/<query>_cand<i>.png for the kept seeds")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--compile-cache", metavar="DIR", help=COMPILE_CACHE_HELP)
    p.add_argument("--profile", metavar="DIR",
                   help="write a jax.profiler trace of one batch to DIR: the second (the first compiles), or the "
                        "only one; for TensorBoard's profile plugin, XProf or Perfetto (the .trace.json.gz)")
    return p


def profiled_batch(num_batches: int) -> int:
    """Which batch `--profile` traces: the second, since the first also compiles; the only one if one."""
    return 1 if num_batches > 1 else 0


def throughput_line(batch_seconds: list[float], batch_sizes: list[int]) -> str:
    """' (T s)', and with more than one batch the rate after the first, which compiles."""
    line = f" ({sum(batch_seconds):.1f} s"
    if len(batch_seconds) > 1:
        rest = sum(batch_seconds[1:])
        line += (f"; {batch_seconds[0]:.1f} s for the first batch, which compiles, then "
                 f"{sum(batch_sizes[1:]) / rest:.3g} queries/s")
    return line + ")"


def fitted_program_line(fitted, seeds: int) -> str:
    """What the memory chose for the sampler (a `pipeline.FittedProgram`), for the user: the seed
    batch where it is less than all seeds, the gather over fsdp where that was open; '' where
    there is nothing to say."""
    gib = lambda b: "an unknown amount" if b is None else f"{b / 2**30:.2f} GiB"
    k, gather, tried = fitted.seed_batch, fitted.gather_weights, fitted.tried
    parts = []
    if "seed_batch" in fitted.open and k < seeds:
        # all seeds with the gather that ran: tried before any smaller seed batch
        parts.append(f"seeds ran {k} at a time: all {seeds} together planned {gib(tried[(seeds, gather)])} per "
                     "device, over the memory budget (--seed-batch sets it)")
    if "gather_weights" in fitted.open and gather == "per_call":
        parts.append(f"weights gathered once per batch ({gib(fitted.planned)} planned per device)")
    elif "gather_weights" in fitted.open:
        parts.append(f"weights gathered layer by layer: gathered once per batch they planned "
                     f"{gib(tried[(k, 'per_call')])} per device, over the memory budget (--gather-weights sets it)")
    return "; ".join(parts)


class InputError(ValueError):
    pass


class OutputError(RuntimeError):
    """Writing the results failed (disk full, permissions, ...): exit code 1."""


def read_manifest(path: str) -> list[dict]:
    rows = []
    base = Path(path).parent
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as e:
        raise InputError(f"--manifest {path}: cannot read ({e.strerror})") from e
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise InputError(f"{path}:{n}: not valid JSON ({e.msg})") from e
        if not isinstance(row, dict):  # e.g. a bare string: `"query" in "..."` would test substrings
            raise InputError(f"{path}:{n}: expected a JSON object, got {type(row).__name__}")
        missing = [k for k in ("exemplar", "exemplar_out", "query") if k not in row]
        if missing:
            raise InputError(f"{path}:{n}: missing key(s) {missing}")
        bad = [k for k in ("exemplar", "exemplar_out", "query", "name") if k in row and not isinstance(row[k], str)]
        if bad:
            raise InputError(f"{path}:{n}: {bad} must be strings")
        if "name" in row and not _plain_file_stem(row["name"]):
            raise InputError(f"{path}:{n}: name {row['name']!r} must be a plain file name (no '/', '\\', "
                             f"leading '.', or control characters), since outputs are written as --out/NAME.png")
        for k in ("exemplar", "exemplar_out", "query"):
            row[k] = str((base / row[k]) if not os.path.isabs(row[k]) else row[k])
        rows.append(row)
    if not rows:
        raise InputError(f"--manifest {path}: no triples")
    return rows


def _plain_file_stem(name: str) -> bool:
    """True for a name that stays inside --out as NAME.png (no path parts, no hidden or control chars)."""
    return bool(name) and not name.startswith(".") and not any(c in name for c in "/\\") \
        and all(c.isprintable() for c in name)


def unique_names(paths: list[str], given: list[str | None]) -> list[str]:
    names, used, seen = [], set(), {}
    for p, g in zip(paths, given):
        base = g or Path(p).stem
        k = seen.get(base, 0)
        name = base if k == 0 else f"{base}_{k}"
        while name in used:  # a suffixed name may itself be a later stem: b, b -> b_1, then b_1 -> b_1_1
            k += 1
            name = f"{base}_{k}"
        seen[base] = k + 1
        used.add(name)
        names.append(name)
    return names


def collect_triples(args) -> list[dict]:
    if args.manifest and (args.exemplar or args.query):
        raise InputError("use either --manifest or --exemplar/--query, not both")
    if args.manifest:
        rows = read_manifest(args.manifest)
    else:
        if not args.exemplar:
            raise InputError("--exemplar A A_OUT is required (or --manifest)")
        if not args.query:
            raise InputError("at least one --query is required")
        rows = [{"exemplar": args.exemplar[0], "exemplar_out": args.exemplar[1], "query": q} for q in args.query]
    for r in rows:
        for k in ("exemplar", "exemplar_out", "query"):
            if not Path(r[k]).is_file():
                raise InputError(f"{k} image not found: {r[k]}")
    check_images(rows)
    names = unique_names([r["query"] for r in rows], [r.get("name") for r in rows])
    for r, n in zip(rows, names):
        r["name"] = n
    return rows


def check_images(rows: list[dict]):
    """Fail before any sampling on empty or non-image files (reads only each file's header), so a
    bad file late in a long manifest does not stop the run after hours with part of the outputs."""
    from PIL import Image, UnidentifiedImageError

    checked = set()
    for r in rows:
        for k in ("exemplar", "exemplar_out", "query"):
            p = r[k]
            if p in checked:
                continue
            checked.add(p)
            if os.path.getsize(p) == 0:
                raise InputError(f"{k} image file is empty (0 bytes): {p}")
            try:
                with Image.open(p) as im:
                    w, h = im.size
            except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
                raise InputError(f"{k} is not a readable image file: {p} ({e})") from e
            if w <= 0 or h <= 0:
                raise InputError(f"{k} image is empty ({w}x{h} pixels): {p}")


def check_numbers(args):
    for flag in ("seeds", "steps", "keep", "score_steps", "batch_size"):
        v = getattr(args, flag)
        if v is not None and v < 1:
            raise InputError(f"--{flag.replace('_', '-')} must be at least 1 (got {v})")
    if not 0 <= args.seed < 2**31:  # seeds are uint32 keys: a negative one crashed np.arange(..., uint32)
        raise InputError(f"--seed must be in 0..2**31-1 (got {args.seed})")
    if args.profile and Path(args.profile).exists() and not Path(args.profile).is_dir():
        raise InputError(f"--profile {args.profile} is a file, not a directory")


def write_json_atomic(obj, path: Path):
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(json.dumps(obj, indent=2))
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        check_numbers(args)
        rows = collect_triples(args)
    except InputError as e:
        print(f"infer.py: error: {e}", file=sys.stderr)
        return 2

    from tqdm import tqdm

    enable_compile_cache(args.compile_cache, prog="infer.py")
    import jax

    from pico_jax import grid
    from pico_jax.imageio import ImageError, load_image, save_png_atomic
    from pico_jax.profiling import StepProfiler
    from pico_jax.safetensors_io import CheckpointError
    from pico_jax.scorer import scorer_from_name

    mesh, writer = None, True
    if args.mesh:  # before minutes of loading
        from pico_jax.parallel import MeshError, mesh_for_cli

        try:
            mesh = mesh_for_cli(args.mesh, args.batch_size)
        except MeshError as e:
            print(f"infer.py: error: {e}", file=sys.stderr)
            return 2
        writer = jax.process_index() == 0  # one process per host on a cluster; only the first writes
    try:
        from pico_jax.checkpoints import load_pico

        pipe = load_pico(args.checkpoint, batch_size=args.batch_size, mesh=mesh, gather_weights=args.gather_weights)
    except CheckpointError as e:
        print(f"infer.py: error: {e}", file=sys.stderr)
        return 2

    changes = {k: getattr(args, k) for k in ("seeds", "steps", "keep", "selection", "guidance", "seed_batch") if getattr(args, k) is not None}
    if args.ensemble is not None:
        changes["ensemble"] = None if args.ensemble == "off" else args.ensemble
    scorer = pipe.plan.scorer
    if args.score_steps is not None:
        scorer = dataclasses.replace(scorer, steps=args.score_steps)
    if args.scorer is not None:
        try:
            scorer = scorer_from_name(scorer, args.scorer)
        except ValueError as e:
            print(f"infer.py: error: --scorer: {e}", file=sys.stderr)
            return 2
    changes["scorer"] = scorer
    try:  # flags not given follow the ones given (SamplingPlan.override): --seeds 2 keeps at most 2
        plan = pipe.plan.override(**changes)
    except ValueError as e:
        print(f"infer.py: error: {e}", file=sys.stderr)
        return 2

    out = Path(args.out)
    if writer:
        out.mkdir(parents=True, exist_ok=True)
    cache: dict[str, object] = {}

    def image(path):
        if path not in cache:
            cache[path] = load_image(path)
        return cache[path]

    report = {"checkpoint": str(args.checkpoint or "bundled pico-tiny"), "plan": dataclasses.asdict(plan), "queries": {}}
    starts = range(0, len(rows), args.batch_size)
    profiler = StepProfiler(Path(args.profile), profiled_batch(len(starts)), 1) if args.profile else None
    batch_seconds: list[float] = []
    batch_sizes: list[int] = []
    bar = tqdm(total=len(rows), unit="query", disable=args.no_progress, desc="painting B'")
    t0 = time.time()
    try:
        for index, start in enumerate(starts):
            chunk = rows[start : start + args.batch_size]
            t_batch = time.perf_counter()
            if profiler:
                profiler.before(index)
            try:
                canvases = [
                    grid.compose(image(r["exemplar"]), image(r["exemplar_out"]), image(r["query"]),
                                 panel=pipe.layout.panel, policy=pipe.policy, multiple=2 * pipe.layout.ae_factor)
                    for r in chunk
                ]
            except (ImageError, ValueError) as e:
                raise InputError(str(e)) from e
            with jax.profiler.StepTraceAnnotation("infer", step_num=index):
                results = pipe.run_canvases(canvases, plan, seed=args.seed)  # on the host: the batch is done
            if profiler:
                profiler.after(index, None)
            for r, res in zip(chunk, results if writer else ()):
                files = [(res.image, out / f"{r['name']}.png"), (res.canvas, out / f"{r['name']}_grid.png")]
                if args.save_candidates:
                    files += [(c, out / f"{r['name']}_cand{i}.png") for i, c in enumerate(res.candidates)]
                written = []
                try:  # a query's files appear all together or not at all (each PNG is atomic by itself)
                    for img, path in files:
                        save_png_atomic(img, path)
                        written.append(path)
                except BaseException as e:
                    for done in written:
                        done.unlink(missing_ok=True)
                    if isinstance(e, OSError):
                        raise OutputError(f"cannot write {path}: {e}") from e
                    raise
                report["queries"][r["name"]] = {
                    "exemplar": r["exemplar"], "exemplar_out": r["exemplar_out"], "query": r["query"],
                    "chosen_seed": res.chosen_seed, "seeds": res.seeds, "scores": res.scores,
                }
                if plan.ensemble:
                    report["queries"][r["name"]]["ensembled_seeds"] = res.candidate_seeds
            bar.update(len(chunk))
            batch_seconds.append(time.perf_counter() - t_batch)
            batch_sizes.append(len(chunk))
            cache.clear()
    except InputError as e:
        bar.close()
        print(f"infer.py: error: {e}", file=sys.stderr)
        return 2
    except OutputError as e:
        bar.close()
        print(f"infer.py: error: {e}", file=sys.stderr)
        return 1
    finally:
        if profiler:
            profiler.stop()  # a run that failed mid-trace still closes it
        fitted = pipe.fitted.get(dataclasses.replace(plan, ensemble=None))
        if fitted:  # what was left open (the seed batch, the gather over fsdp), fitted to the device's memory
            if "seed_batch" in fitted.open:
                report["seed_batch_run"] = fitted.seed_batch
            if "gather_weights" in fitted.open:
                report["gather_weights_run"] = fitted.gather_weights
        if report["queries"]:  # only the writer has any
            report["seconds"] = round(time.time() - t0, 3)
            write_json_atomic(report, out / "scores.json")
    bar.close()
    if writer:
        print(f"wrote {len(rows)} result(s) to {out}/{throughput_line(batch_seconds, batch_sizes)}")
        if fitted and (line := fitted_program_line(fitted, plan.seeds)):
            print(line)
        if profiler:
            i = profiled_batch(len(starts))
            print(f"profile: batch {i + 1} of {len(starts)}{' (its compile included)' if len(starts) == 1 else ''} "
                  f"traced to {profiler.directory}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
