"""Policies: what the agents ask for the next reply. A policy is any callable
``prompt (str) -> str | Completion``; tests script one, ``ModelPolicy`` wraps
``cpmjax.generate`` (stop tokens, stop strings checked while streaming, token counts)."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from typing import Any

from cpmjax.errors import PromptTooLongError
from cpmjax.generate import generate

__all__ = ["Completion", "ModelPolicy", "Policy", "as_completion"]


@dataclasses.dataclass
class Completion:
    """One reply of a policy, with what it cost."""

    text: str
    prompt_tokens: int = 0
    new_tokens: int = 0
    seconds: float = 0.0


Policy = Callable[[str], "str | Completion"]


def as_completion(value: str | Completion, seconds: float) -> Completion:
    """A policy's return value as a ``Completion`` (a bare string costs no counted tokens)."""
    if isinstance(value, Completion):
        return value
    return Completion(text=str(value), seconds=seconds)


class _StopText(Exception):
    """Raised inside the streaming callback once a stop string has appeared."""


def _cut(text: str, stops: Sequence[str], keep: Sequence[str]) -> int | None:
    """Where the reply ends: before the earliest stop string (after it, for ``keep`` ones)."""
    best = None
    for stop in stops:
        at = text.find(stop)
        if at >= 0:
            end = at + len(stop) if stop in keep else at
            if best is None or at < best[0]:
                best = (at, end)
    return None if best is None else best[1]


class ModelPolicy:
    """A model as a policy: encode the prompt, ``cpmjax.generate`` with the EOS ids (and any
    stop string that is one token of the vocabulary) as stop tokens, end the reply at the first
    stop string (checked every ``stream_every`` tokens), decode it. ``on_text`` receives the
    reply as it streams (new text only). A seed per call (``seed + call index``) makes sampled
    re-expansions differ. Raises ``PromptTooLongError`` when the prompt leaves no room."""

    def __init__(self, model: Any, tokenizer: Any, *, max_new_tokens: int = 128,
                 temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seed: int = 0,
                 stop_strings: Sequence[str] = (), keep_stop: Sequence[str] = (),
                 on_text: Callable[[str], None] | None = None, stream_every: int = 8) -> None:
        self.model, self.tokenizer = model, tokenizer
        self.max_new_tokens = max_new_tokens
        self.sampling = {"temperature": temperature, "top_k": top_k, "top_p": top_p}
        self.seed = seed
        self.stop_strings, self.keep_stop = tuple(stop_strings), tuple(keep_stop)
        self.on_text = on_text
        self.stream_every = stream_every
        self.calls = 0
        self._skip = self._special_ids()
        self._stop_ids = sorted(self._eos_ids() | self._single_token_stops())

    def _eos_ids(self) -> set[int]:
        ids = set()
        for value in (getattr(self.tokenizer, "eos_token_id", None),
                      getattr(self.model.config, "eos_token_id", None)):
            if isinstance(value, int):
                ids.add(value)
            elif isinstance(value, (list, tuple)):
                ids.update(int(v) for v in value)
        return ids

    def _single_token_stops(self) -> set[int]:
        vocab = self.tokenizer.get_vocab() if hasattr(self.tokenizer, "get_vocab") else {}
        return {vocab[s] for s in self.stop_strings if s in vocab}

    def _special_ids(self) -> set[int]:
        ids = self._eos_ids()
        for name in ("bos_token_id", "pad_token_id"):
            value = getattr(self.tokenizer, name, None)
            if isinstance(value, int):
                ids.add(value)
        return ids

    def _decode(self, tokens: list[int]) -> str:
        return self.tokenizer.decode([t for t in tokens if t not in self._skip],
                                     skip_special_tokens=False)

    def __call__(self, prompt: str) -> Completion:
        start = time.perf_counter()
        with_template = bool(getattr(self.tokenizer, "chat_template", None))
        ids = list(self.tokenizer(prompt, add_special_tokens=not with_template)["input_ids"])
        limit = int(self.model.config.max_position_embeddings)
        budget = min(self.max_new_tokens, limit - len(ids))
        if budget < 1:
            raise PromptTooLongError(
                f"the agent's prompt has {len(ids)} tokens and the model takes {limit}; "
                "use fewer steps or tools")
        holdback = max((len(s) for s in self.stop_strings), default=1) - 1
        state = {"tokens": [], "shown": 0}

        def show(text: str, final: bool) -> None:
            upto = len(text) if final else max(state["shown"], len(text) - holdback)
            if self.on_text is not None and upto > state["shown"]:
                self.on_text(text[state["shown"]:upto])
            state["shown"] = max(state["shown"], upto)

        def stream(tokens: Any) -> None:
            state["tokens"] = tokens[0].tolist()
            text = self._decode(state["tokens"])
            if text.endswith("\ufffd"):
                return  # an incomplete character: wait for the rest
            end = _cut(text, self.stop_strings, self.keep_stop)
            show(text if end is None else text[:end], final=end is not None)
            if end is not None:
                raise _StopText

        seed = self.seed + self.calls
        self.calls += 1
        try:
            result = generate(self.model, [ids], budget, seed=seed,
                              stop_token_ids=self._stop_ids, stream=stream,
                              stream_every=self.stream_every, **self.sampling)
            tokens = result.row(0)
        except _StopText:
            tokens = state["tokens"]
        text = self._decode(tokens)
        end = _cut(text, self.stop_strings, self.keep_stop)
        text = text if end is None else text[:end]
        show(text, final=True)
        return Completion(text=text, prompt_tokens=len(ids), new_tokens=len(tokens),
                          seconds=time.perf_counter() - start)
