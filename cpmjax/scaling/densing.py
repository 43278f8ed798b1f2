"""The Densing Law: a model's capacity density against a reference family.

Two fitted laws carry a downstream score back to a parameter count (Xiao et al., "Densing Law of
LLMs", 2024):

1. the loss law of the reference family, ``L(N, D) = a·N^-α + b·D^-β`` (``N`` non-embedding
   parameters, ``D`` training tokens, ``L`` a loss: the conditional loss on a task's answers, or
   a held-out language-model loss), fitted by :func:`fit_loss_law`;
2. the score law, ``S(L) = c / (1 + exp(-γ (L - l))) + d``, fitted by :func:`fit_score_law` on
   the same family's (loss, score) pairs.

A model scoring ``S`` then has the effective size ``N̂ = L⁻¹(S⁻¹(S), D)`` (the size a reference
model trained on ``D`` tokens would need to score ``S``, :func:`effective_params`) and the
capacity density ``ρ = N̂ / N`` (:func:`density`). The density of the best models over time
follows ``ln ρ = A·t + B`` (:func:`fit_density_trend`; the paper finds ``A ≈ 0.0073`` per day,
a doubling every ``ln 2 / A ≈ 95`` days).

Uncertainty: each fit reports the covariance of its parameters from the Jacobian at the optimum
(``s² (JᵀJ)⁻¹``, ``s²`` the residual variance), in the parametrisation it is fitted in (``log a,
α, log b, β`` and ``log c, γ, l, d``, so sampled sizes and amplitudes stay positive).
:func:`density` propagates both covariances (and, if given, the score's own standard error) by a
parametric bootstrap: it draws parameter sets from the two Gaussians, inverts each, and reports
the percentile interval of ``N̂``. A draw whose score the sampled sigmoid cannot reach counts as
``N̂ = 0`` (score below what any loss gives) or ``N̂ = ∞`` (score beyond the loss law's floor),
so an interval may be one-sided (an explicit bound), never NaN. The interval is as good as the
Gaussian (linearised) picture of the fits: tests check its coverage on synthetic families.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import functools
import math
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from cpmjax.errors import (
    EmptyPromptError,
    FitError,
    InputError,
    OutOfRangeError,
    PromptTooLongError,
    TokenIdError,
)

__all__ = [
    "DensityEstimate",
    "DensityTrend",
    "LossLaw",
    "ScoreLaw",
    "conditional_loss",
    "density",
    "effective_params",
    "fit_density_trend",
    "fit_loss_law",
    "fit_score_law",
    "loss_density",
    "nonzero_params",
    "text_chunks",
    "text_loss_per_byte",
]


# --------------------------------------------------------------------------------------------
# conditional loss


def _example_pair(example: Any, index: int) -> tuple[Any, Any]:
    if hasattr(example, "prompt") and hasattr(example, "answer"):
        return example.prompt, example.answer
    if isinstance(example, (tuple, list)) and len(example) == 2:
        return example[0], example[1]
    raise InputError(f"examples[{index}] is neither an object with .prompt/.answer nor a "
                     f"(prompt, answer) pair: {example!r:.80}")


def _token_ids(text_or_ids: Any, tokenizer: Any, *, special: bool, what: str) -> list[int]:
    if isinstance(text_or_ids, str):
        if tokenizer is None:
            raise InputError(f"{what} is text but no tokenizer was given")
        return list(tokenizer(text_or_ids, add_special_tokens=special)["input_ids"])
    try:
        return [int(t) for t in text_or_ids]
    except (TypeError, ValueError) as exc:
        raise InputError(f"{what} is neither text nor a sequence of token ids") from exc


def _joint_token_ids(prompt: Any, answer: Any, tokenizer: Any, index: int
                     ) -> tuple[list[int], list[int]]:
    """``prompt + answer`` encoded as one text (with the tokenizer's special tokens), split
    into prompt and answer ids by the tokens' character offsets: a token whose span ends after
    the prompt's last character is an answer token (one that starts inside the prompt and ends
    inside the answer, straddling the boundary, counts as an answer token), as is everything
    after it; zero-width special tokens after the last answer character (an EOS the tokenizer
    appends) are dropped, as the separate encoding never appends them to the answer."""
    what = f"examples[{index}]"
    if not (isinstance(prompt, str) and isinstance(answer, str)):
        raise InputError(f"{what}: joint tokenization encodes text; the prompt and the answer "
                         "must both be text, not token ids")
    if tokenizer is None:
        raise InputError(f"{what} is text but no tokenizer was given")
    text = prompt + answer
    try:
        encoded = tokenizer(text, add_special_tokens=True, return_offsets_mapping=True)
        offsets = encoded["offset_mapping"]
    except (TypeError, KeyError, NotImplementedError, ValueError) as exc:
        raise InputError(f"joint tokenization needs the tokenizer's character offsets "
                         f"(return_offsets_mapping, e.g. an HF fast tokenizer); "
                         f"{type(tokenizer).__name__} gives none: {exc}") from None
    ids = [int(t) for t in encoded["input_ids"]]
    spans = [(int(a), int(b)) for a, b in offsets]
    if len(spans) != len(ids):
        raise InputError(f"joint tokenization needs one character offset per token; "
                         f"{type(tokenizer).__name__} gave {len(spans)} for {len(ids)} tokens")
    boundary = len(prompt)
    first = next((k for k, (a, b) in enumerate(spans) if b > a and b > boundary), len(ids))
    last = max((k for k, (a, b) in enumerate(spans) if b > a), default=-1)
    return ids[:first], ids[first:max(last + 1, first)]


def _tokenize_examples(examples: Iterable[Any], tokenizer: Any, vocab_size: int,
                       max_len: int, *, joint: bool = False) -> list[tuple[list[int], int]]:
    """``(prompt + answer ids, prompt length)`` per example. Text prompts are encoded with the
    tokenizer's special tokens (BOS), answers without, and the two are concatenated: the answer
    is scored as the continuation the tokenizer would give it on its own. With ``joint``, the
    concatenated text is encoded once and split by character offsets (:func:`_joint_token_ids`)."""
    rows = []
    for i, example in enumerate(examples):
        prompt, answer = _example_pair(example, i)
        if joint:
            prompt_ids, answer_ids = _joint_token_ids(prompt, answer, tokenizer, i)
        else:
            prompt_ids = _token_ids(prompt, tokenizer, special=True,
                                    what=f"examples[{i}].prompt")
            answer_ids = _token_ids(answer, tokenizer, special=False,
                                    what=f"examples[{i}].answer")
        if not prompt_ids:
            raise EmptyPromptError(f"examples[{i}].prompt has no tokens (a token must precede "
                                   "the answer to condition on)")
        if not answer_ids:
            raise InputError(f"examples[{i}].answer has no tokens")
        ids = prompt_ids + answer_ids
        bad = [t for t in ids if not 0 <= t < vocab_size]
        if bad:
            raise TokenIdError(f"examples[{i}] has token id {bad[0]} outside the vocabulary "
                               f"[0, {vocab_size})")
        if len(ids) - 1 > max_len:
            raise PromptTooLongError(f"examples[{i}]: prompt + answer is {len(ids)} tokens, more "
                                     f"than max_position_embeddings + 1 = {max_len + 1}")
        rows.append((ids, len(prompt_ids)))
    if not rows:
        raise InputError("examples is empty")
    return rows


@functools.lru_cache(maxsize=16)
def _batch_loss_fn(graphdef: Any, chunk: int) -> Any:
    """The jitted ``(state, inputs, targets, mask) -> (loss sum, answer tokens)`` of one model
    structure; cached so that repeated calls on one model (or models of one shape) compile once
    per batch shape."""
    import jax
    from flax import nnx

    from cpmjax.train import chunked_cross_entropy

    @jax.jit
    def batch_loss(state, inputs, targets, mask):
        m = nnx.merge(graphdef, state)
        hidden = m(inputs, return_hidden=True)
        loss, aux = chunked_cross_entropy(hidden, m.head_weight(), targets, mask,
                                          chunk_size=chunk, remat=False)
        return loss * aux["tokens"], aux["tokens"]

    return batch_loss


def conditional_loss(model: Any, tokenizer: Any, examples: Iterable[Any], *,
                     batch_size: int = 16, chunk: int = 128, bucket: int = 32,
                     joint: bool = False) -> float:
    """Mean ``-log P(answer | prompt)`` per answer token, over all answer tokens of ``examples``.

    ``examples``: objects with ``.prompt`` / ``.answer`` (``cpmjax.scaling.Instance``) or
    ``(prompt, answer)`` pairs, each text (encoded by ``tokenizer``; the prompt with its special
    tokens, the answer without) or a sequence of token ids (then ``tokenizer`` may be ``None``).
    Rows are right-padded to a multiple of ``bucket`` and run ``batch_size`` at a time through
    one jitted forward per shape; the loss is ``cpmjax.train.chunked_cross_entropy``, which never
    builds more than ``[batch, chunk, vocab]`` logits at once, in float32. The mean weights every
    answer token equally (a long answer counts more than a short one).

    ``joint=True``: encode ``prompt + answer`` as one text instead (a BPE tokenizer may merge
    across the boundary, as it does in training text) and score as answer tokens those whose
    character span ends after the prompt's end (a token straddling the boundary counts as an
    answer token; the prompt then keeps the tokens that lie wholly inside it). Needs text
    examples and a tokenizer that gives character offsets (``return_offsets_mapping``: HF fast
    tokenizers); otherwise :class:`InputError`."""
    if batch_size < 1 or chunk < 1 or bucket < 1:
        raise InputError(f"batch_size={batch_size}, chunk={chunk}, bucket={bucket}: each must be "
                         "a positive integer")
    rows = _tokenize_examples(examples, tokenizer, model.config.vocab_size,
                              model.config.max_position_embeddings, joint=bool(joint))
    total, count = _rows_loss(model, rows, batch_size, chunk, bucket)
    return total / count


def _rows_loss(model: Any, rows: list[tuple[list[int], int]], batch_size: int, chunk: int,
               bucket: int) -> tuple[float, float]:
    """``(summed -log P, scored tokens)`` of tokenized rows ``(ids, prompt length)``: every
    token after the prompt is scored (see :func:`conditional_loss`)."""
    import jax.numpy as jnp
    from flax import nnx

    config = model.config
    graphdef, state = nnx.split(model)
    batch_loss = _batch_loss_fn(graphdef, int(chunk))
    batch_size = min(int(batch_size), len(rows))  # one row count for every batch of this call
    total, count = 0.0, 0.0
    for start in range(0, len(rows), batch_size):
        part = rows[start:start + batch_size]
        longest = max(len(ids) - 1 for ids, _ in part)
        width = min(-(-longest // bucket) * bucket, config.max_position_embeddings)
        width = max(width, longest)
        inputs = np.zeros((batch_size, width), np.int32)
        targets = np.zeros((batch_size, width), np.int32)
        mask = np.zeros((batch_size, width), np.float32)
        for r, (ids, prompt_len) in enumerate(part):
            n = len(ids) - 1
            inputs[r, :n] = ids[:-1]
            targets[r, :n] = ids[1:]
            mask[r, prompt_len - 1:n] = 1.0  # targets that are answer tokens
        loss_sum, tokens = batch_loss(state, jnp.asarray(inputs), jnp.asarray(targets),
                                      jnp.asarray(mask))
        total, count = total + loss_sum, count + tokens  # on device: one sync at the end
    return float(total), float(count)


def text_chunks(text: str, max_bytes: int) -> list[str]:
    """``text`` cut into pieces of whole lines of at most ``max_bytes`` UTF-8 bytes each (a
    longer line is cut at character boundaries); blank-only pieces are dropped. Joined, the
    pieces give back ``text`` but for those blank pieces."""
    if max_bytes < 1:
        raise InputError(f"max_bytes must be >= 1, got {max_bytes}")
    pieces, current, size = [], [], 0
    for line in text.splitlines(keepends=True):
        n = len(line.encode("utf-8"))
        if current and size + n > max_bytes:
            pieces.append("".join(current))
            current, size = [], 0
        while n > max_bytes:  # one line longer than a piece
            cut, used = 0, 0
            for ch in line:
                b = len(ch.encode("utf-8"))
                if used + b > max_bytes:
                    break
                cut, used = cut + 1, used + b
            pieces.append(line[:cut])
            line = line[cut:]
            n = len(line.encode("utf-8"))
        if line:
            current.append(line)
            size += n
    if current:
        pieces.append("".join(current))
    return [p for p in pieces if p.strip()]


def text_loss_per_byte(model: Any, tokenizer: Any, texts: Iterable[str], *,
                       max_bytes: int = 256, batch_size: int = 16, chunk: int = 128
                       ) -> tuple[float, int, int]:
    """A tokenizer-free language-model loss: ``(nats per UTF-8 byte, bytes, tokens)`` over
    ``texts``. Each text is cut into pieces of whole lines of at most ``max_bytes`` bytes
    (:func:`text_chunks`), each piece scored as its own document (the tokenizer's BOS, then the
    piece: every token of the piece is a target), and the summed ``-log P`` divided by the
    pieces' bytes. Models with different tokenizers read the same text in the same contexts,
    so their losses compare (and a family's loss law can be fitted in these units)."""
    if batch_size < 1 or chunk < 1:
        raise InputError(f"batch_size={batch_size}, chunk={chunk}: each must be a positive "
                         "integer")
    pieces = [p for t in texts for p in text_chunks(t, max_bytes)]
    if not pieces:
        raise InputError("texts hold no non-blank text to score")
    rows = _tokenize_examples([("", p) for p in pieces], tokenizer, model.config.vocab_size,
                              model.config.max_position_embeddings)
    total, tokens = _rows_loss(model, rows, batch_size, chunk, bucket=32)
    n_bytes = sum(len(p.encode("utf-8")) for p in pieces)
    return total / n_bytes, n_bytes, int(tokens)


# --------------------------------------------------------------------------------------------
# the measured model's size


def _is_embedding(path: Sequence[Any]) -> bool:
    names = [str(p) for p in path]
    return "embed_tokens" in names or "lm_head" in names


def nonzero_params(model: Any) -> int:
    """Nonzero non-embedding weights of ``model``: the ``N`` of a pruned or quantized model.

    The rule: every ``nnx.Param`` leaf outside the token embedding and the LM head (the leaves
    ``cpmjax.scaling.non_embedding_params`` counts) contributes its nonzero entries; every
    quantized linear layer (``cpmjax.compress.QuantizedLinear``, whose integer kernel and scales
    are not parameters) contributes the nonzero entries of its logical ``[in, out]`` weight,
    ``dequantized()`` with its pruning mask (if any) applied: a weight that quantization
    rounded to 0 counts as 0, the scales do not count. So an unpruned float model gives
    ``non_embedding_params(model)`` (unless a weight is exactly 0), a pruned one that count
    less its zeros."""
    from flax import nnx

    from cpmjax.compress import QuantizedLinear

    if not isinstance(model, nnx.Module):
        raise InputError(f"nonzero_params: {type(model).__name__} is not a model (an "
                         "nnx.Module such as cpmjax.models.CausalLM)")
    total = 0
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        if not _is_embedding(path):
            total += int(np.count_nonzero(np.asarray(var[...])))
    for path, node in nnx.iter_graph(model):
        if isinstance(node, QuantizedLinear) and not _is_embedding(path):
            weight = np.asarray(node.dequantized())
            mask = getattr(node, "prune_mask", None)
            if mask is not None:
                weight = np.where(np.asarray(mask[...]), weight, 0.0)
            total += int(np.count_nonzero(weight))
    return total


# --------------------------------------------------------------------------------------------
# shared fitting helpers


def _as_positive_array(values: Any, name: str) -> np.ndarray:
    arr = np.asarray(values, dtype=np.float64).reshape(-1)
    if not np.all(np.isfinite(arr)):
        i = int(np.flatnonzero(~np.isfinite(arr))[0])
        raise FitError(f"{name}[{i}] = {arr[i]} is not finite")
    if np.any(arr <= 0):
        i = int(np.flatnonzero(arr <= 0)[0])
        raise FitError(f"{name}[{i}] = {arr[i]} is not positive")
    return arr


def _as_finite_array(values: Any, name: str) -> np.ndarray:
    arr = np.asarray(values, dtype=np.float64).reshape(-1)
    if not np.all(np.isfinite(arr)):
        i = int(np.flatnonzero(~np.isfinite(arr))[0])
        raise FitError(f"{name}[{i}] = {arr[i]} is not finite")
    return arr


def _check_lengths(law_size: int, **arrays: np.ndarray) -> int:
    lengths = {name: len(a) for name, a in arrays.items()}
    if len(set(lengths.values())) != 1:
        raise FitError(f"the inputs differ in length: {lengths}")
    n = next(iter(lengths.values()))
    if n < law_size:
        raise FitError(f"{n} points for a law of {law_size} parameters: "
                       f"{', '.join(arrays)} need at least {law_size} points")
    return n


def _covariance(jac: np.ndarray, residuals: np.ndarray) -> np.ndarray:
    """``s² (JᵀJ)⁻¹`` at the optimum; infinite where the data leave no residual degrees of
    freedom or a direction is not identified."""
    n, p = jac.shape
    dof = n - p
    if dof <= 0:
        return np.full((p, p), np.inf)
    s2 = float(residuals @ residuals) / dof
    jtj = jac.T @ jac
    if np.linalg.matrix_rank(jtj) < p:
        return np.full((p, p), np.inf)
    return s2 * np.linalg.inv(jtj)


def _r2(observed: np.ndarray, predicted: np.ndarray) -> float:
    ss_res = float(np.sum((observed - predicted) ** 2))
    ss_tot = float(np.sum((observed - observed.mean()) ** 2))
    return 1.0 - ss_res / ss_tot if ss_tot > 0 else (1.0 if ss_res == 0 else 0.0)


def _finite_covariance(cov: np.ndarray) -> bool:
    return bool(np.all(np.isfinite(cov)))


# --------------------------------------------------------------------------------------------
# step 1: the loss law


@dataclasses.dataclass(frozen=True)
class LossLaw:
    """``L(N, D) = a·N^-α + b·D^-β``. ``covariance`` is over ``(log a, α, log b, β)``;
    ``stderr`` holds the standard errors of ``a, alpha, b, beta`` (delta method for ``a``, ``b``;
    infinite where the data do not determine them). ``r2`` is on the losses themselves."""

    a: float
    alpha: float
    b: float
    beta: float
    r2: float
    covariance: np.ndarray
    stderr: dict[str, float]
    n_points: int

    def predict(self, n_params: Any, n_tokens: Any) -> Any:
        """The law's loss at ``n_params`` and ``n_tokens`` (scalars or broadcastable arrays)."""
        n = np.asarray(n_params, dtype=np.float64)
        d = np.asarray(n_tokens, dtype=np.float64)
        out = self.a * n ** -self.alpha + self.b * d ** -self.beta
        return float(out) if out.ndim == 0 else out

    def floor(self, n_tokens: float) -> float:
        """The loss an infinitely large model reaches on ``n_tokens``: ``b·D^-β``."""
        return float(self.b * float(n_tokens) ** -self.beta)

    def inverse_params(self, loss: float, n_tokens: float, *, bound: bool = False) -> float:
        """The ``N`` with ``L(N, n_tokens) = loss``: ``(a / (loss - b·D^-β))^(1/α)``. A loss at or
        below the floor raises :class:`OutOfRangeError` (with ``bound=True``: returns ``inf``,
        the bound "larger than any size")."""
        n_tokens = float(_as_positive_array([n_tokens], "n_tokens")[0])
        loss = float(loss)
        if math.isnan(loss):
            raise OutOfRangeError("loss is NaN")
        excess = loss - self.floor(n_tokens)
        if loss == math.inf:
            return 0.0
        if excess <= 0:
            if bound:
                return math.inf
            raise OutOfRangeError(
                f"loss {loss:.6g} is at or below the loss law's floor b·D^-β = "
                f"{self.floor(n_tokens):.6g} at n_tokens={n_tokens:.6g}: no finite size reaches it")
        return float((self.a / excess) ** (1.0 / self.alpha))

    def to_dict(self) -> dict[str, Any]:
        return {"a": self.a, "alpha": self.alpha, "b": self.b, "beta": self.beta, "r2": self.r2,
                "stderr": dict(self.stderr), "n_points": self.n_points,
                "covariance_log_a_alpha_log_b_beta": self.covariance.tolist()}


def _loss_law_residuals(theta: np.ndarray, log_n: np.ndarray, log_d: np.ndarray,
                        log_loss: np.ndarray) -> np.ndarray:
    log_a, alpha, log_b, beta = theta
    pred = np.exp(log_a - alpha * log_n) + np.exp(log_b - beta * log_d)
    return np.log(pred) - log_loss


def _loss_law_jacobian(theta: np.ndarray, log_n: np.ndarray, log_d: np.ndarray,
                       log_loss: np.ndarray) -> np.ndarray:
    log_a, alpha, log_b, beta = theta
    t1 = np.exp(log_a - alpha * log_n)
    t2 = np.exp(log_b - beta * log_d)
    pred = t1 + t2
    return np.stack([t1 / pred, -log_n * t1 / pred, t2 / pred, -log_d * t2 / pred], axis=1)


def fit_loss_law(n_params: Sequence[float], n_tokens: Sequence[float], loss: Sequence[float], *,
                 exponent_starts: Sequence[float] = (0.05, 0.1, 0.2, 0.35, 0.5, 0.75, 1.0),
                 max_exponent: float = 5.0) -> LossLaw:
    """Fit ``L = a·N^-α + b·D^-β`` to a family's ``(N, D, L)`` points.

    Least squares on ``log L`` (relative errors: small and large models weigh alike) over
    ``(log a, α, log b, β)`` with ``0 < α, β ≤ max_exponent``, by scipy's trust-region
    reflective solver. It starts from every pair in ``exponent_starts``: for fixed exponents the
    law is linear in ``a, b``, which non-negative least squares solves; the five best starts are
    refined and the lowest cost wins. Needs at least 4 points, 2 distinct sizes and 2 distinct
    token budgets (else ``b`` and ``β`` — or ``a`` and ``α`` — are not separable)."""
    from scipy.optimize import least_squares, nnls

    n = _as_positive_array(n_params, "n_params")
    d = _as_positive_array(n_tokens, "n_tokens")
    y = _as_positive_array(loss, "loss")
    count = _check_lengths(4, n_params=n, n_tokens=d, loss=y)
    if len(np.unique(n)) < 2:
        raise FitError("n_params has one distinct value: a and α need at least 2 sizes")
    if len(np.unique(d)) < 2:
        raise FitError("n_tokens has one distinct value: b and β need at least 2 token budgets")
    log_n, log_d, log_y = np.log(n), np.log(d), np.log(y)
    args = (log_n, log_d, log_y)

    starts = []
    for alpha in exponent_starts:
        for beta in exponent_starts:
            # weighted by 1/L so the linear fit approximates the relative (log) error
            design = np.stack([n ** -alpha / y, d ** -beta / y], axis=1)
            coef, _ = nnls(design, np.ones_like(y))
            coef = np.maximum(coef, 1e-12 * np.max(y))
            theta = np.array([math.log(coef[0]), alpha, math.log(coef[1]), beta])
            cost = float(np.sum(_loss_law_residuals(theta, *args) ** 2))
            starts.append((cost, theta))
    starts.sort(key=lambda s: s[0])
    lower = [-np.inf, 1e-6, -np.inf, 1e-6]
    upper = [np.inf, max_exponent, np.inf, max_exponent]
    best = None
    for _, theta0 in starts[:5]:
        theta0 = np.clip(theta0, np.array(lower) + 1e-9, np.array(upper) - 1e-9)
        res = least_squares(_loss_law_residuals, theta0, jac=_loss_law_jacobian, args=args,
                            bounds=(lower, upper), method="trf", x_scale="jac",
                            xtol=1e-14, ftol=1e-14, gtol=1e-14, max_nfev=5000)
        if best is None or res.cost < best.cost:
            best = res
    if best is None or not np.all(np.isfinite(best.x)):
        raise FitError("the loss-law fit found no finite solution")
    theta = best.x
    cov = _covariance(_loss_law_jacobian(theta, *args), best.fun)
    a, alpha, b, beta = math.exp(theta[0]), float(theta[1]), math.exp(theta[2]), float(theta[3])
    se = np.sqrt(np.diag(cov))
    stderr = {"a": a * se[0], "alpha": float(se[1]), "b": b * se[2], "beta": float(se[3])}
    pred = np.exp(theta[0] - theta[1] * log_n) + np.exp(theta[2] - theta[3] * log_d)
    return LossLaw(a=a, alpha=alpha, b=b, beta=beta, r2=_r2(y, pred), covariance=cov,
                   stderr={k: float(v) for k, v in stderr.items()}, n_points=count)


# --------------------------------------------------------------------------------------------
# step 2: loss -> score


@dataclasses.dataclass(frozen=True)
class ScoreLaw:
    """``S(L) = c / (1 + exp(-γ (L - l))) + d`` with ``c > 0``: ``d`` is one asymptote and
    ``d + c`` the other (``γ < 0`` when the score falls as the loss grows, the usual case).
    ``covariance`` is over ``(log c, γ, l, d)``; ``stderr`` over ``c, gamma, l, d``.
    ``held``: the asymptotes the fit held at given values instead of fitting them (``"floor"``:
    ``d``, ``"ceiling"``: ``c + d``; empty when both were fitted); a held value has standard
    error 0 (``stderr["d"]`` for the floor, ``stderr["ceiling"]`` for the ceiling) and draws of
    the parameters (:func:`density`) keep it exactly."""

    c: float
    gamma: float
    l: float  # noqa: E741 (the paper's name)
    d: float
    r2: float
    covariance: np.ndarray
    stderr: dict[str, float]
    n_points: int
    held: dict[str, float] = dataclasses.field(default_factory=dict)

    def predict(self, loss: Any) -> Any:
        """The law's score at ``loss`` (scalar or array)."""
        x = np.asarray(loss, dtype=np.float64)
        out = self.c * _expit(self.gamma * (x - self.l)) + self.d
        return float(out) if out.ndim == 0 else out

    @property
    def reachable(self) -> tuple[float, float]:
        """The open interval of scores the sigmoid takes: ``(d, d + c)``."""
        return (self.d, self.d + self.c)

    def inverse(self, score: float, *, bound: bool = False) -> float:
        """The loss with ``S(L) = score``: ``l - ln(c / (score - d) - 1) / γ``. A score outside
        ``(d, d + c)`` raises :class:`OutOfRangeError`; with ``bound=True`` it returns the
        limiting loss instead (``-inf`` or ``+inf``, whichever end the score lies beyond)."""
        loss = _sigmoid_inverse(np.asarray([float(score)]), self.c, self.gamma, self.l, self.d)[0]
        if not np.isfinite(loss) and not bound:
            lo, hi = self.reachable
            raise OutOfRangeError(f"score {score!r} is outside the score law's reachable range "
                                  f"({lo:.6g}, {hi:.6g})")
        return float(loss)

    def to_dict(self) -> dict[str, Any]:
        return {"c": self.c, "gamma": self.gamma, "l": self.l, "d": self.d, "r2": self.r2,
                "stderr": dict(self.stderr), "n_points": self.n_points,
                "held": dict(self.held),
                "covariance_log_c_gamma_l_d": self.covariance.tolist()}


def _expit(x: np.ndarray) -> np.ndarray:
    from scipy.special import expit

    return expit(x)


def _sigmoid_inverse(score: np.ndarray, c: Any, gamma: Any, l: Any, d: Any) -> np.ndarray:  # noqa: E741
    """Vectorised inverse; a score outside ``(d, d + c)`` maps to the loss limit beyond which it
    lies (``±inf``), never NaN. Arrays broadcast."""
    score, c, gamma, l, d = np.broadcast_arrays(*(np.asarray(v, np.float64)  # noqa: E741
                                                  for v in (score, c, gamma, l, d)))
    frac = (score - d) / c  # in (0, 1) when reachable
    out = np.empty(score.shape, np.float64)
    inside = (frac > 0) & (frac < 1)
    with np.errstate(divide="ignore", invalid="ignore"):
        logit = np.log(frac[inside]) - np.log1p(-frac[inside])
        out[inside] = l[inside] + logit / gamma[inside]
    # frac >= 1: beyond the upper asymptote d + c, reached as γ(L - l) -> +inf
    # frac <= 0: beyond the lower asymptote d, reached as γ(L - l) -> -inf
    sign = np.where(frac >= 1, 1.0, -1.0) * np.where(gamma < 0, -1.0, 1.0)
    out[~inside] = sign[~inside] * np.inf
    return out


def _score_model(theta: np.ndarray, x: np.ndarray) -> np.ndarray:
    log_c, gamma, l, d = theta  # noqa: E741
    return math.exp(log_c) * _expit(gamma * (x - l)) + d


def _score_residuals(theta, x, y):
    return _score_model(theta, x) - y


def _score_jacobian(theta, x, y):
    log_c, gamma, l, d = theta  # noqa: E741
    c = math.exp(log_c)
    s = _expit(gamma * (x - l))
    ds = s * (1 - s)
    return np.stack([c * s, c * ds * (x - l), -c * ds * gamma, np.ones_like(x)], axis=1)


def _bounded_model(theta: np.ndarray, x: np.ndarray, top: float) -> np.ndarray:
    q, gamma, l, d = theta  # noqa: E741
    return (top - d) * q * _expit(gamma * (x - l)) + d


def _bounded_residuals(theta, x, y, top):
    return _bounded_model(theta, x, top) - y


def _bounded_jacobian(theta, x, y, top):
    q, gamma, l, d = theta  # noqa: E741
    s = _expit(gamma * (x - l))
    ds = s * (1 - s)
    return np.stack([(top - d) * s, (top - d) * q * ds * (x - l), -(top - d) * q * ds * gamma,
                     1 - q * s], axis=1)


def _slope_signs(x: np.ndarray, y: np.ndarray) -> tuple[float, ...]:
    """Signs of γ worth starting from: with ``c > 0`` the sigmoid rises with the loss exactly
    when ``γ > 0``, so a clear correlation picks the sign; a weak one tries both."""
    corr = float(np.corrcoef(x, y)[0, 1])
    return (-1.0, 1.0) if not abs(corr) >= 0.2 else (math.copysign(1.0, corr),)


def _fit_score_bounded(x: np.ndarray, y: np.ndarray, low: float, top: float,
                       slope_starts: Sequence[float], midpoint_starts: Sequence[float]
                       ) -> tuple[np.ndarray, np.ndarray, Any]:
    """The sigmoid with ``low <= d`` and ``c + d <= top``, fitted over ``(q, γ, l, d)`` with
    ``c = (top - d)·q``, ``0 < q <= 1``. Returns the natural ``(log c, γ, l, d)``, their
    covariance (parameters at a bound held fixed, the rest from ``s²(JᵀJ)⁻¹``) and the
    solver's result."""
    from scipy.optimize import least_squares

    span = float(np.ptp(x))
    eps = 1e-12 * (top - low)
    lower = [1e-12, -np.inf, -np.inf, low]
    upper = [1.0, np.inf, np.inf, top - eps]
    d0 = float(np.clip(np.min(y), low, top - eps))
    best = None
    for q0 in (min(max(float(np.ptp(y)) / (top - d0), 1e-6), 1.0), 1.0):
        for mid in midpoint_starts:
            l0 = float(np.quantile(x, mid))
            for k in slope_starts:
                for sign in _slope_signs(x, y):
                    theta0 = np.clip([q0, sign * k / span, l0, d0], lower, upper)
                    res = least_squares(_bounded_residuals, theta0, jac=_bounded_jacobian,
                                        args=(x, y, top), bounds=(lower, upper), method="trf",
                                        xtol=1e-14, ftol=1e-14, gtol=1e-14, max_nfev=200)
                    if np.all(np.isfinite(res.x)) and (best is None or res.cost < best.cost):
                        best = res
    if best is None:
        raise FitError("the score-law fit found no finite solution")
    q, gamma, l, d = best.x  # noqa: E741
    active = np.array([q >= 1.0 - 1e-9, False, False, d <= low + 1e-9 * (top - low)])
    jac = _bounded_jacobian(best.x, x, y, top)
    free = ~active
    cov_b = np.zeros((4, 4))
    cov_b[np.ix_(free, free)] = _covariance(jac[:, free], best.fun)
    # (q, γ, l, d) -> (log c, γ, l, d) with log c = log(top - d) + log q
    to_natural = np.eye(4)
    to_natural[0, 0] = 1.0 / q
    to_natural[0, 3] = -1.0 / (top - d)
    with np.errstate(invalid="ignore"):
        cov = to_natural @ cov_b @ to_natural.T
    if not np.all(np.isfinite(cov_b[np.ix_(free, free)])):
        cov = np.full((4, 4), np.inf)
    theta = np.array([math.log((top - d) * q), gamma, l, d])
    return theta, cov, best


class _HeldSigmoid:
    """The sigmoid with the floor ``d`` and/or the ceiling ``c + d`` held at given values, over
    its free parameters ``p``:

    - both held: ``p = (γ, l)``, ``c = ceiling - floor``, ``d = floor``;
    - floor held: ``p = (q, γ, l)`` with ``c = (high - floor)·q``, ``0 < q <= 1`` when a score
      range bounds it, else ``p = (log c, γ, l)``;
    - ceiling held: ``p = (d, γ, l)`` with ``c = ceiling - d``, ``low <= d < ceiling``.

    ``natural(p)`` gives ``(log c, γ, l, d)`` and ``to_natural(p)`` its Jacobian ``[4, k]``, so the
    residuals' Jacobian and the covariance come from the unconstrained ones by the chain rule."""

    def __init__(self, floor: float | None, ceiling: float | None,
                 score_range: tuple[float, float] | None):
        self.floor, self.ceiling = floor, ceiling
        self.low, self.top = score_range if score_range is not None else (None, None)
        if floor is not None and ceiling is not None:
            self.lower, self.upper = [-np.inf, -np.inf], [np.inf, np.inf]
            self.scale = [1.0, 1.0]
        elif floor is not None:
            if self.top is not None:
                self.lower, self.upper = [1e-12, -np.inf, -np.inf], [1.0, np.inf, np.inf]
            else:
                self.lower, self.upper = [-np.inf] * 3, [np.inf] * 3
            self.scale = [1.0, 1.0, 1.0]
        else:
            room = 1e-12 * max(1.0, abs(ceiling))
            low = -np.inf if self.low is None else self.low
            self.lower, self.upper = [low, -np.inf, -np.inf], [ceiling - room, np.inf, np.inf]
            self.scale = [max(1.0, abs(ceiling)), 1.0, 1.0]

    def natural(self, p: np.ndarray) -> np.ndarray:
        if self.floor is not None and self.ceiling is not None:
            return np.array([math.log(self.ceiling - self.floor), p[0], p[1], self.floor])
        if self.floor is not None:
            log_c = math.log((self.top - self.floor) * p[0]) if self.top is not None else p[0]
            return np.array([log_c, p[1], p[2], self.floor])
        return np.array([math.log(self.ceiling - p[0]), p[1], p[2], p[0]])

    def to_natural(self, p: np.ndarray) -> np.ndarray:
        jac = np.zeros((4, len(p)))
        if self.floor is not None and self.ceiling is not None:
            jac[1, 0] = jac[2, 1] = 1.0
        elif self.floor is not None:
            jac[0, 0] = 1.0 / p[0] if self.top is not None else 1.0
            jac[1, 1] = jac[2, 2] = 1.0
        else:
            jac[0, 0] = -1.0 / (self.ceiling - p[0])
            jac[3, 0] = jac[1, 1] = jac[2, 2] = 1.0
        return jac

    def residuals(self, p, x, y):
        return _score_model(self.natural(p), x) - y

    def jacobian(self, p, x, y):
        return _score_jacobian(self.natural(p), x, y) @ self.to_natural(p)

    def starts(self, x: np.ndarray, y: np.ndarray, slope_starts: Sequence[float],
               midpoint_starts: Sequence[float]) -> list[np.ndarray]:
        span = float(np.ptp(x))
        if self.floor is not None and self.ceiling is None:
            amplitude = max(float(np.max(y)) - self.floor, 1e-6 * float(np.ptp(y)))
            firsts = ([min(max(amplitude / (self.top - self.floor), 1e-6), 1.0), 1.0]
                      if self.top is not None else [math.log(amplitude)])
        elif self.ceiling is not None and self.floor is None:
            firsts = [float(np.clip(np.min(y), self.lower[0], self.upper[0]))]
        else:
            firsts = [None]
        out = []
        for first in firsts:
            for mid in midpoint_starts:
                l0 = float(np.quantile(x, mid))
                for k in slope_starts:
                    for sign in _slope_signs(x, y):
                        rest = [sign * k / span, l0]
                        out.append(np.clip(rest if first is None else [first, *rest],
                                           self.lower, self.upper))
        return out


def _fit_score_held(x: np.ndarray, y: np.ndarray, floor: float | None, ceiling: float | None,
                    score_range: tuple[float, float] | None, slope_starts: Sequence[float],
                    midpoint_starts: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """The sigmoid with held asymptotes (:class:`_HeldSigmoid`), fitted by scipy's bounded
    trust-region solver from every start; returns ``(log c, γ, l, d)`` and its covariance (held
    parameters, and free ones that end on a bound, contribute nothing)."""
    from scipy.optimize import least_squares

    law = _HeldSigmoid(floor, ceiling, score_range)
    best = None
    for p0 in law.starts(x, y, slope_starts, midpoint_starts):
        res = least_squares(law.residuals, p0, jac=law.jacobian, args=(x, y),
                            bounds=(law.lower, law.upper), method="trf", xtol=1e-14,
                            ftol=1e-14, gtol=1e-14, max_nfev=500)
        if np.all(np.isfinite(res.x)) and (best is None or res.cost < best.cost):
            best = res
    if best is None:
        raise FitError("the score-law fit found no finite solution")
    p = best.x
    tol = 1e-9 * np.asarray(law.scale)
    active = (p <= np.asarray(law.lower) + tol) | (p >= np.asarray(law.upper) - tol)
    free = ~active
    cov_p = np.zeros((len(p), len(p)))
    cov_p[np.ix_(free, free)] = _covariance(law.jacobian(p, x, y)[:, free], best.fun)
    if not np.all(np.isfinite(cov_p)):
        return law.natural(p), np.full((4, 4), np.inf)
    to_natural = law.to_natural(p)
    return law.natural(p), to_natural @ cov_p @ to_natural.T


def _check_held(floor: float | None, ceiling: float | None,
                score_range: tuple[float, float] | None, y: np.ndarray) -> int:
    """Typed errors for held asymptotes that cannot be fitted; returns how many are held."""
    held = {"floor": floor, "ceiling": ceiling}
    for name, value in held.items():
        if value is not None and not math.isfinite(value):
            raise FitError(f"{name}={value!r} is not finite")
        if value is not None and score_range is not None:
            low, top = score_range
            if not low <= value <= top:
                raise FitError(f"{name}={value!r} lies outside score_range {score_range!r}")
    if floor is not None and ceiling is not None and not floor < ceiling:
        raise FitError(f"floor={floor!r} is not below ceiling={ceiling!r}")
    lo = -math.inf if floor is None else floor
    hi = math.inf if ceiling is None else ceiling
    inside = int(np.sum((y > lo) & (y < hi)))
    if floor is not None and np.all(y <= floor):
        raise FitError(f"every score is at or below the held floor {floor!r}: the sigmoid "
                       "lies above its floor, so the scores contradict it")
    if ceiling is not None and np.all(y >= ceiling):
        raise FitError(f"every score is at or above the held ceiling {ceiling!r}: the sigmoid "
                       "lies below its ceiling, so the scores contradict it")
    n_held = sum(v is not None for v in held.values())
    free = 4 - n_held
    if inside < free:
        if n_held == 2:
            where = f"strictly between the held floor {floor!r} and ceiling {ceiling!r}"
        elif floor is not None:
            where = f"strictly above the held floor {floor!r}"
        else:
            where = f"strictly below the held ceiling {ceiling!r}"
        raise FitError(f"{inside} score(s) lie {where}, fewer than the {free} free parameters "
                       "of the sigmoid: the scores on an asymptote do not determine it")
    return n_held


def fit_score_law(loss: Sequence[float], score: Sequence[float], *,
                  score_range: tuple[float, float] | None = None,
                  floor: float | None = None, ceiling: float | None = None,
                  slope_starts: Sequence[float] = (2.0, 5.0, 10.0, 20.0),
                  midpoint_starts: Sequence[float] = (0.2, 0.35, 0.5, 0.65, 0.8)) -> ScoreLaw:
    """Fit ``S = c / (1 + exp(-γ (L - l))) + d`` to a family's ``(loss, score)`` pairs.

    Least squares on the scores over ``(log c, γ, l, d)`` (``c > 0`` fixes the sigmoid's two
    mirror-image parametrisations). Starts: ``d`` at the lowest score, ``c`` the score range,
    ``l`` at each quantile in ``midpoint_starts`` of the losses, ``γ = ±k / (loss range)`` for
    ``k`` in ``slope_starts`` (the sign of the loss-score correlation, both when it is below
    0.2); each is refined (at most 500 evaluations) and the lowest cost wins. Needs at
    least as many points as free parameters (4, less one per held asymptote) and 2 distinct
    losses and scores.

    ``score_range=(low, high)``: the scores cannot leave it (``(0, 1)`` for accuracies and pass
    rates), so the sigmoid is bounded to it: ``d >= low`` and ``c + d <= high``. Scores that
    only show the sigmoid's tail (a family of small models) then still determine ``γ`` and ``l``
    (unbounded, such a fit runs off to an exponential with an arbitrary ``c``). Parameters that
    end on a bound are held fixed in the covariance.

    ``floor`` / ``ceiling``: hold the lower asymptote ``d`` and/or the upper one ``c + d`` at a
    given value instead of fitting it (``floor=0.0`` for an accuracy that starts at 0,
    ``ceiling=1.0`` for one that can reach 1): a family whose scores show one tail only then
    determines ``γ`` and ``l`` (and the free asymptote). The law records them in ``held``, with
    standard error 0. :class:`FitError` when ``floor >= ceiling``, when a held value lies outside
    ``score_range``, when every score lies at or beyond a held asymptote, or when fewer scores
    lie strictly between the asymptotes than there are free parameters."""
    from scipy.optimize import least_squares

    x = _as_finite_array(loss, "loss")
    y = _as_finite_array(score, "score")
    floor = None if floor is None else float(floor)
    ceiling = None if ceiling is None else float(ceiling)
    n_held = (floor is not None) + (ceiling is not None)
    count = _check_lengths(4 - n_held, loss=x, score=y)
    if np.ptp(x) == 0:
        raise FitError("loss has one distinct value: a sigmoid of the loss needs at least 2")
    if np.ptp(y) == 0:
        raise FitError("score has one distinct value: the sigmoid's amplitude c is undetermined")
    if score_range is not None:
        low, top = (float(v) for v in score_range)
        if not (math.isfinite(low) and math.isfinite(top) and low < top):
            raise FitError(f"score_range={score_range!r}: need finite low < high")
        outside = np.flatnonzero((y < low) | (y > top))
        if len(outside):
            i = int(outside[0])
            raise FitError(f"score[{i}] = {y[i]} lies outside score_range {score_range!r}")
        score_range = (low, top)
    if n_held:
        _check_held(floor, ceiling, score_range, y)
        theta, cov = _fit_score_held(x, y, floor, ceiling, score_range, slope_starts,
                                     midpoint_starts)
    elif score_range is not None:
        theta, cov, _ = _fit_score_bounded(x, y, *score_range, slope_starts, midpoint_starts)
    else:
        span = float(np.ptp(x))
        c0, d0 = float(np.ptp(y)), float(np.min(y))
        best = None
        for q in midpoint_starts:
            l0 = float(np.quantile(x, q))
            for k in slope_starts:
                for sign in _slope_signs(x, y):
                    theta0 = np.array([math.log(c0), sign * k / span, l0, d0])
                    res = least_squares(_score_residuals, theta0, jac=_score_jacobian,
                                        args=(x, y), method="lm", xtol=1e-14, ftol=1e-14,
                                        gtol=1e-14, max_nfev=500)
                    if np.all(np.isfinite(res.x)) and (best is None or res.cost < best.cost):
                        best = res
        if best is None:
            raise FitError("the score-law fit found no finite solution")
        theta = best.x
        cov = _covariance(_score_jacobian(theta, x, y), best.fun)
    se = np.sqrt(np.diag(cov))
    c = math.exp(theta[0])
    stderr = {"c": float(c * se[0]), "gamma": float(se[1]), "l": float(se[2]),
              "d": float(se[3])}
    held = {}
    if floor is not None:
        held["floor"] = floor
        stderr["d"] = 0.0
    if ceiling is not None:
        held["ceiling"] = ceiling
        stderr["ceiling"] = 0.0
        if floor is not None:
            stderr["c"] = 0.0
    return ScoreLaw(c=c, gamma=float(theta[1]), l=float(theta[2]), d=float(theta[3]),
                    r2=_r2(y, _score_model(theta, x)), covariance=cov, stderr=stderr,
                    n_points=count, held=held)


# --------------------------------------------------------------------------------------------
# effective size and density


def _effective_params_vec(score: np.ndarray, loss_theta: np.ndarray, score_theta: np.ndarray,
                          n_tokens: float) -> np.ndarray:
    """``N̂`` for arrays of scores and parameter sets (rows ``(log a, α, log b, β)`` and
    ``(log c, γ, l, d)``); ``0`` or ``inf`` where a score lies beyond a law's range."""
    log_a, alpha, log_b, beta = (loss_theta[..., i] for i in range(4))
    log_c, gamma, l, d = (score_theta[..., i] for i in range(4))  # noqa: E741
    loss = _sigmoid_inverse(score, np.exp(log_c), gamma, l, d)
    excess = loss - np.exp(log_b - beta * math.log(n_tokens))
    with np.errstate(divide="ignore", over="ignore", invalid="ignore"):
        n_hat = np.exp((log_a - np.log(np.where(excess > 0, excess, 1.0))) / alpha)
    n_hat = np.where(excess <= 0, np.inf, n_hat)
    return np.where(np.isposinf(loss), 0.0, n_hat)


def effective_params(score: float, loss_law: LossLaw, score_law: ScoreLaw, n_tokens: float, *,
                     bound: bool = False) -> float:
    """The effective parameter size ``N̂``: the non-embedding size a reference model trained on
    ``n_tokens`` tokens would need to reach ``score`` (score -> loss by the score law's inverse,
    loss -> size by the loss law's inverse at ``n_tokens``).

    A score the sigmoid cannot reach, or one whose loss lies at or below the loss law's floor
    ``b·D^-β``, raises :class:`OutOfRangeError`; with ``bound=True`` the explicit bound is
    returned instead: ``0.0`` (worse than any size gives) or ``inf`` (better than any size)."""
    n_tokens = float(_as_positive_array([n_tokens], "n_tokens")[0])
    score = float(score)
    if not math.isfinite(score):
        raise OutOfRangeError(f"score {score!r} is not finite")
    loss = score_law.inverse(score, bound=bound)
    return loss_law.inverse_params(loss, n_tokens, bound=bound)


@dataclasses.dataclass(frozen=True)
class DensityEstimate:
    """``density = effective_params / n_params`` with percentile intervals from the parametric
    bootstrap (``level``, ``samples`` draws). ``bounded_draws`` is the fraction of draws whose
    score lay beyond a sampled law's range (counted as ``N̂ = 0`` or ``inf``); ``inf`` in an
    interval is the bound "larger than any finite size"."""

    score: float | None  # None for loss_density (step 1 alone)
    loss: float
    n_params: float
    n_tokens: float
    effective_params: float
    density: float
    effective_params_interval: tuple[float, float] | None
    density_interval: tuple[float, float] | None
    level: float
    samples: int
    bounded_draws: float

    def to_dict(self) -> dict[str, Any]:
        def clean(v):
            if isinstance(v, tuple):
                return [clean(x) for x in v]
            return None if isinstance(v, float) and math.isinf(v) else v

        return {k: clean(v) for k, v in dataclasses.asdict(self).items()}


def _theta_loss(law: LossLaw) -> np.ndarray:
    return np.array([math.log(law.a), law.alpha, math.log(law.b), law.beta])


def _theta_score(law: ScoreLaw) -> np.ndarray:
    return np.array([math.log(law.c), law.gamma, law.l, law.d])


def _draw(mean: np.ndarray, cov: np.ndarray, samples: int, rng: np.random.Generator
          ) -> np.ndarray:
    # symmetric square root (eigh) tolerates a positive semi-definite covariance
    vals, vecs = np.linalg.eigh((cov + cov.T) / 2)
    root = vecs * np.sqrt(np.clip(vals, 0, None))
    return mean + rng.standard_normal((samples, len(mean))) @ root.T


def _hold(score_draws: np.ndarray, held: dict[str, float]) -> np.ndarray:
    """Draws ``(log c, γ, l, d)`` with the held asymptotes put back exactly: ``d = floor``,
    ``log c = log(ceiling - d)`` (a drawn ``d`` at or above the ceiling is moved just below
    it)."""
    if "floor" in held:
        score_draws[:, 3] = held["floor"]
    if "ceiling" in held:
        top = held["ceiling"]
        room = 1e-12 * max(1.0, abs(top))
        score_draws[:, 3] = np.minimum(score_draws[:, 3], top - room)
        score_draws[:, 0] = np.log(top - score_draws[:, 3])
    return score_draws


def _check_density_args(n_params: float, n_tokens: float, level: float, samples: int,
                        **stderr: float) -> tuple[float, float]:
    """``(n_params, n_tokens)`` as positive floats, after checking the interval settings and
    the one named standard error (typed ``FitError`` naming the culprit)."""
    n_params = float(_as_positive_array([n_params], "n_params")[0])
    n_tokens = float(_as_positive_array([n_tokens], "n_tokens")[0])
    if not 0 < level < 1:
        raise FitError(f"level={level} must lie in (0, 1)")
    if samples < 1:
        raise FitError(f"samples={samples} must be positive")
    for name, value in stderr.items():
        if not (math.isfinite(value) and value >= 0):
            raise FitError(f"{name}={value} must be finite and non-negative")
    return n_params, n_tokens


def density(score: float, n_params: float, loss_law: LossLaw, score_law: ScoreLaw,
            n_tokens: float, *, score_stderr: float = 0.0, level: float = 0.95,
            samples: int = 4000, seed: int = 0, bound: bool = False) -> DensityEstimate:
    """Capacity density ``ρ = N̂ / N`` of a model with ``n_params`` non-embedding parameters that
    scores ``score``, against the reference family's laws at ``n_tokens`` training tokens.

    The point estimate inverts the fitted laws (:func:`effective_params`; out-of-range scores
    raise :class:`OutOfRangeError` unless ``bound=True``). The interval is a parametric
    bootstrap: ``samples`` draws of both laws' parameters from their fitted Gaussians (and of the
    score from ``N(score, score_stderr²)``), each inverted; the ``level`` percentile interval of
    the draws (no interpolation, so an unbounded end stays ``inf``). ``None`` when a fit had no
    residual degrees of freedom (its covariance is infinite)."""
    n_params, n_tokens = _check_density_args(n_params, n_tokens, level, samples,
                                             score_stderr=score_stderr)
    n_hat = effective_params(score, loss_law, score_law, n_tokens, bound=bound)
    loss = score_law.inverse(score, bound=True)
    interval = None
    bounded = 0.0
    if _finite_covariance(loss_law.covariance) and _finite_covariance(score_law.covariance):
        rng = np.random.default_rng(seed)
        loss_draws = _draw(_theta_loss(loss_law), loss_law.covariance, samples, rng)
        score_draws = _hold(_draw(_theta_score(score_law), score_law.covariance, samples, rng),
                            score_law.held)
        scores = score + score_stderr * rng.standard_normal(samples)
        loss_draws[:, 1] = np.maximum(loss_draws[:, 1], 1e-9)  # α > 0 in every draw
        draws = _effective_params_vec(scores, loss_draws, score_draws, n_tokens)
        bounded = float(np.mean((draws == 0) | np.isinf(draws)))
        tail = (1 - level) / 2
        lo, hi = np.quantile(draws, [tail, 1 - tail], method="inverted_cdf")
        interval = (float(lo), float(hi))
    return DensityEstimate(
        score=float(score), loss=float(loss), n_params=n_params, n_tokens=n_tokens,
        effective_params=n_hat, density=n_hat / n_params,
        effective_params_interval=interval,
        density_interval=None if interval is None else (interval[0] / n_params,
                                                        interval[1] / n_params),
        level=level, samples=samples, bounded_draws=bounded)


def loss_density(loss: float, n_params: float, loss_law: LossLaw, n_tokens: float, *,
                 loss_stderr: float = 0.0, level: float = 0.95, samples: int = 4000,
                 seed: int = 0) -> DensityEstimate:
    """Step 1 alone: the size ``N̂`` at which the reference family's loss law reaches ``loss`` at
    ``n_tokens`` tokens (``LossLaw.inverse_params``, ``inf`` at or below the law's floor), and
    ``ρ = N̂ / n_params``, with a parametric-bootstrap interval: ``samples`` draws of the loss
    law's parameters from their fitted Gaussian (and of the loss from ``N(loss,
    loss_stderr²)``), each inverted, the ``level`` percentile interval of the draws. For models
    whose task score does not resolve the family (a flat score law), this is the density the
    data determine. ``score`` in the result is ``None``."""
    if not (math.isfinite(loss) and loss > 0):
        raise FitError(f"loss={loss} must be finite and positive")
    n_params, n_tokens = _check_density_args(n_params, n_tokens, level, samples,
                                             loss_stderr=loss_stderr)
    n_hat = loss_law.inverse_params(loss, n_tokens, bound=True)
    interval, bounded = None, 0.0
    if _finite_covariance(loss_law.covariance):
        rng = np.random.default_rng(seed)
        theta = _draw(_theta_loss(loss_law), loss_law.covariance, samples, rng)
        theta[:, 1] = np.maximum(theta[:, 1], 1e-9)  # α > 0 in every draw
        losses = loss + loss_stderr * rng.standard_normal(samples)
        excess = losses - np.exp(theta[:, 2] - theta[:, 3] * math.log(n_tokens))
        with np.errstate(divide="ignore", over="ignore", invalid="ignore"):
            draws = np.exp((theta[:, 0] - np.log(np.where(excess > 0, excess, 1.0)))
                           / theta[:, 1])
        draws = np.where(excess <= 0, np.inf, draws)
        bounded = float(np.mean(np.isinf(draws)))
        tail = (1 - level) / 2
        lo, hi = np.quantile(draws, [tail, 1 - tail], method="inverted_cdf")
        interval = (float(lo), float(hi))
    return DensityEstimate(
        score=None, loss=float(loss), n_params=n_params, n_tokens=n_tokens,
        effective_params=n_hat, density=n_hat / n_params, effective_params_interval=interval,
        density_interval=None if interval is None else (interval[0] / n_params,
                                                        interval[1] / n_params),
        level=level, samples=samples, bounded_draws=bounded)


# --------------------------------------------------------------------------------------------
# density over time


def _as_day(value: Any, index: int) -> float:
    """Days since 1970-01-01 of a date, datetime, ISO string, or a number of days."""
    if isinstance(value, _dt.datetime):
        return value.timestamp() / 86400.0 if value.tzinfo else (
            (value - _dt.datetime(1970, 1, 1)).total_seconds() / 86400.0)
    if isinstance(value, _dt.date):
        return float(value.toordinal() - _dt.date(1970, 1, 1).toordinal())
    if isinstance(value, str):
        try:
            return _as_day(_dt.date.fromisoformat(value.strip()), index)
        except ValueError:
            try:
                return _as_day(_dt.datetime.fromisoformat(value.strip()), index)
            except ValueError:
                raise FitError(f"dates[{index}] = {value!r} is not an ISO date (YYYY-MM-DD)") \
                    from None
    if isinstance(value, (int, float, np.integer, np.floating)) and math.isfinite(value):
        return float(value)
    raise FitError(f"dates[{index}] = {value!r} is not a date")


def _day_to_iso(day: float) -> str:
    return (_dt.date(1970, 1, 1) + _dt.timedelta(days=float(day))).isoformat()


@dataclasses.dataclass(frozen=True)
class DensityTrend:
    """``ln ρ = A·t + B`` with ``t`` in days since ``origin`` (the first date). ``doubling_days
    = ln 2 / A`` (negative: a halving time; ``inf`` for ``A = 0``); ``doubling_interval`` from
    ``A ± z·se(A)`` at ``level`` (an end is ``inf`` when the interval of ``A`` reaches 0).
    With a breakpoint, ``pre`` and ``post`` are the fits on each side (dates before it / from
    it on), ``speedup = post.A / pre.A`` and ``slope_difference_p`` the two-sided p-value of
    ``A_post = A_pre`` (Welch-style z-test on the two slopes)."""

    A: float
    B: float
    r2: float
    A_stderr: float
    B_stderr: float
    doubling_days: float
    doubling_interval: tuple[float, float]
    origin: str
    n_points: int
    level: float = 0.95
    breakpoint: str | None = None
    pre: DensityTrend | None = None
    post: DensityTrend | None = None
    speedup: float | None = None
    slope_difference_p: float | None = None

    def predict(self, dates: Any) -> np.ndarray:
        """``ρ`` the trend gives on ``dates``."""
        days = np.array([_as_day(v, i) for i, v in enumerate(np.atleast_1d(dates))])
        t = days - _as_day(self.origin, 0)
        return np.exp(self.A * t + self.B)

    def to_dict(self) -> dict[str, Any]:
        def clean(v):
            if isinstance(v, DensityTrend):
                return v.to_dict()
            if isinstance(v, tuple):
                return [clean(x) for x in v]
            return None if isinstance(v, float) and math.isinf(v) else v

        return {f.name: clean(getattr(self, f.name)) for f in dataclasses.fields(self)}


def _doubling(a: float) -> float:
    return math.inf if a == 0 else math.log(2) / a


def _line_fit(days: np.ndarray, log_rho: np.ndarray, origin: float, level: float
              ) -> DensityTrend:
    from scipy import stats

    t = days - origin
    n = len(t)
    fit = stats.linregress(t, log_rho)
    if n > 2:
        a_se, b_se = float(fit.stderr), float(fit.intercept_stderr)
        z = float(stats.t.ppf(0.5 + level / 2, n - 2))
    else:
        a_se = b_se = math.inf
        z = math.inf
    a = float(fit.slope)
    lo, hi = a - z * a_se, a + z * a_se
    if lo > 0 or hi < 0:  # the interval of A excludes 0: doubling (or halving) times bracket
        ends = sorted([_doubling(lo), _doubling(hi)])
        interval = (ends[0], ends[1])
    else:
        interval = (-math.inf, math.inf) if a == 0 else (
            (_doubling(hi), math.inf) if a > 0 else (-math.inf, _doubling(lo)))
    r2 = float(fit.rvalue ** 2) if np.ptp(log_rho) > 0 else 1.0
    return DensityTrend(A=a, B=float(fit.intercept), r2=r2, A_stderr=a_se, B_stderr=b_se,
                        doubling_days=_doubling(a), doubling_interval=interval,
                        origin=_day_to_iso(origin), n_points=n, level=level)


def fit_density_trend(dates: Sequence[Any], densities: Sequence[float], *,
                      breakpoint: Any = None, level: float = 0.95) -> DensityTrend:
    """Fit ``ln ρ = A·t + B`` (ordinary least squares; ``t`` in days since the first date) to
    dated densities, e.g. the densest model of each release date.

    ``dates``: ``datetime.date`` / ``datetime`` / ISO strings / numbers of days, strictly
    increasing (an unsorted or repeated date raises :class:`FitError` naming it). With
    ``breakpoint`` (a date), the points before it and from it on are fitted separately too
    (each side needs 2 points), as the paper compares the trend before and after ChatGPT."""
    days = np.array([_as_day(v, i) for i, v in enumerate(dates)], np.float64)
    rho = _as_positive_array(densities, "densities")
    _check_lengths(2, dates=days, densities=rho)
    steps = np.diff(days)
    if np.any(steps == 0):
        i = int(np.flatnonzero(steps == 0)[0]) + 1
        raise FitError(f"dates[{i}] = {dates[i]!r} repeats dates[{i - 1}]: give one point per "
                       "date (e.g. the densest model of that date)")
    if np.any(steps < 0):
        i = int(np.flatnonzero(steps < 0)[0]) + 1
        raise FitError(f"dates[{i}] = {dates[i]!r} comes before dates[{i - 1}] = "
                       f"{dates[i - 1]!r}: dates must be sorted")
    if not 0 < level < 1:
        raise FitError(f"level={level} must lie in (0, 1)")
    log_rho = np.log(rho)
    origin = float(days[0])
    trend = _line_fit(days, log_rho, origin, level)
    if breakpoint is None:
        return trend
    cut = _as_day(breakpoint, 0)
    before = days < cut
    if before.sum() < 2 or (~before).sum() < 2:
        raise FitError(f"breakpoint {breakpoint!r} leaves {int(before.sum())} point(s) before "
                       f"and {int((~before).sum())} from it on: each side needs at least 2")
    pre = _line_fit(days[before], log_rho[before], origin, level)
    post = _line_fit(days[~before], log_rho[~before], origin, level)
    speedup = post.A / pre.A if pre.A != 0 else math.inf
    p_value = None
    spread = math.hypot(pre.A_stderr, post.A_stderr)
    if math.isfinite(spread) and spread > 0:
        from scipy import stats

        p_value = float(2 * stats.norm.sf(abs(post.A - pre.A) / spread))
    return dataclasses.replace(trend, breakpoint=_day_to_iso(cut), pre=pre, post=post,
                               speedup=speedup, slope_difference_p=p_value)
