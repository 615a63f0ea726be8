"""The one attention function of the model, with capture and edit hooks.

Every attention call in the FLUX transformer goes through `attention()`. Ordinary layers use
the backend's best exact kernel (`attention_implementation()`): cuDNN flash attention on GPU for
bf16/fp16, Pallas splash attention on TPU, head-by-head attention on CPU (a loop over heads, as
many a step as keep the step's fp32 logits within 10 MiB for bf16, one for fp32; normalised after
the value product; 3.5× faster than XLA's all-heads softmax at 1,056 tokens on 2 cores), XLA's
`dot_product_attention` elsewhere. Note that `jax.nn.dot_product_attention` with no
`implementation` is XLA on every backend, never cuDNN, so the choice is made here explicitly.
A layer selected by a hook instead computes its logits explicitly, one head at a time (so a
4096+512-token FLUX canvas needs one N×N map in memory, not H of them), and

* *capture* reduces the attention probabilities on the fly to two small statistics
  (never the N×N map itself):
    - ``group_mass[b, i, j]``: for queries of token group i, the attention mass on keys of
      group j, averaged over the queries of group i and over heads (rows sum to 1);
    - ``key_map[b, i, k]``: the attention each key token k receives from the queries of
      group i, averaged over those queries and over heads (an attention map per group);
* *edit* changes the logits before the softmax: a bias per (query group, key group), and
  Analogist-style *cloning*, which sets one panel-to-panel logit block from another one,
  scaled (e.g. B'→A' := 1.3 · (B→A)).

Which layers are captured/edited is data (boolean arrays, one entry per layer), so the hooks
work inside the scanned layer stacks, under `jit`, and under `vmap` (the selection flag is not
batched, so `lax.cond` stays a real branch and unselected layers pay nothing).
"""

from __future__ import annotations

import contextlib
import contextvars
import os
from collections.abc import Iterator
from typing import NamedTuple

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from pico_jax.backend import target_backend, trace_setting
from pico_jax.parallel import BATCH_AXES, data_parallel_size


class Clone(NamedTuple):
    """Logit block (dst_q panel → dst_k panel) := scale · (src_q panel → src_k panel).

    Panels index `AttentionHooks.panel_tokens` (for the PICO canvas: 0=A, 1=A', 2=B, 3=B').
    """

    dst_q: int
    dst_k: int
    src_q: int
    src_k: int


@flax.struct.dataclass
class AttentionHooks:
    """What to capture and what to edit, for every attention layer of the model.

    Layers are numbered double-stream blocks first, then single-stream blocks.
    `groups` labels every token of the joint [text, image] sequence with a group id in
    [0, num_groups). Arrays are traced (they may change between calls without recompiling);
    `num_groups` and `clones` are static.
    """

    groups: jax.Array  # (N,) int32
    capture: jax.Array  # (num_layers,) bool
    edit: jax.Array  # (num_layers,) bool
    logit_bias: jax.Array | None = None  # (G, G) float added to logits on edited layers
    panel_tokens: jax.Array | None = None  # (P, n) int32 token indices of each panel, raster order
    clone_scale: jax.Array | None = None  # () float
    num_groups: int = flax.struct.field(pytree_node=False, default=5)
    clones: tuple[Clone, ...] = flax.struct.field(pytree_node=False, default=())
    # False: capture only group_mass (key_map stays zeros). The per-key maps contract the (N, N)
    # probabilities over queries, a second pass over them that costs as much as the attention's
    # own on CPU; group_mass alone is one (N, N) x (N, G) product (see explicit_attention).
    key_maps: bool = flax.struct.field(pytree_node=False, default=True)

    @classmethod
    def make(
        cls,
        groups,
        num_layers: int,
        num_groups: int,
        capture_layers=(),
        edit_layers=(),
        logit_bias=None,
        panel_tokens=None,
        clones: tuple[Clone, ...] = (),
        clone_scale: float = 1.0,
        key_maps: bool = True,
    ) -> "AttentionHooks":
        """Build hooks from layer index lists (negative indices count from the end)."""

        def flags(layers):
            f = np.zeros(num_layers, bool)
            for i in layers:
                if not -num_layers <= i < num_layers:
                    raise ValueError(f"hook layer {i} out of range for a model with {num_layers} attention layers")
                f[i] = True
            return jnp.asarray(f)

        groups = jnp.asarray(groups, jnp.int32)
        if clones and panel_tokens is None:
            raise ValueError("clone edits need panel_tokens (the token indices of each panel)")
        return cls(
            groups=groups,
            capture=flags(capture_layers),
            edit=flags(edit_layers),
            logit_bias=None if logit_bias is None else jnp.asarray(logit_bias, jnp.float32),
            panel_tokens=None if panel_tokens is None else jnp.asarray(panel_tokens, jnp.int32),
            clone_scale=jnp.asarray(clone_scale, jnp.float32),
            num_groups=num_groups,
            clones=tuple(Clone(*c) for c in clones),
            key_maps=key_maps,
        )

    def gated(self, on) -> "AttentionHooks":
        """The same hooks, switched off entirely when `on` (a traced bool, e.g. 'this step') is False."""
        on = jnp.asarray(on, bool)
        return self.replace(capture=self.capture & on, edit=self.edit & on)


class Captured(NamedTuple):
    """Per-layer capture statistics (zeros on layers not captured). Leading axis: layer."""

    group_mass: jax.Array  # (L, B, G, G)
    key_map: jax.Array  # (L, B, G, N)
    captured: jax.Array  # (L,) bool — which layers hold real statistics


def empty_stats(batch: int, num_groups: int, num_tokens: int) -> tuple[jax.Array, jax.Array]:
    return (
        jnp.zeros((batch, num_groups, num_groups), jnp.float32),
        jnp.zeros((batch, num_groups, num_tokens), jnp.float32),
    )


ATTENTION_IMPLEMENTATIONS = ("xla", "cudnn", "headwise", "splash")


_FORCED = contextvars.ContextVar("pico_jax_attention", default=None)


@contextlib.contextmanager
def forced_attention(implementation: str) -> Iterator[None]:
    """Programs traced inside use `implementation` (one of ATTENTION_IMPLEMENTATIONS) for every
    fused attention, whatever the backend or PICO_JAX_ATTENTION say; e.g. "xla" to count a
    program's FLOPs in its jaxpr, where a kernel is an opaque call. JAX's caches are cleared on
    entry and exit (`backend.trace_setting`): a step traced after the count had run XLA's
    attention instead of the CPU's head-by-head kernel."""
    if implementation not in ATTENTION_IMPLEMENTATIONS:
        raise ValueError(f"attention implementation {implementation!r}; choose one of {', '.join(ATTENTION_IMPLEMENTATIONS)}")
    with trace_setting(_FORCED, implementation):
        yield


_AS_RUN = "as run"  # counted_as_run's setting of _FORCED
# What counted_as_run traces for each kernel: one whose products are visible in the jaxpr and
# equal the kernel's. XLA's attention keeps its probabilities for the backward (4 products there);
# cuDNN's flash backward recomputes the logits first (5), as the headwise kernel's does.
_COUNTED_AS = {"xla": "xla", "headwise": "headwise", "cudnn": "headwise", "splash": "headwise"}


@contextlib.contextmanager
def counted_as_run() -> Iterator[None]:
    """Programs traced inside run every fused attention as visible JAX ops doing the products of the
    kernel that would run there (`_COUNTED_AS`), for counting a program's FLOPs in its jaxpr: a
    flash kernel's backward recomputes the logits, one more (N, N) product than autodiff's of XLA's
    attention. Splash's separate dQ kernel recomputes the logits and dP once more (7 backward
    products); it is counted as flash's 5. Inside `forced_attention`, the forced kernel is the one
    that runs, so it is counted as that. JAX's caches are cleared as for `forced_attention`."""
    outer = _FORCED.get()
    with trace_setting(_FORCED, _AS_RUN if outer in (None, _AS_RUN) else _COUNTED_AS[outer]):
        yield


def attention_implementation(dtype, head_dim: int, num_tokens: int, backend: str | None = None) -> str:
    """Which exact attention kernel to use: `forced_attention`'s inside one (`counted_as_run`'s
    stand-in for the kernel inside that), else the
    PICO_JAX_ATTENTION environment variable if set (xla | cudnn | headwise | splash), else by
    backend: cuDNN flash attention on GPU where it
    applies (bf16/fp16, head_dim a multiple of 8 up to 128), Pallas splash attention on TPU (head_dim
    a multiple of 128, as FLUX's), head-by-head on CPU, XLA otherwise (fp32 on GPU). num_tokens is
    part of the signature for kernels whose choice depends on it."""
    if _FORCED.get() == _AS_RUN:
        return _COUNTED_AS[_unforced_implementation(dtype, head_dim, backend)]
    if _FORCED.get() is not None:
        return _FORCED.get()
    return _unforced_implementation(dtype, head_dim, backend)


def _unforced_implementation(dtype, head_dim: int, backend: str | None) -> str:
    """`attention_implementation` outside `forced_attention` and `counted_as_run`."""
    forced = os.environ.get("PICO_JAX_ATTENTION", "").strip().lower()
    if forced:
        if forced not in ATTENTION_IMPLEMENTATIONS:
            raise ValueError(f"PICO_JAX_ATTENTION={forced!r}; choose one of {', '.join(ATTENTION_IMPLEMENTATIONS)}")
        return forced
    backend = backend or target_backend()
    if backend in ("gpu", "cuda") and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16) and head_dim % 8 == 0 \
            and head_dim <= 128:
        return "cudnn"
    if backend == "tpu" and head_dim % 128 == 0:
        return "splash"
    if backend == "cpu":
        return "headwise"
    return "xla"


NARROW_FLOATS = (jnp.bfloat16, jnp.float16)


def product_dtype(dtype) -> jnp.dtype:
    """The operand dtype of the headwise kernel's products: bf16/fp16 stay narrow (accumulated in
    fp32, as flash attention does), everything else is fp32."""
    return jnp.dtype(dtype) if jnp.dtype(dtype) in NARROW_FLOATS else jnp.dtype(jnp.float32)


def head_groups(num_heads: int) -> int:
    """How many groups the context mesh's 'tensor' axis splits the heads into (1 without one, or
    when it does not divide the heads): the head loops run over the heads of one group at a time,
    all groups together, so each device loops over its own heads."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or "tensor" not in mesh.axis_names:
        return 1
    t = mesh.shape["tensor"]
    return t if t > 1 and num_heads % t == 0 else 1


def map_heads(fn, xs, heads_per_step: int = 1):
    """`jax.lax.map(fn, xs)` over heads-first arrays (H, ...), tensor-parallel aware, `heads_per_step`
    heads at a time (folded into fn's leading batch axis, so fn must treat that axis as a batch;
    heads_per_step must divide each device's heads).

    A loop over the heads axis cannot be split across devices: with heads sharded over 'tensor',
    XLA's partitioner gathers every head onto every device and each computes them all (an
    all-gather of q, k and v per layer: 72 of the 104 GiB a tensor=8 FLUX.1-dev forward
    gathered, benchmarks/RESULTS.md, eighteenth session). With g head groups the loop runs over
    H / (g * heads_per_step) steps and each step is vmapped over the g groups, whose axis stays
    sharded."""
    h = jax.tree.leaves(xs)[0].shape[0]
    g = head_groups(h)
    s = heads_per_step
    if (h // g) % s:
        raise ValueError(f"heads_per_step={s} does not divide the {h // g} heads of each of {g} head groups")
    restore = lambda ys: ys  # noqa: E731
    if target_backend() == "cpu" and any(jnp.dtype(x.dtype) in NARROW_FLOATS for x in jax.tree.leaves(xs)):
        fn, xs, restore = _through_bits(fn, xs)
    if g == 1 and s == 1:
        return restore(jax.lax.map(fn, xs))
    step = _folding_heads(fn, s) if s > 1 else fn
    step = jax.vmap(step) if g > 1 else step

    def to_steps(x):  # (H, ...) -> (H / (g s), g, s, ...), g and s dropped where 1
        x = jnp.swapaxes(x.reshape(g, h // (g * s), s, *x.shape[1:]), 0, 1)
        return x.reshape(h // (g * s), *((g,) if g > 1 else ()), *((s,) if s > 1 else ()), *x.shape[3:])

    def from_steps(y):
        y = y.reshape(h // (g * s), g, s, *y.shape[1 + (g > 1) + (s > 1):])
        return jnp.swapaxes(y, 0, 1).reshape(h, *y.shape[3:])

    return restore(jax.tree.map(from_steps, jax.lax.map(step, jax.tree.map(to_steps, xs))))


def _folding_heads(fn, s: int):
    """fn over s heads at once, folded into its arguments' leading (batch) axis: (s, B, ...) ->
    (B * s, ...) -> fn -> (s, B, ...). vmapping fn over them instead gave the batched products an
    (s, B) batch that XLA:CPU laid out apart from the next op's and copied (one pass over each
    (N, N) product at B = 1). The batch stays the major part of the folded axis, so a batch split
    over devices stays split (heads first, XLA's partitioner gathered it)."""

    def fold(a):
        return jnp.swapaxes(a, 0, 1).reshape(a.shape[1] * s, *a.shape[2:])

    def unfold(a):
        return jnp.swapaxes(a.reshape(a.shape[0] // s, s, *a.shape[1:]), 0, 1)

    def step(x):
        return jax.tree.map(unfold, fn(jax.tree.map(fold, x)))

    return step


def _through_bits(fn, xs):
    """(fn', xs', restore) for a loop over xs whose bf16/fp16 inputs and outputs cross the loop
    boundary as their uint16 bits. XLA:CPU's float normalisation rewrites a bf16 dynamic-slice or
    dynamic-update-slice to fp32: the loop's bf16 inputs were converted whole to fp32 before it,
    and its bf16 output was converted whole to fp32 and back at every step (the headwise forward's
    loop, twenty-second session); uint16 slices and updates are plain copies. The optimisation
    barriers keep the bitcasts out of the neighbouring transposes (heads-first and back): fused
    into one, the transpose ran over uint16 elements, ~3x slower than over bf16 (paired bf16
    forward of the reduced FLUX: B/A 0.947 [0.922, 0.969]; the transposes back to tokens-first
    are now bf16, those into the loop stay uint16)."""
    narrow = lambda x: jnp.dtype(x.dtype) in NARROW_FLOATS  # noqa: E731
    to_bits = lambda x: jax.lax.bitcast_convert_type(x, jnp.uint16) if narrow(x) else x  # noqa: E731
    in_dtypes = jax.tree.map(lambda x: x.dtype, xs)
    out_dtypes = []

    def fn_bits(x):
        x = jax.tree.map(lambda b, d: jax.lax.bitcast_convert_type(b, d) if b.dtype != d else b, x, in_dtypes)
        y = fn(x)
        out_dtypes[:] = [jax.tree.map(lambda a: a.dtype, y)]
        return jax.tree.map(to_bits, y)

    def restore(ys):
        ys = jax.tree.map(lambda b, d: jax.lax.bitcast_convert_type(b, d) if b.dtype != d else b, ys, out_dtypes[0])
        return jax.lax.optimization_barrier(ys)

    return fn_bits, jax.tree.map(to_bits, jax.lax.optimization_barrier(xs)), restore


LOGITS_STEP_BYTES = 10 * 2**20


def heads_per_step(dtype, num_heads: int, batch: int, num_queries: int, num_keys: int) -> int:
    """How many heads the headwise kernel handles per loop step: for bf16/fp16, the most (of each
    device's heads) whose fp32 logits fit LOGITS_STEP_BYTES together; one for fp32.

    On the Intel Xeon (AMX) of the twenty-second session one layer's bf16 attention at 1,056
    tokens (8 x 64) took 18–20 ms one head a step, 9.3 ms two heads a step (8.5 MiB of logits),
    and 40 ms with 4 or 8 heads a step once a step's logits passed ~16 MiB. fp32 gained 4 % from
    two heads a step (16.5 -> 15.8 ms), unmeasured on the AMD machines of earlier sessions, so it
    keeps one (benchmarks/RESULTS.md, twenty-second session)."""
    if jnp.dtype(dtype) not in NARROW_FLOATS:
        return 1
    local_heads = num_heads // head_groups(num_heads)
    mesh = jax.sharding.get_abstract_mesh()
    if not mesh.empty and set(BATCH_AXES) <= set(mesh.axis_names) and batch % data_parallel_size(mesh) == 0:
        batch //= data_parallel_size(mesh)  # each device's share of the batch
    per_head = batch * num_queries * num_keys * 4
    fitting = [s for s in range(1, local_heads + 1) if local_heads % s == 0 and s * per_head <= LOGITS_STEP_BYTES]
    return max(fitting, default=1)


def _headwise_forward(q: jax.Array, k: jax.Array, v: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Head-by-head attention forward; returns (out (B, N, H, D), logsumexp (H, B, N) fp32).

    Logits, exponentials and their sums are fp32. For bf16/fp16 inputs the value product takes
    the exponentials (in [0, 1]) rounded to the input dtype and accumulates in fp32, as flash
    attention and torch's CPU SDPA do: XLA:CPU runs that product natively at about twice the fp32
    rate (one layer of 1,056 tokens, 8 x 64, bf16: 27.0 -> 21.6 ms; torch SDPA 21.0 ms)."""
    scale = 1.0 / np.sqrt(q.shape[-1])
    pv_dtype = product_dtype(q.dtype)

    def one_head(qkv):
        qh, kh, vh = qkv  # (B, N, D)
        # The scale goes into the exponent, after the max (it is positive): applied to the logits
        # it was a pass of its own over the fp32 (N, N) product (bf16: 6.4 of 154 ms a forward).
        logits = jnp.einsum("bqd,bkd->bqk", qh, kh, preferred_element_type=jnp.float32)
        m = logits.max(-1, keepdims=True)
        e = jnp.exp((logits - m) * scale).astype(pv_dtype)
        # The normaliser sums the exponentials the value product takes (rounded to bf16/fp16,
        # summed in fp32): summing the fp32 ones instead kept an fp32 (N, N) copy for two readers,
        # one more pass over it (bf16, one layer at 1,056 tokens: 13.1 -> 9.6 ms in query blocks).
        total = e.astype(jnp.float32).sum(-1, keepdims=True)
        out = jnp.einsum("bqk,bkd->bqd", e, vh.astype(pv_dtype), preferred_element_type=jnp.float32) / total
        return out.astype(q.dtype), (m * scale + jnp.log(total))[..., 0]

    b, n, h, _ = q.shape
    step = heads_per_step(q.dtype, h, b, n, k.shape[1])
    out, lse = map_heads(one_head, tuple(jnp.moveaxis(x, 2, 0) for x in (q, k, v)), step)
    return jnp.moveaxis(out, 0, 2), lse


@jax.custom_vjp
def headwise_attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    """Exact attention a few heads at a time (lax.map over heads, `heads_per_step`: one for fp32, as
    many as fit 10 MiB of fp32 logits for bf16/fp16): a step's logits stay small where all heads'
    are not, and the softmax normaliser is applied to the (N, D) output instead of the (N, N)
    probabilities. Logits, exponentials and sums in fp32 (the value product of bf16/fp16 inputs in
    that dtype, accumulated in fp32, and the sum taken over those rounded exponentials:
    `_headwise_forward`).
    (B, N, H, D) × 3 → (B, N, H, D).

    The gradient is flash-attention style (custom VJP): the forward keeps only the output and the
    per-query log-sum-exp, and the backward recomputes a step's probabilities at a time. Plain
    autodiff would keep every head's N×N exponentials alive for the backward and spend most of the
    step in broadcast elementwise ops over them."""
    return _headwise_forward(q, k, v)[0]


def _headwise_fwd(q, k, v):
    out, lse = _headwise_forward(q, k, v)
    return out, (q, k, v, out, lse)


def _headwise_bwd(residuals, d_out):
    q, k, v, out, lse = residuals
    scale = 1.0 / np.sqrt(q.shape[-1])

    # As in the forward: narrow inputs enter every product in their own dtype (the (N, N) factors
    # rounded to it) with fp32 accumulation, as flash attention's backward does; fp32 stays fp32.
    narrow = product_dtype(q.dtype)

    def mm(spec, a, b):
        return jnp.einsum(spec, a.astype(narrow), b.astype(narrow), preferred_element_type=jnp.float32)

    # delta = rowsum(P ∘ dP) = rowsum(dO ∘ O), for all heads at once: computed inside the head
    # loop, XLA:CPU fused this reduction into the dP product's epilogue, which then ran at
    # about half the product's speed.
    delta = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), -1)  # (B, N, H)

    def one_head(args):
        qh, kh, vh, doh, lse_h, delta_h, kh_t = args  # (B, N, D) ×4, (B, N) ×2, (B, D, N)
        # The (N, N) factors are built transposed, keys first: dV = Pᵀ·dO and dK = dSᵀ·Q then
        # contract over their operands' trailing axis. XLA:CPU runs a bf16 product that contracts
        # its left operand's leading axis in fp32, over an fp32 copy of that operand; dQ = dS·K
        # would be one, so it is computed transposed, dQᵀ = Kᵀ·dSᵀ, from a Kᵀ made before the
        # loop (a transpose inside it is folded into the product's dimensions, and the product
        # is upcast again). One layer's bf16 attention gradient on CPU: 50–57 → 40 ms (keys
        # first), then −12 % (dQᵀ; the whole bf16 LoRA step −3 %: benchmarks/RESULTS.md).
        logits_t = mm("bkd,bqd->bkq", kh, qh) * scale
        probs_t = jnp.exp(logits_t - lse_h[:, None, :])
        dv = mm("bkq,bqd->bkd", probs_t, doh)
        dprobs_t = mm("bkd,bqd->bkq", vh, doh)
        # dS from the fp32 probabilities: rounding them to bf16 first saves one pass over (N, N)
        # but raised dQ's and dK's mean error against fp32 by 40 %.
        dlogits_t = probs_t * (dprobs_t - delta_h[:, None, :]) * scale
        dk = mm("bkq,bqd->bkd", dlogits_t, qh)
        dq_t = mm("bdk,bkq->bdq", kh_t, dlogits_t)
        return dq_t.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)

    heads_first = tuple(jnp.moveaxis(x, 2, 0) for x in (q, k, v, d_out))  # (H, B, N, D)
    k_t = jnp.transpose(k, (2, 0, 3, 1))  # (H, B, D, N)
    b, n, h, _ = q.shape
    step = heads_per_step(q.dtype, h, b, n, k.shape[1])
    dq_t, dk, dv = map_heads(one_head, (*heads_first, lse, jnp.moveaxis(delta, 2, 0), k_t), step)
    dq = jnp.transpose(dq_t, (0, 1, 3, 2))
    return tuple(jnp.moveaxis(g, 0, 2) for g in (dq, dk, dv))  # already in the inputs' dtypes


headwise_attention.defvjp(_headwise_fwd, _headwise_bwd)


def fused_attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    """(B, N, H, D) × 3 → (B, N, H, D) with the backend's exact fused kernel (scale 1/sqrt(D))."""
    impl = attention_implementation(q.dtype, q.shape[-1], q.shape[1])
    if impl == "headwise":
        return headwise_attention(q, k, v)
    if impl == "splash":
        return splash_attention(q, k, v)
    return jax.nn.dot_product_attention(q, k, v, implementation=impl)


SPLASH_BLOCK = 512  # the kernel's query / key block (FLUX's 512 text + 4096 image tokens: 9 blocks)


def splash_attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    """(B, N, H, D) × 3 → (B, N, H, D) with Pallas' TPU splash attention (flash attention with its
    own backward; full mask, scale 1/sqrt(D)). Off TPU it runs in Pallas' interpreter (slow; how the
    tests check it on CPU).

    The token count is padded to a multiple of the block (128 at least); padding tokens form their
    own segment, so no real query sees them. Under a context mesh the kernel runs per device in a
    `shard_map`: the batch split as the mesh's batch axes split it, the heads over 'tensor' when it
    divides them. A Pallas kernel is opaque to XLA's partitioner, which would otherwise gather
    every input onto every device."""
    from jax.experimental.pallas.ops.tpu import splash_attention as splash

    b, n, h, d = q.shape
    padded = -(-n // 128) * 128
    block = next(s for s in (SPLASH_BLOCK, 256, 128) if padded % s == 0)
    interpret = target_backend() != "tpu"
    segments = None
    if padded != n:
        ids = jnp.asarray(np.arange(padded) >= n, jnp.int32)  # 0: real tokens, 1: padding
        segments = splash.SegmentIds(q=ids, kv=ids)

    def per_device(q, k, v):  # (b, h, padded, d) on one device
        heads = q.shape[1]
        mask = splash.MultiHeadMask([splash.FullMask((padded, padded)) for _ in range(heads)])
        sizes = splash.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
                                  block_kv_dkv=block, block_kv_dkv_compute=block, block_q_dq=block, block_kv_dq=block)
        kernel = splash.make_splash_mha(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1, interpret=interpret)
        return jax.vmap(lambda q, k, v: kernel(q, k, v, segment_ids=segments))(q, k, v)

    def heads_first(x):
        return jnp.swapaxes(jnp.pad(x, ((0, 0), (0, padded - n), (0, 0), (0, 0))), 1, 2)

    scale = jnp.asarray(1.0 / np.sqrt(d), q.dtype)
    args = (heads_first(q * scale), heads_first(k), heads_first(v))
    mesh = jax.sharding.get_abstract_mesh()
    if not mesh.empty and mesh.size > 1:
        from jax.sharding import PartitionSpec as P

        batch_split = set(BATCH_AXES) <= set(mesh.axis_names) and b % data_parallel_size(mesh) == 0
        head_axis = "tensor" if head_groups(h) > 1 else None
        spec = P(BATCH_AXES if batch_split else None, head_axis, None, None)
        per_device = jax.shard_map(per_device, in_specs=(spec, spec, spec), out_specs=spec, check_vma=False)
    out = per_device(*args)
    return jnp.swapaxes(out, 1, 2)[:, :n]


def _edit_logits(logits: jax.Array, hooks: AttentionHooks) -> jax.Array:
    """logits: (B, N, N) for one head, fp32."""
    if hooks.logit_bias is not None:
        g = hooks.groups
        logits = logits + hooks.logit_bias[g[:, None], g[None, :]]
    if hooks.clones:
        # All clones read the unedited logits, so the order of clones does not matter.
        source = logits
        pt = hooks.panel_tokens
        for c in hooks.clones:
            src = source[:, pt[c.src_q][:, None], pt[c.src_k][None, :]]
            logits = logits.at[:, pt[c.dst_q][:, None], pt[c.dst_k][None, :]].set(hooks.clone_scale * src)
    return logits


def explicit_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, hooks: AttentionHooks, capture_on, edit_on
) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    """Attention with explicit logits, head by head; returns (output, (group_mass, key_map))."""
    b, n, h, d = q.shape
    groups = hooks.groups
    onehot = jax.nn.one_hot(groups, hooks.num_groups, dtype=jnp.float32)  # (N, G)
    counts = jnp.maximum(onehot.sum(0), 1.0)  # (G,)
    query_avg = (onehot / counts).T  # (G, N): mean over the queries of a group
    scale = 1.0 / np.sqrt(d)

    edits = hooks.logit_bias is not None or bool(hooks.clones)

    def one_head(qkv_h):
        qh, kh, vh = qkv_h  # (B, N, D)
        logits = jnp.einsum("bqd,bkd->bqk", qh, kh, preferred_element_type=jnp.float32) * scale
        if edits:  # capture-only hooks (the scorer's) skip the branch, so the logits stay fusible
            logits = jax.lax.cond(edit_on, lambda l: _edit_logits(l, hooks), lambda l: l, logits)
        # Unnormalised exponentials, as in the headwise kernel: the 1/rowsum goes onto the (N, D)
        # output and the (N, G) group masses, never over the (N, N) map.
        e = jnp.exp(logits - logits.max(-1, keepdims=True))
        inv_total = 1.0 / e.sum(-1)  # (B, N)
        # Products in the value dtype (bf16 on GPU: tensor cores, fp32 accumulation); 0/1 is exact.
        # The group masses are their own (N, N) x (N, G) product rather than extra columns on the
        # value product: with e @ [v | one-hot] (D + G = 69 columns) a hooked layer cost +9.7 % over
        # the hook-free kernel on an AVX2 CPU, with the separate product +5.4 % (RESULTS.md).
        ev = e.astype(vh.dtype)
        out = jnp.einsum("bqk,bkd->bqd", ev, vh, preferred_element_type=jnp.float32) * inv_total[..., None]
        query_mass = jnp.einsum("bqk,kg->bqg", ev, onehot.astype(vh.dtype),
                                preferred_element_type=jnp.float32) * inv_total[..., None]  # (B, N, G)
        group_mass = jnp.einsum("gq,bqh->bgh", query_avg, query_mass)  # (B, G, G)
        if hooks.key_maps:
            key_map = jnp.einsum("gq,bq,bqk->bgk", query_avg, inv_total, e)  # (B, G, N)
        else:
            key_map = jnp.zeros((b, hooks.num_groups, n), jnp.float32)
        return out.astype(q.dtype), group_mass, key_map

    per_head = tuple(jnp.moveaxis(x, 2, 0) for x in (q, k, v))  # (H, B, N, D)
    out, group_mass, key_map = map_heads(one_head, per_head)
    out = jnp.moveaxis(out, 0, 2)  # (B, N, H, D)
    on = jnp.asarray(capture_on, jnp.float32)
    return out, (group_mass.mean(0) * on, key_map.mean(0) * on)


def attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    hooks: AttentionHooks | None = None,
    capture_on=False,
    edit_on=False,
) -> tuple[jax.Array, tuple[jax.Array, jax.Array] | None]:
    """Multi-head attention over (B, N, H, D) inputs (rotary already applied).

    Returns ``(out, stats)`` with ``out`` of shape (B, N, H*D); ``stats`` is None without hooks,
    else ``(group_mass (B,G,G), key_map (B,G,N))``, zeros unless ``capture_on``.
    """
    b, n, h, d = q.shape
    if hooks is None:
        return fused_attention(q, k, v).reshape(b, n, h * d), None

    def fast(q, k, v):
        return fused_attention(q, k, v), empty_stats(b, hooks.num_groups, n)

    def slow(q, k, v):
        return explicit_attention(q, k, v, hooks, capture_on, edit_on)

    out, stats = jax.lax.cond(jnp.logical_or(capture_on, edit_on), slow, fast, q, k, v)
    return out.reshape(b, n, h * d), stats
