"""Grain input pipeline for PICO training: episodes -> augmented, batched 2x2-canvas panels.

Source schema (what ``make_dataset`` reads): any random-access object with ``__len__`` and
``__getitem__(i) -> dict`` (a :class:`pico_jax.data.visrel.VisRelSource` from ``load_visrel``, a
:class:`FunctionSource`, a list of dicts...). Each example dict has

    ``"A"``, ``"A_out"``, ``"B"``, ``"B_out"``  H x W x 3 (or H x W, or H x W x 1/4) arrays, either
        uint8 in [0, 255] or floating point in [0, 1]; the four panels of one example share a shape,
        and without ``image_size`` all examples share it (it is the batch shape);
    ``"task_name"``  str, the task (relation family) name; ``task_id`` is its index in
        ``task_names`` (required);
    ``"augment_flip"``  bool, whether the relation survives a horizontal flip (optional, False).

Other keys (``task``, ``category``, ``output_kind``, ``task_id``, ``episode``) are ignored.

Batches (dicts of NumPy arrays, ``b = batch_size`` per host):

    ``"A"``, ``"A_out"``, ``"B"``, ``"B_out"``: float32 (b, S, S, 3) in [-1, 1]
    ``"task_id"``: int32 (b,), index into ``EpisodeDataset.task_names`` (sorted task names)

Pipeline (``grain.MapDataset`` -> ``IterDataset``; every step is index-based, so the iterator
state is just a position and training resumes on exactly the next batch)::

    source -> shuffle(seed) -> repeat(num_epochs) -> random_map(augment) -> [host::hosts]
           -> to_iter_dataset(threads) -> batch(drop_remainder) [-> mp_prefetch(workers)]

  (with workers, the host stream is first reordered so that the batches are those of no workers)

* Global shuffle: all hosts apply the same per-epoch permutation (a different one each epoch) of
  the whole source, and the global stream is cut into global batches of ``P * b`` positions, of
  which host ``h`` of ``P`` takes the ``h``-th block of ``b``: the hosts partition every epoch
  disjointly, and the global batch (the hosts' batches side by side, as
  ``jax.make_array_from_process_local_data`` lays them out) is exactly the batch one host with
  batch size ``P * b`` reads, in the same order -- so a run's data does not depend on how many
  hosts share it. With a finite ``num_epochs`` the stream is first truncated to a multiple of
  ``P`` (a last partial global batch is split evenly) so all hosts yield the same number of batches.
* Augmentation (``augment=True``), with a generator seeded by (seed, global position), so
  different per epoch and host but reproducible: with probability ``swap_prob`` the exemplar and
  query swap, ``(A, A') <-> (B, B')``; one random crop (area fraction ``crop_scale`` of the
  largest centered square, aspect ratio in ``crop_ratio``, uniform position) resized to
  ``image_size`` with an antialiased linear filter (PIL float32 ``BILINEAR``, sub-pixel box) is
  applied to all four panels; where the
  example's ``augment_flip`` is true, all four panels are flipped left-right together with
  probability ``flip_prob``. Resampling is linear, so a pixel-wise affine relation
  ``A_out = f(A)`` (e.g. inversion) and any per-channel relation survive exactly (up to float
  rounding). Without augmentation, panels are center-cropped to a square and resized to
  ``image_size`` only if needed.

Checkpointing: a batch is a function of its position in the host stream alone, so
``make_dataset(..., start_batch=n)`` resumes after n batches with any threads and workers (the
Trainer's way: n is its step). Or ``it = iter(ds)`` is a ``grain.DatasetIterator``;
``it.get_state()`` is a small JSON-able dict, ``it.set_state(state)`` restores it into an
iterator of the same pipeline and worker count (``state_to_bytes`` / ``state_from_bytes`` here;
or Orbax's ``grain.checkpoint.CheckpointSave(it)`` / ``CheckpointRestore(it)``).

Procedural episodes: wrap a generator function in :class:`FunctionSource`, e.g. for
``pico_jax.data.relations.sample_episode(family, seed, size)`` (an Episode with float32 [0, 1]
arrays ``A, A_out, B, B_out``)::

    fams = sorted(families)
    def example(i):  # top-level function (picklable) if worker_count > 0
        fam = fams[i % len(fams)]
        return episode_to_example(sample_episode(fam, seed=i, size=256), fam)
    ds = make_dataset(FunctionSource(example, length=10**7, task_names=fams), batch_size=8)
"""

from __future__ import annotations

import dataclasses
import json
import logging
from typing import Any, Callable, Iterator, Sequence

import grain
import numpy as np
from PIL import Image

log = logging.getLogger(__name__)

PANELS = ("A", "A_out", "B", "B_out")


# ------------------------------------------------------------------------------------------------
# Sources
# ------------------------------------------------------------------------------------------------


class FunctionSource:
    """Random-access source ``fn(index) -> example dict`` of a given length (for procedural data).

    ``task_names`` lists every task name ``fn`` may produce (the ``task_id`` vocabulary).
    """

    def __init__(self, fn: Callable[[int], dict[str, Any]], length: int, task_names: Sequence[str]):
        self.fn, self.length, self.task_names = fn, int(length), sorted(task_names)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not 0 <= index < self.length:
            raise IndexError(index)
        return self.fn(int(index))


def episode_to_example(episode: Any, task_name: str, *, augment_flip: bool = False, **extra: Any) -> dict[str, Any]:
    """Adapts an object (or dict) with ``A, A_out, B, B_out`` arrays to the source schema."""
    get = episode.__getitem__ if isinstance(episode, dict) else lambda k: getattr(episode, k)
    return {**{k: np.asarray(get(k)) for k in PANELS}, "task_name": task_name, "augment_flip": bool(augment_flip),
            **extra}


def _task_names_of(source: Any) -> list[str]:
    names = getattr(source, "task_names", None)
    if names is not None:
        return sorted(names)
    log.warning("source %r has no task_names; scanning all %d examples for task names", type(source).__name__,
                len(source))
    return sorted({source[i]["task_name"] for i in range(len(source))})


# ------------------------------------------------------------------------------------------------
# Geometry: one crop-and-resize for all four panels
# ------------------------------------------------------------------------------------------------


def crop_resize(panels: Sequence[np.ndarray], box: tuple[float, float, float, float], out_size: int) -> np.ndarray:
    """Crops ``box = (top, left, height, width)`` (float pixels) of each H x W x C panel, resizes to S x S.

    One antialiased linear (triangle) filter, PIL's float32 ``BILINEAR`` resampling with a
    sub-pixel box, applied per channel to every panel: values stay float32 (not rounded), the
    weights of every output pixel sum to 1, and the full box at the input size is the identity.
    Returns float32 (N, S, S, C) with the panels' raw values (uint8 panels are not rescaled).
    """
    top, left, bh, bw = box
    n, (h, w, c) = len(panels), panels[0].shape
    if (top, left, bh, bw) == (0, 0, h, w) and h == w == out_size:
        return np.stack([np.asarray(p, np.float32) for p in panels])
    out = np.empty((n, out_size, out_size, c), np.float32)
    pil_box = (left, top, left + bw, top + bh)
    for i, panel in enumerate(panels):
        for ch in range(c):
            im = Image.fromarray(np.ascontiguousarray(panel[..., ch], dtype=np.float32), mode="F")
            out[i, :, :, ch] = np.asarray(im.resize((out_size, out_size), Image.BILINEAR, box=pil_box))
    return out


def _as_hwc3(x: Any, key: str) -> tuple[np.ndarray, float]:
    """Panel as H x W x 3 (uint8 or float32) and the factor that maps its values to [0, 1]."""
    x = np.asarray(x)
    if x.ndim == 2:
        x = x[..., None]
    if x.ndim != 3 or x.shape[-1] not in (1, 3, 4):
        raise ValueError(f"panel {key!r}: expected H x W x 3 (or H x W, x1, x4), got shape {x.shape}")
    if x.shape[-1] == 1:
        x = np.repeat(x, 3, axis=-1)
    elif x.shape[-1] == 4:
        x = x[..., :3]
    if x.dtype == np.uint8:
        return x, 1.0 / 255.0
    if np.issubdtype(x.dtype, np.floating):
        return x.astype(np.float32, copy=False), 1.0
    raise ValueError(f"panel {key!r}: dtype must be uint8 ([0, 255]) or floating ([0, 1]), got {x.dtype}")


class _Process:
    """Per-example transform (picklable for multiprocessing workers)."""

    def __init__(self, task_index: dict[str, int], image_size: int | None, augment: bool,
                 crop_scale: tuple[float, float], crop_ratio: tuple[float, float], swap_prob: float,
                 flip_prob: float):
        self.task_index, self.image_size, self.augment = task_index, image_size, augment
        self.crop_scale, self.crop_ratio = crop_scale, crop_ratio
        self.swap_prob, self.flip_prob = swap_prob, flip_prob

    def __call__(self, ex: dict[str, Any], rng: np.random.Generator) -> dict[str, np.ndarray]:
        panels, scales = zip(*(_as_hwc3(ex[k], k) for k in PANELS))
        if len({p.shape for p in panels}) != 1:
            raise ValueError(f"the four panels of an example must share a shape, got {[p.shape for p in panels]}")
        h, w, _ = panels[0].shape
        side = min(h, w)
        out = self.image_size or side
        # Draw every random number unconditionally so the stream does not depend on the flags.
        u_swap, u_scale, u_ratio, u_y, u_x, u_flip = rng.random(6)
        order = [0, 1, 2, 3]
        if self.augment:
            if u_swap < self.swap_prob:
                order = [2, 3, 0, 1]
            lo, hi = self.crop_scale
            area = lo + (hi - lo) * u_scale
            lr0, lr1 = np.log(self.crop_ratio[0]), np.log(self.crop_ratio[1])
            ratio = float(np.exp(lr0 + (lr1 - lr0) * u_ratio))
            bw = min(float(w), side * np.sqrt(area * ratio))
            bh = min(float(h), side * np.sqrt(area / ratio))
            box = ((h - bh) * u_y, (w - bw) * u_x, bh, bw)
        else:
            box = ((h - side) // 2, (w - side) // 2, side, side)
        x = crop_resize([panels[i] for i in order], box, out)
        x *= np.array([2.0 * scales[i] for i in order], np.float32)[:, None, None, None]
        x -= 1.0
        np.clip(x, -1.0, 1.0, out=x)
        if self.augment and bool(ex.get("augment_flip", False)) and u_flip < self.flip_prob:
            x = x[:, :, ::-1]
        name = ex["task_name"]
        if isinstance(name, bytes):
            name = name.decode()
        try:
            tid = self.task_index[name]
        except KeyError:
            raise KeyError(f"task_name {name!r} is not in the task list ({len(self.task_index)} tasks)") from None
        return {**{k: np.ascontiguousarray(x[i]) for i, k in enumerate(PANELS)}, "task_id": np.int32(tid)}


# ------------------------------------------------------------------------------------------------
# Dataset
# ------------------------------------------------------------------------------------------------


class EpisodeDataset:
    """A batched episode stream for one host: ``iter(ds)`` gives a checkpointable grain iterator.

    Attributes: ``task_names`` (sorted; ``task_id`` indexes it), ``dataset`` (the
    ``grain.IterDataset`` of batches), ``batch_size`` (per host), ``shard_index``,
    ``shard_count``, ``num_examples`` (source length), ``steps_per_epoch`` (batches per host
    per epoch, approximate when the epoch length is not a multiple of the global batch).
    """

    def __init__(self, dataset: grain.IterDataset, task_names: list[str], batch_size: int, shard_index: int,
                 shard_count: int, num_examples: int):
        self.dataset, self.task_names, self.batch_size = dataset, task_names, batch_size
        self.shard_index, self.shard_count, self.num_examples = shard_index, shard_count, num_examples
        self.steps_per_epoch = num_examples // shard_count // batch_size

    def __iter__(self) -> grain.DatasetIterator:
        return iter(self.dataset)


def make_dataset(
    source: Any,
    *,
    batch_size: int,
    seed: int = 0,
    image_size: int | None = None,
    num_epochs: int | None = None,
    shuffle: bool = True,
    augment: bool = True,
    crop_scale: tuple[float, float] = (0.64, 1.0),
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3),
    swap_prob: float = 0.5,
    flip_prob: float = 0.5,
    task_names: Sequence[str] | None = None,
    shard_index: int | None = None,
    shard_count: int | None = None,
    drop_remainder: bool = True,
    num_threads: int = 4,
    prefetch_buffer_size: int = 32,
    worker_count: int = 0,
    start_batch: int = 0,
) -> EpisodeDataset:
    """Builds this host's batched, augmented episode stream from a random-access ``source``.

    See the module docstring for the source / batch schema and the pipeline. ``num_epochs=None``
    repeats forever. ``shard_index`` / ``shard_count`` default to ``jax.process_index()`` /
    ``jax.process_count()``. ``task_names`` defaults to ``source.task_names`` (else a scan of the
    source). ``num_threads`` / ``prefetch_buffer_size`` are grain ``ReadOptions``;
    ``worker_count > 0`` adds ``mp_prefetch`` worker processes, each running ``num_threads`` read
    threads (the source and its functions must then be picklable). The batches are the same as
    without workers (``_WorkerOrder``; on a finite stream, all but the last ``worker_count``
    batches), but the iterator state is grain's per-worker one, which only an iterator with the
    same ``worker_count`` can restore. Close the iterator with ``it.close()`` when done (it stops
    the workers). ``start_batch = n`` starts the stream at its batch n: the batches an iterator
    yields after n batches, whatever the threads and workers, so a position alone resumes a stream.
    """
    if worker_count < 0:
        raise ValueError(f"worker_count must be >= 0, got {worker_count}")
    if start_batch < 0:
        raise ValueError(f"start_batch must be >= 0, got {start_batch}")
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if not 0 <= seed < 2**32:
        raise ValueError(f"seed must be in [0, 2**32), got {seed}")
    if shard_index is None or shard_count is None:
        import jax

        shard_index = jax.process_index() if shard_index is None else shard_index
        shard_count = jax.process_count() if shard_count is None else shard_count
    if not 0 <= shard_index < shard_count:
        raise ValueError(f"need 0 <= shard_index < shard_count, got {shard_index}, {shard_count}")
    if not (0 < crop_scale[0] <= crop_scale[1] <= 1):
        raise ValueError(f"crop_scale must satisfy 0 < lo <= hi <= 1, got {crop_scale}")
    if not (0 < crop_ratio[0] <= crop_ratio[1]):
        raise ValueError(f"crop_ratio must satisfy 0 < lo <= hi, got {crop_ratio}")
    n = len(source)
    if n == 0:
        raise ValueError("the source is empty")
    names = sorted(task_names) if task_names is not None else _task_names_of(source)
    process = _Process({t: i for i, t in enumerate(names)}, image_size, augment, tuple(crop_scale),
                       tuple(crop_ratio), swap_prob, flip_prob)

    ds = grain.MapDataset.source(source)
    if shuffle:
        ds = ds.shuffle(seed=seed)
    ds = ds.repeat(num_epochs)
    ds = ds.random_map(process, seed=(seed * 0x9E3779B1 + 0x7F4A7C15) % 2**32)
    total = len(ds)
    if num_epochs is not None:
        total -= total % shard_count
    positions = _HostPositions(total, batch_size, shard_count, shard_index)
    if start_batch:
        positions = _From(positions, start_batch * batch_size)
    if worker_count > 0:
        positions = _WorkerOrder(positions, worker_count, batch_size)
    ds = grain.MapDataset.range(len(positions)).map(_Read(ds, positions))
    ids = ds.to_iter_dataset(grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=prefetch_buffer_size))
    ids = ids.batch(batch_size, drop_remainder=drop_remainder)
    if worker_count > 0:
        # grain 0.2.x reads an absl flag in mp_prefetch workers and fails if the program never
        # parsed absl flags (google/grain#1355); treat unparsed flags as defaults then.
        from absl import flags

        if not flags.FLAGS.is_parsed():
            flags.FLAGS.mark_as_parsed()
        ids = ids.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count))
    return EpisodeDataset(ids, names, batch_size, shard_index, shard_count, n)


@dataclasses.dataclass(frozen=True)
class _HostPositions:
    """Host ``host`` of ``hosts``: its j-th element is global stream position ``self[j]`` (see the
    module docstring: block ``host`` of every global batch of ``hosts * batch`` positions)."""

    total: int
    batch: int
    hosts: int
    host: int

    def __len__(self) -> int:
        full, rest = divmod(self.total, self.batch * self.hosts)
        return full * self.batch + rest // self.hosts

    def __getitem__(self, j: int) -> int:
        b, global_batch = self.batch, self.batch * self.hosts
        k, r = divmod(j, b)
        full = self.total // global_batch
        if k < full:
            return k * global_batch + self.host * b + r
        tail = (self.total - full * global_batch) // self.hosts  # the last, partial global batch
        return full * global_batch + self.host * tail + (j - full * b)


@dataclasses.dataclass(frozen=True)
class _From:
    """The host stream from its element ``start`` on (empty past its end)."""

    positions: Any
    start: int

    def __len__(self) -> int:
        return max(len(self.positions) - self.start, 0)

    def __getitem__(self, j: int) -> int:
        return self.positions[self.start + j]


@dataclasses.dataclass(frozen=True)
class _WorkerOrder:
    """The host stream reordered so that ``mp_prefetch`` workers yield the batches of no workers.

    grain gives worker ``w`` of ``W`` the elements ``j = w + W*m`` (m = 0, 1, ...), which it
    batches ``b`` at a time, and yields the workers' batches round robin: output batch ``n`` is
    batch ``n // W`` of worker ``n % W``. Element ``j`` therefore lands in output batch
    ``(m // b) * W + w`` at row ``m % b``, so it is given that batch's row of the host stream.
    Each group of ``W * b`` elements is permuted within itself; a last, incomplete group (finite
    streams only) is left as it is, so its few batches are grouped by worker."""

    positions: Any
    workers: int
    batch: int

    def __len__(self) -> int:
        return len(self.positions)

    def __getitem__(self, j: int) -> int:
        group = self.workers * self.batch
        if j >= len(self) // group * group:
            return self.positions[j]
        w, m = j % self.workers, j // self.workers
        return self.positions[((m // self.batch) * self.workers + w) * self.batch + m % self.batch]


@dataclasses.dataclass(frozen=True)
class _Read:
    """Index j of this host's stream → the element at its global position (picklable, for workers)."""

    ds: Any
    positions: _HostPositions

    def __call__(self, j: int) -> Any:
        return self.ds[self.positions[int(j)]]


# ------------------------------------------------------------------------------------------------
# Iterator state
# ------------------------------------------------------------------------------------------------


def state_to_bytes(iterator: grain.DatasetIterator) -> bytes:
    """Serializes a grain iterator's position (JSON bytes)."""
    return json.dumps(iterator.get_state(), sort_keys=True).encode()


def state_from_bytes(iterator: grain.DatasetIterator, state: bytes | str) -> grain.DatasetIterator:
    """Restores ``iterator`` (a fresh ``iter(ds)`` of the same pipeline) to a saved position."""
    iterator.set_state(json.loads(state))
    return iterator


def close_iterator(iterator: Any) -> None:
    """Stops an iterator's worker processes (``worker_count > 0``); grain releases its threads too.
    A no-op for iterators without ``close`` (grain before it had one: ``grain>=0.2.10`` is allowed)."""
    close = getattr(iterator, "close", None)
    if close is not None:
        close()


def take(iterator: Iterator[Any], n: int) -> list[Any]:
    """The next ``n`` batches of an iterator (helper for tests and evaluation)."""
    return [next(iterator) for _ in range(n)]
