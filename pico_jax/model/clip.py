"""CLIP text transformer in Flax NNX (FLUX's `text_encoder`, giving the pooled 768-d embedding).

Matches transformers' `CLIPTextModel`: token + learned position embeddings, causal self-attention,
pre-LN layers with the config's MLP activation (quick-GELU for CLIP ViT-L/14), a final layer norm,
and a pooled output taken at the end-of-text token exactly as transformers picks it. Layers are
stacked and run with `jax.lax.scan` (helpers shared with `pico_jax.model.t5`).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from pico_jax.model.flux import Dense, accumulation_dtype
from pico_jax.model.t5 import ParamSource, activation, load_from_checkpoint, scan_layers, stack_layers
from pico_jax.parallel import Placer
from pico_jax.safetensors_io import CheckpointError, SafetensorsReader, read_config

Dtype = Any


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig:
    """CLIP text tower config. Defaults are CLIP ViT-L/14 as shipped in FLUX's `text_encoder`."""

    vocab_size: int = 49408
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    eos_token_id: int = 2

    @classmethod
    def from_hf(cls, d: Mapping[str, Any]) -> CLIPTextConfig:
        """From a transformers `CLIPTextConfig` dict, or a full `CLIPConfig` dict (its `text_config`)."""
        if "text_config" in d and "hidden_size" not in d:
            d = d["text_config"]
        activation(d.get("hidden_act", "quick_gelu"))  # fail early on an activation we cannot compute
        return cls(
            vocab_size=int(d["vocab_size"]),
            hidden_size=int(d["hidden_size"]),
            intermediate_size=int(d["intermediate_size"]),
            num_hidden_layers=int(d["num_hidden_layers"]),
            num_attention_heads=int(d["num_attention_heads"]),
            max_position_embeddings=int(d.get("max_position_embeddings", 77)),
            hidden_act=d.get("hidden_act", "quick_gelu"),
            layer_norm_eps=float(d.get("layer_norm_eps", 1e-5)),
            # transformers' CLIPTextConfig default; FLUX's checkpoint sets 2 explicitly.
            eos_token_id=int(d.get("eos_token_id", 49407)),
        )

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> CLIPTextConfig:
        try:
            return cls.from_hf(read_config(path))
        except (KeyError, ValueError) as e:
            if isinstance(e, CheckpointError):
                raise
            raise CheckpointError(f"{path}: config.json is not a usable CLIP text config ({e!r})") from e


def _layer_norm(dim: int, eps: float, rngs: nnx.Rngs) -> nnx.LayerNorm:
    # fp32 statistics and parameters whatever the compute dtype; exact (two-pass) variance like torch.
    return nnx.LayerNorm(
        dim, epsilon=eps, dtype=jnp.float32, param_dtype=jnp.float32, use_fast_variance=False, rngs=rngs
    )


class CLIPAttention(nnx.Module):
    def __init__(self, cfg: CLIPTextConfig, *, dtype: Dtype, param_dtype: Dtype, rngs: nnx.Rngs):
        d = cfg.hidden_size
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.q = Dense(d, d, **kw)
        self.k = Dense(d, d, **kw)
        self.v = Dense(d, d, **kw)
        self.out = Dense(d, d, **kw)
        self.num_heads = cfg.num_attention_heads
        self.head_dim = d // cfg.num_attention_heads

    def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
        """`mask`: bool, broadcastable to (B, heads, L, L); True = attend."""
        b, n, _ = x.shape
        split = lambda t: t.reshape(b, n, self.num_heads, self.head_dim)
        q, k, v = split(self.q(x)), split(self.k(x)), split(self.v(x))
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) * self.head_dim**-0.5
        scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
        out = jnp.einsum("bhqk,bkhd->bqhd", probs, v, preferred_element_type=accumulation_dtype(v.dtype))
        return self.out(out.astype(v.dtype).reshape(b, n, self.num_heads * self.head_dim))


class CLIPMLP(nnx.Module):
    def __init__(self, cfg: CLIPTextConfig, *, dtype: Dtype, param_dtype: Dtype, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.fc1 = Dense(cfg.hidden_size, cfg.intermediate_size, **kw)
        self.fc2 = Dense(cfg.intermediate_size, cfg.hidden_size, **kw)
        self.act_name = cfg.hidden_act

    def __call__(self, x: jax.Array) -> jax.Array:
        # The activation in fp32, rounded once (as torch computes a bf16 activation).
        return self.fc2(activation(self.act_name)(self.fc1(x).astype(jnp.float32)).astype(x.dtype))


class CLIPBlock(nnx.Module):
    """Pre-LN layer: x + attn(ln1(x)), then x + mlp(ln2(x))."""

    def __init__(self, cfg: CLIPTextConfig, *, dtype: Dtype, param_dtype: Dtype, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.norm1 = _layer_norm(cfg.hidden_size, cfg.layer_norm_eps, rngs)
        self.attn = CLIPAttention(cfg, **kw)
        self.norm2 = _layer_norm(cfg.hidden_size, cfg.layer_norm_eps, rngs)
        self.mlp = CLIPMLP(cfg, **kw)
        self.dtype = dtype

    def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
        x = x + self.attn(self.norm1(x).astype(self.dtype), mask)
        return x + self.mlp(self.norm2(x).astype(self.dtype))


class CLIPTextEncoder(nnx.Module):
    """`(B, L) ids -> (last_hidden_state (B, L, D), pooled (B, D))`, both after the final layer norm."""

    def __init__(
        self, cfg: CLIPTextConfig, *, dtype: Dtype = jnp.float32, param_dtype: Dtype | None = None, rngs: nnx.Rngs
    ):
        param_dtype = dtype if param_dtype is None else param_dtype
        self.config = cfg
        self.dtype = dtype
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.token_embedding = nnx.Embed(cfg.vocab_size, cfg.hidden_size, **kw)
        self.position_embedding = nnx.Embed(cfg.max_position_embeddings, cfg.hidden_size, **kw)
        self.blocks = stack_layers(
            lambda r: CLIPBlock(cfg, dtype=dtype, param_dtype=param_dtype, rngs=r), cfg.num_hidden_layers, rngs
        )
        self.final_norm = _layer_norm(cfg.hidden_size, cfg.layer_norm_eps, rngs)

    def pool_index(self, input_ids: jax.Array) -> jax.Array:
        """Position of the end-of-text token per row, as transformers' CLIPTextModel chooses it."""
        if self.config.eos_token_id == 2:
            # Legacy configs (incl. FLUX's): eos is the highest id in the vocabulary, take argmax of ids.
            return jnp.argmax(input_ids.astype(jnp.int32), axis=-1)
        # Otherwise the first occurrence of eos (padding may also be eos).
        return jnp.argmax((input_ids == self.config.eos_token_id).astype(jnp.int32), axis=-1)

    def __call__(
        self, input_ids: jax.Array, attention_mask: jax.Array | None = None
    ) -> tuple[jax.Array, jax.Array]:
        """`attention_mask` (B, L), nonzero = attend, is combined with the causal mask.

        None = causal only, which is how FluxPipeline calls CLIP.
        """
        n = input_ids.shape[1]
        if n > self.config.max_position_embeddings:
            raise ValueError(
                f"sequence length {n} exceeds max_position_embeddings {self.config.max_position_embeddings}"
            )
        x = self.token_embedding(input_ids) + self.position_embedding(jnp.arange(n))[None]
        x = x.astype(self.dtype)
        mask = jnp.tril(jnp.ones((n, n), bool))[None, None]
        if attention_mask is not None:
            mask = mask & attention_mask.astype(bool)[:, None, None, :]
        x = scan_layers(self.blocks, x, mask)
        x = self.final_norm(x).astype(self.dtype)
        pooled = jnp.take_along_axis(x, self.pool_index(input_ids)[:, None, None], axis=1)[:, 0]
        return x, pooled


def clip_param_plan(cfg: CLIPTextConfig, prefix: str = "") -> dict[tuple[str, ...], ParamSource]:
    """Model parameter path -> transformers `CLIPTextModel` keys (`prefix` is "text_model." in 4.x-era files)."""
    n = range(cfg.num_hidden_layers)
    layer = lambda fmt, **kw: ParamSource(tuple(f"{prefix}encoder.layers.{i}.{fmt}" for i in n), stacked=True, **kw)
    plan = {
        ("token_embedding", "embedding"): ParamSource((f"{prefix}embeddings.token_embedding.weight",)),
        ("position_embedding", "embedding"): ParamSource((f"{prefix}embeddings.position_embedding.weight",)),
        ("final_norm", "scale"): ParamSource((f"{prefix}final_layer_norm.weight",)),
        ("final_norm", "bias"): ParamSource((f"{prefix}final_layer_norm.bias",)),
    }
    for ours, theirs in (("norm1", "layer_norm1"), ("norm2", "layer_norm2")):
        plan[("blocks", ours, "scale")] = layer(f"{theirs}.weight")
        plan[("blocks", ours, "bias")] = layer(f"{theirs}.bias")
    for ours, theirs in (("q", "q_proj"), ("k", "k_proj"), ("v", "v_proj"), ("out", "out_proj")):
        plan[("blocks", "attn", ours, "kernel")] = layer(f"self_attn.{theirs}.weight", transpose=True)
        plan[("blocks", "attn", ours, "bias")] = layer(f"self_attn.{theirs}.bias")
    for name in ("fc1", "fc2"):
        plan[("blocks", "mlp", name, "kernel")] = layer(f"mlp.{name}.weight", transpose=True)
        plan[("blocks", "mlp", name, "bias")] = layer(f"mlp.{name}.bias")
    return plan


def abstract_clip_text_encoder(
    cfg: CLIPTextConfig, *, dtype: Dtype = jnp.float32, param_dtype: Dtype | None = None
) -> CLIPTextEncoder:
    """The model with `jax.ShapeDtypeStruct` parameters: no memory allocated."""
    return nnx.eval_shape(lambda: CLIPTextEncoder(cfg, dtype=dtype, param_dtype=param_dtype, rngs=nnx.Rngs(0)))


def load_clip_text_encoder(
    path: str | os.PathLike,
    *,
    dtype: Dtype = jnp.float32,
    param_dtype: Dtype | None = None,
    place: Placer | None = None,
) -> CLIPTextEncoder:
    """Load a transformers `CLIPTextModel` checkpoint directory (keys with or without the `text_model.` prefix).

    `place`: see `t5.load_from_checkpoint` (e.g. `pico_jax.parallel.param_placer(mesh)` to shard it)."""
    cfg = CLIPTextConfig.from_pretrained(path)
    reader = SafetensorsReader(path)
    # transformers 4.x saved CLIPTextModel under `text_model.`; 5.x saves without it.
    prefix = "text_model." if any(k.startswith("text_model.") for k in reader) else ""

    def ignored(key: str) -> bool:
        # Older files persist the position_ids buffer; a CLIPModel / WithProjection file also holds the
        # vision tower and projections, which the text transformer does not use.
        return key.endswith("embeddings.position_ids") or (bool(prefix) and not key.startswith(prefix))

    return load_from_checkpoint(
        abstract_clip_text_encoder(cfg, dtype=dtype, param_dtype=param_dtype),
        clip_param_plan(cfg, prefix),
        reader,
        ignore=ignored,
        what="CLIP text checkpoint",
        place=place,
    )


__all__: Sequence[str] = (
    "CLIPTextConfig",
    "CLIPTextEncoder",
    "load_clip_text_encoder",
    "abstract_clip_text_encoder",
    "clip_param_plan",
)
