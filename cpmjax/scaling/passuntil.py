"""PassUntil: task pass rates at (near) infinite resolution by sampling until a pass.

Greedy accuracy calls an instance solved or not; a small model whose chance of writing the right
answer is 1e-3 scores 0 exactly like one whose chance is 1e-9. PassUntil (Hu et al., 2023,
"Predicting Emergent Abilities with Infinite Resolution Evaluation") samples each instance
until it has passed ``r`` times (``required_passes``) or ``max_samples`` samples are spent, and
estimates the instance's pass probability ``p`` from the number of samples it took.

The estimator (:func:`pass_until_estimate`)
-------------------------------------------
An instance that stopped on its ``r``-th pass after ``n`` samples is one draw of a negative
binomial stopping time ``N_r`` (inverse binomial sampling):

- estimate: ``(r - 1) / (n - 1)`` for ``r >= 2``, the unique unbiased estimator of ``p`` under
  inverse binomial sampling (Haldane, 1945); ``1 / n`` (the maximum-likelihood estimate) for
  ``r = 1``, where no unbiased estimator exists (it overestimates: ``E[1/N] = -p log p / (1-p)``);
- interval: exact, from the tails of ``N_r`` through the beta / binomial relation
  ``P(N_r <= n) = P(Bin(n, p) >= r) = I_p(r, n - r + 1)``: lower bound
  ``Beta(r, n - r + 1).ppf(a / 2)``, upper bound ``Beta(r, n - r).ppf(1 - a / 2)`` (1 when
  ``n == r``), with ``a = 1 - confidence``. The upper bound is tighter than Clopper-Pearson's
  ``Beta(r + 1, n - r).ppf(1 - a / 2)``, which would treat the stopping time as fixed.

An instance that spent ``max_samples = M`` samples with ``k < r`` passes (truncated) is a plain
binomial observation: estimate ``k / M`` (0 for no pass, with a positive upper bound, never NaN)
and the Clopper-Pearson interval ``[Beta(k, M - k + 1).ppf(a / 2), Beta(k + 1, M - k).ppf(1 -
a / 2)]``. Both cases together are the exact interval of the truncated design: order the
outcomes truncated-with-0, ..., truncated-with-(r-1) passes, then stopped at ``n = M, M - 1,
..., r``; the tail probabilities of that order are exactly the four beta tails above, each
monotone in ``p``, so inverting them gives coverage of at least ``confidence`` for every
``p`` (tests/test_scaling_passuntil.py measures it). With truncation the ``(r-1)/(n-1)``
estimate keeps its unbiasedness only up to the probability of truncation.

The sampler (:func:`pass_until`)
--------------------------------
Every round fills one batch of ``batch_size`` rows from the instances still active (several
rows per instance when few remain), samples them with ``cpmjax.generate`` (prompts right-padded
to a power-of-two length bucket, so each bucket compiles once), and reads each instance's rows
in row order as its next samples: samples after an instance's ``r``-th pass are discarded (the
samples are i.i.d., so cutting the sequence at its stopping time keeps the negative binomial
law), and no instance gets more rows than its remaining budget. Round ``t`` samples with a
seed derived from ``(seed, t)``: the same seed gives the same results whatever the timing.
"""

from __future__ import annotations

import dataclasses
import json
import os
import weakref
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from cpmjax.errors import InputError, PromptTooLongError

__all__ = [
    "PassUntilResult",
    "greedy_accuracy",
    "pass_until",
    "pass_until_estimate",
    "stop_token_ids",
]

DEFAULT_MAX_NEW_TOKENS = 32


def _check_confidence(confidence: float) -> float:
    confidence = float(confidence)
    if not 0.0 < confidence < 1.0:
        raise InputError(f"confidence must be in (0, 1), got {confidence}")
    return confidence


def pass_until_estimate(
    passes: Any,
    samples: Any,
    confidence: float = 0.95,
    *,
    required_passes: Any = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(estimate, low, high)`` of the pass probability of instances sampled until a pass.

    ``passes``, ``samples``: scalars or arrays (broadcast together) of the passes seen and the
    samples spent. ``required_passes``: the ``r`` the sampler stopped on (scalar or array);
    an instance with fewer passes ran out of samples (binomial with ``samples`` trials). Without
    it every instance with ``passes >= 1`` is taken to have stopped on its last pass (``r =
    passes``) and one with 0 passes to have run out. See the module docstring for the
    estimators and the exact interval. Returns float64 arrays of the broadcast shape (0-d for
    scalar inputs)."""
    from scipy.stats import beta

    confidence = _check_confidence(confidence)
    passes = np.asarray(passes)
    samples = np.asarray(samples)
    if passes.size == 0 or samples.size == 0:
        raise InputError("pass_until_estimate needs at least one instance (got empty arrays)")
    for name, values in (("passes", passes), ("samples", samples)):
        if not np.all(np.isfinite(values)) or np.any(values != np.round(values)):
            raise InputError(f"{name} must hold whole numbers, got {values!r}")
    passes, samples = np.broadcast_arrays(passes.astype(np.int64), samples.astype(np.int64))
    if np.any(passes < 0):
        raise InputError(f"passes must be >= 0; instance {int(np.argmin(passes))} has "
                         f"{int(passes.min())}")
    bad = np.flatnonzero((samples < 1) | (passes > samples))
    if bad.size:
        i = int(bad[0])
        raise InputError(f"instance {i} has {int(passes.flat[i])} passes in "
                         f"{int(samples.flat[i])} samples: need 1 <= samples and passes <= "
                         "samples")
    if required_passes is None:
        stopped = passes >= 1
    else:
        required = np.broadcast_to(np.asarray(required_passes, np.int64), passes.shape)
        if np.any(required < 1):
            raise InputError(f"required_passes must be >= 1, got {required_passes!r}")
        over = np.flatnonzero(passes > required)
        if over.size:
            i = int(over[0])
            raise InputError(f"instance {i} has {int(passes.flat[i])} passes, more than "
                             f"required_passes={int(required.flat[i])}")
        stopped = passes == required
    r = passes.astype(np.float64)
    n = samples.astype(np.float64)
    tail = (1.0 - confidence) / 2.0
    with np.errstate(divide="ignore", invalid="ignore"):
        # stopped on the r-th pass after n samples: inverse binomial sampling
        unbiased = np.where(n > 1, (r - 1.0) / np.maximum(n - 1.0, 1.0), 1.0)
        nb_estimate = np.where(r >= 2, unbiased, r / n)
        nb_low = beta.ppf(tail, np.maximum(r, 1.0), n - r + 1.0)
        nb_high = np.where(n > r, beta.ppf(1.0 - tail, np.maximum(r, 1.0),
                                           np.maximum(n - r, 1.0)), 1.0)
        # ran out of samples with k = passes: binomial, Clopper-Pearson
        cp_estimate = r / n
        cp_low = np.where(r > 0, beta.ppf(tail, np.maximum(r, 1.0), n - r + 1.0), 0.0)
        cp_high = np.where(r < n, beta.ppf(1.0 - tail, r + 1.0, np.maximum(n - r, 1.0)), 1.0)
    estimate = np.where(stopped, nb_estimate, cp_estimate)
    low = np.where(stopped, nb_low, cp_low)
    high = np.where(stopped, nb_high, cp_high)
    return (estimate.astype(np.float64), low.astype(np.float64), high.astype(np.float64))


@dataclasses.dataclass
class PassUntilResult:
    """Per-instance PassUntil outcomes (arrays ``[instances]``) and the dataset summary.

    ``estimate``, ``low``, ``high``: :func:`pass_until_estimate` of ``passes`` in ``samples``;
    ``mean_estimate``: the dataset's PU, the mean of the instances' estimates (the quantity
    the task scaling law fits); ``metadata``: what the caller records beside it (the model, its
    non-embedding parameter count, the task)."""

    ids: list[str]
    passes: np.ndarray
    samples: np.ndarray
    estimate: np.ndarray
    low: np.ndarray
    high: np.ndarray
    required_passes: int
    max_samples: int
    confidence: float
    temperature: float
    seed: int
    rounds: int = 0
    compiled_rounds: int = 0  # rounds that compiled a program (once per prompt-length bucket)
    metadata: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def mean_estimate(self) -> float:
        return float(np.mean(self.estimate))

    @property
    def total_samples(self) -> int:
        return int(np.sum(self.samples))

    @property
    def total_passes(self) -> int:
        return int(np.sum(self.passes))

    @property
    def truncated(self) -> np.ndarray:
        """``[instances]`` bool: the instances that ran out of samples before ``r`` passes."""
        return self.passes < self.required_passes

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict (``from_json`` reads it back)."""
        return {
            "kind": "pass_until",
            "required_passes": self.required_passes,
            "max_samples": self.max_samples,
            "confidence": self.confidence,
            "temperature": self.temperature,
            "seed": self.seed,
            "rounds": self.rounds,
            "compiled_rounds": self.compiled_rounds,
            "mean_estimate": self.mean_estimate,
            "total_samples": self.total_samples,
            "total_passes": self.total_passes,
            "truncated_instances": int(np.sum(self.truncated)),
            **self.metadata,
            "instances": [
                {"id": i, "passes": int(p), "samples": int(s), "estimate": float(e),
                 "low": float(lo), "high": float(hi)}
                for i, p, s, e, lo, hi in zip(self.ids, self.passes, self.samples,
                                              self.estimate, self.low, self.high, strict=True)
            ],
        }

    @classmethod
    def from_json(cls, record: dict[str, Any]) -> PassUntilResult:
        known = {"kind", "required_passes", "max_samples", "confidence", "temperature", "seed",
                 "rounds", "compiled_rounds", "mean_estimate", "total_samples", "total_passes",
                 "truncated_instances", "instances"}
        try:
            rows = record["instances"]
            return cls(
                ids=[str(r["id"]) for r in rows],
                passes=np.asarray([r["passes"] for r in rows], np.int64),
                samples=np.asarray([r["samples"] for r in rows], np.int64),
                estimate=np.asarray([r["estimate"] for r in rows], np.float64),
                low=np.asarray([r["low"] for r in rows], np.float64),
                high=np.asarray([r["high"] for r in rows], np.float64),
                required_passes=int(record["required_passes"]),
                max_samples=int(record["max_samples"]),
                confidence=float(record["confidence"]),
                temperature=float(record["temperature"]),
                seed=int(record["seed"]),
                rounds=int(record.get("rounds", 0)),
                compiled_rounds=int(record.get("compiled_rounds", 0)),
                metadata={k: v for k, v in record.items() if k not in known},
            )
        except (KeyError, TypeError) as exc:
            raise InputError(f"not a pass_until result: missing or bad field {exc}") from exc

    def save(self, path: str | os.PathLike) -> str:
        from cpmjax.report import write_json

        return write_json(path, self.to_json())

    @classmethod
    def load(cls, path: str | os.PathLike) -> PassUntilResult:
        from cpmjax.errors import MissingPathError

        path = os.fspath(path)
        if not os.path.isfile(path):
            raise MissingPathError(f"pass_until result does not exist: {path}")
        with open(path, encoding="utf-8") as handle:
            try:
                record = json.load(handle)
            except json.JSONDecodeError as exc:
                raise InputError(f"{path} is not JSON: {exc}") from exc
        try:
            return cls.from_json(record)
        except InputError as exc:
            raise InputError(f"{path}: {exc}") from exc


# --- the sampler --------------------------------------------------------------------------


def _instance_id(instance: Any, index: int) -> str:
    return str(getattr(instance, "id", index))


def _task_defaults(check: Callable[..., bool], max_new_tokens: int | None,
                   stop: str | None) -> tuple[int, str | None]:
    """``max_new_tokens`` / ``stop`` left ``None`` are read from the task whose bound
    ``check`` method is passed (``Task.max_new_tokens``, ``Task.stop``)."""
    owner = getattr(check, "__self__", None)
    if max_new_tokens is None:
        max_new_tokens = getattr(owner, "max_new_tokens", None) or DEFAULT_MAX_NEW_TOKENS
    if stop is None:
        stop = getattr(owner, "stop", None)
    if int(max_new_tokens) < 1:
        raise InputError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if stop is not None and not isinstance(stop, str):
        raise InputError(f"stop must be a string, got {type(stop).__name__}")
    return int(max_new_tokens), (stop or None)


_STOP_IDS: dict[tuple[int, int, str | None], tuple[Any, tuple[int, ...]]] = {}


def stop_token_ids(tokenizer: Any, vocab_size: int, stop: str | None) -> tuple[int, ...]:
    """The ids generation stops on: the tokenizer's EOS and every id whose text contains
    ``stop`` (the completion is then cut before ``stop``). Decoding a whole vocabulary takes
    ~0.5 s, so the answer is kept per (live) tokenizer, vocabulary size and stop string."""
    key = (id(tokenizer), int(vocab_size), stop)
    cached = _STOP_IDS.get(key)
    if cached is not None and cached[0]() is tokenizer:
        return cached[1]
    ids = _find_stop_ids(tokenizer, vocab_size, stop)
    try:
        _STOP_IDS[key] = (weakref.ref(tokenizer), ids)
    except TypeError:  # an object without weak references: not cached
        pass
    return ids


def _find_stop_ids(tokenizer: Any, vocab_size: int, stop: str | None) -> tuple[int, ...]:
    ids: set[int] = set()
    eos = getattr(tokenizer, "eos_token_id", None)
    if isinstance(eos, int) and 0 <= eos < vocab_size:
        ids.add(eos)
    if stop:
        texts = tokenizer.batch_decode([[i] for i in range(vocab_size)]) if hasattr(
            tokenizer, "batch_decode") else [tokenizer.decode([i]) for i in range(vocab_size)]
        ids.update(i for i, text in enumerate(texts) if stop in text)
    return tuple(sorted(ids))


def _encode_all(model: Any, tokenizer: Any, instances: Sequence[Any],
                max_new_tokens: int) -> list[list[int]]:
    """Token ids of every prompt; typed errors name the instance."""
    limit = model.config.max_position_embeddings
    prompts = []
    for index, instance in enumerate(instances):
        prompt = getattr(instance, "prompt", None)
        if not isinstance(prompt, str):
            raise InputError(f"instance {_instance_id(instance, index)!r} has no text prompt "
                             f"(prompt={prompt!r})")
        ids = list(tokenizer(prompt, add_special_tokens=True)["input_ids"])
        if not ids:
            raise InputError(f"instance {_instance_id(instance, index)!r} has an empty prompt")
        if len(ids) + max_new_tokens > limit:
            raise PromptTooLongError(
                f"instance {_instance_id(instance, index)!r}: prompt of {len(ids)} tokens + "
                f"max_new_tokens={max_new_tokens} > max_position_embeddings={limit}")
        prompts.append(ids)
    return prompts


def _completion(tokenizer: Any, tokens: Sequence[int], stop: str | None) -> str:
    text = tokenizer.decode(list(tokens), skip_special_tokens=True)
    if stop:
        cut = text.find(stop)
        if cut >= 0:
            text = text[:cut]
    return text


def _checked(check: Callable[..., bool], instance: Any, index: int, completion: str) -> bool:
    try:
        return bool(check(instance, completion))
    except Exception as exc:  # a user's checker: report which instance broke it
        raise InputError(
            f"check raised {type(exc).__name__} on instance "
            f"{_instance_id(instance, index)!r} (completion {completion!r}): {exc}") from exc


def _round_seed(seed: int, round_index: int) -> int:
    """The sampling seed of round ``round_index``: a function of ``(seed, round)`` only."""
    state = np.random.SeedSequence([int(seed) & 0xFFFFFFFF, int(round_index)]).generate_state(1)
    return int(state[0] & 0x7FFFFFFF)


def _allocate(active: np.ndarray, remaining: np.ndarray, batch_size: int,
              cursor: int) -> list[tuple[int, int]]:
    """``[(instance, rows)]`` for one batch: the active instances from ``cursor`` on (round
    robin) share ``batch_size`` rows as evenly as possible, none beyond its ``remaining``
    budget."""
    order = np.roll(active, -cursor) if active.size else active
    order = order[:batch_size]
    rows = np.zeros(order.size, np.int64)
    free = batch_size
    # water-filling: hand out rows evenly, capped by each instance's budget
    while free > 0:
        room = remaining[order] - rows
        open_ = np.flatnonzero(room > 0)
        if open_.size == 0:
            break
        share = max(free // open_.size, 1)
        for j in open_:
            give = int(min(share, room[j], free))
            rows[j] += give
            free -= give
            if free == 0:
                break
    return [(int(i), int(k)) for i, k in zip(order, rows, strict=True) if k > 0]


def _prepare(model: Any, tokenizer: Any, instances: Sequence[Any], check: Any,
             max_new_tokens: int | None, stop: str | None
             ) -> tuple[int, str | None, list, tuple, Any]:
    """What both samplers need: ``(max_new_tokens, stop, prompt ids, stop ids, pad id)``, the
    task's defaults filled in from ``check``."""
    if not callable(check):
        raise InputError(f"check must be callable, got {type(check).__name__}")
    max_new_tokens, stop = _task_defaults(check, max_new_tokens, stop)
    prompts = _encode_all(model, tokenizer, instances, max_new_tokens)
    stops = stop_token_ids(tokenizer, model.config.vocab_size, stop)
    return max_new_tokens, stop, prompts, stops, getattr(model.config, "pad_token_id", None)


def _check_common(instances: Sequence[Any], batch_size: int) -> None:
    if instances is None or len(instances) == 0:
        raise InputError("no instances given (empty instance list)")
    if int(batch_size) < 1:
        raise InputError(f"batch_size must be >= 1, got {batch_size}")


def pass_until(
    model: Any,
    tokenizer: Any,
    instances: Sequence[Any],
    *,
    check: Callable[[Any, str], bool],
    required_passes: int = 1,
    max_samples: int = 100_000,
    batch_size: int = 256,
    temperature: float = 1.0,
    seed: int = 0,
    max_new_tokens: int | None = None,
    stop: str | None = None,
    confidence: float = 0.95,
    progress: bool = True,
) -> PassUntilResult:
    """Sample every instance until ``required_passes`` passes or ``max_samples`` samples.

    ``instances``: objects with a ``prompt`` string (and an ``id``; ``cpmjax.scaling.Instance``);
    ``check(instance, completion) -> bool`` judges the generated text after the prompt, cut
    before ``stop`` (``Task.check``; its ``stop`` and ``max_new_tokens`` are the defaults when
    ``check`` is a task's bound method, else no stop string and 32 tokens). Sampling is plain
    temperature sampling (no top-k / top-p) with ``cpmjax.generate``, ``batch_size`` rows per
    call; see the module docstring for the batching and the estimator. Deterministic for a
    ``seed``. Typed errors (``cpmjax.errors``) name the culprit before any compute; a checker
    that raises is reported with the instance's id."""
    from tqdm.auto import tqdm

    from cpmjax.generate import generate

    _check_common(instances, batch_size)
    if int(required_passes) < 1:
        raise InputError(f"required_passes must be >= 1, got {required_passes}")
    if int(max_samples) < int(required_passes):
        raise InputError(f"max_samples={max_samples} < required_passes={required_passes}: no "
                         "instance could ever reach its passes")
    if not float(temperature) > 0.0:
        raise InputError(f"temperature must be > 0 for PassUntil sampling (greedy decoding "
                         f"gives one answer per prompt; use greedy_accuracy), got {temperature}")
    confidence = _check_confidence(confidence)
    max_new_tokens, stop, prompts, stops, pad_id = _prepare(model, tokenizer, instances,
                                                            check, max_new_tokens, stop)

    count = len(instances)
    r, budget, batch_size = int(required_passes), int(max_samples), int(batch_size)
    passes = np.zeros(count, np.int64)
    samples = np.zeros(count, np.int64)
    filler = int(np.argmin([len(p) for p in prompts]))  # pads a short batch (results ignored)
    bar = tqdm(total=count, desc="PassUntil", unit="instance", disable=not progress)
    round_index, cursor, compiled_rounds = 0, 0, 0
    try:
        while True:
            active = np.flatnonzero((passes < r) & (samples < budget))
            if active.size == 0:
                break
            plan = _allocate(active, budget - samples, batch_size, cursor)
            cursor += len(plan)
            rows = [i for i, k in plan for _ in range(k)]
            rows += [filler] * (batch_size - len(rows))
            result = generate(
                model, [prompts[i] for i in rows], max_new_tokens, temperature=temperature,
                seed=_round_seed(seed, round_index), stop_token_ids=stops, pad_token_id=pad_id)
            compiled_rounds += result.stats.compile_seconds > 0
            row = 0
            for i, k in plan:
                for _ in range(k):
                    if passes[i] < r:  # later rows of a stopped instance are discarded
                        samples[i] += 1
                        text = _completion(tokenizer, result.row(row), stop)
                        passes[i] += _checked(check, instances[i], i, text)
                    row += 1
                if passes[i] >= r or samples[i] >= budget:
                    bar.update(1)
            round_index += 1
            bar.set_postfix(samples=int(samples.sum()), refresh=False)
    finally:
        bar.close()
    estimate, low, high = pass_until_estimate(passes, samples, confidence, required_passes=r)
    return PassUntilResult(
        ids=[_instance_id(x, i) for i, x in enumerate(instances)], passes=passes,
        samples=samples, estimate=estimate, low=low, high=high, required_passes=r,
        max_samples=budget, confidence=confidence, temperature=float(temperature),
        seed=int(seed), rounds=round_index, compiled_rounds=compiled_rounds)


def greedy_accuracy(
    model: Any,
    tokenizer: Any,
    instances: Sequence[Any],
    check: Callable[[Any, str], bool],
    *,
    batch_size: int = 256,
    max_new_tokens: int | None = None,
    stop: str | None = None,
    progress: bool = False,
) -> float:
    """The fraction of ``instances`` whose greedy completion passes ``check``: the baseline
    PassUntil refines (0 for every instance a model solves with probability below its best
    token path's)."""
    from tqdm.auto import tqdm

    from cpmjax.generate import generate

    _check_common(instances, batch_size)
    max_new_tokens, stop, prompts, stops, pad_id = _prepare(model, tokenizer, instances,
                                                            check, max_new_tokens, stop)
    batch_size = int(batch_size)
    correct = 0
    for start in tqdm(range(0, len(prompts), batch_size), desc="greedy", disable=not progress):
        chunk = list(range(start, min(start + batch_size, len(prompts))))
        # the last batch is padded to the others' size so that it reuses their compilation
        rows = chunk + [chunk[0]] * (min(batch_size, len(prompts)) - len(chunk))
        result = generate(model, [prompts[i] for i in rows], max_new_tokens,
                                 temperature=0.0, stop_token_ids=stops, pad_token_id=pad_id)
        for row, i in enumerate(chunk):
            correct += _checked(check, instances[i], i,
                                _completion(tokenizer, result.row(row), stop))
    return correct / len(prompts)
