"""Training data: a corpus of local text files, tokenized once into a memory-mapped token stream,
and a deterministic, resumable iterator of fixed-length packed batches.

Corpus sources (``DataConfig.sources``), each expanded to a sorted file list:

- ``"stdlib"``: the running Python's standard library source (``sysconfig.get_paths()["stdlib"]``,
  ``*.py``, without ``site-packages`` and the ``test``/``tests`` packages). Its
  ``pydoc_data/topics.py`` carries the Python language reference as English prose.
- ``"package-metadata"``: the ``METADATA`` files of the installed distributions
  (``*.dist-info/METADATA``): English project descriptions in Markdown / reStructuredText.
- ``"package-sources"``: the ``*.py`` files of the installed distributions whose licence is
  permissive (:func:`package_licenses`: MIT, BSD, Apache, PSF, ISC, Zlib and the like, by
  their ``License-Expression``, ``License`` and licence classifiers; anything naming a copyleft
  or unknown licence is left out), this project's own package excluded. Which packages (and
  versions) are installed decides the corpus: record :func:`package_licenses` with a model.
- any other string: a file, a directory (searched recursively for ``*.py, *.txt, *.md, *.rst``)
  or a glob pattern.

A file goes to the evaluation split when a hash of its path (relative to its source root) falls
below ``eval_fraction``: stable across machines and runs.

Packing: documents are ``[BOS] tokens [EOS]`` concatenated into one stream; batch rows are
windows of ``seq_len + 1`` tokens. Each row carries ``segment_ids`` (a new segment at every BOS)
and per-document ``positions`` so attention never crosses a document boundary, and a
``loss_mask`` that drops the one target that does (predicting the next document's BOS).
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import os
import sysconfig
from collections.abc import Iterator
from typing import Any

import numpy as np

from cpmjax.errors import ConfigError, MissingPathError

_TEXT_SUFFIXES = (".py", ".txt", ".md", ".rst")


# ----------------------------------------------------------------------------------------------
# corpus
@dataclasses.dataclass(frozen=True)
class CorpusFile:
    path: str
    key: str  # path relative to its source root, prefixed by the source name (split hashing)


def _stdlib_files() -> list[CorpusFile]:
    root = sysconfig.get_paths()["stdlib"]
    skip = {"site-packages", "dist-packages", "__pycache__", "test", "tests", "idle_test"}
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in skip)
        for name in sorted(filenames):
            if name.endswith(".py"):
                full = os.path.join(dirpath, name)
                out.append(CorpusFile(full, "stdlib/" + os.path.relpath(full, root)))
    return out


def _metadata_files() -> list[CorpusFile]:
    import site

    out = []
    roots = list(site.getsitepackages()) + [site.getusersitepackages()]
    for root in roots:
        for full in sorted(glob.glob(os.path.join(root, "*.dist-info", "METADATA"))):
            out.append(CorpusFile(full, "metadata/" + os.path.relpath(full, root)))
    return out


_PERMISSIVE = ("MIT", "BSD", "APACHE", "PSF", "PYTHON SOFTWARE FOUNDATION", "ISC", "ZLIB",
               "UNLICENSE", "HPND", "0BSD", "CC0", "BSL-1.0", "BOOST")
_NOT_PERMISSIVE = ("GPL", "MPL", "MOZILLA", "EPL", "ECLIPSE", "CDDL", "EUPL", "COMMERCIAL",
                   "PROPRIETARY", "SSPL", "BUSL", "NON-COMMERCIAL", "CC-BY-NC")


def license_text(metadata: Any) -> str:
    """What a distribution's metadata says of its licence: ``License-Expression``, the first line
    of ``License`` and the ``License ::`` classifiers, joined (empty when it says nothing)."""
    parts = [metadata.get("License-Expression") or ""]
    first = (metadata.get("License") or "").strip().split("\n")[0]
    parts.append(first[:200])
    parts += [c.split("::", 1)[1].strip() for c in (metadata.get_all("Classifier") or [])
              if c.startswith("License ::")]
    return " | ".join(p for p in parts if p)


def is_permissive(text: str) -> bool:
    """Whether a licence text names only permissive licences: at least one of MIT, BSD, Apache,
    PSF, ISC, Zlib, ... and nothing copyleft, commercial or proprietary (``LGPL``, ``GPL``,
    ``MPL``, ...). An empty or unknown text is not permissive."""
    upper = text.upper()
    return (any(m in upper for m in _PERMISSIVE)
            and not any(m in upper for m in _NOT_PERMISSIVE))


def _distributions() -> list[tuple[str, Any]]:
    """``(name, distribution)`` of every installed distribution but this project, the first
    found of each name, sorted by name (one walk of the installed metadata)."""
    import importlib.metadata as md

    found: dict[str, Any] = {}
    for dist in md.distributions():
        name = dist.metadata.get("Name")
        if name and name.lower() != "cpmjax" and name not in found:
            found[name] = dist
    return sorted(found.items(), key=lambda kv: kv[0].lower())


def package_licenses() -> dict[str, dict[str, Any]]:
    """Every installed distribution (but this project): ``{name: {"version", "license",
    "permissive", "py_files"}}``, sorted by name; the ``"package-sources"`` corpus takes the
    ``*.py`` files of those with ``permissive`` true."""
    out: dict[str, dict[str, Any]] = {}
    for name, dist in _distributions():
        text = license_text(dist.metadata)
        files = [f for f in (dist.files or []) if str(f).endswith(".py")]
        out[name] = {"version": dist.version, "license": text,
                     "permissive": is_permissive(text), "py_files": len(files)}
    return out


def _package_source_files() -> list[CorpusFile]:
    out = []
    for name, dist in _distributions():
        if not is_permissive(license_text(dist.metadata)):
            continue
        for f in sorted(dist.files or [], key=str):
            if not str(f).endswith(".py"):
                continue
            full = str(dist.locate_file(f))
            if os.path.isfile(full):
                out.append(CorpusFile(full, f"package-sources/{name}/{f}"))
    return out


def _path_files(source: str) -> list[CorpusFile]:
    if os.path.isfile(source):
        return [CorpusFile(source, os.path.basename(source))]
    if os.path.isdir(source):
        out = []
        for dirpath, dirnames, filenames in os.walk(source):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            for name in sorted(filenames):
                if name.endswith(_TEXT_SUFFIXES):
                    full = os.path.join(dirpath, name)
                    out.append(CorpusFile(full, os.path.relpath(full, source)))
        return out
    matches = sorted(glob.glob(source, recursive=True))
    if not matches:
        raise MissingPathError(f"corpus source {source!r} is not a file, directory or glob match")
    return [CorpusFile(m, m) for m in matches if os.path.isfile(m)]


def collect_files(sources: list[str]) -> list[CorpusFile]:
    """Every file of every source, in a stable order (duplicates dropped)."""
    files: list[CorpusFile] = []
    seen: set[str] = set()
    for source in sources:
        if source == "stdlib":
            found = _stdlib_files()
        elif source == "package-metadata":
            found = _metadata_files()
        elif source == "package-sources":
            found = _package_source_files()
        else:
            found = _path_files(source)
        for f in found:
            real = os.path.realpath(f.path)
            if real not in seen:
                seen.add(real)
                files.append(f)
    if not files:
        raise ConfigError(f"corpus sources {sources} hold no text files")
    return files


def split_files(files: list[CorpusFile], eval_fraction: float
                ) -> tuple[list[CorpusFile], list[CorpusFile]]:
    """Split into (train, eval) by a hash of each file's key; at least one file each when there
    are two or more files and ``eval_fraction > 0``."""
    if not 0.0 <= eval_fraction < 1.0:
        raise ConfigError(f"eval_fraction must be in [0, 1), got {eval_fraction}")

    def unit(f: CorpusFile) -> float:
        digest = hashlib.sha256(f.key.encode()).digest()
        return int.from_bytes(digest[:8], "little") / 2**64

    train = [f for f in files if unit(f) >= eval_fraction]
    held = [f for f in files if unit(f) < eval_fraction]
    if eval_fraction > 0 and not held and len(files) > 1:
        first = min(files, key=unit)
        held, train = [first], [f for f in files if f is not first]
    return train, held


# ----------------------------------------------------------------------------------------------
# token stream on disk
def tokenize_to_memmap(files: list[CorpusFile], tokenizer: Any, path: str | os.PathLike,
                       *, batch_files: int = 64) -> np.memmap:
    """Tokenize ``files`` (each a ``[BOS] ... [EOS]`` document) into a flat token file ``path``
    (``uint16`` when the vocabulary fits, else ``uint32``) with a JSON sidecar ``path.json``.
    Written to a temporary name and renamed, so a stopped build never leaves a partial file
    that looks finished. Returns the read-only memmap."""
    path = os.fspath(path)
    vocab = len(tokenizer)
    dtype = np.uint16 if vocab <= 2**16 else np.uint32
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    count = 0
    documents = 0
    with open(tmp, "wb") as out:
        for start in range(0, len(files), batch_files):
            texts = []
            for f in files[start:start + batch_files]:
                with open(f.path, encoding="utf-8", errors="replace") as fh:
                    text = fh.read()
                if text.strip():
                    texts.append(text)
            if not texts:
                continue
            encoded = tokenizer(texts, add_special_tokens=False)["input_ids"]
            for ids in encoded:
                doc = np.asarray(
                    ([tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else [])
                    + list(ids) + [tokenizer.eos_token_id], dtype=dtype,
                )
                out.write(doc.tobytes())
                count += doc.size
                documents += 1
    meta = {"dtype": np.dtype(dtype).name, "tokens": count, "documents": documents,
            "files": len(files), "vocab_size": vocab}
    with open(tmp + ".json", "w") as f:
        json.dump(meta, f)
    os.replace(tmp, path)
    os.replace(tmp + ".json", path + ".json")
    return open_memmap(path)


def open_memmap(path: str | os.PathLike) -> np.memmap:
    """The token stream written by ``tokenize_to_memmap`` (read-only)."""
    path = os.fspath(path)
    if not os.path.isfile(path) or not os.path.isfile(path + ".json"):
        raise MissingPathError(f"no token file at {path} (with its {path}.json sidecar)")
    with open(path + ".json") as f:
        meta = json.load(f)
    data = np.memmap(path, dtype=np.dtype(meta["dtype"]), mode="r")
    if data.size != meta["tokens"]:
        raise ConfigError(
            f"token file {path} holds {data.size} tokens but its sidecar says {meta['tokens']}; "
            "delete it to rebuild"
        )
    return data


# ----------------------------------------------------------------------------------------------
# batches
def pack_rows(windows: np.ndarray, bos_id: int | None, pad_id: int | None = None,
              loss_after_id: int | None = None) -> dict[str, np.ndarray]:
    """Turn ``windows [batch, seq+1]`` of the token stream into a training batch.

    Returns ``input_ids, targets, segment_ids, positions [batch, seq]`` (int32) and
    ``loss_mask [batch, seq]`` (float32): a new segment starts at every BOS; positions count
    from 0 at each segment start (and at the row start); a target that is a BOS (the jump into
    the next document) or a pad is masked out. With ``loss_after_id`` only the targets that
    follow the first ``loss_after_id`` token of their segment count (the marker's own next
    token included): prompt/answer training, where the prompt is context to attend to but not
    to predict. A row that starts inside a document counts from its first marker."""
    windows = windows.astype(np.int32)
    inputs, targets = windows[:, :-1], windows[:, 1:]
    b, s = inputs.shape
    idx = np.broadcast_to(np.arange(s, dtype=np.int32), (b, s))
    if bos_id is None:
        starts = np.zeros((b, s), dtype=bool)
    else:
        starts = inputs == bos_id
    segment_ids = np.cumsum(starts, axis=1, dtype=np.int32)
    seg_start = np.maximum.accumulate(np.where(starts, idx, 0), axis=1)
    positions = (idx - seg_start).astype(np.int32)
    mask = np.ones((b, s), np.float32)
    if bos_id is not None:
        mask[targets == bos_id] = 0.0
    if pad_id is not None:
        mask[targets == pad_id] = 0.0
    if loss_after_id is not None:
        last_marker = np.maximum.accumulate(np.where(inputs == loss_after_id, idx, -1), axis=1)
        mask[last_marker < seg_start] = 0.0
    return {
        "input_ids": inputs,
        "targets": targets,
        "segment_ids": segment_ids,
        "positions": positions,
        "loss_mask": mask,
    }


class PackedBatches:
    """Deterministic, resumable iterator of packed batches over a token stream.

    The stream is cut into ``(len - 1) // seq_len`` non-overlapping windows of ``seq_len + 1``
    tokens; each epoch visits them in the order of a permutation seeded by ``(seed, epoch)``
    (``shuffle=False``: in order). The position is ``{"epoch", "batch"}`` (``state()`` /
    ``restore()``); batch ``i`` of epoch ``e`` is the same on every machine and every run.

    Several processes: ``rows=(start, stop)`` makes this process read only rows
    ``[start, stop)`` of every global batch of ``batch_size`` rows (``process_rows`` finds
    them for a sharding). The global order, and the position (``{"epoch", "batch"}`` counts
    global batches), do not depend on how many processes share the batches."""

    def __init__(self, tokens: np.ndarray, batch_size: int, seq_len: int, *, seed: int = 0,
                 shuffle: bool = True, bos_id: int | None = None, pad_id: int | None = None,
                 loss_after_id: int | None = None, rows: tuple[int, int] | None = None):
        self.tokens = tokens
        self.batch_size = int(batch_size)
        self.seq_len = int(seq_len)
        self.seed = int(seed)
        self.shuffle = shuffle
        self.bos_id, self.pad_id = bos_id, pad_id
        self.loss_after_id = loss_after_id
        self.num_windows = (tokens.size - 1) // self.seq_len
        self.batches_per_epoch = self.num_windows // self.batch_size
        if self.batches_per_epoch < 1:
            raise ConfigError(
                f"the token stream ({tokens.size} tokens) is too short for one batch of "
                f"{batch_size} x {seq_len + 1} tokens"
            )
        start, stop = (0, self.batch_size) if rows is None else (int(rows[0]), int(rows[1]))
        if not 0 <= start < stop <= self.batch_size:
            raise ConfigError(f"rows={rows} is not a row range of a batch of {batch_size} rows")
        self.rows = (start, stop)
        self.epoch = 0
        self.batch = 0
        self._order_epoch = -1
        self._order: np.ndarray | None = None

    def state(self) -> dict[str, int]:
        return {"epoch": self.epoch, "batch": self.batch, "seed": self.seed}

    def restore(self, state: dict[str, int]) -> None:
        if int(state.get("seed", self.seed)) != self.seed:
            raise ConfigError(
                f"data iterator seed {self.seed} differs from the checkpoint's {state['seed']}"
            )
        self.epoch, self.batch = int(state["epoch"]), int(state["batch"])

    def _permutation(self) -> np.ndarray:
        if self._order_epoch != self.epoch:
            if self.shuffle:
                rng = np.random.default_rng([self.seed, self.epoch])
                self._order = rng.permutation(self.num_windows)
            else:
                self._order = np.arange(self.num_windows)
            self._order_epoch = self.epoch
        return self._order

    def windows(self, window_ids: np.ndarray) -> np.ndarray:
        starts = window_ids.astype(np.int64) * self.seq_len
        offsets = np.arange(self.seq_len + 1, dtype=np.int64)
        return np.asarray(self.tokens[starts[:, None] + offsets[None, :]])

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        if self.batch >= self.batches_per_epoch:
            self.epoch += 1
            self.batch = 0
        order = self._permutation()
        first = self.batch * self.batch_size
        ids = order[first + self.rows[0]:first + self.rows[1]]
        self.batch += 1
        return pack_rows(self.windows(ids), self.bos_id, self.pad_id, self.loss_after_id)

    def fixed_batches(self, count: int) -> list[dict[str, np.ndarray]]:
        """The first ``count`` batches in stream order (evaluation), without moving (this
        process's ``rows`` of each)."""
        count = min(count, self.batches_per_epoch)
        out = []
        for i in range(count):
            ids = np.arange(i * self.batch_size + self.rows[0], i * self.batch_size + self.rows[1])
            out.append(pack_rows(self.windows(ids), self.bos_id, self.pad_id, self.loss_after_id))
        return out


def process_rows(sharding: Any, global_shape: tuple[int, ...]) -> tuple[int, int]:
    """``(start, stop)``: the rows (first axis) of a global array of ``global_shape`` that this
    process's devices hold under ``sharding`` (a ``jax.sharding.Sharding``); ``(0, rows)`` for
    a single process. Raises ``ConfigError`` when they are not one contiguous range (a mesh
    whose batch axis interleaves the processes)."""
    index_map = sharding.addressable_devices_indices_map(tuple(global_shape))
    n = int(global_shape[0])
    spans = set()
    for index in index_map.values():
        rows = index[0] if index else slice(None)
        start, stop, _ = rows.indices(n)
        spans.add((start, stop))
    start, stop = min(s for s, _ in spans), max(e for _, e in spans)
    covered = np.zeros(n, bool)
    for s, e in spans:
        covered[s:e] = True
    if not covered[start:stop].all():
        raise ConfigError(
            f"this process's devices hold rows {sorted(spans)} of the batch: not one contiguous "
            "range; order the mesh so that each process's devices are adjacent on the batch axes"
        )
    return start, stop


def token_windows(ids: np.ndarray, seq_len: int, batch: int, *, seed: int = 0
                  ) -> Iterator[np.ndarray]:
    """Endless random batches ``[batch, seq_len]`` of windows cut from one long id stream
    (windows start every ``seq_len // 2`` tokens; each pass visits them in a new random order).
    What a draft model trains on: plain windows, no packing or document boundaries."""
    ids = np.asarray(ids, np.int32).reshape(-1)
    if ids.size < seq_len + 1:
        raise ConfigError(f"corpus has {ids.size} tokens, fewer than seq_len={seq_len} + 1")
    rng = np.random.default_rng(seed)
    starts = np.arange(0, ids.size - seq_len, max(1, seq_len // 2))
    while True:
        order = rng.permutation(starts)
        for i in range(0, len(order) - batch + 1, batch):
            yield np.stack([ids[s: s + seq_len] for s in order[i: i + batch]])
        if len(order) < batch:
            yield np.stack([ids[s: s + seq_len] for s in rng.choice(starts, batch)])
