"""Rectified flow as FLUX uses it: interpolation, velocity target, masked loss, timestep sampling,
the resolution-dependent shifted schedule, and an Euler sampler that is one `lax.scan`.

Convention (diffusers/FLUX): t = 1 is pure noise, t = 0 is data.
    x_t = (1 - t) · x0 + t · ε          velocity v = dx_t/dt = ε - x0
Sampling integrates from t = 1 down to t = 0: x ← x + (t_next - t) · v(x, t).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def interpolate(x0: jax.Array, noise: jax.Array, t: jax.Array) -> jax.Array:
    """x_t for per-example t (B,) and tokens (B, N, C)."""
    t = t.reshape(-1, *([1] * (x0.ndim - 1))).astype(x0.dtype)
    return (1 - t) * x0 + t * noise


def velocity_target(x0: jax.Array, noise: jax.Array) -> jax.Array:
    return noise - x0


def masked_mse(pred: jax.Array, target: jax.Array, token_mask: jax.Array) -> jax.Array:
    """Mean squared error over the tokens where token_mask (N,) or (B, N) is 1, in fp32.

    PICO trains only on the B' panel: the known panels contribute nothing."""
    err = jnp.mean(jnp.square(pred.astype(jnp.float32) - target.astype(jnp.float32)), axis=-1)  # (B, N)
    w = jnp.broadcast_to(token_mask.astype(jnp.float32), err.shape)
    return jnp.sum(err * w) / jnp.maximum(jnp.sum(w), 1.0)


def flow_loss(pred_velocity, x0, noise, token_mask) -> jax.Array:
    return masked_mse(pred_velocity, velocity_target(x0, noise), token_mask)


# ------------------------------------------------------------------- what the network predicts
PREDICTIONS = ("velocity", "x0_residual")


def velocity_from_output(out: jax.Array, xt: jax.Array, t: jax.Array, base: jax.Array | None, prediction: str,
                         t_min: float = 0.05) -> jax.Array:
    """The velocity a network output stands for.

    'velocity' (FLUX): the output is v. 'x0_residual': the output is the clean sample's offset from
    `base` (for PICO, the query B's tokens at the B' positions), x̂0 = base + out, and
    v = (x_t − x̂0) / max(t, t_min) — x-prediction trained with the v-loss, as JiT (Li & He, 2025)
    does for pixel-space diffusion, with the identity "B' = B" as the zero output. t is a scalar
    or (B,) per example. The clip keeps the loss weight 1/t² finite; an Euler step from t to 0
    lands exactly on x̂0 whenever t ≥ t_min."""
    if prediction == "velocity":
        return out
    if prediction != "x0_residual":
        raise ValueError(f"prediction must be one of {PREDICTIONS} (got {prediction!r})")
    t = jnp.asarray(t, jnp.float32)
    t = t.reshape(-1, *([1] * (xt.ndim - 1))) if t.ndim else t
    x0 = base.astype(jnp.float32) + out.astype(jnp.float32)
    return ((xt.astype(jnp.float32) - x0) / jnp.maximum(t, t_min)).astype(out.dtype)


# ------------------------------------------------------------------------------ timesteps
def flux_mu(image_seq_len: int, base_seq: int = 256, max_seq: int = 4096, base_shift: float = 0.5, max_shift: float = 1.15) -> float:
    """FLUX's resolution-dependent shift parameter: linear in the number of image tokens."""
    m = (max_shift - base_shift) / (max_seq - base_seq)
    return float(image_seq_len * m + (base_shift - m * base_seq))


def time_shift(t: jax.Array, mu: float, sigma: float = 1.0) -> jax.Array:
    """Shift t towards noise for larger images: e^mu / (e^mu + (1/t - 1)^sigma)."""
    t = jnp.asarray(t, jnp.float32)
    safe = jnp.clip(t, 1e-12, 1.0)
    shifted = np.exp(mu) / (np.exp(mu) + (1.0 / safe - 1.0) ** sigma)
    return jnp.where(t <= 0, 0.0, shifted)


def sample_timesteps(key: jax.Array, batch: int, kind: str = "logit_normal", mu: float = 0.0, mean: float = 0.0, std: float = 1.0) -> jax.Array:
    """Training timesteps in (0, 1): 'logit_normal' (SD3/FLUX) or 'uniform', then shifted by mu."""
    if kind == "logit_normal":
        t = jax.nn.sigmoid(mean + std * jax.random.normal(key, (batch,)))
    elif kind == "uniform":
        t = jax.random.uniform(key, (batch,), minval=1e-5, maxval=1.0)
    else:
        raise ValueError(f"unknown timestep sampling {kind!r}: use 'logit_normal' or 'uniform'")
    return time_shift(t, mu) if mu else t


def flux_schedule(num_steps: int, image_seq_len: int | None = None, mu: float | None = None) -> np.ndarray:
    """num_steps + 1 times from 1 to 0, as FluxPipeline: linspace(1, 1/n, n) shifted by mu, then 0."""
    if num_steps < 1:
        raise ValueError(f"--steps must be at least 1 (got {num_steps})")
    if mu is None:
        mu = flux_mu(image_seq_len) if image_seq_len is not None else 0.0
    t = np.linspace(1.0, 1.0 / num_steps, num_steps)
    t = np.exp(mu) / (np.exp(mu) + (1.0 / t - 1.0)) if mu else t
    return np.append(t, 0.0).astype(np.float32)


# ------------------------------------------------------------------------------- sampler
VelocityFn = Callable[[jax.Array, jax.Array, jax.Array], tuple[jax.Array, Any]]


def euler_sample(velocity: VelocityFn, x: jax.Array, times: jax.Array, start: int = 0, stop: int | None = None):
    """Integrate dx/dt = v from times[start] to times[stop] with Euler steps, as one lax.scan.

    velocity(x, t, step) → (v, aux); aux (any pytree, e.g. attention statistics) is stacked over
    steps. Returns (x, aux). `start`/`stop` let a caller run the first k steps, choose, and resume.
    """
    times = jnp.asarray(times, jnp.float32)
    stop = len(times) - 1 if stop is None else stop
    steps = jnp.arange(start, stop)

    def body(x, i):
        t, t_next = times[i], times[i + 1]
        v, aux = velocity(x, t, i)
        return (x.astype(jnp.float32) + (t_next - t) * v.astype(jnp.float32)).astype(x.dtype), aux

    return jax.lax.scan(body, x, steps)
