"""benchmarks/bench_gpu_flux.py at toy size on CPU, in a subprocess (as a GPU session would run it):
every section prints its numbers, diffusers agrees with our forward, and the summary compares each
result with its issue #7 target. Guards the script before any GPU is lent."""

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "bench_gpu_flux.py"
NUMBER = r"([0-9]+(?:\.[0-9]+)?(?:e[-+]?[0-9]+)?)"


def _run_toy() -> str:
    env = dict(os.environ)
    env.update(
        JAX_PLATFORMS="cpu",
        # Compile speed only (this checks that the script works, not how fast the toy runs): the
        # sections compile ~8 small programs, and XLA:CPU's LLVM optimization dominates their cost.
        XLA_FLAGS="--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true",
        HF_HUB_OFFLINE="1",
        PYTHONUNBUFFERED="1",
    )
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--toy", "--repeat", "2", "--steps", "3", "--seeds", "2"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )
    out = proc.stdout
    assert proc.returncode == 0, f"exit {proc.returncode}\n{out}\n{proc.stderr[-4000:]}"
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
    assert re.search(r"^lora memory: device peak memory (n/a|[0-9.]+ GiB)", out, re.MULTILINE)

    assert re.search(r"^summary: forward .* \(target >= 55%\): (MET|NOT MET)", out, re.MULTILINE)
    assert re.search(r"^summary: best-of-2 early / one = .* \(target <= 2\): (MET|NOT MET)", out, re.MULTILINE)
    assert re.search(r"^summary: LoRA step \(remat=full\)", out, re.MULTILINE)
