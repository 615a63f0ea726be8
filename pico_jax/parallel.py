"""Device meshes, parameter sharding by logical axis rules, and multi-host start-up.

The mesh always has the three axes ('data', 'fsdp', 'tensor'). Parameters are sharded by
*rules*: a parameter's path decides its logical axes (e.g. a QKV kernel is ('layers', 'embed',
'mlp')), and LOGICAL_TO_MESH maps logical axes to mesh axes ('embed' → 'fsdp' for ZeRO-3 style
sharding of the frozen base too, 'mlp' → 'tensor' for Megatron-style tensor parallelism). A
dimension that the mesh axis does not divide is replicated instead of failing. Batches are
sharded over ('data', 'fsdp').

This is the one place where sharding is decided; model code carries no sharding annotations
except two calls under a context mesh (`on_mesh`): `fsdp_gather_layer` in the layer scan gathers
each layer's weights over 'fsdp' as the layer runs, and `split_by_batch` lays the text encoders'
embedded tokens out by batch before their layers.
"""

from __future__ import annotations

import collections
import functools
import os
import re
import warnings
from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

LOGICAL_TO_MESH: dict[str, str | tuple[str, ...] | None] = {
    "layers": None,
    "embed": "fsdp",
    "mlp": "tensor",
    "lora": None,
    "vocab": "tensor",
    # A LoRA factor's 'mlp' width: split over 'tensor' as its kernel's is, and over 'fsdp' as well,
    # ZeRO style, so that no factor (nor its gradient and Adam moments) is whole on every fsdp
    # device. Under a mesh with 'fsdp' the layer scan gathers it back to its 'tensor' split.
    "lora_mlp": ("tensor", "fsdp"),
}

# Parameter path (dotted, without the leading layer axis) → logical axes of its trailing dims.
# The first rule that matches wins. Kernels are (in, out). The rules cover FLUX and the T5 / CLIP
# text encoders (their down projections: T5's o and wo, CLIP's out and fc2).
_DOWN = r"(proj|mlp_out|linear2|final_proj|out_layer|o|wo|out|fc2)"
PARAM_RULES: list[tuple[str, tuple[str | None, ...]]] = [
    (rf"(^|\.){_DOWN}\.kernel$", ("mlp", "embed")),
    (r"\.kernel$", ("embed", "mlp")),
    (r"^token_embedding\.embedding$", ("vocab", "embed")),  # T5-XXL's is 32128 x 4096
    (r"\.bias$", (None,)),
    (r"\.scale$", (None,)),
    (r".*", ()),  # anything else: replicated
]


class MeshError(ValueError):
    pass


# The checkpoint name of a layer's weights gathered over 'fsdp' (`fsdp_gather_layer`).
FSDP_GATHERED = "fsdp_gathered"


def save_all_but_gathered_weights(prim, *_, **params) -> bool:
    """A `jax.checkpoint` policy: save every residual except a layer's weights gathered over 'fsdp'
    (the gather's output and its name), so the backward gathers them again. The layer scan uses it
    for remat "none" under a context mesh with 'fsdp', where autodiff would otherwise keep every
    layer's gathered weights until the backward. `save_anything_except_these_names` alone is not
    enough: it still saves the sharding constraint's output, the gathered array itself."""
    return not (prim.name == "sharding_constraint" or (prim.name == "name" and params.get("name") == FSDP_GATHERED))


# A loader's `place=`: (dotted parameter name, host array) -> the array on its device(s).
Placer = Callable[[str, np.ndarray], jax.Array]


def parse_mesh_spec(spec: str | Mapping[str, int] | None, num_devices: int) -> dict[str, int]:
    """'data=2,fsdp=4' → {'data': 2, 'fsdp': 4, 'tensor': 1}; unspecified axes absorb the rest.

    With no spec, all devices go to 'fsdp' (shards both parameters and batch)."""
    if spec is None or spec == "":
        sizes: dict[str, int] = {}
    elif isinstance(spec, str):
        sizes = {}
        for part in spec.split(","):
            name, sep, value = part.partition("=")
            name = name.strip()
            if not sep or name not in MESH_AXES or not value.strip().isdigit() or int(value) < 1:
                raise MeshError(
                    f"--mesh {spec!r}: expected comma-separated axis=size with axes from {MESH_AXES}, "
                    f"e.g. 'data=2,fsdp=4'; could not read {part!r}"
                )
            sizes[name] = int(value)
    else:
        sizes = dict(spec)
    given = int(np.prod(list(sizes.values()))) if sizes else 1
    free = [a for a in MESH_AXES if a not in sizes]
    if num_devices % given:
        raise MeshError(f"mesh {sizes} uses {given} devices, which does not divide the {num_devices} available")
    rest = num_devices // given
    if rest > 1 and not free:
        raise MeshError(f"mesh {sizes} uses {given} of {num_devices} devices; all axes are fixed, so {rest}x are idle")
    for a in MESH_AXES:
        sizes.setdefault(a, 1)
    if rest > 1:
        sizes["fsdp" if "fsdp" in free else free[0]] *= rest
    return {a: sizes[a] for a in MESH_AXES}


def make_mesh(spec: str | Mapping[str, int] | None = None, devices=None) -> Mesh:
    """A ('data', 'fsdp', 'tensor') mesh over all (or the given) devices."""
    devices = list(devices if devices is not None else jax.devices())
    sizes = parse_mesh_spec(spec, len(devices))
    shape = tuple(sizes[a] for a in MESH_AXES)
    if devices == list(jax.devices()):
        return jax.make_mesh(shape, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 3)
    return Mesh(np.array(devices).reshape(shape), MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 3)


_LORA_FACTOR = re.compile(r"\.lora_(a|b)$")


def _rule_axes(name: str) -> tuple[str | None, ...]:
    for pattern, axes in PARAM_RULES:
        if re.search(pattern, name):
            return axes
    return ()


def _lora_factor_axes(kernel: str, factor: str) -> tuple[str | None, ...]:
    """A LoRA factor of `kernel` keeps the kernel's axis on its side: A (in, r), B (r, out). So the
    factors are split like the product they add to (a row-parallel kernel's A over 'tensor' along
    the contracted width, a column-parallel kernel's B along its output), and the tensor-parallel
    side is split over 'fsdp' too ('lora_mlp'), as the rank is too narrow to split."""
    axes = _rule_axes(kernel)
    kernel_in, kernel_out = axes if len(axes) == 2 else (None, None)
    zero = lambda axis: "lora_mlp" if axis == "mlp" else axis
    return (zero(kernel_in), "lora") if factor == "a" else ("lora", zero(kernel_out))


def logical_axes(name: str, ndim: int, stacked: bool) -> tuple[str | None, ...]:
    """Logical axes of a parameter from its dotted path and rank."""
    factor = _LORA_FACTOR.search(name)
    if factor:
        axes = _lora_factor_axes(name[:factor.start()] + ".kernel", factor.group(1))
    else:
        axes = _rule_axes(name)
    lead = ("layers",) if stacked else ()
    axes = lead + tuple(axes)
    if len(axes) != ndim:  # unknown rank: replicate rather than guess
        axes = lead + (None,) * (ndim - len(lead))
    return axes


# Modules whose parameters carry a leading layer axis (scanned stacks): FLUX's and the text encoders'.
STACKED_PREFIXES = ("double_blocks.", "single_blocks.", "blocks.")


def spec_for(name: str, shape: tuple[int, ...], mesh: Mesh) -> P:
    stacked = name.startswith(STACKED_PREFIXES)
    axes = logical_axes(name, len(shape), stacked)
    return P(*(_mesh_axes(logical, dim, mesh) for dim, logical in zip(shape, axes)))


def _mesh_axes(logical: str | None, dim: int, mesh) -> str | tuple[str, ...] | None:
    """The mesh axes one dimension is split over: its logical axis's, less those of size 1, less
    the trailing ones while they do not divide `dim` (so 'lora_mlp' keeps 'tensor' before 'fsdp')."""
    target = LOGICAL_TO_MESH.get(logical) if logical else None
    axes = tuple(a for a in ((target,) if isinstance(target, str) else target or ()) if mesh.shape[a] > 1)
    while axes and dim % int(np.prod([mesh.shape[a] for a in axes])):
        axes = axes[:-1]
    return None if not axes else axes[0] if len(axes) == 1 else axes


def without_fsdp(spec: P) -> P:
    """`spec` with its 'fsdp' splits removed: the layout of the same array gathered over 'fsdp'."""
    def drop(axis):
        if axis == "fsdp":
            return None
        if isinstance(axis, tuple):
            kept = tuple(a for a in axis if a != "fsdp")
            return None if not kept else kept[0] if len(kept) == 1 else kept
        return axis

    return P(*(drop(axis) for axis in spec))


def param_sharding(name: str, shape: tuple[int, ...], mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, spec_for(name, shape, mesh))


def global_array(x: np.ndarray, sharding: NamedSharding) -> jax.Array:
    """A host array that every process holds whole, as a global jax.Array with `sharding`: each
    process puts only the shards of its own devices (so it works on one host and on many)."""
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])


def replicate(mesh: Mesh, tree):
    """Every leaf of `tree` (small arrays every process holds whole: an autoencoder's weights, text
    embeddings) replicated over the mesh, so a program over the mesh takes them as arguments.
    Leaves already replicated there are kept as they are (on several hosts they cannot be read
    back into numpy, and need not be)."""
    everywhere = replicated(mesh)
    keep = lambda x: isinstance(x, jax.Array) and x.sharding == everywhere
    return jax.tree.map(lambda x: x if keep(x) else global_array(np.asarray(x), everywhere), tree)


def to_device(x: np.ndarray) -> jax.Array:
    """A host array onto the default device, compiling nothing. (`jnp.asarray` of a numpy array
    compiles a small identity program, `lax.stage`, for every new shape: ~25 ms each, 24 of them
    when the bundled model loads.)"""
    return jax.device_put(np.asarray(x))


def default_placer(_name: str, array: np.ndarray) -> jax.Array:
    """The loaders' `place=` when none is given: each parameter whole on the default device."""
    return to_device(array)


def param_placer(mesh: Mesh) -> Placer:
    """For the loaders' `place=` (`load_flux_transformer`, `load_t5_encoder`, `load_clip_text_encoder`):
    put each parameter straight onto its shards, so no device ever holds the whole model."""

    def place(name: str, array: np.ndarray) -> jax.Array:
        return global_array(array, param_sharding(name, array.shape, mesh))

    return place


def state_shardings(state, mesh: Mesh):
    """A pytree of NamedShardings matching an nnx.State (concrete or abstract)."""
    from flax import nnx

    flat = nnx.to_flat_state(state)
    leaves = []
    for key_path, var in flat:
        name = ".".join(str(p) for p in key_path)
        leaves.append((key_path, var.replace(param_sharding(name, var.get_value().shape, mesh))))
    return nnx.from_flat_state(leaves)


def shard_state(state, mesh: Mesh):
    """Place every leaf of an nnx.State onto the mesh by the rules."""
    return jax.tree.map(lambda x, s: jax.device_put(x, s), state, state_shardings(state, mesh))


def shard_module(module, mesh: Mesh):
    """An nnx module with its state placed on the mesh by the rules (a no-op for leaves already there)."""
    from flax import nnx

    heads = getattr(getattr(module, "config", None), "num_heads", None)
    if isinstance(heads, int):
        warn_unless_tensor_divides_heads(mesh, heads, type(module).__name__)
    graphdef, state = nnx.split(module)
    return nnx.merge(graphdef, shard_state(state, mesh))


def warn_unless_tensor_divides_heads(mesh: Mesh, num_heads: int, what: str = "the transformer") -> None:
    """Tensor parallelism splits the fused projections' head-grouped columns into contiguous shards;
    they hold whole heads only when 'tensor' divides the head count. Otherwise results are still
    right, but every layer reshards its activations and the head loops run unsplit."""
    t = mesh.shape["tensor"]
    if t > 1 and num_heads % t:
        warnings.warn(f"mesh tensor={t} does not divide {what}'s {num_heads} heads, so its shards cut "
                      f"through heads and every layer reshards its activations; use a tensor size that divides "
                      f"{num_heads} (or data / fsdp)", stacklevel=3)


def data_parallel_size(mesh: Mesh) -> int:
    """How many ways a batch is split: the 'data' x 'fsdp' devices."""
    return mesh.shape["data"] * mesh.shape["fsdp"]


def check_batch_size(batch_size: int, mesh: Mesh, name: str = "--batch-size") -> None:
    """MeshError unless the batch splits evenly over the mesh's data x fsdp devices; `name` is what
    the caller calls the batch size (the CLIs' flag, or a Python argument)."""
    dp = data_parallel_size(mesh)
    if batch_size % dp:
        raise MeshError(f"{name} {batch_size} must be a multiple of the mesh's data x fsdp = {dp} "
                        f"(mesh {dict(mesh.shape)}): each of those devices takes an equal share of the batch")


# Parameters a layer casts to its compute dtype before any use (a Dense's kernel and LoRA factors),
# so casting them before the gather changes no value. Chosen by name: a layer that kept such a
# parameter wider in its compute would need its own name here.
_CAST_AT_USE = re.compile(r"(^|\.)(kernel|lora_a|lora_b)$")


def fsdp_gather_layer(layer_state, compute_dtype=None):
    """One scanned layer's parameters, all-gathered over 'fsdp' (still split over 'tensor'), when JAX's
    context mesh (`jax.set_mesh`, see `on_mesh`) has an 'fsdp' axis; otherwise unchanged.

    With `compute_dtype`, the parameters the layer would cast to it at use (kernels, LoRA factors)
    are cast before the gather instead of after: the same values, so fp32 master weights under a
    bf16 compute dtype move half the bytes (their gradients come back the same way).

    This is what makes 'fsdp' FSDP: each layer's weights are gathered just before the layer runs
    (and again in the backward), the batch stays split. Without it, XLA's partitioner, given a
    batch split over 'fsdp' and weights split over 'fsdp' along their contracted width, gathered
    the *activations* over 'fsdp' and all-reduced every product's fp32 output instead, and the
    sampler's plan held the whole model's weights gathered (benchmarks/RESULTS.md, seventeenth
    session). The names are the layer's own (`img.qkv.kernel`),
    which the rules match as they match the stacked ones. Under remat the backward gathers them
    again; with remat="none" autodiff keeps each layer's gathered weights for the backward.

    The gather's gradient is FSDP's reduce-scatter: each device's partial gradient goes, widened
    to the parameter's dtype, straight to the parameter's own layout (`_gather_over_fsdp_bwd`)."""
    return _gather_state(layer_state, compute_dtype, by_bits=False)


def fsdp_gather_model(state, compute_dtype=None):
    """A whole model's parameters (its scanned stacks' too: their names say they are stacked)
    gathered over 'fsdp' at once, as `fsdp_gather_layer` gathers one layer's; unchanged without
    a context mesh with 'fsdp'. For a sampler's program (`Pipeline(gather_weights="per_call")`):
    gathered before its loop, the weights are loop constants, so its 28 or more model calls
    gather nothing more, where each call's layers would otherwise gather theirs again; the
    price is the whole model (in `compute_dtype`) on every device while the program runs.

    On CPU its bf16/fp16 leaves are gathered as their uint16 bits: XLA:CPU's float normalisation
    widened a bf16 all-gather to fp32, so the whole-model gather moved twice its bytes and planned
    an fp32 copy of the model beside the bf16 one (FLUX.1-Fill-dev's sampler on data=2,fsdp=4:
    44.33 GiB gathered for 22.16 of bf16 weights; benchmarks/RESULTS.md, twenty-eighth session).
    A scanned layer's gathers need none of it: its slices arrive as bits (`flux.take_layer`)."""
    from pico_jax.backend import target_backend

    return _gather_state(state, compute_dtype, by_bits=target_backend() == "cpu")


def _gather_state(state, compute_dtype, by_bits: bool):
    """`fsdp_gather_layer` of `state`; with `by_bits`, its 16-bit float leaves cross the gather as uint16."""
    if not fsdp_gathering():
        return state
    from flax import nnx

    mesh = jax.sharding.get_abstract_mesh()
    leaves = []
    narrow = jnp.dtype(compute_dtype) if compute_dtype is not None else None
    for key_path, var in nnx.to_flat_state(state):
        value = var.get_value()
        name = ".".join(str(p) for p in key_path)
        cast = (narrow is not None and _CAST_AT_USE.search(name) is not None
                and jnp.issubdtype(value.dtype, jnp.floating) and value.dtype.itemsize > narrow.itemsize)
        spec = spec_for(name, value.shape, mesh)
        gathered = _gather_over_fsdp(spec, without_fsdp(spec), narrow if cast else None, value.dtype, by_bits, value)
        leaves.append((key_path, var.replace(checkpoint_name(gathered, FSDP_GATHERED))))
    return nnx.from_flat_state(leaves)


def _cast_and_gather(gathered: P, narrow, by_bits: bool, value: jax.Array) -> jax.Array:
    """`value` gathered to the layout `gathered`, cast to `narrow` first if given. The barrier
    keeps XLA from moving the gather back above the cast (it did: 86 % fp32 bytes). With
    `by_bits`, a bf16/fp16 value is gathered as its uint16 bits, between barriers: without them
    XLA folded the bitcasts away and widened the gather again. (Not for a scanned layer's
    gathers: a remat policy would then keep the barrier's gathered output as a residual.)"""
    if narrow is not None:
        value = jax.lax.optimization_barrier(value.astype(narrow))
    if by_bits and jnp.dtype(value.dtype) in (jnp.bfloat16, jnp.float16):
        bits = jax.lax.optimization_barrier(jax.lax.bitcast_convert_type(value, jnp.uint16))
        bits = jax.lax.optimization_barrier(jax.lax.with_sharding_constraint(bits, gathered))
        return jax.lax.bitcast_convert_type(bits, value.dtype)
    return jax.lax.with_sharding_constraint(value, gathered)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2, 3, 4))
def _gather_over_fsdp(spec: P, gathered: P, narrow, master, by_bits: bool, value: jax.Array) -> jax.Array:
    """`_cast_and_gather` of `value` (laid out as `spec`, of dtype `master`), with the gradient
    of `_gather_over_fsdp_bwd`."""
    return _cast_and_gather(gathered, narrow, by_bits, value)


def _gather_over_fsdp_fwd(spec, gathered, narrow, master, by_bits, value):
    # Not through the custom_vjp function: its ops must stay visible to remat policies, so that
    # `save_all_but_gathered_weights` sees the sharding constraint and does not keep its output.
    return _cast_and_gather(gathered, narrow, by_bits, value), None


def _gather_over_fsdp_bwd(spec, gathered, narrow, master, by_bits, _, cotangent):
    """The gradient goes straight to the parameter's own layout, widened first: each device's
    partial sum is reduce-scattered over 'fsdp' in the master dtype (XLA:CPU writes that as an
    all-reduce and a slice). Autodiff's transpose of the constraint asks for the whole gradient
    on every device instead; XLA then computed some kernels' gradients on another layout and
    all-gathered them in fp32 (benchmarks/RESULTS.md, twenty-sixth session)."""
    return (jax.lax.with_sharding_constraint(cotangent.astype(master), spec),)


_gather_over_fsdp.defvjp(_gather_over_fsdp_fwd, _gather_over_fsdp_bwd)


def fsdp_gathering() -> bool:
    """Whether `fsdp_gather_layer` gathers, i.e. the context mesh has an 'fsdp' axis of more than one device."""
    mesh = jax.sharding.get_abstract_mesh()
    return not mesh.empty and "fsdp" in mesh.axis_names and mesh.shape["fsdp"] > 1


def split_by_batch(x: jax.Array) -> jax.Array:
    """`x` split over the context mesh's data x fsdp devices along its batch (leading) axis, whole
    along the others; whole everywhere when that batch does not divide; unchanged without a context
    mesh. For an embedding lookup's output: the table is split over 'fsdp' along its width, so
    the looked-up activations come out split by width, and XLA's partitioner carried that layout
    into every layer and gathered them at each norm (T5-XXL on fsdp=8: 3 GiB a call on top of the
    8.6 GiB of layer weights; benchmarks/RESULTS.md, nineteenth session)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or not set(BATCH_AXES) <= set(mesh.axis_names):
        return x
    lead = BATCH_AXES if x.shape[0] % data_parallel_size(mesh) == 0 else None
    return jax.lax.with_sharding_constraint(x, P(lead, *([None] * (x.ndim - 1))))


def split_like_contracted_width(x: jax.Array) -> jax.Array:
    """`x` (..., D) split over 'fsdp' along D as a kernel's contracted width ('embed') is, whole
    along its other axes; unchanged without a context mesh with 'fsdp' (or where it does not divide D).

    For products whose operand is a few vectors, not tokens (FLUX's modulations of every layer
    at once, `flux.layer_modulations`): then each device multiplies its own rows of the kernel
    and the partial (few-row) results are summed over 'fsdp', instead of every device gathering
    the kernel. Left to itself XLA's partitioner gathered the stacked modulation kernels in fp32
    (FLUX.1-dev forward on fsdp=8: all-gather 22.1 → 28.1 GiB, temporaries 1.1 → 16.1 GiB;
    benchmarks/RESULTS.md, thirty-first session)."""
    if not fsdp_gathering():
        return x
    mesh = jax.sharding.get_abstract_mesh()
    width = _mesh_axes("embed", x.shape[-1], mesh)
    return jax.lax.with_sharding_constraint(x, P(*([None] * (x.ndim - 1)), width))


def on_mesh(fn, mesh: Mesh):
    """`fn` (a jitted function) called, and so traced, with `mesh` as JAX's context mesh, which
    `fsdp_gather_layer` reads; `.lower` too. Use it for every program over a mesh with 'fsdp'."""

    @functools.wraps(fn)
    def call(*args, **kwargs):
        with jax.set_mesh(mesh):
            return fn(*args, **kwargs)

    def lower(*args, **kwargs):
        with jax.set_mesh(mesh):
            return fn.lower(*args, **kwargs)

    call.lower = lower
    return call


def collective_bytes(hlo_text: str) -> dict[str, int]:
    """Bytes each device's collectives produce in one run of a compiled program, by kind (the
    result sizes of every all-gather, all-reduce, reduce-scatter, all-to-all and
    collective-permute), from `compiled.as_text()`. A loop body counts its known trip count times;
    of a conditional's branches the costliest counts. A loop without a known trip count counts
    once and is reported under 'loops of unknown trip count'."""
    computations: dict[str, list[str]] = {}
    entry, current = None, None
    for line in hlo_text.splitlines():
        if line and not line[0].isspace() and line.rstrip().endswith("{"):
            head = line.split("(", 1)[0].split()
            current = head[-1].lstrip("%")
            computations[current] = []
            if head[0] == "ENTRY":
                entry = current
        elif current is not None and line.startswith("  "):
            # Tuples of six or more print `/*index=5*/` markers, whose '=' ended the result type early.
            computations[current].append(re.sub(r"/\*.*?\*/", "", line))
    memo: dict[str, collections.Counter] = {}

    def total(name: str) -> collections.Counter:
        if name in memo:
            return memo[name]
        out: collections.Counter = collections.Counter()
        memo[name] = out  # guards against cycles, which HLO does not have
        for line in computations.get(name, ()):
            op = _COLLECTIVE.search(line)
            if op:
                out[op.group(2)] += _shape_bytes(op.group(1))
            if " while(" in line:
                trips = re.search(r'"known_trip_count":\{"n":"(\d+)"\}', line)
                if not trips:
                    out["loops of unknown trip count"] += 1
                body = re.search(r"body=%?([\w.\-]+)", line).group(1)
                for kind, n in total(body).items():
                    out[kind] += n * (int(trips.group(1)) if trips and kind != "loops of unknown trip count" else 1)
            elif " conditional(" in line:
                branches = re.findall(r"%?([\w.\-]+)", re.search(r"branch_computations=\{([^}]*)\}", line).group(1)) \
                    if "branch_computations" in line else re.findall(r"(?:true|false)_computation=%?([\w.\-]+)", line)
                costs = [total(b) for b in branches]
                if costs:
                    out.update(max(costs, key=lambda c: sum(v for k, v in c.items() if k != "loops of unknown trip count")))
            else:
                for callee in re.findall(r"\bcalls=%?([\w.\-]+)", line):
                    out.update(total(callee))
        return out

    return dict(total(entry)) if entry else {}


_COLLECTIVE = re.compile(
    r"= (\(?[^=]*?\)?) (all-gather|all-reduce|reduce-scatter|all-to-all|collective-permute)(?:-start)?\("
)
_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1, "bf16": 2, "f16": 2, "s16": 2, "u16": 2,
                "f32": 4, "s32": 4, "u32": 4, "f64": 8, "s64": 8, "u64": 8, "c64": 8, "c128": 16}


def _shape_bytes(shapes: str) -> int:
    """Bytes of an HLO result type: one array `f32[8,4]{1,0}` or a tuple of them."""
    n = 0
    for dtype, dims in re.findall(r"\b([a-z]+[0-9]*(?:e[0-9]m[0-9](?:fn)?)?)\[([0-9,]*)\]", shapes):
        if dtype in _DTYPE_BYTES:
            n += _DTYPE_BYTES[dtype] * int(np.prod([int(d) for d in dims.split(",") if d] or [1]))
    return n


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
    return NamedSharding(mesh, P(BATCH_AXES, *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def maybe_initialize_distributed() -> bool:
    """Start multi-host JAX when launched as one process of many.

    Runs `jax.distributed.initialize()` when the environment configures it:
      * by hand: JAX_COORDINATOR_ADDRESS (host:port of process 0) with JAX_NUM_PROCESSES and
        JAX_PROCESS_ID (JAX itself reads only the address and leaves the other two to a cluster);
      * a cluster JAX auto-detects: SLURM, Open MPI, or TPU pod slices (set PICO_MULTIHOST=1).
    Returns True when more than one process takes part. Call it before touching any device. On
    CPU hosts the processes need JAX_CPU_COLLECTIVES_IMPLEMENTATION=gloo to reduce across each other.
    Already initialized (a second call): nothing to do.
    """
    wanted = any(os.environ.get(k) for k in ("JAX_COORDINATOR_ADDRESS", "PICO_MULTIHOST")) or (
        int(os.environ.get("SLURM_NTASKS", "1")) > 1 or int(os.environ.get("OMPI_COMM_WORLD_SIZE", "1")) > 1
    )
    if wanted and not jax.distributed.is_initialized():
        kw = {}
        for flag, key in (("num_processes", "JAX_NUM_PROCESSES"), ("process_id", "JAX_PROCESS_ID")):
            if os.environ.get(key):
                try:
                    kw[flag] = int(os.environ[key])
                except ValueError:
                    raise MeshError(f"{key}={os.environ[key]!r} is not an integer") from None
        jax.distributed.initialize(**kw)
    return jax.process_count() > 1


def mesh_for_cli(spec: str, batch_size: int) -> Mesh:
    """The mesh of a command's --mesh flag, after starting multi-host JAX when the cluster asks for it;
    MeshError (naming --mesh or --batch-size) for a spec the devices or the batch do not fit."""
    maybe_initialize_distributed()
    mesh = make_mesh(spec)
    try:
        check_batch_size(batch_size, mesh)
    except MeshError as e:
        raise MeshError(f"{e}; --mesh {spec}") from None
    return mesh


def host_batch_slice(global_batch: int) -> tuple[int, int]:
    """This host's share of a global batch: (per-host batch size, first index)."""
    n, i = jax.process_count(), jax.process_index()
    if global_batch % n:
        raise MeshError(f"global batch {global_batch} is not divisible by the {n} hosts")
    per = global_batch // n
    return per, i * per
