"""benchmarks/bench_sampling.py at toy size, in a subprocess: every mode runs, the traced model-call
counts match the sampling plans, and --skip-full drops exactly the full-sampling rows."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ARGS = ["--panel", "8", "--repeat", "1", "--steps", "4", "--seeds", "2", "--double", "1", "--single", "1"]


def _run(*extra: str) -> str:
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_sampling.py"), *ARGS, *extra],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr[-4000:]}"
    return proc.stdout


def _calls(out: str, mode: str) -> int:
    m = re.search(rf"^\s+{re.escape(mode)}\s+[0-9.]+ s .*model calls ([0-9]+)", out, re.MULTILINE)
    assert m, f"no timing line for {mode!r} in:\n{out}"
    return int(m.group(1))


@pytest.mark.parametrize("skip_full", [False, True])
def test_bench_sampling_modes_and_model_calls(skip_full):
    out = _run(*(["--skip-full"] if skip_full else []))
    T, S, k = 4, 2, 2
    assert _calls(out, "one (random)") == T
    assert _calls(out, "best-of-2 early (m=1)") == S * k + (T - k)
    assert _calls(out, "same, capture off") == S * k + (T - k)
    assert _calls(out, "1 seed full + capture") == T
    assert _calls(out, "best-of-2 early consensus") == S * k + (T - k)
    assert ("best-of-2 full " in out) != skip_full and ("full  / one" in out) != skip_full
    assert re.search(r"capture hook in early selection \(2x2 captured calls\): early / same with capture off = [0-9.]+", out)
    assert re.search(r"capture hook: 1 seed, 4 steps, capture on all steps / no hooks = [0-9.]+", out)
