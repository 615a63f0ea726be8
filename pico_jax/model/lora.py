"""LoRA for the FLUX transformer: attach, merge, export to diffusers/PEFT, import from diffusers/PEFT/kohya.

Our `Dense` layers carry optional factors `lora_a` (in, r) and `lora_b` (r, out) as
`nnx.LoRAParam`s and compute y = x·W + b + (x·A)·B·scale, scale = alpha / rank. Layers inside the
scanned stacks (`double_blocks`, `single_blocks`) get factors with the same leading layer axis:
A (L, in, r), B (L, r, out); one scale per stacked layer.

Training only the LoRA factors (the trainer's side)::

    paths = add_lora(model, rank=16)                       # B = 0: the model is unchanged
    graphdef, lora, frozen = nnx.split(model, nnx.LoRAParam, ...)   # LoRAParam FIRST
    def loss_fn(lora, frozen, batch):
        m = nnx.merge(graphdef, lora, frozen)
        ...
    grads = jax.grad(loss_fn)(lora, frozen, batch)        # gradients of the factors only

or, staying with modules, `nnx.grad(loss_fn, argnums=nnx.DiffState(0, nnx.LoRAParam))(model, batch)`
and `nnx.Optimizer(model, tx, wrt=nnx.LoRAParam)`. Note that `nnx.LoRAParam` is a subclass of
`nnx.Param`, so a plain `nnx.Param` filter matches the factors too: put `nnx.LoRAParam` first in
`nnx.split`, or select the frozen base with `nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam))`.
`lora_state(model)` is `nnx.state(model, nnx.LoRAParam)`.

File formats. `save_lora_diffusers` writes what `FluxPipeline.load_lora_weights` and
`FluxTransformer2DModel.load_lora_adapter` read: PEFT keys
`transformer.<diffusers module>.lora_A.weight` (r, in) and `.lora_B.weight` (out, r), with our
scale baked into lora_B and no alpha (diffusers then uses alpha = rank, i.e. scale 1). Our fused
layers map exactly onto diffusers' separate projections: fused qkv → to_q/to_k/to_v (and
add_q_proj/... for the text stream) with the same A and B split by output rows; single-block
linear1 → to_q/to_k/to_v/proj_mlp; final_mod → norm_out.linear with B's output halves swapped
(diffusers stores (scale, shift), we (shift, scale)).

`load_lora` reads diffusers/PEFT files (with or without the `transformer.` prefix, alpha from
`<module>.alpha` tensors or from diffusers' `lora_adapter_metadata` LoraConfig, rsLoRA included)
and kohya/sd-scripts files (`lora_unet_<BFL module>.lora_down/lora_up/alpha`, also
`lora_transformer_<diffusers module>`). Separate q/k/v adapters with different A matrices fuse
exactly: A = [A_q | A_k | A_v] (in, r_q + r_k + r_v), B block-diagonal; adapters that share one A
(like our own exports) fuse back to rank r.
"""

from __future__ import annotations

import functools
import json
import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx

from pico_jax.model.flux import Dense, FluxConfig, reorder_fused_axis
from pico_jax.parallel import Placer, default_placer
from pico_jax.safetensors_io import CheckpointError, SafetensorsReader, save_safetensors_atomic

# Attention and MLP projections of every block (both streams of the double blocks; the fused
# qkv+mlp input and the attention+mlp output of the single blocks). Patterns are `re.search`ed
# against the dotted Dense path, e.g. 'double_blocks.img.qkv'.
DEFAULT_TARGETS: tuple[str, ...] = (
    r"^double_blocks\.(img|txt)\.(qkv|proj|mlp_in|mlp_out)$",
    r"^single_blocks\.(linear1|linear2)$",
)
# Every Dense: the above plus modulation, embedders (img_in, txt_in, time/vector/guidance) and
# the final layer.
ALL_TARGETS: tuple[str, ...] = (r".*",)
PRESETS: dict[str, tuple[str, ...]] = {"default": DEFAULT_TARGETS, "all": ALL_TARGETS}


# ----------------------------------------------------------------------------------- discovery
def dense_layers(model: nnx.Module) -> dict[str, Dense]:
    """Every `Dense` of the model by dotted path ('double_blocks.img.qkv', 'img_in', ...)."""
    out = {}
    for path, node in nnx.iter_graph(model):
        if isinstance(node, Dense):
            out[".".join(str(p) for p in path)] = node
    return dict(sorted(out.items()))


def lora_paths(model: nnx.Module) -> list[str]:
    """Paths of the Dense layers that currently carry LoRA factors."""
    return [p for p, d in dense_layers(model).items() if d.lora_a is not None]


def _resolve_targets(targets: str | Sequence[str]) -> tuple[str, ...]:
    if isinstance(targets, str):
        targets = [targets]
    out: list[str] = []
    for t in targets:
        out.extend(PRESETS.get(t, (t,)))
    return tuple(out)


def _value(var) -> Any:
    return var.get_value() if hasattr(var, "get_value") else var[...]


# ------------------------------------------------------------------------------------ add/merge
def add_lora(
    model: nnx.Module,
    rank: int,
    alpha: float | None = None,
    targets: str | Sequence[str] = DEFAULT_TARGETS,
    rngs: nnx.Rngs | int | None = None,
    *,
    dtype: Any | None = None,
    place: Placer | None = None,
) -> list[str]:
    """Attach fresh LoRA factors to every Dense whose dotted path matches a target pattern.

    rank: r. alpha: scale = alpha / rank (alpha defaults to rank, scale 1).
    targets: regexes `re.search`ed against Dense paths, or preset names 'default'
      (DEFAULT_TARGETS: attention + MLP projections of all blocks) and 'all' (every Dense,
      including modulation, embedders and the final layer).
    rngs: nnx.Rngs or an int seed (default 0). A is PEFT's default init, kaiming-uniform
      U(-1/sqrt(in), 1/sqrt(in)); B is zero, so the model's output does not change.
    dtype: the factors' dtype; default the layer's parameter (kernel) dtype. E.g. fp32 LoRA on
      a bf16 base (the forward casts everything to the layer's compute dtype).
    place: optional `(name, numpy array) -> jax.Array` for the factors (name is
      '<path>.lora_a' / '<path>.lora_b'), e.g. `pico_jax.parallel.param_placer(mesh)`.

    Existing factors on a matched layer are replaced. Works on concrete and abstract
    (`nnx.eval_shape`) models; on abstract ones the factors are ShapeDtypeStructs.
    Returns the adapted paths; raises ValueError listing the available paths if none matches.
    """
    if rank < 1:
        raise ValueError(f"LoRA rank must be >= 1, got {rank}")
    patterns = _resolve_targets(targets)
    try:
        compiled = [re.compile(p) for p in patterns]
    except re.error as e:
        raise ValueError(f"invalid LoRA target pattern: {e}") from e
    layers = dense_layers(model)
    chosen = [p for p in layers if any(c.search(p) for c in compiled)]
    if not chosen:
        raise ValueError(f"LoRA targets {list(patterns)} match no Dense layer; the layers are: {list(layers)}")
    if rngs is None:
        rngs = nnx.Rngs(0)
    elif not isinstance(rngs, nnx.Rngs):
        rngs = nnx.Rngs(rngs)
    scale = float(alpha if alpha is not None else rank) / rank
    for path in chosen:
        dense = layers[path]
        kernel = _value(dense.kernel)
        fdtype = jnp.dtype(dtype if dtype is not None else kernel.dtype)
        *lead, din, dout = kernel.shape
        a_shape, b_shape = (*lead, din, rank), (*lead, rank, dout)
        if isinstance(kernel, jax.ShapeDtypeStruct):
            a = jax.ShapeDtypeStruct(a_shape, fdtype)
            b = jax.ShapeDtypeStruct(b_shape, fdtype)
        else:
            # Drawn on the host from a seed taken from rngs: no per-shape XLA compilation.
            gen = np.random.default_rng(np.asarray(jax.random.key_data(rngs.params())).ravel().tolist())
            bound = 1.0 / math.sqrt(din)
            a = gen.uniform(-bound, bound, a_shape).astype(_np_dtype(fdtype))
            b = np.zeros(b_shape, _np_dtype(fdtype))
            a, b = _place(place, f"{path}.lora_a", a), _place(place, f"{path}.lora_b", b)
        _set_factors(dense, a, b, scale)
    return chosen


def _place(place: Placer | None, name: str, x: np.ndarray) -> jax.Array:
    return (place or default_placer)(name, x)


def _set_factors(dense: Dense, a, b, scale: float) -> None:
    dense.lora_a = nnx.data(nnx.LoRAParam(a))
    dense.lora_b = nnx.data(nnx.LoRAParam(b))
    dense.lora_scale = float(scale)


def remove_lora(model: nnx.Module) -> list[str]:
    """Drop all LoRA factors without merging them. Returns the paths that had them."""
    paths = lora_paths(model)
    layers = dense_layers(model)
    for p in paths:
        _clear(layers[p])
    return paths


def _clear(dense: Dense) -> None:
    # Back to static None, as after construction, so the graphdef equals a LoRA-free model's
    # (a merged model reuses compilations of the base model).
    dense.lora_a = nnx.static(None)
    dense.lora_b = nnx.static(None)
    dense.lora_scale = 1.0


def _merge_fn(k, a, b, scale):
    d = jnp.einsum("...ir,...ro->...io", a.astype(jnp.float32), b.astype(jnp.float32)) * scale
    return (k.astype(jnp.float32) + d).astype(k.dtype)


@functools.lru_cache(maxsize=None)
def _jitted_merge(sharding):
    return jax.jit(_merge_fn, out_shardings=sharding)


def _merge_kernel(kernel: jax.Array, a, b, scale: float) -> jax.Array:
    """kernel + A·B·scale, computed in fp32, in the kernel's dtype and sharding."""
    sharding = kernel.sharding if getattr(kernel, "committed", False) else None  # keep placement as is
    return _jitted_merge(sharding)(kernel, a, b, jnp.float32(scale))


def merge_lora(model: nnx.Module) -> nnx.Module:
    """Fold B·A·scale into the kernels (in fp32, stored in the kernel dtype) and remove the
    factors, for inference at base speed. Mutates and returns the model."""
    for dense in dense_layers(model).values():
        if dense.lora_a is None:
            continue
        dense.kernel.set_value(
            _merge_kernel(_value(dense.kernel), _value(dense.lora_a), _value(dense.lora_b), dense.lora_scale)
        )
        _clear(dense)
    return model


def lora_state(model: nnx.Module) -> nnx.State:
    """Just the LoRA factors: `nnx.state(model, nnx.LoRAParam)` (see the module doc for training)."""
    return nnx.state(model, nnx.LoRAParam)


# ------------------------------------------------------------------------------- name mapping
@dataclass(frozen=True)
class _Target:
    """Where a checkpoint LoRA module lands in our model."""

    path: str  # our Dense path
    layer: int | None  # index on the stacked layer axis
    part: int  # which output slice of a fused layer
    nparts: int  # how many projections this naming splits the layer into
    swap: bool  # B's output halves are swapped relative to ours (diffusers' norm_out)


def _part_sizes(n_keys: int, dout: int, cfg: FluxConfig) -> list[int]:
    if n_keys == 1:
        return [dout]
    if n_keys == 3:
        return [dout // 3] * 3
    if n_keys == 4:
        D = cfg.width
        return [D, D, D, dout - 3 * D]
    raise ValueError(f"no split for a layer fused from {n_keys} projections")


def _module_table(model, layers: dict[str, Dense], table: dict) -> dict[str, tuple[list[str], Any]]:
    """Our Dense path → (module names per layer/part, the kernel's convert.Source) from a convert.py table."""
    out = {}
    for path, dense in layers.items():
        src = table.get(f"{path}.kernel")
        if src is None:
            continue
        templates = [k[: -len(".weight")] for k in src.keys]
        out[path] = (templates, src)
    return out



def _layer_range(dense: Dense):
    k = _value(dense.kernel)
    return range(k.shape[0]) if k.ndim == 3 else [None]


def _name_map(model) -> dict[str, _Target]:
    """Every LoRA module name a FLUX LoRA file may use → its place in our model."""
    from pico_jax.convert import bfl_table, diffusers_table

    cfg = model.config
    layers = dense_layers(model)
    names: dict[str, _Target] = {}
    for table, naming in ((diffusers_table(cfg), "diffusers"), (bfl_table(cfg), "bfl")):
        for path, (templates, src) in _module_table(model, layers, table).items():
            swap = src.swap_halves
            for i in _layer_range(layers[path]):
                for j, t in enumerate(templates):
                    name = t.format(i=i) if i is not None else t
                    target = _Target(path, i, j, len(templates), swap)
                    if naming == "diffusers":
                        names[name] = target
                        names["lora_transformer_" + name.replace(".", "_")] = target  # ai-toolkit / kohya
                    else:
                        names["lora_unet_" + name.replace(".", "_")] = target  # kohya sd-scripts (BFL names)
    return names


# ------------------------------------------------------------------------------------------ export
def _np_dtype(dtype) -> Any:
    dtype = jnp.dtype(dtype)
    return ml_dtypes.bfloat16 if dtype == jnp.bfloat16 else np.dtype(dtype)


def lora_state_dict_diffusers(
    model: nnx.Module, dtype: Any | None = None, prefix: str = "transformer.", prune_zero_rank: bool = True
) -> dict[str, np.ndarray]:
    """Our LoRA factors as a diffusers/PEFT state dict (see `save_lora_diffusers`)."""
    from pico_jax.convert import diffusers_table

    cfg = model.config
    layers = dense_layers(model)
    modules = _module_table(model, layers, diffusers_table(cfg))
    out: dict[str, np.ndarray] = {}
    for path, dense in layers.items():
        if dense.lora_a is None:
            continue
        if path not in modules:
            raise ValueError(f"LoRA on {path!r} has no diffusers equivalent")
        templates, src = modules[path]
        a_all = np.asarray(_value(dense.lora_a), np.float32)
        b_all = np.asarray(_value(dense.lora_b), np.float32) * np.float32(dense.lora_scale)
        stacked = a_all.ndim == 3
        if not stacked:
            a_all, b_all = a_all[None], b_all[None]
        L, R, dout = b_all.shape
        # B in torch layout (L, out, R), diffusers' output order, split into the projections.
        bt = reorder_fused_axis(np.swapaxes(b_all, 1, 2), cfg, src.out_order, 1, inverse=True)
        a_all = reorder_fused_axis(a_all, cfg, src.in_order, 1, inverse=True)
        if src.swap_halves:
            bt = np.concatenate(np.split(bt, 2, axis=1)[::-1], axis=1)
        sizes = _part_sizes(len(templates), dout, cfg)
        parts = np.split(bt, np.cumsum(sizes)[:-1], axis=1)
        out_dtype = _np_dtype(dtype if dtype is not None else _value(dense.lora_a).dtype)
        nonzero = [bool(np.any(bp)) for bp in parts]
        for template, bp, nz in zip(templates, parts, nonzero):
            keep = np.arange(R)
            if prune_zero_rank and not nz and any(nonzero):
                continue  # a projection an imported partial LoRA did not adapt
            if prune_zero_rank:
                # Rank components unused by this projection in every layer (the off-diagonal
                # blocks of an imported block-diagonal fusion) contribute nothing: drop them.
                used = np.flatnonzero(np.any(bp != 0, axis=(0, 1)))
                if 0 < used.size < R:
                    keep = used
            for i in range(L):
                name = prefix + (template.format(i=i) if stacked else template)
                out[f"{name}.lora_A.weight"] = np.ascontiguousarray(a_all[i][:, keep].T).astype(out_dtype)
                out[f"{name}.lora_B.weight"] = np.ascontiguousarray(bp[i][:, keep]).astype(out_dtype)
    if not out:
        raise ValueError("the model has no LoRA factors to export (call add_lora or load_lora first)")
    return out


def save_lora_diffusers(
    model: nnx.Module,
    path: str | os.PathLike,
    metadata: dict[str, Any] | None = None,
    *,
    dtype: Any | None = None,
    prune_zero_rank: bool = True,
) -> Path:
    """Write the model's LoRA as a diffusers FLUX LoRA safetensors file (atomically).

    Keys: `transformer.<diffusers module>.lora_A.weight` (r, in) and `.lora_B.weight` (out, r),
    e.g. `transformer.transformer_blocks.0.attn.to_q.lora_A.weight`. Our scale (alpha / rank) is
    baked into lora_B and no alpha is written, so diffusers' default (alpha = rank) reproduces
    the model: `pipe.load_lora_weights(path)` or `transformer.load_lora_adapter(path,
    prefix="transformer")`. Fused layers are split as described in the module doc.

    path: a file, or a directory (then `pytorch_lora_weights.safetensors` inside it, the name
      diffusers looks for). metadata: extra safetensors header entries (values are stored as
      strings; non-strings as JSON). dtype: tensor dtype in the file (default: the factors').
    prune_zero_rank: drop rank components whose B columns for a projection are exactly zero in
      every layer, and projections of a fused layer whose B is exactly zero while another
      projection's is not (keeps imported block-diagonal / partial LoRAs at their original
      ranks and modules; exact either way). A fresh all-zero LoRA is exported in full.
    Returns the file written.
    """
    path = Path(path)
    if path.is_dir() or path.suffix != ".safetensors":
        path = path / "pytorch_lora_weights.safetensors"
    tensors = lora_state_dict_diffusers(model, dtype=dtype, prune_zero_rank=prune_zero_rank)
    header = {"format": "pt"}
    for k, v in (metadata or {}).items():
        header[str(k)] = v if isinstance(v, str) else json.dumps(v)
    save_safetensors_atomic(tensors, path, metadata=header)
    return path


# ------------------------------------------------------------------------------------------ import
_SUFFIXES = {
    ".lora_A.weight": "A",
    ".lora_B.weight": "B",
    ".lora_down.weight": "A",
    ".lora_up.weight": "B",
    ".alpha": "alpha",
}
_STRIP_PREFIXES = ("transformer.", "base_model.model.", "diffusion_model.", "model.diffusion_model.")


def _split_key(key: str) -> tuple[str, str] | None:
    for suffix, kind in _SUFFIXES.items():
        if key.endswith(suffix):
            module = key[: -len(suffix)]
            for p in _STRIP_PREFIXES:
                if module.startswith(p):
                    module = module[len(p) :]
                    break
            return module, kind
    return None


def _peft_config(metadata: dict[str, str]) -> dict | None:
    raw = metadata.get("lora_adapter_metadata")
    if not raw:
        return None
    try:
        cfg = json.loads(raw)
    except json.JSONDecodeError:
        return None
    if any(k.startswith("transformer.") for k in cfg):
        cfg = {k[len("transformer.") :]: v for k, v in cfg.items() if k.startswith("transformer.")}
    return cfg or None


def _pattern_value(patterns: dict, name: str, default):
    """PEFT's rank/alpha_pattern lookup (peft.utils.other.get_pattern_key)."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def load_lora(
    model: nnx.Module,
    path: str | os.PathLike,
    *,
    weight: float = 1.0,
    merge: bool = False,
    dtype: Any | None = None,
    ignore: str | Sequence[str] = (),
    place: Placer | None = None,
) -> list[str]:
    """Read a FLUX LoRA safetensors file into the model; returns the adapted Dense paths.

    Formats: diffusers/PEFT (`[transformer.]<diffusers module>.lora_A/lora_B.weight`, alpha from
    `<module>.alpha` tensors or the `lora_adapter_metadata` LoraConfig header, rsLoRA included;
    alpha = rank when neither is present), and kohya (`lora_unet_<BFL module>` or
    `lora_transformer_<diffusers module>` with `.lora_down/.lora_up.weight` and `.alpha`).
    Separate to_q/to_k/to_v (/proj_mlp) adapters fuse exactly into our fused layer: the same A →
    rank r; different A → A = [A_q|A_k|A_v], B block-diagonal (rank r_q + r_k + r_v).
    Projections or layers of a stack that the file does not cover get zero factors.

    weight: multiplies every adapter's scale (LoRA strength).
    merge: fold the LoRA into the base kernels (in fp32, stored in the kernel dtype) instead of
      attaching factors; existing factors are then left untouched.
    dtype: factor dtype when attaching (default: the kernel's parameter dtype).
    ignore: regexes (`re.search` on the raw key) of keys to skip, e.g. r"^text_encoder" or
      r"^lora_te" for files that also adapt the text encoders.
    place: optional `(name, numpy array) -> jax.Array` for the new factors.

    Factors already on a layer the file covers are replaced (unless merge). Keys that map to no
    layer of this model, malformed modules and shape mismatches raise CheckpointError naming
    the keys.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or directory")
    reader = SafetensorsReader(path, prefer="pytorch_lora_weights")
    ignore_res = [re.compile(p) for p in ([ignore] if isinstance(ignore, str) else ignore)]
    names = _name_map(model)
    layers = dense_layers(model)

    # 1. Group the file's keys by LoRA module.
    modules: dict[str, dict[str, str]] = {}
    unknown: list[str] = []
    for key in reader.keys():
        if any(r.search(key) for r in ignore_res):
            continue
        split = _split_key(key)
        if split is None or split[0] not in names:
            unknown.append(key)
            continue
        module, kind = split
        if kind in modules.setdefault(module, {}):
            raise CheckpointError(
                f"{path}: LoRA module {module!r} appears twice (keys {modules[module][kind]!r}, {key!r})"
            )
        modules[module][kind] = key
    if unknown:
        unknown.sort()
        raise CheckpointError(
            f"{path}: {len(unknown)} key(s) are not LoRA factors of a layer of this FLUX model "
            f"(num_double={model.config.num_double}, num_single={model.config.num_single}): "
            f"{unknown[:20]}{' ...' if len(unknown) > 20 else ''}. "
            "Pass ignore=[regex, ...] to skip keys meant for other models (e.g. text encoders)."
        )
    if not modules:
        raise CheckpointError(f"{path}: no LoRA tensors found")
    incomplete = sorted(m for m, k in modules.items() if "A" not in k or "B" not in k)
    if incomplete:
        raise CheckpointError(f"{path}: LoRA modules without both down/A and up/B factors: {incomplete[:20]}")

    # 2. Per module: factors in our (in, r) / (r, out) orientation and its scale.
    peft_cfg = _peft_config(reader.metadata())
    # our Dense path → {(layer, projection): (A (in, r), B (r, out), scale, keys, n projections)}
    grouped: dict[str, dict[tuple[int | None, int], tuple]] = {}
    for module, kinds in sorted(modules.items()):
        target = names[module]
        a = np.asarray(reader[kinds["A"]], np.float32)  # (r, in)
        b = np.asarray(reader[kinds["B"]], np.float32)  # (out, r)
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
            raise CheckpointError(
                f"{path}: {kinds['A']!r} {a.shape} and {kinds['B']!r} {b.shape} "
                "are not LoRA factors (r, in) and (out, r)"
            )
        r = a.shape[0]
        rslora = False
        if "alpha" in kinds:
            alpha = float(np.asarray(reader[kinds["alpha"]], np.float32).reshape(-1)[0])
        elif peft_cfg is not None:
            alpha = float(_pattern_value(peft_cfg.get("alpha_pattern"), module, peft_cfg.get("lora_alpha", r)))
            rslora = bool(peft_cfg.get("use_rslora", False))
        else:
            alpha = float(r)
        scale = weight * alpha / (math.sqrt(r) if rslora else r)
        if target.swap and b.shape[0] % 2 == 0:  # (an odd size fails the shape check below)
            b = np.concatenate(np.split(b, 2, axis=0)[::-1], axis=0)
        grouped.setdefault(target.path, {})[(target.layer, target.part)] = (a.T, b.T, scale, kinds, target.nparts)

    # 3. Fuse per Dense and attach or merge.
    from pico_jax.convert import diffusers_table

    cfg = model.config
    orders = diffusers_table(cfg)
    plan = []
    for dpath, entries in sorted(grouped.items()):
        dense = layers[dpath]
        kernel = _value(dense.kernel)
        stacked = kernel.ndim == 3
        din, dout = kernel.shape[-2:]
        namings = {nparts for (_, _, _, _, nparts) in entries.values()}
        if len(namings) > 1:
            keys = sorted(e[3]["A"] for e in entries.values())
            raise CheckpointError(
                f"{path}: {dpath} is adapted both as one fused layer and as separate projections: {keys[:8]}"
            )
        nparts = namings.pop()
        sizes = _part_sizes(nparts, dout, cfg)
        offsets = np.concatenate([[0], np.cumsum(sizes)])
        for (i, j), (a, b, s, kinds, _) in entries.items():
            if a.shape[0] != din or b.shape[1] != sizes[j]:
                where = f"{dpath}[{i}]" if i is not None else dpath
                raise CheckpointError(
                    f"{path}: {kinds['A']!r} / {kinds['B']!r} give a LoRA of shape (in={a.shape[0]}, out={b.shape[1]}) "
                    f"for {where} (projection {j} of {nparts}); the model expects (in={din}, out={sizes[j]})"
                )
        layer_ids = list(range(kernel.shape[0])) if stacked else [None]
        scales = {e[2] for e in entries.values()}
        common = scales.pop() if len(scales) == 1 else 1.0
        common = common if common != 0 else 1.0  # (weight=0) keep B / common finite
        # Shared A: within every layer all parts use the identical A (our own exports).
        by_layer: dict[Any, list] = {}
        for (i, j), e in entries.items():
            by_layer.setdefault(i, []).append((j, e))
        shared = all(
            all(e[0].shape == es[0][1][0].shape and np.array_equal(e[0], es[0][1][0]) for _, e in es)
            for es in by_layer.values()
        )
        if shared:
            R = max(e[0].shape[1] for e in entries.values())
            col = {j: 0 for j in range(nparts)}
        else:
            rp = {j: max((e[0].shape[1] for (_, j2), e in entries.items() if j2 == j), default=0) for j in range(nparts)}
            col, acc = {}, 0
            for j in range(nparts):
                col[j], acc = acc, acc + rp[j]
            R = acc
        A = np.zeros((len(layer_ids), din, R), np.float32)
        B = np.zeros((len(layer_ids), R, dout), np.float32)
        for (i, j), (a, b, s, _, _) in entries.items():
            li = 0 if i is None else i
            r = a.shape[1]
            A[li, :, col[j] : col[j] + r] = a
            B[li, col[j] : col[j] + r, offsets[j] : offsets[j + 1]] = b * (s / common)
        src = orders.get(f"{dpath}.kernel")  # into our head-grouped layout (qkv, linear1, linear2)
        if src is not None:
            A = reorder_fused_axis(A, cfg, src.in_order, 1)
            B = reorder_fused_axis(B, cfg, src.out_order, 2)
        if not stacked:
            A, B = A[0], B[0]
        plan.append((dpath, dense, A, B, common))

    # 4. Only now, with the whole file validated, change the model.
    for dpath, dense, A, B, common in plan:
        kernel = _value(dense.kernel)
        if merge:
            dense.kernel.set_value(_merge_kernel(kernel, jnp.asarray(A), jnp.asarray(B), common))
        else:
            fdtype = _np_dtype(dtype if dtype is not None else kernel.dtype)
            _set_factors(
                dense,
                _place(place, f"{dpath}.lora_a", A.astype(fdtype)),
                _place(place, f"{dpath}.lora_b", B.astype(fdtype)),
                common,
            )
    return [p[0] for p in plan]

