#!/usr/bin/env python
"""Issue #7's GPU targets in one script: FLUX.1-dev size, bf16, a 1024x1024 canvas (4096 image +
512 text tokens), batch 1. Runs at toy size on CPU too (--toy), so it is known to work before a GPU
is ever lent.

Sections (--sections, comma-separated; default all; each failure is reported and the rest go on;
one that fails with the fused attention kernel, cuDNN's on a GPU, runs once more with XLA's, and
the summary says which numbers that gave):
  matmul     the measured bf16 matmul rate: jitted jax `x @ y` (8192^2 on GPU; 1024^2 with --toy
             or on CPU), min over repeats; torch's on the same device too, if torch sees it.
             Any section that needs the rate (forward) measures it once, so it is always printed.
  forward    our FLUX transformer, random init directly in bf16, jitted; median ms, TFLOP/s
             (analytic matmul FLOPs, bench_forward.forward_flops) and the fraction of the best
             measured matmul rate (target >= 55 %); which attention kernel ran.
  diffusers  the same weights in diffusers' FluxTransformer2DModel (bf16, SDPA attention, the
             default): max relative difference of the outputs (parity), then ours and theirs
             timed interleaved; speed-up ours/diffusers (target >= 1.2x).
  sample     a FLUX.1-Fill-style PICO sample (pico_jax.pipeline.sample) with the Fill config of
             the model (in 384 = [noisy 64 | masked canvas 64 | mask 256], out 64): one T-step
             sample (selection=random, 1 seed), best-of-S full, best-of-S early (k scored steps,
             keep m); early/one target <= 2x. There are no VAE weights, so cond/known are random
             latent tokens of the right shapes: the VAE encode/decode is NOT timed.
  lora       one LoRA training step (rank 16 on every block's attention + MLP projections, base
             frozen, AdamW, masked flow-matching MSE on the B' quarter of the tokens), Fill config
             with remat (--remat full|dots), batch 1: median step time, TFLOP/s and the fraction
             of the matmul rate (the step's FLOPs counted in its jaxpr, pico_jax.flops, with
             remat's recomputation), the compiled program's memory (XLA memory_analysis) and the
             device's peak memory (memory_stats; n/a on CPU).

On a GPU session. First, here (pure-Python wheel; `.whl/` is git-ignored, so it must be carried):

  python3 -m pip download --no-deps --only-binary=:all: -d .whl diffusers==0.42.1

then one call of the device tool `run` (it runs in the repo root; `python3` there holds jax[cuda],
flax, optax, torch, transformers). A session now has 15 minutes of device time, the machine's
start included, and one call at most 10; so run everything in one call, under a budget:

  run(carry=[".whl"], timeout_s=480, command="set -o pipefail; python3 -m pip install -q --no-index
      --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl &&
      export PYTHONPATH=/tmp/site || exit; PYTHONUNBUFFERED=1 python3 benchmarks/bench_gpu_flux.py
      --budget-s 420 --results-json $OUT/results.json 2>&1 | tee $OUT/bench.log")

--budget-s runs each group of sections in a process of its own, most important first, each given
what is left of the budget and killed past it: (1) matmul, forward, diffusers (the forward targets;
diffusers reuses the forward's weights), (2) sample one,early (the early/one target), (3) lora
(alone, so the device's peak memory is the step's), (4) sample full. What ran is printed as it
runs, and the summary says which groups did not fit; --results-json (written after every section,
so a killed run keeps what it measured) has every number. If device time is left (`status`), a
second call can take what did not fit (e.g. --sections lora --remat auto: the GPU's own plans for
remat none, dots and full, and the step the trainer's remat="auto" would run, timed against the
default full; or --sample-modes full).
Without --budget-s every section runs in this one process, in the order listed above.

Before a GPU is lent (every section, tiny, on CPU; tests/test_bench_gpu_smoke.py runs this):

  .venv/bin/python benchmarks/bench_gpu_flux.py --toy

The model's weights are random (no checkpoint is loaded); timings do not depend on the values.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable
from typing import Any

# jax would otherwise take 75 % of the GPU at start-up, leaving torch (diffusers) too little.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_dtypes  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from bench_forward import forward_flops  # noqa: E402
from pico_jax.flops import peak_tflops, program_flops  # noqa: E402
from pico_jax.model.flux import FluxConfig, FluxTransformer, abstract_model, count_params  # noqa: E402

SECTIONS = ("matmul", "forward", "diffusers", "sample", "lora")
TARGET_MATMUL_FRACTION = 0.55  # forward TFLOP/s / measured bf16 matmul rate
TARGET_VS_DIFFUSERS = 1.2  # diffusers time / our time
TARGET_EARLY_OVER_ONE = 2.0  # best-of-8 early selection / one sample
# Max |ours - diffusers| / max |diffusers|: two bf16 implementations differ in rounding order
# (fused QKV, cuDNN vs SDPA kernels) over 57 blocks; fp32 should agree to float rounding.
PARITY_TOLERANCE = {"bfloat16": 5e-2, "float16": 5e-2, "float32": 1e-4}
AE_CHANNELS, AE_FACTOR = 16, 8  # FLUX's VAE: 16 latent channels, 8x downsampling
GiB = 2.0**30


# ------------------------------------------------------------------------------------ helpers
def toy_config() -> FluxConfig:
    """A FLUX small enough to compile and run every section on 2 busy CPU cores in seconds."""
    return FluxConfig(num_double=1, num_single=1, num_heads=2, head_dim=64, axes_dims_rope=(8, 28, 28),
                      context_dim=64, pooled_dim=32, in_channels=64)


def fill_config(cfg: FluxConfig) -> FluxConfig:
    """The Fill variant of a config: input [noisy | masked canvas latents | packed mask], output the
    velocity of the noisy latents (FluxConfig.flux1_fill_dev for the full-size model)."""
    latent = 4 * AE_CHANNELS  # 2x2-packed latent tokens
    return cfg.replace(in_channels=2 * latent + 4 * AE_FACTOR**2, out_channels=latent)


def make_model(cfg: FluxConfig, dtype: Any) -> FluxTransformer:
    """Random init directly in `dtype`. On an accelerator, FluxTransformer's own init under jit, so
    a 12 B-parameter init needs no per-op temporaries (eagerly, the RNG bits of the largest stacked
    kernel alone are 10 GB). On CPU, numpy fills the same shapes (N(0, 1/fan_in) kernels, zero
    biases, unit norm scales): XLA:CPU takes longer to compile the RNG program than the toy's forward."""
    if jax.default_backend() == "cpu":
        return numpy_init_model(cfg, dtype)
    build = lambda: FluxTransformer(cfg, rngs=nnx.Rngs(0), dtype=dtype, param_dtype=dtype)  # noqa: E731
    try:
        return nnx.jit(build)()
    except Exception as e:  # a flax whose nnx.jit cannot return a new module: eager init
        print(f"  (nnx.jit init failed: {type(e).__name__}: {e}; initializing eagerly)", flush=True)
        return build()


def numpy_init_model(cfg: FluxConfig, dtype: Any, seed: int = 0) -> FluxTransformer:
    """The model with host-generated random parameters (no XLA compile; for small models)."""
    graphdef, abstract = nnx.split(abstract_model(cfg, dtype, dtype))
    rng = np.random.default_rng(seed)
    np_dtype = ml_dtypes.bfloat16 if jnp.dtype(dtype) == jnp.bfloat16 else jnp.dtype(dtype)

    def fill(path: tuple, leaf: jax.ShapeDtypeStruct) -> jax.Array:
        name = [getattr(k, "key") for k in path if isinstance(k, jax.tree_util.DictKey)][-1]
        if name == "kernel":
            value = rng.standard_normal(leaf.shape, np.float32) / np.sqrt(leaf.shape[-2])
        elif name == "scale":
            value = np.ones(leaf.shape, np.float32)
        else:
            value = np.zeros(leaf.shape, np.float32)
        return jnp.asarray(value.astype(np_dtype))

    return nnx.merge(graphdef, jax.tree_util.tree_map_with_path(fill, abstract))


def timed(fn: Callable[[], Any]) -> float:
    """Wall seconds of fn(); fn must block until its result is ready."""
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def fmt_runs(runs: list[float], scale: float = 1e3, digits: int = 1) -> str:
    return ", ".join(f"{r * scale:.{digits}f}" for r in runs)


def free_memory() -> None:
    """Drop unreachable device buffers now (jax frees an array's memory when it is collected)."""
    gc.collect()
    torch = sys.modules.get("torch")  # only if a section imported it: importing torch takes seconds
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()


def torch_module() -> Any | None:
    try:
        import torch

        return torch
    except ImportError:
        return None


def torch_device(torch: Any) -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def torch_sync(torch: Any, device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def to_torch(torch: Any, a: np.ndarray, device: str) -> Any:
    """numpy (ml_dtypes bfloat16 included, which torch.from_numpy rejects) → torch on device."""
    if device == "cpu" and not a.flags.writeable:
        a = a.copy()  # .to("cpu") would alias it, and torch wants writable memory
    a = np.ascontiguousarray(a)
    with warnings.catch_warnings():  # read-only arrays (from jax) are copied to the GPU at once
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        if a.dtype == ml_dtypes.bfloat16:
            return torch.from_numpy(a.view(np.int16)).view(torch.bfloat16).to(device)
        return torch.from_numpy(a).to(device)


def memory_line() -> str:
    """The device's current and peak memory in use, where the backend reports it (GPU; not CPU)."""
    try:
        stats = jax.devices()[0].memory_stats()
    except Exception:  # some backends raise instead of returning None
        stats = None
    if not stats or "peak_bytes_in_use" not in stats:
        return "device peak memory n/a"
    limit = stats.get("bytes_limit")
    return (f"device peak memory {stats['peak_bytes_in_use'] / GiB:.2f} GiB (in use now "
            f"{stats.get('bytes_in_use', 0) / GiB:.2f} GiB" + (f" of {limit / GiB:.1f}" if limit else "") + ")")


# ------------------------------------------------------------------------------ shared state
@dataclasses.dataclass
class Bench:
    """Settings, the forward-size model and inputs shared by the forward and diffusers sections,
    and every result for the summary."""

    args: argparse.Namespace
    cfg: FluxConfig
    dtype: Any
    results: dict[str, Any] = dataclasses.field(default_factory=dict)
    ran: list[str] = dataclasses.field(default_factory=list)
    _model: FluxTransformer | None = None
    _forward: Callable[..., jax.Array] | None = None
    _inputs: dict[str, np.ndarray] | None = None

    @property
    def n_img(self) -> int:
        return self.args.tokens**2

    @property
    def on_gpu(self) -> bool:
        return jax.default_backend() == "gpu"

    def model(self) -> FluxTransformer:
        if self._model is None:
            t = timed(lambda: jax.block_until_ready(nnx.state(self._build())))
            print(f"  (built {self.cfg.num_double}+{self.cfg.num_single}-block model, "
                  f"{count_params(nnx.state(self._model)) / 1e9:.3f} B params, {jnp.dtype(self.dtype).name}, "
                  f"in {t:.1f} s)", flush=True)
        return self._model

    def _build(self) -> FluxTransformer:
        self._model = make_model(self.cfg, self.dtype)
        return self._model

    def forward(self) -> Callable[..., jax.Array]:
        """The model's jitted forward, one for the forward and diffusers sections: a second
        `jit_forward` is a new function, and compiled FLUX.1-dev again out of a short lease."""
        from pico_jax.model.flux import jit_forward

        if self._forward is None:
            self._forward = jit_forward(self.model())
        return self._forward

    def release_model(self) -> None:
        """Free the forward-size model before a section builds its own (2 x 24 GB at full size)."""
        self._model = self._forward = None
        free_memory()

    def inputs(self) -> dict[str, np.ndarray]:
        """Forward inputs as numpy in the model dtype (so jax and torch see identical values),
        built as bench_forward.py does: image ids (0, row, col), text ids 0. Both sides round t and
        guidance to the model dtype before x1000 (scaled_time; 3.5 -> 3504 in bf16); t = 0.5 and
        guidance 4.0 make that product exact, so the parity line measures the network alone (a
        deep random-init bf16 stack amplifies any input difference)."""
        if self._inputs is None:
            cfg, side, n_txt = self.cfg, self.args.tokens, self.args.text
            g = np.random.default_rng(0)
            np_dtype = ml_dtypes.bfloat16 if jnp.dtype(self.dtype) == jnp.bfloat16 else jnp.dtype(self.dtype)
            rows, cols = np.meshgrid(np.arange(side), np.arange(side), indexing="ij")
            self._inputs = dict(
                hidden_states=g.standard_normal((1, self.n_img, cfg.in_channels)).astype(np_dtype),
                encoder_hidden_states=g.standard_normal((1, n_txt, cfg.context_dim)).astype(np_dtype),
                pooled_projections=g.standard_normal((1, cfg.pooled_dim)).astype(np_dtype),
                timestep=np.array([0.5], np.float32),
                img_ids=np.stack([np.zeros(self.n_img), rows.ravel(), cols.ravel()], -1).astype(np.float32),
                txt_ids=np.zeros((n_txt, 3), np.float32),
            )
            if cfg.guidance_embeds:
                self._inputs["guidance"] = np.array([4.0], np.float32)
        return self._inputs

    def flops(self) -> float:
        cfg = self.cfg
        return forward_flops(cfg.width, cfg.num_double, cfg.num_single, self.n_img, self.args.text, cfg.in_channels,
                             cfg.context_dim, cfg.output_channels, cfg.mlp_ratio)


# ----------------------------------------------------------------------------------- sections
def measure(run: Callable[[], Any], repeat: int) -> tuple[float, list[float]]:
    """(seconds of the first call: compile + run, [seconds of each of `repeat` later calls])."""
    first = timed(run)
    return first, [timed(run) for _ in range(repeat)]


def jax_matmul_rate(n: int, inner: int, repeat: int) -> float:
    """FLOP/s of a jitted bf16 `x @ y` (n x n), `inner` products per timing so launch overhead is
    amortized, best of `repeat` timings."""
    kx, ky = jax.random.split(jax.random.key(0))
    x = jax.random.normal(kx, (n, n), jnp.bfloat16)
    y = jax.random.normal(ky, (n, n), jnp.bfloat16)
    mm = jax.jit(lambda a, b: a @ b)
    jax.block_until_ready(mm(x, y))

    def run() -> None:
        for _ in range(inner):
            out = mm(x, y)
        jax.block_until_ready(out)

    return 2.0 * n**3 * inner / min(timed(run) for _ in range(repeat))


def torch_matmul_rate(torch: Any, device: str, n: int, inner: int, repeat: int) -> float:
    """The same for torch.mm on `device`."""
    a = torch.randn(n, n, dtype=torch.bfloat16, device=device)
    b = torch.randn(n, n, dtype=torch.bfloat16, device=device)
    torch.mm(a, b)
    torch_sync(torch, device)

    def run() -> None:
        for _ in range(inner):
            torch.mm(a, b)
        torch_sync(torch, device)

    return 2.0 * n**3 * inner / min(timed(run) for _ in range(repeat))


def matmul_rates(bench: Bench) -> tuple[float, float | None]:
    """bf16 matmul FLOP/s as jax and (if torch sees this device) torch reach it; measured once
    per process and printed as the `matmul:` line."""
    if "matmul_jax" in bench.results:
        return bench.results["matmul_jax"], bench.results.get("matmul_torch")
    n = 1024 if bench.args.toy or not bench.on_gpu else 8192
    inner = 10 if bench.on_gpu else 1
    repeat = max(bench.args.repeat, 3)
    rate_jax = bench.results["matmul_jax"] = jax_matmul_rate(n, inner, repeat)
    rate_torch, n_torch = None, n
    torch = torch_module()
    # Only the same device counts: torch on CPU beside jax on a GPU would compare nothing.
    if torch is not None and (torch.cuda.is_available() or not bench.on_gpu):
        device = torch_device(torch)
        if device == "cpu":
            n_torch = min(n, 256)  # torch's CPU bf16 matmul is emulated: ~2 s for one 1024^2 product
        rate_torch = bench.results["matmul_torch"] = torch_matmul_rate(torch, device, n_torch, inner, repeat)
    torch_part = (f"torch {rate_torch / 1e12:.3f} TFLOP/s" + (f" (at {n_torch}^2)" if n_torch != n else "")
                  if rate_torch else "torch n/a (torch does not see this device)")
    print(f"matmul: jax {rate_jax / 1e12:.3f} TFLOP/s, {torch_part} (bf16 {n}x{n} @ {n}x{n}, {inner} per timing, "
          f"best of {repeat})", flush=True)
    return rate_jax, rate_torch


def section_matmul(bench: Bench) -> None:
    matmul_rates(bench)


def section_forward(bench: Bench) -> None:
    from pico_jax.model.attention import attention_implementation

    rate_jax, rate_torch = matmul_rates(bench)
    peak = max(rate_jax, rate_torch or 0.0)  # the stricter reference of the two
    cfg, args = bench.cfg, bench.args
    fwd = bench.forward()
    inputs = {k: jnp.asarray(v) for k, v in bench.inputs().items()}
    compile_s, runs = measure(lambda: fwd(**inputs).block_until_ready(), args.repeat)
    med = statistics.median(runs)
    flops = bench.flops()
    kernel = attention_implementation(bench.dtype, cfg.head_dim, bench.n_img + args.text)
    bench.results.update(forward_s=med, forward_fraction=flops / med / peak)
    print(f"forward: {med * 1e3:.2f} ms (median of {args.repeat}; runs {fmt_runs(runs)}), "
          f"{flops / med / 1e12:.2f} TFLOP/s = {flops / med / peak:.1%} of the measured matmul rate "
          f"(target >= {TARGET_MATMUL_FRACTION:.0%}); {flops / 1e12:.3f} TFLOP per forward; attention kernel: {kernel}; "
          f"{cfg.num_double}+{cfg.num_single} blocks, width {cfg.width}, {bench.n_img}+{args.text} tokens, "
          f"{jnp.dtype(bench.dtype).name}; compile+first {compile_s:.1f} s", flush=True)


def diffusers_model(bench: Bench, torch: Any, device: str) -> Any:
    """diffusers' FluxTransformer2DModel holding our weights. Built on the meta device (no
    random init of 12 B parameters on the CPU), then every tensor is assigned from ours."""
    from diffusers import FluxTransformer2DModel

    from pico_jax.convert import flux_state_to_diffusers

    kwargs = {k: v for k, v in bench.cfg.to_diffusers().items() if not k.startswith("_")}
    kwargs["axes_dims_rope"] = tuple(kwargs["axes_dims_rope"])
    with torch.device("meta"):
        tm = FluxTransformer2DModel(**kwargs)
    state = flux_state_to_diffusers(bench.model())
    # One tensor at a time to the device, so the host never holds a second copy of all weights.
    tensors = {name: to_torch(torch, state.pop(name), device) for name in list(state)}
    tm.load_state_dict(tensors, strict=True, assign=True)
    return tm.eval()


def parity(ours: np.ndarray, theirs: np.ndarray) -> tuple[float, float]:
    """(max |ours - theirs| / max |theirs|, ||ours - theirs|| / ||theirs||); the second is less
    driven by a single outlier."""
    diff = ours - theirs
    return (float(np.abs(diff).max() / max(np.abs(theirs).max(), 1e-30)),
            float(np.linalg.norm(diff) / max(np.linalg.norm(theirs), 1e-30)))


def section_diffusers(bench: Bench) -> None:
    try:
        import diffusers
        import torch
    except ImportError as e:
        print(f"diffusers: not installed, skipped (carry the wheel) [{e}]", flush=True)
        return
    args = bench.args
    device = torch_device(torch)
    if bench.on_gpu and device != "cuda":
        print("diffusers: torch does not see the GPU, skipped (a CPU timing would compare nothing)", flush=True)
        return
    t0 = time.perf_counter()
    tm = diffusers_model(bench, torch, device)
    build_s = time.perf_counter() - t0
    np_in = bench.inputs()
    t_in = {k: to_torch(torch, v, device) for k, v in np_in.items()}
    j_in = {k: jnp.asarray(v) for k, v in np_in.items()}
    fwd = bench.forward()  # compiled by the forward section if it ran

    def ours() -> jax.Array:
        return fwd(**j_in).block_until_ready()

    def theirs() -> Any:
        with torch.inference_mode():
            out = tm(**t_in, return_dict=False)[0]
        torch_sync(torch, device)
        return out

    err, rms = parity(np.asarray(ours(), np.float32), theirs().float().cpu().numpy())
    tol = PARITY_TOLERANCE[jnp.dtype(bench.dtype).name]
    bench.results["parity"] = err
    print(f"diffusers parity: max rel diff {err:.2e} (tolerance {tol:.0e}) {'OK' if err <= tol else 'FAIL'}, "
          f"relative RMS diff {rms:.2e} (diffusers {diffusers.__version__}, torch {torch.__version__} on {device}; "
          f"model built in {build_s:.1f} s)", flush=True)
    # Interleaved (ours, theirs, ours, ...) so drifting clocks or background load hit both alike.
    tj, tt = [], []
    for _ in range(args.repeat):
        tj.append(timed(ours))
        tt.append(timed(theirs))
    mj, mt = statistics.median(tj), statistics.median(tt)
    bench.results.update(diffusers_s=mt, ours_vs_diffusers=mt / mj)
    print(f"diffusers: ours {mj * 1e3:.2f} ms (runs {fmt_runs(tj)}), diffusers {mt * 1e3:.2f} ms (runs {fmt_runs(tt)}, "
          f"{bench.flops() / mt / 1e12:.2f} TFLOP/s); speed-up ours/diffusers {mt / mj:.2f}x "
          f"(target >= {TARGET_VS_DIFFUSERS}x)", flush=True)
    del tm, t_in
    free_memory()


def sample_plans(args: argparse.Namespace, guidance: float | None) -> dict[str, tuple[Any, str]]:
    """mode → (SamplingPlan, label) for the three modes of issue #7."""
    from pico_jax.pipeline import SamplingPlan
    from pico_jax.scorer import ScorerConfig

    T, S, m, k = args.steps, args.seeds, args.keep, args.score_steps
    scorer = ScorerConfig(steps=k)  # layers=None: every layer captured, as bench_sampling.py
    return {
        "one": (SamplingPlan(steps=T, seeds=1, keep=1, selection="random", guidance=guidance),
                f"one sample (1 seed, T={T})"),
        "full": (SamplingPlan(steps=T, seeds=S, keep=m, selection="full", scorer=scorer, guidance=guidance),
                 f"best-of-{S} full (all {T} steps scored)"),
        "early": (SamplingPlan(steps=T, seeds=S, keep=m, selection="early", scorer=scorer, guidance=guidance),
                  f"best-of-{S} early (k={k} scored, m={m} finish)"),
    }


def report_sample_ratios(bench: Bench) -> None:
    """Prints each ratio once: a ratio a child process already printed (and recorded) is not
    printed again by the budgeted parent, which adds only those across processes (full/one)."""
    res, args = bench.results, bench.args
    if "sample_one_s" not in res:
        return
    one = res["sample_one_s"]
    T, S, m, k = args.steps, args.seeds, args.keep, args.score_steps
    if "sample_early_s" in res and "early_over_one" not in res:
        res["early_over_one"] = res["sample_early_s"] / one
        print(f"sample: early/one = {res['early_over_one']:.2f} (target <= {TARGET_EARLY_OVER_ONE:.0f}; ideal "
              f"model-call ratio (S*k + m*(T-k))/T = {(S * k + m * (T - k)) / T:.2f})", flush=True)
    if "sample_full_s" in res and "full_over_one" not in res:
        res["full_over_one"] = res["sample_full_s"] / one
        print(f"sample: full/one = {res['full_over_one']:.2f} (ideal {S})", flush=True)


def section_sample(bench: Bench) -> None:
    from pico_jax.pipeline import CanvasLayout, TextConditioning, sample

    bench.release_model()
    args, dt = bench.args, bench.dtype
    cfg = fill_config(bench.cfg)
    graphdef, state = nnx.split(make_model(cfg, dt))
    layout = CanvasLayout(panel=args.tokens * AE_FACTOR, ae_factor=AE_FACTOR)  # tokens per side = P / f
    n, latent = layout.num_tokens, cfg.output_channels
    # Random stand-ins for the autoencoder's outputs (no VAE weights): cond = [masked-canvas
    # latents | packed mask], known = the masked-canvas latents. Their values do not change the time.
    kc, kk = jax.random.split(jax.random.key(1))
    cond = jax.random.normal(kc, (1, n, cfg.in_channels - latent), dt)
    known = jax.random.normal(kk, (1, n, latent), dt)
    text = TextConditioning(jnp.zeros((1, args.text, cfg.context_dim), dt), jnp.zeros((1, cfg.pooled_dim), dt))
    seeds = jnp.arange(args.seeds, dtype=jnp.uint32)
    plans = sample_plans(args, 30.0 if cfg.guidance_embeds else None)  # 30: FLUX.1-Fill-dev's default guidance
    print(f"sample: Fill config, {cfg.num_double}+{cfg.num_single} blocks, width {cfg.width}, in {cfg.in_channels} -> "
          f"out {cfg.output_channels}; canvas {2 * layout.panel}^2 px -> {n} image + {args.text} text tokens; "
          f"scorer captures all {cfg.num_layers} layers; VAE encode/decode not timed (random latents)", flush=True)
    for mode in args.sample_modes:
        plan, label = plans[mode]
        plan = plan.validate()
        sd = seeds[: plan.seeds]
        fn = jax.jit(lambda st, c, kn, tx, s, plan=plan: sample(nnx.merge(graphdef, st), c, kn, tx, s, layout, plan))
        compile_s, runs = measure(lambda: jax.block_until_ready(fn(state, cond, known, text, sd)), args.sample_repeat)
        med = bench.results[f"sample_{mode}_s"] = statistics.median(runs)
        print(f"sample {mode}: {med:.3f} s = {med / args.steps * 1e3:.1f} ms per step  [{label}; "
              f"runs {fmt_runs(runs, 1, 3)} s; compile+first {compile_s:.1f} s]", flush=True)
    report_sample_ratios(bench)
    del state, cond, known
    free_memory()


def lora_batch(cfg: FluxConfig, args: argparse.Namespace, dtype: Any) -> dict[str, jax.Array]:
    """One random Fill-style training example (batch 1): clean and noise latents, the condition
    channels, a prompt, and the B'-quarter token mask the PICO loss is taken over."""
    n, side, latent = args.tokens**2, args.tokens, cfg.output_channels
    keys = jax.random.split(jax.random.key(2), 4)
    rows, cols = np.meshgrid(np.arange(side), np.arange(side), indexing="ij")
    mask = np.zeros(n, np.float32)
    mask[-(n // 4):] = 1.0  # stand-in for the B' panel's tokens
    return dict(
        x0=jax.random.normal(keys[0], (1, n, latent), dtype),
        noise=jax.random.normal(keys[1], (1, n, latent), dtype),
        cond=jax.random.normal(keys[2], (1, n, cfg.in_channels - latent), dtype),
        prompt=jax.random.normal(keys[3], (1, args.text, cfg.context_dim), dtype),
        pooled=jnp.zeros((1, cfg.pooled_dim), dtype),
        t=jnp.array([0.7], jnp.float32),
        img_ids=jnp.asarray(np.stack([np.zeros(n), rows.ravel(), cols.ravel()], -1), jnp.float32),
        txt_ids=jnp.zeros((args.text, 3), jnp.float32),
        mask=jnp.asarray(mask),
    )


def make_lora_step(graphdef: Any, tx: Any, guidance: bool) -> Callable:
    """(lora, opt, base, batch) → (lora, opt, loss): flow-matching loss on B', grads of the LoRA
    factors only, one optimizer update (as pico_jax.trainer's step, without EMA and clipping)."""
    import optax

    from pico_jax.flow import flow_loss, interpolate

    def step(lora, opt, base, batch):
        def loss_of(lora):
            model = nnx.merge(graphdef, lora, base)
            xt = interpolate(batch["x0"], batch["noise"], batch["t"])
            g = jnp.ones((1,), jnp.float32) if guidance else None
            pred = model(jnp.concatenate([xt, batch["cond"]], -1), batch["prompt"], batch["pooled"], batch["t"],
                         batch["img_ids"], batch["txt_ids"], g)
            return flow_loss(pred, batch["x0"], batch["noise"], batch["mask"])

        loss, grads = jax.value_and_grad(loss_of)(lora)
        updates, opt = tx.update(grads, opt, lora)
        return optax.apply_updates(lora, updates), opt, loss

    # Donate the trainable factors and optimizer moments, as a trainer does (updated in place).
    return jax.jit(step, donate_argnums=(0, 1))


def compiled_memory(compiled: Any) -> str:
    try:
        ma = compiled.memory_analysis()
        return (f"compiled: arguments {ma.argument_size_in_bytes / GiB:.2f} GiB, temporaries "
                f"{ma.temp_size_in_bytes / GiB:.2f} GiB, outputs {ma.output_size_in_bytes / GiB:.2f} GiB")
    except Exception:  # not every backend / jax version reports it
        return "compiled memory n/a"


def auto_remat_step(bench: Bench, cfg: FluxConfig, graphdef: Any, state: list, base: Any, batch: dict,
                    tx: Any) -> tuple[FluxConfig, Any, Any, float]:
    """--remat auto: the LoRA step compiled with remat none, dots, full in turn until XLA's plan is
    within the device's budget, as the trainer's remat="auto" chooses (`memory.first_that_fits`);
    every plan printed. (config, graphdef, compiled step, compile seconds of the one chosen)."""
    from pico_jax.memory import GiB, first_that_fits, memory_budget
    from pico_jax.trainer import REMAT_AUTO_ORDER, graphdef_with_remat

    budget, limit = memory_budget()
    variants = {p: graphdef_with_remat(graphdef, (state[0], base), (nnx.LoRAParam, ...), p) for p in REMAT_AUTO_ORDER}
    seconds = {}

    def compile_one(policy):
        t0 = time.perf_counter()
        compiled = make_lora_step(variants[policy], tx, cfg.guidance_embeds).lower(state[0], state[1], base, batch).compile()
        seconds[policy] = time.perf_counter() - t0
        return compiled

    chosen, compiled, plans, _ = first_that_fits(REMAT_AUTO_ORDER, compile_one, budget)
    gib = lambda b: "n/a" if b is None else f"{b / GiB:.2f} GiB"
    print(f"lora remat auto: {chosen} (XLA's plans per device: "
          + ", ".join(f"{p} {gib(b)}" for p, b in plans.items())
          + (f"; budget {budget / GiB:.2f} GiB of the device's {limit / GiB:.2f})" if limit else "; no limit known)"),
          flush=True)
    bench.results["lora_remat_plans_gib"] = {p: None if b is None else b / GiB for p, b in plans.items()}
    return cfg.replace(remat=chosen), variants[chosen], compiled, seconds[chosen]


def section_lora(bench: Bench) -> None:
    import optax

    from pico_jax.model.lora import add_lora

    bench.release_model()
    args = bench.args
    auto = args.remat == "auto"
    cfg = fill_config(bench.cfg).replace(remat="none" if auto else args.remat)
    model = make_model(cfg, bench.dtype)
    paths = add_lora(model, args.rank, dtype=jnp.float32)  # fp32 master factors, as the trainer keeps them
    # LoRAParam first: it is a subclass of Param, so `...` then takes only the frozen base.
    graphdef, lora, base = nnx.split(model, nnx.LoRAParam, ...)
    del model
    tx = optax.adamw(1e-4)
    state = [lora, tx.init(lora)]
    del lora
    batch = lora_batch(cfg, args, bench.dtype)
    if auto:  # the trainer's remat="auto": the least recomputation XLA plans within the device's memory
        cfg, graphdef, compiled, compile_s = auto_remat_step(bench, cfg, graphdef, state, base, batch, tx)
    step_fn = make_lora_step(graphdef, tx, cfg.guidance_embeds)
    # Counted before the compile (the count clears JAX's caches; auto's compiled step is held and
    # survives it); each attention counts as its kernel's products (cuDNN's backward recomputes
    # the logits: counted in step_flops only).
    step_flops = program_flops(step_fn, state[0], state[1], base, batch)
    model_flops = program_flops(step_fn, state[0], state[1], base, batch, recompute=False)
    if not auto:
        t0 = time.perf_counter()
        compiled = step_fn.lower(state[0], state[1], base, batch).compile()
        compile_s = time.perf_counter() - t0
    losses = []

    def run() -> None:
        state[0], state[1], loss = compiled(state[0], state[1], base, batch)
        losses.append(jax.block_until_ready(loss))

    first, runs = measure(run, args.repeat)
    med = bench.results["lora_s"] = statistics.median(runs)
    rate_jax, rate_torch = matmul_rates(bench)
    peak = max(rate_jax, rate_torch or 0.0)
    bench.results.update(lora_tflop=step_flops / 1e12, lora_fraction=step_flops / med / peak,
                         lora_model_tflop=model_flops / 1e12, lora_model_fraction=model_flops / med / peak)
    print(f"lora: {med * 1e3:.1f} ms per step (median of {args.repeat}; runs {fmt_runs(runs)}), remat={cfg.remat}, "
          f"rank {args.rank} on {len(paths)} projections of every block ({count_params(state[0]) / 1e6:.2f} M "
          f"trainable, fp32), batch 1, {args.tokens**2}+{args.text} tokens, loss {float(losses[-1]):.3f}; "
          f"compile {compile_s:.1f} s, first step {first * 1e3:.0f} ms", flush=True)
    print(f"lora rate: {step_flops / 1e12:.4g} TFLOP per step (jaxpr count, remat's recomputation included), "
          f"{step_flops / med / 1e12:.4g} TFLOP/s = {step_flops / med / peak:.1%} of the measured matmul rate; "
          f"model FLOPs (without the recomputation) {model_flops / 1e12:.4g} TFLOP, "
          f"{model_flops / med / 1e12:.4g} TFLOP/s = {model_flops / med / peak:.1%} (MFU against that rate)", flush=True)
    others = [s for s in bench.ran if s != "lora"]
    note = f" (process peak: includes {', '.join(others)}; run --sections lora alone)" if others else ""
    kind = jax.devices()[0].device_kind
    peak_tf = args.peak_tflops or peak_tflops(kind, jnp.bfloat16)
    if peak_tf:  # what MFU papers and MaxText quote: model FLOPs over the dense peak
        bench.results["lora_mfu"] = model_flops / med / (peak_tf * 1e12)
        source = "--peak-tflops" if args.peak_tflops else f"the data sheet's for {kind}"
        print(f"lora MFU: {bench.results['lora_mfu']:.2%} of a dense bf16 peak of {peak_tf:g} TFLOP/s ({source})",
              flush=True)
    bench.results["lora_remat"] = cfg.remat
    bench.results["lora_memory"] = memory_line()
    print(f"lora memory: {bench.results['lora_memory']}{note}; {compiled_memory(compiled)}", flush=True)
    del state, base
    free_memory()


SECTION_FUNCS: dict[str, Callable[[Bench], None]] = {
    "matmul": section_matmul,
    "forward": section_forward,
    "diffusers": section_diffusers,
    "sample": section_sample,
    "lora": section_lora,
}


def section_kernel(bench: Bench) -> str:
    """The attention kernel the sections' programs would run (cudnn on a GPU in bf16)."""
    from pico_jax.model.attention import attention_implementation

    return attention_implementation(bench.dtype, bench.cfg.head_dim, bench.n_img + bench.args.text)


def first_line(e: BaseException) -> str:
    return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"


def out_of_memory(e: BaseException) -> bool:
    text = str(e)
    return "RESOURCE_EXHAUSTED" in text or "out of memory" in text.lower()


def run_section(bench: Bench, name: str) -> None:
    """One section; if it fails with a fused attention kernel (cuDNN's has never run in this
    project), once more with XLA's attention, so that a short device lease still measures it.
    The fallback is recorded (results[name + "_attention"]) and printed in the summary. Not for
    the matmul section (no attention) or an out-of-memory error (XLA's attention needs more)."""
    from pico_jax.model.attention import forced_attention

    kernel = section_kernel(bench)
    try:
        SECTION_FUNCS[name](bench)
        return
    except Exception as e:
        if name == "matmul" or kernel == "xla" or out_of_memory(e):
            raise
        traceback.print_exc()
        failure = first_line(e)
    free_memory()  # outside `except`: the traceback's frames would keep the failed section's arrays alive
    print(f"{name}: FAILED with {kernel} attention ({failure}); retrying with XLA's attention", flush=True)
    with forced_attention("xla"):
        SECTION_FUNCS[name](bench)
    bench.results[f"{name}_attention"] = f"xla, after {kernel} failed: {failure}"


# -------------------------------------------------------------------------------------- main
def header(bench: Bench) -> None:
    import flax

    dev = jax.devices()[0]
    versions = [f"jax {jax.__version__}", f"flax {flax.__version__}"]
    torch = torch_module()
    if torch is not None:
        gpu = f", sees {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ""
        versions.append(f"torch {torch.__version__}{gpu}")
    else:
        versions.append("torch not installed")
    cfg, args = bench.cfg, bench.args
    print(f"date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}")
    print(f"device: {dev.device_kind} ({jax.default_backend()}, {jax.device_count()} device(s)), host {platform.machine()} "
          f"{os.cpu_count()} CPU cores, Python {platform.python_version()}; {', '.join(versions)}")
    print(f"config: {'toy' if args.toy else args.config}, {cfg.num_double}+{cfg.num_single} blocks, "
          f"{cfg.num_heads} heads x {cfg.head_dim}, {jnp.dtype(bench.dtype).name}; canvas {args.tokens}x{args.tokens} "
          f"= {bench.n_img} image + {args.text} text tokens, batch 1; sections {','.join(args.sections)}", flush=True)
    if not bench.on_gpu and not args.toy:
        print("note: no GPU; the full-size model on CPU is very slow and large (use --toy)", flush=True)


def summary(bench: Bench, incomplete: list[str] | None = None) -> None:
    """The results against issue #7's targets; `incomplete` (default: the sections that did not
    run in this process) is listed as failed."""
    r = bench.results

    def verdict(ok: bool) -> str:
        return "MET" if ok else "NOT MET"

    print("summary:")
    if "forward_fraction" in r:
        f = r["forward_fraction"]
        print(f"summary: forward {r['forward_s'] * 1e3:.2f} ms = {f:.1%} of the bf16 matmul rate "
              f"(target >= {TARGET_MATMUL_FRACTION:.0%}): {verdict(f >= TARGET_MATMUL_FRACTION)}")
    if "ours_vs_diffusers" in r:
        s = r["ours_vs_diffusers"]
        print(f"summary: ours/diffusers speed-up {s:.2f}x (target >= {TARGET_VS_DIFFUSERS}x): "
              f"{verdict(s >= TARGET_VS_DIFFUSERS)}; parity {r['parity']:.2e}")
    if "sample_one_s" in r:
        print(f"summary: one {bench.args.steps}-step sample per canvas {r['sample_one_s']:.3f} s")
    if "early_over_one" in r:
        e = r["early_over_one"]
        print(f"summary: best-of-{bench.args.seeds} early / one = {e:.2f} (target <= {TARGET_EARLY_OVER_ONE:.0f}): "
              f"{verdict(e <= TARGET_EARLY_OVER_ONE)}")
    if "lora_s" in r:
        rate = (f", {r['lora_tflop'] / r['lora_s']:.4g} TFLOP/s = {r['lora_fraction']:.1%} of the matmul rate"
                f" (model FLOPs only: {r['lora_model_fraction']:.1%})" if "lora_fraction" in r else "")
        if "lora_mfu" in r:
            rate += f", MFU {r['lora_mfu']:.2%} of the dense bf16 peak"
        remat = r.get("lora_remat", bench.args.remat) + (", chosen by auto" if bench.args.remat == "auto" else "")
        print(f"summary: LoRA step (remat={remat}) {r['lora_s'] * 1e3:.1f} ms{rate}; {r['lora_memory']}")
    for key in sorted(k for k in r if k.endswith("_attention")):
        print(f"summary: {key.removesuffix('_attention')} measured with {r[key]}")
    if incomplete is None:
        incomplete = [s for s in bench.args.sections if s not in bench.ran]
    if incomplete:
        print(f"summary: FAILED sections: {', '.join(incomplete)}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="flux1-dev", help="FluxConfig.named preset (default flux1-dev)")
    ap.add_argument("--toy", action="store_true", help="tiny model and canvas (CPU check of every section)")
    ap.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {','.join(SECTIONS)}")
    ap.add_argument("--tokens", type=int, help="canvas side in tokens, even (default 64 -> 4096 image tokens; toy 8)")
    ap.add_argument("--text", type=int, help="text tokens (default 512; toy 8)")
    ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    ap.add_argument("--repeat", type=int, help="timed runs of forward/diffusers/lora (median; default 5, toy 2)")
    ap.add_argument("--steps", type=int, help="denoising steps T (default 28; toy 3)")
    ap.add_argument("--seeds", type=int, help="seeds S for best-of-S (default 8; toy 2)")
    ap.add_argument("--keep", type=int, default=1, help="seeds finished by early selection (m)")
    ap.add_argument("--score-steps", type=int, default=2, help="scored early steps k")
    ap.add_argument("--sample-modes", default="one,full,early", help="subset of one,full,early")
    ap.add_argument("--sample-repeat", type=int, default=1, help="timed runs per sampling mode (median)")
    ap.add_argument("--remat", default="full", choices=("full", "dots", "nothing", "none", "auto"),
                    help="LoRA step remat (default full); auto: compile none, dots, full in turn and time the first "
                         "XLA plans within 90 %% of the device's memory, as train.py's remat=auto, printing each plan")
    ap.add_argument("--rank", type=int, default=16, help="LoRA rank")
    ap.add_argument("--peak-tflops", type=float, default=0.0, metavar="TFLOPS",
                    help="the device's dense bf16 peak for the LoRA step's MFU (default 0: the data sheet's, "
                         "pico_jax.flops.peak_tflops, for H100 / H200 / A100 / TPU v4-v6e; none printed otherwise)")
    ap.add_argument("--budget-s", type=float, metavar="SECONDS",
                    help="run the section groups each in a process of its own, most important first, "
                         "within SECONDS of wall time in all (a group past it is killed, later ones skipped)")
    ap.add_argument("--results-json", metavar="PATH",
                    help="write every result as JSON to PATH after each section (kept if the run is killed)")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)  # a --budget-s group: no summary
    args = ap.parse_args(argv)
    defaults = dict(tokens=(8, 64), text=(8, 512), repeat=(2, 5), steps=(3, 28), seeds=(2, 8))
    for name, (toy, full) in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, toy if args.toy else full)
    args.sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    args.sample_modes = [s.strip() for s in args.sample_modes.split(",") if s.strip()]
    bad = [s for s in args.sections if s not in SECTIONS] + [m for m in args.sample_modes if m not in ("one", "full", "early")]
    if bad:
        ap.error(f"unknown section(s)/mode(s) {bad}; sections: {','.join(SECTIONS)}; modes: one,full,early")
    if args.tokens < 2 or args.tokens % 2:
        ap.error("--tokens must be even (a 2x2 canvas of panels)")
    if args.budget_s is not None and args.budget_s <= 0:
        ap.error("--budget-s must be positive")
    return args


def write_results(bench: Bench, path: str | None) -> None:
    """bench.results and the sections that ran, as JSON at `path` (atomically: a reader never sees
    half a file, even if this process is killed mid-write)."""
    if path is None:
        return
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump({"results": bench.results, "ran": bench.ran}, f, indent=1, sort_keys=True)
    os.replace(tmp, path)


# ------------------------------------------------------------------------------ --budget-s
# Options a child process gets as they were given (or defaulted) to the parent.
PASSED_OPTIONS = ("config", "tokens", "text", "dtype", "repeat", "steps", "seeds", "keep", "score_steps",
                  "sample_repeat", "remat", "rank", "peak_tflops")


def budget_groups(args: argparse.Namespace) -> list[tuple[list[str], list[str] | None]]:
    """(sections, sample modes or None) of each child process, most important first: the forward
    targets (matmul rate, forward, diffusers on the same weights), early selection against one
    sample, the LoRA step (alone, so the device's peak memory is its own), best-of-S full."""
    groups: list[tuple[list[str], list[str] | None]] = []
    forward = [s for s in ("matmul", "forward", "diffusers") if s in args.sections]
    if forward:
        groups.append((forward, None))
    sample = "sample" in args.sections
    quick = [m for m in args.sample_modes if m in ("one", "early")]
    if sample and quick:
        groups.append((["sample"], quick))
    if "lora" in args.sections:
        groups.append((["lora"], None))
    if sample and "full" in args.sample_modes:
        groups.append((["sample"], ["full"]))
    return groups


def child_argv(args: argparse.Namespace, sections: list[str], modes: list[str] | None, results: str) -> list[str]:
    argv = ["--toy"] if args.toy else []
    argv += [f"--{name.replace('_', '-')}={getattr(args, name)}" for name in PASSED_OPTIONS]
    argv += [f"--sections={','.join(sections)}", f"--results-json={results}", "--child"]
    if modes:
        argv.append(f"--sample-modes={','.join(modes)}")
    return argv


def read_results(path: str) -> dict[str, Any]:
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:  # the child was killed (or failed) before its first section ended
        return {"results": {}, "ran": []}


def run_budgeted(bench: Bench) -> int:
    """Each of `budget_groups` in a child process of this script, in order, each given what is left
    of --budget-s (killed past it, with its process group); the children print as they go, and
    the summary merges what they measured. This process never touches the device."""
    args = bench.args
    deadline = time.monotonic() + args.budget_s
    incomplete: list[str] = []
    print(f"budget: {args.budget_s:.0f} s for {len(budget_groups(args))} process(es), most important first", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        for i, (sections, modes) in enumerate(budget_groups(args)):
            label = ",".join(sections) + (f" ({','.join(modes)})" if modes else "")
            left = deadline - time.monotonic()
            if left <= 0:
                incomplete.append(f"{label} (not started: budget spent)")
                continue
            print(f"budget: == {label}, {left:.0f} s left ==", flush=True)
            path = os.path.join(tmp, f"{i}.json")
            cmd = [sys.executable, os.path.abspath(__file__), *child_argv(args, sections, modes, path)]
            proc = subprocess.Popen(cmd, start_new_session=True)
            t0 = time.monotonic()
            try:
                code: int | None = proc.wait(timeout=left)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                code = None
            child = read_results(path)
            bench.results.update(child["results"])
            bench.ran += [s for s in child["ran"] if s not in bench.ran]
            took = time.monotonic() - t0
            if code is None:
                incomplete.append(f"{label} (killed at the budget after {took:.0f} s; "
                                  f"finished: {', '.join(child['ran']) or 'none'})")
            elif code != 0:
                incomplete.append(f"{label} (exit {code} after {took:.0f} s)")
            print(f"budget: {label} {'killed' if code is None else f'exit {code}'} after {took:.0f} s", flush=True)
    report_sample_ratios(bench)  # full/one when they ran in different processes
    write_results(bench, args.results_json)
    summary(bench, incomplete)
    return 0 if not incomplete else 1


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cfg = toy_config() if args.toy else FluxConfig.named(args.config)
    bench = Bench(args=args, cfg=cfg, dtype=jnp.dtype(args.dtype))
    if args.budget_s is not None:
        return run_budgeted(bench)
    header(bench)
    for name in SECTIONS:  # fixed order: matmul before forward, forward model before diffusers
        if name not in args.sections:
            continue
        t0 = time.perf_counter()
        try:
            run_section(bench, name)
            bench.ran.append(name)
        except Exception as e:  # report and go on: one section's failure (OOM, missing package) must not stop the rest
            traceback.print_exc()
            print(f"{name}: FAILED: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}", flush=True)
        free_memory()  # outside `except`: the traceback's frames would keep the failed section's arrays alive
        write_results(bench, args.results_json)
        print(f"  ({name} section took {time.perf_counter() - t0:.1f} s)", flush=True)
    if not args.child:
        summary(bench)
    return 0 if len(bench.ran) == len(args.sections) else 1


if __name__ == "__main__":
    sys.exit(main())
