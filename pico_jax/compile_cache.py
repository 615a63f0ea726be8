"""JAX's persistent compilation cache for the command-line tools (infer, train, eval).

Every run of a CLI compiles the same programs again (the sampler, the training step); the
cache keeps XLA's compiled executables on disk, keyed by the program, the compiler flags, the
backend and the jax version, so a later run with the same shapes loads them instead. It changes
what is compiled, never the results. The bundled example's painting went from 7.0 to 4.0-4.2 s on
2 CPU cores (benchmarks/RESULTS.md, eleventh session); a FLUX.1-dev sampler's compile is the
larger saving.

Where it lives, first match wins:
  1. the CLI's --compile-cache DIR (or 'off');
  2. JAX's own setting, JAX_COMPILATION_CACHE_DIR, if the environment gives one;
  3. $PICO_JAX_COMPILE_CACHE (a directory, or 'off');
  4. $XDG_CACHE_HOME/pico_jax/xla, else ~/.cache/pico_jax/xla.

Multi-process runs: JAX writes entries from process 0 only, and on XLA:CPU the other processes'
keys differ from process 0's (their compile options and devices are hashed), so they compile
every program on every run; measured with two processes on one machine (twenty-fourth session).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

ENV_VAR = "PICO_JAX_COMPILE_CACHE"
OFF = ("off", "none", "0", "false")
# Least-recently-used entries are evicted beyond this (JAX's default is no limit).
MAX_BYTES = 8 * 2**30
# Programs that compile faster than this are not written (JAX's default is 1 s; the bundled
# model's smaller programs take 0.5-1 s each and are recompiled on every run otherwise).
MIN_COMPILE_SECONDS = 0.5

HELP = (f"persistent XLA compilation cache: a re-run with the same shapes loads the compiled programs "
        f"instead of compiling them (default: JAX_COMPILATION_CACHE_DIR if set, else ${ENV_VAR}, else "
        f"~/.cache/pico_jax/xla; 'off' disables it)")


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "pico_jax" / "xla"


def enable_compile_cache(setting: str | None = None, *, prog: str = "pico_jax") -> str | None:
    """Turn on JAX's persistent compilation cache; returns the directory in use, or None if off.

    `setting` is a CLI flag's value: a directory, 'off', or None to follow the environment (see
    the module docstring). A directory that cannot be created or written is reported on stderr
    with its path and the run goes on without the cache: a cache must never stop a job."""
    import jax

    if setting is None:
        if jax.config.jax_compilation_cache_dir:  # the user's own JAX setting
            return jax.config.jax_compilation_cache_dir
        setting = os.environ.get(ENV_VAR, "")
    if setting.strip().lower() in OFF:
        jax.config.update("jax_enable_compilation_cache", False)
        return None
    path = Path(setting).expanduser() if setting.strip() else default_cache_dir()
    try:
        if path.exists() and not path.is_dir():
            raise NotADirectoryError(20, "not a directory")
        path.mkdir(parents=True, exist_ok=True)
        if not os.access(path, os.W_OK | os.X_OK):
            raise PermissionError(13, "not writable")
    except OSError as e:
        print(f"{prog}: warning: compile cache {path}: cannot use it ({e.strerror or e}); compiling without it",
              file=sys.stderr)
        return None
    jax.config.update("jax_enable_compilation_cache", True)
    jax.config.update("jax_compilation_cache_dir", str(path))
    if jax.config.jax_persistent_cache_min_compile_time_secs > MIN_COMPILE_SECONDS:
        jax.config.update("jax_persistent_cache_min_compile_time_secs", MIN_COMPILE_SECONDS)
    if jax.config.jax_compilation_cache_max_size < 0 and _has_filelock():  # jax needs it to bound the size
        jax.config.update("jax_compilation_cache_max_size", MAX_BYTES)
    return str(path)


def _has_filelock() -> bool:
    import importlib.util

    return importlib.util.find_spec("filelock") is not None
