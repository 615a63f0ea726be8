"""Paired A/B of two versions of pico_jax on one program: is B faster than A, beyond this host's noise?

    python benchmarks/ab_compare.py --a HEAD --b .                       # last commit vs the working tree
    python benchmarks/ab_compare.py --a HEAD~3 --b HEAD --program lora --dtype bfloat16 --pairs 21
    python benchmarks/ab_compare.py --a . --b . --xla-flags-b=--xla_cpu_experimental_ynn_fusion_type=-reduce
    python benchmarks/ab_compare.py --a . --b . --program lora --config-b scan_unroll=0 --config-b remat=dots

Each side (a git revision of this repository, or a directory holding a `pico_jax` package) runs in its
own worker process, which builds the same reduced FLUX with the same seeds, compiles the program once and
then waits. The parent asks the two workers for one timed call at a time, alternating A B B A ..., so
slow stretches of a shared, noisy host fall on both sides alike; each worker times its own call.

The verdict is the median of the per-pair ratios B/A with a bootstrap 90% interval over pairs: B is
called faster (slower) only when the whole interval lies below (above) 1. Timings against a moving
background are why benchmarks/RESULTS.md trusts this figure over two separate runs of a benchmark.

Programs (the sizes default to the issue's reduced FLUX: 2 double + 4 single blocks, width 512,
32x32 image + 32 text tokens, batch 1):
  forward  the jitted transformer forward
  lora     one LoRA training step: forward, backward on the rank-r factors, AdamW (as bench_lora_step.py)

--config-a / --config-b override FluxConfig fields on one side (values parsed as JSON where they parse,
else taken as strings), so two settings of one checkout compare the same way as two checkouts.

Both workers also report the program's output (the forward's output norm, the step's loss), so a change
that alters the numerics shows up next to its timing.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))  # its sibling scripts; pico_jax comes from each side's source

from bench_forward import add_reduced_flux_args  # noqa: E402


# ----------------------------------------------------------------------------------------------- stats

@dataclass(frozen=True)
class PairedRatio:
    median: float
    low: float  # bootstrap interval over pairs
    high: float

    @property
    def verdict(self) -> str:
        if self.high < 1.0:
            return f"B is faster: B/A = {self.median:.3f} (90% interval {self.low:.3f}-{self.high:.3f})"
        if self.low > 1.0:
            return f"B is slower: B/A = {self.median:.3f} (90% interval {self.low:.3f}-{self.high:.3f})"
        return (f"no difference resolved: B/A = {self.median:.3f} (90% interval {self.low:.3f}-{self.high:.3f} "
                "contains 1)")


def paired_ratio(a_ms, b_ms, *, level: float = 0.9, resamples: int = 4000, seed: int = 0) -> PairedRatio:
    """Median of the per-pair ratios b/a and a percentile-bootstrap interval of that median."""
    a, b = np.asarray(a_ms, np.float64), np.asarray(b_ms, np.float64)
    if a.shape != b.shape or a.ndim != 1 or a.size < 2:
        raise ValueError(f"need two equal-length series of at least 2 timings, got {a.shape} and {b.shape}")
    r = b / a
    boot = np.median(r[np.random.default_rng(seed).integers(0, r.size, (resamples, r.size))], axis=1)
    tail = (1.0 - level) / 2 * 100
    return PairedRatio(float(np.median(r)), float(np.percentile(boot, tail)), float(np.percentile(boot, 100 - tail)))


def pair_order(n_pairs: int) -> list[tuple[str, str]]:
    """A B, B A, A B, ...: each side goes first in half the pairs, so a drift within a pair cancels."""
    return [("a", "b") if i % 2 == 0 else ("b", "a") for i in range(n_pairs)]


# --------------------------------------------------------------------------------------------- sources

def resolve_source(spec: str, stash: Path) -> Path:
    """A directory holding pico_jax/ as is, or a git revision of this repository exported under `stash`."""
    p = Path(spec)
    if p.is_dir():
        if not (p / "pico_jax" / "__init__.py").is_file():
            raise SystemExit(f"ab_compare: {spec!r} is a directory without a pico_jax package (pico_jax/__init__.py)")
        return p.resolve()
    rev = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--verify", "--quiet", f"{spec}^{{commit}}"],
                         capture_output=True, text=True)
    if rev.returncode != 0:
        raise SystemExit(f"ab_compare: {spec!r} is neither a directory nor a git revision of {REPO}")
    sha = rev.stdout.strip()
    dest = stash / sha[:12]
    if not dest.exists():
        dest.mkdir(parents=True)
        archive = subprocess.run(["git", "-C", str(REPO), "archive", sha, "pico_jax"], capture_output=True, check=True)
        subprocess.run(["tar", "-x", "-C", str(dest)], input=archive.stdout, check=True)
    return dest


# ---------------------------------------------------------------------------------------------- worker

def build_program(cfg: dict):
    """(jitted program, its arguments, output → summary number) for `cfg` (the keys `base` in main
    makes, plus `overrides` and `source`), from the public model API that every revision has.
    benchmarks/profile_forward.py --program lora profiles the same step."""
    import jax
    import jax.numpy as jnp
    import optax
    from flax import nnx

    from pico_jax.model.flux import FluxConfig, FluxTransformer
    from pico_jax.model.lora import add_lora

    dtype = getattr(jnp, cfg["dtype"])
    head_dim, tokens, text = cfg["head_dim"], cfg["tokens"], cfg["text"]
    r7 = head_dim * 7 // 16
    fc = FluxConfig(num_double=cfg["double"], num_single=cfg["single"], num_heads=cfg["width"] // head_dim,
                    head_dim=head_dim, axes_dims_rope=(head_dim - 2 * r7, r7, r7), guidance_embeds=True)
    unknown = sorted(set(cfg["overrides"]) - {f.name for f in dataclasses.fields(fc)})
    if unknown:
        raise SystemExit(f"ab_compare worker ({cfg['source']}): FluxConfig has no field {', '.join(unknown)}")
    # JSON has no tuples; FluxConfig is frozen and hashed, so its sequence fields must be tuples.
    fc = dataclasses.replace(fc, **{k: tuple(v) if isinstance(v, list) else v for k, v in cfg["overrides"].items()})
    n_img = tokens * tokens
    g = np.random.default_rng(0)
    x = jnp.asarray(g.standard_normal((1, n_img, 64)), dtype)
    ctx = jnp.asarray(g.standard_normal((1, text, 4096)), dtype)
    pooled = jnp.asarray(g.standard_normal((1, 768)), dtype)
    ids = np.stack(np.meshgrid(np.arange(tokens), np.arange(tokens), indexing="ij"), -1).reshape(-1, 2)
    img_ids = jnp.asarray(np.concatenate([np.zeros((n_img, 1)), ids], 1), jnp.float32)
    txt_ids = jnp.zeros((text, 3), jnp.float32)
    t, guidance = jnp.array([0.5]), jnp.array([3.5])
    model = FluxTransformer(fc, rngs=nnx.Rngs(0), dtype=dtype, param_dtype=dtype)

    if cfg["program"] == "forward":
        graphdef, state = nnx.split(model)

        @jax.jit
        def forward(state):
            return nnx.merge(graphdef, state)(x, ctx, pooled, t, img_ids, txt_ids, guidance)

        return forward, (state,), lambda out: float(jnp.linalg.norm(out.astype(jnp.float32)))

    target = jnp.asarray(g.standard_normal((1, n_img, 64)), jnp.float32)
    mask = np.zeros((n_img,), np.float32)
    mask[n_img * 3 // 4:] = 1.0  # the B' panel's tokens
    add_lora(model, cfg["rank"])
    graphdef, lora, base = nnx.split(model, nnx.LoRAParam, ...)
    tx = optax.adamw(1e-4)

    @jax.jit
    def step(lora, opt):
        def loss(lora):
            out = nnx.merge(graphdef, lora, base)(x, ctx, pooled, t, img_ids, txt_ids, guidance)
            return jnp.sum(jnp.mean((out.astype(jnp.float32) - target) ** 2, -1) * mask) / mask.sum()

        value, grads = jax.value_and_grad(loss)(lora)
        updates, opt = tx.update(grads, opt, lora)
        return optax.apply_updates(lora, updates), opt, value

    # the same (lora, opt) every call: each timed step does identical work
    return step, (lora, tx.init(lora)), lambda out: float(out[2])


def worker(cfg: dict) -> None:
    """Build and compile, report `ready`, then answer each `run` line with one timed call."""
    source = cfg["source"]
    sys.path.insert(0, source)
    import jax

    import pico_jax

    if not Path(pico_jax.__file__).resolve().is_relative_to(Path(source)):
        raise SystemExit(f"ab_compare worker: imported pico_jax from {pico_jax.__file__}, not from {source}")
    fn, args, summary = build_program(cfg)
    t0 = time.perf_counter()
    out = jax.block_until_ready(fn(*args))
    first_s = time.perf_counter() - t0
    jax.block_until_ready(fn(*args))  # one untimed warm call
    print(json.dumps({"ready": True, "compile_s": first_s, "output": summary(out),
                      "platform": jax.devices()[0].platform, "jax": jax.__version__}), flush=True)
    for line in sys.stdin:
        if line.strip() != "run":
            break
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        print(json.dumps({"ms": (time.perf_counter() - t0) * 1e3}), flush=True)


class Worker:
    def __init__(self, name: str, cfg: dict, xla_flags: str | None):
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        if xla_flags is not None:
            env["XLA_FLAGS"] = xla_flags
        self.name = name
        self.proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--worker", json.dumps(cfg)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env,
                                     cwd=cfg["source"])

    def read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            code = self.proc.wait()
            raise SystemExit(f"ab_compare: worker {self.name} exited (code {code}) before answering; its error is above")
        return json.loads(line)

    def run_once(self) -> float:
        self.proc.stdin.write("run\n")
        self.proc.stdin.flush()
        return self.read()["ms"]

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write("quit\n")
                self.proc.stdin.close()
                self.proc.wait(timeout=30)
            except (BrokenPipeError, subprocess.TimeoutExpired):
                self.proc.kill()


# ---------------------------------------------------------------------------------------------- parent

def parse_overrides(items: list[str], flag: str) -> dict:
    """['scan_unroll=0', 'remat=dots'] -> {'scan_unroll': 0, 'remat': 'dots'}."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.isidentifier():
            raise SystemExit(f"ab_compare: {flag} {item!r} is not FIELD=VALUE")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--a", default="HEAD", help="baseline: a git revision of this repository or a directory "
                                                "holding pico_jax/ (default HEAD)")
    ap.add_argument("--b", default=".", help="candidate, same forms (default '.': the working tree)")
    ap.add_argument("--xla-flags-a", default=None, metavar="FLAGS",
                    help="XLA_FLAGS for side A's worker (default: inherit the environment's)")
    ap.add_argument("--xla-flags-b", default=None, metavar="FLAGS", help="XLA_FLAGS for side B's worker")
    ap.add_argument("--config-a", action="append", default=[], metavar="FIELD=VALUE",
                    help="override a FluxConfig field for side A (repeatable), e.g. scan_unroll=0")
    ap.add_argument("--config-b", action="append", default=[], metavar="FIELD=VALUE",
                    help="override a FluxConfig field for side B (repeatable)")
    ap.add_argument("--program", choices=("forward", "lora"), default="forward")
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    ap.add_argument("--pairs", type=int, default=15, help="timed calls per side, interleaved (default 15)")
    add_reduced_flux_args(ap)
    ap.add_argument("--rank", type=int, default=16, help="LoRA rank (--program lora)")
    return ap


def main(argv=None) -> PairedRatio:
    args = _parser().parse_args(argv)
    if args.pairs < 2:
        raise SystemExit(f"ab_compare: --pairs must be at least 2 to compare, got {args.pairs}")
    if args.width % args.head_dim:
        raise SystemExit(f"ab_compare: --width {args.width} is not a multiple of --head-dim {args.head_dim}")
    base = {k: getattr(args, k) for k in ("program", "dtype", "double", "single", "width", "head_dim", "tokens",
                                          "text", "rank")}
    with tempfile.TemporaryDirectory(prefix="ab_compare_") as stash:
        sources = {"a": resolve_source(args.a, Path(stash)), "b": resolve_source(args.b, Path(stash))}
        flags = {"a": args.xla_flags_a, "b": args.xla_flags_b}
        overrides = {"a": parse_overrides(args.config_a, "--config-a"),
                     "b": parse_overrides(args.config_b, "--config-b")}
        workers, ready = {}, {}
        try:
            for side in ("a", "b"):  # one at a time: the two compiles do not compete for the cores
                cfg = dict(base, source=str(sources[side]), overrides=overrides[side])
                workers[side] = Worker(side.upper(), cfg, flags[side])
                ready[side] = workers[side].read()
            times = {"a": [], "b": []}
            for i, order in enumerate(pair_order(args.pairs)):
                for side in order:
                    times[side].append(workers[side].run_once())
                print(f"\rpairs {i + 1}/{args.pairs}", end="", file=sys.stderr, flush=True)
            print(file=sys.stderr)
        finally:
            for w in workers.values():
                w.close()
    result = paired_ratio(times["a"], times["b"])
    print(f"device: {ready['a']['platform']}, {os.cpu_count()} cores, jax {ready['a']['jax']}")
    print(f"program: {args.program}, {args.dtype}; {args.double} double + {args.single} single, width {args.width}, "
          f"{args.tokens ** 2}+{args.text} tokens, batch 1" + (f", LoRA rank {args.rank}" if args.program == "lora"
                                                               else ""))
    for side, spec in (("a", args.a), ("b", args.b)):
        t = np.asarray(times[side])
        extra = f", XLA_FLAGS={flags[side]!r}" if flags[side] is not None else ""
        extra += "".join(f", {k}={v!r}" for k, v in overrides[side].items())
        print(f"  {side.upper()} = {spec} ({sources[side]}{extra}): median {np.median(t):.1f} ms, min {t.min():.1f} ms, "
              f"compile+first {ready[side]['compile_s']:.1f} s, output {ready[side]['output']:.6g}")
    print(f"  {result.verdict} over {args.pairs} pairs")
    return result


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        worker(json.loads(sys.argv[2]))
    else:
        main()
