"""The FLUX.1 transformer in Flax NNX: double-stream and single-stream blocks, 3-axis RoPE,
AdaLN modulation, QK RMS-norm, scanned layer stacks with optional rematerialization.

Parameters follow the BFL fusion (fused QKV; single-block `linear1` = q, k, v and mlp), which
is also the fastest: one matmul where diffusers issues three or four. The fused columns are
*head-grouped* (`fused_order`): head h's q, k and v (and, in linear1, its 1/H share of the MLP)
sit side by side, and linear2's rows follow the same grouping. A contiguous split of the columns
over the 'tensor' mesh axis then gives every device whole heads, so Megatron-style tensor
parallelism needs no resharding; BFL's [q | k | v | mlp] order split that way cut through heads
(benchmarks/RESULTS.md, eighteenth session). `pico_jax.convert` maps diffusers and BFL
checkpoints onto it. Kernels are (in, out).

The forward takes diffusers' `FluxTransformer2DModel.forward` arguments by the same names and
with the same meaning (timestep and guidance in [0, 1] model units, multiplied by 1000 inside).
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import math
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from pico_jax.backend import target_backend, trace_setting
from pico_jax.model.attention import NARROW_FLOATS, AttentionHooks, Captured, attention
from pico_jax.parallel import (fsdp_gather_layer, fsdp_gathering, save_all_but_gathered_weights,
                               split_like_contracted_width)


# --------------------------------------------------------------------------------------- config
@dataclasses.dataclass(frozen=True)
class FluxConfig:
    in_channels: int = 64
    out_channels: int | None = None  # None: same as in_channels (diffusers' default)
    num_double: int = 19
    num_single: int = 38
    num_heads: int = 24
    head_dim: int = 128
    context_dim: int = 4096  # T5 width ("joint_attention_dim")
    pooled_dim: int = 768  # CLIP pooled width
    guidance_embeds: bool = True
    axes_dims_rope: tuple[int, int, int] = (16, 56, 56)
    rope_theta: float = 10000.0
    mlp_ratio: float = 4.0
    patch_size: int = 1
    # How the layer stacks run: "none" keeps all activations; "full" recomputes each block in
    # the backward pass; "dots" saves matmul outputs without batch dims (jax checkpoint policy).
    remat: str = "none"
    # Layers per iteration of the scanned stacks: 1 keeps one compiled block per stack (fast
    # compiles); larger values unroll (more room for XLA to schedule across layers, longer
    # compiles); 0 unrolls completely (no loop; XLA's cost analysis then counts every layer).
    scan_unroll: int = 1

    @property
    def width(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def mlp_width(self) -> int:
        return int(self.width * self.mlp_ratio)

    @property
    def output_channels(self) -> int:
        return self.patch_size * self.patch_size * (self.out_channels or self.in_channels)

    @property
    def num_layers(self) -> int:
        return self.num_double + self.num_single

    def __post_init__(self):
        if sum(self.axes_dims_rope) != self.head_dim:
            raise ValueError(f"axes_dims_rope {self.axes_dims_rope} must sum to head_dim {self.head_dim}")
        if any(d % 2 for d in self.axes_dims_rope):
            raise ValueError(f"axes_dims_rope {self.axes_dims_rope} must all be even")
        if self.mlp_width % self.num_heads:
            raise ValueError(f"mlp width {self.mlp_width} must be a multiple of num_heads {self.num_heads} "
                             "(the single blocks group the MLP columns by head)")

    def replace(self, **kw) -> "FluxConfig":
        return dataclasses.replace(self, **kw)

    # --- named configurations --------------------------------------------------------------
    @classmethod
    def flux1_dev(cls, **kw) -> "FluxConfig":
        return cls(**kw)

    @classmethod
    def flux1_schnell(cls, **kw) -> "FluxConfig":
        return cls(guidance_embeds=False, **kw)

    @classmethod
    def flux1_fill_dev(cls, **kw) -> "FluxConfig":
        return cls(in_channels=384, out_channels=64, **kw)

    @classmethod
    def named(cls, name: str) -> "FluxConfig":
        table = {
            "flux1-dev": cls.flux1_dev,
            "flux1-schnell": cls.flux1_schnell,
            "flux1-fill-dev": cls.flux1_fill_dev,
        }
        if name not in table:
            raise ValueError(f"unknown FLUX config {name!r}; known: {sorted(table)}")
        return table[name]()

    @classmethod
    def from_diffusers(cls, cfg: dict) -> "FluxConfig":
        """From a diffusers `FluxTransformer2DModel` config.json dict."""
        return cls(
            in_channels=cfg.get("in_channels", 64),
            out_channels=cfg.get("out_channels"),
            num_double=cfg.get("num_layers", 19),
            num_single=cfg.get("num_single_layers", 38),
            num_heads=cfg.get("num_attention_heads", 24),
            head_dim=cfg.get("attention_head_dim", 128),
            context_dim=cfg.get("joint_attention_dim", 4096),
            pooled_dim=cfg.get("pooled_projection_dim", 768),
            guidance_embeds=cfg.get("guidance_embeds", False),
            axes_dims_rope=tuple(cfg.get("axes_dims_rope", (16, 56, 56))),
            patch_size=cfg.get("patch_size", 1),
        )

    def to_diffusers(self) -> dict:
        return {
            "_class_name": "FluxTransformer2DModel",
            "patch_size": self.patch_size,
            "in_channels": self.in_channels,
            "out_channels": self.out_channels,
            "num_layers": self.num_double,
            "num_single_layers": self.num_single,
            "attention_head_dim": self.head_dim,
            "num_attention_heads": self.num_heads,
            "joint_attention_dim": self.context_dim,
            "pooled_projection_dim": self.pooled_dim,
            "guidance_embeds": self.guidance_embeds,
            "axes_dims_rope": list(self.axes_dims_rope),
        }


# --------------------------------------------------------------------------------------- layers
FUSED_LAYOUTS = ("qkv", "linear1", "linear2")
# The name of this parameter layout, kept with training checkpoints (which hold our arrays as they
# are): one written under another layout must not be resumed as if it were this one.
PARAM_LAYOUT = "head-grouped-v1"


@functools.lru_cache(maxsize=32)
def fused_order(cfg: "FluxConfig", kind: str) -> np.ndarray:
    """Our head-grouped order of a fused axis, as indices into the checkpoints' order:
    ours[j] = checkpoint[order[j]] along that axis.

    kind 'qkv': the double blocks' qkv output, checkpoint [q | k | v] → per head [q_h, k_h, v_h].
    kind 'linear1': the single blocks' linear1 output, [q | k | v | mlp] → per head
      [q_h, k_h, v_h, mlp_h] (mlp_h: the h-th of H equal slices of the MLP width).
    kind 'linear2': the single blocks' linear2 *input*, [attention | mlp] → per head [attn_h, mlp_h].
    """
    H, hd, D, M = cfg.num_heads, cfg.head_dim, cfg.width, cfg.mlp_width
    qkv = np.arange(3 * D).reshape(3, H, hd).transpose(1, 0, 2).reshape(H, 3 * hd)
    mlp = np.arange(M).reshape(H, M // H)
    if kind == "qkv":
        order = qkv
    elif kind == "linear1":
        order = np.concatenate([qkv, 3 * D + mlp], axis=1)
    elif kind == "linear2":
        order = np.concatenate([np.arange(D).reshape(H, hd), D + mlp], axis=1)
    else:
        raise ValueError(f"unknown fused layout {kind!r}; one of {FUSED_LAYOUTS}")
    order = order.reshape(-1)
    order.flags.writeable = False  # cached: shared by every caller
    return order


def reorder_fused_axis(x: np.ndarray, cfg: "FluxConfig", kind: str | None, axis: int,
                       inverse: bool = False) -> np.ndarray:
    """x with its `axis` taken from the checkpoints' order into our head-grouped one (`fused_order`),
    or back with inverse=True. kind None: x unchanged."""
    if not kind:
        return x
    order = fused_order(cfg, kind)
    return np.take(x, np.argsort(order) if inverse else order, axis=axis)


class Dense(nnx.Module):
    """A linear layer y = x·W + b with an optional LoRA branch (x·A)·B · (alpha / rank).

    LoRA factors are `nnx.LoRAParam`s so a trainer can select exactly them; they are added by
    `pico_jax.model.lora.add_lora`, never present after plain construction.
    """

    def __init__(self, din: int, dout: int, *, rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32, bias=True):
        init = nnx.initializers.lecun_normal()
        self.kernel = nnx.Param(init(rngs.params(), (din, dout), param_dtype))
        self.bias = nnx.Param(jnp.zeros((dout,), param_dtype)) if bias else None
        self.lora_a: nnx.LoRAParam | None = None
        self.lora_b: nnx.LoRAParam | None = None
        self.lora_scale: float = 1.0
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x.astype(self.dtype)
        acc = accumulation_dtype(self.dtype)
        kernel = self.kernel[...].astype(self.dtype)
        narrow = acc != jnp.dtype(self.dtype)
        y = narrow_product(x, kernel) if narrow else jnp.dot(x, kernel)
        if self.bias is not None:
            y = y + self.bias[...].astype(acc)
        if self.lora_a is not None:
            y = y + lora_delta(x, self.lora_a[...].astype(self.dtype), self.lora_b[...].astype(self.dtype),
                               float(self.lora_scale), acc).astype(acc)
        y = y.astype(self.dtype)
        # The custom VJP hides the product from remat="dots": name the layer's output for it, in
        # `dtype` as a GPU's dot writes it (the fp32 accumulator named instead planned the FLUX
        # step's dots residuals at twice their bytes, above remat "none"'s).
        return checkpoint_name(y, NARROW_PRODUCT) if narrow else y


def accumulation_dtype(dtype: Any, backend: str | None = None) -> Any:
    """The output dtype a linear layer's product is asked for before it is cast back to `dtype`.

    On CPU, bf16/fp16 products ask for fp32: XLA:CPU runs bf16 x bf16 -> fp32 natively (YNNPACK, about
    twice its fp32 matmul rate on AVX512_BF16), but rewrites a bf16-output dot to fp32 ops with the
    bf16 weights converted to fp32 on every call (benchmarks/RESULTS.md, ninth session). The bias is
    then added in fp32 and the sum rounded once. Elsewhere the product keeps `dtype` (GPU and TPU
    accumulate in fp32 inside the kernel and write the narrow type, half the bytes)."""
    dtype = jnp.dtype(dtype)
    if dtype in NARROW_FLOATS and (backend or target_backend()) == "cpu":
        return jnp.float32
    return dtype


NARROW_PRODUCT = "narrow_product"  # the checkpoint name of narrow_product's outputs in Dense


@jax.custom_vjp
def narrow_product(x: jax.Array, w: jax.Array) -> jax.Array:
    """x·w for bf16/fp16 x (..., K) and w (K, O), accumulated and returned in fp32.

    Its gradient is written out so the backward's products also run narrow x narrow -> fp32, the
    product XLA:CPU runs natively: the incoming fp32 gradient is rounded once to x's dtype (what a
    bf16 autograd, torch's included, hands the layer anyway). Left to autodiff, dx = g·wᵀ took the
    fp32 gradient with w converted to fp32, a product at half the rate plus a copy of w per call
    (benchmarks/RESULTS.md, tenth session). dw contracts over tokens, the leading axis of both
    operands, which XLA:CPU multiplies in fp32 whatever the operands (it is dead code in a LoRA
    step, where w is frozen)."""
    return _product_of_rows(x, w, w_axis=0)


def _product_of_rows(x: jax.Array, w: jax.Array, w_axis: int) -> jax.Array:
    """x (..., K) times w contracted over its axis `w_axis` (0: w is (K, O); 1: w is (O, K)), in fp32.

    A single row (an embedder or a modulation of one example) is multiplied as two equal rows,
    and one kept: XLA:CPU gives a one-row dot to its own matrix-vector code, not YNNPACK's, and
    converts the whole of a bf16 w to fp32 first (benchmarks/RESULTS.md, thirty-first session).
    `layer_modulations` does the same for its batch, whatever its split over devices."""
    contract = (((x.ndim - 1,), (w_axis,)), ((), ()))
    if math.prod(x.shape[:-1]) != 1:
        return jax.lax.dot_general(x, w, contract, preferred_element_type=jnp.float32)
    twice = jnp.broadcast_to(x.reshape(1, -1), (2, x.shape[-1]))
    y = jax.lax.dot_general(twice, w, (((1,), (w_axis,)), ((), ())), preferred_element_type=jnp.float32)
    return y[0].reshape(*x.shape[:-1], -1)


def _narrow_product_fwd(x, w):
    return narrow_product(x, w), (x, w)


def _narrow_product_bwd(residuals, g):
    x, w = residuals
    g = g.astype(x.dtype)
    dx = _product_of_rows(g, w, w_axis=1)
    x2, g2 = x.reshape(-1, x.shape[-1]), g.reshape(-1, g.shape[-1])  # tokens of all examples
    dw = jax.lax.dot_general(x2, g2, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)
    return dx.astype(x.dtype), dw.astype(w.dtype)


narrow_product.defvjp(_narrow_product_fwd, _narrow_product_bwd)


def lora_delta(x: jax.Array, a: jax.Array, b: jax.Array, scale: float, acc_dtype: Any = None) -> jax.Array:
    """The LoRA branch (x·A)·B · scale, x (..., K), A (K, r), B (r, O), in x's dtype; the products
    that read the (N, K) input or the (N, O) gradient accumulate in `acc_dtype` (default x's;
    `Dense` passes its accumulation dtype, fp32 for bf16/fp16 on CPU).

    Its gradient is written out (custom VJP) for XLA:CPU's layouts. With x's dtype throughout,
    every backward product contracts over tokens with the *small* operand transposed: dA =
    xᵀ·dlow, dB = (dyᵀ·low)ᵀ; left to autodiff, XLA:CPU laid the N×O gradient out transposed and
    fused that transpose into the GELU backward, a strided copy that took a quarter of a LoRA
    step. With narrow x and fp32 accumulation, see `_lora_delta_bwd_narrow` (benchmarks/RESULTS.md).

    The output product, low·B, stays in x's dtype: its operands are small, and under remat="dots"
    its (N, O) output is what the backward keeps (an fp32 output there planned +5.6 GiB per
    device for the FLUX.1-dev LoRA gradient, batch 4)."""
    return _lora_delta(x, a, b, float(scale), jnp.dtype(acc_dtype if acc_dtype is not None else x.dtype))


def _product(p: jax.Array, q: jax.Array, p_axis: int, q_axis: int, out_dtype: Any) -> jax.Array:
    """p (2-D or more) contracted with q over one axis each, accumulated and returned in out_dtype."""
    return jax.lax.dot_general(p, q, (((p_axis,), (q_axis,)), ((), ())), preferred_element_type=out_dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _lora_delta(x, a, b, scale, acc_dtype):
    return _lora_delta_fwd(x, a, b, scale, acc_dtype)[0]


def _lora_delta_fwd(x, a, b, scale, acc_dtype):
    low = _product(x, a, x.ndim - 1, 0, acc_dtype).astype(x.dtype)
    return _product(low, b, low.ndim - 1, 0, x.dtype) * jnp.asarray(scale, x.dtype), (x, a, b, low)


def _lora_delta_bwd(scale, acc_dtype, residuals, dy):
    x, a, b, low = residuals
    if jnp.dtype(x.dtype) != acc_dtype:
        return _lora_delta_bwd_narrow(scale, residuals, dy)
    s = jnp.asarray(scale, dy.dtype)
    x2, dy2, low2 = (t.reshape(-1, t.shape[-1]) for t in (x, dy, low))  # tokens of all examples
    dlow = jnp.dot(dy2, b.T) * s  # (N, r)
    da = jnp.dot(x2.T, dlow)  # (K, r)
    db = jnp.dot(dy2.T, low2).T * s  # (r, O)
    dx = jnp.dot(dlow, a.T).reshape(x.shape)
    return dx.astype(x.dtype), da.astype(a.dtype), db.astype(b.dtype)


def _lora_delta_bwd_narrow(scale, residuals, dy):
    """The backward for bf16/fp16 operands with fp32 products, every product in a form XLA:CPU
    runs natively (YNNPACK, narrow × narrow → fp32): the left operand contracted over its
    trailing axis. Any other form, or a narrow-output product, XLA:CPU runs in fp32 over fp32
    copies of *both* operands — here the (N, K) input and the (N, O) gradient. So the two
    token-contracting products take an (r, N) left operand made by a product: dlowᵀ = B·dyᵀ,
    and lowᵀ = I·lowᵀ (an exact identity product: a transpose would be folded into the product's
    dimensions, or laid out away, and the product upcast). dA is made as (r, K) and transposed
    behind an optimization barrier: XLA otherwise folds that transpose into the product by
    swapping its operands, a form its fallback dot cannot run in bf16 (an "Unsupported element
    type for DotThunk" error at run time; scripts/repro_xla_cpu_bf16_transposed_dot.py shows it in a
    few lines and says when a jax release fixes it). One LoRA'd layer's branch, forward and backward, bf16:
    (1056, 2560) → 512 7.0 → 2.7 ms, (1056, 512) → 3584 4.3 → 3.6 ms (benchmarks/RESULTS.md,
    sixteenth session)."""
    x, a, b, low = residuals
    f32, narrow = jnp.float32, x.dtype
    s = jnp.asarray(scale, f32)
    x2, low2 = x.reshape(-1, x.shape[-1]), low.reshape(-1, low.shape[-1])  # tokens of all examples
    dy2 = dy.reshape(-1, dy.shape[-1])  # in x's dtype, as the output is
    dlow = (_product(dy2, b, 1, 1, f32) * s).astype(narrow)  # (N, r)
    dlow_t = (_product(b, dy2, 1, 1, f32) * s).astype(narrow)  # (r, N)
    low_t = _product(jnp.eye(low2.shape[1], dtype=narrow), low2, 1, 1, f32).astype(narrow)  # (r, N)
    da = jax.lax.optimization_barrier(_product(dlow_t, x2, 1, 0, f32)).T  # (K, r)
    db = _product(low_t, dy2, 1, 0, f32) * s  # (r, O)
    dx = _product(dlow, a, 1, 1, f32).reshape(x.shape)  # (N, K)
    return dx.astype(narrow), da.astype(a.dtype), db.astype(b.dtype)


_lora_delta.defvjp(_lora_delta_fwd, _lora_delta_bwd)


class RMSNorm(nnx.Module):
    """QK norm: x / rms(x) · scale over the last axis, statistics in fp32."""

    def __init__(self, dim: int, *, param_dtype=jnp.float32, eps: float = 1e-6):
        self.scale = nnx.Param(jnp.ones((dim,), param_dtype))
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        return rms_norm(x, self.scale[...], self.eps)


# prevent_cse=False: the norm runs inside the scanned blocks, where scan already keeps XLA from
# merging the recomputation with the forward (and the barriers would cost fusion).
@functools.partial(jax.checkpoint, static_argnums=(2,), prevent_cse=False)
def rms_norm(x: jax.Array, scale: jax.Array, eps: float) -> jax.Array:
    """x / rms(x) · scale over the last axis, in fp32, returned in x's dtype.

    Checkpointed, so the backward keeps x in its own dtype and recomputes the norm: autodiff kept
    the fp32 copy of x, twice the bytes of a bf16 x, for q and for k of every layer. A written-out
    VJP that also kept the (…, 1) inverse rms planned more temporaries under remat dots and full
    (+8 and +7 MiB of 210 and 85 on the reduced bf16 LoRA gradient; benchmarks/RESULTS.md,
    thirteenth session), this plans none more under any policy."""
    xf = x.astype(jnp.float32)
    xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return (xf * scale.astype(jnp.float32)).astype(x.dtype)


def layer_norm(x: jax.Array, eps: float = 1e-6) -> jax.Array:
    """LayerNorm without affine parameters, statistics in fp32 (FLUX's pre-modulation norm)."""
    xf = x.astype(jnp.float32)
    mean, inv = _mean_and_inverse_std(xf, eps)
    return ((xf - mean) * inv).astype(x.dtype)


def _mean_and_inverse_std(xf: jax.Array, eps: float) -> tuple[jax.Array, jax.Array]:
    mean = xf.mean(-1, keepdims=True)
    return mean, jax.lax.rsqrt(jnp.mean(jnp.square(xf - mean), -1, keepdims=True) + eps)


@jax.custom_vjp
def modulate(x: jax.Array, shift: jax.Array, scale: jax.Array) -> jax.Array:
    """layer_norm(x) · (1 + scale) + shift: FLUX's adaptive LayerNorm, shift/scale broadcast over tokens.

    Its gradient is written out so that the backward keeps only x (in its own dtype), the (…, 1)
    fp32 mean and inverse std, and the (small) shift and scale, and recomputes the normalized x: autodiff kept two fp32
    copies the size of x (x − mean and its normalized form) plus the bf16 normalized x, per norm
    and layer, stacked over the scanned layers (benchmarks/RESULTS.md, thirteenth session)."""
    return _modulate_fwd(x, shift, scale)[0]


def _modulate_fwd(x, shift, scale):
    xf = x.astype(jnp.float32)
    mean, inv = _mean_and_inverse_std(xf, 1e-6)
    y = ((xf - mean) * inv).astype(x.dtype) * (1 + scale) + shift  # rounded as layer_norm(x) would be
    return y, (x, mean, inv, scale, shift)


def _sum_to_shape(t: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """Sum t over the axes a broadcast from `shape` expanded (leading or size 1)."""
    lead = t.ndim - len(shape)
    axes = tuple(range(lead)) + tuple(lead + i for i, d in enumerate(shape) if d == 1 and t.shape[lead + i] != 1)
    return jnp.sum(t, axis=axes, keepdims=True).reshape(shape)


def _modulate_bwd(residuals, g):
    x, mean, inv, scale, shift = residuals
    gf = g.astype(jnp.float32)
    xhat = (x.astype(jnp.float32) - mean) * inv
    dxhat = gf * (1 + scale.astype(jnp.float32))
    dx = inv * (dxhat - jnp.mean(dxhat, -1, keepdims=True) - xhat * jnp.mean(dxhat * xhat, -1, keepdims=True))
    dscale = _sum_to_shape(gf * xhat, scale.shape)
    dshift = _sum_to_shape(gf, shift.shape)
    return dx.astype(x.dtype), dshift.astype(shift.dtype), dscale.astype(scale.dtype)


modulate.defvjp(_modulate_fwd, _modulate_bwd)


_GELU_C = np.float32(np.sqrt(2.0 / np.pi))
_GELU_A = np.float32(0.044715)


def _gelu_gate(xf: jax.Array) -> jax.Array:
    """sigmoid(2z) = (1 + tanh z) / 2 with z = sqrt(2/pi)·(x + 0.044715·x³): the tanh GELU's gate."""
    return jax.nn.sigmoid((2 * _GELU_C) * (xf + _GELU_A * xf * xf * xf))


@jax.custom_vjp
def gelu_tanh(x: jax.Array) -> jax.Array:
    """GELU, tanh approximation (FLUX's MLPs), written as x · sigmoid(2z) and computed in fp32
    whatever x's dtype (rounded once at the end, as torch computes it for bf16).

    jax.nn.gelu on a bf16 x computes every step in bf16; XLA:CPU rewrites each to fp32 ops
    with a rounding between them, 2.65 ms for one single block's (1056, 2048) activations
    against 1.18 ms this way, which is also closer to the exact value (benchmarks/RESULTS.md,
    fourteenth session). Its gradient is written out so that the backward keeps only x:
    autodiff of the tanh form saves x², x³, tanh(·) and more per element, each one a residual
    the size of the MLP activations, stacked over the scanned layers and zero-filled every
    training step."""
    xf = x.astype(jnp.float32)
    return (xf * _gelu_gate(xf)).astype(x.dtype)


def _gelu_tanh_fwd(x):
    return gelu_tanh(x), x


def _gelu_tanh_bwd(x, g):
    # d/dx [x·s] with s = sigmoid(2z): s + x · 2s(1 − s) · dz/dx
    xf = x.astype(jnp.float32)
    s = _gelu_gate(xf)
    slope = s + (2 * _GELU_C) * xf * s * (1 - s) * (1 + 3 * _GELU_A * xf * xf)
    return ((g.astype(jnp.float32) * slope).astype(g.dtype),)


gelu_tanh.defvjp(_gelu_tanh_fwd, _gelu_tanh_bwd)


def timestep_embedding(t: jax.Array, dim: int = 256, max_period: float = 10000.0) -> jax.Array:
    """Sinusoidal embedding [cos, sin] of t (already in 0..1000 units), as FLUX/diffusers."""
    half = dim // 2
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
    args = t.astype(jnp.float32)[:, None] * freqs[None]
    return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


def rope_tables(ids: jax.Array, axes_dims: tuple[int, ...], theta: float) -> tuple[jax.Array, jax.Array]:
    """cos/sin tables (N, head_dim) for 3-axis positions ids (N, 3), each frequency repeated twice
    (interleaved pairs), matching diffusers' FluxPosEmbed / BFL's EmbedND."""
    cos, sin = [], []
    for axis, d in enumerate(axes_dims):
        freqs = 1.0 / (theta ** (np.arange(0, d, 2, dtype=np.float64) / d))
        angles = ids[:, axis].astype(jnp.float32)[:, None] * jnp.asarray(freqs, jnp.float32)[None]
        cos.append(jnp.repeat(jnp.cos(angles), 2, axis=-1))
        sin.append(jnp.repeat(jnp.sin(angles), 2, axis=-1))
    return jnp.concatenate(cos, -1), jnp.concatenate(sin, -1)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate interleaved pairs of x (B, N, H, D) by the angles of the tables (N, D), in fp32."""
    xf = x.astype(jnp.float32)
    pairs = xf.reshape(*xf.shape[:-1], -1, 2)
    rotated = jnp.stack([-pairs[..., 1], pairs[..., 0]], axis=-1).reshape(xf.shape)
    out = xf * cos[None, :, None, :] + rotated * sin[None, :, None, :]
    return out.astype(x.dtype)


class MLPEmbedder(nnx.Module):
    def __init__(self, din: int, dim: int, *, rngs, dtype, param_dtype):
        self.in_layer = Dense(din, dim, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.out_layer = Dense(dim, dim, rngs=rngs, dtype=dtype, param_dtype=param_dtype)

    def __call__(self, x):
        return self.out_layer(jax.nn.silu(self.in_layer(x)))


class StreamParams(nnx.Module):
    """The per-stream weights of a double block (one for the image stream, one for text)."""

    def __init__(self, cfg: FluxConfig, *, rngs, dtype, param_dtype):
        D, M = cfg.width, cfg.mlp_width
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.mod = Dense(D, 6 * D, **kw)
        self.qkv = Dense(D, 3 * D, **kw)
        self.q_norm = RMSNorm(cfg.head_dim, param_dtype=param_dtype)
        self.k_norm = RMSNorm(cfg.head_dim, param_dtype=param_dtype)
        self.proj = Dense(D, D, **kw)
        self.mlp_in = Dense(D, M, **kw)
        self.mlp_out = Dense(M, D, **kw)

    def pre_attention(self, x, vec, heads, mod=None):
        mod = (self.mod(jax.nn.silu(vec)) if mod is None else mod)[:, None, :]
        shift1, scale1, gate1, shift2, scale2, gate2 = jnp.split(mod, 6, axis=-1)
        h = modulate(x, shift1, scale1)
        b, n, _ = h.shape
        q, k, v = jnp.split(self.qkv(h).reshape(b, n, heads, 3, -1), 3, axis=3)  # head-grouped columns
        q, k, v = q[:, :, :, 0], k[:, :, :, 0], v[:, :, :, 0]
        return (self.q_norm(q), self.k_norm(k), v), (gate1, shift2, scale2, gate2)

    def post_attention(self, x, attn, mods):
        gate1, shift2, scale2, gate2 = mods
        x = x + gate1 * self.proj(attn)
        return x + gate2 * self.mlp_out(gelu_tanh(self.mlp_in(modulate(x, shift2, scale2))))


class DoubleBlock(nnx.Module):
    """Image and text streams with their own weights, attending jointly over [text, image]."""

    def __init__(self, cfg: FluxConfig, *, rngs, dtype, param_dtype):
        self.img = StreamParams(cfg, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.txt = StreamParams(cfg, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.heads = cfg.num_heads

    def __call__(self, img, txt, vec, cos, sin, hooks, capture_on, edit_on, mods=None):
        """mods: the (img, txt) modulation outputs if computed already (`layer_modulations`)."""
        img_mod, txt_mod = (None, None) if mods is None else mods
        (iq, ik, iv), imods = self.img.pre_attention(img, vec, self.heads, img_mod)
        (tq, tk, tv), tmods = self.txt.pre_attention(txt, vec, self.heads, txt_mod)
        q = apply_rope(jnp.concatenate([tq, iq], 1), cos, sin)
        k = apply_rope(jnp.concatenate([tk, ik], 1), cos, sin)
        v = jnp.concatenate([tv, iv], 1)
        out, stats = attention(q, k, v, hooks, capture_on, edit_on)
        n_txt = txt.shape[1]
        txt = self.txt.post_attention(txt, out[:, :n_txt], tmods)
        img = self.img.post_attention(img, out[:, n_txt:], imods)
        return img, txt, stats


class SingleBlock(nnx.Module):
    """One stream over [text, image]: parallel attention and MLP from one fused input matmul."""

    def __init__(self, cfg: FluxConfig, *, rngs, dtype, param_dtype):
        D, M = cfg.width, cfg.mlp_width
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.mod = Dense(D, 3 * D, **kw)
        self.linear1 = Dense(D, 3 * D + M, **kw)
        self.linear2 = Dense(D + M, D, **kw)
        self.q_norm = RMSNorm(cfg.head_dim, param_dtype=param_dtype)
        self.k_norm = RMSNorm(cfg.head_dim, param_dtype=param_dtype)
        self.heads, self.width = cfg.num_heads, D

    def __call__(self, x, vec, cos, sin, hooks, capture_on, edit_on, mod=None):
        """mod: the modulation output if computed already (`layer_modulations`)."""
        mod = self.mod(jax.nn.silu(vec)) if mod is None else mod
        shift, scale, gate = jnp.split(mod[:, None, :], 3, axis=-1)
        h = self.linear1(modulate(x, shift, scale))
        b, n, _ = h.shape
        hd = self.width // self.heads  # columns are head-grouped: per head [q, k, v, mlp share]
        qkv, mlp = split_columns(h.reshape(b, n, self.heads, -1), 3 * hd)
        q, k, v = jnp.split(qkv.reshape(b, n, self.heads, 3, hd), 3, axis=3)
        q = apply_rope(self.q_norm(q[:, :, :, 0]), cos, sin)
        k = apply_rope(self.k_norm(k[:, :, :, 0]), cos, sin)
        out, stats = attention(q, k, v[:, :, :, 0], hooks, capture_on, edit_on)
        joined = concatenate_columns(out.reshape(b, n, self.heads, hd), gelu_tanh(mlp)).reshape(b, n, -1)
        return x + gate * self.linear2(joined), stats


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def split_columns(h: jax.Array, at: int) -> tuple[jax.Array, jax.Array]:
    """(h[..., :at], h[..., at:]), with a gradient that concatenates the two halves' gradients
    after each is written out. Autodiff's transpose pads each half to full width and adds the pads;
    XLA:CPU fused both halves' backward (the GELU's and the q/k/v norms' and RoPE's) into one loop
    over the padded width, a branch per element: 13 ms a layer against 2.3 ms for the GELU
    backward alone (benchmarks/RESULTS.md, tenth session)."""
    return h[..., :at], h[..., at:]


def _split_columns_fwd(h, at):
    return split_columns(h, at), None


def _split_columns_bwd(at, _, grads):  # the halves' gradients arrive in h's dtype
    if target_backend() == "cpu":  # elsewhere the fused pad-and-add has no such cost
        grads = jax.lax.optimization_barrier(grads)
    return (_concatenate_columns(grads),)


split_columns.defvjp(_split_columns_fwd, _split_columns_bwd)


def _concatenate_columns(parts) -> jax.Array:
    """jnp.concatenate(parts, -1); on CPU, bf16/fp16 parts are joined as their bits, because
    XLA:CPU would convert every part to fp32 and the result back (a bf16 concatenate is one of
    the ops its float normalisation rewrites)."""
    dtype = parts[0].dtype
    if target_backend() != "cpu" or jnp.dtype(dtype) not in NARROW_FLOATS:
        return jnp.concatenate(parts, axis=-1)
    bits = [jax.lax.bitcast_convert_type(p, jnp.uint16) for p in parts]
    return jax.lax.bitcast_convert_type(jnp.concatenate(bits, axis=-1), dtype)


@jax.custom_vjp
def concatenate_columns(a: jax.Array, b: jax.Array) -> jax.Array:
    """jnp.concatenate([a, b], -1) of one dtype, without XLA:CPU's fp32 detour for bf16/fp16."""
    return _concatenate_columns((a, b))


def _concatenate_columns_fwd(a, b):
    return concatenate_columns(a, b), a.shape[-1]


def _concatenate_columns_bwd(at, g):
    return g[..., :at], g[..., at:]


concatenate_columns.defvjp(_concatenate_columns_fwd, _concatenate_columns_bwd)


def _stack(make, n: int, rngs: nnx.Rngs):
    """n copies of a module with parameters stacked on a leading layer axis."""

    @nnx.split_rngs(splits=n)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def build(r):
        return make(r)

    return build(rngs)


_REMAT_POLICIES = {
    "full": None,
    # a custom VJP hides its products from the dots policy; Dense names its output over narrow_product
    "dots": jax.checkpoint_policies.save_from_both_policies(
        jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
        jax.checkpoint_policies.save_only_these_names(NARROW_PRODUCT)),
    "nothing": jax.checkpoint_policies.nothing_saveable,
}


_WITHOUT_REMAT = contextvars.ContextVar("pico_jax_without_remat", default=False)


@contextlib.contextmanager
def without_remat() -> Iterator[None]:
    """Programs traced inside run every scanned stack with remat "none", whatever their config
    says: for counting a step's model FLOPs, the work without remat's recomputation
    (`flops.program_flops(..., recompute=False)`). JAX's caches are cleared on entry and exit
    (`backend.trace_setting`)."""
    with trace_setting(_WITHOUT_REMAT, True):
        yield


def scaled_time(t, dtype) -> jax.Array:
    """t (or guidance) × 1000 as diffusers and BFL compute it: rounded to the model dtype, multiplied
    in that dtype, then fp32 for the sinusoidal embedding. In bf16 this matters: guidance 3.5 embeds
    as 3504, not 3500, and the pretrained weights were trained on the rounded values."""
    return (jnp.asarray(t).astype(dtype) * jnp.asarray(1000, dtype)).astype(jnp.float32)


def scan_blocks(body, carry, stacked: nnx.Module, xs, remat: str, unroll: int = 1, compute_dtype=None,
                unscanned: Any = None):
    """lax.scan of `body(block, carry, x) -> (carry, y)` over a stacked module's layers.

    compute_dtype: the layers' compute dtype, so that over 'fsdp' the weights they cast to it are
    gathered in it (`fsdp_gather_layer`).
    unscanned: an nnx filter of parameters the body does not read (computed from already, outside
    the scan: `layer_modulations`). They are neither sliced nor gathered per layer; the block sees
    shape-only placeholders in their place."""
    if unscanned is None:
        graphdef, state = nnx.split(stacked)
        placeholders = ()
    else:
        graphdef, left_out, state = nnx.split(stacked, unscanned, ...)
        placeholders = (jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape[1:], a.dtype), left_out),)
    if remat != "none" and remat not in _REMAT_POLICIES:
        raise ValueError(f"unknown remat policy {remat!r}; choose none, {', '.join(_REMAT_POLICIES)}")
    if _WITHOUT_REMAT.get():
        remat = "none"
    unroll = True if unroll == 0 else unroll

    # On CPU a narrow-float stack is not scanned over: it stays a loop constant and the scan runs
    # over layer indices, each layer read through its bits (`take_layer` says why).
    by_bits = _slices_by_bits(state)

    def layer_step(layer_state, carry, x):
        # Under a context mesh with 'fsdp', the layer's weights are gathered here, one layer at a time.
        return body(nnx.merge(graphdef, *placeholders, fsdp_gather_layer(layer_state, compute_dtype)), carry, x)

    if remat != "none":
        layer_step = jax.checkpoint(layer_step, policy=_REMAT_POLICIES[remat], prevent_cse=False)
    elif fsdp_gathering():
        # "none" keeps every residual, the gathered weights among them (the products' operands):
        # every layer's whole weights would stay on every device until the backward. Keep the rest
        # and gather the weights again, as FSDP does.
        layer_step = jax.checkpoint(layer_step, policy=save_all_but_gathered_weights, prevent_cse=False)

    def step(carry, scanned_slice):
        layer, x = scanned_slice  # the layer's state, or with by_bits its index
        if by_bits:  # the layer is read in the step, and re-read by its backward (`call_layer_step`)
            return call_layer_step(layer_step, state, layer, carry, x)
        return layer_step(layer, carry, x)

    scanned = (jnp.arange(jax.tree.leaves(state)[0].shape[0]) if by_bits else state, xs)
    return jax.lax.scan(step, carry, scanned, unroll=unroll)


MODULATION = nnx.PathContains("mod")  # the blocks' modulation layers (`mod`, in StreamParams and SingleBlock)


def layer_modulations(stacked_dense: nnx.Module, vec: jax.Array) -> jax.Array:
    """`dense(silu(vec))` for every layer of a stacked modulation Dense at once: (layers, B, out).

    A block's modulation depends on the conditioning vector alone, not on the tokens, so every
    layer's can be computed before the scan, in one product over the stacked kernel, instead of
    one matrix-vector product a layer. The scan then neither slices those kernels per layer nor,
    over 'fsdp', gathers them: FLUX.1-dev's modulation kernels are 3.23 B of its 11.90 B
    parameters (27 %), gathered at every model call for a product with one vector per example.
    Here each device multiplies its own rows of them and the partial results are summed
    (`parallel.split_like_contracted_width`): FLUX.1-dev's forward on fsdp=8 all-gathers
    16.1 GiB per call instead of 22.1 (benchmarks/RESULTS.md, thirty-first session)."""
    graphdef, state = nnx.split(stacked_dense)
    layers = jax.tree.leaves(state)[0].shape[0]
    # x batched over the layers too: a batched product, which XLA:CPU runs in bf16 (with x shared,
    # the stacked kernel was one (D, layers·out) operand, converted to fp32 on every call). Where
    # the product is narrow_product's (bf16 on CPU), two copies of x: a split batch leaves a
    # device one row of it, and XLA:CPU multiplies one row in fp32 (`_product_of_rows`), which
    # planned 11.8 GiB of fp32 kernels per device for FLUX.1-Fill-dev's training step on data=8.
    copies = 2 if accumulation_dtype(stacked_dense.dtype) != jnp.dtype(stacked_dense.dtype) else 1
    x = jnp.broadcast_to(jax.nn.silu(vec), (layers, copies, *vec.shape))
    out = jax.vmap(lambda layer, x: nnx.merge(graphdef, layer)(x))(state, split_like_contracted_width(x))
    return out[:, 0]


@jax.tree_util.register_pytree_node_class
class _Bits:
    """A bf16/fp16 array held as its uint16 bits (the dtype rides along as static data)."""

    def __init__(self, bits, dtype):
        self.bits, self.dtype = bits, dtype

    def tree_flatten(self):
        return (self.bits,), self.dtype

    @classmethod
    def tree_unflatten(cls, dtype, children):
        return cls(children[0], dtype)


def _to_bits(a):
    if hasattr(a, "dtype") and jnp.dtype(a.dtype) in NARROW_FLOATS:
        return _Bits(jax.lax.bitcast_convert_type(a, jnp.uint16), a.dtype)
    return a


def _from_bits(a):
    return jax.lax.bitcast_convert_type(a.bits, a.dtype) if isinstance(a, _Bits) else a


@jax.tree_util.register_pytree_node_class
class _LayerLeaf:
    """A residual that is leaf k of the layer's state: not stored, re-read from the stacks."""

    def __init__(self, k: int):
        self.k = k

    def tree_flatten(self):
        return (), self.k

    @classmethod
    def tree_unflatten(cls, k, children):
        return cls(k)


def call_layer_step(fn, stacks, i, *args):
    """fn(take_layer(stacks, i), *args) for a scanned layer step, with a backward that keeps less.

    Inside a scan the residuals are stacked over the iterations and the backward scan slices them
    layer by layer. Two of them are not kept as they would be by autodiff:
    * the layer's own weights (a linear layer's input gradient needs them; a checkpointed step's
      inputs are residuals): the scan stacked a copy of every layer's weights, the whole model
      again. The backward re-reads them from the stacks, a loop constant the scan keeps once.
    * every other bf16/fp16 residual (saved activations) is stored as its uint16 bits: XLA:CPU
      rewrites a bf16 dynamic-slice to fp32 and hoists the convert, so each residual stack was
      converted to fp32 whole before the backward loop and every slice rounded back (`take_layer`
      has the forward's half of this story); uint16 slices are plain copies.
    Values and gradients are unchanged (tests/test_flux.py)."""
    converted, consts = jax.closure_convert(fn, take_layer(stacks, i), *args)
    return _layer_step_call(converted, consts, stacks, i, args)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _layer_step_call(fn, consts, stacks, i, args):
    return fn(take_layer(stacks, i), *args, *consts)


def _layer_step_fwd(fn, consts, stacks, i, args):
    layer = take_layer(stacks, i)
    out, vjp = jax.vjp(lambda c, lay, a: fn(lay, *a, *c), consts, layer, args)
    position = {id(x): k for k, x in enumerate(jax.tree.leaves(layer))}
    leaves, tree = jax.tree.flatten(vjp)
    packed = [_LayerLeaf(position[id(x)]) if id(x) in position else _to_bits(x) for x in leaves]
    return out, (jax.tree.unflatten(tree, packed), stacks, i)


def _layer_step_bwd(fn, residuals, g):
    packed, stacks, i = residuals
    layer = jax.tree.leaves(take_layer(stacks, i))
    leaves, tree = jax.tree.flatten(packed, is_leaf=lambda x: isinstance(x, (_Bits, _LayerLeaf)))
    vjp = jax.tree.unflatten(tree, [layer[x.k] if isinstance(x, _LayerLeaf) else _from_bits(x) for x in leaves])
    d_consts, d_layer, d_args = vjp(g)
    return d_consts, _scatter_layer(stacks, d_layer, i), None, d_args


_layer_step_call.defvjp(_layer_step_fwd, _layer_step_bwd)


def _slices_by_bits(state, backend: str | None = None) -> bool:
    """Whether a stack's layers are read with `take_layer`: on CPU, when any leaf is bf16/fp16."""
    if (backend or target_backend()) != "cpu":
        return False
    return any(jnp.dtype(a.dtype) in NARROW_FLOATS for a in jax.tree.leaves(state))


@jax.custom_vjp
def take_layer(stacks: Any, i: jax.Array) -> Any:
    """Layer i (a traced index) of a pytree of stacked arrays; bf16/fp16 leaves through their bits.

    XLA:CPU's float normalisation does not accept a bf16 dynamic-slice: it rewrites it to fp32 and
    then hoists the convert out of the loop, so every forward converted each whole weight stack to
    fp32 and every layer's slice back to bf16, ~90 ms of a 380 ms bf16 forward of the reduced FLUX.
    A uint16 slice of the same bits is a plain copy, but XLA hoists the bitcast out of the loop too
    and materialises it: a second copy of every stack, once per call (~35 ms of that forward, and
    the whole model's weights again in memory). The optimisation barrier over (stacks, i) keeps the
    bitcast in the loop, where it fuses into the slice (benchmarks/RESULTS.md). The gradient is
    written out because a bitcast has none (JAX would silently return zeros)."""
    stacks, i = jax.lax.optimization_barrier((stacks, i))
    return jax.tree.map(lambda a: _layer_by_bits(a, i), stacks)


def _layer_by_bits(a: jax.Array, i: jax.Array) -> jax.Array:
    if jnp.dtype(a.dtype) not in NARROW_FLOATS:
        return jax.lax.dynamic_index_in_dim(a, i, keepdims=False)
    bits = jax.lax.bitcast_convert_type(a, jnp.uint16)  # bf16 and fp16 are both 16 bits
    return jax.lax.bitcast_convert_type(jax.lax.dynamic_index_in_dim(bits, i, keepdims=False), a.dtype)


def _take_layer_fwd(stacks, i):
    return take_layer(stacks, i), (stacks, i)


def _take_layer_bwd(residuals, g):
    stacks, i = residuals
    return _scatter_layer(stacks, g, i), None


def _scatter_layer(stacks: Any, d_layer: Any, i: jax.Array) -> Any:
    """The stacks' gradient from one layer's: d_layer in row i of zero stacks shaped like `stacks`."""
    return jax.tree.map(
        lambda s, g: jax.lax.dynamic_update_index_in_dim(jnp.zeros(s.shape, s.dtype), g.astype(s.dtype), i, 0),
        stacks, d_layer)


take_layer.defvjp(_take_layer_fwd, _take_layer_bwd)


# ---------------------------------------------------------------------------------------- model
class FluxTransformer(nnx.Module):
    """FLUX.1 transformer. Call it with diffusers' FluxTransformer2DModel.forward arguments."""

    def __init__(
        self,
        cfg: FluxConfig,
        *,
        rngs: nnx.Rngs,
        dtype: Any = jnp.float32,
        param_dtype: Any = jnp.float32,
    ):
        self.config = cfg
        self.dtype = dtype
        D = cfg.width
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.img_in = Dense(cfg.in_channels, D, **kw)
        self.txt_in = Dense(cfg.context_dim, D, **kw)
        self.time_in = MLPEmbedder(256, D, **kw)
        self.vector_in = MLPEmbedder(cfg.pooled_dim, D, **kw)
        self.guidance_in = MLPEmbedder(256, D, **kw) if cfg.guidance_embeds else None
        block_kw = dict(dtype=dtype, param_dtype=param_dtype)
        self.double_blocks = _stack(lambda r: DoubleBlock(cfg, rngs=r, **block_kw), cfg.num_double, rngs)
        self.single_blocks = _stack(lambda r: SingleBlock(cfg, rngs=r, **block_kw), cfg.num_single, rngs)
        self.final_mod = Dense(D, 2 * D, **kw)  # BFL order: (shift, scale)
        self.final_proj = Dense(D, cfg.output_channels, **kw)

    def conditioning(self, timestep, pooled_projections, guidance=None) -> jax.Array:
        """The modulation vector: embed(t) + embed(guidance) + embed(pooled text)."""
        vec = self.time_in(timestep_embedding(scaled_time(timestep, self.dtype)).astype(self.dtype))
        if self.guidance_in is not None:
            if guidance is None:
                raise ValueError("this FLUX model has a guidance embedding (guidance_embeds=True): pass `guidance`")
            vec = vec + self.guidance_in(timestep_embedding(scaled_time(guidance, self.dtype)).astype(self.dtype))
        elif guidance is not None:
            raise ValueError("this FLUX model has no guidance embedding (guidance_embeds=False): pass guidance=None")
        return vec + self.vector_in(pooled_projections)

    def __call__(
        self,
        hidden_states,
        encoder_hidden_states,
        pooled_projections,
        timestep,
        img_ids,
        txt_ids,
        guidance=None,
        hooks: AttentionHooks | None = None,
    ):
        """Velocity prediction for packed image tokens.

        Args (as diffusers): hidden_states (B, N_img, in_channels); encoder_hidden_states
        (B, N_txt, context_dim); pooled_projections (B, pooled_dim); timestep (B,) in [0, 1];
        img_ids (N_img, 3) and txt_ids (N_txt, 3) (a leading batch axis is accepted and
        dropped, as diffusers does); guidance (B,) or None.

        Returns (B, N_img, output_channels); with `hooks`, a tuple (output, Captured).
        """
        cfg = self.config
        img = self.img_in(jnp.asarray(hidden_states))
        txt = self.txt_in(jnp.asarray(encoder_hidden_states))
        b = img.shape[0]
        timestep = jnp.broadcast_to(jnp.asarray(timestep, jnp.float32).reshape(-1), (b,))
        if guidance is not None:
            guidance = jnp.broadcast_to(jnp.asarray(guidance, jnp.float32).reshape(-1), (b,))
        vec = self.conditioning(timestep, jnp.asarray(pooled_projections), guidance)

        img_ids, txt_ids = jnp.asarray(img_ids), jnp.asarray(txt_ids)
        img_ids = img_ids[0] if img_ids.ndim == 3 else img_ids
        txt_ids = txt_ids[0] if txt_ids.ndim == 3 else txt_ids
        cos, sin = rope_tables(jnp.concatenate([txt_ids, img_ids], 0), cfg.axes_dims_rope, cfg.rope_theta)

        if hooks is None:
            flags = jnp.zeros((cfg.num_layers, 2), bool)
        else:
            flags = jnp.stack([hooks.capture, hooks.edit], -1)

        # Every layer's modulation up front (`layer_modulations` says why), scanned with the flags.
        double_mods = (layer_modulations(self.double_blocks.img.mod, vec),
                       layer_modulations(self.double_blocks.txt.mod, vec))
        single_mods = layer_modulations(self.single_blocks.mod, vec)

        def double_body(block, carry, x):
            (img, txt), (f, mods) = carry, x
            img, txt, stats = block(img, txt, vec, cos, sin, hooks, f[0], f[1], mods)
            return (img, txt), stats

        (img, txt), d_stats = scan_blocks(double_body, (img, txt), self.double_blocks,
                                          (flags[: cfg.num_double], double_mods), cfg.remat, cfg.scan_unroll,
                                          self.dtype, unscanned=MODULATION)

        def single_body(block, x, xs):
            f, mod = xs
            return block(x, vec, cos, sin, hooks, f[0], f[1], mod)

        n_txt = txt.shape[1]
        x, s_stats = scan_blocks(
            single_body, jnp.concatenate([txt, img], 1), self.single_blocks, (flags[cfg.num_double :], single_mods),
            cfg.remat, cfg.scan_unroll, self.dtype, unscanned=MODULATION,
        )
        img = x[:, n_txt:]

        shift, scale = jnp.split(self.final_mod(jax.nn.silu(vec))[:, None, :], 2, axis=-1)
        out = self.final_proj(modulate(img, shift, scale))
        if hooks is None:
            return out
        captured = Captured(
            group_mass=jnp.concatenate([d_stats[0], s_stats[0]], 0),
            key_map=jnp.concatenate([d_stats[1], s_stats[1]], 0),
            captured=hooks.capture,
        )
        return out, captured


# -------------------------------------------------------------------------------------- helpers
def count_params(tree) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))


def abstract_model(cfg: FluxConfig, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16) -> FluxTransformer:
    """The model with ShapeDtypeStruct leaves: traces any size without allocating it."""
    return nnx.eval_shape(lambda: FluxTransformer(cfg, rngs=nnx.Rngs(0), dtype=dtype, param_dtype=param_dtype))


def jit_forward(model: FluxTransformer):
    """A jitted callable with the model's forward signature (params captured by value)."""
    graphdef, state = nnx.split(model)

    @jax.jit
    def fwd(state, *args, **kwargs):
        return nnx.merge(graphdef, state)(*args, **kwargs)

    def call(*args, **kwargs):
        return fwd(state, *args, **kwargs)

    return call
