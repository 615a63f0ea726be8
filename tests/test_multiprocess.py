"""Real multi-host runs: two JAX processes on this machine (2 simulated CPU devices each, gloo
collectives), started the way a cluster starts them (JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES,
JAX_PROCESS_ID), against one process holding the same 4 devices. Inference writes from the first
process only and paints the same images; training logs once and follows the same losses, through a
checkpoint and a resume; the evaluation reports the same numbers."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "assets" / "examples"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _env(devices: int, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_COORDINATOR", "JAX_NUM_PROC", "JAX_PROCESS"))}
    # The suite's other XLA flags (conftest's code-generation level) with this job's device count.
    inherited = [f for f in os.environ.get("XLA_FLAGS", "").split() if not f.startswith("--xla_force_host_platform")]
    env.update(XLA_FLAGS=" ".join([f"--xla_force_host_platform_device_count={devices}", *inherited]),
               JAX_PLATFORMS="cpu", **extra)
    return env


def _run_processes(argv: list[str], n: int, timeout: int = 600) -> list[subprocess.CompletedProcess]:
    """`python argv...` as n processes of one distributed JAX job; all must succeed."""
    port = _free_port()
    procs = [subprocess.Popen([sys.executable, *argv], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env=_env(2, JAX_COORDINATOR_ADDRESS=f"localhost:{port}",
                                                  JAX_NUM_PROCESSES=str(n), JAX_PROCESS_ID=str(i),
                                                  JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo"))
             for i in range(n)]
    done = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=timeout)
            done.append(subprocess.CompletedProcess(p.args, p.returncode, out, err))
    finally:
        for p in procs:
            p.kill()
    for i, r in enumerate(done):
        assert r.returncode == 0, f"process {i}: {r.stderr[-3000:]}"
    return done


def _run_one(argv: list[str], devices: int = 4, timeout: int = 600) -> subprocess.CompletedProcess:
    r = subprocess.run([sys.executable, *argv], cwd=ROOT, capture_output=True, text=True, env=_env(devices),
                       timeout=timeout)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def test_two_process_inference_paints_what_one_process_paints(tmp_path):
    e = EXAMPLES / "denoise"
    args = ["infer.py", "--exemplar", str(e / "A.png"), str(e / "A_out.png"), "--query", str(e / "B.png"),
            "--query", str(EXAMPLES / "recolor" / "B.png"), "--seeds", "3", "--batch-size", "4",
            "--mesh", "data=2,fsdp=2", "--no-progress"]
    _run_processes([*args, "--out", str(tmp_path / "two")], 2)
    _run_one([*args, "--out", str(tmp_path / "one")])
    names = sorted(p.name for p in (tmp_path / "one").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "two").iterdir())  # written once, not twice
    assert sum(n.endswith(".png") for n in names) == 4
    for n in names:
        if n.endswith(".png"):
            a, b = (np.asarray(Image.open(tmp_path / k / n), np.int16) for k in ("one", "two"))
            assert np.abs(a - b).max() <= 1, n
    one, two = (json.loads((tmp_path / k / "scores.json").read_text())["queries"] for k in ("one", "two"))
    assert {k: v["chosen_seed"] for k, v in one.items()} == {k: v["chosen_seed"] for k, v in two.items()}


def _losses(workdir: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in map(json.loads, (workdir / "metrics.jsonl").read_text().splitlines())]


def test_two_process_training_follows_one_process_through_a_resume(tmp_path):
    """Each process reads its block of every global batch (the data does not depend on the host
    count), the step is one collective program, orbax writes one checkpoint from both, and only the
    first process writes metrics and samples. With remat=auto every process compiles, and runs, the
    policy they agree on (the device limit's minimum and each plan's maximum over processes). The
    two processes read their data in 2 worker processes each (data_workers), the one process in
    threads: the same batches."""
    base = ["train.py", "--config", "configs/tiny.py", "--no-progress", "--mesh", "data=2,fsdp=2",
            "--set", "checkpoint_every=3", "--set", "log_every=1", "--set", "remat=auto"]
    workers = ["--set", "data_workers=2"]
    _run_processes([*base, *workers, "--workdir", str(tmp_path / "two"), "--set", "steps=3"], 2)
    _run_processes([*base, *workers, "--workdir", str(tmp_path / "two"), "--set", "steps=5"], 2)  # resumes at 3
    _run_one([*base, "--workdir", str(tmp_path / "one"), "--set", "steps=5"])
    one, two = _losses(tmp_path / "one"), _losses(tmp_path / "two")
    assert [s for s, _ in two] == [1, 2, 3, 4, 5] == [s for s, _ in one]  # one row per step
    np.testing.assert_allclose([l for _, l in two], [l for _, l in one], rtol=1e-5)
    assert sorted(p.name for p in (tmp_path / "two" / "checkpoints").iterdir()) == ["3", "5"]
    assert sorted(p.name for p in (tmp_path / "two" / "samples").iterdir()) == ["step_000003.png", "step_000005.png"]
    reports = [json.loads((tmp_path / k / "config.json").read_text())["remat_auto"] for k in ("one", "two")]
    assert reports[0]["chosen"] == reports[1]["chosen"] == "none"


def test_two_process_evaluation_reports_what_one_process_reports(tmp_path):
    args = ["-m", "pico_jax.eval", "--families", "denoise,recolor", "--episodes", "2", "--seeds", "3", "--steps", "3",
            "--score-steps", "1", "--batch-size", "4", "--mesh", "data=2,fsdp=2", "--no-progress", "--bootstrap", "200"]
    two = _run_processes([*args, "--out", str(tmp_path / "two")], 2)
    _run_one([*args, "--out", str(tmp_path / "one")])
    assert "wrote" in two[0].stdout and "wrote" not in two[1].stdout
    one_res, two_res = (json.loads((tmp_path / k / "results.json").read_text()) for k in ("one", "two"))
    for r in (one_res, two_res):
        r["settings"].pop("seconds")
    assert two_res == one_res
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == ["results.json", "results.md", "sheet_train.png"]
