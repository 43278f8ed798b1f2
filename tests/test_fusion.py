"""UltraFuser's FusedLM on tiny random specialists: the mixing rule against its definition,
generation through cpmjax.generate, save/load, and the typed errors of bad inputs."""

from __future__ import annotations

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers import word_tokenizer

import cpmjax
from cpmjax.errors import ConfigError, InputError, MissingPathError, ShapeMismatchError
from cpmjax.fusion import FusedLM, fuse_logits, load_fused, save_fused
from cpmjax.models import CausalLM, ModelConfig


def tiny(seed: int, *, vocab: int = 64, hidden: int = 32, minicpm: bool = True) -> CausalLM:
    extra = dict(model_type="minicpm", scale_emb=4.0, scale_depth=1.4, dim_model_base=16,
                 tie_word_embeddings=True) if minicpm else dict(model_type="llama")
    config = ModelConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=64, initializer_range=0.2, bos_token_id=1,
                         eos_token_id=2, pad_token_id=0, **extra)
    return CausalLM(config, rngs=nnx.Rngs(seed))


@pytest.fixture(scope="module")
def specialists():
    return [tiny(1), tiny(2), tiny(3, minicpm=False)]


def ids(batch: int = 2, seq: int = 9, seed: int = 0, vocab: int = 64) -> jax.Array:
    return jax.random.randint(jax.random.PRNGKey(seed), (batch, seq), 3, vocab)


def test_fused_logits_are_gate_weighted_sum_of_specialists(specialists):
    """fused(ids) == sum_i gate_weights(ids)[..., i] * specialist_i(ids), and the weights are
    the softmax over specialists of the shared gate applied to each specialist's hidden state."""
    fused = FusedLM(specialists, gate="mlp", rngs=nnx.Rngs(7))
    x = ids()
    weights = fused.gate_weights(x)
    assert weights.shape == (2, 9, 3)
    np.testing.assert_allclose(np.asarray(weights.sum(-1)), 1.0, rtol=1e-6)
    expected = sum(weights[..., i:i + 1] * m(x) for i, m in enumerate(specialists))
    np.testing.assert_allclose(np.asarray(fused(x)), np.asarray(expected), rtol=1e-5,
                               atol=1e-5)
    # the reference gate: relu MLP on each specialist's normalised hidden state
    scores = []
    for m in specialists:
        h, _ = m.hidden_states(x)
        g = fused.gate
        inner = jnp.maximum(h @ g.inner.kernel[...] + g.inner.bias[...], 0.0)
        scores.append((inner @ g.outer.kernel[...] + g.outer.bias[...])[..., 0])
    ref = jax.nn.softmax(jnp.stack(scores, -1), -1)
    np.testing.assert_allclose(np.asarray(weights), np.asarray(ref), rtol=1e-5, atol=1e-6)
    assert list(fused.specialists) == specialists
    # the fused features reproduce the fused logits through the concatenated head
    features = fused(x, return_hidden=True)
    assert features.shape == (2, 9, 3 * 32)
    np.testing.assert_allclose(np.asarray(features @ fused.head_weight().T),
                               np.asarray(expected), rtol=1e-4, atol=1e-4)


def test_one_hot_gate_reproduces_that_specialist_exactly(specialists):
    fused = FusedLM(specialists, gate="linear")
    x = ids(seed=1)
    for j, m in enumerate(specialists):
        one_hot = jax.nn.one_hot(jnp.full(x.shape, j), 3)
        got = fused(x, gate_weights=one_hot)
        np.testing.assert_array_equal(np.asarray(got), np.asarray(m(x)))
        logits = [s(x) for s in specialists]
        np.testing.assert_array_equal(np.asarray(fuse_logits(one_hot, logits)),
                                      np.asarray(logits[j]))


def test_a_saturated_gate_selects_one_specialist(specialists):
    """A linear gate whose scores are far apart gives a one-hot softmax; the fused logits are
    then the selected specialist's (within float rounding of a weight 1 - 1e-30)."""
    fused = FusedLM(specialists, gate="linear", rngs=nnx.Rngs(3))
    x = ids(seed=5)
    fused.gate.outer.kernel[...] = fused.gate.outer.kernel[...] * 1e4
    w = np.asarray(fused.gate_weights(x))
    assert np.all(np.max(w, -1) > 0.999999)
    pick = np.argmax(w, -1)
    logits = np.stack([np.asarray(m(x)) for m in specialists], -2)  # [b, s, k, v]
    chosen = np.take_along_axis(logits, pick[..., None, None], axis=-2)[..., 0, :]
    np.testing.assert_allclose(np.asarray(fused(x)), chosen, rtol=1e-4, atol=1e-4)


def test_permuting_specialists_permutes_weights(specialists):
    fused = FusedLM(specialists, gate="mlp", rngs=nnx.Rngs(11))
    order = [2, 0, 1]
    permuted = FusedLM([specialists[i] for i in order], gate="mlp", rngs=nnx.Rngs(11))
    x = ids(seed=2)
    w = np.asarray(fused.gate_weights(x))
    wp = np.asarray(permuted.gate_weights(x))
    np.testing.assert_allclose(wp, w[..., order], rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(np.asarray(permuted(x)), np.asarray(fused(x)), rtol=1e-5,
                               atol=1e-5)


@pytest.mark.slow
def test_greedy_generation_equals_argmax_of_reforwarded_fused_logits(specialists):
    fused = FusedLM(specialists, gate="mlp", rngs=nnx.Rngs(5))
    prompts = [[5, 9, 11, 4, 7], [8, 3, 12]]  # ragged: batched with padding
    result = cpmjax.generate(fused, prompts, 6, pad_token_id=0)
    assert result.tokens.shape == (2, 6)
    for row, prompt in enumerate(prompts):
        # one causal re-forward of prompt + generated tokens: position t's logits see only
        # tokens <= t, so each generated token must be the argmax at the position before it
        new = result.row(row)
        logits = np.asarray(fused(jnp.asarray([list(prompt) + new])))[0]
        expected = logits[len(prompt) - 1:len(prompt) - 1 + len(new)].argmax(-1)
        np.testing.assert_array_equal(expected, new)
    # streaming gives the same tokens; sampling runs and is reproducible by seed
    seen = []
    streamed = cpmjax.generate(fused, prompts, 6, pad_token_id=0, stream=seen.append,
                               stream_every=2)
    np.testing.assert_array_equal(streamed.tokens, result.tokens)
    assert len(seen) == 3
    a = cpmjax.generate(fused, prompts, 6, temperature=0.8, top_k=10, seed=3, pad_token_id=0)
    b = cpmjax.generate(fused, prompts, 6, temperature=0.8, top_k=10, seed=3, pad_token_id=0)
    np.testing.assert_array_equal(a.tokens, b.tokens)


def test_init_cache_is_one_per_specialist(specialists):
    fused = FusedLM(specialists)
    cache = fused.init_cache(2, 16)
    assert len(cache) == 3
    for c, m in zip(cache, specialists, strict=True):
        assert jax.tree.structure(c) == jax.tree.structure(m.init_cache(2, 16))
    with pytest.raises(InputError, match="specialist caches"):
        fused(ids(), cache=cache[:2])


def test_save_load_round_trip(tmp_path, specialists):
    fused = FusedLM(specialists, gate="mlp", names=["text", "code", "math"], gate_hidden=16,
                    rngs=nnx.Rngs(9))
    tok_dir = tmp_path / "tok"
    word_tokenizer(tok_dir)
    out = save_fused(fused, tmp_path / "fused", tokenizer_dir=str(tok_dir))
    assert cpmjax.fusion.is_fused_dir(out)
    assert os.path.isfile(os.path.join(out, "specialists", "code", "model.safetensors"))
    back = load_fused(out)
    assert back.names == ("text", "code", "math")
    assert back.gate.kind == "mlp" and back.gate.gate_hidden == 16
    x = ids(seed=3)
    np.testing.assert_array_equal(np.asarray(back(x)), np.asarray(fused(x)))
    np.testing.assert_array_equal(np.asarray(back.gate_weights(x)),
                                  np.asarray(fused.gate_weights(x)))
    assert cpmjax.load_tokenizer(out) is not None

    # a missing specialist is named
    broken = tmp_path / "broken"
    shutil.copytree(out, broken)
    shutil.rmtree(broken / "specialists" / "code")
    with pytest.raises(MissingPathError, match="'code'"):
        load_fused(broken)
    # a specialist whose tokenizer differs is named
    other = tmp_path / "other"
    shutil.copytree(out, other)
    word_tokenizer(other / "specialists" / "math", words="x y z")
    with pytest.raises(ConfigError, match="'math'.*different tokenizer"):
        load_fused(other)
    # a gate of the wrong shape is named
    bad_gate = tmp_path / "badgate"
    shutil.copytree(out, bad_gate)
    with open(bad_gate / "fusion_config.json") as f:
        config = json.load(f)
    config["gate_hidden"] = 8
    with open(bad_gate / "fusion_config.json", "w") as f:
        json.dump(config, f)
    with pytest.raises(ShapeMismatchError, match="inner"):
        load_fused(bad_gate)


def test_bad_specialists_are_typed_errors(specialists):
    with pytest.raises(ConfigError, match="specialist 1 has vocab_size=80"):
        FusedLM([specialists[0], tiny(4, vocab=80)])
    with pytest.raises(ConfigError, match="specialist 1 has hidden_size=48.*gate"):
        FusedLM([specialists[0], tiny(4, hidden=48)])
    with pytest.raises(ConfigError, match="at least one"):
        FusedLM([])
    with pytest.raises(ConfigError, match="gate='moe'"):
        FusedLM(specialists, gate="moe")
    with pytest.raises(ConfigError, match="distinct"):
        FusedLM(specialists, names=["a", "a", "b"])
    with pytest.raises(InputError, match="gate_weights has shape"):
        FusedLM(specialists)(ids(), gate_weights=jnp.ones((2, 9, 2)) / 2)
    with pytest.raises(MissingPathError, match="'code'"):
        cpmjax.fusion.from_specialist_dirs(["/nonexistent/a"], names=["code"])


@pytest.mark.slow
def test_cli_generates_from_a_fused_directory(tmp_path, specialists, capsys):
    from cpmjax.cli import main

    tok = word_tokenizer(tmp_path / "tok")
    fused = FusedLM([tiny(1, vocab=len(tok) + 13), tiny(2, vocab=len(tok) + 13)],
                    names=["a", "b"], rngs=nnx.Rngs(1))
    out = save_fused(fused, tmp_path / "fused", tokenizer_dir=str(tmp_path / "tok"))
    assert main(["generate", "--model", out, "--prompt", "def fibonacci ( n )",
                 "--max-new-tokens", "4", "--no-stop"]) == 0
    captured = capsys.readouterr()
    ids = tok("def fibonacci ( n )", add_special_tokens=True)["input_ids"]
    expected = cpmjax.generate(fused, [ids], 4)
    text = tok.decode(expected.row(0), skip_special_tokens=True)
    assert captured.out == "def fibonacci ( n )" + text + "\n"
    assert "fused (2 specialists: a, b)" in captured.err
    assert main(["generate", "--model", out, "--prompt", "a", "--prefill", "ring"]) == 2
    assert main(["fuse", "--config", str(tmp_path / "missing.yaml")]) == 2
