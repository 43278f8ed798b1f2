"""The decode driver shared by vanilla and speculative decoding: the request, the results, the
prompt-length buckets, the per-model compile cache, and the loop that runs a compiled on-device
decode loop to the end (in chunks when streaming).

- Prompts (ragged, any lengths) are right-padded to a power-of-two length bucket (``bucket``),
  so a prefill compiles once per (batch, bucket).
- ``CompileCache`` keeps the compiled prefill / decode executables of one model (one per graph
  definition, ``compile_cache``); ``compiled`` adds the compile time to the stats.
- ``drive`` calls a compiled loop ``loop(*args, carry, limit)`` that runs until its carry's
  counter reaches ``limit`` or every row is done; with ``stream`` it raises the limit by
  ``chunk`` per call (the same executable) and reports the tokens so far after each call.
- Several processes (one per host, ``cpmjax.distributed``): a distributed prefill's mesh then
  spans devices of other processes. ``on_mesh`` places what every process holds alike (the
  weights, prompts, the decode state) onto such a mesh, and ``to_host`` reads a result back
  (gathered from every process when no process holds all of it). Every process runs the same
  calls in the same order.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from cpmjax.errors import (
    ConfigError,
    EmptyPromptError,
    InputError,
    PromptTooLongError,
    TokenIdError,
)
from cpmjax.generate.sampling import SamplingConfig

__all__ = [
    "CompileCache",
    "GenerationResult",
    "GenerationStats",
    "Request",
    "bucket",
    "compile_cache",
    "compiled",
    "drive",
    "on_mesh",
    "prepare_prompts",
    "to_host",
    "validate_request",
]


@dataclasses.dataclass
class GenerationStats:
    prompt_tokens: int = 0
    new_tokens: int = 0
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    compile_seconds: float = 0.0
    decode_steps: int = 0

    @property
    def prefill_tokens_per_second(self) -> float:
        return self.prompt_tokens / self.prefill_seconds if self.prefill_seconds else 0.0

    @property
    def decode_tokens_per_second(self) -> float:
        return self.new_tokens / self.decode_seconds if self.decode_seconds else 0.0

    def as_dict(self) -> dict[str, float]:
        out = dataclasses.asdict(self)
        out["prefill_tokens_per_second"] = self.prefill_tokens_per_second
        out["decode_tokens_per_second"] = self.decode_tokens_per_second
        return out


@dataclasses.dataclass
class GenerationResult:
    tokens: np.ndarray  # [batch, n] new tokens; after a stop token: pad_token_id
    lengths: np.ndarray  # [batch] new tokens per row, the stop token included
    stats: GenerationStats

    def row(self, i: int) -> list[int]:
        return self.tokens[i, : self.lengths[i]].tolist()


@dataclasses.dataclass(frozen=True)
class Request:
    """A validated generation request: ``tokens [b, max_len]`` int32 (right-padded with
    ``pad_id``), ``lengths [b]``, and the decoding settings every strategy shares."""

    tokens: np.ndarray
    lengths: np.ndarray
    max_new_tokens: int
    sampling: SamplingConfig
    stop_ids: tuple[int, ...]
    pad_id: int
    seed: int

    @property
    def batch(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def longest(self) -> int:
        return int(self.lengths.max())

    def rows(self, rows: np.ndarray, length: int) -> Request:
        """The request restricted to ``rows``, cut to ``length`` tokens."""
        return dataclasses.replace(self, tokens=self.tokens[rows, :length],
                                   lengths=self.lengths[rows])


def prepare_prompts(
    input_ids: Any, vocab_size: int, pad_id: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Validate prompts (array ``[b, s]``, one list of ids, or a list of lists) and return
    ``(padded [b, max_len] int32, lengths [b])``. Raises typed errors naming the culprit."""
    if isinstance(input_ids, (np.ndarray, jax.Array)):
        array = np.asarray(input_ids)
        if array.ndim == 1:
            array = array[None]
        if array.ndim != 2:
            raise InputError(f"input_ids must be [batch, seq], got shape {array.shape}")
        rows = [list(r) for r in array]
    else:
        rows = list(input_ids)
        if rows and not isinstance(rows[0], (list, tuple, np.ndarray)):
            rows = [rows]
    if not rows:
        raise EmptyPromptError("no prompts given (batch of size 0)")
    lengths = np.asarray([len(r) for r in rows], np.int32)
    for i, n in enumerate(lengths):
        if n == 0:
            raise EmptyPromptError(f"prompt {i} is empty (0 tokens)")
    width = int(lengths.max())
    padded = np.full((len(rows), width), pad_id, np.int64)
    for i, r in enumerate(rows):
        padded[i, : len(r)] = np.asarray(r, np.int64)
        bad = [(j, int(t)) for j, t in enumerate(r) if not 0 <= int(t) < vocab_size]
        if bad:
            j, t = bad[0]
            raise TokenIdError(
                f"token id {t} at prompt {i}, position {j} is outside the vocabulary "
                f"[0, {vocab_size})"
            )
    return padded.astype(np.int32), lengths


def validate_request(
    config: Any,
    input_ids: Any,
    max_new_tokens: int,
    *,
    temperature: float,
    top_k: int,
    top_p: float,
    pad_token_id: int | None,
    stop_token_ids: Sequence[int] = (),
    seed: int = 0,
) -> Request:
    """Check the prompts, lengths and sampling settings of a request before any compute.
    Raises typed errors naming the culprit."""
    if max_new_tokens < 1:
        raise InputError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    sampling = SamplingConfig(float(temperature), int(top_k), float(top_p)).check()
    pad_id = 0 if pad_token_id is None else int(pad_token_id)
    tokens, lengths = prepare_prompts(input_ids, config.vocab_size, pad_id)
    longest = int(lengths.max())
    if longest + max_new_tokens > config.max_position_embeddings:
        worst = int(np.argmax(lengths))
        raise PromptTooLongError(
            f"prompt {worst} has {longest} tokens; with max_new_tokens={max_new_tokens} that is "
            f"{longest + max_new_tokens} > max_position_embeddings="
            f"{config.max_position_embeddings}"
        )
    return Request(tokens=tokens, lengths=lengths, max_new_tokens=int(max_new_tokens),
                   sampling=sampling, stop_ids=tuple(int(t) for t in stop_token_ids),
                   pad_id=pad_id, seed=int(seed))


def bucket(n: int, minimum: int = 16) -> int:
    """The power-of-two length bucket (at least ``minimum``) that holds ``n`` tokens."""
    size = minimum
    while size < n:
        size *= 2
    return size


class CompileCache:
    """Compiled executables of one model, by key (shapes and static settings)."""

    def __init__(self) -> None:
        self.executables: dict[Any, Any] = {}

    def get(self, key: Any, fn: Callable[..., Any], *args: Any) -> tuple[Any, bool]:
        """The executable of ``jax.jit(fn)`` for ``args`` under ``key``, and whether it was
        compiled by this call."""
        if key not in self.executables:
            self.executables[key] = jax.jit(fn).lower(*args).compile()
            return self.executables[key], True
        return self.executables[key], False


_CACHES: dict[Any, CompileCache] = {}


def compile_cache(owner: Any) -> CompileCache:
    """The compile cache of ``owner`` (a graph definition, or a tuple of them)."""
    return _CACHES.setdefault(owner, CompileCache())


def compiled(cache: CompileCache, stats: GenerationStats, key: Any, fn: Callable[..., Any],
             *args: Any) -> Any:
    """``cache.get`` that adds the compile time (if it compiled) to ``stats``."""
    t0 = time.perf_counter()
    executable, fresh = cache.get(key, fn, *args)
    if fresh:
        stats.compile_seconds += time.perf_counter() - t0
    return executable


# 4-bit integer dtypes and the byte-wide dtype that carries their values on a mesh
_SUB_BYTE = {jnp.dtype(jnp.int4): jnp.int8, jnp.dtype(jnp.uint4): jnp.uint8}


def on_mesh(tree: Any, mesh: Mesh) -> Any:
    """Every array leaf of ``tree`` on the devices of ``mesh``: a leaf already laid out over
    exactly those devices is kept (e.g. weights sharded by ``from_pretrained(mesh=)``); any
    other (numpy, or a jax array on this process's devices) is replicated over the mesh.
    On a mesh spanning several processes every process must pass the same values (the same
    weights, the same prompts): each fills its own devices from its own copy, without
    checking the others'."""
    sharding = NamedSharding(mesh, PartitionSpec())
    devices = sharding.device_set

    def place(x: Any) -> Any:
        if isinstance(x, jax.Array):
            if x.sharding.device_set == devices:
                return x
            if not x.is_fully_addressable:
                raise ConfigError(
                    f"an array of shape {x.shape} lies on devices "
                    f"{sorted(d.id for d in x.sharding.device_set)} of other processes, not "
                    f"on the mesh's {sorted(d.id for d in devices)}; load the model onto the "
                    "mesh it runs on, or onto this process's devices")
        elif isinstance(x, (np.ndarray, np.generic, int, float, bool)):
            x = np.asarray(x)
        else:
            return x
        if x.dtype in _SUB_BYTE:
            # JAX (CPU) drops the packed layout of 4-bit arrays placed on a mesh, and the
            # compiled program then refuses them: carry the same values in a byte each
            x = x.astype(_SUB_BYTE[x.dtype])
        if sharding.is_fully_addressable:
            return jax.device_put(x, sharding)
        return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])

    return jax.tree.map(place, tree)


def to_host(x: Any) -> np.ndarray:
    """``x`` as a numpy array in every process: an array that no single process holds all of
    (sharded over devices of several processes) is gathered from them first (a collective:
    every process must call it)."""
    if isinstance(x, jax.Array) and not (x.is_fully_addressable or x.is_fully_replicated):
        from jax.experimental import multihost_utils

        x = multihost_utils.process_allgather(x, tiled=True)
    return np.asarray(x)


def drive(
    loop: Callable[..., dict],
    args: Sequence[Any],
    carry: dict,
    *,
    limit: int,
    emitted: Callable[[dict], int],
    finished: Callable[[dict, int], bool],
    stream: Callable[[np.ndarray], None] | None = None,
    chunk: int = 8,
) -> tuple[dict, float]:
    """Run ``loop(*args, carry, limit)`` to ``limit`` and return ``(carry, seconds)``.

    With ``stream``: calls with limits ``chunk, 2 * chunk, ... limit``; after each,
    ``stream(carry["out"][:, :emitted(carry)])``; stops early once ``finished(carry, limit)``
    (every row stopped)."""
    t0 = time.perf_counter()
    if stream is None:
        carry = loop(*args, carry, jnp.asarray(limit, jnp.int32))
    else:
        step = 0
        while step < limit:
            step = min(step + chunk, limit)
            carry = loop(*args, carry, jnp.asarray(step, jnp.int32))
            stream(to_host(carry["out"])[:, : emitted(carry)])
            if finished(carry, step):
                break
    jax.block_until_ready(carry["out"])
    return carry, time.perf_counter() - t0
