"""Training: sharded steps equal one device, exact resume, preemption, NaN stop, LoRA-only updates,
and the CLI on the tiny config."""

import dataclasses
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from pico_jax.model.flux import FluxConfig
from pico_jax.safetensors_io import CheckpointError
from pico_jax.trainer import NonFiniteLoss, TrainConfig, Trainer, apply_overrides, export_plan

ROOT = Path(__file__).resolve().parents[1]


def micro(**kw) -> TrainConfig:
    cfg = TrainConfig(
        model=FluxConfig(num_double=1, num_single=1, num_heads=2, head_dim=16, axes_dims_rope=(4, 6, 6),
                         in_channels=112, out_channels=48, context_dim=16, pooled_dim=16, guidance_embeds=False),
        panel=16, steps=6, batch_size=8, lr=1e-3, warmup_steps=2, log_every=1, checkpoint_every=3,
        sample_steps=2, augment=False, data={"kind": "procedural", "families": ["flip", "denoise", "edges", "recolor"]},
    )
    return dataclasses.replace(cfg, **kw)


def _flat(state):
    # copy: with buffer donation a zero-copy view would silently follow the update
    return {".".join(map(str, k)): np.array(v.get_value(), copy=True) for k, v in nnx.to_flat_state(state)}


def _device_batch(tr, host):
    """A host batch's panels as the Trainer shards them (over the run's data x fsdp devices)."""
    from pico_jax.parallel import batch_sharding

    return {k: jax.make_array_from_process_local_data(batch_sharding(tr.mesh, v.ndim), v)
            for k, v in host.items() if k in ("A", "A_out", "B", "B_out")}


def _one_step(cfg, devices=None):
    tr = Trainer(cfg, "/tmp/unused", progress=False, devices=devices)
    from pico_jax.trainer import make_data

    host = next(iter(make_data(cfg)))
    batch = _device_batch(tr, host)
    before = _flat(tr.trainable)
    trainable, _, _, m = tr.step_fn(tr.trainable, tr.frozen, tr.conditioning, tr.opt_state, tr.ema, batch, np.int32(1))  # step 1: warmup lr > 0
    return {k: float(v) for k, v in m.items()}, before, _flat(trainable)


def test_sharded_step_equals_single_device():
    m1, before1, after1 = _one_step(micro(mesh="data=1"), devices=jax.devices()[:1])
    changed = sum(not np.array_equal(after1[k], before1[k]) for k in after1)
    assert changed > 0.9 * len(after1)  # full fine-tuning updates (nearly) every parameter
    for mesh in ["data=8", "fsdp=8", "data=2,fsdp=4", "fsdp=4,tensor=2"]:
        m8, before8, after8 = _one_step(micro(mesh=mesh))
        assert m8["loss"] == pytest.approx(m1["loss"], rel=1e-5), mesh
        for k in after1:
            np.testing.assert_array_equal(before8[k], before1[k], err_msg=k)
            np.testing.assert_allclose(after8[k], after1[k], rtol=1e-4, atol=1e-6, err_msg=f"{mesh}: {k}")


@pytest.mark.parametrize("k, mesh", [(4, "data=1"), (2, "data=2,fsdp=2")])
def test_accumulated_micro_batches_equal_one_big_batch(k, mesh):
    """grad_accum_steps=k: the same loss, gradient norm and update as the whole batch at once (same
    draws; on a mesh each device splits its own share). Adam and clipping hide a gradient's scale
    in the update, so the norm is compared too."""
    devices = jax.devices()[:1] if mesh == "data=1" else jax.devices()[:4]
    m1, _, after1 = _one_step(micro(mesh="data=1"), devices=jax.devices()[:1])
    mk, _, afterk = _one_step(micro(mesh=mesh, grad_accum_steps=k), devices=devices)
    assert mk["loss"] == pytest.approx(m1["loss"], rel=1e-5)
    assert mk["grad_norm"] == pytest.approx(m1["grad_norm"], rel=1e-5)
    for name in after1:
        np.testing.assert_allclose(afterk[name], after1[name], rtol=1e-4, atol=1e-6, err_msg=name)


def test_accumulation_keeps_one_micro_batchs_activations():
    """Four micro-batches of 8 plan far fewer temporaries than one batch of 32 (XLA:CPU's plan:
    6.4 against 21.6 MiB here)."""
    temps = {}
    for k in (1, 4):
        cfg = micro(mesh="data=1", batch_size=32, grad_accum_steps=k)
        tr = Trainer(cfg, "/tmp/unused", progress=False, devices=jax.devices()[:1])
        from pico_jax.trainer import make_data

        batch = _device_batch(tr, next(iter(make_data(cfg))))
        lowered = tr.step_fn.lower(tr.trainable, tr.frozen, tr.conditioning, tr.opt_state, tr.ema, batch, np.int32(1))
        temps[k] = lowered.compile().memory_analysis().temp_size_in_bytes
    assert temps[4] < 0.5 * temps[1], temps


@pytest.mark.parametrize("k", [0, 3])
def test_grad_accum_steps_must_split_the_batch_evenly(k):
    with pytest.raises(ValueError, match=f"grad_accum_steps {k}"):
        Trainer(micro(mesh="data=1", grad_accum_steps=k), "/tmp/unused", progress=False, devices=jax.devices()[:1])


def test_data_threads_change_the_speed_not_the_batches():
    """More read threads (TrainConfig.data_threads) deliver the same batches in the same order,
    augmentation included, so a run resumes the same whatever it is set to; 0 is refused."""
    from pico_jax.trainer import make_data

    from pico_jax.data.input_pipeline import state_from_bytes, state_to_bytes

    data = lambda t: iter(make_data(micro(data_threads=t, augment=True), shard_index=0, shard_count=1))  # noqa: E731
    one, three = data(1), data(3)
    for _ in range(3):
        a, b = next(one), next(three)
        assert a.keys() == b.keys()
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])
    resumed = state_from_bytes(data(2), state_to_bytes(one))  # a checkpoint's position, another thread count
    a, b = next(resumed), next(three)
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])
    with pytest.raises(ValueError, match="data_threads must be >= 1"):
        Trainer(micro(data_threads=0), "/tmp/unused", progress=False, devices=jax.devices()[:1])


def test_data_workers_train_the_same_run_and_resume_with_any_count(tmp_path):
    """data_workers=2 (worker processes) trains on the batches of data_workers=0: 3 steps with
    workers, then 3 resumed without them, give the losses of 6 straight steps without, bit for
    bit. The data resumes at the batch of the restored step, so the count may change."""
    one = jax.devices()[:1]
    straight = Trainer(micro(mesh="data=1"), tmp_path / "a", progress=False, devices=one)
    straight.run()
    Trainer(micro(mesh="data=1", data_workers=2, steps=3), tmp_path / "b", progress=False, devices=one).run()
    resumed = Trainer(micro(mesh="data=1", data_threads=1), tmp_path / "b", progress=False, devices=one)
    assert resumed.run() == {"status": "finished", "step": 6}
    a, b = _metrics(tmp_path / "a"), _metrics(tmp_path / "b")
    assert [r["step"] for r in b] == [1, 2, 3, 4, 5, 6]
    for ra, rb in zip(a, b):
        assert ra["loss"] == rb["loss"], (ra, rb)
    with pytest.raises(ValueError, match="data_workers must be >= 0"):
        Trainer(micro(data_workers=-1), "/tmp/unused", progress=False, devices=one)


def test_a_checkpoint_whose_data_position_is_not_its_step_is_refused(tmp_path):
    """The data resumes at batch `step`; a checkpoint recording another position (a corrupt file,
    or a writer that read batches differently) is refused by name, and a checkpoint from before
    the position was recorded (grain's threads-only state, in examples) is checked the same way."""
    from pico_jax.trainer import check_data_position

    check_data_position({"batches_read": 4}, 4, 8, "ckpt")
    check_data_position({"iterator": '{"next_index": 32}'}, 4, 8, "ckpt")  # before: 4 batches of 8
    check_data_position({"iterator": '{"iterators_in_use_states": []}'}, 4, 8, "ckpt")  # no position in it
    with pytest.raises(CheckpointError, match=r"ckpt: saved at step 4 with its data stream at batch 5,"):
        check_data_position({"batches_read": 5}, 4, 8, "ckpt")
    with pytest.raises(CheckpointError, match=r"ckpt: saved at step 4 with its data stream at batch 4.5,"):
        check_data_position({"iterator": '{"next_index": 36}'}, 4, 8, "ckpt")


def test_profile_traces_exactly_the_asked_steps(tmp_path):
    """profile_start_step=2, profile_steps=2: one jax.profiler trace in DIR/profile whose step
    annotations are steps 2 and 3, and the run goes on to the end."""
    import gzip

    out = Trainer(micro(mesh="data=1", steps=5, profile_start_step=2, profile_steps=2), tmp_path, progress=False,
                  devices=jax.devices()[:1]).run()
    assert out == {"status": "finished", "step": 5}
    (trace,) = (tmp_path / "profile").rglob("*.trace.json.gz")
    assert list((tmp_path / "profile").rglob("*.xplane.pb"))
    events = json.load(gzip.open(trace))["traceEvents"]
    assert sorted(int(e["args"]["step_num"]) for e in events if e.get("name") == "train") == [2, 3]
    with pytest.raises(ValueError, match="profile_steps must be >= 1"):
        Trainer(micro(mesh="data=1", profile_start_step=2, profile_steps=0), tmp_path / "x", progress=False,
                devices=jax.devices()[:1])


def test_step_flops_are_a_forward_and_its_backward_and_every_log_row_has_the_rate(tmp_path):
    """Full fine-tuning with remat "none" counts ~3 forwards (forward, and the backward's two
    products per forward product; the input's own gradient is not needed); remat "full" adds the
    blocks' forward once more, which the model count (recompute=False) leaves out again. The CPU's
    head-by-head kernel, like a flash kernel, recomputes each attention's logits in its backward:
    the device count has exactly that one (N, N) product per attention layer more than the model
    count. Each metrics row's TFLOP/s per device are the step's counts at its rate."""
    from pico_jax.flops import program_flops
    from pico_jax.trainer import make_data

    counts, model_counts = {}, {}
    for remat in ("none", "full"):
        tr = Trainer(micro(mesh="data=1", remat=remat, steps=3, peak_tflops_per_device=2.5), tmp_path / remat,
                     progress=False, devices=jax.devices()[:1])
        batch = _device_batch(tr, next(iter(make_data(tr.cfg))))
        counts[remat], model_counts[remat] = tr.step_flops(batch), tr.step_flops(batch, recompute=False)
    assert model_counts["full"] == model_counts["none"]  # remat "full", counted without it
    assert tr.step_flops(batch) == counts["full"]  # and no trace without remat left in JAX's caches
    model, b, c = nnx.merge(tr.graphdef, tr.trainable, tr.frozen), tr.cfg.batch_size, tr.cfg.model
    n, t = tr.layout.num_tokens, tr.text.prompt_embeds.shape[1]
    logits = 2.0 * b * c.num_heads * (n + t) ** 2 * c.head_dim  # one layer's QKᵀ
    assert counts["none"] - model_counts["none"] == (c.num_double + c.num_single) * logits
    forward = program_flops(lambda x, ctx: model(x, ctx, jnp.zeros((b, c.pooled_dim)), jnp.zeros(b),
                                                 jnp.asarray(tr.layout.img_ids()), jnp.zeros((t, 3)), None),
                            jnp.zeros((b, n, c.in_channels)), jnp.zeros((b, t, c.context_dim)))
    assert 2.8 * forward < model_counts["none"] < 3.0 * forward, (model_counts, forward)  # 2.90 here
    assert 0.7 * forward < counts["full"] - counts["none"] < forward, (counts, forward)  # 0.86: the blocks
    tr.run()
    rows = _metrics(tmp_path / "full")
    assert len(rows) == 3
    for row in rows:
        assert row["tflops_per_sec_per_device"] == pytest.approx(row["steps_per_sec"] * counts["full"] / 1e12, rel=1e-6)
        assert row["model_tflops_per_sec_per_device"] == pytest.approx(row["steps_per_sec"] * model_counts["full"] / 1e12,
                                                                        rel=1e-6)
        assert row["mfu"] == pytest.approx(row["model_tflops_per_sec_per_device"] / 2.5, rel=1e-9)


def test_mfu_is_logged_only_against_a_known_or_given_peak():
    """The peak comes from peak_tflops_per_device, else the device kind's table entry for a 16-bit
    compute dtype; a CPU has none, so its rows carry no "mfu"."""
    from pico_jax.parallel import make_mesh
    from pico_jax.trainer import device_peak_tflops

    mesh = make_mesh("data=1", jax.devices()[:1])
    assert device_peak_tflops(micro(dtype="bfloat16"), mesh) is None  # jax.devices() are CPUs here
    assert device_peak_tflops(micro(peak_tflops_per_device=312), mesh) == 312.0
    with pytest.raises(ValueError, match="peak_tflops_per_device must be > 0"):
        device_peak_tflops(micro(peak_tflops_per_device=-1), mesh)


def test_counting_flops_does_not_change_the_attention_the_step_runs(monkeypatch):
    """The model count (step_flops(recompute=False)) traces the step with attention forced to XLA's;
    nothing of that trace may be reused by the step's own trace (a cached inner trace would run
    XLA's attention silently), nor the other way round: the CPU's head-by-head kernel runs in the
    real trace, before and after."""
    from pico_jax.model import attention
    from pico_jax.trainer import make_data

    calls = []
    real = attention.headwise_attention
    monkeypatch.setattr(attention, "headwise_attention", lambda *a: calls.append(1) or real(*a))
    tr = Trainer(micro(mesh="data=1"), "/tmp/unused", progress=False, devices=jax.devices()[:1])
    batch = _device_batch(tr, next(iter(make_data(tr.cfg))))
    args = (tr.trainable, tr.frozen, tr.conditioning, tr.opt_state, tr.ema, batch, jnp.int32(0))
    first = tr.step_flops(batch, recompute=False)
    assert not calls
    jax.make_jaxpr(tr._step_body)(*args)
    assert calls
    n = len(calls)
    assert tr.step_flops(batch, recompute=False) == first and len(calls) == n
    jax.make_jaxpr(tr._step_body)(*args)
    assert len(calls) == 2 * n


def test_each_process_of_a_multi_host_run_profiles_into_its_own_folder(tmp_path, monkeypatch):
    """jax.profiler names its files by host, so two processes on one host would write the same file."""
    from pico_jax.profiling import StepProfiler

    assert StepProfiler(tmp_path, 2, 3).directory == tmp_path
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    monkeypatch.setattr(jax, "process_index", lambda: 1)
    profiler = StepProfiler(tmp_path, 2, 3)
    assert profiler.directory == tmp_path / "process_1" and (profiler.start, profiler.end) == (2, 5)


def test_optimizer_state_is_sharded_like_the_params_and_one_program_serves_every_step():
    """Adam's moments live where their parameters do (over 'fsdp' each device holds its share, not a
    replica), and the state leaves a step laid out as it came in, so the second step runs the first
    step's executable instead of compiling again."""
    import optax

    tr = Trainer(micro(mesh="fsdp=8", ema_decay=0.5), "/tmp/unused", progress=False)
    spec_of = lambda tree: [x.sharding.spec for x in jax.tree.leaves(tree)]
    params = spec_of(tr.trainable)
    assert any(any(a is not None for a in s) for s in params)  # the case that matters: some are split
    same = jax.tree.leaves(optax.tree_map_params(tr.tx, lambda m, p: m.sharding == p.sharding, tr.opt_state,
                                                 tr.trainable, transform_non_params=lambda _: None))
    assert len(same) == 2 * len(params) and all(same)  # Adam's mu and nu, each where its parameter is
    from pico_jax.trainer import make_data

    it = iter(make_data(tr.cfg))
    before = (spec_of(tr.trainable), spec_of(tr.opt_state), spec_of(tr.ema))
    state = (tr.trainable, tr.opt_state, tr.ema)
    for step in (0, 1):
        batch = _device_batch(tr, next(it))
        trainable, opt_state, ema, _ = tr.step_fn(state[0], tr.frozen, tr.conditioning, state[1], state[2], batch, np.int32(step))
        state = (trainable, opt_state, ema)
        assert (spec_of(trainable), spec_of(opt_state), spec_of(ema)) == before
    assert tr.step_fn.__wrapped__._cache_size() == 1


def test_sample_sheets_compile_the_sampler_once_and_paint_with_the_current_weights(tmp_path):
    """save_samples keeps one pipeline for the run and gives it the weights of the moment: its
    sampler compiles once (a new Pipeline per sheet compiled it per sheet), and each sheet is
    what a fresh pipeline over the current weights paints."""
    from pico_jax.imageio import load_image
    from pico_jax.pipeline import SamplingPlan
    from pico_jax.trainer import make_data

    tr = Trainer(micro(mesh="fsdp=8", ema_decay=0.5, steps=2, sample_every=1, checkpoint_every=100), tmp_path, progress=False)
    tr.run()
    (pipe,) = tr._sample_pipelines.values()
    # three sheets (steps 1, 2 and the end), one program: the default gather (auto) compiled the
    # per-call sampler once to read its plan, and that compiled program, which cannot recompile,
    # painted every sheet
    (fitted,) = pipe.fitted.values()
    assert list(fitted.tried) == [(None, "per_call")] and len(pipe._compiled) == len(pipe._programs) == 1
    sheets = sorted((tmp_path / "samples").glob("step_*.png"))
    assert len(sheets) == 2  # step 2 is also the end: rewritten, not a third file
    host = next(iter(make_data(tr.cfg)))
    fresh = tr.pipeline(SamplingPlan(steps=tr.cfg.sample_steps, seeds=1, keep=1, selection="random", mu=0.0),
                        batch_size=4)
    from pico_jax import grid

    a, a2, b = (np.asarray(host[k][:4]) * 0.5 + 0.5 for k in ("A", "A_out", "B"))
    res = fresh.run_canvases([grid.compose(a[i], a2[i], b[i], panel=tr.cfg.panel) for i in range(len(a))], fresh.plan)
    P = tr.cfg.panel
    got = load_image(sheets[-1])[:, 3 * P:4 * P]  # the 'ours' column of the last sheet
    want = np.concatenate([r.image for r in res], 0)
    np.testing.assert_allclose(got, want, atol=1.5 / 255)

    with pytest.raises(ValueError, match="not the same model"):
        pipe.update_weights(Trainer(micro(lora_rank=4), tmp_path / "other", progress=False).model())


def test_a_diffusers_autoencoder_trains_and_its_weights_are_arguments_not_constants(tmp_path):
    """The latent path of training (a diffusers AutoencoderKL on disk) runs, and the step takes the
    autoencoder's weights as an argument: closed over, jax bakes them into the program as constants
    (the FLUX VAE's encoder: 131 MiB of StableHLO text, and a slower compile)."""
    import re

    import diffusers  # the test extra's
    vae = diffusers.AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                                  up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(32, 64),
                                  layers_per_block=1, latent_channels=4, norm_num_groups=8)
    vae.save_pretrained(tmp_path / "vae", safe_serialization=True)
    model = dataclasses.replace(micro().model, in_channels=2 * 4 * 4 + 4 * 2**2, out_channels=4 * 4)
    cfg = micro(model=model, mesh="fsdp=8", autoencoder={"kind": "diffusers", "root": str(tmp_path), "path": "vae"})
    tr = Trainer(cfg, tmp_path / "run", progress=False)
    from pico_jax.trainer import make_data

    host = next(iter(make_data(cfg)))
    batch = _device_batch(tr, host)
    args = (tr.trainable, tr.frozen, tr.conditioning, tr.opt_state, tr.ema, batch, np.int32(1))
    program = tr.step_fn.lower(*args).as_text()
    weight_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tr.conditioning[0]))
    constant_bytes = sum(len(h) // 2 for h in re.findall(r'dense<"0x([0-9A-F]+)">', program))
    assert weight_bytes > 100_000 and constant_bytes < weight_bytes / 10, (weight_bytes, constant_bytes)
    _, _, _, m = tr.step_fn(*args)
    assert np.isfinite(float(m["loss"]))


def test_lora_step_changes_only_lora_params():
    cfg = micro(lora_rank=4, mesh="fsdp=8")
    tr = Trainer(cfg, "/tmp/unused", progress=False)
    frozen_before = _flat(tr.frozen)
    lora_keys = set(_flat(tr.trainable))
    assert lora_keys and all(k.endswith(("lora_a", "lora_b")) for k in lora_keys)
    from pico_jax.trainer import make_data

    host = next(iter(make_data(cfg)))
    batch = _device_batch(tr, host)
    before = _flat(tr.trainable)
    trainable, opt_state, _, m = tr.step_fn(tr.trainable, tr.frozen, tr.conditioning, tr.opt_state, tr.ema, batch, np.int32(1))
    after = _flat(trainable)
    assert any(not np.array_equal(after[k], before[k]) for k in after)
    for k, v in _flat(tr.frozen).items():
        np.testing.assert_array_equal(v, frozen_before[k], err_msg=k)  # the base never moves
    # optimizer state exists only for LoRA parameters
    n_opt = sum(x.size for x in jax.tree.leaves(opt_state) if hasattr(x, "size") and x.ndim > 0)
    n_lora = sum(v.size for v in after.values())
    assert n_opt == 2 * n_lora  # Adam's mu and nu


def _two_lora_steps(cfg):
    """A's values before and after two steps (B is zero at first, so A's gradient is zero in the first)."""
    tr = Trainer(cfg, "/tmp/unused", progress=False)
    from pico_jax.trainer import make_data

    data = iter(make_data(cfg))
    a_of = lambda trainable: {k: v.astype(np.float32) for k, v in _flat(trainable).items() if k.endswith("lora_a")}
    before = a_of(tr.trainable)
    state = (tr.trainable, tr.opt_state, tr.ema)
    for step in (1, 2):
        host = next(data)
        batch = _device_batch(tr, host)
        trainable, opt_state, ema, _ = tr.step_fn(state[0], tr.frozen, tr.conditioning, state[1], state[2], batch, np.int32(step))
        state = (trainable, opt_state, ema)
    return tr, state, before, a_of(state[0])


def test_lora_factors_are_fp32_master_weights_on_a_bf16_base():
    """On a bf16 base the factors, their gradients and Adam's moments are fp32 (master_dtype's
    default), so AdamW's small steps are kept: at lr 1e-5 every element of A moves in the second
    step. With bf16 factors (master_dtype="bfloat16") the same steps round away."""
    cfg = micro(lora_rank=4, dtype="bfloat16", lr=1e-5, warmup_steps=1)
    tr, (trainable, opt_state, _), before, after = _two_lora_steps(cfg)
    assert {x.dtype for x in jax.tree.leaves(tr.frozen)} == {np.dtype(jnp.bfloat16)}
    assert {x.dtype for x in jax.tree.leaves(trainable)} == {np.dtype(np.float32)}
    assert {x.dtype for x in jax.tree.leaves(opt_state) if x.ndim > 0} == {np.dtype(np.float32)}
    moved = np.mean([np.mean(after[k] != before[k]) for k in after])
    assert moved > 0.99, moved
    *_, before16, after16 = _two_lora_steps(dataclasses.replace(cfg, master_dtype="bfloat16"))
    moved16 = np.mean([np.mean(after16[k] != before16[k]) for k in after16])
    assert moved16 < 0.5, moved16


def test_full_fine_tuning_in_bf16_trains_fp32_master_weights(tmp_path):
    """With lora_rank 0 every parameter is trained, so every parameter is fp32 (master_dtype) and the
    layers compute in bf16 (dtype): the model's output is bf16, the run trains and exports."""
    tr = Trainer(micro(dtype="bfloat16", steps=2), tmp_path, progress=False)
    assert {x.dtype for x in jax.tree.leaves((tr.trainable, tr.opt_state)) if x.ndim} == {np.dtype(np.float32)}
    assert jax.tree.leaves(tr.frozen) == []
    assert tr.run() == {"status": "finished", "step": 2}
    assert all(np.isfinite(r["loss"]) for r in _metrics(tmp_path))
    m = tr.model()
    n, t, cfg = 8, 1, m.config
    out = m(jnp.zeros((1, n, cfg.in_channels), jnp.bfloat16), jnp.zeros((1, t, cfg.context_dim), jnp.bfloat16),
            jnp.zeros((1, cfg.pooled_dim), jnp.bfloat16), jnp.ones((1,)), jnp.zeros((n, 3)), jnp.zeros((t, 3)))
    assert out.dtype == jnp.bfloat16


def test_a_run_with_bf16_factors_resumes_with_fp32_ones(tmp_path):
    """Checkpoints written before master_dtype existed hold bf16 factors on a bf16 base; orbax casts
    them to the fp32 target as it reads them, moments too, and the run goes on."""
    cfg = micro(lora_rank=4, dtype="bfloat16", steps=3, master_dtype="bfloat16")
    Trainer(cfg, tmp_path, progress=False).run()
    tr = Trainer(dataclasses.replace(cfg, steps=5, master_dtype="float32"), tmp_path, progress=False)
    assert tr.run() == {"status": "finished", "step": 5}
    assert {x.dtype for x in jax.tree.leaves((tr.trainable, tr.opt_state)) if x.ndim} == {np.dtype(np.float32)}


def test_a_bad_dtype_names_its_config_key():
    with pytest.raises(ValueError, match="master_dtype: expected one of float32, bfloat16, float16 \\(got 'fp8'\\)"):
        Trainer(micro(lora_rank=4, master_dtype="fp8"), "/tmp/unused", progress=False)
    with pytest.raises(ValueError, match="^dtype: expected one of"):
        Trainer(micro(dtype="half"), "/tmp/unused", progress=False)


def _metrics(workdir):
    return [json.loads(l) for l in (Path(workdir) / "metrics.jsonl").read_text().splitlines()]


def test_first_within_takes_the_least_recomputation_that_fits():
    from pico_jax.memory import first_within
    from pico_jax.trainer import REMAT_AUTO_ORDER

    choose = lambda plans, budget: first_within(REMAT_AUTO_ORDER, plans, budget)
    plans = {"none": 100, "dots": 60, "full": 30}
    assert [choose(plans, b) for b in (100, 99, 60, 59, 30, 29)] == ["none", "dots", "dots", "full", "full", None]
    assert choose({"none": None, "dots": 60}, 1000) == "dots"  # an unknown plan never fits
    assert choose({}, 1000) is None


def test_first_that_fits_stops_at_the_first_fit_else_takes_the_least():
    from types import SimpleNamespace

    from pico_jax.memory import first_that_fits

    def fake(planned):  # a compiled program whose plan is `planned` bytes (None: not reported)
        if planned is None:
            return SimpleNamespace(memory_analysis=lambda: None)
        return SimpleNamespace(memory_analysis=lambda: SimpleNamespace(
            argument_size_in_bytes=planned, output_size_in_bytes=0, alias_size_in_bytes=0, temp_size_in_bytes=0,
            generated_code_size_in_bytes=0))

    compiled = []
    compile_one = lambda plans: lambda c: compiled.append(c) or fake(plans[c])
    plans = {"a": 100, "b": 60, "c": 30}
    assert first_that_fits("abc", compile_one(plans), 60)[::2] == ("b", {"a": 100, "b": 60}) and compiled == ["a", "b"]
    choice, program, tried, fits = first_that_fits("abc", compile_one({"a": 50, "b": 40, "c": 45}), 10)
    assert (choice, fits, tried) == ("b", False, {"a": 50, "b": 40, "c": 45})
    assert program.memory_analysis().argument_size_in_bytes == 40
    assert first_that_fits("abc", compile_one({"a": None, "b": None, "c": None}), 1e9)[0] == "c"  # unknown: the last
    assert first_that_fits("abc", compile_one({"a": 70, "b": None, "c": None}), 10)[0] == "a"  # the least known


def test_bytes_per_device_counts_each_device_s_shards():
    from pico_jax.memory import bytes_per_device
    from pico_jax.parallel import make_mesh

    mesh = make_mesh("data=2,fsdp=4")
    split = jax.device_put(jnp.zeros((8, 16), jnp.float32), jax.NamedSharding(mesh, jax.P("fsdp")))  # 2 rows each
    whole = jax.device_put(jnp.zeros((3,), jnp.bfloat16), jax.NamedSharding(mesh, jax.P()))
    one = jax.device_put(jnp.zeros((5,), jnp.float32), jax.devices()[1])
    assert bytes_per_device(split) == 2 * 16 * 4 and bytes_per_device(whole) == 3 * 2
    assert bytes_per_device({"a": split, "b": [whole, None]}) == 128 + 6
    assert bytes_per_device((split, one)) == 128 + 20  # device 1 holds a shard of split and all of one
    assert bytes_per_device(None) == 0


def test_sample_sheets_plan_against_the_memory_less_the_training_state_beside_them():
    """Trainer.pipeline's sampler fits its gather (auto, the default) to the device's memory less
    the optimizer state and the weights it does not sample; on fsdp=8 with room it gathers per call."""
    from pico_jax.memory import GiB, bytes_per_device

    tr = Trainer(micro(mesh="fsdp=8", ema_decay=0.9, device_memory_gib=2.0), "/tmp/unused", progress=False)
    assert tr.cfg.sample_gather_weights == "auto"
    beside_ema = bytes_per_device((tr.opt_state, tr.trainable))  # sampling the EMA: the live weights are beside it
    assert beside_ema > bytes_per_device(tr.opt_state) > 0
    assert tr.sampler_memory_gib() * GiB == pytest.approx(2 * GiB - beside_ema)
    assert tr.sampler_memory_gib(use_ema=False) * GiB == pytest.approx(2 * GiB - bytes_per_device((tr.opt_state, tr.ema)))
    from pico_jax.pipeline import SamplingPlan

    plan = SamplingPlan(steps=2, seeds=1, keep=1, selection="random")
    pipe = tr.pipeline(plan, batch_size=8)
    assert pipe.device_memory_gib == tr.sampler_memory_gib()
    rng = np.random.default_rng(0)
    a, a_out, q = [rng.random((16, 16, 3)).astype(np.float32) for _ in range(3)]
    pipe(a, a_out, [q])
    assert pipe.fitted[plan].gather_weights == "per_call"


def _deep(**kw) -> TrainConfig:
    """Eight layers at batch 8 on 256 tokens: activations outweigh the weights, so remat saves memory."""
    cfg = micro(mesh="data=1", panel=32, **kw)
    cfg.model = dataclasses.replace(cfg.model, num_double=2, num_single=6)
    return cfg


def test_remat_auto_runs_the_least_recomputation_that_fits_the_memory(tmp_path):
    """remat="auto" compiles the step with remat none, dots, full in turn and runs the first whose
    XLA plan fits the budget: the same program as that policy named (the same losses, bit for bit,
    and FLOP count), recorded in config.json. With nothing fitting it warns and runs the smallest."""
    from pico_jax.memory import HEADROOM, GiB
    from pico_jax.trainer import make_data

    one = jax.devices()[:1]
    probe = Trainer(_deep(remat="auto", device_memory_gib=1e-6), tmp_path / "probe", progress=False, devices=one)
    batch = _device_batch(probe, next(iter(make_data(probe.cfg))))
    with pytest.warns(UserWarning, match="no policy's step fits .* running 'full', the smallest"):
        assert probe.resolve_remat(batch) == "full"
    plans = probe.remat_plans
    assert list(plans) == ["none", "dots", "full"] and plans["none"] > plans["dots"] > plans["full"], plans

    between = (plans["dots"] + plans["none"]) / 2 / HEADROOM / GiB  # dots fits, none does not
    auto = Trainer(_deep(remat="auto", device_memory_gib=between, steps=3), tmp_path / "auto", progress=False,
                   devices=one)
    assert auto.remat is None and auto.run()["status"] == "finished"
    assert auto.remat == "dots" and list(auto.remat_plans) == ["none", "dots"]  # full never compiled
    assert auto.remat_plans == {p: plans[p] for p in ("none", "dots")}
    named = Trainer(_deep(remat="dots", steps=3), tmp_path / "dots", progress=False, devices=one)
    named.run()
    assert [r["loss"] for r in _metrics(tmp_path / "auto")] == [r["loss"] for r in _metrics(tmp_path / "dots")]
    assert auto.step_flops(batch) == named.step_flops(batch) != probe.step_flops(batch)
    report = json.loads((tmp_path / "auto" / "config.json").read_text())["remat_auto"]
    assert report["chosen"] == "dots"
    assert report["planned_bytes_per_device"] == {p: plans[p] for p in ("none", "dots")}
    assert report["budget_bytes_per_device"] == pytest.approx(between * GiB * HEADROOM)
    assert json.loads((tmp_path / "auto" / "config.json").read_text())["remat"] == "auto"


def test_remat_and_device_memory_are_checked_before_anything_is_built():
    with pytest.raises(ValueError, match="remat: expected one of none, dots, full, nothing or auto \\(got 'ful'\\)"):
        Trainer(micro(remat="ful"), "/tmp/unused", progress=False)
    with pytest.raises(ValueError, match="device_memory_gib must be > 0"):
        Trainer(micro(remat="auto", device_memory_gib=-1.0), "/tmp/unused", progress=False)


def test_device_memory_limit_from_the_allocator_or_the_host():
    from pico_jax.memory import device_memory_limit, host_memory_bytes

    class Device:
        def __init__(self, stats):
            self.stats = stats

        def memory_stats(self):
            if isinstance(self.stats, Exception):
                raise self.stats
            return self.stats

    host = host_memory_bytes()
    assert host and host > 2**30
    assert device_memory_limit(Device({"bytes_limit": 60 * 2**30, "bytes_in_use": 5})) == 60 * 2**30
    assert device_memory_limit(Device(None), local_devices=8) == host // 8  # a CPU device reports none
    assert device_memory_limit(Device(RuntimeError("unsupported")), local_devices=2) == host // 2
    assert device_memory_limit(jax.devices()[0], local_devices=8) == host // 8


def test_trainer_pipeline_runs_on_the_training_mesh():
    """Trainer.pipeline samples over the run's mesh (the batch rounded up to data x fsdp) and paints what
    one device paints with the same weights."""
    from pico_jax.pipeline import Pipeline, SamplingPlan

    tr = Trainer(micro(mesh="fsdp=8"), "/tmp/unused", progress=False)
    plan = SamplingPlan(steps=2, seeds=3, keep=1, selection="full")
    on_mesh = tr.pipeline(plan, batch_size=3)
    assert on_mesh.mesh is tr.mesh and on_mesh.batch_size == 8
    model = tr.model()
    graphdef, state = nnx.split(model)
    alone = Pipeline(nnx.merge(graphdef, jax.device_get(state)), tr.ae, tr.text, tr.cfg.panel, batch_size=3, plan=plan,
                     query_hint=tr.cfg.query_hint, prediction=tr.cfg.prediction)
    rng = np.random.default_rng(0)
    a, a_out, *queries = [rng.random((16, 16, 3)).astype(np.float32) for _ in range(5)]
    for w, g in zip(alone(a, a_out, queries), on_mesh(a, a_out, queries)):
        np.testing.assert_allclose(g.image, w.image, rtol=1e-5, atol=1e-5)
        assert g.chosen_seed == w.chosen_seed
    # The default (auto) gathered the whole model once per sheet, which fits here; at every model
    # call instead: the same images.
    assert on_mesh.fitted[plan].gather_weights == "per_call"
    tr.cfg = dataclasses.replace(tr.cfg, sample_gather_weights="per_layer")
    per_layer = tr.pipeline(plan, batch_size=3)
    assert per_layer.gather_weights == "per_layer"
    for w, g in zip(alone(a, a_out, queries), per_layer(a, a_out, queries)):
        np.testing.assert_allclose(g.image, w.image, rtol=1e-5, atol=1e-5)


def test_resume_is_exact(tmp_path):
    straight = Trainer(micro(mesh="fsdp=8", ema_decay=0.9), tmp_path / "a", progress=False)
    straight.run()
    first = Trainer(micro(mesh="fsdp=8", ema_decay=0.9, steps=3), tmp_path / "b", progress=False)
    assert first.run() == {"status": "finished", "step": 3}
    second = Trainer(micro(mesh="fsdp=8", ema_decay=0.9, steps=6), tmp_path / "b", progress=False)
    assert second.run() == {"status": "finished", "step": 6}
    a, b = _metrics(tmp_path / "a"), _metrics(tmp_path / "b")
    assert [r["step"] for r in b] == [1, 2, 3, 4, 5, 6]
    for ra, rb in zip(a, b):
        assert ra["loss"] == rb["loss"] and ra["grad_norm"] == rb["grad_norm"], (ra, rb)
    for k, v in _flat(straight.trainable).items():
        np.testing.assert_array_equal(v, _flat(second.trainable)[k], err_msg=k)
    # The restored optimizer state is laid out as a fresh one (Adam's moments on their parameters'
    # shards), so the resumed run's three steps ran one compiled program.
    import optax

    same = jax.tree.leaves(optax.tree_map_params(second.tx, lambda m, p: m.sharding == p.sharding, second.opt_state,
                                                 second.trainable, transform_non_params=lambda _: None))
    assert same and all(same)
    assert second.step_fn.__wrapped__._cache_size() == 1

    # A checkpoint from before the head-grouped layout (no 'param_layout' recorded) is refused, not
    # resumed with its fused columns permuted.
    (data,) = [f for f in (tmp_path / "b" / "checkpoints" / "6").rglob("*") if f.is_file() and b'"param_layout"' in f.read_bytes()]
    old = json.loads(data.read_text())
    del old["param_layout"]
    data.write_text(json.dumps(old))
    with pytest.raises(CheckpointError, match="'bfl-columns' parameter layout"):
        Trainer(micro(mesh="fsdp=8", ema_decay=0.9, steps=7), tmp_path / "b", progress=False).run()


def test_resume_on_another_mesh_continues_the_same_run(tmp_path):
    """A run checkpointed on fsdp=8 resumes on data=2,fsdp=2,tensor=2 (a preempted job restarted on
    another slice): the state is resharded as it is read, the optimizer's moments land on the new
    mesh's shards, and the losses follow the uninterrupted run's."""
    import optax

    straight = Trainer(micro(mesh="fsdp=8", ema_decay=0.9), tmp_path / "a", progress=False)
    straight.run()
    Trainer(micro(mesh="fsdp=8", ema_decay=0.9, steps=3), tmp_path / "b", progress=False).run()
    moved = Trainer(micro(mesh="data=2,fsdp=2,tensor=2", ema_decay=0.9), tmp_path / "b", progress=False)
    assert moved.run() == {"status": "finished", "step": 6}
    assert any("tensor" in x.sharding.spec for x in jax.tree.leaves(moved.opt_state))
    same = jax.tree.leaves(optax.tree_map_params(moved.tx, lambda m, p: m.sharding == p.sharding, moved.opt_state,
                                                 moved.trainable, transform_non_params=lambda _: None))
    assert same and all(same)
    for ra, rb in zip(_metrics(tmp_path / "a"), _metrics(tmp_path / "b")):
        assert ra["step"] == rb["step"] and abs(ra["loss"] - rb["loss"]) < 1e-5 * abs(ra["loss"]), (ra, rb)


def test_sigterm_saves_a_resumable_checkpoint(tmp_path):
    cfg = micro(mesh="fsdp=8", steps=10_000, checkpoint_every=10_000)
    tr = Trainer(cfg, tmp_path, progress=False)
    original = tr.step_fn

    def step_then_signal(*a):  # deliver SIGTERM from inside the loop, after the 4th step
        out = original(*a)
        if int(a[-1]) == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        return out

    tr.step_fn = step_then_signal
    result = tr.run()
    assert result["status"] == "preempted" and 4 <= result["step"] <= 5
    resumed = Trainer(dataclasses.replace(cfg, steps=result["step"] + 2), tmp_path, progress=False)
    assert resumed.run() == {"status": "finished", "step": result["step"] + 2}
    assert [r["step"] for r in _metrics(tmp_path)][-2:] == [result["step"] + 1, result["step"] + 2]


@pytest.mark.parametrize("nan_at, good", [(5, 3), (7, 6)])
def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path, nan_at, good):
    """The loop reads each step's loss after dispatching the next, but before any checkpoint: a NaN
    in the step that ends on a checkpoint (5 → 6) or in the last step (7) is never saved."""
    cfg = micro(mesh="fsdp=8", steps=8, checkpoint_every=3, inject_nan_at_step=nan_at)
    with pytest.raises(NonFiniteLoss, match=f"step {nan_at}.*last good checkpoint \\(step {good}\\)"):
        Trainer(cfg, tmp_path, progress=False).run()
    ckpts = sorted(p.name for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
    assert ckpts == [str(s) for s in range(3, good + 1, 3)]
    # The checkpoint is intact: a run without the injected NaN resumes from it and finishes.
    assert Trainer(dataclasses.replace(cfg, inject_nan_at_step=-1), tmp_path, progress=False).run()["step"] == 8


def test_overrides_and_errors():
    cfg = apply_overrides(micro(), {"model.head_dim": "32", "model.axes_dims_rope": "[8, 12, 12]", "lr": "0.5"})
    assert cfg.model.head_dim == 32 and cfg.model.axes_dims_rope == (8, 12, 12) and cfg.lr == 0.5
    with pytest.raises(ValueError, match="unknown config key 'nope'"):
        apply_overrides(micro(), {"nope": "1"})
    with pytest.raises(ValueError, match="lr: cannot read 'fast'"):
        apply_overrides(micro(), {"lr": "fast"})
    with pytest.raises(ValueError, match="divisible by data×fsdp"):
        Trainer(micro(mesh="data=8", batch_size=4), "/tmp/unused", progress=False)
    with pytest.raises(ValueError, match="sample_gather_weights 'once': one of auto, per_layer, per_call"):
        Trainer(micro(sample_gather_weights="once"), "/tmp/unused", progress=False)
    with pytest.raises(ValueError, match="export_sampling: unknown key 'step'"):
        Trainer(micro(export_sampling={"step": 12}), "/tmp/unused", progress=False)
    with pytest.raises(ValueError, match="export_sampling.scorer: unknown key 'signl'"):
        export_plan(micro(export_sampling={"scorer": {"signl": "consensus"}}))
    with pytest.raises(ValueError, match="export_sampling: .*cannot keep 3 of 2"):
        export_plan(micro(export_sampling={"seeds": 2, "keep": 3}))
    with pytest.raises(ValueError, match="export_sampling: .*unknown scorer weights"):
        export_plan(micro(export_sampling={"scorer": {"weights": "nope"}}))
    plan = export_plan(micro(sample_steps=7, export_sampling={"scorer": {"signal": "consensus", "layers": [0, -1]}}))
    assert plan.steps == 7 and plan.mu == 0.0 and plan.scorer.signal == "consensus" and plan.scorer.layers == (0, -1)
    wrong = micro(mesh="fsdp=8")
    wrong.model = dataclasses.replace(wrong.model, in_channels=100)
    with pytest.raises(ValueError, match="takes 100 input channels.*needs 112"):
        Trainer(wrong, "/tmp/unused", progress=False)


def test_cli_tiny_config_loss_goes_down(tmp_path):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1")
    out = subprocess.run([sys.executable, str(ROOT / "train.py"), "--config", str(ROOT / "configs/tiny.py"),
                          "--workdir", str(tmp_path), "--no-progress", "--export", str(tmp_path / "export"),
                          "--set", "query_hint=true", "--grad-accum-steps", "2",
                          "--set", 'export_sampling={"steps": 3, "seeds": 2, "scorer": {"signal": "consensus"}}'],
                         capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = _metrics(tmp_path)
    first, last = np.mean([r["loss"] for r in rows[:2]]), np.mean([r["loss"] for r in rows[-2:]])
    assert last < 0.8 * first, (first, last)
    assert list((tmp_path / "samples").glob("step_*.png"))
    meta = json.loads((tmp_path / "export" / "pico.json").read_text())
    assert meta["query_hint"] is True
    assert meta["sampling"]["steps"] == 3 and meta["sampling"]["seeds"] == 2
    assert meta["sampling"]["scorer"]["signal"] == "consensus" and meta["sampling"]["mu"] == 0.0
    assert list((tmp_path / "tensorboard").iterdir())
    # A checkpoint the run cannot continue (here its data position edited) is refused in one line,
    # before any step: nothing is trained, written or rewritten.
    checkpoints = sorted((tmp_path / "checkpoints").iterdir(), key=lambda p: int(p.name))
    (record,) = [f for f in checkpoints[-1].rglob("*") if f.is_file() and b'"batches_read"' in f.read_bytes()]
    record.write_text(json.dumps({**json.loads(record.read_text()), "batches_read": 1}))
    config = (tmp_path / "config.json").read_text()
    again = subprocess.run([sys.executable, str(ROOT / "train.py"), "--config", str(ROOT / "configs/tiny.py"),
                            "--workdir", str(tmp_path), "--no-progress", "--steps", "1000"],
                           capture_output=True, text=True, env=env, timeout=600)
    assert again.returncode == 2, again.stderr[-3000:]
    assert "train.py: error: " in again.stderr and "with its data stream at batch 1," in again.stderr
    assert "Traceback" not in again.stderr
    assert sorted((tmp_path / "checkpoints").iterdir(), key=lambda p: int(p.name)) == checkpoints
    assert (tmp_path / "config.json").read_text() == config


def test_cli_bad_flags(tmp_path):
    run = lambda *a: subprocess.run([sys.executable, str(ROOT / "train.py"), *a], capture_output=True, text=True, timeout=300)
    r = run("--config", "configs/nope.py", "--workdir", str(tmp_path))
    assert r.returncode != 0 and "configs/nope.py: no such file" in r.stderr
    r = run("--config", str(ROOT / "configs/tiny.py"), "--workdir", str(tmp_path), "--mesh", "dp=2")
    assert r.returncode == 2 and "could not read 'dp=2'" in r.stderr
    r = run("--config", str(ROOT / "configs/tiny.py"), "--workdir", str(tmp_path / "accum"), "--grad-accum-steps", "3")
    assert r.returncode == 2 and "grad_accum_steps 3: batch_size 8 must split" in r.stderr, r.stderr[-2000:]
    assert not (tmp_path / "accum").exists()
