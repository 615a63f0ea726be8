"""A LoRA training step (forward + backward + AdamW) of a reduced FLUX: our jitted JAX step vs a
PyTorch step with diffusers' FluxTransformer2DModel + peft LoRA on the same modules, same process.

    python benchmarks/bench_lora_step.py [--double 2 --single 4 --width 512 --tokens 32 --rank 16 --repeat 5]
    python benchmarks/bench_lora_step.py --dtype bfloat16    # both models (base, LoRA, activations) in bf16

Both adapt the attention and MLP projections of every block with rank r; the base is frozen;
loss = MSE on the B' quarter of the image tokens, as in PICO training (computed in fp32).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_forward import add_reduced_flux_args  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_reduced_flux_args(ap)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--scan-unroll", type=int, default=1,
                    help="FluxConfig.scan_unroll: layers per scan iteration (0: no loop at all)")
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                    help="weights, LoRA factors and compute of both models (default float32)")
    args = ap.parse_args(argv)

    import jax
    import jax.numpy as jnp
    import optax
    import torch
    from diffusers import FluxTransformer2DModel
    from diffusers.utils import logging as diffusers_logging
    from flax import nnx
    from peft import LoraConfig

    from pico_jax.model.flux import FluxConfig, FluxTransformer
    from pico_jax.model.lora import add_lora

    heads = args.width // args.head_dim
    r7 = args.head_dim * 7 // 16
    rope = (args.head_dim - 2 * r7, r7, r7)
    n_img, n_txt = args.tokens**2, args.text
    g = np.random.default_rng(0)
    x = g.standard_normal((1, n_img, 64)).astype(np.float32)
    ctx = g.standard_normal((1, n_txt, 4096)).astype(np.float32)
    pooled = g.standard_normal((1, 768)).astype(np.float32)
    target = g.standard_normal((1, n_img, 64)).astype(np.float32)
    ids = np.stack(np.meshgrid(np.arange(args.tokens), np.arange(args.tokens), indexing="ij"), -1).reshape(-1, 2)
    img_ids = np.concatenate([np.zeros((n_img, 1)), ids], 1).astype(np.float32)
    txt_ids = np.zeros((n_txt, 3), np.float32)
    mask = np.zeros((n_img,), np.float32)
    mask[n_img * 3 // 4 :] = 1.0  # stand-in for the B' panel's tokens

    # --- ours
    cfg = FluxConfig(num_double=args.double, num_single=args.single, num_heads=heads, head_dim=args.head_dim,
                     axes_dims_rope=rope, guidance_embeds=True, scan_unroll=args.scan_unroll)
    dtype = getattr(jnp, args.dtype)
    x, ctx, pooled = (jnp.asarray(a, dtype) for a in (x, ctx, pooled))
    model = FluxTransformer(cfg, rngs=nnx.Rngs(0), dtype=dtype, param_dtype=dtype)
    add_lora(model, args.rank)
    graphdef, lora, base = nnx.split(model, nnx.LoRAParam, ...)
    tx = optax.adamw(1e-4)
    opt = tx.init(lora)

    @jax.jit
    def step(lora, opt):
        def loss(lora):
            m = nnx.merge(graphdef, lora, base)
            out = m(x, ctx, pooled, jnp.array([0.5]), img_ids, txt_ids, jnp.array([1.0]))
            return jnp.sum(jnp.mean((out.astype(jnp.float32) - target) ** 2, -1) * mask) / mask.sum()

        l, grads = jax.value_and_grad(loss)(lora)
        upd, opt = tx.update(grads, opt, lora)
        return optax.apply_updates(lora, upd), opt, l

    t0 = time.perf_counter()
    lora, opt, l = step(lora, opt)
    jax.block_until_ready(l)
    compile_s = time.perf_counter() - t0

    # --- theirs
    # diffusers' .to(dtype) logs that no module is kept in fp32 (there is none in FLUX): noise here
    diffusers_logging.set_verbosity_error()
    torch.manual_seed(0)
    tm = FluxTransformer2DModel(num_layers=args.double, num_single_layers=args.single, attention_head_dim=args.head_dim,
                                num_attention_heads=heads, guidance_embeds=True, axes_dims_rope=rope)
    tm.requires_grad_(False)
    tm = tm.to(getattr(torch, args.dtype))
    tm.add_adapter(LoraConfig(r=args.rank, lora_alpha=args.rank, init_lora_weights="gaussian", target_modules=[
        "to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
        "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2", "proj_mlp", "proj_out"]))
    tm = tm.to(getattr(torch, args.dtype))  # the adapters too, whatever dtype peft created them in
    # proj_out also matches the final projection; exclude it to adapt the same layers as ours
    params = [p for n, p in tm.named_parameters() if p.requires_grad and not n.startswith("proj_out")]
    for n, p in tm.named_parameters():
        if n.startswith("proj_out"):
            p.requires_grad_(False)
    topt = torch.optim.AdamW(params, lr=1e-4)
    t = {k: torch.from_numpy(np.array(v, np.float32)).to(getattr(torch, args.dtype)) for k, v in dict(
        hidden_states=x, encoder_hidden_states=ctx, pooled_projections=pooled, img_ids=img_ids, txt_ids=txt_ids).items()}
    tt, tmask = torch.from_numpy(target), torch.from_numpy(mask)

    def torch_step():
        topt.zero_grad(set_to_none=True)
        out = tm(**t, timestep=torch.tensor([0.5]), guidance=torch.tensor([1.0]), return_dict=False)[0]
        loss = ((out.float() - tt) ** 2).mean(-1).mul(tmask).sum() / tmask.sum()
        loss.backward()
        topt.step()
        return loss

    torch_step()
    n_ours = sum(v.size for v in jax.tree.leaves(lora))
    n_theirs = sum(p.numel() for p in params)
    tj, tp = [], []
    state = [lora, opt]
    for _ in range(args.repeat):
        s = time.perf_counter()
        state[0], state[1], l = step(state[0], state[1])
        jax.block_until_ready(l)
        tj.append(time.perf_counter() - s)
        s = time.perf_counter()
        torch_step()
        tp.append(time.perf_counter() - s)
    mj, mp = statistics.median(tj), statistics.median(tp)
    print(f"device: {jax.devices()[0].platform}, {os.cpu_count()} cores, jax {jax.__version__}, torch {torch.__version__}")
    print(f"model: {args.double} double + {args.single} single, width {args.width}, {n_img}+{n_txt} tokens, batch 1, {args.dtype}; "
          f"LoRA rank {args.rank}: ours {n_ours / 1e6:.2f} M trainable (fused qkv), peft {n_theirs / 1e6:.2f} M")
    print(f"  ours (jax.jit step)        {mj * 1e3:8.1f} ms  (compile+first {compile_s:.1f} s; runs {', '.join(f'{x * 1e3:.0f}' for x in tj)})")
    print(f"  diffusers+peft (torch)     {mp * 1e3:8.1f} ms  (runs {', '.join(f'{x * 1e3:.0f}' for x in tp)})")
    print(f"  speed-up ours/torch = {mp / mj:.2f}x")


if __name__ == "__main__":
    main()
