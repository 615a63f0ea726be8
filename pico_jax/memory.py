"""Device memory: what a compiled program plans to hold per device, and what a device can hold."""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

GiB = 2**30
# Of a device's memory, what a program chosen by its plan may fill (Trainer's remat="auto", the
# Pipeline's seed batch): the rest for the allocator's fragmentation and the buffers outside the
# program (the next batch, a loss being read).
HEADROOM = 0.9


def planned_peak_bytes(compiled: Any) -> int | None:
    """The bytes one device holds while a compiled (SPMD) program runs, by XLA's buffer
    assignment: its arguments, its outputs less those written into donated arguments, its
    temporaries and its code. None where the backend does not report a plan."""
    try:
        ma = compiled.memory_analysis()
    except Exception:  # not every backend implements it
        return None
    if ma is None:
        return None
    return int(ma.argument_size_in_bytes + ma.output_size_in_bytes - ma.alias_size_in_bytes
               + ma.temp_size_in_bytes + ma.generated_code_size_in_bytes)


def bytes_per_device(tree: Any) -> int:
    """The most bytes any one of this process's devices holds of the arrays in `tree` (its
    shards of each; a replicated array counts whole on every device)."""
    import jax

    held: dict[Any, int] = {}
    for leaf in jax.tree.leaves(tree):
        if isinstance(leaf, jax.Array):
            shard = math.prod(leaf.sharding.shard_shape(leaf.shape)) * leaf.dtype.itemsize
            for device in leaf.sharding.addressable_devices:
                held[device] = held.get(device, 0) + shard
    return max(held.values(), default=0)


def device_memory_limit(device: Any, local_devices: int = 1) -> int | None:
    """The bytes one device may hold. A GPU or TPU: its allocator's limit (`bytes_limit`; on a GPU
    the pool JAX preallocates, 75 % of the memory unless XLA_PYTHON_CLIENT_MEM_FRACTION says
    otherwise). A CPU device reports none; CPU devices share the host's memory, so the host's
    (its cgroup's limit where that is lower) over the `local_devices` of this process. None if
    neither is known."""
    try:
        stats = device.memory_stats()
    except Exception:  # some backends raise instead of returning None
        stats = None
    if stats and stats.get("bytes_limit"):
        return int(stats["bytes_limit"])
    host = host_memory_bytes()
    return None if host is None else host // max(local_devices, 1)


def host_memory_bytes() -> int | None:
    """This host's physical memory, or its cgroup's memory limit where that is lower (a container)."""
    try:
        total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        total = None
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            text = Path(path).read_text().strip()
        except OSError:
            continue
        if text.isdigit():  # "max": no limit
            limit = int(text)
            total = limit if total is None else min(total, limit)
        break
    return total


def memory_budget(device_memory_gib: float = 0.0) -> tuple[float, int | None]:
    """(the bytes per device a program chosen by its plan may plan, the device limit that is
    HEADROOM of): `device_memory_gib` if given, else the smallest `device_memory_limit` over all
    processes (collective: every process must call it); (inf, None) where no limit is known."""
    import jax

    if device_memory_gib:
        limit = int(device_memory_gib * GiB)
    else:
        limit = agreed(device_memory_limit(jax.local_devices()[0], jax.local_device_count()) or -1, min)
        limit = None if limit < 0 else limit
    return (math.inf if limit is None else HEADROOM * limit), limit


def agreed(value: int, how) -> int:
    """`how` (min or max) of an integer over all processes, the same answer on every one
    (collective: every process must call it)."""
    import jax

    if jax.process_count() == 1:
        return int(value)
    import numpy as np
    from jax.experimental import multihost_utils

    return int(how(np.asarray(multihost_utils.process_allgather(np.int64(value))).reshape(-1)))


def first_within(order: Sequence[Any], plans: dict[Any, int | None], budget: float) -> Any | None:
    """The first of `order` among `plans` (candidate → planned bytes per device, None: not
    reported) whose plan is within `budget` bytes; None if none is. For plans already compiled;
    `first_that_fits` compiles them in order and stops at the first."""
    return next((c for c in order if plans.get(c) is not None and plans[c] <= budget), None)


def first_that_fits(candidates: Sequence[Any], compile_one: Callable[[Any], Any],
                    budget: float) -> tuple[Any, Any, dict[Any, int | None], bool]:
    """Compile `compile_one(c)` for each candidate in order until XLA's plan for one
    (`planned_peak_bytes`, the largest over processes, so that every process picks the same
    program) is within `budget` bytes per device. Returns (the candidate, its compiled program,
    each tried candidate's plan, whether it fits); if none fits, the one planning the least (the
    last where no plan is reported). Collective: every process must call it."""
    plans: dict[Any, int | None] = {}
    best = None  # (candidate, compiled) planning the least so far
    for candidate in candidates:
        compiled = compile_one(candidate)
        planned = agreed(planned_peak_bytes(compiled) or -1, max)  # -1: not reported
        plans[candidate] = None if planned < 0 else planned
        if planned >= 0 and planned <= budget:
            return candidate, compiled, plans, True
        least = best is not None and plans[best[0]] is not None and (planned < 0 or plans[best[0]] <= planned)
        if not least:
            best = (candidate, compiled)
    return best[0], best[1], plans, False
