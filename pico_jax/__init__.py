"""pico_jax: PICO visual in-context learning with FLUX diffusion transformers in JAX / Flax NNX.

Public entry points are imported lazily so `import pico_jax` stays fast and a missing optional
dependency (e.g. `transformers` for tokenizers) only matters for the function that needs it.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_LAZY = {
    "load_flux_transformer": "pico_jax.convert",
    "FluxConfig": "pico_jax.model.flux",
    "FluxTransformer": "pico_jax.model.flux",
    "AttentionHooks": "pico_jax.model.attention",
    "load_autoencoder": "pico_jax.model.autoencoder",
    "load_text_encoders": "pico_jax.model.text",
    "Pipeline": "pico_jax.pipeline",
}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'pico_jax' has no attribute {name!r}")


__all__ = list(_LAZY)
