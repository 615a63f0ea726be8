"""A jax.profiler trace of chosen steps of a loop (training steps, inference batches)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax


class StepProfiler:
    """Traces the steps [start, start + count) with jax.profiler into `directory` (on a multi-host
    run each process into its own process_<i>/, as the trace files are named by host). Call
    `before(step)` and `after(step, outputs)` around every step, and `stop()` when the loop ends
    early. The trace opens in TensorBoard's profile plugin, XProf or Perfetto (its .trace.json.gz)."""

    def __init__(self, directory: Path, start: int, count: int):
        if jax.process_count() > 1:
            directory = directory / f"process_{jax.process_index()}"
        self.directory, self.start, self.end, self.tracing = directory, start, start + count, False

    def before(self, step: int) -> None:
        if step == self.start:
            self.directory.mkdir(parents=True, exist_ok=True)
            jax.profiler.start_trace(str(self.directory))
            self.tracing = True

    def after(self, step: int, outputs: Any) -> None:
        if self.tracing and step == self.end - 1:
            jax.block_until_ready(outputs)  # the trace must hold the last step's device work
            self.stop()

    def stop(self) -> None:
        if self.tracing:
            self.tracing = False
            jax.profiler.stop_trace()
