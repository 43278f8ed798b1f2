"""FR-Spec: a frequency-ranked vocabulary subset for the draft's LM head.

``count_token_frequencies`` tokenizes a corpus and counts every id; ``rank_by_frequency`` sorts
the ids by descending count (ties: lower id first) and ``save_freq_vocab`` writes the ranked ids
as a ``.npy`` (int32, the whole vocabulary, most frequent first). ``load_freq_vocab(path, n)``
returns the first ``n`` ids: the draft then scores only those (``draft_topk`` with
``subset_ids``), a ``V / V_s`` smaller head matmul and softmax per draft token. Verification is
unchanged, so the target's output distribution is preserved exactly; only which candidates the
draft proposes changes.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from cpmjax.errors import ConfigError, InputError, MissingPathError, TokenIdError
from pallas_kernels import IMPLS, resolve_impl


def count_token_frequencies(
    tokenizer: Any,
    files: Sequence[str | os.PathLike],
    *,
    vocab_size: int | None = None,
    chunk_chars: int = 1 << 20,
) -> np.ndarray:
    """Token counts ``[vocab]`` (int64) over text files, tokenized without special tokens, in
    chunks of about ``chunk_chars`` characters (cut at line ends)."""
    size = vocab_size or len(tokenizer)
    counts = np.zeros((size,), np.int64)
    for file in files:
        file = os.fspath(file)
        if not os.path.isfile(file):
            raise MissingPathError(f"corpus file does not exist: {file}")
        for chunk in _chunks(file, chunk_chars):
            ids = np.asarray(tokenizer(chunk, add_special_tokens=False)["input_ids"], np.int64)
            if ids.size and ids.max() >= size:
                raise TokenIdError(
                    f"tokenizer produced id {int(ids.max())} >= vocab size {size} on {file}"
                )
            counts += np.bincount(ids, minlength=size)
    return counts


def _chunks(file: str, chunk_chars: int) -> Iterable[str]:
    with open(file, encoding="utf-8", errors="replace") as f:
        buffer: list[str] = []
        length = 0
        for line in f:
            buffer.append(line)
            length += len(line)
            if length >= chunk_chars:
                yield "".join(buffer)
                buffer, length = [], 0
        if buffer:
            yield "".join(buffer)


def rank_by_frequency(counts: np.ndarray) -> np.ndarray:
    """Token ids ``[vocab]`` int32 sorted by descending count; equal counts by ascending id."""
    counts = np.asarray(counts)
    return np.lexsort((np.arange(counts.size), -counts)).astype(np.int32)


def save_freq_vocab(path: str | os.PathLike, ranked_ids: np.ndarray) -> str:
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    np.save(path, np.asarray(ranked_ids, np.int32))
    return path if path.endswith(".npy") else path + ".npy"


def load_freq_vocab(path_or_ids: Any, subset: int | None = None,
                    vocab_size: int | None = None) -> np.ndarray:
    """The first ``subset`` ids (int32) of a ranked list (a ``.npy`` path or an array); the
    whole list when ``subset`` is None. Checks that the ids are distinct and in the vocabulary."""
    if isinstance(path_or_ids, (str, os.PathLike)):
        path = os.fspath(path_or_ids)
        if not os.path.isfile(path):
            raise MissingPathError(f"frequency vocabulary file does not exist: {path}")
        ids = np.load(path)
    else:
        ids = np.asarray(path_or_ids)
    ids = ids.astype(np.int32).reshape(-1)
    if subset is not None:
        if not 0 < subset <= ids.size:
            raise InputError(f"subset size {subset} must be in [1, {ids.size}]")
        ids = ids[:subset]
    if np.unique(ids).size != ids.size:
        raise ConfigError("the frequency-ranked vocabulary has repeated ids")
    if vocab_size is not None and ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
        bad = int(ids[(ids < 0) | (ids >= vocab_size)][0])
        raise TokenIdError(f"frequency vocabulary id {bad} is outside [0, {vocab_size})")
    return ids


# the draft head's implementations: the library-wide ``impl=`` names (pallas_kernels.IMPLS)
# but "auto" (the head has no size-based choice to make)
HEAD_IMPLS = tuple(name for name in IMPLS if name != "auto")


def resolve_head_impl(impl: str, *, what: str = "impl", stacklevel: int = 3) -> str:
    """``impl`` checked against ``HEAD_IMPLS``; the old name ``"xla"`` (= ``"reference"``) is
    accepted with a ``DeprecationWarning`` (``stacklevel`` counted from here). Raises
    ``ConfigError`` naming the value."""
    try:
        impl = resolve_impl(impl, keyword=what, stacklevel=stacklevel)
    except ValueError:
        pass  # named in the ConfigError below
    if impl not in HEAD_IMPLS:
        raise ConfigError(f"{what}={impl!r} is not one of {HEAD_IMPLS}")
    return impl


def draft_topk(
    hidden: jax.Array,
    weight: jax.Array,
    top_k: int,
    subset_ids: jax.Array | None = None,
    *,
    impl: str = "reference",
    backend: str | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Top-``k`` draft tokens and their log-probabilities.

    ``hidden [..., h]``; ``weight [V_s, h]``: the LM head restricted to ``subset_ids [V_s]`` (or
    the full head ``[V, h]`` when ``subset_ids`` is None). The softmax is over the scored ids
    only. Returns ``(ids [..., k] int32`` in the full vocabulary, ``log_probs [..., k]``
    float32), best first.

    ``impl="reference"``: matmul + log-softmax + ``lax.top_k``; ``"blockwise"``:
    ``pallas_kernels.fr_lm_head_blockwise`` (tiles of the head, running top-k and log-sum-exp);
    ``"pallas"``: ``pallas_kernels.fr_lm_head`` (fused kernel; interpreted on CPU).
    ``backend=`` is the deprecated name of ``impl=`` (and ``"xla"`` of ``"reference"``)."""
    if backend is not None:
        warnings.warn("draft_topk(backend=...) is deprecated; use impl=", DeprecationWarning,
                      stacklevel=2)
        impl = backend
    impl = resolve_head_impl(impl)
    if impl in ("pallas", "blockwise"):
        from pallas_kernels.fr_lm_head import fr_lm_head, fr_lm_head_blockwise

        kernel = fr_lm_head if impl == "pallas" else fr_lm_head_blockwise
        ids, logp = kernel(hidden, weight, None, top_k=top_k)
    else:
        logits = jnp.einsum("...d,vd->...v", hidden, weight,
                            preferred_element_type=jnp.float32)
        logp_all = jax.nn.log_softmax(logits, axis=-1)
        logp, ids = jax.lax.top_k(logp_all, top_k)
    ids = ids.astype(jnp.int32)
    if subset_ids is not None:
        ids = jnp.asarray(subset_ids, jnp.int32)[ids]
    return ids, logp.astype(jnp.float32)


def head_flops(hidden_size: int, scored_vocab: int) -> int:
    """Multiply-add FLOPs of the draft LM head for one draft token (``2 * h * V_s``)."""
    return 2 * hidden_size * scored_vocab
