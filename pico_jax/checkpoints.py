"""The pico checkpoint directory: everything `Pipeline.load` needs to run PICO inference.

    DIR/pico.json          panel size, autoencoder, text conditioning, default sampling plan
    DIR/transformer/       the FLUX transformer in diffusers layout (config.json + safetensors):
                           loadable by diffusers' FluxTransformer2DModel.from_pretrained too
    DIR/vae/               (optional) a diffusers AutoencoderKL, when autoencoder.kind = "diffusers"
    DIR/text.safetensors   (optional) precomputed prompt embeddings, when text.kind = "file"

A FLUX.1-Fill-dev base is described the same way (transformer/ and vae/ from the diffusers
pipeline directory, text embedded once with `pico_jax.model.text` and stored as a file).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np

from pico_jax.safetensors_io import CheckpointError, SafetensorsReader, save_safetensors_atomic

BUNDLED = Path(__file__).parent / "pretrained" / "pico-tiny"
FORMAT = "pico_jax"


def bundled_checkpoint() -> Path:
    """The pico-tiny model shipped with the package (clear error if it is missing)."""
    if not (BUNDLED / "pico.json").exists():
        raise CheckpointError(
            f"the bundled pico-tiny model is missing ({BUNDLED}/pico.json). Train it with "
            "`python train.py --config configs/pico_tiny.py --workdir runs/pico-tiny` and export it with "
            "`python train.py ... --export pico_jax/pretrained/pico-tiny`, or pass --checkpoint."
        )
    return BUNDLED


def _plan_from_json(d: dict):
    from pico_jax.pipeline import SamplingPlan
    from pico_jax.scorer import ScorerConfig

    d = dict(d)
    sc = d.pop("scorer", {})
    if "layers" in sc and sc["layers"] is not None:
        sc["layers"] = tuple(sc["layers"])
    if isinstance(sc.get("weights"), list):
        sc["weights"] = tuple(sc["weights"])
    return SamplingPlan(scorer=ScorerConfig(**sc), **d)


def plan_to_json(plan) -> dict:
    d = dataclasses.asdict(plan)
    return d


def _autoencoder(spec: dict, root: Path, dtype):
    from pico_jax.model.autoencoder import PixelAutoencoder, load_autoencoder

    kind = spec.get("kind")
    if kind == "pixel":
        return PixelAutoencoder(int(spec["factor"]), int(spec.get("channels", 3)))
    if kind == "diffusers":
        return load_autoencoder(root / spec.get("path", "vae"), dtype=dtype)
    raise CheckpointError(f"{root}/pico.json: autoencoder.kind must be 'pixel' or 'diffusers' (got {kind!r})")


def _text(spec: dict, root: Path, cfg):
    from pico_jax.pipeline import TextConditioning

    kind = spec.get("kind")
    if kind == "zeros":
        return TextConditioning.empty(int(spec.get("length", 1)), cfg.context_dim, cfg.pooled_dim)
    if kind == "file":
        r = SafetensorsReader(root / spec.get("path", "text.safetensors"))
        return TextConditioning(jnp.asarray(r["prompt_embeds"]), jnp.asarray(r["pooled_prompt_embeds"]))
    raise CheckpointError(f"{root}/pico.json: text.kind must be 'zeros' or 'file' (got {kind!r})")


def load_pico(path: str | os.PathLike | None = None, dtype: Any = None, batch_size: int = 4, **plan_overrides):
    """Load a pico checkpoint directory into a Pipeline (None: the bundled pico-tiny)."""
    from pico_jax.convert import load_flux_transformer
    from pico_jax.pipeline import Pipeline

    root = Path(path) if path is not None else bundled_checkpoint()
    meta_path = root / "pico.json"
    if not meta_path.exists():
        raise CheckpointError(f"{root}: not a pico checkpoint (no pico.json)")
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{meta_path}: not valid JSON ({e})") from e
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"{meta_path}: 'format' must be {FORMAT!r}")
    # Malformed fields raise KeyError/TypeError/ValueError deep inside; report them as a bad
    # pico.json (CheckpointError, naming the file) so callers such as the CLI can catch one type.
    missing = [k for k in ("panel", "autoencoder") if k not in meta]
    if missing:
        raise CheckpointError(f"{meta_path}: missing key(s) {missing}")
    try:
        panel = int(meta["panel"])
        if panel < 1:
            raise ValueError(f"panel must be positive (got {panel})")
        if not isinstance(meta["autoencoder"], dict):
            raise TypeError("autoencoder must be an object")
        dtype = dtype or getattr(jnp, str(meta.get("dtype", "float32")))
        plan = _plan_from_json(meta.get("sampling", {})).validate()
    except CheckpointError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise CheckpointError(f"{meta_path}: invalid pico.json ({type(e).__name__}: {e})") from e
    plan = dataclasses.replace(plan, **plan_overrides).validate()  # a bad override: ValueError, as before
    transformer = load_flux_transformer(root / meta.get("transformer", "transformer"), dtype=dtype)
    try:
        ae = _autoencoder(meta["autoencoder"], root, dtype)
        text = _text(meta.get("text", {"kind": "zeros"}), root, transformer.config)
        return Pipeline(transformer, ae, text, panel=panel, policy=meta.get("policy", "pad"),
                        plan=plan, batch_size=batch_size)
    except CheckpointError:
        raise
    except (KeyError, TypeError, ValueError) as e:  # e.g. autoencoder without 'factor', channel mismatch
        raise CheckpointError(f"{meta_path}: inconsistent checkpoint ({type(e).__name__}: {e})") from e


def save_pico(
    out_dir: str | os.PathLike,
    transformer,
    *,
    panel: int,
    autoencoder: dict,
    text: dict | None = None,
    plan=None,
    extra: dict | None = None,
    dtype: str = "float32",
) -> Path:
    """Write a pico checkpoint directory atomically (a temp directory renamed into place)."""
    from pico_jax.convert import flux_state_to_diffusers

    out = Path(out_dir)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        (tmp / "transformer").mkdir(parents=True)
        state = flux_state_to_diffusers(transformer)
        save_safetensors_atomic({k: np.asarray(v, np.float32) for k, v in state.items()},
                                tmp / "transformer" / "diffusion_pytorch_model.safetensors")
        (tmp / "transformer" / "config.json").write_text(json.dumps(transformer.config.to_diffusers(), indent=2))
        meta = {
            "format": FORMAT,
            "version": 1,
            "panel": panel,
            "policy": "pad",
            "dtype": dtype,
            "transformer": "transformer",
            "autoencoder": autoencoder,
            "text": text or {"kind": "zeros", "length": 1},
            "sampling": plan_to_json(plan) if plan is not None else {},
        } | (extra or {})
        (tmp / "pico.json").write_text(json.dumps(meta, indent=2))
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return out
