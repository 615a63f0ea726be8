import os
import tempfile

# Eight simulated CPU devices so sharding tests run anywhere, and XLA:CPU's LLVM code generation
# at its lowest optimization level: compiling is most of the suite's time, and what the tests
# check (values against the references, compiled plans, files) is decided by the HLO passes, which
# run as always. All 555 tests from an empty compilation cache: 15 min 22 s this way, 19 min 51 s
# optimized (2 cores, 2026-12-07). Must be set before jax is imported; an XLA_FLAGS of your own
# replaces it (XLA_FLAGS=--xla_force_host_platform_device_count=8 runs the suite optimized).
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0 "
                                   "--xla_llvm_disable_expensive_passes=true")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Reference tests must never reach a hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# A persistent XLA compilation cache shared by the test processes (xdist workers and the CLI
# subprocesses inherit these variables). Many tests build the same programs more than once: each
# Trainer jits its step afresh (resume, preemption and NaN tests run two or three Trainers on the
# same config), and an in-memory cache cannot see across them. On the 2-core CPU one such
# Trainer took ~85 s to compile and run; the second took ~11 s from the cache. The cache is keyed
# by the program, the flags and the jax version, so it changes what is compiled, never the results.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(tempfile.gettempdir(), f"pico_jax_test_xla_cache_{os.getuid()}"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
