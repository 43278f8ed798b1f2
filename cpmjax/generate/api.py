"""``cpmjax.generate``: the one front door of decoding.

It validates the whole request before any compute (prompts and lengths, sampling, the prefill
strategy with its mesh and options, the speculative settings and their combination), then
dispatches: vanilla decoding after a local or distributed prefill
(``cpmjax.generate.decode``), or speculative decoding after a local or exact ring prefill
(``cpmjax.generate.speculative``). Both run on the shared driver (``cpmjax.generate.driver``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np

from cpmjax.errors import ConfigError, InputError
from cpmjax.generate.decode import vanilla_generate
from cpmjax.generate.driver import GenerationResult, validate_request
from cpmjax.generate.prefill import check_prefill
from cpmjax.generate.speculative import (
    Speculative,
    check_speculative,
    resolve,
    run_speculative,
)
from cpmjax.models import CausalLM

__all__ = ["SPECULATIVE_PREFILLS", "generate"]

# the prefills speculative decoding can follow: the draft reads the target's features of the
# whole prompt, which APB / Star (approximate, compressed) do not leave
SPECULATIVE_PREFILLS = ("local", "ring")


def generate(
    model: CausalLM,
    input_ids: Any,
    max_new_tokens: int,
    *,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int = 0,
    stop_token_ids: Sequence[int] = (),
    pad_token_id: int | None = None,
    stream: Callable[[np.ndarray], None] | None = None,
    stream_every: int = 8,
    speculative: Speculative | None = None,
    prefill: str = "local",
    mesh: jax.sharding.Mesh | None = None,
    prefill_options: dict[str, Any] | None = None,
) -> GenerationResult:
    """Generate up to ``max_new_tokens`` new tokens per prompt.

    ``input_ids``: ``[batch, seq]`` array or a (ragged) list of token-id lists. ``stream``, if
    given, is called with the ``[batch, n]`` tokens generated so far after every
    ``stream_every`` tokens. Returns a ``GenerationResult`` with ``.tokens [batch, n]``,
    ``.lengths [batch]`` and ``.stats``. Sampling: greedy (``temperature == 0``), or temperature
    with top-k and/or top-p (nucleus).

    ``speculative``: a ``cpmjax.Speculative`` to decode with a draft (EAGLE-2 / FR-Spec; the
    same output distribution, see ``cpmjax.generate.speculative``; ``Speculative()`` uses the
    draft shipped for the bundled model). The stats are then a ``SpeculativeStats``.

    ``prefill``: ``"local"`` (one device, the default), or a distributed long-context prefill over
    the ``sequence`` axis of ``mesh``: ``"apb"`` (anchor + compressed passing blocks),
    ``"star"`` (anchor + local block, nothing passed) or ``"ring"`` (exact, BurstAttention).
    ``prefill_options`` go to ``cpmjax.generate.prefill.apb_prefill`` (``anchor_len``,
    ``passing_len``, ``query_len``, ``query_offset``, ``scorer`` ...). A distributed prefill lays
    out one prompt length at a time: prompts of different lengths run as one batch per length
    (sampling seeds the same per batch); the cache stays sharded along the sequence and
    decoding attends to every host's part of it. Speculative decoding follows a local or ring
    prefill; with ``"apb"`` / ``"star"`` it is refused (``ConfigError``).

    Raises typed errors from ``cpmjax.errors`` naming the culprit, before any compute."""
    request = validate_request(
        model.config, input_ids, max_new_tokens, temperature=temperature, top_k=top_k,
        top_p=top_p, pad_token_id=pad_token_id, stop_token_ids=stop_token_ids, seed=seed,
    )
    if stream is not None and stream_every < 1:
        raise InputError(f"stream_every must be >= 1, got {stream_every}")
    prefill = check_prefill(prefill, mesh, prefill_options)
    if speculative is None:
        return vanilla_generate(model, request, prefill=prefill, mesh=mesh,
                                options=prefill_options, stream=stream,
                                stream_every=stream_every)
    check_speculative(speculative)
    if prefill not in SPECULATIVE_PREFILLS:
        raise ConfigError(
            f"speculative={speculative.method} cannot follow prefill={prefill!r}: the draft "
            f"reads the target's features of the whole prompt, which the approximate "
            f"{prefill} prefill does not compute; use prefill='ring' (exact, distributed) or "
            "'local', or decode without speculative")
    resolved = resolve(speculative, model)
    result, _ = run_speculative(model, request, speculative, resolved, prefill=prefill,
                                mesh=mesh, stream=stream, stream_every=stream_every)
    return result
