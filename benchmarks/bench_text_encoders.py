"""T5 v1.1 encoder: our jitted JAX vs transformers' PyTorch `T5EncoderModel` on identical weights
and token ids, in the same process.

    python benchmarks/bench_text_encoders.py                      # fp32, a reduced T5 (see below)
    python benchmarks/bench_text_encoders.py --dtype bfloat16     # both sides hold and compute in bf16
    python benchmarks/bench_text_encoders.py --d-model 4096 --d-ff 10240 --heads 64 --layers 24   # T5-XXL size

A random T5 of the given size is saved with `save_pretrained` (a real transformers checkpoint) and
loaded by `pico_jax.model.t5.load_t5_encoder`, so both sides run the same numbers. Default: width
1024, 8 layers, 16 heads x 64, d_ff 2816, 512 tokens (FluxPipeline's T5 length for FLUX.1-dev),
batch 1. Runs are interleaved (ours, theirs, ours, ...) so background load affects both alike;
medians are reported, with the ratio theirs / ours (> 1: ours is faster).

In FLUX inference T5 runs once per distinct prompt (`cached_encode` keeps the result on disk), so this
is not the sampling hot path; it is here so the text side's dtype policy is measured too.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_forward import _time  # noqa: E402


def t5_flops(d_model: int, d_ff: int, inner: int, layers: int, length: int, batch: int) -> float:
    """Matmul FLOPs of one T5 encoder forward: q, k, v, o + the gated MLP's three, and attention."""
    per_token = 2 * (4 * d_model * inner + 3 * d_model * d_ff)
    attention = 4 * length * length * inner
    return float(batch * layers * (per_token * length + attention))


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--d-model", type=int, default=1024, help="model width (default 1024; T5-XXL: 4096)")
    ap.add_argument("--d-ff", type=int, default=2816, help="gated MLP width (default 2816; T5-XXL: 10240)")
    ap.add_argument("--heads", type=int, default=16, help="attention heads (default 16; T5-XXL: 64)")
    ap.add_argument("--d-kv", type=int, default=64, help="per-head width (default 64)")
    ap.add_argument("--layers", type=int, default=8, help="encoder layers (default 8; T5-XXL: 24)")
    ap.add_argument("--vocab", type=int, default=32128, help="vocabulary size (default 32128, T5's)")
    ap.add_argument("--length", type=int, default=512, help="tokens per prompt (default 512)")
    ap.add_argument("--batch", type=int, default=1, help="prompts per call (default 1)")
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="weights and compute")
    ap.add_argument("--repeat", type=int, default=7, help="timed runs per side (default 7)")
    return ap


def main(argv=None) -> dict[str, float]:
    args = _parser().parse_args(argv)
    for flag in ("d_model", "d_ff", "heads", "d_kv", "layers", "vocab", "length", "batch", "repeat"):
        if getattr(args, flag) < 1:
            raise SystemExit(f"--{flag.replace('_', '-')} must be at least 1 (got {getattr(args, flag)})")

    import jax
    import jax.numpy as jnp
    import torch
    from flax import nnx
    from transformers import T5Config as HFT5Config, T5EncoderModel

    from pico_jax.model.t5 import load_t5_encoder

    torch.manual_seed(0)
    hf_cfg = HFT5Config(vocab_size=args.vocab, d_model=args.d_model, d_kv=args.d_kv, d_ff=args.d_ff,
                        num_layers=args.layers, num_heads=args.heads, feed_forward_proj="gated-gelu")
    theirs = T5EncoderModel(hf_cfg).eval()
    with tempfile.TemporaryDirectory() as d:
        theirs.save_pretrained(d)
        ours = load_t5_encoder(d, dtype=getattr(jnp, args.dtype))
    theirs = theirs.to(getattr(torch, args.dtype))

    ids = np.random.default_rng(0).integers(0, args.vocab, (args.batch, args.length), dtype=np.int32)
    graphdef, state = nnx.split(ours)
    run_ours = jax.jit(lambda s, i: nnx.merge(graphdef, s)(i))
    ids_jax, ids_torch = jnp.asarray(ids), torch.from_numpy(ids.astype(np.int64))

    def call_ours():
        return run_ours(state, ids_jax).block_until_ready()

    def call_theirs():
        with torch.inference_mode():
            return theirs(input_ids=ids_torch).last_hidden_state

    t0 = time.perf_counter()
    got = np.asarray(call_ours(), np.float32)
    compile_s = time.perf_counter() - t0
    want = call_theirs().float().numpy()
    rel = float(np.abs(got - want).max() / np.abs(want).max())

    ours_s, theirs_s = [], []
    for _ in range(args.repeat):
        ours_s.append(_time(call_ours))
        theirs_s.append(_time(call_theirs))
    ours_ms, theirs_ms = 1e3 * statistics.median(ours_s), 1e3 * statistics.median(theirs_s)
    flops = t5_flops(args.d_model, args.d_ff, args.heads * args.d_kv, args.layers, args.length, args.batch)

    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; jax {jax.__version__} "
          f"({jax.default_backend()}), torch {torch.__version__}")
    print(f"T5 encoder: width {args.d_model}, {args.layers} layers, {args.heads} heads x {args.d_kv}, d_ff {args.d_ff}, "
          f"{args.length} tokens, batch {args.batch}, {args.dtype}; {flops / 1e9:.1f} GFLOP per call")
    print(f"first call (compile + run): {compile_s:.1f} s; max |ours - transformers| / max |transformers| = {rel:.2e}")
    print(f"ours         median {ours_ms:8.1f} ms  ({flops / (ours_ms / 1e3) / 1e9:6.1f} GFLOP/s)")
    print(f"transformers median {theirs_ms:8.1f} ms  ({flops / (theirs_ms / 1e3) / 1e9:6.1f} GFLOP/s)")
    print(f"speed-up (transformers / ours): {theirs_ms / ours_ms:.2f}x")
    return {"ours_ms": ours_ms, "theirs_ms": theirs_ms, "ratio": theirs_ms / ours_ms, "rel_err": rel}


if __name__ == "__main__":
    main()
