"""Generation: greedy parity with transformers, KV cache == re-forward, batched == one by one,
sampling behaviour, and every user error."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from helpers import save_hf_model, tiny_llama_config, tiny_minicpm3_config, write_random_minicpm
from transformers import LlamaForCausalLM, MiniCPM3ForCausalLM

import cpmjax
from cpmjax import errors
from cpmjax.generate import SamplingConfig, sample_logits


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama")
    hf = save_hf_model(LlamaForCausalLM, tiny_llama_config(max_position_embeddings=128), path)
    return hf, cpmjax.from_pretrained(path)


def _prompts(lengths, vocab=96, seed=0):
    rs = np.random.RandomState(seed)
    return [rs.randint(3, vocab, n).tolist() for n in lengths]


def _hf_greedy(hf, prompt, n):
    with torch.no_grad():
        out = hf.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False,
                          eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def test_greedy_matches_transformers_generate(llama):
    hf, model = llama
    prompts = _prompts([4, 11, 19])
    result = cpmjax.generate(model, prompts, 24)
    assert result.tokens.shape == (3, 24)
    for i, prompt in enumerate(prompts):
        assert result.row(i) == _hf_greedy(hf, prompt, 24)
    s = result.stats
    assert s.new_tokens == 72 and s.prompt_tokens == 34
    assert s.decode_tokens_per_second > 0 and s.prefill_seconds > 0


def test_greedy_matches_transformers_minicpm3(tmp_path):
    hf = save_hf_model(MiniCPM3ForCausalLM, tiny_minicpm3_config(), tmp_path)
    model = cpmjax.from_pretrained(tmp_path)
    prompt = _prompts([7])[0]
    assert cpmjax.generate(model, [prompt], 16).row(0) == _hf_greedy(hf, prompt, 16)


def test_kv_cache_decoding_equals_full_reforward(tmp_path):
    """Every decoded token is the argmax of a full forward over prompt + tokens so far."""
    write_random_minicpm(tmp_path, max_position_embeddings=128)
    model = cpmjax.from_pretrained(tmp_path)
    prompt = _prompts([9])[0]
    generated = cpmjax.generate(model, [prompt], 12).row(0)
    width = len(prompt) + len(generated)
    # one compiled full forward over a fixed width; causal, so the padding after the real
    # tokens does not change the logits read at the last real position
    forward = jax.jit(lambda ids, last: model(ids)[0, last])
    sequence = list(prompt)
    for token in generated:
        padded = jnp.asarray([sequence + [0] * (width - len(sequence))])
        assert int(jnp.argmax(forward(padded, len(sequence) - 1))) == token
        sequence.append(token)


def test_batched_equals_one_by_one(llama):
    _, model = llama
    prompts = _prompts([3, 17, 8, 30], seed=1)
    batched = cpmjax.generate(model, prompts, 10)
    for i, prompt in enumerate(prompts):
        assert cpmjax.generate(model, [prompt], 10).row(0) == batched.row(i)


def test_sampled_rows_are_deterministic_and_seeded(llama):
    _, model = llama
    prompts = _prompts([5, 5])
    a = cpmjax.generate(model, prompts, 12, temperature=1.0, top_k=20, seed=3)
    b = cpmjax.generate(model, prompts, 12, temperature=1.0, top_k=20, seed=3)
    c = cpmjax.generate(model, prompts, 12, temperature=1.0, top_k=20, seed=4)
    np.testing.assert_array_equal(a.tokens, b.tokens)
    assert not np.array_equal(a.tokens, c.tokens)


def test_stop_tokens_end_rows_independently(llama):
    _, model = llama
    prompts = _prompts([6, 9], seed=2)
    free = cpmjax.generate(model, prompts, 12)
    stop = free.row(0)[3]
    result = cpmjax.generate(model, prompts, 12, stop_token_ids=[stop], pad_token_id=0)
    first = free.row(0).index(stop)
    assert result.row(0) == free.row(0)[: first + 1]
    assert result.lengths[0] == first + 1
    assert np.all(result.tokens[0, first + 1:] == 0)
    if stop not in free.row(1):
        assert result.row(1) == free.row(1)


def test_top_k_and_top_p_restrict_support():
    logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05]]))
    keys = jax.random.split(jax.random.PRNGKey(0), 400)
    top_k = jax.vmap(lambda k: sample_logits(logits, k, SamplingConfig(1.0, 2, 1.0)))(keys)
    assert set(np.unique(np.asarray(top_k))) == {0, 1}
    top_p = jax.vmap(lambda k: sample_logits(logits, k, SamplingConfig(1.0, 0, 0.7)))(keys)
    assert set(np.unique(np.asarray(top_p))) == {0, 1}  # 0.5 < 0.7 <= 0.8
    full = jax.vmap(lambda k: sample_logits(logits, k, SamplingConfig(1.0, 0, 1.0)))(keys)
    counts = np.bincount(np.asarray(full).ravel(), minlength=4) / 400
    np.testing.assert_allclose(counts, [0.5, 0.3, 0.15, 0.05], atol=0.08)


def test_generation_errors(llama):
    _, model = llama
    with pytest.raises(errors.EmptyPromptError, match="prompt 1 is empty"):
        cpmjax.generate(model, [[5, 6], []], 4)
    with pytest.raises(errors.TokenIdError, match="token id 96 at prompt 0, position 2"):
        cpmjax.generate(model, [[5, 6, 96]], 4)
    with pytest.raises(errors.TokenIdError, match="-1"):
        cpmjax.generate(model, [[-1]], 4)
    with pytest.raises(errors.PromptTooLongError, match="max_position_embeddings=128"):
        cpmjax.generate(model, [[5] * 100], 40)
    with pytest.raises(errors.InputError):
        cpmjax.generate(model, [[5]], 0)
    with pytest.raises(errors.InputError):
        cpmjax.generate(model, [[5]], 3, top_p=0.0)
