"""Safetensors in and out, in one place: every cpmjax file of weights goes through here.

Writing is atomic. ``save_file`` writes a file beside its target and renames it into place;
``atomic_directory`` builds a whole directory (config + weights) beside its target and swaps it
in, so a save that fails midway (disk full, interrupted) leaves the previous good one untouched.
``write_sharded`` splits tensors over several files with an index (the HF layout) when they
exceed a size::

    with atomic_directory(out, stale=lambda entry: entry.endswith(".safetensors")) as tmp:
        write_sharded(tmp, tensors, max_shard_bytes=5 * 1024**3)
        ...                                  # config.json etc. into tmp

Reading is safe: safetensors only (a pickle-based ``.bin``/``.pt`` is never loaded, only named
in the error), and every failure is a typed ``cpmjax.errors`` exception naming the file and the
tensor: ``MissingPathError`` for a missing file, ``CheckpointError`` for an unreadable one,
``MissingTensorError`` for a tensor that is not there, ``ShapeMismatchError`` (both shapes) for
one of the wrong shape. ``TensorFiles`` reads lazily from a single file or a sharded index;
``read_tensors`` reads a whole file.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file as _write_safetensors

from cpmjax.errors import (
    CheckpointError,
    MissingPathError,
    MissingTensorError,
    ShapeMismatchError,
)

__all__ = [
    "PICKLE_SUFFIXES",
    "TensorFiles",
    "atomic_directory",
    "read_tensors",
    "save_file",
    "shard_name",
    "write_sharded",
]

# Weight files written by pickle (torch.save): never loaded, only named in the error.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")


# ----------------------------------------------------------------------------------------------
# writing
def save_file(tensors: Mapping[str, np.ndarray], file: str | os.PathLike, *,
              metadata: dict[str, str] | None = None) -> str:
    """Write ``tensors`` (name -> numpy array; bfloat16 via ml_dtypes) to the safetensors file
    ``file`` atomically: written beside it, then renamed over it. Returns the path."""
    file = os.fspath(file)
    folder = os.path.dirname(os.path.abspath(file))
    os.makedirs(folder, exist_ok=True)
    handle, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(file)}.tmp-", dir=folder)
    os.close(handle)
    try:
        arrays = {name: np.ascontiguousarray(array) for name, array in tensors.items()}
        _write_safetensors(arrays, tmp, metadata=metadata)
        os.replace(tmp, file)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise
    return file


def shard_name(weights_name: str, index: int, count: int) -> str:
    """The file name of shard ``index`` (from 0) of ``count``: ``model.safetensors`` ->
    ``model-00001-of-00003.safetensors``."""
    stem = weights_name[: -len(".safetensors")] if weights_name.endswith(".safetensors") else (
        weights_name)
    return f"{stem}-{index + 1:05d}-of-{count:05d}.safetensors"


def write_sharded(
    directory: str | os.PathLike,
    tensors: Iterable[tuple[str, np.ndarray]],
    *,
    weights_name: str = "model.safetensors",
    index_name: str = "model.safetensors.index.json",
    max_shard_bytes: int | None = None,
    metadata: dict[str, str] | None = None,
    save: Callable[..., Any] | None = None,
) -> list[str]:
    """Write ``(name, array)`` pairs into ``directory``: one file ``weights_name`` when they fit
    in ``max_shard_bytes`` (``None``: no limit), else shards named by :func:`shard_name` plus
    ``index_name`` (``{"metadata": {"total_size"}, "weight_map": {tensor: file}}``). Tensors
    stay in the given order; a shard is closed before the tensor that would overflow it.
    ``save(tensors, file, metadata=)`` writes one file (default :func:`save_file`). Returns the
    names of the files written."""
    directory = os.fspath(directory)
    save = save_file if save is None else save
    shards: list[dict[str, np.ndarray]] = [{}]
    sizes = [0]
    for name, array in tensors:
        if max_shard_bytes is not None and sizes[-1] and (
                sizes[-1] + array.nbytes > max_shard_bytes):
            shards.append({})
            sizes.append(0)
        shards[-1][name] = array
        sizes[-1] += array.nbytes
    if len(shards) == 1:
        save(shards[0], os.path.join(directory, weights_name), metadata=metadata)
        return [weights_name]
    weight_map: dict[str, str] = {}
    files = []
    for i, shard in enumerate(shards):
        file = shard_name(weights_name, i, len(shards))
        save(shard, os.path.join(directory, file), metadata=metadata)
        weight_map.update({name: file for name in shard})
        files.append(file)
    with open(os.path.join(directory, index_name), "w") as f:
        json.dump({"metadata": {"total_size": sum(sizes)}, "weight_map": weight_map}, f,
                  indent=2)
    return [*files, index_name]


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike, *,
                     stale: Callable[[str], bool] | None = None) -> Iterator[str]:
    """Build the directory ``path`` atomically: yields a fresh folder beside ``path`` to write
    into; when the block ends normally that folder replaces ``path``, and when it raises the
    folder is removed and ``path`` is left as it was.

    Entries of an existing ``path`` that the new folder lacks are carried over (a tokenizer or
    model card next to the weights), except those ``stale(entry)`` names: files of the previous
    save that this one would not rewrite (an old shard, an old index)."""
    path = os.path.abspath(os.fspath(path))
    if os.path.exists(path) and not os.path.isdir(path):
        raise CheckpointError(f"cannot save into {path}: it exists and is not a directory")
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tmp-save-", dir=parent)
    try:
        yield tmp
        if os.path.exists(path):
            for entry in os.listdir(path):
                if (stale is not None and stale(entry)) or os.path.exists(
                        os.path.join(tmp, entry)):
                    continue
                src = os.path.join(path, entry)
                (shutil.copytree if os.path.isdir(src) else shutil.copy2)(
                    src, os.path.join(tmp, entry))
            old = tempfile.mkdtemp(prefix=".old-save-", dir=parent)
            os.rename(path, os.path.join(old, "x"))
            os.rename(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# ----------------------------------------------------------------------------------------------
# reading
def _open(file: str, framework: str) -> Any:
    try:
        return safe_open(file, framework=framework)
    except Exception as exc:  # safetensors raises its own error types
        raise CheckpointError(f"cannot read safetensors file {file}: {exc}") from exc


def read_tensors(file: str | os.PathLike, *, framework: str = "numpy") -> dict[str, Any]:
    """Every tensor of the safetensors file ``file`` (numpy arrays by default). A missing file
    raises ``MissingPathError``, an unreadable one ``CheckpointError``, both naming it."""
    file = os.fspath(file)
    if not os.path.isfile(file):
        raise MissingPathError(f"safetensors file does not exist: {file}")
    with _open(file, framework) as handle:
        try:
            return {name: handle.get_tensor(name) for name in handle.keys()}
        except Exception as exc:
            raise CheckpointError(f"cannot read safetensors file {file}: {exc}") from exc


class TensorFiles:
    """Lazy access to the tensors of a directory of safetensors: ``weights_name`` (one file) or
    ``index_name`` (shards listed in an index, preferred when both exist).

    ``names()`` lists the tensors, ``shape(name)`` reads a shape without the data,
    ``get(name, shape=None)`` one tensor (checked against ``shape`` when given). A directory
    with neither file raises ``MissingPathError`` (naming any pickle-based weights it holds
    instead: those are never loaded); a bad index, an unreadable file, a missing tensor or a
    wrong shape raise typed errors naming the file and the tensor."""

    def __init__(
        self,
        directory: str | os.PathLike,
        *,
        weights_name: str = "model.safetensors",
        index_name: str | None = "model.safetensors.index.json",
        framework: str = "numpy",
    ):
        self.directory = path = os.fspath(directory)
        self.framework = framework
        self.files: dict[str, str] = {}
        self._handles: dict[str, Any] = {}
        index_file = os.path.join(path, index_name) if index_name else None
        single_file = os.path.join(path, weights_name)
        if index_file is not None and os.path.isfile(index_file):
            try:
                with open(index_file) as f:
                    weight_map = json.load(f)["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise CheckpointError(
                    f"{index_file} is not a valid safetensors index: {exc}"
                ) from exc
            for name, file in weight_map.items():
                full = os.path.join(path, file)
                if not os.path.isfile(full):
                    raise MissingPathError(
                        f"{index_file} names shard {file} (for tensor {name}) but it is missing"
                    )
                self.files[name] = full
        elif os.path.isfile(single_file):
            for name in self._handle_of(single_file).keys():
                self.files[name] = single_file
        else:
            others = sorted(f for f in os.listdir(path) if f.endswith(PICKLE_SUFFIXES)) if (
                os.path.isdir(path)) else []
            hint = (
                f" (found {others}: pickle-based weights are not loaded for safety; convert them "
                "to safetensors)" if others else ""
            )
            wanted = f"{weights_name} or {index_name}" if index_name else weights_name
            raise MissingPathError(f"no {wanted} in {path}{hint}")

    def names(self) -> list[str]:
        """The tensor names, in file (or index) order."""
        return list(self.files)

    def __contains__(self, name: object) -> bool:
        return name in self.files

    def file_of(self, name: str) -> str:
        """The file holding tensor ``name`` (``MissingTensorError`` when none does)."""
        if name not in self.files:
            raise MissingTensorError(f"tensor {name} is not in the safetensors of "
                                     f"{self.directory}")
        return self.files[name]

    def shape(self, name: str) -> tuple[int, ...]:
        """The shape of tensor ``name`` (read from the header only)."""
        file = self.file_of(name)
        return tuple(self._handle_of(file).get_slice(name).get_shape())

    def get(self, name: str, shape: tuple[int, ...] | None = None) -> Any:
        """Tensor ``name``; with ``shape``, a different shape raises ``ShapeMismatchError``
        naming the tensor, the file and both shapes."""
        file = self.file_of(name)
        if shape is not None:
            got = self.shape(name)
            if got != tuple(shape):
                raise ShapeMismatchError(
                    f"tensor {name} in {file} has shape {got}, expected {tuple(shape)}")
        try:
            return self._handle_of(file).get_tensor(name)
        except Exception as exc:
            raise CheckpointError(f"cannot read tensor {name} from {file}: {exc}") from exc

    def _handle_of(self, file: str) -> Any:
        if file not in self._handles:
            self._handles[file] = _open(file, self.framework)
        return self._handles[file]
