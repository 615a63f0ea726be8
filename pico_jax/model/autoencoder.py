"""The FLUX autoencoder (diffusers `AutoencoderKL`) in Flax NNX, and an exact pixel-space stand-in.

Both classes share one interface, so the pipeline and the trainer never care which one they hold:

* `encode(images) -> latents`: images NHWC in [-1, 1]; latents NHWC, *unscaled* (for the KL
  autoencoder: the mean of the posterior, as `AutoencoderKL.encode(x).latent_dist.mean`).
* `decode(latents) -> images`: unscaled NHWC latents in, NHWC images in roughly [-1, 1] out.
* `scale(z) = (z - shift_factor) * scaling_factor` and its inverse `unscale`: how FLUX pipelines
  normalize latents before the transformer sees them.
* attributes `scaling_factor`, `shift_factor`, `latent_channels`, `downsample_factor`.

Layout: everything is channels-last. Conv weights are converted from torch OIHW to HWIO and
linear weights from (out, in) to (in, out) at load time; module attribute names mirror the
diffusers module tree, so a parameter's path *is* its diffusers key
(`encoder.down_blocks.0.resnets.0.conv1.kernel` <-> `encoder.down_blocks.0.resnets.0.conv1.weight`).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pico_jax.parallel import to_device
from pico_jax.safetensors_io import CheckpointError, SafetensorsReader, check_keys, check_shape, read_config

# diffusers hard-codes eps=1e-6 for every GroupNorm of the autoencoder (resnets, attention, conv_norm_out);
# it is not a config field.
_VAE_NORM_EPS = 1e-6


# ----------------------------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class AutoencoderConfig:
    """The `AutoencoderKL` config fields that shape the network. Defaults are diffusers' defaults."""

    in_channels: int = 3
    out_channels: int = 3
    down_block_types: tuple[str, ...] = ("DownEncoderBlock2D",)
    up_block_types: tuple[str, ...] = ("UpDecoderBlock2D",)
    block_out_channels: tuple[int, ...] = (64,)
    layers_per_block: int = 1
    act_fn: str = "silu"
    latent_channels: int = 4
    norm_num_groups: int = 32
    scaling_factor: float = 0.18215
    shift_factor: float = 0.0
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True

    @classmethod
    def from_dict(cls, config: Mapping[str, Any]) -> AutoencoderConfig:
        """Build from a diffusers `config.json` dict; fields that do not shape the network are ignored."""
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in config.items() if k in names}
        for k in ("down_block_types", "up_block_types", "block_out_channels"):
            if k in kwargs:
                kwargs[k] = tuple(kwargs[k])
        # diffusers stores shift_factor=None for autoencoders that do not shift (SD 1.x/XL).
        if kwargs.get("shift_factor") is None:
            kwargs["shift_factor"] = 0.0
        cfg = cls(**kwargs)
        cfg.validate()
        return cfg

    def validate(self) -> None:
        n = len(self.block_out_channels)
        if set(self.down_block_types) != {"DownEncoderBlock2D"} or len(self.down_block_types) != n:
            raise ValueError(
                f"only {n} x DownEncoderBlock2D is supported, got down_block_types={self.down_block_types}"
            )
        if set(self.up_block_types) != {"UpDecoderBlock2D"} or len(self.up_block_types) != n:
            raise ValueError(f"only {n} x UpDecoderBlock2D is supported, got up_block_types={self.up_block_types}")
        if self.act_fn not in ("silu", "swish"):
            raise ValueError(f"only act_fn='silu' is supported, got {self.act_fn!r}")
        for c in self.block_out_channels:
            if c % self.norm_num_groups:
                raise ValueError(
                    f"block_out_channels {self.block_out_channels} not divisible by {self.norm_num_groups} groups"
                )

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)


def flux_vae_config() -> dict[str, Any]:
    """The FLUX.1 (dev/schnell) VAE `config.json`, as shipped in the pipeline's `vae/` folder."""
    return {
        "_class_name": "AutoencoderKL",
        "act_fn": "silu",
        "block_out_channels": [128, 256, 512, 512],
        "down_block_types": ["DownEncoderBlock2D"] * 4,
        "force_upcast": True,
        "in_channels": 3,
        "latent_channels": 16,
        "latents_mean": None,
        "latents_std": None,
        "layers_per_block": 2,
        "mid_block_add_attention": True,
        "norm_num_groups": 32,
        "out_channels": 3,
        "sample_size": 1024,
        "scaling_factor": 0.3611,
        "shift_factor": 0.1159,
        "up_block_types": ["UpDecoderBlock2D"] * 4,
        "use_post_quant_conv": False,
        "use_quant_conv": False,
    }


# Parameter count of diffusers `AutoencoderKL(**flux_vae_config())` (counted on the meta device).
FLUX_VAE_PARAM_COUNT = 83_819_683


# ----------------------------------------------------------------------------------------------
# Layers
# ----------------------------------------------------------------------------------------------


def group_norm(x: jax.Array, scale: jax.Array, bias: jax.Array, groups: int, eps: float) -> jax.Array:
    """torch.nn.GroupNorm on NHWC: groups are contiguous channel blocks, stats over (H, W, group) in fp32."""
    b, h, w, c = x.shape
    xf = x.astype(jnp.float32).reshape(b, h, w, groups, c // groups)
    mean = jnp.mean(xf, axis=(1, 2, 4), keepdims=True)
    # Two-pass variance (not E[x^2]-E[x]^2) to match torch's numerics on large activations.
    var = jnp.mean(jnp.square(xf - mean), axis=(1, 2, 4), keepdims=True)
    y = ((xf - mean) * jax.lax.rsqrt(var + eps)).reshape(b, h, w, c)
    return (y * scale.astype(jnp.float32) + bias.astype(jnp.float32)).astype(x.dtype)


class GroupNorm(nnx.Module):
    def __init__(self, channels: int, groups: int, eps: float, dtype: jnp.dtype):
        self.groups = groups
        self.eps = eps
        self.scale = nnx.Param(jnp.ones((channels,), dtype))
        self.bias = nnx.Param(jnp.zeros((channels,), dtype))

    def __call__(self, x: jax.Array) -> jax.Array:
        return group_norm(x, self.scale[...], self.bias[...], self.groups, self.eps)


def _conv(
    cin: int, cout: int, k: int, dtype: jnp.dtype, rngs: nnx.Rngs, stride: int = 1, padding: Any = None
) -> nnx.Conv:
    # torch Conv2d(padding=k//2) by default; explicit pairs so the layout never depends on 'SAME' rules.
    if padding is None:
        padding = ((k // 2, k // 2), (k // 2, k // 2))
    return nnx.Conv(cin, cout, (k, k), strides=stride, padding=padding, dtype=dtype, param_dtype=dtype, rngs=rngs)


class ResnetBlock2D(nnx.Module):
    """diffusers ResnetBlock2D without time embedding: norm-silu-conv twice, 1x1 shortcut when channels change."""

    def __init__(self, cin: int, cout: int, groups: int, dtype: jnp.dtype, rngs: nnx.Rngs):
        self.norm1 = GroupNorm(cin, groups, _VAE_NORM_EPS, dtype)
        self.conv1 = _conv(cin, cout, 3, dtype, rngs)
        self.norm2 = GroupNorm(cout, groups, _VAE_NORM_EPS, dtype)
        self.conv2 = _conv(cout, cout, 3, dtype, rngs)
        self.conv_shortcut = _conv(cin, cout, 1, dtype, rngs) if cin != cout else None

    def __call__(self, x: jax.Array) -> jax.Array:
        h = self.conv1(jax.nn.silu(self.norm1(x)))
        h = self.conv2(jax.nn.silu(self.norm2(h)))
        if self.conv_shortcut is not None:
            x = self.conv_shortcut(x)
        return x + h  # output_scale_factor is 1 in the autoencoder


class Downsample2D(nnx.Module):
    """Stride-2 3x3 conv. diffusers' encoder uses padding=0 and pads (0,1,0,1) first: bottom/right only."""

    def __init__(self, channels: int, dtype: jnp.dtype, rngs: nnx.Rngs):
        self.conv = _conv(channels, channels, 3, dtype, rngs, stride=2, padding=((0, 1), (0, 1)))

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.conv(x)


class Upsample2D(nnx.Module):
    """Nearest-neighbour x2 then a 3x3 conv."""

    def __init__(self, channels: int, dtype: jnp.dtype, rngs: nnx.Rngs):
        self.conv = _conv(channels, channels, 3, dtype, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
        return self.conv(x)


class SpatialSelfAttention(nnx.Module):
    """diffusers `Attention` as the VAE mid-block builds it: GroupNorm, one head over all H*W positions,
    residual connection, rescale_output_factor=1, softmax in fp32 (upcast_softmax)."""

    def __init__(self, channels: int, groups: int, dtype: jnp.dtype, rngs: nnx.Rngs):
        self.group_norm = GroupNorm(channels, groups, _VAE_NORM_EPS, dtype)

        def lin() -> nnx.Linear:
            return nnx.Linear(channels, channels, dtype=dtype, param_dtype=dtype, rngs=rngs)

        self.to_q, self.to_k, self.to_v = lin(), lin(), lin()
        self.to_out = nnx.List([lin()])  # diffusers: to_out = [Linear, Dropout]; the key is to_out.0

    def __call__(self, x: jax.Array) -> jax.Array:
        b, h, w, c = x.shape
        t = self.group_norm(x).reshape(b, h * w, c)
        q, k, v = self.to_q(t), self.to_k(t), self.to_v(t)
        logits = jnp.einsum("bqc,bkc->bqk", q, k, preferred_element_type=jnp.float32) * (c**-0.5)
        probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
        out = self.to_out[0](jnp.einsum("bqk,bkc->bqc", probs, v))
        return x + out.reshape(b, h, w, c)


class MidBlock2D(nnx.Module):
    def __init__(self, channels: int, groups: int, add_attention: bool, dtype: jnp.dtype, rngs: nnx.Rngs):
        self.resnets = nnx.List([ResnetBlock2D(channels, channels, groups, dtype, rngs) for _ in range(2)])
        self.attentions = nnx.List([SpatialSelfAttention(channels, groups, dtype, rngs)] if add_attention else [])

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.resnets[0](x)
        if len(self.attentions):
            x = self.attentions[0](x)
        return self.resnets[1](x)


class DownEncoderBlock2D(nnx.Module):
    def __init__(self, cin: int, cout: int, n: int, groups: int, downsample: bool, dtype: jnp.dtype, rngs: nnx.Rngs):
        self.resnets = nnx.List([ResnetBlock2D(cin if i == 0 else cout, cout, groups, dtype, rngs) for i in range(n)])
        self.downsamplers = nnx.List([Downsample2D(cout, dtype, rngs)] if downsample else [])

    def __call__(self, x: jax.Array) -> jax.Array:
        for r in self.resnets:
            x = r(x)
        for d in self.downsamplers:
            x = d(x)
        return x


class UpDecoderBlock2D(nnx.Module):
    def __init__(self, cin: int, cout: int, n: int, groups: int, upsample: bool, dtype: jnp.dtype, rngs: nnx.Rngs):
        self.resnets = nnx.List([ResnetBlock2D(cin if i == 0 else cout, cout, groups, dtype, rngs) for i in range(n)])
        self.upsamplers = nnx.List([Upsample2D(cout, dtype, rngs)] if upsample else [])

    def __call__(self, x: jax.Array) -> jax.Array:
        for r in self.resnets:
            x = r(x)
        for u in self.upsamplers:
            x = u(x)
        return x


class Encoder(nnx.Module):
    def __init__(self, cfg: AutoencoderConfig, dtype: jnp.dtype, rngs: nnx.Rngs):
        ch, g = cfg.block_out_channels, cfg.norm_num_groups
        self.conv_in = _conv(cfg.in_channels, ch[0], 3, dtype, rngs)
        self.down_blocks = nnx.List(
            [
                DownEncoderBlock2D(ch[max(i - 1, 0)], ch[i], cfg.layers_per_block, g, i < len(ch) - 1, dtype, rngs)
                for i in range(len(ch))
            ]
        )
        self.mid_block = MidBlock2D(ch[-1], g, cfg.mid_block_add_attention, dtype, rngs)
        self.conv_norm_out = GroupNorm(ch[-1], g, _VAE_NORM_EPS, dtype)
        # double_z: mean and log-variance, concatenated on the channel axis.
        self.conv_out = _conv(ch[-1], 2 * cfg.latent_channels, 3, dtype, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.conv_in(x)
        for blk in self.down_blocks:
            x = blk(x)
        x = self.mid_block(x)
        return self.conv_out(jax.nn.silu(self.conv_norm_out(x)))


class Decoder(nnx.Module):
    def __init__(self, cfg: AutoencoderConfig, dtype: jnp.dtype, rngs: nnx.Rngs):
        ch, g = cfg.block_out_channels, cfg.norm_num_groups
        rev = list(reversed(ch))
        self.conv_in = _conv(cfg.latent_channels, ch[-1], 3, dtype, rngs)
        self.mid_block = MidBlock2D(ch[-1], g, cfg.mid_block_add_attention, dtype, rngs)
        # The decoder blocks have one more resnet than the encoder's (diffusers: layers_per_block + 1).
        self.up_blocks = nnx.List(
            [
                UpDecoderBlock2D(rev[max(i - 1, 0)], rev[i], cfg.layers_per_block + 1, g, i < len(ch) - 1, dtype, rngs)
                for i in range(len(ch))
            ]
        )
        self.conv_norm_out = GroupNorm(ch[0], g, _VAE_NORM_EPS, dtype)
        self.conv_out = _conv(ch[0], cfg.out_channels, 3, dtype, rngs)

    def __call__(self, z: jax.Array) -> jax.Array:
        x = self.conv_in(z)
        x = self.mid_block(x)
        for blk in self.up_blocks:
            x = blk(x)
        return self.conv_out(jax.nn.silu(self.conv_norm_out(x)))


# ----------------------------------------------------------------------------------------------
# The autoencoders
# ----------------------------------------------------------------------------------------------


def _check_nhwc(x: jax.Array, channels: int, what: str) -> None:
    if x.ndim != 4 or x.shape[-1] != channels:
        raise ValueError(f"{what} must be NHWC with {channels} channels, got shape {tuple(x.shape)}")


class Autoencoder(nnx.Module):
    """diffusers `AutoencoderKL` in NNX (channels-last). Use `load_autoencoder` to get trained weights.

    `encode`/`decode` are compiled (`jax.jit` over the module as a pytree, cached per input shape); `encode_unjitted`/
    `decode_unjitted` are the same computations for use inside a caller's own jit.
    """

    def __init__(
        self,
        config: Mapping[str, Any] | AutoencoderConfig,
        *,
        dtype: jnp.dtype = jnp.float32,
        rngs: nnx.Rngs | None = None,
    ):
        cfg = config if isinstance(config, AutoencoderConfig) else AutoencoderConfig.from_dict(config)
        rngs = rngs if rngs is not None else nnx.Rngs(0)
        self.config = cfg
        self.dtype = dtype
        self.scaling_factor = float(cfg.scaling_factor)
        self.shift_factor = float(cfg.shift_factor)
        self.latent_channels = cfg.latent_channels
        self.downsample_factor = cfg.downsample_factor
        self.encoder = Encoder(cfg, dtype, rngs)
        self.decoder = Decoder(cfg, dtype, rngs)
        lc = cfg.latent_channels
        self.quant_conv = _conv(2 * lc, 2 * lc, 1, dtype, rngs) if cfg.use_quant_conv else None
        self.post_quant_conv = _conv(lc, lc, 1, dtype, rngs) if cfg.use_post_quant_conv else None

    def encode_unjitted(self, images: jax.Array) -> jax.Array:
        _check_nhwc(images, self.config.in_channels, "images")
        h = self.encoder(images.astype(self.dtype))
        if self.quant_conv is not None:
            h = self.quant_conv(h)
        # DiagonalGaussianDistribution: the first half of the channels is the mean, the rest the log-variance.
        return h[..., : self.latent_channels]

    def decode_unjitted(self, latents: jax.Array) -> jax.Array:
        _check_nhwc(latents, self.latent_channels, "latents")
        z = latents.astype(self.dtype)
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z)

    def encode(self, images: jax.Array) -> jax.Array:
        """NHWC images in [-1, 1] -> NHWC unscaled latent mean (H/downsample_factor, W/downsample_factor)."""
        return _jit_encode(self, images)

    def decode(self, latents: jax.Array) -> jax.Array:
        """NHWC unscaled latents -> NHWC images, roughly in [-1, 1]."""
        return _jit_decode(self, latents)

    def scale(self, z: jax.Array) -> jax.Array:
        return (z - self.shift_factor) * self.scaling_factor

    def unscale(self, z: jax.Array) -> jax.Array:
        return z / self.scaling_factor + self.shift_factor


# NNX modules are pytrees, and encode/decode never mutate the model, so plain `jax.jit` is enough; it
# dispatches in ~1 ms where a graph-mode `nnx.jit` re-walks the module graph each call (~10 ms here).
@jax.jit
def _jit_encode(model: Autoencoder, images: jax.Array) -> jax.Array:
    return model.encode_unjitted(images)


@jax.jit
def _jit_decode(model: Autoencoder, latents: jax.Array) -> jax.Array:
    return model.decode_unjitted(latents)


def space_to_depth(x: jax.Array, factor: int) -> jax.Array:
    """(B, H, W, C) -> (B, H/f, W/f, C*f*f), channel index c*f*f + dy*f + dx (torch pixel_unshuffle order)."""
    b, h, w, c = x.shape
    if h % factor or w % factor:
        raise ValueError(f"image size {h}x{w} is not divisible by the factor {factor}")
    x = x.reshape(b, h // factor, factor, w // factor, factor, c)
    return x.transpose(0, 1, 3, 5, 2, 4).reshape(b, h // factor, w // factor, c * factor * factor)


def depth_to_space(z: jax.Array, factor: int) -> jax.Array:
    """Inverse of `space_to_depth`: (B, h, w, C*f*f) -> (B, h*f, w*f, C)."""
    b, h, w, cff = z.shape
    c = cff // (factor * factor)
    z = z.reshape(b, h, w, c, factor, factor)
    return z.transpose(0, 1, 4, 2, 5, 3).reshape(b, h * factor, w * factor, c)


class PixelAutoencoder(nnx.Module):
    """A parameter-free "autoencoder": exact space-to-depth with `factor` (for models trained in pixel space).

    Latent channel order is channel-major, then row, then column inside each factor x factor patch:
    `latents[b, i, j, c*f*f + dy*f + dx] == images[b, i*f + dy, j*f + dx, c]` (the order of
    `torch.nn.functional.pixel_unshuffle` and of FLUX's own 2x2 latent packing). `decode(encode(x)) == x` exactly.
    """

    def __init__(self, factor: int, channels: int = 3):
        if factor < 1:
            raise ValueError(f"factor must be >= 1, got {factor}")
        self.factor = int(factor)
        self.channels = int(channels)
        self.latent_channels = self.channels * self.factor**2
        self.downsample_factor = self.factor
        self.scaling_factor = 1.0
        self.shift_factor = 0.0

    def encode(self, images: jax.Array) -> jax.Array:
        _check_nhwc(images, self.channels, "images")
        return _jit_space_to_depth(images, self.factor)

    def decode(self, latents: jax.Array) -> jax.Array:
        _check_nhwc(latents, self.latent_channels, "latents")
        return _jit_depth_to_space(latents, self.factor)

    # Pure reshapes: the same inside a caller's jit.
    encode_unjitted = encode
    decode_unjitted = decode

    def scale(self, z: jax.Array) -> jax.Array:
        return (z - self.shift_factor) * self.scaling_factor

    def unscale(self, z: jax.Array) -> jax.Array:
        return z / self.scaling_factor + self.shift_factor


_jit_space_to_depth = jax.jit(space_to_depth, static_argnums=1)
_jit_depth_to_space = jax.jit(depth_to_space, static_argnums=1)


# ----------------------------------------------------------------------------------------------
# Loading diffusers checkpoints
# ----------------------------------------------------------------------------------------------


def _diffusers_key(path: Sequence[Any]) -> str:
    """NNX param path -> diffusers state-dict key (`kernel`/`scale` are torch's `weight`)."""
    leaf = {"kernel": "weight", "scale": "weight", "bias": "bias"}[str(path[-1])]
    return ".".join(str(p) for p in path[:-1]) + "." + leaf


def _torch_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    """The torch shape of a parameter with this NNX shape (HWIO -> OIHW, (in, out) -> (out, in))."""
    if len(shape) == 4:
        return (shape[3], shape[2], shape[0], shape[1])
    if len(shape) == 2:
        return (shape[1], shape[0])
    return tuple(shape)


def _from_torch(w: np.ndarray) -> np.ndarray:
    if w.ndim == 4:
        return w.transpose(2, 3, 1, 0)
    if w.ndim == 2:
        return w.T
    return w


def _resolve_vae_dir(path: Path) -> Path:
    """A diffusers VAE dir, or a pipeline dir whose `vae/` holds it."""
    if path.is_dir() and not (path / "config.json").exists() and (path / "vae").is_dir():
        return path / "vae"
    return path


def _weights_source(vae_dir: Path) -> tuple[Path, str | None]:
    # Pin the canonical single file so a `.fp16.safetensors` variant next to it is not read as a second shard.
    single = vae_dir / "diffusion_pytorch_model.safetensors"
    if single.is_file():
        return single, None
    return vae_dir, "diffusion_pytorch_model"


def load_autoencoder(path: str | os.PathLike, dtype: jnp.dtype = jnp.float32) -> Autoencoder:
    """Load a diffusers `AutoencoderKL` checkpoint (a `vae/` dir, or a pipeline dir containing one).

    Weights are read and converted one tensor at a time and stored in `dtype`. Any missing or
    unexpected key, or a wrong shape, raises `CheckpointError` naming the path and the keys.
    """
    vae_dir = _resolve_vae_dir(Path(path))
    raw_cfg = read_config(vae_dir)
    try:
        cfg = AutoencoderConfig.from_dict(raw_cfg)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{vae_dir / 'config.json'}: unsupported AutoencoderKL config: {e}") from e

    weights, prefer = _weights_source(vae_dir)
    reader = SafetensorsReader(weights, prefer=prefer)

    model = nnx.eval_shape(lambda: Autoencoder(cfg, dtype=dtype, rngs=nnx.Rngs(0)))
    params = nnx.state(model, nnx.Param)
    flat = [(_diffusers_key(p), v) for p, v in nnx.to_flat_state(params)]
    check_keys(reader.path, {k for k, _ in flat}, set(reader.keys()), what="AutoencoderKL checkpoint")
    for key, var in flat:
        want = _torch_shape(tuple(var.get_value().shape))
        check_shape(reader.path, key, reader.shape(key), want)
        var.set_value(to_device(np.asarray(_from_torch(reader[key]), dtype=jnp.dtype(dtype))))
    nnx.update(model, params)
    return model
