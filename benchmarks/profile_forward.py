"""Profile the jitted FLUX forward, or a LoRA training step: the two numbers (FLOPs and bytes,
from XLA's cost analysis and counted analytically), the machine's two limits (measured matmul
rate and memory bandwidth), the roofline bound they imply, and where the time goes (a
jax.profiler trace, every executed HLO op attributed to a category by what its fused computation
contains).

    python benchmarks/profile_forward.py [--double 2 --single 4 --width 512 --tokens 32 --text 32]
    python benchmarks/profile_forward.py --trace-dir /tmp/prof   # keep the trace (TensorBoard / Perfetto)
    python benchmarks/profile_forward.py --config flux1-dev --tokens 64 --text 512 --dtype bfloat16 --no-run
                                             # full size: cost analysis only (compiled, never allocated)
    python benchmarks/profile_forward.py --program lora --dtype bfloat16   # one LoRA training step

Default: the reduced model of bench_forward.py (2 double + 4 single blocks, width 512, 1024 image +
32 text tokens, batch 1, fp32). `--program lora` profiles the step that ab_compare.py times (the
same builder: forward, backward on rank-r LoRA factors, AdamW, as in bench_lora_step.py).
Category times are sums over the traced runs divided by the number of runs; ops of one category
can overlap on several cores, so shares are of the summed op time, and an op's time in the trace
includes any wait for a core (an op timed alone can be much faster).

bf16 runs also list the fp32 copies of narrow arrays in the compiled program and what reads them:
an fp32 copy read by a matmul is a product XLA:CPU would not run in bf16 (the sixteenth session's
LoRA and attention fixes were found this way; the per-op times had filed them under elementwise).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import glob
import gzip
import json
import math
import os
import re
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from bench_forward import _time, add_reduced_flux_args, forward_flops, matmul_rate  # noqa: E402

CATEGORIES = ("matmul", "attention softmax", "norm / reduction", "elementwise (modulation, RoPE, gates, GELU)",
              "copy / transpose", "other")
_CONTAINERS = {"while", "conditional", "call"}
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*([^=]*?)\s([a-z][\w\-]*)\(")
_CALLS = re.compile(r"(?:calls|to_apply|body|condition|branch_computations)=\{?%?([\w.\-]+(?:,\s*%?[\w.\-]+)*)\}?")
_COMP = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$")


def hlo_ops(hlo_text: str) -> dict[str, tuple[str, set[str], str]]:
    """Instruction name → (its opcode, every opcode reachable through the computations it calls,
    its result shape)."""
    comps: dict[str, list[tuple[str, str, list[str], str]]] = {}
    current = None
    for line in hlo_text.splitlines():
        m = _COMP.match(line)
        if m and "=" not in line.split("{")[0]:
            current = comps.setdefault(m.group(1), [])
            continue
        m = _INSTR.match(line)
        if m and current is not None:
            called = [c.strip().lstrip("%") for g in _CALLS.findall(line) for c in g.split(",")]
            current.append((m.group(1), m.group(3), called, re.sub(r"\{[^}]*\}", "", m.group(2)).strip()))

    memo: dict[str, set[str]] = {}

    def reach(comp: str) -> set[str]:
        if comp not in memo:
            memo[comp] = set()
            out = set()
            for _, op, called, _ in comps.get(comp, []):
                out.add(op)
                for c in called:
                    out |= reach(c)
            memo[comp] = out
        return memo[comp]

    table = {}
    for instrs in comps.values():
        for name, op, called, shape in instrs:
            inner = set().union(*(reach(c) for c in called)) if called else set()
            table[name] = (op, inner | {op}, shape)
    return table


_PURE_CONVERSION = {"convert", "bitcast", "bitcast-convert", "transpose", "copy", "reshape", "slice", "dynamic-slice",
                    "concatenate", "broadcast", "parameter", "constant", "fusion", "tuple", "get-tuple-element"}
_OPERANDS = re.compile(r"%([\w.\-]+)")


def fp32_copies(hlo_text: str, min_elements: int, table: dict | None = None) -> list[tuple[str, str, list[str]]]:
    """(name, result shape, the ops that read it) for every op that only converts narrow data to
    an fp32 array of at least `min_elements`: XLA:CPU's upcast of a product it cannot run in
    bf16 shows up as one of these feeding the product (benchmarks/RESULTS.md, sixteenth session).
    `table` is hlo_ops(hlo_text) where the caller has it already."""
    table = table if table is not None else hlo_ops(hlo_text)
    readers: dict[str, list[str]] = collections.defaultdict(list)
    for line in hlo_text.splitlines():
        m = _INSTR.match(line)
        if m:
            args = line[m.end():].split(")", 1)[0]
            for operand in _OPERANDS.findall(args):
                readers[operand].append(m.group(1))
    out = []
    for name, (op, reachable, shape) in table.items():
        m = re.fullmatch(r"f32\[([\d,]+)\]", shape.split()[0]) if shape else None
        # op == "fusion": XLA:CPU runs every top-level op as a fusion (a single op as wrapped_*);
        # the plain ops inside fused computations are not separate passes over memory
        if op != "fusion" or not m or "convert" not in reachable or not reachable <= _PURE_CONVERSION:
            continue
        if math.prod(int(d) for d in m.group(1).split(",")) >= min_elements:
            out.append((name, shape, readers.get(name, [])))
    return out


def print_fp32_copies(hlo_text: str, table: dict, min_elements: int) -> None:
    copies = fp32_copies(hlo_text, min_elements, table)
    print(f"\nfp32 copies of narrow arrays (at least {min_elements:,} elements), {len(copies)} found; one read by "
          f"a matmul is a product XLA:CPU upcast, the rest is fp32 math (norms, softmax) or a normalised copy:")
    for name, shape, readers in copies:
        read = ", ".join(f"{r} ({categorize(*table[r]) if r in table else '?'}, {table[r][2] if r in table else '?'})"
                         for r in readers[:3])
        print(f"  {name:34s} {shape:22s} read by {read or 'nothing in its computation'}")


def categorize(op: str, reachable: set[str], shape: str = "") -> str:
    if reachable & {"dot", "convolution"} or (op == "custom-call" and not reachable - {"custom-call", "parameter"}):
        return "matmul"
    if "exponential" in reachable and "reduce" in reachable:
        return "attention softmax"
    if "reduce" in reachable:
        return "norm / reduction"
    if reachable - {"fusion"} <= {"copy", "transpose", "parameter", "bitcast", "tuple", "get-tuple-element"}:
        return "copy / transpose"
    if op in ("fusion", "add", "multiply", "subtract", "divide", "tanh", "exponential", "select", "convert",
              "broadcast", "concatenate", "slice", "dynamic-slice", "dynamic-update-slice", "rsqrt", "maximum"):
        return "elementwise (modulation, RoPE, gates, GELU)"
    return "other"


def trace_op_times(fn, runs: int, trace_dir: str) -> dict[str, float]:
    """Summed duration (µs) per executed op name over `runs` calls, from a jax.profiler trace."""
    import jax

    with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
        for _ in range(runs):
            fn()
    path = sorted(glob.glob(os.path.join(trace_dir, "**", "perfetto_trace.json.gz"), recursive=True))[-1]
    data = json.load(gzip.open(path))
    events = data["traceEvents"] if isinstance(data, dict) else data
    out: dict[str, float] = collections.Counter()
    for e in events:
        if e.get("ph") == "X" and "dur" in e:
            out[e["name"]] += float(e["dur"])
    return out


def memory_bandwidth(mib: int = 256, repeat: int = 5) -> float:
    """Bytes/s of a streaming read+write (y = x * c) through XLA on this device."""
    import jax
    import jax.numpy as jnp

    x = jnp.ones((mib * 2**20 // 4,), jnp.float32)
    f = jax.jit(lambda v: v * 1.0001)
    f(x).block_until_ready()
    t = min(_time(lambda: f(x).block_until_ready()) for _ in range(repeat))
    return 2 * x.nbytes / t


def xla_cost(cfg, shapes, dtype) -> tuple[float, float]:
    """(FLOPs, bytes accessed) of one forward from XLA's cost analysis, on a never-allocated model.

    XLA counts a while loop's body once, so the model is compiled with its layer stacks unrolled and
    with one N×N XLA attention (no query-block loop): then every layer is counted."""
    import jax
    from flax import nnx

    from pico_jax.model.flux import abstract_model

    graphdef, state = nnx.split(abstract_model(cfg.replace(scan_unroll=0), dtype=dtype, param_dtype=dtype))
    with forced_attention("xla"):
        lowered = jax.jit(lambda st, *a: nnx.merge(graphdef, st)(*a)).lower(state, *shapes)
    return _cost(lowered.compile())


@contextlib.contextmanager
def forced_attention(name: str):
    """PICO_JAX_ATTENTION=name while tracing inside the block, the environment as it was after."""
    before = os.environ.get("PICO_JAX_ATTENTION")
    os.environ["PICO_JAX_ATTENTION"] = name
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("PICO_JAX_ATTENTION")
        else:
            os.environ["PICO_JAX_ATTENTION"] = before


def cfg_param_bytes(cfg, dtype) -> int:
    import jax
    from flax import nnx

    from pico_jax.model.flux import abstract_model

    state = nnx.state(abstract_model(cfg, dtype=dtype, param_dtype=dtype))
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state))


def op_breakdown(run, table: dict, runs: int, trace_dir: str | None):
    """(category → µs per call, [(µs per call, op name, category, result shape)]) from a trace of
    `runs` calls of `run`, every op attributed through the compiled program's `hlo_ops` table."""
    with tempfile.TemporaryDirectory() as tmp:
        times = trace_op_times(run, runs, trace_dir or tmp)
    per_cat: dict[str, float] = collections.Counter()
    per_op = []
    for name, us in times.items():
        if name not in table or table[name][0] in _CONTAINERS:
            continue  # host-side events, and loops whose bodies are counted op by op
        cat = categorize(*table[name])
        per_cat[cat] += us / runs
        per_op.append((us / runs, name, cat, table[name][2]))
    return per_cat, per_op


def print_breakdown(per_cat, per_op, *, what: str, wall: float, flops: float, peak: float, top: int) -> None:
    total = sum(per_cat.values())
    print(f"\nwhere the time goes (summed op time {total / 1e3:.1f} ms per {what}, wall {wall * 1e3:.1f} ms):")
    print(f"| category | ms per {what} | share |")
    print("|---|---|---|")
    for cat in CATEGORIES:
        if per_cat.get(cat):
            print(f"| {cat} | {per_cat[cat] / 1e3:.1f} | {per_cat[cat] / total:.0%} |")
    if per_cat.get("matmul"):
        rate = flops / (per_cat["matmul"] / 1e6)
        print(f"matmul ops run at {rate / 1e9:.1f} GFLOP/s ({rate / peak:.0%} of the measured matmul rate)")
    print(f"\nslowest {top} ops (ms per {what}):")
    for us, name, cat, shape in sorted(per_op, reverse=True)[:top]:
        print(f"  {us / 1e3:7.2f}  {name:28s} {cat:20.20s} -> {shape}")


def report_ops(compiled, run, args, *, what: str, wall: float, flops: float, peak: float) -> None:
    """Where a compiled program's time goes, op by op, and (narrow dtypes) its fp32 copies."""
    hlo = compiled.as_text()
    table = hlo_ops(hlo)
    per_cat, per_op = op_breakdown(run, table, args.runs, args.trace_dir)
    print_breakdown(per_cat, per_op, what=what, wall=wall, flops=flops, peak=peak, top=args.top)
    if args.dtype != "float32":
        print_fp32_copies(hlo, table, args.upcast_min)


def median_wall(run, runs: int) -> float:
    n = max(runs, 3)
    return sorted(_time(run) for _ in range(n))[n // 2]


def machine_limits(dtype: str) -> tuple[float, float]:
    """Print this machine's matmul rate for `dtype` and its stream bandwidth; return (peak FLOP/s, bytes/s)."""
    rate_jax, rate_torch = matmul_rate(dtype=dtype)
    peak = max(rate_jax, rate_torch)
    bw = memory_bandwidth()
    print(f"machine: {dtype} matmul {peak / 1e9:.1f} GFLOP/s (jax {rate_jax / 1e9:.1f}, torch {rate_torch / 1e9:.1f}), "
          f"stream bandwidth {bw / 1e9:.1f} GB/s")
    return peak, bw


def _cost(compiled) -> tuple[float, float]:
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost.get("flops", 0.0)), float(cost.get("bytes accessed", 0.0))


def _temporaries(compiled) -> str:
    mem = compiled.memory_analysis()
    return f"{mem.temp_size_in_bytes / 2**20:.0f} MiB" if mem is not None else "n/a"


def profile_lora(args) -> None:
    """The LoRA training step of ab_compare.py: cost analysis of its unrolled all-heads form, then
    the step as it runs, timed and traced."""
    import jax

    from ab_compare import build_program
    from pico_jax.model.attention import attention_implementation

    base = dict(program="lora", dtype=args.dtype, double=args.double, single=args.single, width=args.width,
                head_dim=args.head_dim, tokens=args.tokens, text=args.text, rank=args.rank,
                source=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    n_img, n_txt = args.tokens**2, args.text
    with forced_attention("xla"):
        fn, fargs, _ = build_program(dict(base, overrides={"scan_unroll": 0}))
        lowered = fn.lower(*fargs)
    xla_flops, xla_bytes = _cost(lowered.compile())
    dev = jax.devices()[0]
    print(f"device: {dev.platform} ({dev.device_kind}), {os.cpu_count()} host cores, jax {jax.__version__}")
    print(f"program: LoRA step (forward, backward on rank-{args.rank} factors, AdamW) of the reduced FLUX: "
          f"{args.double} double + {args.single} single blocks, width {args.width}, {n_img} image + {n_txt} text "
          f"tokens, batch 1, {args.dtype}")
    print("the two numbers (XLA cost analysis of the unrolled step with one N×N XLA attention, autodiff):")
    print(f"  FLOPs {xla_flops / 1e9:.3g} G; bytes accessed {xla_bytes / 2**30:.2f} GiB; "
          f"{xla_flops / xla_bytes:.0f} FLOP/byte")
    fn, fargs, summary = build_program(dict(base, overrides={}))
    t0 = time.perf_counter()
    compiled = fn.lower(*fargs).compile()
    print(f"the step as it runs (scanned stacks, attention: "
          f"{attention_implementation(getattr(jax.numpy, args.dtype), args.head_dim, n_img + n_txt)}) compiles in "
          f"{time.perf_counter() - t0:.1f} s; temporaries {_temporaries(compiled)}")

    def run():
        return jax.block_until_ready(compiled(*fargs))

    print(f"  loss {summary(run()):.6g}")
    wall = median_wall(run, args.runs)
    peak, _ = machine_limits(args.dtype)
    print(f"step: median {wall * 1e3:.1f} ms = {xla_flops / wall / 1e9:.1f} GFLOP/s (XLA's FLOPs of the autodiff "
          f"graph; the step as it runs recomputes attention probabilities in its backward) = "
          f"{xla_flops / wall / peak:.0%} of the matmul rate")
    report_ops(compiled, run, args, what="step", wall=wall, flops=xla_flops, peak=peak)


def profile_forward(args) -> None:
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from pico_jax.model.attention import attention_implementation
    from pico_jax.model.flux import FluxConfig, FluxTransformer

    dtype = getattr(jnp, args.dtype)
    if args.config:
        cfg = FluxConfig.named(args.config)
    else:
        heads = args.width // args.head_dim
        side = args.head_dim * 7 // 16
        cfg = FluxConfig(num_double=args.double, num_single=args.single, num_heads=heads, head_dim=args.head_dim,
                         axes_dims_rope=(args.head_dim - 2 * side, side, side), in_channels=64, out_channels=64,
                         context_dim=4096, pooled_dim=768, guidance_embeds=True)
    width = cfg.num_heads * cfg.head_dim
    n_img, n_txt, B = args.tokens**2, args.text, args.batch
    S = jax.ShapeDtypeStruct
    shapes = (S((B, n_img, cfg.in_channels), dtype), S((B, n_txt, cfg.context_dim), dtype), S((B, cfg.pooled_dim), dtype),
              S((B,), jnp.float32), S((n_img, 3), jnp.float32), S((n_txt, 3), jnp.float32),
              S((B,), jnp.float32) if cfg.guidance_embeds else None)
    t0 = time.perf_counter()
    xla_flops, xla_bytes = xla_cost(cfg, shapes, dtype)
    cost_s = time.perf_counter() - t0
    flops = B * forward_flops(width, cfg.num_double, cfg.num_single, n_img, n_txt, cfg.in_channels, cfg.context_dim,
                              cfg.output_channels, cfg.mlp_ratio)
    param_bytes = cfg_param_bytes(cfg, dtype)
    dev = jax.devices()[0]
    print(f"device: {dev.platform} ({dev.device_kind}), {os.cpu_count()} host cores, jax {jax.__version__}")
    print(f"model: {args.config or 'reduced FLUX'}: {cfg.num_double} double + {cfg.num_single} single blocks, width "
          f"{width}, {n_img} image + {n_txt} text tokens, batch {B}, {args.dtype}")
    print(f"the two numbers (XLA cost analysis of the unrolled forward with one N×N XLA attention; {cost_s:.0f} s):")
    print(f"  FLOPs {xla_flops / 1e9:.3g} G (analytic count of matmuls + attention: {flops / 1e9:.3g} G)")
    print(f"  bytes accessed {xla_bytes / 2**30:.2f} GiB (parameters alone {param_bytes / 2**30:.2f} GiB); "
          f"{xla_flops / xla_bytes:.0f} FLOP/byte")
    if args.no_run:
        return
    model = FluxTransformer(cfg, rngs=nnx.Rngs(0), dtype=dtype, param_dtype=dtype)
    graphdef, state = nnx.split(model)
    t0 = time.perf_counter()
    compiled = jax.jit(lambda st, *a: nnx.merge(graphdef, st)(*a)).lower(state, *shapes).compile()
    print(f"the model as it runs (scanned stacks, attention: "
          f"{attention_implementation(dtype, cfg.head_dim, n_img + n_txt)}) compiles in {time.perf_counter() - t0:.1f} s; "
          f"temporaries {_temporaries(compiled)}")

    g = jax.random.split(jax.random.key(0), 4)
    inputs = [jax.random.normal(g[0], shapes[0].shape, dtype), jax.random.normal(g[1], shapes[1].shape, dtype),
              jax.random.normal(g[2], shapes[2].shape, dtype), jnp.full((B,), 0.5, jnp.float32),
              jnp.zeros((n_img, 3), jnp.float32), jnp.zeros((n_txt, 3), jnp.float32),
              jnp.full((B,), 3.5, jnp.float32) if cfg.guidance_embeds else None]

    def run():
        return compiled(state, *inputs).block_until_ready()

    run()
    wall = median_wall(run, args.runs)
    peak, bw = machine_limits(args.dtype)
    t_compute, t_memory = xla_flops / peak, xla_bytes / bw
    print(f"forward: median {wall * 1e3:.1f} ms = {flops / wall / 1e9:.1f} GFLOP/s (analytic FLOPs) = "
          f"{flops / wall / peak:.0%} of the matmul rate")
    print(f"roofline of the all-heads XLA graph: compute {t_compute * 1e3:.0f} ms, bytes {t_memory * 1e3:.0f} ms "
          f"(the headwise/fused attention that runs moves fewer bytes than this graph counts)")
    report_ops(compiled, run, args, what="forward", wall=wall, flops=flops, peak=peak)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--program", choices=("forward", "lora"), default="forward",
                    help="forward (default), or lora: one LoRA training step of the reduced model")
    ap.add_argument("--config", default=None, help="a named FluxConfig (flux1-dev, ...) instead of the reduced model "
                                                   "(--program forward only)")
    add_reduced_flux_args(ap)
    ap.add_argument("--batch", type=int, default=1, help="batch size (--program forward only; the step uses 1)")
    ap.add_argument("--rank", type=int, default=16, help="LoRA rank (--program lora)")
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    ap.add_argument("--runs", type=int, default=3, help="traced runs (after one warm-up)")
    ap.add_argument("--top", type=int, default=12, help="slowest ops to list")
    ap.add_argument("--upcast-min", type=int, default=500_000, metavar="N",
                    help="bf16 runs: list fp32 copies of narrow arrays of at least N elements (default 500000)")
    ap.add_argument("--trace-dir", default=None, help="keep the profiler trace here (default: a temp dir)")
    ap.add_argument("--no-run", action="store_true", help="compile and print the cost analysis only (forward)")
    args = ap.parse_args(argv)
    if args.width % args.head_dim:
        ap.error(f"--width {args.width} is not a multiple of --head-dim {args.head_dim}")
    if args.program == "lora":
        for flag, bad in (("--config", args.config), ("--batch", args.batch != 1), ("--no-run", args.no_run)):
            if bad:
                ap.error(f"{flag} applies to --program forward only")
        profile_lora(args)
    else:
        profile_forward(args)
    if args.trace_dir:
        print(f"\ntrace kept in {args.trace_dir} (tensorboard --logdir {args.trace_dir}, or open the perfetto file)")


if __name__ == "__main__":
    main()
