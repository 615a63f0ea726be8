"""benchmarks/bench_gpu_flux.py at toy size on CPU, in a subprocess (as a GPU session would run it):
every section prints its numbers, diffusers agrees with our forward, and the summary compares each
result with its issue #7 target. Guards the script before any GPU is lent."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "bench_gpu_flux.py"
NUMBER = r"([0-9]+(?:\.[0-9]+)?(?:e[-+]?[0-9]+)?)"


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        JAX_PLATFORMS="cpu",
        # Compile speed only (this checks that the script works, not how fast the toy runs): the
        # sections compile ~8 small programs, and XLA:CPU's LLVM optimization dominates their cost.
        XLA_FLAGS="--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true",
        HF_HUB_OFFLINE="1",
        PYTHONUNBUFFERED="1",
    )
    return env


def _run(*flags: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(SCRIPT), "--toy", *flags],
        cwd=ROOT, env={**_env(), **env}, capture_output=True, text=True, timeout=600,
    )


def _run_toy() -> str:
    proc = _run("--repeat", "2", "--steps", "3", "--seeds", "2", "--peak-tflops", "0.5",  # a CPU has no data sheet
                JAX_LOG_COMPILES="1")
    out = proc.stdout
    assert proc.returncode == 0, f"exit {proc.returncode}\n{out}\n{proc.stderr[-4000:]}"
    # The forward and diffusers sections share one compiled forward: compiling full-size FLUX.1-dev
    # twice would spend a short GPU lease's time twice.
    assert proc.stderr.count("Compiling jit(fwd)") == 1, proc.stderr[-4000:]
    return out


def _number(pattern: str, out: str) -> float:
    m = re.search(pattern, out, re.MULTILINE)
    assert m, f"no line matching {pattern!r} in:\n{out}"
    return float(m.group(1))


def test_bench_gpu_flux_toy_runs_every_section():
    out = _run_toy()
    assert "FAILED" not in out, out
    assert re.search(r"^date: \d{4}-\d\d-\d\d", out, re.MULTILINE)
    assert re.search(r"^device: .*jax \S+", out, re.MULTILINE)

    assert _number(rf"^matmul: jax {NUMBER} TFLOP/s", out) > 0
    assert _number(rf"^forward: {NUMBER} ms", out) > 0
    assert 0 < _number(rf"^forward: .* = {NUMBER}% of the measured matmul rate", out)
    assert re.search(r"^forward: .*attention kernel: (xla|headwise|cudnn)", out, re.MULTILINE)

    if "diffusers: not installed" not in out:
        parity = _number(rf"^diffusers parity: max rel diff {NUMBER}", out)
        assert parity < 5e-2, out  # bf16 vs bf16, identical weights and inputs
        assert _number(rf"^diffusers: .*speed-up ours/diffusers {NUMBER}x", out) > 0

    one = _number(rf"^sample one: {NUMBER} s", out)
    full = _number(rf"^sample full: {NUMBER} s", out)
    early = _number(rf"^sample early: {NUMBER} s", out)
    assert min(one, full, early) > 0
    assert _number(rf"^sample: early/one = {NUMBER}", out) > 0

    assert _number(rf"^lora: {NUMBER} ms per step", out) > 0
    assert _number(rf"^lora rate: {NUMBER} TFLOP per step", out) > 0
    assert re.search(r"^lora memory: device peak memory (n/a|[0-9.]+ GiB)", out, re.MULTILINE)
    model_rate = _number(rf"^lora rate: .* model FLOPs .* TFLOP, {NUMBER} TFLOP/s", out)
    mfu = _number(rf"^lora MFU: {NUMBER}% of a dense bf16 peak of 0.5 TFLOP/s \(--peak-tflops\)", out)
    assert mfu == pytest.approx(model_rate / 0.5 * 100, rel=0.01, abs=0.006)

    assert re.search(r"^summary: forward .* \(target >= 55%\): (MET|NOT MET)", out, re.MULTILINE)
    assert re.search(r"^summary: best-of-2 early / one = .* \(target <= 2\): (MET|NOT MET)", out, re.MULTILINE)
    assert re.search(r"^summary: LoRA step \(remat=full\)", out, re.MULTILINE)


def test_lora_remat_auto_prints_each_plan_and_times_the_choice():
    """--remat auto: the LoRA step compiled under XLA's plans as the trainer's remat="auto" does;
    on this host's memory the toy step's first policy, none, fits and is the one timed."""
    proc = _run("--repeat", "2", "--sections", "lora", "--remat", "auto")
    out = proc.stdout
    assert proc.returncode == 0, f"exit {proc.returncode}\n{out}\n{proc.stderr[-4000:]}"
    assert re.search(r"^lora remat auto: none \(XLA's plans per device: none [0-9.]+ GiB; budget [0-9.]+ GiB of the "
                     r"device's [0-9.]+\)$", out, re.MULTILINE), out
    assert re.search(r"^lora: .* remat=none, ", out, re.MULTILINE), out
    assert re.search(r"^summary: LoRA step \(remat=none, chosen by auto\)", out, re.MULTILINE), out


def test_budgeted_run_merges_children_into_one_summary_and_json(tmp_path):
    """--budget-s runs each group in its own process; the parent's summary and --results-json
    hold what every child measured."""
    results = tmp_path / "results.json"
    proc = _run("--repeat", "2", "--sections", "matmul,lora", "--budget-s", "300", "--results-json", str(results))
    out = proc.stdout
    assert proc.returncode == 0, f"exit {proc.returncode}\n{out}\n{proc.stderr[-4000:]}"
    assert "budget: == matmul" in out and "budget: == lora" in out, out
    assert out.index("budget: == matmul") < out.index("budget: == lora")  # forward targets first
    assert re.search(r"^summary: LoRA step \(remat=full\)", out, re.MULTILINE), out
    assert "FAILED" not in out, out
    data = json.loads(results.read_text())
    assert set(data["ran"]) == {"matmul", "lora"}
    assert data["results"]["matmul_jax"] > 0 and data["results"]["lora_s"] > 0


def test_budget_spent_is_reported_and_fails():
    """A budget too small for anything: the first child is killed (importing JAX alone takes
    longer than 1 s), the next is never started, both are named, and the exit code says so."""
    proc = _run("--sections", "matmul,lora", "--budget-s", "1")
    out = proc.stdout
    assert proc.returncode != 0, out
    summary_line = next(line for line in out.splitlines() if line.startswith("summary: FAILED sections:"))
    assert "matmul (killed at the budget" in summary_line, summary_line
    assert "lora (not started: budget spent)" in summary_line, summary_line


def _bench_module():
    """benchmarks/bench_gpu_flux.py imported in this process, for its pure functions."""
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        import bench_gpu_flux as bench
    finally:
        sys.path.remove(str(SCRIPT.parent))
    return bench


def test_budget_groups_put_the_forward_targets_first():
    bench = _bench_module()
    args = bench.parse_args(["--toy", "--budget-s", "60"])
    assert bench.budget_groups(args) == [
        (["matmul", "forward", "diffusers"], None),
        (["sample"], ["one", "early"]),
        (["lora"], None),
        (["sample"], ["full"]),
    ]
    args = bench.parse_args(["--toy", "--budget-s", "60", "--sections", "lora,sample", "--sample-modes", "full"])
    assert bench.budget_groups(args) == [(["lora"], None), (["sample"], ["full"])]


def test_each_sample_ratio_is_printed_once_across_the_budgeted_processes(capsys):
    """A child that ran one and early prints early/one; the parent, merging that child's results
    with the full-sample child's, prints only what neither child could: full/one."""
    bench = _bench_module()
    args = bench.parse_args(["--toy", "--steps", "4", "--seeds", "8"])
    child = bench.Bench(args, None, None, results={"sample_one_s": 2.0, "sample_early_s": 3.0})
    bench.report_sample_ratios(child)
    assert capsys.readouterr().out.count("early/one = 1.50") == 1
    parent = bench.Bench(args, None, None, results={**child.results, "sample_full_s": 16.0})
    bench.report_sample_ratios(parent)
    out = capsys.readouterr().out
    assert "early/one" not in out and "full/one = 8.00" in out


def test_a_section_failing_with_the_fused_attention_is_measured_with_xlas(monkeypatch, capsys):
    """cuDNN's attention has never run here: a section that fails with it runs once more with XLA's
    attention (forced, so its kernel line and FLOP count say xla), and the summary names the
    fallback. An out-of-memory failure, or one under XLA's attention too, is not retried away."""
    import jax.numpy as jnp

    from pico_jax.model.attention import attention_implementation

    bench = _bench_module()
    state = bench.Bench(bench.parse_args(["--toy"]), bench.toy_config(), jnp.dtype(jnp.bfloat16))
    monkeypatch.setattr(bench, "section_kernel", lambda _: "cudnn")
    seen = []

    def fails_unless_xla(message):
        def section(b):
            kernel = attention_implementation(b.dtype, b.cfg.head_dim, 16)
            seen.append(kernel)
            if kernel != "xla":
                raise RuntimeError(message)
            b.results["forward_s"] = 1.0
        return section

    monkeypatch.setitem(bench.SECTION_FUNCS, "forward", fails_unless_xla("cuDNN: no kernel for this graph\ndetails"))
    bench.run_section(state, "forward")
    assert seen == ["headwise", "xla"]  # the CPU's kernel stands in for cuDNN, then the forced XLA one
    assert state.results["forward_attention"] == "xla, after cudnn failed: RuntimeError: cuDNN: no kernel for this graph"
    out = capsys.readouterr().out
    assert "forward: FAILED with cudnn attention (RuntimeError: cuDNN: no kernel for this graph); retrying" in out
    bench.summary(state)
    assert "summary: forward measured with xla, after cudnn failed" in capsys.readouterr().out

    seen.clear()
    monkeypatch.setitem(bench.SECTION_FUNCS, "lora", fails_unless_xla("RESOURCE_EXHAUSTED: out of memory"))
    with pytest.raises(RuntimeError, match="RESOURCE_EXHAUSTED"):
        bench.run_section(state, "lora")
    assert seen == ["headwise"] and "lora_attention" not in state.results

    def always_fails(b):
        raise ValueError("broken either way")

    monkeypatch.setitem(bench.SECTION_FUNCS, "sample", always_fails)
    with pytest.raises(ValueError, match="broken either way"):
        bench.run_section(state, "sample")
    assert "sample_attention" not in state.results


def test_cudnn_failing_for_real_still_gives_the_forward_numbers():
    """On a CPU, forcing cuDNN's attention (PICO_JAX_ATTENTION=cudnn) fails as a broken cuDNN would
    on a GPU: the forward is measured with XLA's attention, and the run says so and succeeds."""
    proc = _run("--sections", "forward", PICO_JAX_ATTENTION="cudnn")
    out = proc.stdout
    assert proc.returncode == 0, f"exit {proc.returncode}\n{out}\n{proc.stderr[-4000:]}"
    assert "forward: FAILED with cudnn attention (" in out and "retrying with XLA's attention" in out
    assert re.search(r"^forward: [0-9.]+ ms .*attention kernel: xla;", out, re.MULTILINE), out
    assert "summary: forward measured with xla, after cudnn failed: " in out
