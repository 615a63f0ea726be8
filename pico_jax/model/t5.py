"""T5 v1.1 encoder in Flax NNX (FLUX's `text_encoder_2`, giving the 4096-d token embeddings).

Matches transformers' `T5EncoderModel` for gated-activation (v1.1) configs:
  * T5 RMS layer norm: no mean subtraction, no bias, computed in fp32;
  * attention without 1/sqrt(d) scaling, with a bidirectional bucketed relative position bias
    that the first layer owns and every layer reuses;
  * gated feed-forward `wo(act(wi_0 x) * wi_1 x)`, no biases anywhere.

The layers are one stacked module (a leading layer axis on every parameter) run with
`jax.lax.scan`, so the 24-layer XXL traces and compiles one layer's worth of program.

This file also holds the few helpers the CLIP text encoder shares (stacked layers, scanning,
activations, loading a HF checkpoint into an abstract model).
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pico_jax.model.flux import Dense, accumulation_dtype, scan_blocks
from pico_jax.parallel import Placer, default_placer, split_by_batch
from pico_jax.safetensors_io import CheckpointError, SafetensorsReader, check_keys, check_shape, read_config

Dtype = Any
M = TypeVar("M", bound=nnx.Module)

# ----------------------------------------------------------------------------------------------
# Shared helpers (also used by pico_jax.model.clip)
# ----------------------------------------------------------------------------------------------

_ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    # transformers' gelu_new / gelu_pytorch_tanh / gelu_fast are all the tanh approximation.
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_fast": lambda x: jax.nn.gelu(x, approximate=True),
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
}


def activation(name: str) -> Callable[[jax.Array], jax.Array]:
    """The activation function transformers' `ACT2FN[name]` computes."""
    try:
        return _ACTIVATIONS[name]
    except KeyError:
        raise ValueError(f"unsupported activation {name!r}; known: {sorted(_ACTIVATIONS)}") from None


def stack_layers(make: Callable[[nnx.Rngs], M], num_layers: int, rngs: nnx.Rngs) -> M:
    """`num_layers` independent copies of a layer as one module whose parameters have a leading layer axis."""

    @nnx.split_rngs(splits=num_layers)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def _make(r: nnx.Rngs) -> M:
        return make(r)

    return _make(rngs)


def scan_layers(stack: nnx.Module, x: jax.Array, *args: Any) -> jax.Array:
    """Run `x = layer(x, *args)` for each layer of a stacked module with `jax.lax.scan`.

    FLUX's `scan_blocks` does the scanning, so the text encoders get its CPU handling of bf16 stacks
    too: without it XLA:CPU converted every whole weight stack to fp32 on each call (`take_layer`
    says why). The program holds a single layer body whatever the depth.
    """
    x = split_by_batch(x)  # the embedding table's width split must not become the activations'
    out, _ = scan_blocks(lambda layer, h, _: (layer(h, *args), None), x, stack, None, remat="none")
    return out


@dataclasses.dataclass(frozen=True)
class ParamSource:
    """Where one model parameter comes from in a HF checkpoint.

    `keys` has one entry for an ordinary parameter and one per layer for a stacked one
    (stacked along a new leading axis). `transpose` turns torch's (out, in) Linear weight
    into the (in, out) kernel of a `Dense` / `nnx.Linear`.
    """

    keys: tuple[str, ...]
    stacked: bool = False
    transpose: bool = False


def param_count(model: nnx.Module) -> int:
    """Number of parameter scalars (works on abstract models from `nnx.eval_shape`)."""
    return sum(int(np.prod(v.shape)) for _, v in nnx.to_flat_state(nnx.state(model, nnx.Param)))


def load_from_checkpoint(
    abstract: M,
    plan: Mapping[tuple[str, ...], ParamSource],
    reader: SafetensorsReader,
    *,
    ignore: Callable[[str], bool] = lambda k: False,
    aliases: Mapping[str, str] | None = None,
    what: str = "checkpoint",
    place: Placer | None = None,
) -> M:
    """Fill an abstract model (from `nnx.eval_shape`) with tensors from a checkpoint, one tensor at a time.

    Every key the plan names must be in the checkpoint and every checkpoint key must be used,
    except those `ignore` accepts. `aliases` maps a plan key to another name to read when the
    plan key is absent (e.g. a tied embedding saved under its second name). All shapes are checked
    before any tensor data is read, so a mismatched checkpoint fails fast. `place(dotted_name,
    array)` puts each parameter on devices (default: the default device);
    `pico_jax.parallel.param_placer(mesh)` shards it by the mesh rules as it is read.
    """
    place = place or default_placer
    aliases = dict(aliases or {})
    graphdef, state = nnx.split(abstract)
    flat = nnx.to_flat_state(state)
    model_paths = {tuple(str(p) for p in path) for path, _ in flat}
    if model_paths != set(plan):  # a bug in the plan, not in the checkpoint
        raise AssertionError(
            f"parameter plan does not cover the model: missing {sorted(model_paths - set(plan))}, "
            f"extra {sorted(set(plan) - model_paths)}"
        )

    found = set(reader)

    def resolve(key: str) -> str:
        if key not in found and aliases.get(key) in found:
            return aliases[key]
        return key

    expected = {resolve(k) for src in plan.values() for k in src.keys}
    check_keys(reader.path, expected, {k for k in found if k in expected or not ignore(k)}, what)

    for path, var in flat:
        src = plan[tuple(str(p) for p in path)]
        want = tuple(var.shape[1:] if src.stacked else var.shape)
        want_ckpt = want[::-1] if src.transpose else want
        for k in src.keys:
            check_shape(reader.path, resolve(k), reader.shape(resolve(k)), want_ckpt)

    for path, var in flat:
        src = plan[tuple(str(p) for p in path)]
        # Built in numpy in the target dtype, then handed to jax: at most one stacked parameter is
        # held twice (numpy + device), never the whole model.
        out = np.empty(var.shape, dtype=var.dtype)
        for i, k in enumerate(src.keys):
            t = reader[resolve(k)]
            t = t.T if src.transpose else t
            if src.stacked:
                out[i] = t
            else:
                out[...] = t
            del t
        var.set_value(place(".".join(str(p) for p in path), out))
        del out
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


# ----------------------------------------------------------------------------------------------
# T5
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class T5Config:
    """The encoder half of a T5 v1.1 config. Defaults are T5 v1.1 XXL (FLUX's text_encoder_2)."""

    vocab_size: int = 32128
    d_model: int = 4096
    d_kv: int = 64
    d_ff: int = 10240
    num_layers: int = 24
    num_heads: int = 64
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    layer_norm_epsilon: float = 1e-6
    dense_act_fn: str = "gelu_new"

    @classmethod
    def from_hf(cls, d: Mapping[str, Any]) -> T5Config:
        """From a transformers `T5Config` dict (`config.json`), deriving the activation as transformers does."""
        # transformers ignores a stored dense_act_fn and re-derives it from feed_forward_proj.
        ffp = d.get("feed_forward_proj", "relu")
        parts = ffp.split("-")
        if parts[0] != "gated":
            raise ValueError(
                f"feed_forward_proj={ffp!r}: only gated (T5 v1.1 style, e.g. 'gated-gelu') encoders are supported"
            )
        act = "gelu_new" if ffp == "gated-gelu" else parts[-1]
        activation(act)  # fail early on an activation we cannot compute
        return cls(
            vocab_size=int(d["vocab_size"]),
            d_model=int(d["d_model"]),
            d_kv=int(d["d_kv"]),
            d_ff=int(d["d_ff"]),
            num_layers=int(d["num_layers"]),
            num_heads=int(d["num_heads"]),
            relative_attention_num_buckets=int(d.get("relative_attention_num_buckets", 32)),
            relative_attention_max_distance=int(d.get("relative_attention_max_distance", 128)),
            layer_norm_epsilon=float(d.get("layer_norm_epsilon", 1e-6)),
            dense_act_fn=act,
        )

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> T5Config:
        try:
            return cls.from_hf(read_config(path))
        except (KeyError, ValueError) as e:
            if isinstance(e, CheckpointError):
                raise
            raise CheckpointError(f"{path}: config.json is not a usable T5 encoder config ({e!r})") from e


def relative_position_buckets(
    query_length: int, key_length: int, num_buckets: int, max_distance: int
) -> np.ndarray:
    """Bidirectional T5 relative-position bucket ids, (query_length, key_length) int32.

    Computed in numpy at trace time (shapes are static) with the same float32 arithmetic as
    transformers' `T5Attention._relative_position_bucket`, so bucket boundaries agree exactly.
    """
    ctx = np.arange(query_length, dtype=np.int64)[:, None]
    mem = np.arange(key_length, dtype=np.int64)[None, :]
    rel = mem - ctx
    half = num_buckets // 2
    buckets = (rel > 0).astype(np.int64) * half
    rel = np.abs(rel)
    max_exact = half // 2
    is_small = rel < max_exact
    with np.errstate(divide="ignore"):
        # torch: log(float32 rel / max_exact) / python_float * int, all in float32, then truncation.
        large = np.log(rel.astype(np.float32) / np.float32(max_exact))
        large = large / np.float32(math.log(max_distance / max_exact)) * np.float32(half - max_exact)
        large = max_exact + np.where(is_small, 0, large).astype(np.int64)
    large = np.minimum(large, half - 1)
    return (buckets + np.where(is_small, rel, large)).astype(np.int32)


class T5LayerNorm(nnx.Module):
    """RMS norm without mean subtraction or bias; statistics and scaling in fp32."""

    def __init__(self, dim: int, eps: float, *, dtype: Dtype):
        self.weight = nnx.Param(jnp.ones((dim,), jnp.float32))
        self.eps = eps
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x.astype(jnp.float32)
        x = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + self.eps)
        return (self.weight[...].astype(jnp.float32) * x).astype(self.dtype)


def _linear(din: int, dout: int, *, dtype: Dtype, param_dtype: Dtype, rngs: nnx.Rngs, bias: bool = False) -> Dense:
    # FLUX's Dense, not nnx.Linear: in bf16 on CPU its product accumulates in fp32, the form XLA:CPU
    # runs natively; nnx.Linear's bf16-output product is rewritten to fp32 with the weights
    # converted on every call (benchmarks/RESULTS.md, seventeenth session: 0.53x transformers).
    return Dense(din, dout, dtype=dtype, param_dtype=param_dtype, rngs=rngs, bias=bias)


class T5Attention(nnx.Module):
    def __init__(self, cfg: T5Config, *, dtype: Dtype, param_dtype: Dtype, rngs: nnx.Rngs):
        inner = cfg.num_heads * cfg.d_kv
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.q = _linear(cfg.d_model, inner, **kw)
        self.k = _linear(cfg.d_model, inner, **kw)
        self.v = _linear(cfg.d_model, inner, **kw)
        self.o = _linear(inner, cfg.d_model, **kw)
        self.num_heads = cfg.num_heads
        self.head_dim = cfg.d_kv

    def __call__(self, x: jax.Array, position_bias: jax.Array, mask: jax.Array | None) -> jax.Array:
        b, n, _ = x.shape
        split = lambda t: t.reshape(b, n, self.num_heads, self.head_dim)
        q, k, v = split(self.q(x)), split(self.k(x)), split(self.v(x))
        # T5 folds the scale into its weights: no 1/sqrt(d). Scores and softmax in fp32.
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) + position_bias
        if mask is not None:
            scores = jnp.where(mask[:, None, None, :], scores, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
        out = jnp.einsum("bhqk,bkhd->bqhd", probs, v, preferred_element_type=accumulation_dtype(v.dtype))
        return self.o(out.astype(v.dtype).reshape(b, n, self.num_heads * self.head_dim))


class T5GatedFeedForward(nnx.Module):
    def __init__(self, cfg: T5Config, *, dtype: Dtype, param_dtype: Dtype, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.wi_0 = _linear(cfg.d_model, cfg.d_ff, **kw)
        self.wi_1 = _linear(cfg.d_model, cfg.d_ff, **kw)
        self.wo = _linear(cfg.d_ff, cfg.d_model, **kw)
        self.act_name = cfg.dense_act_fn

    def __call__(self, x: jax.Array) -> jax.Array:
        # The activation in fp32, rounded once, as torch's bf16 GELU kernel does (and XLA:CPU would
        # otherwise rewrite each bf16 step of it to fp32 ops).
        gate = activation(self.act_name)(self.wi_0(x).astype(jnp.float32)).astype(x.dtype)
        return self.wo(gate * self.wi_1(x))


class T5Block(nnx.Module):
    """One pre-norm encoder layer: self-attention then gated feed-forward, each with a residual."""

    def __init__(self, cfg: T5Config, *, dtype: Dtype, param_dtype: Dtype, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.attn_norm = T5LayerNorm(cfg.d_model, cfg.layer_norm_epsilon, dtype=dtype)
        self.attn = T5Attention(cfg, **kw)
        self.ffn_norm = T5LayerNorm(cfg.d_model, cfg.layer_norm_epsilon, dtype=dtype)
        self.ffn = T5GatedFeedForward(cfg, **kw)

    def __call__(self, x: jax.Array, position_bias: jax.Array, mask: jax.Array | None) -> jax.Array:
        x = x + self.attn(self.attn_norm(x), position_bias, mask)
        return x + self.ffn(self.ffn_norm(x))


class T5Encoder(nnx.Module):
    """T5 v1.1 encoder stack: `(B, L) token ids -> (B, L, d_model)` final-normed hidden states.

    `dtype` is the compute dtype (fp32 or bf16); `param_dtype` defaults to it. Norm weights and
    the relative position bias table stay fp32 (tiny), and norms/softmax always run in fp32.
    """

    def __init__(
        self, cfg: T5Config, *, dtype: Dtype = jnp.float32, param_dtype: Dtype | None = None, rngs: nnx.Rngs
    ):
        param_dtype = dtype if param_dtype is None else param_dtype
        self.config = cfg
        self.dtype = dtype
        self.token_embedding = nnx.Embed(
            cfg.vocab_size, cfg.d_model, dtype=dtype, param_dtype=param_dtype, rngs=rngs
        )
        self.relative_attention_bias = nnx.Embed(
            cfg.relative_attention_num_buckets, cfg.num_heads, param_dtype=jnp.float32, rngs=rngs
        )
        self.blocks = stack_layers(
            lambda r: T5Block(cfg, dtype=dtype, param_dtype=param_dtype, rngs=r), cfg.num_layers, rngs
        )
        self.final_norm = T5LayerNorm(cfg.d_model, cfg.layer_norm_epsilon, dtype=dtype)

    def position_bias(self, length: int) -> jax.Array:
        """(1, heads, length, length) fp32 bias; computed once and shared by all layers, as in T5."""
        cfg = self.config
        buckets = relative_position_buckets(
            length, length, cfg.relative_attention_num_buckets, cfg.relative_attention_max_distance
        )
        table = self.relative_attention_bias.embedding[...].astype(jnp.float32)
        return jnp.transpose(table[buckets], (2, 0, 1))[None]

    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None) -> jax.Array:
        """`attention_mask` (B, L), nonzero = attend; None attends to every position (FluxPipeline's use)."""
        x = self.token_embedding(input_ids).astype(self.dtype)
        bias = self.position_bias(input_ids.shape[1])
        mask = None if attention_mask is None else attention_mask.astype(bool)
        x = scan_layers(self.blocks, x, bias, mask)
        return self.final_norm(x)


def t5_param_plan(cfg: T5Config) -> dict[tuple[str, ...], ParamSource]:
    """Model parameter path -> the transformers `T5EncoderModel` keys it is read from."""
    n = range(cfg.num_layers)
    layer = lambda fmt, **kw: ParamSource(tuple(f"encoder.block.{i}.layer.{fmt}" for i in n), stacked=True, **kw)
    plan = {
        ("token_embedding", "embedding"): ParamSource(("shared.weight",)),
        ("relative_attention_bias", "embedding"): ParamSource(
            ("encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight",)
        ),
        ("final_norm", "weight"): ParamSource(("encoder.final_layer_norm.weight",)),
        ("blocks", "attn_norm", "weight"): layer("0.layer_norm.weight"),
        ("blocks", "ffn_norm", "weight"): layer("1.layer_norm.weight"),
    }
    for name in ("q", "k", "v", "o"):
        plan[("blocks", "attn", name, "kernel")] = layer(f"0.SelfAttention.{name}.weight", transpose=True)
    for name in ("wi_0", "wi_1", "wo"):
        plan[("blocks", "ffn", name, "kernel")] = layer(f"1.DenseReluDense.{name}.weight", transpose=True)
    return plan


def abstract_t5_encoder(cfg: T5Config, *, dtype: Dtype = jnp.float32, param_dtype: Dtype | None = None) -> T5Encoder:
    """The model with `jax.ShapeDtypeStruct` parameters: no memory allocated."""
    return nnx.eval_shape(lambda: T5Encoder(cfg, dtype=dtype, param_dtype=param_dtype, rngs=nnx.Rngs(0)))


def _t5_ignored(key: str) -> bool:
    # A full T5 (encoder-decoder) checkpoint also carries the decoder and LM head; the encoder
    # ignores them as transformers' T5EncoderModel does. The tied embedding duplicate is ignored too.
    return key.startswith(("decoder.", "lm_head.")) or key == "encoder.embed_tokens.weight"


def load_t5_encoder(
    path: str | os.PathLike,
    *,
    dtype: Dtype = jnp.float32,
    param_dtype: Dtype | None = None,
    place: Placer | None = None,
) -> T5Encoder:
    """Load a transformers T5 (v1.1) encoder checkpoint directory (`config.json` + safetensors, sharded or not).

    `place`: see `load_from_checkpoint` (e.g. `pico_jax.parallel.param_placer(mesh)` to shard it)."""
    cfg = T5Config.from_pretrained(path)
    reader = SafetensorsReader(path)
    return load_from_checkpoint(
        abstract_t5_encoder(cfg, dtype=dtype, param_dtype=param_dtype),
        t5_param_plan(cfg),
        reader,
        ignore=_t5_ignored,
        # Tied weights may be saved only under the encoder's name.
        aliases={"shared.weight": "encoder.embed_tokens.weight"},
        what="T5 encoder checkpoint",
        place=place,
    )


__all__: Sequence[str] = (
    "T5Config",
    "T5Encoder",
    "load_t5_encoder",
    "abstract_t5_encoder",
    "t5_param_plan",
    "relative_position_buckets",
    "param_count",
)
