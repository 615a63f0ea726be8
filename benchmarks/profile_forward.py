"""Profile the jitted FLUX forward: the two numbers (FLOPs and bytes, from XLA's cost analysis and
counted analytically), the machine's two limits (measured matmul rate and memory bandwidth), the
roofline bound they imply, and where the time goes (a jax.profiler trace, every executed HLO op
attributed to a category by what its fused computation contains).

    python benchmarks/profile_forward.py [--double 2 --single 4 --width 512 --tokens 32 --text 32]
    python benchmarks/profile_forward.py --trace-dir /tmp/prof   # keep the trace (TensorBoard / Perfetto)
    python benchmarks/profile_forward.py --config flux1-dev --tokens 64 --text 512 --dtype bfloat16 --no-run
                                             # full size: cost analysis only (compiled, never allocated)

Default: the reduced model of bench_forward.py (2 double + 4 single blocks, width 512, 1024 image +
32 text tokens, batch 1, fp32). Category times are sums over the traced runs divided by the number
of runs; ops of one category can overlap on several cores, so shares are of the summed op time.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from bench_forward import _time, forward_flops, matmul_rate  # noqa: E402

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
    before = os.environ.get("PICO_JAX_ATTENTION")
    os.environ["PICO_JAX_ATTENTION"] = "xla"
    try:
        lowered = jax.jit(lambda st, *a: nnx.merge(graphdef, st)(*a)).lower(state, *shapes)
    finally:
        if before is None:
            os.environ.pop("PICO_JAX_ATTENTION")
        else:
            os.environ["PICO_JAX_ATTENTION"] = before
    cost = lowered.compile().cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost.get("flops", 0.0)), float(cost.get("bytes accessed", 0.0))


def cfg_param_bytes(cfg, dtype) -> int:
    import jax
    from flax import nnx

    from pico_jax.model.flux import abstract_model

    state = nnx.state(abstract_model(cfg, dtype=dtype, param_dtype=dtype))
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=None, help="a named FluxConfig (flux1-dev, ...) instead of the reduced model")
    ap.add_argument("--double", type=int, default=2)
    ap.add_argument("--single", type=int, default=4)
    ap.add_argument("--width", type=int, default=512)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--tokens", type=int, default=32, help="canvas side in tokens (image tokens = tokens^2)")
    ap.add_argument("--text", type=int, default=32)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--runs", type=int, default=3, help="traced runs (after one warm-up)")
    ap.add_argument("--top", type=int, default=12, help="slowest ops to list")
    ap.add_argument("--trace-dir", default=None, help="keep the profiler trace here (default: a temp dir)")
    ap.add_argument("--no-run", action="store_true", help="compile and print the cost analysis only")
    args = ap.parse_args(argv)

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
    print(f"  FLOPs {xla_flops / 1e9:.1f} G (analytic count of matmuls + attention: {flops / 1e9:.1f} G)")
    print(f"  bytes accessed {xla_bytes / 2**30:.2f} GiB (parameters alone {param_bytes / 2**30:.2f} GiB); "
          f"{xla_flops / xla_bytes:.0f} FLOP/byte")
    if args.no_run:
        return
    model = FluxTransformer(cfg, rngs=nnx.Rngs(0), dtype=dtype, param_dtype=dtype)
    graphdef, state = nnx.split(model)
    t0 = time.perf_counter()
    compiled = jax.jit(lambda st, *a: nnx.merge(graphdef, st)(*a)).lower(state, *shapes).compile()
    print(f"the model as it runs (scanned stacks, attention: "
          f"{attention_implementation(dtype, cfg.head_dim, n_img + n_txt)}) compiles in {time.perf_counter() - t0:.1f} s")

    g = jax.random.split(jax.random.key(0), 4)
    inputs = [jax.random.normal(g[0], shapes[0].shape, dtype), jax.random.normal(g[1], shapes[1].shape, dtype),
              jax.random.normal(g[2], shapes[2].shape, dtype), jnp.full((B,), 0.5, jnp.float32),
              jnp.zeros((n_img, 3), jnp.float32), jnp.zeros((n_txt, 3), jnp.float32),
              jnp.full((B,), 3.5, jnp.float32) if cfg.guidance_embeds else None]

    def run():
        return compiled(state, *inputs).block_until_ready()

    run()
    wall = sorted(_time(run) for _ in range(max(args.runs, 3)))[len(range(max(args.runs, 3))) // 2]
    rate_jax, rate_torch = matmul_rate()
    peak = max(rate_jax, rate_torch)
    bw = memory_bandwidth()
    t_compute, t_memory = xla_flops / peak, xla_bytes / bw
    print(f"machine: matmul {peak / 1e9:.1f} GFLOP/s (jax {rate_jax / 1e9:.1f}, torch {rate_torch / 1e9:.1f}), "
          f"stream bandwidth {bw / 1e9:.1f} GB/s")
    print(f"forward: median {wall * 1e3:.1f} ms = {flops / wall / 1e9:.1f} GFLOP/s (analytic FLOPs) = "
          f"{flops / wall / peak:.0%} of the matmul rate")
    print(f"roofline of the all-heads XLA graph: compute {t_compute * 1e3:.0f} ms, bytes {t_memory * 1e3:.0f} ms "
          f"(the headwise/fused attention that runs moves fewer bytes than this graph counts)")

    table = hlo_ops(compiled.as_text())
    with tempfile.TemporaryDirectory() as tmp:
        times = trace_op_times(run, args.runs, args.trace_dir or tmp)
    per_cat: dict[str, float] = collections.Counter()
    per_op = []
    for name, us in times.items():
        if name not in table or table[name][0] in _CONTAINERS:
            continue  # host-side events, and loops whose bodies are counted op by op
        cat = categorize(*table[name])
        per_cat[cat] += us / args.runs
        per_op.append((us / args.runs, name, cat, table[name][2]))
    total = sum(per_cat.values())
    print(f"\nwhere the time goes (summed op time {total / 1e3:.1f} ms per forward, wall {wall * 1e3:.1f} ms):")
    print("| category | ms per forward | share |")
    print("|---|---|---|")
    for cat in CATEGORIES:
        if per_cat.get(cat):
            print(f"| {cat} | {per_cat[cat] / 1e3:.1f} | {per_cat[cat] / total:.0%} |")
    if per_cat.get("matmul"):
        print(f"matmul ops run at {flops / (per_cat['matmul'] / 1e6) / 1e9:.1f} GFLOP/s "
              f"({flops / (per_cat['matmul'] / 1e6) / peak:.0%} of the measured matmul rate)")
    print(f"\nslowest {args.top} ops (ms per forward):")
    for us, name, cat, shape in sorted(per_op, reverse=True)[: args.top]:
        print(f"  {us / 1e3:7.2f}  {name:28s} {cat:20.20s} -> {shape}")
    if args.trace_dir:
        print(f"\ntrace kept in {args.trace_dir} (tensorboard --logdir {args.trace_dir}, or open the perfetto file)")


if __name__ == "__main__":
    main()
