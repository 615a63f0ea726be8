"""The CLIs' persistent compilation cache (`pico_jax.compile_cache`): where it goes, that a second
process loads what the first compiled, that 'off' and an unusable path leave the run going
without it, and that infer.py's --compile-cache fills the given directory. Each case runs in a
fresh process: JAX's cache settings are process-wide and the test session has its own cache."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# A program, then the cache hits counted from JAX's own monitoring events.
PROGRAM = """
import json, sys
import jax, jax.numpy as jnp
from pico_jax.compile_cache import enable_compile_cache
hits = []
jax.monitoring.register_event_listener(lambda name, **kw: hits.append(name) if name.endswith("cache_hits") else None)
where = enable_compile_cache(sys.argv[1] if len(sys.argv) > 1 else None, prog="test")
y = jax.jit(lambda x: jnp.tanh(x @ x.T).sum())(jnp.ones((64, 64)))
print(json.dumps({"dir": where, "hits": len(hits), "enabled": jax.config.jax_enable_compilation_cache,
                  "value": float(y)}))
"""


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_COMPILATION_CACHE", "JAX_PERSISTENT_CACHE",
                                                                       "PICO_JAX_COMPILE_CACHE", "XDG_CACHE_HOME"))}
    env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"  # the test's program compiles in milliseconds
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.update(extra)
    return env


def _run(*args, **env):
    proc = subprocess.run([sys.executable, "-c", PROGRAM, *args], env=_env(**env), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1]), proc.stderr


def test_a_second_process_loads_what_the_first_compiled(tmp_path):
    cache = tmp_path / "cache"
    first, _ = _run(str(cache))
    assert first["dir"] == str(cache) and first["hits"] == 0 and any(cache.iterdir())
    second, _ = _run(str(cache))
    assert second["hits"] >= 1 and second["value"] == first["value"]


def test_default_directory_and_the_environment(tmp_path):
    got, _ = _run(XDG_CACHE_HOME=str(tmp_path / "xdg"))
    assert got["dir"] == str(tmp_path / "xdg" / "pico_jax" / "xla") and any(Path(got["dir"]).iterdir())
    got, _ = _run(PICO_JAX_COMPILE_CACHE=str(tmp_path / "mine"), XDG_CACHE_HOME=str(tmp_path / "xdg2"))
    assert got["dir"] == str(tmp_path / "mine") and not (tmp_path / "xdg2").exists()
    # JAX's own setting wins over ours when no flag is given
    got, _ = _run(JAX_COMPILATION_CACHE_DIR=str(tmp_path / "jax"), PICO_JAX_COMPILE_CACHE=str(tmp_path / "ours"))
    assert got["dir"] == str(tmp_path / "jax") and not (tmp_path / "ours").exists()


@pytest.mark.parametrize("how", ["flag", "env"])
def test_off_disables_it(tmp_path, how):
    args, env = (["off"], {}) if how == "flag" else ([], {"PICO_JAX_COMPILE_CACHE": "off"})
    got, _ = _run(*args, XDG_CACHE_HOME=str(tmp_path / "xdg"), **env)
    assert got["dir"] is None and got["enabled"] is False and not (tmp_path / "xdg").exists()


def test_an_unusable_directory_is_reported_and_the_run_goes_on(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    got, err = _run(str(blocker))
    assert got["dir"] is None and got["value"] > 0
    assert f"compile cache {blocker}" in err and "not a directory" in err and "compiling without it" in err
    got, err = _run(str(blocker / "below"))
    assert got["dir"] is None and str(blocker / "below") in err


def test_infer_cli_flag_fills_the_given_directory(tmp_path):
    cache = tmp_path / "cache"
    ex = ROOT / "assets" / "examples" / "denoise"
    cmd = [sys.executable, str(ROOT / "infer.py"), "--exemplar", str(ex / "A.png"), str(ex / "A_out.png"),
           "--query", str(ex / "B.png"), "--out", str(tmp_path / "out"), "--steps", "2", "--seeds", "2",
           "--keep", "1", "--score-steps", "1", "--no-progress", "--compile-cache", str(cache)]
    env = _env()
    env.pop("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS")  # the CLI's own threshold applies
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "out" / "B.png").is_file() and len(list(cache.iterdir())) >= 1


def test_every_cli_takes_the_flag():
    from pico_jax.eval import build_parser as eval_parser
    from pico_jax.infer import build_parser as infer_parser
    from pico_jax.train_cli import build_parser as train_parser

    assert infer_parser().parse_args(["--out", "o", "--compile-cache", "off"]).compile_cache == "off"
    assert train_parser().parse_args(["--config", "c", "--workdir", "w", "--compile-cache", "d"]).compile_cache == "d"
    assert eval_parser().parse_args(["--out", "o", "--compile-cache", "d"]).compile_cache == "d"
