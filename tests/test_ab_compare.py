"""benchmarks/ab_compare.py: the paired statistics, the source resolution, and one end-to-end run of two
workers at toy size."""

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "ab_compare.py"
_spec = importlib.util.spec_from_file_location("ab_compare", SCRIPT)
ab = importlib.util.module_from_spec(_spec)
sys.modules["ab_compare"] = ab  # dataclasses look their module up by name
_spec.loader.exec_module(ab)


def test_paired_ratio_sees_a_steady_speedup_through_shared_noise():
    """A background that slows both sides of a pair alike (5x swings) hides nothing from the paired ratio."""
    g = np.random.default_rng(1)
    load = g.uniform(1.0, 5.0, 15)
    a = 100.0 * load * g.uniform(0.98, 1.02, 15)
    b = 90.0 * load * g.uniform(0.98, 1.02, 15)
    r = ab.paired_ratio(a, b)
    assert 0.87 < r.low <= r.median <= r.high < 0.93
    assert r.verdict.startswith("B is faster")
    assert ab.paired_ratio(b, a).verdict.startswith("B is slower")


def test_paired_ratio_does_not_call_noise_a_difference():
    g = np.random.default_rng(2)
    a, b = 100 * g.uniform(0.8, 1.2, 15), 100 * g.uniform(0.8, 1.2, 15)
    r = ab.paired_ratio(a, b)
    assert r.low < 1.0 < r.high
    assert r.verdict.startswith("no difference resolved")


@pytest.mark.parametrize("a,b", [([1.0], [1.0]), ([1.0, 2.0], [1.0, 2.0, 3.0])])
def test_paired_ratio_rejects_unusable_series(a, b):
    with pytest.raises(ValueError, match="two equal-length series"):
        ab.paired_ratio(a, b)


def test_pair_order_alternates_who_goes_first():
    order = ab.pair_order(6)
    assert order[0] == ("a", "b") and order[1] == ("b", "a")
    assert sum(o[0] == "a" for o in order) == 3


def test_resolve_source_names_what_it_could_not_use(tmp_path):
    with pytest.raises(SystemExit, match="'no-such-rev' is neither a directory nor a git revision"):
        ab.resolve_source("no-such-rev", tmp_path)
    with pytest.raises(SystemExit, match="without a pico_jax package"):
        ab.resolve_source(str(tmp_path), tmp_path)


def test_resolve_source_exports_a_revision(tmp_path):
    if subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True).returncode != 0:
        pytest.skip("not a git checkout")
    dest = ab.resolve_source("HEAD", tmp_path)
    assert (dest / "pico_jax" / "__init__.py").is_file() and dest.parent == tmp_path


def test_ab_compare_runs_two_workers_and_they_compute_the_same_step():
    """Both sides the working tree: both workers compile the toy LoRA step and report the same loss."""
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, str(SCRIPT), "--a", str(ROOT), "--b", str(ROOT), "--program", "lora",
                           "--pairs", "3", "--double", "1", "--single", "1", "--width", "64", "--head-dim", "32",
                           "--tokens", "4", "--text", "4", "--rank", "4"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr[-4000:]}"
    outputs = re.findall(r"^  [AB] = .* median ([0-9.]+) ms.* output ([0-9.e+-]+)$", proc.stdout, re.MULTILINE)
    assert len(outputs) == 2, proc.stdout
    assert all(float(ms) > 0 for ms, _ in outputs)
    assert outputs[0][1] == outputs[1][1]
    assert re.search(r"B/A = [0-9.]+ \(90% interval [0-9.]+-[0-9.]+.*over 3 pairs", proc.stdout)


def test_parse_overrides_reads_json_values_and_names_a_malformed_flag():
    assert ab.parse_overrides(["scan_unroll=0", "remat=dots", "axes_dims_rope=[4,6,6]"], "--config-b") == {
        "scan_unroll": 0, "remat": "dots", "axes_dims_rope": [4, 6, 6]}
    with pytest.raises(SystemExit, match="--config-a 'remat' is not FIELD=VALUE"):
        ab.parse_overrides(["remat"], "--config-a")


def test_ab_compare_names_an_unknown_config_field_and_fails():
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, str(SCRIPT), "--a", str(ROOT), "--b", str(ROOT), "--pairs", "2",
                           "--double", "1", "--single", "1", "--width", "64", "--head-dim", "32", "--tokens", "4",
                           "--text", "4", "--config-b", "no_such_field=1"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode != 0
    assert "FluxConfig has no field no_such_field" in proc.stdout + proc.stderr
    assert "worker B exited" in proc.stdout + proc.stderr
