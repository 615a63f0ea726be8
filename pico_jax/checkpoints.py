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

import contextlib
import dataclasses
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np

from pico_jax.flow import PREDICTIONS
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


def plan_from_json(d: dict):
    """A SamplingPlan from its JSON form (pico.json's "sampling"; lists back to tuples). Not validated."""
    from pico_jax.pipeline import SamplingPlan
    from pico_jax.scorer import ScorerConfig

    d = dict(d)
    sc = dict(d.pop("scorer", None) or {})
    if "layers" in sc and sc["layers"] is not None:
        sc["layers"] = tuple(sc["layers"])
    if isinstance(sc.get("weights"), list):
        sc["weights"] = tuple(sc["weights"])
    return SamplingPlan(scorer=ScorerConfig(**sc), **d)


def plan_to_json(plan) -> dict:
    return dataclasses.asdict(plan)


def build_autoencoder(spec: dict, root: Path, dtype):
    """The autoencoder a pico.json / TrainConfig `autoencoder` spec describes (paths relative to root)."""
    from pico_jax.model.autoencoder import PixelAutoencoder, load_autoencoder

    kind = spec.get("kind")
    if kind == "pixel":
        return PixelAutoencoder(int(spec["factor"]), int(spec.get("channels", 3)))
    if kind == "diffusers":
        return load_autoencoder(root / spec.get("path", "vae"), dtype=dtype)
    raise CheckpointError(f"{root}/pico.json: autoencoder.kind must be 'pixel' or 'diffusers' (got {kind!r})")


def _text(spec: dict, root: Path, cfg):
    from pico_jax.parallel import to_device
    from pico_jax.pipeline import TextConditioning

    kind = spec.get("kind")
    if kind == "zeros":
        return TextConditioning.empty(int(spec.get("length", 1)), cfg.context_dim, cfg.pooled_dim)
    if kind == "file":
        r = SafetensorsReader(root / spec.get("path", "text.safetensors"))
        return TextConditioning(to_device(r["prompt_embeds"]), to_device(r["pooled_prompt_embeds"]))
    raise CheckpointError(f"{root}/pico.json: text.kind must be 'zeros' or 'file' (got {kind!r})")


@contextlib.contextmanager
def _atomic_dir(out: Path):
    """Yield a temporary sibling directory; on success it replaces `out` whole, on error it vanishes."""
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def checkpoint_fingerprint(path: str | os.PathLike | None = None) -> str:
    """sha256 over a checkpoint directory's files (relative names and bytes, in sorted order; None:
    the bundled pico-tiny). It names the checkpoint by its content, so the same weights copied to
    another machine or path fingerprint the same, and a retrained model at the old path does not."""
    root = Path(path) if path is not None else bundled_checkpoint()
    if not root.is_dir():
        raise CheckpointError(f"{root}: not a checkpoint directory")
    h = hashlib.sha256()
    for f in sorted(p for p in root.rglob("*") if p.is_file()):
        h.update(f.relative_to(root).as_posix().encode() + b"\0")
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 24), b""):
                h.update(block)
        h.update(b"\0")
    return h.hexdigest()


def load_pico(
    path: str | os.PathLike | None = None, dtype: Any = None, batch_size: int = 4, mesh: Any = None,
    gather_weights: str = "auto", **plan_overrides
):
    """Load a pico checkpoint directory into a Pipeline (None: the bundled pico-tiny).

    mesh: a `jax.sharding.Mesh` (`pico_jax.parallel.make_mesh`) to run on several devices; the
    transformer's parameters go straight onto their shards as they are read.
    gather_weights: over 'fsdp', "auto", "per_layer" or "per_call" (`Pipeline`)."""
    from pico_jax.convert import load_flux_transformer
    from pico_jax.pipeline import Pipeline, check_gather_weights

    check_gather_weights(gather_weights)  # a bad argument, not a bad checkpoint: before anything is read

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
        query_hint = meta.get("query_hint", False)
        if not isinstance(query_hint, bool):
            raise TypeError(f"query_hint must be true or false (got {query_hint!r})")
        prediction = meta.get("prediction", "velocity")
        if prediction not in PREDICTIONS:
            raise ValueError(f"prediction must be one of {PREDICTIONS} (got {prediction!r})")
        if not isinstance(meta["autoencoder"], dict):
            raise TypeError("autoencoder must be an object")
        dtype = dtype or getattr(jnp, str(meta.get("dtype", "float32")))
        plan = plan_from_json(meta.get("sampling", {})).validate()
    except CheckpointError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise CheckpointError(f"{meta_path}: invalid pico.json ({type(e).__name__}: {e})") from e
    plan = plan.override(**plan_overrides)  # a bad override: ValueError, as before
    place = None
    if mesh is not None:
        from pico_jax.parallel import check_batch_size, param_placer

        # Before any weights are read, and reported as what it is (a MeshError), not as a bad checkpoint.
        check_batch_size(batch_size, mesh, "batch_size")
        place = param_placer(mesh)
    transformer = load_flux_transformer(root / meta.get("transformer", "transformer"), dtype=dtype, place=place)
    try:
        ae = build_autoencoder(meta["autoencoder"], root, dtype)
        text = _text(meta.get("text", {"kind": "zeros"}), root, transformer.config)
        return Pipeline(transformer, ae, text, panel=panel, policy=meta.get("policy", "pad"),
                        plan=plan, batch_size=batch_size, query_hint=query_hint, prediction=prediction, mesh=mesh,
                        gather_weights=gather_weights)
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
    query_hint: bool = False,
    prediction: str = "velocity",
) -> Path:
    """Write a pico checkpoint directory atomically (a temp directory renamed into place)."""
    from pico_jax.convert import flux_state_to_diffusers

    out = Path(out_dir)
    with _atomic_dir(out) as tmp:
        (tmp / "transformer").mkdir()
        state = flux_state_to_diffusers(transformer)
        save_safetensors_atomic({k: np.asarray(v, np.float32) for k, v in state.items()},
                                tmp / "transformer" / "diffusion_pytorch_model.safetensors")
        (tmp / "transformer" / "config.json").write_text(json.dumps(transformer.config.to_diffusers(), indent=2))
        meta = {
            "format": FORMAT,
            "version": 1,
            "panel": panel,
            "policy": "pad",
            "query_hint": bool(query_hint),
            "prediction": prediction,
            "dtype": dtype,
            "transformer": "transformer",
            "autoencoder": autoencoder,
            "text": text or {"kind": "zeros", "length": 1},
            "sampling": plan_to_json(plan) if plan is not None else {},
        } | (extra or {})
        (tmp / "pico.json").write_text(json.dumps(meta, indent=2))
    return out


def pico_from_flux(
    flux_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    panel: int = 512,
    prompt: str = "",
    cache_dir: str | os.PathLike | None = None,
    text: str = "encode",
    text_length: int = 512,
    plan=None,
    dtype: str = "bfloat16",
) -> Path:
    """A pico checkpoint over a diffusers FLUX(.1-Fill) pipeline directory, without copying it.

    pico.json points at FLUX_DIR/transformer and FLUX_DIR/vae by absolute path. With
    text="encode" the prompt is embedded once with FLUX_DIR/text_encoder_2 (T5) and
    FLUX_DIR/text_encoder (CLIP) through the prompt cache and stored as text.safetensors; with
    text="zeros" an all-zero prompt of `text_length` tokens is used (no text encoders needed).
    """
    from pico_jax.pipeline import SamplingPlan

    src = Path(flux_dir).absolute()
    for sub in ("transformer", "vae"):
        if not (src / sub / "config.json").exists():
            raise CheckpointError(f"{src}: not a diffusers FLUX pipeline directory (no {sub}/config.json)")
    out = Path(out_dir)
    with _atomic_dir(out) as tmp:
        if text == "encode":
            from pico_jax.model.text import PromptCache, TextEncoderLoader, cached_encode

            loader = TextEncoderLoader(src / "text_encoder_2", src / "text_encoder")
            emb = cached_encode([prompt], loader, PromptCache(cache_dir or (src / ".pico_prompt_cache")))
            save_safetensors_atomic({"prompt_embeds": np.asarray(emb.prompt_embeds, np.float32),
                                     "pooled_prompt_embeds": np.asarray(emb.pooled_prompt_embeds, np.float32)},
                                    tmp / "text.safetensors", metadata={"prompt": prompt})
            text_spec = {"kind": "file", "path": "text.safetensors", "prompt": prompt}
        elif text == "zeros":
            text_spec = {"kind": "zeros", "length": text_length}
        else:
            raise ValueError(f"text must be 'encode' or 'zeros' (got {text!r})")
        guidance = 30.0 if json.loads((src / "transformer" / "config.json").read_text()).get("guidance_embeds") else None
        plan = plan or SamplingPlan(steps=28, guidance=guidance)
        meta = {"format": FORMAT, "version": 1, "panel": panel, "policy": "pad", "dtype": dtype,
                "transformer": str(src / "transformer"), "autoencoder": {"kind": "diffusers", "path": str(src / "vae")},
                "text": text_spec, "sampling": plan_to_json(plan), "source": str(src)}
        (tmp / "pico.json").write_text(json.dumps(meta, indent=2))
    return out


def main(argv=None) -> int:
    import argparse
    import sys

    p = argparse.ArgumentParser(
        prog="python -m pico_jax.checkpoints",
        description="Make a pico checkpoint (what infer.py --checkpoint loads) over a diffusers FLUX.1-Fill-dev "
                    "pipeline directory: the prompt is embedded once with its T5/CLIP, the weights are referenced, not copied.",
        epilog="example: python -m pico_jax.checkpoints from-flux /models/FLUX.1-Fill-dev pico-flux --panel 512\n"
               "         python infer.py --checkpoint pico-flux --exemplar a.png a_out.png --query b.png --out out/",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = p.add_subparsers(dest="cmd", required=True)
    f = sub.add_parser("from-flux", help="wrap a diffusers FLUX(-Fill) pipeline directory")
    f.add_argument("flux_dir")
    f.add_argument("out_dir")
    f.add_argument("--panel", type=int, default=512, help="panel size in pixels (canvas = 2x panel; default 512)")
    f.add_argument("--prompt", default="", help="the text prompt (PICO uses an empty prompt or a short task label)")
    f.add_argument("--cache-dir", help="prompt-embedding cache directory")
    f.add_argument("--no-text-encoders", action="store_true", help="use an all-zero prompt instead of running T5/CLIP")
    args = p.parse_args(argv)
    try:
        out = pico_from_flux(args.flux_dir, args.out_dir, panel=args.panel, prompt=args.prompt, cache_dir=args.cache_dir,
                             text="zeros" if args.no_text_encoders else "encode")
    except (CheckpointError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out}/pico.json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
