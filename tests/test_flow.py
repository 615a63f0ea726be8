"""Rectified flow: interpolation, masked loss, timestep sampling, FLUX's shifted schedule (checked
against diffusers) and the Euler sampler (exact on a known linear flow)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pico_jax.flow import (
    euler_sample,
    flow_loss,
    flux_mu,
    flux_schedule,
    interpolate,
    masked_mse,
    sample_timesteps,
    time_shift,
    velocity_target,
)

B, N, C = 3, 16, 8


def _data(seed=0):
    rng = np.random.default_rng(seed)
    x0 = jnp.asarray(rng.standard_normal((B, N, C)), jnp.float32)
    eps = jnp.asarray(rng.standard_normal((B, N, C)), jnp.float32)
    return x0, eps


def _bprime_mask():
    m = np.zeros(N, np.float32)
    m[N - 4 :] = 1.0  # the last quarter of the tokens plays the B' panel
    return jnp.asarray(m)


# ------------------------------------------------------------------------------ interpolation
def test_interpolate_endpoints_and_velocity():
    x0, eps = _data()
    np.testing.assert_array_equal(interpolate(x0, eps, jnp.zeros(B)), x0)  # t = 0: data
    np.testing.assert_array_equal(interpolate(x0, eps, jnp.ones(B)), eps)  # t = 1: noise
    t = jnp.array([0.25, 0.5, 0.9])
    xt = interpolate(x0, eps, t)
    np.testing.assert_allclose(xt[1], 0.5 * (x0[1] + eps[1]), rtol=1e-6)
    # Per-example t: example 0 is at 0.25.
    np.testing.assert_allclose(xt[0], 0.75 * x0[0] + 0.25 * eps[0], rtol=1e-6)
    # The velocity target is d x_t / dt.
    h = 1e-2
    fd = (interpolate(x0, eps, t + h) - interpolate(x0, eps, t)) / h
    np.testing.assert_allclose(fd, velocity_target(x0, eps), rtol=1e-3, atol=1e-3)


# -------------------------------------------------------------------------------------- loss
def test_loss_zero_for_perfect_prediction_and_masked_to_bprime():
    x0, eps = _data(1)
    mask = _bprime_mask()
    perfect = velocity_target(x0, eps)
    assert float(flow_loss(perfect, x0, eps, mask)) == 0.0

    # Garbage on the known panels (outside the B' mask) changes nothing.
    outside = jnp.broadcast_to(mask[None, :, None] == 0, perfect.shape)
    garbage = jnp.asarray(np.random.default_rng(2).standard_normal(perfect.shape) * 1e3, jnp.float32)
    assert float(flow_loss(jnp.where(outside, garbage, perfect), x0, eps, mask)) == 0.0

    # Garbage inside B' does, and the value is the mean over B' tokens and channels.
    pred = perfect.at[:, N - 1, :].add(2.0)  # one B' token off by 2 in every channel
    want = 4.0 / 4  # squared error 4 on 1 of the 4 B' tokens per example
    assert float(flow_loss(pred, x0, eps, mask)) == pytest.approx(want, rel=1e-6)

    # A per-example (B, N) mask weighs tokens, not examples.
    m2 = jnp.zeros((B, N)).at[0, :2].set(1.0)
    err = jnp.zeros((B, N, C)).at[0, 0].set(1.0)
    assert float(masked_mse(err, jnp.zeros_like(err), m2)) == pytest.approx(0.5)
    # An all-zero mask gives 0, not NaN.
    assert float(masked_mse(err, jnp.zeros_like(err), jnp.zeros(N))) == 0.0


def test_loss_in_fp32_for_bf16_inputs():
    x0, eps = _data(3)
    mask = _bprime_mask()
    pred = velocity_target(x0, eps) + 1e-3
    l32 = flow_loss(pred, x0, eps, mask)
    l16 = flow_loss(pred.astype(jnp.bfloat16), x0.astype(jnp.bfloat16), eps.astype(jnp.bfloat16), mask)
    assert l16.dtype == jnp.float32 and l32.dtype == jnp.float32


# --------------------------------------------------------------------------------- timesteps
@pytest.mark.parametrize("kind", ["logit_normal", "uniform"])
def test_sample_timesteps_in_open_interval_and_deterministic(kind):
    key = jax.random.key(7)
    t = sample_timesteps(key, 4096, kind)
    assert t.shape == (4096,)
    assert float(t.min()) > 0.0 and float(t.max()) < 1.0
    np.testing.assert_array_equal(t, sample_timesteps(jax.random.key(7), 4096, kind))
    assert not np.array_equal(t, sample_timesteps(jax.random.key(8), 4096, kind))
    # A positive shift moves every t towards noise, and stays in (0, 1).
    ts = sample_timesteps(key, 4096, kind, mu=1.0)
    assert float(ts.min()) > 0.0 and float(ts.max()) < 1.0
    assert bool(jnp.all(ts >= t)) and float(jnp.mean(ts - t)) > 0.05


def test_logit_normal_is_centered_and_unknown_kind_errors():
    t = sample_timesteps(jax.random.key(0), 20000, "logit_normal")
    assert abs(float(jnp.median(t)) - 0.5) < 0.02
    with pytest.raises(ValueError, match="unknown timestep sampling"):
        sample_timesteps(jax.random.key(0), 4, "cosine")


def test_time_shift_endpoints():
    t = jnp.array([0.0, 1.0, 0.5])
    s = time_shift(t, 1.0)
    assert float(s[0]) == 0.0 and float(s[1]) == 1.0
    assert float(s[2]) == pytest.approx(np.e / (np.e + 1.0), rel=1e-6)
    np.testing.assert_allclose(time_shift(t, 0.0), t, atol=1e-7)


# ---------------------------------------------------------------------------------- schedule
def test_flux_schedule_endpoints_and_monotonic():
    for steps in (1, 2, 20, 50):
        for seq in (None, 256, 1024, 4096):
            s = flux_schedule(steps, seq)
            assert s.shape == (steps + 1,) and s.dtype == np.float32
            assert s[0] == 1.0 and s[-1] == 0.0
            assert np.all(np.diff(s) < 0), (steps, seq, s)
    # A bigger canvas spends longer near noise.
    assert np.all(flux_schedule(20, 4096)[1:-1] > flux_schedule(20, 256)[1:-1])
    with pytest.raises(ValueError, match="at least 1"):
        flux_schedule(0, 256)


@pytest.mark.parametrize("seq_len", [64, 256, 1024, 4096])
@pytest.mark.parametrize("steps", [1, 4, 28])
def test_flux_schedule_matches_diffusers(seq_len, steps):
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    # FLUX.1's scheduler config (black-forest-labs/FLUX.1-dev scheduler/scheduler_config.json).
    sched = FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
        base_image_seq_len=256, max_image_seq_len=4096,
    )
    mu = calculate_shift(seq_len, 256, 4096, 0.5, 1.15)
    assert flux_mu(seq_len) == pytest.approx(mu, rel=1e-12)
    sigmas = np.linspace(1.0, 1 / steps, steps)  # what FluxPipeline.__call__ passes
    sched.set_timesteps(sigmas=sigmas, mu=mu)
    want = sched.sigmas.numpy()
    np.testing.assert_allclose(flux_schedule(steps, seq_len), want, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(flux_schedule(steps, mu=mu), want, rtol=1e-6, atol=1e-7)


# ----------------------------------------------------------------------------------- sampler
@pytest.mark.parametrize("times", [
    flux_schedule(1, 1024),
    flux_schedule(7, 1024),
    flux_schedule(20, 4096),
    np.array([1.0, 0.9, 0.3, 0.29, 0.01, 0.0], np.float32),  # any decreasing schedule ending at 0
])
def test_euler_integrates_linear_flow_exactly(times):
    """For one data point x0 the exact velocity is v(x, t) = (x - x0) / t; an Euler step keeps
    (x - x0) ∝ t, so Euler from pure noise at t = 1 lands on x0 whatever the schedule."""
    x0, eps = _data(4)
    def velocity(x, t, step):
        return (x - x0) / t, step

    x, steps = jax.jit(lambda e: euler_sample(velocity, e, times))(eps)
    np.testing.assert_allclose(x, x0, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(steps, np.arange(len(times) - 1))  # aux stacked over steps


def test_euler_split_run_equals_one_run_and_matches_python_loop():
    """Running steps [0, k) then [k, T) equals one run of [0, T), and both match a Python loop."""
    rng = np.random.default_rng(5)
    w = jnp.asarray(rng.standard_normal((C, C)) * 0.3, jnp.float32)
    times = jnp.asarray(flux_schedule(6, 256))

    def velocity(x, t, step):
        return jnp.tanh(x @ w) * (1 + t), t

    x = jnp.asarray(rng.standard_normal((B, N, C)), jnp.float32)
    full, ts = euler_sample(velocity, x, times)
    mid, _ = euler_sample(velocity, x, times, 0, 2)
    rest, ts2 = euler_sample(velocity, mid, times, 2)
    np.testing.assert_allclose(rest, full, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(ts, times[:-1])
    np.testing.assert_allclose(ts2, times[2:-1])
    ref = x
    for i in range(6):
        ref = ref + (times[i + 1] - times[i]) * velocity(ref, times[i], i)[0]
    np.testing.assert_allclose(full, ref, rtol=1e-5, atol=1e-6)
