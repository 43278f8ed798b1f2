"""PassUntil: the estimator and its interval (against scipy references and by simulated
coverage), the batched sampler on a tiny random model (the pass probability computed exactly
from the model's logits), determinism, early stop, typed errors, and ``cpmjax scaling
passuntil`` / ``fit`` end to end."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest
from flax import nnx
from scipy.optimize import brentq
from scipy.stats import binomtest, nbinom

from cpmjax.errors import InputError, PromptTooLongError
from cpmjax.scaling import PassUntilResult, greedy_accuracy, pass_until, pass_until_estimate

# --- the estimator ------------------------------------------------------------------------


def _simulate(rng, p, r, trials, max_samples):
    """PassUntil on Bernoulli(p) instances: the positions of the first r passes are cumulative
    geometric gaps; an instance stops at its r-th pass or at max_samples."""
    positions = rng.geometric(p, size=(trials, r)).cumsum(axis=1)
    stopped = positions[:, -1] <= max_samples
    passes = np.where(stopped, r, (positions <= max_samples).sum(axis=1))
    samples = np.where(stopped, positions[:, -1], max_samples)
    return passes, samples, stopped


@pytest.mark.parametrize("p", [1e-1, 1e-2, 1e-3, 1e-4])
@pytest.mark.parametrize("r", [1, 2, 5])
@pytest.mark.parametrize("truncate", [False, True])
def test_interval_coverage(p, r, truncate):
    trials, confidence = 4000, 0.95
    rng = np.random.default_rng([int(1 / p), r, truncate])
    max_samples = int(2 * r / p) if truncate else 10**12
    passes, samples, stopped = _simulate(rng, p, r, trials, max_samples)
    if truncate:
        assert 0 < np.mean(~stopped) < 0.3  # the truncated branch is exercised
    estimate, low, high = pass_until_estimate(passes, samples, confidence, required_passes=r)
    assert np.all((low <= estimate) & (estimate <= high))
    coverage = np.mean((low <= p) & (p <= high))
    sigma = np.sqrt(confidence * (1 - confidence) / trials)
    # exact intervals: coverage at least the stated rate (within sampling error) ...
    assert coverage >= confidence - 3.5 * sigma, coverage
    if not truncate and p <= 1e-2:
        # ... and not needlessly wide: N is nearly continuous here, so coverage is ~ exact
        assert coverage <= confidence + 3.5 * sigma, coverage


@pytest.mark.parametrize("p", [1e-1, 1e-2, 1e-3, 1e-4])
def test_estimator_bias(p):
    rng = np.random.default_rng(int(1 / p))
    trials = 20000
    for r in (2, 5):  # (r - 1) / (n - 1) is unbiased
        passes, samples, _ = _simulate(rng, p, r, trials, 10**12)
        estimate = pass_until_estimate(passes, samples, required_passes=r)[0]
        error = estimate.std() / np.sqrt(trials)
        assert abs(estimate.mean() - p) < 4 * error, (r, estimate.mean(), p)
    # r = 1: the documented bias of 1 / N, E[1 / N] = -p log p / (1 - p)
    passes, samples, _ = _simulate(rng, p, 1, trials, 10**12)
    estimate = pass_until_estimate(passes, samples, required_passes=1)[0]
    expected = -p * np.log(p) / (1 - p)
    assert abs(estimate.mean() - expected) < 4 * estimate.std() / np.sqrt(trials)


def test_interval_matches_references():
    """Negative-binomial tails inverted by root finding on scipy's nbinom; the truncated case
    is Clopper-Pearson (scipy's binomtest exact interval)."""
    rng = np.random.default_rng(0)
    alpha = 0.1
    for _ in range(20):
        r = int(rng.integers(1, 6))
        n = int(r + rng.integers(1, 400))
        estimate, low, high = pass_until_estimate(r, n, 1 - alpha, required_passes=r)
        # P(N <= n; p) = nbinom.cdf(n - r, r, p); low solves it = alpha/2, high solves
        # P(N >= n; p) = 1 - nbinom.cdf(n - r - 1, r, p) = alpha/2
        ref_low = brentq(lambda q, n=n, r=r: nbinom.cdf(n - r, r, q) - alpha / 2, 1e-12,
                         1 - 1e-12)
        ref_high = brentq(lambda q, n=n, r=r: nbinom.sf(n - r - 1, r, q) - alpha / 2, 1e-12,
                          1 - 1e-12)
        np.testing.assert_allclose([low, high], [ref_low, ref_high], rtol=1e-6)
        np.testing.assert_allclose(estimate, (r - 1) / (n - 1) if r > 1 else 1 / n)
        k = int(rng.integers(0, r))  # truncated at m samples with k < r passes
        m = int(rng.integers(max(k, 1), 500))
        estimate, low, high = pass_until_estimate(k, m, 1 - alpha, required_passes=r)
        ci = binomtest(k, m).proportion_ci(confidence_level=1 - alpha, method="exact")
        np.testing.assert_allclose([low, high], [ci.low, ci.high], rtol=1e-6, atol=1e-12)
        assert estimate == pytest.approx(k / m)


def test_estimate_zero_passes_and_vectorised():
    estimate, low, high = pass_until_estimate([0, 0, 3, 1], [1000, 10, 3, 7])
    assert estimate.shape == (4,)
    assert np.all(np.isfinite(estimate)) and np.all(np.isfinite(high))
    assert estimate[0] == 0 and low[0] == 0
    # no pass in m samples: the upper bound is 1 - (alpha / 2)^(1 / m)
    assert high[0] == pytest.approx(1 - 0.025 ** (1 / 1000))
    assert high[1] > high[0]
    assert high[2] == 1.0 and estimate[2] == 1.0  # every sample passed
    scalar = pass_until_estimate(2, 50)
    assert all(np.ndim(x) == 0 for x in scalar)
    grid = pass_until_estimate(np.array([[1], [2]]), np.array([10, 20, 30]))
    assert grid[0].shape == (2, 3)


def test_estimate_errors():
    with pytest.raises(InputError, match="passes"):
        pass_until_estimate(5, 3)
    with pytest.raises(InputError, match="confidence"):
        pass_until_estimate(1, 3, confidence=1.5)
    with pytest.raises(InputError, match="required_passes"):
        pass_until_estimate(4, 10, required_passes=3)
    with pytest.raises(InputError, match="empty"):
        pass_until_estimate([], [])
    with pytest.raises(InputError, match="whole numbers"):
        pass_until_estimate(1.5, 3)


# --- the sampler on a tiny random model ----------------------------------------------------

VOCAB = 96
NEWLINE = 10  # the id whose text is "\n" in the test tokenizer


class CharTokenizer:
    """One character per id (``chr(0x100 + id)``, id 10 is a newline); BOS = 1, EOS = 2."""

    eos_token_id = 2

    @staticmethod
    def _char(i):
        return "\n" if i == NEWLINE else chr(0x100 + i)

    def __call__(self, text, add_special_tokens=True):
        ids = [NEWLINE if c == "\n" else ord(c) - 0x100 for c in text]
        return {"input_ids": ([1] if add_special_tokens else []) + ids}

    def decode(self, ids, skip_special_tokens=False):
        return "".join(self._char(i) for i in ids
                       if not (skip_special_tokens and i in (0, 1, 2)))

    def batch_decode(self, rows):
        return [self.decode(r) for r in rows]


class Item:
    def __init__(self, id, prompt):
        self.id, self.prompt = id, prompt


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from helpers import minicpm_hf_dict

    from cpmjax.models import CausalLM, ModelConfig

    config = ModelConfig.from_hf_dict(minicpm_hf_dict(vocab_size=VOCAB, initializer_range=0.3))
    return CausalLM(config, rngs=nnx.Rngs(3))


def _prompts(count, seed=0):
    rng = np.random.default_rng(seed)
    return [Item(f"q{i}", "".join(chr(0x100 + int(t)) for t in rng.integers(20, VOCAB, size=
            int(rng.integers(3, 9))))) for i in range(count)]


_forward = nnx.jit(lambda model, tokens: model(tokens))


def _last_logits(model, tokenizer, items):
    """``[items, vocab]`` float64 logits after each prompt (one forward of the right-padded
    prompts: causal attention, so the padding after a prompt is unseen)."""
    ids = [tokenizer(x.prompt)["input_ids"] for x in items]
    width = max(len(i) for i in ids)
    padded = np.zeros((len(ids), width), np.int32)
    for row, i in enumerate(ids):
        padded[row, :len(i)] = i
    logits = np.asarray(_forward(model, jax.numpy.asarray(padded)), np.float64)
    return logits[np.arange(len(ids)), [len(i) - 1 for i in ids]]


def _softmax(logits, temperature):
    scaled = logits / temperature
    probs = np.exp(scaled - scaled.max(axis=-1, keepdims=True))
    return probs / probs.sum(axis=-1, keepdims=True)


def _first_in(token_set):
    chars = {CharTokenizer._char(t) for t in token_set}
    return lambda instance, completion: completion[:1] in chars


def test_pass_rate_matches_the_model(tiny):
    """The checker passes when the first sampled token is in a set S; the pass probability is
    sum_S softmax(logits / T) of the prompt's last position, computed exactly. Per instance
    its interval covers it; pooled, sum_i p_i N_i has mean r * m and variance sum r (1 - p_i)
    for negative binomial N_i, so the sampler's stopping counts are checked in distribution."""
    tokenizer, temperature, r = CharTokenizer(), 0.8, 3
    items = _prompts(12)
    token_set = list(range(20, 32))
    truth = _softmax(_last_logits(tiny, tokenizer, items), temperature)[:, token_set].sum(axis=1)
    assert np.all((truth > 0.02) & (truth < 0.6))
    result = pass_until(tiny, tokenizer, items, check=_first_in(token_set), required_passes=r,
                        max_samples=10_000, batch_size=32, temperature=temperature, seed=1,
                        max_new_tokens=2, progress=False)
    assert np.all(result.passes == r)  # none truncated at this budget
    covered = np.mean((result.low <= truth) & (truth <= result.high))
    assert covered >= 0.75, (covered, truth, result.low, result.high)
    pooled = np.sum(truth * result.samples)
    assert abs(pooled - r * len(items)) < 4 * np.sqrt(np.sum(r * (1 - truth))), pooled
    assert result.total_samples == result.samples.sum() > len(items) * r
    # one prompt-length bucket: compiled in the first round at most, reused by the others
    assert result.compiled_rounds <= 1 < result.rounds


def test_deterministic_and_early_stop(tiny):
    tokenizer = CharTokenizer()
    items = _prompts(5, seed=2)
    always = Item("always", items[0].prompt)
    never = Item("never", items[1].prompt)
    token_set = list(range(20, 40))

    def check(instance, completion):
        if instance.id == "always":
            return True
        if instance.id == "never":
            return False
        return _first_in(token_set)(instance, completion)

    kwargs = dict(check=check, required_passes=2, max_samples=300, batch_size=32,
                  temperature=1.0, max_new_tokens=2, progress=False)
    first = pass_until(tiny, tokenizer, items + [always, never], seed=7, **kwargs)
    again = pass_until(tiny, tokenizer, items + [always, never], seed=7, **kwargs)
    other = pass_until(tiny, tokenizer, items + [always, never], seed=8, **kwargs)
    np.testing.assert_array_equal(first.samples, again.samples)
    np.testing.assert_array_equal(first.passes, again.passes)
    assert not np.array_equal(first.samples, other.samples)
    assert first.samples[-2] == 2 and first.passes[-2] == 2  # passed at once: stopped at r
    assert first.samples[-1] == 300 and first.passes[-1] == 0  # spent the whole budget
    assert first.estimate[-1] == 0 and 0 < first.high[-1] < 0.02
    assert first.truncated.tolist() == [False] * 6 + [True]
    record = first.to_json()
    back = PassUntilResult.from_json(json.loads(json.dumps(record)))
    np.testing.assert_array_equal(back.samples, first.samples)
    assert record["mean_estimate"] == pytest.approx(first.estimate.mean())


def test_stop_string_and_greedy(tiny):
    """Completions are cut before the stop string; greedy accuracy checks the argmax path."""
    tokenizer = CharTokenizer()
    items = _prompts(12)  # the prompts (and forward shape) of test_pass_rate_matches_the_model
    logits = _last_logits(tiny, tokenizer, items)
    greedy_first = np.argmax(logits, axis=1)
    seen = []

    def check(instance, completion):
        seen.append(completion)
        return completion[:1] == CharTokenizer._char(greedy_first[int(instance.id[1:])])

    accuracy = greedy_accuracy(tiny, tokenizer, items, check, batch_size=32, max_new_tokens=2)
    assert accuracy == 1.0 and len(seen) == len(items)
    # stop on the most likely first token of the prompts: often sampled, never seen
    probs = _softmax(logits[:2], 0.3)
    stop_id = int(probs.mean(axis=0).argmax())
    stop = CharTokenizer._char(stop_id)
    assert 80 * probs[:, stop_id].mean() > 8  # cuts expected among the first tokens alone
    seen.clear()
    pass_until(tiny, tokenizer, items[:2], check=lambda i, c: seen.append(c) or False,
               max_samples=40, batch_size=32, max_new_tokens=2, stop=stop, temperature=0.3,
               progress=False)
    assert len(seen) == 80 and all(stop not in c for c in seen)
    assert sum(len(c) < 2 for c in seen) > 0  # cut at the stop


def test_sampler_errors(tiny):
    tokenizer = CharTokenizer()
    items = _prompts(2)
    ok = dict(check=lambda i, c: True, progress=False, max_new_tokens=2, batch_size=32)
    with pytest.raises(InputError, match="empty instance list"):
        pass_until(tiny, tokenizer, [], **ok)
    with pytest.raises(InputError, match="max_samples=2 < required_passes=3"):
        pass_until(tiny, tokenizer, items, required_passes=3, max_samples=2, **ok)
    with pytest.raises(InputError, match="batch_size"):
        pass_until(tiny, tokenizer, items, **{**ok, "batch_size": 0})
    with pytest.raises(InputError, match="temperature"):
        pass_until(tiny, tokenizer, items, temperature=0.0, **ok)
    with pytest.raises(PromptTooLongError, match="'long'"):
        pass_until(tiny, tokenizer, [Item("long", chr(0x120) * 70)], **ok)

    def broken(instance, completion):
        raise KeyError("boom")

    with pytest.raises(InputError, match="KeyError on instance 'q1'"):
        pass_until(tiny, tokenizer, items[1:], **{**ok, "check": broken})


# --- cpmjax scaling passuntil ---------------------------------------------------------------


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A random MiniCPM checkpoint with a byte-level BPE tokenizer of 260 entries."""
    from helpers import write_random_minicpm

    from cpmjax.train.tokenizer import train_bpe

    root = tmp_path_factory.mktemp("passuntil-cli")
    text = root / "corpus.txt"
    text.write_text("Q: 12+30=42\nkv: ant=q7v | ant=q7v\n" * 20)
    directory = root / "model"
    model = write_random_minicpm(directory, seed=5, vocab_size=260)
    train_bpe([str(text)], directory, vocab_size=260, min_frequency=1)
    return directory, model


def test_cli_passuntil(checkpoint, tmp_path):
    from cpmjax.cli import main
    from cpmjax.scaling.tasks import get_task, make_task_suite

    directory, model = checkpoint
    make_task_suite(tmp_path / "suite", n_train=0, n_test=3, tasks=["arithmetic"])
    out = tmp_path / "pu.json"
    common = ["--model", str(directory), "--task", "arithmetic", "--max-samples", "40",
              "--batch-size", "32", "--no-progress"]
    assert main(["scaling", "passuntil", *common, "--instances",
                 str(tmp_path / "suite" / "arithmetic" / "test.jsonl"), "--greedy",
                 "--out", str(out)]) == 0
    record = json.loads(out.read_text())
    assert record["task"] == "arithmetic" and len(record["instances"]) == 3
    config = model.config  # tied embedding: everything but vocab x hidden
    assert record["non_embedding_params"] == (
        model.num_parameters() - config.vocab_size * config.hidden_size)
    assert record["greedy_accuracy"] == 0.0
    expected = get_task("arithmetic").generate(3, 0)  # make_task_suite's test split
    assert [x["id"] for x in record["instances"]] == [x.id for x in expected]
    # a random model never writes the answer: every instance spends its budget, PU = 0 with
    # the exact upper bound 1 - 0.025^(1/40)
    for row in record["instances"]:
        assert row["samples"] == 40 and row["passes"] == 0 and row["estimate"] == 0.0
        assert row["high"] == pytest.approx(1 - 0.025 ** (1 / 40))
    assert record["total_samples"] == 120 and record["truncated_instances"] == 3
    # generated instances, and the same seeds give the same file
    again = tmp_path / "again.json"
    for target in (out, again):
        assert main(["scaling", "passuntil", *common, "--num-instances", "2", "--seed", "4",
                     "--out", str(target)]) == 0
    first, second = json.loads(out.read_text()), json.loads(again.read_text())
    assert first["instances"] == second["instances"]
    assert first["instances_generated"] == {"n": 2, "seed": 4}
    # typed errors come out as exit code 2
    assert main(["scaling", "passuntil", *common, "--num-instances", "2",
                 "--required-passes", "50", "--out", str(out)]) == 2
    assert main(["scaling", "passuntil", *common, "--num-instances", "0",
                 "--out", str(out)]) == 2


def test_batch_allocation():
    """Rows per round: even shares over the active instances (round robin when there are more
    than rows), never beyond an instance's remaining budget, never more than the batch."""
    from cpmjax.scaling.passuntil import _allocate

    rng = np.random.default_rng(0)
    for _ in range(200):
        count, batch = int(rng.integers(1, 40)), int(rng.integers(1, 70))
        active = np.sort(rng.choice(100, size=count, replace=False))
        remaining = np.zeros(100, np.int64)
        remaining[active] = rng.integers(1, 30, size=count)
        cursor = int(rng.integers(0, 50))
        plan = _allocate(active, remaining, batch, cursor)
        rows = dict(plan)
        assert len(rows) == len(plan) and set(rows) <= set(active.tolist())
        assert sum(rows.values()) <= batch
        assert all(0 < k <= remaining[i] for i, k in plan)
        if count <= batch:  # everyone gets a share; the batch is full unless budgets run out
            assert len(plan) == count
            assert sum(rows.values()) == min(batch, int(remaining[active].sum()))
            uncapped = [k for i, k in plan if k < remaining[i]]
            assert not uncapped or max(uncapped) - min(uncapped) <= 1  # even shares
        else:  # one row each for batch instances, starting at the cursor
            assert sorted(rows) == sorted(np.roll(active, -cursor)[:batch].tolist())
            assert set(rows.values()) == {1}
