"""Reading safetensors checkpoints tensor by tensor, without torch and without TensorFlow.

Checkpoints come as one file, a directory of files, or a sharded directory with a
`*.safetensors.index.json`. Tensors are read lazily one at a time (`framework="numpy"`,
bf16 through `ml_dtypes`), so converting a 24 GB checkpoint never holds two copies of it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping
from pathlib import Path

import numpy as np


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not match the model; the message names the path/keys."""


def _list_safetensors(path: Path, prefer: str | None = None) -> list[Path]:
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such file or directory")
    indexes = sorted(path.glob("*.safetensors.index.json"))
    if prefer is not None:
        indexes = [i for i in indexes if i.name.startswith(prefer)] or indexes
    if indexes:
        index = indexes[0]
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"{index}: not a safetensors index (no 'weight_map'): {e}") from e
        files = sorted({path / f for f in weight_map.values()})
        missing = [str(f) for f in files if not f.exists()]
        if missing:
            raise CheckpointError(f"{index} names shard files that do not exist: {missing}")
        return files
    files = sorted(path.glob("*.safetensors"))
    if prefer is not None:
        files = [f for f in files if f.name.startswith(prefer)] or files
    if not files:
        raise CheckpointError(f"{path}: no *.safetensors files in this directory")
    return files


class SafetensorsReader(Mapping):
    """A read-only mapping key -> numpy array over one or more safetensors files.

    Arrays are loaded on access, one at a time. bf16 tensors come back as `ml_dtypes.bfloat16`.
    """

    def __init__(self, path: str | os.PathLike, prefer: str | None = None):
        from safetensors import safe_open

        self.path = Path(path)
        self.files = _list_safetensors(self.path, prefer)
        self._where: dict[str, Path] = {}
        self._handles = {}
        for f in self.files:
            try:
                h = safe_open(str(f), framework="numpy")
            except Exception as e:  # safetensors raises its own error types for garbage files
                raise CheckpointError(f"{f}: not a readable safetensors file ({e})") from e
            self._handles[f] = h
            for k in h.keys():
                if k in self._where:
                    raise CheckpointError(f"key {k!r} appears in both {self._where[k]} and {f}")
                self._where[k] = f

    def __getitem__(self, key: str) -> np.ndarray:
        try:
            f = self._where[key]
        except KeyError:
            raise CheckpointError(f"{self.path}: no tensor named {key!r}") from None
        return self._handles[f].get_tensor(key)

    def shape(self, key: str) -> tuple[int, ...]:
        f = self._where[key]
        return tuple(self._handles[f].get_slice(key).get_shape())

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)

    def metadata(self) -> dict[str, str]:
        out: dict[str, str] = {}
        for h in self._handles.values():
            out.update(h.metadata() or {})
        return out


def read_config(path: str | os.PathLike, name: str = "config.json") -> dict:
    """The JSON config next to a checkpoint, with a clear error when it is missing or broken."""
    p = Path(path)
    cfg = p / name if p.is_dir() else p.parent / name
    if not cfg.exists():
        raise CheckpointError(f"{cfg}: missing (a diffusers/transformers checkpoint directory has a {name})")
    try:
        return json.loads(cfg.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{cfg}: not valid JSON ({e})") from e


def check_keys(path: str | os.PathLike, expected: set[str], found: set[str], what: str = "checkpoint") -> None:
    """Raise one error listing every missing and unexpected key (first 20 of each)."""
    missing = sorted(expected - found)
    unexpected = sorted(found - expected)
    if missing or unexpected:
        lines = [f"{path}: {what} does not match the model."]
        if missing:
            lines.append(f"  missing keys ({len(missing)}): {missing[:20]}{' ...' if len(missing) > 20 else ''}")
        if unexpected:
            lines.append(
                f"  unexpected keys ({len(unexpected)}): {unexpected[:20]}{' ...' if len(unexpected) > 20 else ''}"
            )
        raise CheckpointError("\n".join(lines))


def check_shape(path: str | os.PathLike, key: str, got: tuple[int, ...], want: tuple[int, ...]) -> None:
    if tuple(got) != tuple(want):
        raise CheckpointError(f"{path}: tensor {key!r} has shape {tuple(got)}, the model expects {tuple(want)}")


def save_safetensors_atomic(tensors: dict[str, np.ndarray], path: str | os.PathLike, metadata=None) -> None:
    """Write a safetensors file via a temporary name and rename, so no half-written file is left behind."""
    from safetensors.numpy import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(tmp), metadata=metadata)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
