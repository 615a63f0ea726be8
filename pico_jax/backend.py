"""The backend a program is traced for, and exporting a GPU or TPU program from any host.

Model code picks kernels and work-arounds by backend: cuDNN flash attention on GPU, Pallas splash
attention on TPU, head-by-head attention and XLA:CPU's bf16 work-arounds on CPU. It asks
`target_backend()`, which is the backend running the process unless `traced_for(platform)` says
otherwise. That is what makes `jax.export` from a CPU host (a build machine, CI) give the program
a GPU or TPU would run, not a GPU artifact with CPU kernels baked in.
"""

from __future__ import annotations

import collections
import contextlib
import contextvars
import re
from collections.abc import Callable, Iterator
from typing import Any

import jax
from jax import export

_PLATFORM_TO_BACKEND = {"cpu": "cpu", "cuda": "gpu", "rocm": "gpu", "gpu": "gpu", "tpu": "tpu"}
_TARGET: contextvars.ContextVar[str | None] = contextvars.ContextVar("pico_jax_target_backend", default=None)

# Custom calls the model's kernels emit. JAX's export refuses custom calls without a compatibility
# guarantee; these are the kernels themselves, so an exported program carries them knowingly.
KERNEL_CUSTOM_CALLS = ("__cudnn$fmhaSoftmax", "__cudnn$fmhaSoftmaxBackward", "tpu_custom_call")


def target_backend() -> str:
    """'cpu', 'gpu' or 'tpu': what the program being traced is for (see `traced_for`)."""
    return _TARGET.get() or jax.default_backend()


@contextlib.contextmanager
def trace_setting(var: contextvars.ContextVar, value: Any) -> Iterator[None]:
    """`var` set to `value` inside, for a setting that changes what model code traces (the target
    backend, a forced attention kernel, remat switched off). JAX's caches are cleared on entry and
    exit: its trace caches key on shapes, not on such settings, and handed traces across the
    boundary both ways (a step traced after a FLOP count ran the count's attention). Compiled
    programs are dropped with them."""
    jax.clear_caches()
    token = var.set(value)
    try:
        yield
    finally:
        var.reset(token)
        jax.clear_caches()


@contextlib.contextmanager
def traced_for(platform: str) -> Iterator[str]:
    """Inside, model code is traced for `platform` ('cpu', 'cuda', 'rocm', 'gpu' or 'tpu')
    whatever device runs the process. JAX's trace caches are cleared on entry and exit: they key
    on shapes, not on this setting, and would hand back a trace made for the other backend."""
    try:
        backend = _PLATFORM_TO_BACKEND[platform]
    except KeyError:
        raise ValueError(f"unknown platform {platform!r}; choose one of {', '.join(_PLATFORM_TO_BACKEND)}") from None
    with trace_setting(_TARGET, backend):
        yield backend


@contextlib.contextmanager
def _assumed_cudnn(version: int | None) -> Iterator[None]:
    """JAX's cuDNN attention asks the local cuDNN for its version (to refuse features it lacks)
    and raises 'cuDNN is not detected' on a host without one. With `version`, and only when no
    cuDNN is installed, that question is answered with it. The version gates JAX's checks only."""
    from jax._src.cudnn import fused_attention_stablehlo as cudnn_attention

    if version is None or cudnn_attention.cuda_versions is not None:
        yield
        return
    original = cudnn_attention.check_cudnn_version
    cudnn_attention.check_cudnn_version = lambda: version
    try:
        yield
    finally:
        cudnn_attention.check_cudnn_version = original


@contextlib.contextmanager
def _jitted_for(fn: Callable, platform: str, assume_cudnn_version: int | None) -> Iterator[Any]:
    """`fn` jitted (unless it already is), with model code tracing for `platform` inside."""
    with traced_for(platform), _assumed_cudnn(assume_cudnn_version if platform == "cuda" else None):
        yield fn if hasattr(fn, "trace") else jax.jit(fn)


def lower_for(fn: Callable, platform: str, *args: Any, assume_cudnn_version: int | None = None,
              **kwargs: Any) -> jax.stages.Lowered:
    """`jax.jit(fn)` traced for `platform` (`traced_for`) and lowered for it; `args` may be
    `jax.ShapeDtypeStruct`s with shardings. The StableHLO (`.as_text()`) is that platform's
    program; compiling it needs the platform's devices. On a host without cuDNN, 'cuda' needs
    `assume_cudnn_version` (e.g. 91000 for cuDNN 9.10)."""
    with _jitted_for(fn, platform, assume_cudnn_version) as jitted:
        return jitted.trace(*args, **kwargs).lower(lowering_platforms=(platform,))


def export_for(fn: Callable, platform: str, *args: Any, assume_cudnn_version: int | None = None,
               **kwargs: Any) -> export.Exported:
    """`jax.export.export(jax.jit(fn), platforms=[platform])(*args)`, traced for `platform`, the
    model's kernels allowed (KERNEL_CUSTOM_CALLS): a serialisable artifact for that platform.
    JAX cannot serialise cuDNN attention over a multi-device mesh (its partitioning rule is a
    Python callback); `lower_for` can lower it."""
    checks = [export.DisabledSafetyCheck.custom_call(name) for name in KERNEL_CUSTOM_CALLS]
    with _jitted_for(fn, platform, assume_cudnn_version) as jitted:
        return export.export(jitted, platforms=[platform], disabled_checks=checks)(*args, **kwargs)


def custom_call_counts(program: str) -> dict[str, int]:
    """Call sites of each custom call a StableHLO module's text holds (`Lowered.as_text()`,
    `Exported.mlir_module()`), by target. A scanned layer stack holds one site for all its layers.
    Over a multi-device mesh, cuDNN attention shows as `CustomSPMDPartitioning` (JAX's wrapper
    for an op with its own partitioning rule) until XLA compiles it."""
    return dict(sorted(collections.Counter(re.findall(r"custom_call @([\w$.]+)\(", program)).items()))
