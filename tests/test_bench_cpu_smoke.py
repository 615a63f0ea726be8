"""benchmarks/bench_forward.py, bench_lora_step.py and profile_forward.py at toy size, in a subprocess, in both dtypes:
they run, print the ratio line, and the two models agree (fp32: to float precision; bf16: ours
stays close to the fp32 reference on the same weights)."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TOY = ["--double", "1", "--single", "1", "--width", "64", "--head-dim", "32", "--tokens", "4", "--text", "4",
       "--repeat", "1"]


def _run(script: str, *extra: str) -> str:
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *TOY, *extra],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr[-4000:]}"
    return proc.stdout


def _number(pattern: str, out: str) -> float:
    m = re.search(pattern, out, re.MULTILINE)
    assert m, f"{pattern!r} not in:\n{out}"
    return float(m.group(1))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_bench_forward_runs_and_models_agree(dtype):
    out = _run("bench_forward.py", "--dtype", dtype)
    assert f"batch 1, {dtype};" in out
    assert _number(r"speed-up ours/diffusers = ([0-9.]+)x", out) > 0
    assert f"matmul rate (2048^2 {dtype})" in out
    diff = _number(r"max rel. difference ours vs diffusers: ([0-9.e+-]+);", out)
    if dtype == "float32":
        assert diff < 1e-4
    else:
        ours = _number(r"vs diffusers in fp32 on the same weights: ours ([0-9.e+-]+),", out)
        assert ours < 1.5e-2 and diff < 1e-1


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_bench_lora_step_runs(dtype):
    out = _run("bench_lora_step.py", "--dtype", dtype, "--rank", "4")
    assert f"batch 1, {dtype};" in out
    assert _number(r"speed-up ours/torch = ([0-9.]+)x", out) > 0


def test_bench_compile_lora_gradient_at_full_size():
    """bench_compile.py --step lora: the full-size FLUX.1-dev LoRA gradient traces, shards over the
    simulated 8-device mesh and compiles (short canvas to keep it quick); the report names it."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")
    env.pop("XLA_FLAGS", None)  # the script asks for its 8 simulated devices itself
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_compile.py"), "--step", "lora",
                           "--batch", "4", "--tokens", "256", "--text", "32", "--rank", "4"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr[-4000:]}"
    out = proc.stdout
    assert "flux1-dev: 11," in out and "LoRA gradient (rank 4" in out and "remat=full" in out
    assert "on 8 simulated cpu devices" in out
    assert _number(r"temporaries ([0-9.]+) GiB", out) > 0


@pytest.mark.parametrize("platform,kernel", [("cuda", "CustomSPMDPartitioning"), ("tpu", "tpu_custom_call")])
def test_bench_compile_lowers_full_size_for_gpu_and_tpu(platform, kernel):
    """bench_compile.py --platform cuda / tpu: the full-size LoRA gradient, traced for that platform
    over the 8-device mesh, lowers on this CPU host with the platform's attention kernel in it
    (cuDNN's, over a mesh, is inside JAX's partitioning wrapper until XLA compiles it)."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")
    env.pop("XLA_FLAGS", None)
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_compile.py"), "--platform", platform,
                           "--step", "lora", "--batch", "4", "--tokens", "256", "--text", "32", "--rank", "4"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr[-4000:]}"
    out = proc.stdout
    assert f"lowered for {platform}, not compiled" in out and "flux1-dev: 11," in out
    assert _number(rf"{kernel} x([0-9]+)", out) >= (2 if platform == "cuda" else 1)  # cuDNN: both stacks


def test_bench_compile_sampler_at_full_size_gathers_weights():
    """bench_compile.py --step sample: PICO's whole sampler on full-size FLUX.1-Fill-dev compiles over
    data x fsdp (short canvas, few steps); its collectives are weight all-gathers, no all-reduce."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")
    env.pop("XLA_FLAGS", None)
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_compile.py"), "--step", "sample",
                           "--mesh", "data=2,fsdp=4", "--batch", "8", "--tokens", "256", "--text", "32",
                           "--steps", "3", "--seeds", "2", "--score-steps", "1"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr[-4000:]}"
    out = proc.stdout
    assert "flux1-fill-dev: 11,902,391,360 parameters" in out and "PICO sampler (3 steps, 2 seeds" in out
    gathered = _number(r"all-gather ([0-9.]+) GiB", out)
    assert 3 * 15.5 < gathered < 3 * 16.5  # the token-wise weights (16.0 GiB; not the modulations'), once per step
    # only the modulations' partial sums (fp32 layers x batch x width per model call, `flux.layer_modulations`)
    assert "all-reduce" not in out or _number(r"all-reduce ([0-9.]+) GiB", out) < 0.3


def test_bench_compile_the_trainers_whole_step_at_full_size():
    """bench_compile.py --step train: the Trainer's own step (FLUX VAE encode, LoRA gradient, AdamW)
    on full-size FLUX.1-Fill-dev compiles over fsdp=8 (short canvas); each device holds an
    eighth of the 22 GiB base plus the VAE, and the weights are gathered twice (forward, remat)."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")
    env.pop("XLA_FLAGS", None)
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_compile.py"), "--step", "train",
                           "--mesh", "fsdp=8", "--batch", "8", "--tokens", "256", "--text", "32", "--rank", "4"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr[-4000:]}"
    out = proc.stdout
    assert "flux1-fill-dev: 12,000,219,363 parameters" in out and "training step (LoRA rank 4" in out
    assert 2.7 < _number(r"arguments ([0-9.]+) GiB", out) < 3.2  # 22.2 GiB / 8 + the VAE, not replicated
    assert 2 * 15.5 < _number(r"all-gather ([0-9.]+) GiB", out) < 2 * 16.5  # token-wise weights, twice


def test_bench_compile_remat_auto_measures_each_policy_and_names_the_choice(monkeypatch, capsys):
    """--remat auto compiles the step once per policy (stubbed here: the full-size compiles are the
    test above's) and prints what the trainer's remat="auto" would run on each device size."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import bench_compile

    plans = {"none": 54.68, "dots": 40.46, "full": 29.35}  # GiB: the paper config on data=8
    seen = []
    monkeypatch.setattr(bench_compile, "measure", lambda a: seen.append(a.remat) or int(plans[a.remat] * 2**30))
    bench_compile.main(["--step", "train", "--remat", "auto", "--device-memory-gib", "59.7", "75.7", "20"])
    out = capsys.readouterr().out
    assert seen == ["none", "dots", "full"]
    assert "remat auto on 59.7 GiB per device (budget 53.7 GiB): dots" in out
    assert "remat auto on 75.7 GiB per device (budget 68.1 GiB): none" in out
    assert "remat auto on 20 GiB per device (budget 18.0 GiB): none fits; it would run the smallest, full" in out
    with pytest.raises(SystemExit):
        bench_compile.main(["--step", "lora", "--remat", "auto"])


def test_bench_compile_gather_auto_measures_both_samplers_and_names_the_choice(monkeypatch, capsys):
    """--gather-weights auto compiles the sampler gathered per call, then per layer (stubbed: the
    plans this session measured at full size) and prints what Pipeline(gather_weights="auto")
    would run on each device size."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import bench_compile

    plans = {"per_call": 32.05, "per_layer": 10.32}  # GiB: FLUX.1-Fill-dev's sampler on data=2,fsdp=4
    seen = []
    monkeypatch.setattr(bench_compile, "measure",
                        lambda a: seen.append(a.gather_weights) or int(plans[a.gather_weights] * 2**30))
    bench_compile.main(["--step", "sample", "--mesh", "data=2,fsdp=4", "--gather-weights", "auto",
                        "--device-memory-gib", "59.7", "30", "10"])
    out = capsys.readouterr().out
    assert seen == ["per_call", "per_layer"]
    assert "gather_weights auto on 59.7 GiB per device (budget 53.7 GiB): per_call" in out
    assert "gather_weights auto on 30 GiB per device (budget 27.0 GiB): per_layer" in out
    assert "gather_weights auto on 10 GiB per device (budget 9.0 GiB): none fits; it would run the smallest, per_layer" in out
    with pytest.raises(SystemExit):
        bench_compile.main(["--step", "forward", "--gather-weights", "auto"])


@pytest.mark.parametrize("program", ["forward", "lora"])
def test_profile_attributes_the_traced_time(program):
    """profile_forward.py at toy size: the cost analysis counts FLOPs, and the trace's op time is
    attributed to categories that add up to 100 %, with matmuls among them."""
    toy = TOY[:-2] + ["--runs", "1", "--top", "3"]  # its own --runs instead of --repeat
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")
    extra = ["--program", program] + (["--rank", "4"] if program == "lora" else [])
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "profile_forward.py"), *toy, *extra],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr[-4000:]}"
    out = proc.stdout
    assert _number(r"FLOPs ([0-9.e+-]+) G", out) > 0
    shares = [float(s) for s in re.findall(r"^\| [^|]+ \| [0-9.]+ \| ([0-9]+)% \|$", out, re.MULTILINE)]
    assert shares and abs(sum(shares) - 100) <= len(shares), out  # rounded shares of one total
    assert re.search(r"^\| matmul \| [0-9.]+ \|", out, re.MULTILINE), out
    assert len(re.findall(r"^ +[0-9.]+  \S+ +.+ -> ", out, re.MULTILINE)) == 3, out
    if program == "lora":
        assert "LoRA step" in out and _number(r"loss ([0-9.e+-]+)", out) > 0


def test_fp32_copies_finds_an_upcast_product():
    """profile_forward.fp32_copies: a bf16-output product (which XLA:CPU runs in fp32) shows up as
    an fp32 copy of its operand read by a matmul; narrow_product's native form has none."""
    import importlib.util

    import jax
    import jax.numpy as jnp

    if jax.default_backend() != "cpu":
        pytest.skip("the upcast is XLA:CPU's")
    spec = importlib.util.spec_from_file_location("profile_forward", ROOT / "benchmarks" / "profile_forward.py")
    prof = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(prof)
    from pico_jax.model.flux import narrow_product

    x, w = jnp.ones((256, 128), jnp.bfloat16), jnp.ones((128, 192), jnp.bfloat16)

    def copies(fn):
        hlo = jax.jit(fn).lower(x, w).compile().as_text()
        table = prof.hlo_ops(hlo)
        return [(n, s, [prof.categorize(*table[r]) for r in readers]) for n, s, readers in prof.fp32_copies(hlo, 10_000, table)]

    upcast = copies(lambda x, w: jnp.dot(x, w))  # bf16 out
    assert any(shape.startswith("f32[256,128]") and "matmul" in cats for _, shape, cats in upcast), upcast
    assert copies(narrow_product) == []


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_bench_text_encoders_runs_and_models_agree(dtype):
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_text_encoders.py"), "--d-model", "64",
                           "--d-ff", "96", "--heads", "4", "--d-kv", "16", "--layers", "2", "--vocab", "128",
                           "--length", "16", "--repeat", "1", "--dtype", dtype],
                          cwd=ROOT, env=dict(os.environ, JAX_PLATFORMS="cpu"), capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr[-4000:]}"
    out = proc.stdout
    assert f"16 tokens, batch 1, {dtype};" in out
    assert _number(r"speed-up \(transformers / ours\): ([0-9.]+)x", out) > 0
    assert _number(r"/ max \|transformers\| = ([0-9.e+-]+)", out) < (1e-5 if dtype == "float32" else 3e-2)


def test_bench_text_encoders_rejects_bad_sizes():
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_text_encoders.py"), "--layers", "0"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "--layers must be at least 1 (got 0)" in proc.stderr


def _run_data(*flags: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")
    return subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_data.py"), *flags],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def test_bench_data_times_each_thread_count_against_the_step():
    proc = _run_data("--config", "configs/tiny.py", "--threads", "1,2", "--batches", "2", "--step-s", "1e6")
    out = proc.stdout
    assert proc.returncode == 0, f"{out}\n{proc.stderr[-4000:]}"
    assert re.search(r"^data: procedural, panel 16 .* batch 8 per host \(global 8 over 1\)", out, re.MULTILINE), out
    for threads in (1, 2):
        rate = _number(rf"^data_threads {threads}, data_workers 0: [0-9]+ ms per batch = ([0-9.]+) examples/s", out)
        assert rate > 0
    assert out.count("needs 0.0/s: keeps up") == 2
    bad = _run_data("--config", "configs/tiny.py", "--threads", "two")
    assert bad.returncode == 2 and "--threads 'two'" in bad.stderr
    bad = _run_data("--config", "configs/tiny.py", "--workers", "-1")
    assert bad.returncode == 2 and "--workers: every value must be >= 0" in bad.stderr


def test_bench_data_times_the_tfds_reader_and_worker_processes():
    """--build-visrel writes procedural episodes as a VisRel folder, builds the TFDS dataset in a
    temporary directory (gone afterwards) and times its reader, here also in 2 worker processes."""
    import glob
    import tempfile

    before = set(glob.glob(os.path.join(tempfile.gettempdir(), "bench_data_visrel_*")))
    proc = _run_data("--config", "configs/tiny.py", "--build-visrel", "2", "--workers", "0,2", "--batches", "2",
                     "--rounds", "2")
    out = proc.stdout
    assert proc.returncode == 0, f"{out}\n{proc.stderr[-4000:]}"
    families = int(re.search(r"^visrel: ([0-9]+) episodes of ([0-9]+) families as 16-px PNGs", out, re.MULTILINE)[2])
    assert families >= 10, out
    assert re.search(r"^data: visrel, panel 16 ", out, re.MULTILINE), out
    for workers in (0, 2):  # each setting timed in both rounds, then its median
        assert len(re.findall(rf"^round [12]/2: data_threads [0-9]+, data_workers {workers}: ", out, re.MULTILINE)) == 2
        assert _number(rf"^data_threads [0-9]+, data_workers {workers}: [0-9]+ ms per batch = ([0-9.]+) examples/s "
                       r"\(median of 2 rounds", out) > 0
    assert set(glob.glob(os.path.join(tempfile.gettempdir(), "bench_data_visrel_*"))) == before
