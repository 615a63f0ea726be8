"""FLUX text conditioning: T5 v1.1 XXL token embeddings + CLIP-L pooled embedding, and an on-disk cache.

`TextEncoders.encode` reproduces diffusers' `FluxPipeline.encode_prompt`:
  * T5: tokenizer(padding="max_length", max_length=t5_max_length, truncation=True), and the encoder
    is called WITHOUT an attention mask (padding tokens are attended to, as FluxPipeline does);
  * CLIP: tokenizer(padding="max_length", max_length=77, truncation=True), no attention mask,
    the pooled (end-of-text, final-layer-norm) output;
  * text_ids: zeros (L, 3).

Prompt embeddings are deterministic in (prompt, checkpoint, dtype, max length), so `PromptCache`
stores them on disk and `cached_encode` loads the 9 GB T5 only when some prompt is missing.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from pico_jax.model.clip import CLIPTextEncoder, load_clip_text_encoder
from pico_jax.model.t5 import T5Encoder, load_t5_encoder
from pico_jax.parallel import (
    batch_sharding,
    data_parallel_size,
    global_array,
    param_placer,
    replicated,
    shard_module,
)
from pico_jax.safetensors_io import CheckpointError, SafetensorsReader, read_config, save_safetensors_atomic

logger = logging.getLogger(__name__)

Dtype = Any

# FluxPipeline.check_inputs rejects longer T5 sequences.
MAX_T5_LENGTH = 512
CLIP_MAX_LENGTH = 77

_TOKENIZER_MARKERS = ("tokenizer.json", "tokenizer_config.json", "spiece.model", "vocab.json")


# ----------------------------------------------------------------------------------------------
# Tokenizers
# ----------------------------------------------------------------------------------------------


def _tokenizer_candidates(path: Path) -> list[Path]:
    cands = [path, path / "tokenizer"]
    # diffusers pipeline layout: text_encoder/ + tokenizer/, text_encoder_2/ + tokenizer_2/ side by side.
    if "text_encoder" in path.name:
        cands.append(path.parent / path.name.replace("text_encoder", "tokenizer"))
    return cands


def find_tokenizer_dir(path: str | os.PathLike) -> Path:
    """The directory holding the tokenizer for a checkpoint: the checkpoint dir itself, its `tokenizer/`
    subfolder, or (diffusers layout) the sibling `tokenizer*/` of a `text_encoder*/` folder."""
    path = Path(path)
    cands = _tokenizer_candidates(path)
    for c in cands:
        if c.is_dir() and any((c / m).exists() for m in _TOKENIZER_MARKERS):
            return c
    raise CheckpointError(
        f"{path}: no tokenizer found (looked for any of {list(_TOKENIZER_MARKERS)} in "
        f"{[str(c) for c in cands]})"
    )


def load_tokenizer(path: str | os.PathLike) -> Any:
    """`transformers.AutoTokenizer` from local files only (never a hub)."""
    from transformers import AutoTokenizer

    tdir = find_tokenizer_dir(path)
    try:
        return AutoTokenizer.from_pretrained(str(tdir), local_files_only=True)
    except Exception as e:  # transformers raises many types (OSError, ValueError, ...) for broken files
        raise CheckpointError(f"{tdir}: cannot load tokenizer ({type(e).__name__}: {e})") from e


def tokenize(tokenizer: Any, prompts: Sequence[str], max_length: int, what: str = "") -> np.ndarray:
    """(B, max_length) int32 ids, padded to max_length and truncated, as FluxPipeline tokenizes."""
    ids = tokenizer(
        list(prompts), padding="max_length", max_length=max_length, truncation=True, return_tensors="np"
    )["input_ids"]
    # Same courtesy as diffusers: say when a prompt was cut.
    lengths = [len(x) for x in tokenizer(list(prompts), padding=False, truncation=False)["input_ids"]]
    cut = [p for p, n in zip(prompts, lengths) if n > max_length]
    if cut:
        logger.warning("%s prompt(s) truncated to %d tokens: %s", what, max_length, [p[:60] for p in cut])
    return np.asarray(ids, dtype=np.int32)


# ----------------------------------------------------------------------------------------------
# Encoder identity (for the cache)
# ----------------------------------------------------------------------------------------------

_SAMPLE_BYTES = 1 << 20
_VOLATILE_CONFIG_KEYS = ("transformers_version", "_name_or_path", "_commit_hash", "_diffusers_version")


def checkpoint_fingerprint(path: str | os.PathLike) -> str:
    """A cheap content fingerprint of a safetensors checkpoint directory (no tensor is loaded).

    Hashes the config (minus bookkeeping keys), and for every safetensors file its name, size, full
    header (tensor names, dtypes, shapes, offsets, metadata) and 1 MiB from the start and end of its
    data, so two fine-tunes of the same architecture do not collide.
    """
    h = hashlib.sha256()
    cfg = {k: v for k, v in read_config(path).items() if k not in _VOLATILE_CONFIG_KEYS}
    h.update(json.dumps(cfg, sort_keys=True).encode())
    for f in SafetensorsReader(path).files:  # validates the files and resolves shards
        size = f.stat().st_size
        h.update(f"{f.name}:{size}".encode())
        with open(f, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            h.update(fh.read(n))
            start = 8 + n
            h.update(fh.read(_SAMPLE_BYTES))
            fh.seek(max(start, size - _SAMPLE_BYTES))
            h.update(fh.read(_SAMPLE_BYTES))
    return h.hexdigest()


def tokenizer_fingerprint(path: str | os.PathLike) -> str:
    """Hash of the tokenizer's files (the small json / model / txt files in its directory)."""
    tdir = find_tokenizer_dir(path)
    h = hashlib.sha256()
    for f in sorted(tdir.iterdir()):
        if f.is_file() and f.suffix in (".json", ".model", ".txt") and not f.name.endswith(".safetensors.index.json"):
            h.update(f.name.encode())
            h.update(f.read_bytes())
    return h.hexdigest()


def encoder_identity(
    t5_path: str | os.PathLike,
    clip_path: str | os.PathLike,
    dtype: Dtype,
    *,
    clip_max_length: int = CLIP_MAX_LENGTH,
) -> str:
    """Identity of a text-encoder setup: both checkpoints, both tokenizers, the compute dtype, CLIP length.

    The T5 max length is not part of it; the cache keys on it separately.
    """
    parts = {
        "t5": checkpoint_fingerprint(t5_path),
        "t5_tokenizer": tokenizer_fingerprint(t5_path),
        "clip": checkpoint_fingerprint(clip_path),
        "clip_tokenizer": tokenizer_fingerprint(clip_path),
        "dtype": jnp.dtype(dtype).name,
        "clip_max_length": clip_max_length,
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:32]


# ----------------------------------------------------------------------------------------------
# Encoders
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TextEmbeddings:
    """FLUX text conditioning for a batch of prompts."""

    prompt_embeds: jax.Array  # (B, L, d_t5) T5 hidden states, L = T5 max length
    pooled_prompt_embeds: jax.Array  # (B, d_clip) CLIP pooled output
    text_ids: jax.Array  # (L, 3) zeros: FLUX's rotary position ids of the text tokens


def _constrain(x: jax.Array, sharding: Any) -> jax.Array:
    return x if sharding is None else jax.lax.with_sharding_constraint(x, sharding)


@functools.partial(jax.jit, static_argnums=(0, 3))
def _run_t5(graphdef: nnx.GraphDef, state: nnx.State, ids: jax.Array, out_sharding: Any = None) -> jax.Array:
    # No attention mask: FluxPipeline passes none to T5.
    return _constrain(nnx.merge(graphdef, state)(ids), out_sharding)


@functools.partial(jax.jit, static_argnums=(0, 3))
def _run_clip_pooled(graphdef: nnx.GraphDef, state: nnx.State, ids: jax.Array, out_sharding: Any = None) -> jax.Array:
    return _constrain(nnx.merge(graphdef, state)(ids)[1], out_sharding)


class TextEncoders:
    """T5 + CLIP text encoders with their tokenizers; `encode` gives FluxPipeline's conditioning.

    With `mesh`, both encoders' parameters are sharded over it by `pico_jax.parallel`'s rules (T5-XXL
    is 9.5 GB in bf16; each of N devices then holds about 1/N of it) and `encode` returns embeddings
    replicated on the mesh, readable on every host. The values are those of the unsharded encoders.
    """

    def __init__(
        self,
        t5: T5Encoder,
        clip: CLIPTextEncoder,
        t5_tokenizer: Any,
        clip_tokenizer: Any,
        *,
        t5_max_length: int = MAX_T5_LENGTH,
        clip_max_length: int = CLIP_MAX_LENGTH,
        identity: str = "",
        mesh: Mesh | None = None,
    ):
        if not 0 < t5_max_length <= MAX_T5_LENGTH:
            raise ValueError(
                f"t5_max_length must be in 1..{MAX_T5_LENGTH} (as FluxPipeline requires), got {t5_max_length}"
            )
        if clip_max_length > clip.config.max_position_embeddings:
            raise ValueError(
                f"clip_max_length {clip_max_length} exceeds CLIP's max_position_embeddings "
                f"{clip.config.max_position_embeddings}"
            )
        self.t5, self.clip = t5, clip
        self.t5_tokenizer, self.clip_tokenizer = t5_tokenizer, clip_tokenizer
        self.t5_max_length, self.clip_max_length = t5_max_length, clip_max_length
        self.identity = identity
        self.mesh = mesh
        if mesh is not None:  # a no-op for parameters a loader already placed on it
            t5, clip = shard_module(t5, mesh), shard_module(clip, mesh)
            self.t5, self.clip = t5, clip
        self._t5_split = nnx.split(t5)
        self._clip_split = nnx.split(clip)

    @property
    def dtype(self) -> Dtype:
        return self.t5.dtype

    def tokenize(self, prompts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """(T5 ids (B, t5_max_length), CLIP ids (B, clip_max_length)), int32."""
        return (
            tokenize(self.t5_tokenizer, prompts, self.t5_max_length, "T5"),
            tokenize(self.clip_tokenizer, prompts, self.clip_max_length, "CLIP"),
        )

    def encode(self, prompts: Sequence[str]) -> TextEmbeddings:
        """Encode a batch of prompts (one forward of each encoder; the batch size is a compiled shape)."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if not prompts:
            raise ValueError("encode() needs at least one prompt")
        t5_ids, clip_ids = self.tokenize(prompts)
        if self.mesh is None:
            embeds = _run_t5(*self._t5_split, jnp.asarray(t5_ids))
            pooled = _run_clip_pooled(*self._clip_split, jnp.asarray(clip_ids))
        else:  # every host holds the same token ids; the result is replicated, so every host can read it.
            # Traced under the mesh, so each layer's weights are gathered over 'fsdp' as it runs. A batch
            # the mesh's data x fsdp devices divide is split over them (each encodes its share, as the
            # transformer's batches are split); another (PICO's single prompt) runs whole on each.
            everywhere = replicated(self.mesh)
            split = len(prompts) % data_parallel_size(self.mesh) == 0
            ids_on = lambda ids: global_array(ids, batch_sharding(self.mesh, 2) if split else everywhere)
            with jax.set_mesh(self.mesh):
                embeds = _run_t5(*self._t5_split, ids_on(t5_ids), everywhere)
                pooled = _run_clip_pooled(*self._clip_split, ids_on(clip_ids), everywhere)
        return TextEmbeddings(embeds, pooled, jnp.zeros((t5_ids.shape[1], 3), embeds.dtype))


def load_text_encoders(
    t5_path: str | os.PathLike,
    clip_path: str | os.PathLike,
    dtype: Dtype = jnp.bfloat16,
    t5_max_length: int = MAX_T5_LENGTH,
    *,
    clip_max_length: int = CLIP_MAX_LENGTH,
    mesh: Mesh | None = None,
) -> TextEncoders:
    """Load T5 + CLIP from HF checkpoint dirs (tokenizer in the dir, its `tokenizer/`, or diffusers' sibling).

    With `mesh` every parameter goes straight onto its shards as it is read (see `TextEncoders`)."""
    # Tokenizers first: a missing tokenizer should fail before minutes of weight loading.
    t5_tok, clip_tok = load_tokenizer(t5_path), load_tokenizer(clip_path)
    identity = encoder_identity(t5_path, clip_path, dtype, clip_max_length=clip_max_length)
    place = None if mesh is None else param_placer(mesh)
    return TextEncoders(
        load_t5_encoder(t5_path, dtype=dtype, place=place),
        load_clip_text_encoder(clip_path, dtype=dtype, place=place),
        t5_tok,
        clip_tok,
        t5_max_length=t5_max_length,
        clip_max_length=clip_max_length,
        identity=identity,
        mesh=mesh,
    )


@dataclasses.dataclass
class TextEncoderLoader:
    """A zero-argument loader for `cached_encode` that knows its cache identity without loading weights."""

    t5_path: str | os.PathLike
    clip_path: str | os.PathLike
    dtype: Dtype = jnp.bfloat16
    t5_max_length: int = MAX_T5_LENGTH
    clip_max_length: int = CLIP_MAX_LENGTH
    mesh: Mesh | None = None  # shard the encoders over it (the embeddings, and so the cache, are the same)

    @functools.cached_property
    def identity(self) -> str:
        return encoder_identity(self.t5_path, self.clip_path, self.dtype, clip_max_length=self.clip_max_length)

    def __call__(self) -> TextEncoders:
        return load_text_encoders(
            self.t5_path, self.clip_path, self.dtype, self.t5_max_length,
            clip_max_length=self.clip_max_length, mesh=self.mesh,
        )


# ----------------------------------------------------------------------------------------------
# Cache
# ----------------------------------------------------------------------------------------------


class PromptCache:
    """Prompt embeddings on disk, one safetensors file per (prompt, encoder identity, T5 max length).

    Files are written via a temporary name and `os.replace`, so concurrent writers and crashes never
    leave a half-written entry; an unreadable or mismatching entry counts as a miss.
    """

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)

    @staticmethod
    def _meta(prompt: str, identity: str, max_length: int) -> dict[str, str]:
        return {"prompt": prompt, "encoder": identity, "max_length": str(int(max_length))}

    def entry_path(self, prompt: str, identity: str, max_length: int) -> Path:
        key = hashlib.sha256(json.dumps(self._meta(prompt, identity, max_length), sort_keys=True).encode())
        return self.directory / f"{key.hexdigest()}.safetensors"

    def get(self, prompt: str, identity: str, max_length: int) -> tuple[np.ndarray, np.ndarray] | None:
        """(prompt_embeds (L, d), pooled (d,)) or None."""
        path = self.entry_path(prompt, identity, max_length)
        if not path.exists():
            return None
        try:
            r = SafetensorsReader(path)
            if r.metadata() != self._meta(prompt, identity, max_length):
                return None
            return r["prompt_embeds"], r["pooled_prompt_embeds"]
        except (CheckpointError, OSError, KeyError) as e:
            logger.warning("ignoring unreadable prompt cache entry %s (%s)", path, e)
            return None

    def put(
        self, prompt: str, identity: str, max_length: int, prompt_embeds: np.ndarray, pooled: np.ndarray
    ) -> None:
        save_safetensors_atomic(
            {"prompt_embeds": np.asarray(prompt_embeds), "pooled_prompt_embeds": np.asarray(pooled)},
            self.entry_path(prompt, identity, max_length),
            metadata=self._meta(prompt, identity, max_length),
        )


def cached_encode(
    prompts: Sequence[str],
    encoders: TextEncoders | Callable[[], TextEncoders],
    cache: PromptCache,
    *,
    identity: str | None = None,
    max_length: int | None = None,
    batch_size: int = 8,
) -> TextEmbeddings:
    """`encode(prompts)` through the cache; encoders are loaded (if given a loader) only on a miss.

    `encoders` is a `TextEncoders` or a zero-argument callable returning one. The cache identity and
    T5 max length come from the encoders / the loader's `identity` and `t5_max_length` attributes
    (`TextEncoderLoader` has both), or from the `identity` / `max_length` arguments.
    """
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not prompts:
        raise ValueError("cached_encode() needs at least one prompt")
    identity = identity if identity is not None else getattr(encoders, "identity", None)
    max_length = max_length if max_length is not None else getattr(encoders, "t5_max_length", None)
    if not identity or max_length is None:
        raise ValueError(
            "cached_encode needs the encoder identity and T5 max length: pass a TextEncoders, a "
            "TextEncoderLoader, or identity=/max_length= with a plain loader callable"
        )

    found = {p: cache.get(p, identity, max_length) for p in dict.fromkeys(prompts)}
    missing = [p for p, v in found.items() if v is None]
    if missing:
        enc = encoders if isinstance(encoders, TextEncoders) else encoders()
        if enc.t5_max_length != max_length:
            raise ValueError(f"loaded encoders use t5_max_length={enc.t5_max_length}, the cache key says {max_length}")
        for i in range(0, len(missing), batch_size):
            chunk = missing[i : i + batch_size]
            out = enc.encode(chunk)
            embeds, pooled = np.asarray(out.prompt_embeds), np.asarray(out.pooled_prompt_embeds)
            for j, p in enumerate(chunk):
                cache.put(p, identity, max_length, embeds[j], pooled[j])
                found[p] = (embeds[j], pooled[j])

    embeds = jnp.asarray(np.stack([found[p][0] for p in prompts]))
    pooled = jnp.asarray(np.stack([found[p][1] for p in prompts]))
    return TextEmbeddings(embeds, pooled, jnp.zeros((embeds.shape[1], 3), embeds.dtype))


__all__: Sequence[str] = (
    "TextEmbeddings",
    "TextEncoders",
    "TextEncoderLoader",
    "load_text_encoders",
    "PromptCache",
    "cached_encode",
    "encoder_identity",
    "checkpoint_fingerprint",
    "find_tokenizer_dir",
)
