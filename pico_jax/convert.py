"""FLUX checkpoints in: diffusers and BFL safetensors → our FluxTransformer.

Both formats are described by one table per format, built from the model config: for every
parameter of our model, the source tensors it is made of and how to combine them (concatenate
q/k/v, transpose torch's (out, in) weights, swap the final modulation's halves, reorder fused
axes into our head-grouped layout: `pico_jax.model.flux.fused_order`). Conversion runs
leaf by leaf: a stacked leaf (all 19 or 38 layers) is assembled in host memory, placed on the
device(s) (sharded when a sharding function is given), and dropped before the next one, so a
24 GB checkpoint never exists twice in host memory.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx

from pico_jax.model.flux import FluxConfig, FluxTransformer, abstract_model, fused_order, reorder_fused_axis
from pico_jax.parallel import Placer, default_placer
from pico_jax.safetensors_io import CheckpointError, SafetensorsReader, check_keys, check_shape, read_config


@dataclass(frozen=True)
class Source:
    """How one of our parameters is built from checkpoint tensors.

    keys: checkpoint keys ('{i}' is the layer index for stacked parameters), concatenated along
    torch's output axis; transpose: torch (out, in) weight → our (in, out) kernel;
    swap_halves: exchange the two halves of the output axis (diffusers stores the final
    modulation as (scale, shift), BFL and we as (shift, scale)); out_order / in_order: a
    `fused_order` kind ('qkv', 'linear1', 'linear2') that reorders torch's output / input axis
    into our head-grouped layout.
    """

    keys: tuple[str, ...]
    transpose: bool = False
    swap_halves: bool = False
    out_order: str | None = None
    in_order: str | None = None


def _linear(target: str, *sources: str, swap: bool = False, out_order: str | None = None,
            in_order: str | None = None) -> dict[str, Source]:
    return {
        f"{target}.kernel": Source(tuple(f"{s}.weight" for s in sources), transpose=True, swap_halves=swap,
                                   out_order=out_order, in_order=in_order),
        f"{target}.bias": Source(tuple(f"{s}.bias" for s in sources), swap_halves=swap, out_order=out_order),
    }


def to_our_order(x: np.ndarray, src: Source, cfg: FluxConfig) -> np.ndarray:
    """A torch-layout tensor ((out, in) weight or (out,) bias) in checkpoint order → our fused order.
    An axis of the wrong length is left as it is, for the caller's shape check to report."""
    return _reorder(x, src, cfg, inverse=False)


def _reorder(x: np.ndarray, src: Source, cfg: FluxConfig, inverse: bool) -> np.ndarray:
    for axis, kind in ((0, src.out_order), (1, src.in_order)):
        if kind and x.ndim > axis and x.shape[axis] == len(fused_order(cfg, kind)):
            x = reorder_fused_axis(x, cfg, kind, axis, inverse)
    return x


def to_checkpoint_order(x: np.ndarray, src: Source, cfg: FluxConfig) -> np.ndarray:
    """The inverse of `to_our_order`."""
    return _reorder(x, src, cfg, inverse=True)


def _norm(target: str, key: str) -> dict[str, Source]:
    return {f"{target}.scale": Source((key,))}


def diffusers_table(cfg: FluxConfig) -> dict[str, Source]:
    """Our parameter path → diffusers FluxTransformer2DModel keys."""
    t: dict[str, Source] = {}
    t |= _linear("img_in", "x_embedder")
    t |= _linear("txt_in", "context_embedder")
    t |= _linear("time_in.in_layer", "time_text_embed.timestep_embedder.linear_1")
    t |= _linear("time_in.out_layer", "time_text_embed.timestep_embedder.linear_2")
    t |= _linear("vector_in.in_layer", "time_text_embed.text_embedder.linear_1")
    t |= _linear("vector_in.out_layer", "time_text_embed.text_embedder.linear_2")
    if cfg.guidance_embeds:
        t |= _linear("guidance_in.in_layer", "time_text_embed.guidance_embedder.linear_1")
        t |= _linear("guidance_in.out_layer", "time_text_embed.guidance_embedder.linear_2")
    t |= _linear("final_mod", "norm_out.linear", swap=True)
    t |= _linear("final_proj", "proj_out")
    d = "transformer_blocks.{i}"
    t |= _linear("double_blocks.img.mod", f"{d}.norm1.linear")
    t |= _linear("double_blocks.txt.mod", f"{d}.norm1_context.linear")
    t |= _linear("double_blocks.img.qkv", f"{d}.attn.to_q", f"{d}.attn.to_k", f"{d}.attn.to_v", out_order="qkv")
    t |= _linear("double_blocks.txt.qkv", f"{d}.attn.add_q_proj", f"{d}.attn.add_k_proj", f"{d}.attn.add_v_proj",
                 out_order="qkv")
    t |= _norm("double_blocks.img.q_norm", f"{d}.attn.norm_q.weight")
    t |= _norm("double_blocks.img.k_norm", f"{d}.attn.norm_k.weight")
    t |= _norm("double_blocks.txt.q_norm", f"{d}.attn.norm_added_q.weight")
    t |= _norm("double_blocks.txt.k_norm", f"{d}.attn.norm_added_k.weight")
    t |= _linear("double_blocks.img.proj", f"{d}.attn.to_out.0")
    t |= _linear("double_blocks.txt.proj", f"{d}.attn.to_add_out")
    t |= _linear("double_blocks.img.mlp_in", f"{d}.ff.net.0.proj")
    t |= _linear("double_blocks.img.mlp_out", f"{d}.ff.net.2")
    t |= _linear("double_blocks.txt.mlp_in", f"{d}.ff_context.net.0.proj")
    t |= _linear("double_blocks.txt.mlp_out", f"{d}.ff_context.net.2")
    s = "single_transformer_blocks.{i}"
    t |= _linear("single_blocks.mod", f"{s}.norm.linear")
    t |= _linear("single_blocks.linear1", f"{s}.attn.to_q", f"{s}.attn.to_k", f"{s}.attn.to_v", f"{s}.proj_mlp",
                 out_order="linear1")
    t |= _linear("single_blocks.linear2", f"{s}.proj_out", in_order="linear2")
    t |= _norm("single_blocks.q_norm", f"{s}.attn.norm_q.weight")
    t |= _norm("single_blocks.k_norm", f"{s}.attn.norm_k.weight")
    return t


def bfl_table(cfg: FluxConfig) -> dict[str, Source]:
    """Our parameter path → BFL single-file keys (flux1-dev.safetensors naming)."""
    t: dict[str, Source] = {}
    for ours, theirs in [
        ("img_in", "img_in"),
        ("txt_in", "txt_in"),
        ("time_in.in_layer", "time_in.in_layer"),
        ("time_in.out_layer", "time_in.out_layer"),
        ("vector_in.in_layer", "vector_in.in_layer"),
        ("vector_in.out_layer", "vector_in.out_layer"),
        ("final_mod", "final_layer.adaLN_modulation.1"),
        ("final_proj", "final_layer.linear"),
    ]:
        t |= _linear(ours, theirs)
    if cfg.guidance_embeds:
        t |= _linear("guidance_in.in_layer", "guidance_in.in_layer")
        t |= _linear("guidance_in.out_layer", "guidance_in.out_layer")
    d = "double_blocks.{i}"
    for stream in ("img", "txt"):
        t |= _linear(f"double_blocks.{stream}.mod", f"{d}.{stream}_mod.lin")
        t |= _linear(f"double_blocks.{stream}.qkv", f"{d}.{stream}_attn.qkv", out_order="qkv")
        t |= _linear(f"double_blocks.{stream}.proj", f"{d}.{stream}_attn.proj")
        t |= _linear(f"double_blocks.{stream}.mlp_in", f"{d}.{stream}_mlp.0")
        t |= _linear(f"double_blocks.{stream}.mlp_out", f"{d}.{stream}_mlp.2")
        t |= _norm(f"double_blocks.{stream}.q_norm", f"{d}.{stream}_attn.norm.query_norm.scale")
        t |= _norm(f"double_blocks.{stream}.k_norm", f"{d}.{stream}_attn.norm.key_norm.scale")
    s = "single_blocks.{i}"
    t |= _linear("single_blocks.mod", f"{s}.modulation.lin")
    t |= _linear("single_blocks.linear1", f"{s}.linear1", out_order="linear1")
    t |= _linear("single_blocks.linear2", f"{s}.linear2", in_order="linear2")
    t |= _norm("single_blocks.q_norm", f"{s}.norm.query_norm.scale")
    t |= _norm("single_blocks.k_norm", f"{s}.norm.key_norm.scale")
    return t


def _layers_of(path: str, cfg: FluxConfig) -> int | None:
    if path.startswith("double_blocks."):
        return cfg.num_double
    if path.startswith("single_blocks."):
        return cfg.num_single
    return None


def expected_keys(table: dict[str, Source], cfg: FluxConfig) -> set[str]:
    keys = set()
    for path, src in table.items():
        n = _layers_of(path, cfg)
        for k in src.keys:
            keys |= {k.format(i=i) for i in range(n)} if n is not None else {k}
    return keys


def _assemble(reader: SafetensorsReader, src: Source, layer: int | None, np_dtype, cfg: FluxConfig) -> np.ndarray:
    parts = [reader[k.format(i=layer)] for k in src.keys]
    x = parts[0] if len(parts) == 1 else np.concatenate(parts, axis=0)
    if src.swap_halves:
        x = np.concatenate(np.split(x, 2, axis=0)[::-1], axis=0)
    x = to_our_order(x, src, cfg)
    if src.transpose:
        x = x.T
    return np.asarray(x, dtype=np_dtype)


def _np_dtype(dtype) -> Any:
    dtype = jnp.dtype(dtype)
    return ml_dtypes.bfloat16 if dtype == jnp.bfloat16 else dtype




def load_state(
    model: FluxTransformer,
    reader: SafetensorsReader,
    table: dict[str, Source],
    path: str | os.PathLike,
    place: Placer | None = None,
    strip_prefix: str = "",
) -> FluxTransformer:
    """Fill an (abstract or concrete) model's parameters from a checkpoint, leaf by leaf."""
    cfg = model.config
    if strip_prefix:
        reader = _Prefixed(reader, strip_prefix)
    check_keys(path, expected_keys(table, cfg), set(reader.keys()), what="FLUX transformer checkpoint")
    graphdef, state = nnx.split(model)
    flat = nnx.to_flat_state(state)
    place = place or default_placer
    new_leaves = []
    for key_path, var in flat:
        name = ".".join(str(p) for p in key_path)
        if name not in table:
            raise CheckpointError(f"{path}: the conversion table has no entry for model parameter {name!r}")
        src, target = table[name], var.get_value()
        n = _layers_of(name, cfg)
        np_dtype = _np_dtype(target.dtype)
        if n is None:
            arr = _assemble(reader, src, None, np_dtype, cfg)
        else:
            arr = np.empty(target.shape, np_dtype)
            for i in range(n):
                arr[i] = _checked(path, name, i, _assemble(reader, src, i, np_dtype, cfg), target.shape[1:], src)
        check_shape(path, f"{name} (from {', '.join(src.keys)})", arr.shape, target.shape)
        new_leaves.append((key_path, var.replace(place(name, arr))))
        del arr
    return nnx.merge(graphdef, nnx.from_flat_state(new_leaves))


def _checked(path, name, i, arr, want, src):
    if arr.shape != tuple(want):
        keys = ", ".join(k.format(i=i) for k in src.keys)
        raise CheckpointError(f"{path}: {keys} give shape {arr.shape} for {name}[{i}], the model expects {tuple(want)}")
    return arr


class _Prefixed:
    """A reader view with a key prefix removed (e.g. 'model.diffusion_model.' in ComfyUI files)."""

    def __init__(self, reader, prefix):
        self.reader, self.prefix = reader, prefix

    def keys(self):
        return [k[len(self.prefix) :] for k in self.reader.keys() if k.startswith(self.prefix)]

    def __getitem__(self, k):
        return self.reader[self.prefix + k]


# ----------------------------------------------------------------------------- format detection
_BFL_MARKERS = ("double_blocks.0.img_attn.qkv.weight", "img_in.weight")
_DIFFUSERS_MARKERS = ("transformer_blocks.0.attn.to_q.weight", "x_embedder.weight")


def _common_prefix(keys, marker) -> str | None:
    for k in keys:
        if k.endswith(marker):
            return k[: -len(marker)]
    return None


def bfl_config_from_shapes(reader, prefix: str = "") -> FluxConfig:
    """Infer a FluxConfig from a BFL checkpoint's tensor shapes (RoPE axes default to FLUX's)."""
    keys = list(reader.keys())
    shape = lambda k: tuple(reader.shape(prefix + k))
    width, in_ch = shape("img_in.weight")
    head_dim = shape("double_blocks.0.img_attn.norm.query_norm.scale")[0]
    n_double = len({m.group(1) for k in keys if (m := re.match(re.escape(prefix) + r"double_blocks\.(\d+)\.", k))})
    n_single = len({m.group(1) for k in keys if (m := re.match(re.escape(prefix) + r"single_blocks\.(\d+)\.", k))})
    if head_dim != 128:
        raise CheckpointError(
            f"{reader.path}: head_dim {head_dim} differs from FLUX.1's 128, so the RoPE axes cannot be inferred; "
            "pass config=FluxConfig(...) (or a config name) to load_flux_transformer"
        )
    out_ch = shape("final_layer.linear.weight")[0]
    return FluxConfig(
        in_channels=in_ch,
        out_channels=None if out_ch == in_ch else out_ch,
        num_double=n_double,
        num_single=n_single,
        num_heads=width // head_dim,
        head_dim=head_dim,
        context_dim=shape("txt_in.weight")[1],
        pooled_dim=shape("vector_in.in_layer.weight")[1],
        guidance_embeds=(prefix + "guidance_in.in_layer.weight") in set(keys),
        mlp_ratio=shape("double_blocks.0.img_mlp.0.weight")[0] / width,
    )


def load_flux_transformer(
    path: str | os.PathLike,
    dtype: Any = jnp.bfloat16,
    *,
    param_dtype: Any | None = None,
    config: FluxConfig | str | None = None,
    place: Placer | None = None,
    remat: str | None = None,
) -> FluxTransformer:
    """Load a FLUX.1 transformer from a diffusers directory or a BFL single file.

    path: a diffusers `FluxTransformer2DModel` directory (config.json + safetensors, sharded
      index included), a diffusers pipeline directory with a `transformer/` subfolder, or a
      BFL single-file checkpoint (`flux1-dev.safetensors`, also with ComfyUI's
      'model.diffusion_model.' prefix).
    dtype: compute dtype; param_dtype defaults to it.
    config: for BFL files, a FluxConfig or a name ('flux1-dev', 'flux1-fill-dev', ...); by
      default inferred from the tensor shapes.
    place: optional `(param_name, numpy_array) -> jax.Array` that puts each parameter on
      devices (e.g. sharded; see `pico_jax.parallel.param_placer`).

    Returns the NNX module; call it with diffusers' forward arguments (see FluxTransformer).
    """
    path = Path(path)
    if path.is_dir() and (path / "transformer").is_dir() and not (path / "config.json").exists():
        path = path / "transformer"
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or directory")
    reader = SafetensorsReader(path, prefer="diffusion_pytorch_model")
    keys = set(reader.keys())
    prefix = next((p for m in _BFL_MARKERS[:1] if (p := _common_prefix(keys, m)) is not None), None)
    if prefix is not None:
        fmt = "bfl"
        if config is None:
            cfg = bfl_config_from_shapes(reader, prefix)
        else:
            cfg = FluxConfig.named(config) if isinstance(config, str) else config
    elif any(m in keys for m in _DIFFUSERS_MARKERS):
        fmt, prefix = "diffusers", ""
        if config is not None:
            cfg = FluxConfig.named(config) if isinstance(config, str) else config
        else:
            cfg = FluxConfig.from_diffusers(read_config(path))
    else:
        raise CheckpointError(
            f"{path}: not a FLUX transformer checkpoint (found neither BFL keys like {_BFL_MARKERS[0]!r} "
            f"nor diffusers keys like {_DIFFUSERS_MARKERS[0]!r}; first keys: {sorted(keys)[:5]})"
        )
    if remat is not None:
        cfg = cfg.replace(remat=remat)
    model = abstract_model(cfg, dtype=dtype, param_dtype=param_dtype or dtype)
    table = bfl_table(cfg) if fmt == "bfl" else diffusers_table(cfg)
    return load_state(model, reader, table, path, place=place, strip_prefix=prefix)


def export_state(model: FluxTransformer, table: dict[str, Source]) -> dict[str, np.ndarray]:
    """Our parameters → a checkpoint state dict in the table's layout (numpy, torch (out, in)).

    The exact inverse of loading with the same table.
    """
    cfg = model.config
    out: dict[str, np.ndarray] = {}
    base = nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam))  # LoRA factors are exported by pico_jax.model.lora
    for key_path, var in nnx.to_flat_state(nnx.state(model, base)):
        name = ".".join(str(p) for p in key_path)
        src = table[name]
        value = np.asarray(var.get_value())
        n = _layers_of(name, cfg)
        sizes = _split_sizes(src, cfg)
        for i in range(n) if n is not None else [None]:
            x = value[i] if i is not None else value
            if src.transpose:
                x = x.T
            x = to_checkpoint_order(x, src, cfg)
            if src.swap_halves:
                x = np.concatenate(np.split(x, 2, axis=0)[::-1], axis=0)
            parts = np.split(x, np.cumsum(sizes)[:-1], axis=0) if sizes else [x]
            for k, part in zip(src.keys, parts):
                out[k.format(i=i)] = np.ascontiguousarray(part)
    return out


def flux_state_to_diffusers(model: FluxTransformer) -> dict[str, np.ndarray]:
    """A diffusers FluxTransformer2DModel state dict (e.g. to save a checkpoint diffusers loads)."""
    return export_state(model, diffusers_table(model.config))


def flux_state_to_bfl(model: FluxTransformer) -> dict[str, np.ndarray]:
    """A BFL single-file state dict (flux1-dev.safetensors naming)."""
    return export_state(model, bfl_table(model.config))


def _split_sizes(src: Source, cfg: FluxConfig) -> list[int] | None:
    if len(src.keys) == 1:
        return None
    D = cfg.width
    return [D, D, D] if len(src.keys) == 3 else [D, D, D, cfg.mlp_width]
