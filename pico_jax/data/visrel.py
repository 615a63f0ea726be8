"""VisRel: a TFDS builder (no TensorFlow needed) for folders of visual-relation episodes.

Source folder format (written by the procedural generator or by hand)::

    root/<task_name>/task.json
        {"label": "<short task label>", "category": "<category>",
         "output_kind": "image" | "mask", "augment_flip": true | false}
    root/<task_name>/quads/<id>.A.png  <id>.A_out.png  <id>.B.png  <id>.B_out.png   (full episodes)
    root/<task_name>/pairs/<id>.input.png  <id>.output.png                           (pairs)

A task may have ``quads/``, ``pairs/`` or both. Images may be RGB / RGBA / gray / palette PNG or
JPEG (``.png``, ``.jpg``, ``.jpeg``, case-insensitive) of any size. ``<id>`` may contain dots.
Hidden files and folders (name starting with ``.``) and plain files directly under ``root`` are
ignored; any other file in ``quads/`` or ``pairs/`` whose name does not follow the pattern is an
error (so typos such as ``003.Aout.png`` do not silently drop data). In ``task.json`` only
``label`` is required; defaults are ``category=""``, ``output_kind="image"``,
``augment_flip=false`` (flipping is off unless the task says the relation is flip-invariant).

Resize policy (the same for all four panels of every episode): the image is first converted to
RGB (gray is replicated; an alpha channel is composited onto white; 16-bit gray is scaled to 8
bits; the EXIF orientation of JPEGs is applied), then center-cropped to a square of side
``min(width, height)`` and resized to ``size x size`` (``resize_mode="center_crop"``, default), or
resized to ``size x size`` ignoring the aspect ratio (``resize_mode="stretch"``). Resampling is
antialiased bicubic for ``output_kind="image"`` tasks and antialiased bilinear (no overshoot /
ringing at hard edges) for ``output_kind="mask"`` tasks. Panels are stored as PNG (lossless).

Pair expansion: every quad is one episode. A task's pairs, sorted by id, p_0..p_{n-1}, form the
episodes (exemplar p_i, query p_j), i != j: each pair is the query of
``min(n - 1, exemplars_per_query)`` episodes (default 8, ``None`` = all n(n-1) ordered pairs),
with its exemplars drawn without replacement by a NumPy generator seeded with
(crc32(task_name), j) -- deterministic, independent of the order of files on disk, and of the
other tasks. The input pipeline's exemplar/query swap augmentation adds the reversed roles.

Splits: everything goes to ``train`` (use TFDS split slicing such as ``"train[:90%]"`` to hold
out a part; held-out task families are separate source folders, built as separate datasets).

Features per example: ``A``, ``A_out``, ``B``, ``B_out`` (``tfds.features.Image``, uint8
``size x size x 3``), ``task`` (the label), ``task_name`` (the folder name), ``task_id``
(``ClassLabel`` over the sorted task names), ``category``, ``output_kind``, ``augment_flip``
(bool), ``episode`` (``"quads/<id>"`` or ``"pairs/<id_i>|<id_j>"``, for debugging).

No TensorFlow: TFDS 4.9.10 generates ``array_record`` files with its pure-Python writer when
the builder uses ``file_format="array_record"`` and the generator yields encoded image bytes
(Image features encode/validate PNG bytes with PIL when TF is absent), and
``builder.as_data_source()`` reads them back through ``array_record`` + PIL decoding. The
``DatasetInfo`` is built directly (not via ``dataset_info_from_configs``, which would look for
TFDS package metadata files next to this module). Nothing here imports ``tensorflow``; the tests
check ``"tensorflow" not in sys.modules`` after build + read.

Public API::

    build_visrel(src_dir, data_dir, size=256, *, name=None, exemplars_per_query=8,
                 resize_mode="center_crop", overwrite=None) -> VisRel   (prepared builder)
    load_visrel(data_dir, name=None, split="train", *, size=None) -> VisRelSource  (random access)
    scan_visrel(src_dir) -> list[TaskSpec]                                (validation only)
"""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import io
import json
import logging
import os
import re
import zlib
from collections import OrderedDict
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import tensorflow_datasets as tfds
from etils import epath
from PIL import Image, ImageOps

log = logging.getLogger(__name__)

IMAGE_EXTS = (".png", ".jpg", ".jpeg")
QUAD_ROLES = ("A", "A_out", "B", "B_out")
PAIR_ROLES = ("input", "output")
OUTPUT_KINDS = ("image", "mask")
RESIZE_MODES = ("center_crop", "stretch")
PANELS = QUAD_ROLES
_FINGERPRINT_FILE = "visrel_source.json"


class VisRelError(ValueError):
    """A problem with a VisRel source folder or dataset; the message names the offending file."""


# ------------------------------------------------------------------------------------------------
# Folder scanning and validation (no image decoding)
# ------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TaskSpec:
    name: str
    dir: Path
    label: str
    category: str
    output_kind: str
    augment_flip: bool
    quads: tuple[tuple[str, dict[str, Path]], ...]  # (id, {role: path}) sorted by id
    pairs: tuple[tuple[str, Path, Path], ...]  # (id, input path, output path) sorted by id


def _read_task_json(task_dir: Path) -> dict[str, Any]:
    path = task_dir / "task.json"
    if not path.is_file():
        raise VisRelError(f"task folder {task_dir} has no task.json (expected {path})")
    try:
        meta = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise VisRelError(f"cannot parse {path}: {e}") from e
    if not isinstance(meta, dict):
        raise VisRelError(f"{path}: expected a JSON object, got {type(meta).__name__}")
    label = meta.get("label")
    if not isinstance(label, str) or not label:
        raise VisRelError(f'{path}: "label" must be a non-empty string, got {label!r}')
    category = meta.get("category", "")
    if not isinstance(category, str):
        raise VisRelError(f'{path}: "category" must be a string, got {category!r}')
    output_kind = meta.get("output_kind", "image")
    if output_kind not in OUTPUT_KINDS:
        raise VisRelError(f'{path}: "output_kind" must be one of {OUTPUT_KINDS}, got {output_kind!r}')
    augment_flip = meta.get("augment_flip", False)
    if not isinstance(augment_flip, bool):
        raise VisRelError(f'{path}: "augment_flip" must be true or false, got {augment_flip!r}')
    return dict(label=label, category=category, output_kind=output_kind, augment_flip=augment_flip)


def _group_files(folder: Path, roles: Sequence[str]) -> dict[str, dict[str, Path]]:
    """Groups ``<id>.<role>.<ext>`` files of ``folder`` by id; errors name the offending file."""
    groups: dict[str, dict[str, Path]] = {}
    for path in sorted(folder.iterdir()):
        if path.name.startswith("."):
            continue
        if not path.is_file():
            raise VisRelError(f"unexpected non-file {path} (expected <id>.<role>.png/jpg files)")
        stem, ext = os.path.splitext(path.name)
        pieces = stem.rsplit(".", 1)
        if ext.lower() not in IMAGE_EXTS or len(pieces) != 2 or pieces[1] not in roles or not pieces[0]:
            raise VisRelError(
                f"unexpected file {path}: names in {folder.name}/ must be <id>.<role><ext> with role in "
                f"{tuple(roles)} and ext in {IMAGE_EXTS}"
            )
        ep_id, role = pieces
        group = groups.setdefault(ep_id, {})
        if role in group:
            raise VisRelError(f"duplicate {role!r} image for id {ep_id!r}: {group[role]} and {path}")
        group[role] = path
    return groups


def _scan_task(task_dir: Path) -> TaskSpec:
    meta = _read_task_json(task_dir)
    quads: list[tuple[str, dict[str, Path]]] = []
    pairs: list[tuple[str, Path, Path]] = []
    qdir, pdir = task_dir / "quads", task_dir / "pairs"
    if qdir.is_dir():
        for ep_id, group in sorted(_group_files(qdir, QUAD_ROLES).items()):
            missing = [r for r in QUAD_ROLES if r not in group]
            if missing:
                have = ", ".join(str(p) for p in group.values())
                raise VisRelError(
                    f"incomplete quad {ep_id!r} in {qdir}: missing {', '.join(f'{ep_id}.{r}.png' for r in missing)} "
                    f"(found {have})"
                )
            quads.append((ep_id, group))
    if pdir.is_dir():
        for ep_id, group in sorted(_group_files(pdir, PAIR_ROLES).items()):
            if len(group) != 2:
                (role, path), = group.items()
                other = "output" if role == "input" else "input"
                raise VisRelError(f"mismatched pair file {path}: no matching {ep_id}.{other}.<png|jpg> in {pdir}")
            pairs.append((ep_id, group["input"], group["output"]))
    if not quads and len(pairs) < 2:
        raise VisRelError(
            f"task {task_dir} has no quads and {len(pairs)} pair(s); it needs quads/ episodes or at least "
            "two pairs/ to form an episode"
        )
    return TaskSpec(name=task_dir.name, dir=task_dir, quads=tuple(quads), pairs=tuple(pairs), **meta)


def scan_visrel(src_dir: str | os.PathLike) -> list[TaskSpec]:
    """Scans and validates a VisRel source folder (structure only; images are decoded at build)."""
    root = Path(src_dir)
    if not root.is_dir():
        raise VisRelError(f"VisRel source folder {root} does not exist or is not a directory")
    tasks = [_scan_task(d) for d in sorted(root.iterdir()) if d.is_dir() and not d.name.startswith(".")]
    if not tasks:
        raise VisRelError(f"VisRel source folder {root} contains no task folders")
    return tasks


def pair_episodes(task_name: str, num_pairs: int, exemplars_per_query: int | None = 8) -> list[tuple[int, int]]:
    """Deterministic (exemplar index, query index) list for a task with ``num_pairs`` pairs."""
    n = num_pairs
    if n < 2:
        return []
    k = n - 1 if exemplars_per_query is None else min(n - 1, int(exemplars_per_query))
    if k <= 0:
        return []
    out = []
    for j in range(n):
        if k == n - 1:
            others = [i for i in range(n) if i != j]
        else:
            rng = np.random.default_rng([zlib.crc32(task_name.encode()), j])
            picks = np.sort(rng.choice(n - 1, size=k, replace=False))
            others = [int(i) + (i >= j) for i in picks]
        out.extend((i, j) for i in others)
    return out


def source_fingerprint(tasks: Sequence[TaskSpec], **settings: Any) -> str:
    """Hash of file names, sizes and mtimes of a scan plus the build settings."""
    h = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    for t in tasks:
        paths = [t.dir / "task.json"] + [p for _, g in t.quads for p in g.values()]
        paths += [p for _, a, b in t.pairs for p in (a, b)]
        for p in paths:
            st = p.stat()
            h.update(f"{p}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


# ------------------------------------------------------------------------------------------------
# Image loading
# ------------------------------------------------------------------------------------------------


def _to_rgb(im: Image.Image) -> Image.Image:
    if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(im).astype(np.float64)
        if im.mode.startswith("I;16") or arr.max(initial=0) > 255:
            arr = arr / 257.0 if arr.max(initial=0) <= 65535 else arr / arr.max() * 255.0
        im = Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), "L")
    if im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        im = im.convert("RGBA")
        bg = Image.new("RGBA", im.size, (255, 255, 255, 255))
        im = Image.alpha_composite(bg, im)
    return im.convert("RGB") if im.mode != "RGB" else im


def load_panel(path: str | os.PathLike, size: int, *, resample: int = Image.BICUBIC,
               resize_mode: str = "center_crop") -> Image.Image:
    """Reads one image as an RGB ``size x size`` PIL image (see the module docstring's policy)."""
    try:
        with Image.open(path) as im:
            im.load()
            im = ImageOps.exif_transpose(im)
            im = _to_rgb(im)
    except VisRelError:
        raise
    except Exception as e:  # PIL raises OSError / SyntaxError / ValueError / DecompressionBombError...
        raise VisRelError(f"cannot read image {path}: {type(e).__name__}: {e}") from e
    w, h = im.size
    if resize_mode == "center_crop":
        s = min(w, h)
        left, top = (w - s) // 2, (h - s) // 2
        box = (left, top, left + s, top + s)
    elif resize_mode == "stretch":
        box = (0, 0, w, h)
    else:
        raise VisRelError(f"unknown resize_mode {resize_mode!r}; expected one of {RESIZE_MODES}")
    if im.size == (size, size) and box == (0, 0, w, h):
        return im
    return im.resize((size, size), resample=resample, box=box)


def _png_bytes(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="PNG", compress_level=3)
    return buf.getvalue()


class _LRU:
    def __init__(self, maxsize: int):
        self.maxsize, self.d = maxsize, OrderedDict()

    def get(self, key, fn):
        if key in self.d:
            self.d.move_to_end(key)
            return self.d[key]
        val = self.d[key] = fn()
        if len(self.d) > self.maxsize:
            self.d.popitem(last=False)
        return val


# ------------------------------------------------------------------------------------------------
# TFDS builder
# ------------------------------------------------------------------------------------------------


@dataclasses.dataclass(eq=False)
class VisRelConfig(tfds.core.BuilderConfig):
    """Config: the source folder, the panel size and the pair-expansion / resize settings."""

    src_dir: str = ""
    size: int = 256
    exemplars_per_query: int | None = 8
    resize_mode: str = "center_crop"


def _config_name(src_dir: str | os.PathLike, size: int) -> str:
    base = re.sub(r"[^a-z0-9_]+", "_", Path(os.path.abspath(src_dir)).name.lower()).strip("_") or "visrel"
    return f"{base}_{size}"


class VisRel(tfds.core.GeneratorBasedBuilder):
    """VisRel visual-relation episodes (A, A', B, B') from a source folder; see the module doc."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}
    BUILDER_CONFIGS: list[VisRelConfig] = []  # configs are made per source folder / size

    # TFDS's default `code_path` probes `importlib_resources` (a lazy import of a package that is
    # only a TFDS dependency on Python < 3.9) for builders defined inside a package, which fails
    # here. The builder has no checksums / metadata files next to it; point at this module.
    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls) -> epath.Path | None:
        return epath.Path(inspect.getfile(cls))

    def __init__(self, *, src_dir: str | os.PathLike | None = None, size: int = 256,
                 config: VisRelConfig | None = None, name: str | None = None,
                 exemplars_per_query: int | None = 8, resize_mode: str = "center_crop",
                 data_dir: str | os.PathLike | None = None, **kwargs: Any):
        if config is None:
            if src_dir is None:
                raise VisRelError("VisRel needs src_dir=... (or config=VisRelConfig(...))")
            config = VisRelConfig(
                name=name or _config_name(src_dir, size), src_dir=os.path.abspath(src_dir), size=int(size),
                exemplars_per_query=exemplars_per_query, resize_mode=resize_mode,
                description=f"VisRel episodes from {os.path.abspath(src_dir)} at {size}x{size}",
            )
        if config.resize_mode not in RESIZE_MODES:
            raise VisRelError(f"unknown resize_mode {config.resize_mode!r}; expected one of {RESIZE_MODES}")
        if config.size <= 0:
            raise VisRelError(f"size must be positive, got {config.size}")
        self._tasks_cache: list[TaskSpec] | None = None
        kwargs.setdefault("file_format", "array_record")
        super().__init__(config=config, data_dir=os.fspath(data_dir) if data_dir else None, **kwargs)

    @property
    def tasks(self) -> list[TaskSpec]:
        if self._tasks_cache is None:
            self._tasks_cache = scan_visrel(self.builder_config.src_dir)
        return self._tasks_cache

    def fingerprint(self) -> str:
        c = self.builder_config
        return source_fingerprint(self.tasks, size=c.size, exemplars_per_query=c.exemplars_per_query,
                                  resize_mode=c.resize_mode, version=str(self.VERSION))

    def _info(self) -> tfds.core.DatasetInfo:
        size = self.builder_config.size
        img = lambda: tfds.features.Image(shape=(size, size, 3), dtype=np.uint8, encoding_format="png")
        return tfds.core.DatasetInfo(
            builder=self,
            description=__doc__.split("\n\n")[0],
            features=tfds.features.FeaturesDict({
                "A": img(), "A_out": img(), "B": img(), "B_out": img(),
                "task": tfds.features.Text(),
                "task_name": tfds.features.Text(),
                "task_id": tfds.features.ClassLabel(names=[t.name for t in self.tasks]),
                "category": tfds.features.Text(),
                "output_kind": tfds.features.Text(),
                "augment_flip": tfds.features.Scalar(dtype=np.bool_),
                "episode": tfds.features.Text(),
            }),
        )

    def _split_generators(self, dl_manager):  # noqa: ARG002 - nothing to download
        return {"train": self._generate_examples()}

    def _generate_examples(self) -> Iterator[tuple[str, dict[str, Any]]]:
        c = self.builder_config
        for task in self.tasks:
            resample = Image.BILINEAR if task.output_kind == "mask" else Image.BICUBIC
            cache = _LRU(4096)

            def panel(path: Path, _resample=resample, _cache=cache) -> bytes:
                return _cache.get(path, lambda: _png_bytes(
                    load_panel(path, c.size, resample=_resample, resize_mode=c.resize_mode)))

            common = dict(task=task.label, task_name=task.name, task_id=task.name, category=task.category,
                          output_kind=task.output_kind, augment_flip=task.augment_flip)
            for ep_id, group in task.quads:
                yield f"{task.name}/quads/{ep_id}", dict(
                    common, episode=f"quads/{ep_id}",
                    **{role: _png_bytes(load_panel(group[role], c.size, resample=resample,
                                                   resize_mode=c.resize_mode)) for role in QUAD_ROLES})
            for i, j in pair_episodes(task.name, len(task.pairs), c.exemplars_per_query):
                (id_i, a, a_out), (id_j, b, b_out) = task.pairs[i], task.pairs[j]
                yield f"{task.name}/pairs/{id_i}|{id_j}", dict(
                    common, episode=f"pairs/{id_i}|{id_j}",
                    A=panel(a), A_out=panel(a_out), B=panel(b), B_out=panel(b_out))


# ------------------------------------------------------------------------------------------------
# Helpers: build and load
# ------------------------------------------------------------------------------------------------


def build_visrel(src_dir: str | os.PathLike, data_dir: str | os.PathLike, size: int = 256, *,
                 name: str | None = None, exemplars_per_query: int | None = 8,
                 resize_mode: str = "center_crop", overwrite: bool | None = None) -> VisRel:
    """Builds (or reuses) the VisRel TFDS dataset of ``src_dir`` under ``data_dir``.

    The dataset lands in ``data_dir/vis_rel/<name>/1.0.0`` with ``name`` defaulting to
    ``<src folder name>_<size>``. ``overwrite=None`` reuses an existing build only if the source
    files (names, sizes, mtimes) and settings are unchanged, ``True`` always rebuilds, ``False``
    reuses any existing build. The folder is validated before anything is written; errors are
    :class:`VisRelError` naming the offending file. Returns the prepared builder
    (``builder.as_data_source()["train"]`` reads it; or use :func:`load_visrel`).
    """
    builder = VisRel(src_dir=src_dir, size=size, name=name, exemplars_per_query=exemplars_per_query,
                     resize_mode=resize_mode, data_dir=data_dir)
    fp = builder.fingerprint()  # validates the folder (scan) before anything is written
    fp_path = Path(builder.data_dir) / _FINGERPRINT_FILE
    mode = tfds.download.GenerateMode.REUSE_DATASET_IF_EXISTS
    if builder.is_prepared():
        stale = overwrite is True
        if overwrite is None:
            try:
                stale = json.loads(fp_path.read_text()).get("fingerprint") != fp
            except (OSError, json.JSONDecodeError):
                stale = True
        if stale:
            log.info("VisRel: rebuilding %s (source changed or overwrite=True)", builder.data_dir)
            mode = tfds.download.GenerateMode.FORCE_REDOWNLOAD
            builder = VisRel(src_dir=src_dir, size=size, name=name, exemplars_per_query=exemplars_per_query,
                             resize_mode=resize_mode, data_dir=data_dir)
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(download_mode=mode))
    fp_path = Path(builder.data_dir) / _FINGERPRINT_FILE
    if mode == tfds.download.GenerateMode.FORCE_REDOWNLOAD or not fp_path.exists():
        fp_path.write_text(json.dumps({"fingerprint": fp, "src_dir": os.path.abspath(src_dir)}))
    return builder


class VisRelSource:
    """Random-access view of a built VisRel split with plain-Python fields.

    ``source[i]`` -> ``{"A", "A_out", "B", "B_out": uint8 (size, size, 3), "task": str,
    "task_name": str, "task_id": int, "category": str, "output_kind": str, "augment_flip": bool,
    "episode": str}``. ``task_names`` is the sorted task-name list (``task_id`` indexes it).
    """

    def __init__(self, data_source: Any, task_names: Sequence[str], builder_dir: str | None = None):
        self.data_source = data_source
        self.task_names = list(task_names)
        self.builder_dir = builder_dir

    def __len__(self) -> int:
        return len(self.data_source)

    @staticmethod
    def _convert(ex: dict[str, Any]) -> dict[str, Any]:
        out = {}
        for k, v in ex.items():
            if isinstance(v, bytes):
                v = v.decode("utf-8")
            elif isinstance(v, np.ndarray) and v.ndim == 0:
                v = v.item()
            elif isinstance(v, (np.bool_, np.integer)):
                v = v.item()
            out[k] = v
        return out

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self._convert(self.data_source[index])

    def __getitems__(self, indices: Sequence[int]) -> list[dict[str, Any]]:
        return [self._convert(ex) for ex in self.data_source.__getitems__(indices)]

    def __repr__(self) -> str:
        return f"VisRelSource(len={len(self)}, tasks={len(self.task_names)}, dir={self.builder_dir})"


def _find_builder_dir(data_dir: Path, name: str | None, size: int | None = None) -> Path:
    if (data_dir / "dataset_info.json").is_file():
        return data_dir
    root = data_dir / "vis_rel" if (data_dir / "vis_rel").is_dir() else data_dir
    configs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")) if root.is_dir() else []
    if name is not None:
        configs = [p for p in configs if p.name == name]
    if size is not None:
        configs = [p for p in configs if p.name.endswith(f"_{size}")]
    found = []
    for cfg in configs:
        versions = [v for v in cfg.iterdir() if (v / "dataset_info.json").is_file()]
        if versions:
            found.append(max(versions, key=lambda v: tfds.core.Version(v.name) if re.fullmatch(r"\d+\.\d+\.\d+", v.name)
                             else tfds.core.Version("0.0.0")))
    if not found:
        what = f"config {name!r}" if name else "any VisRel dataset"
        what += f" of size {size}" if size is not None else ""
        raise VisRelError(f"no prepared {what} under {data_dir} (expected {root}/<name>/<version>/dataset_info.json;"
                          " run build_visrel first)")
    if len(found) > 1:
        raise VisRelError(f"several VisRel datasets under {data_dir}: {[p.parent.name for p in found]}; pass name=...")
    return found[0]


def load_visrel(data_dir: str | os.PathLike, name: str | None = None, split: str = "train", *,
                size: int | None = None) -> VisRelSource:
    """Opens a built VisRel dataset for random access (no TensorFlow, no source folder needed).

    ``data_dir`` is the ``data_dir`` given to :func:`build_visrel` (then ``name`` picks the config
    when several were built there; ``size`` keeps only configs named ``*_<size>``) or a builder
    directory ``.../vis_rel/<name>/<version>``.
    ``split`` accepts TFDS split syntax (``"train"``, ``"train[:90%]"``...).
    """
    builder_dir = _find_builder_dir(Path(data_dir), name, size)
    builder = tfds.builder_from_directory(os.fspath(builder_dir))
    task_names = builder.info.features["task_id"].names
    try:
        ds = builder.as_data_source(split=split)
    except Exception as e:
        raise VisRelError(f"cannot open split {split!r} of {builder_dir}: {e}") from e
    return VisRelSource(ds, task_names, os.fspath(builder_dir))
