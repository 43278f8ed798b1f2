"""cpmjax.generate with a distributed prefill (APB, Star) over 8 simulated devices."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from helpers import write_random_minicpm

import cpmjax
from cpmjax import errors
from sharding.mesh import make_mesh


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = tmp_path_factory.mktemp("m")
    write_random_minicpm(path, max_position_embeddings=256)
    return cpmjax.from_pretrained(path)


def _zero_scores(q, k, v, *, query):
    return jnp.zeros(k.shape[:3])  # every entry is passed in the exact limit: scores unused


def test_apb_exact_limit_generates_like_local(model):
    """anchor 0 and passing whole blocks is exact causal attention: same greedy tokens."""
    mesh = make_mesh(sequence=4)
    prompts = np.random.RandomState(0).randint(3, 96, (2, 32))
    local = cpmjax.generate(model, prompts, 8)
    apb = cpmjax.generate(model, prompts, 8, prefill="apb", mesh=mesh,
                          prefill_options={"anchor_len": 0, "passing_len": 8,
                                           "scorer": _zero_scores})
    np.testing.assert_array_equal(apb.tokens, local.tokens)
    assert apb.stats.prefill_seconds > 0


def test_apb_and_star_with_compression_produce_tokens(model):
    mesh = make_mesh(sequence=4)
    prompts = np.random.RandomState(1).randint(3, 96, (1, 64))
    for method in ("apb", "star"):
        out = cpmjax.generate(model, prompts, 6, prefill=method, mesh=mesh,
                              prefill_options={"query_len": 2, "query_offset": 1})
        assert out.tokens.shape == (1, 6)
        assert np.all((out.tokens >= 0) & (out.tokens < 96))


def test_distributed_prefill_errors(model):
    with pytest.raises(errors.ConfigError, match="mesh"):
        cpmjax.generate(model, [[5] * 16], 4, prefill="apb")
    with pytest.raises(errors.ConfigError, match="prefill='magic'"):
        cpmjax.generate(model, [[5] * 16], 4, prefill="magic")


def test_mixed_length_prompts_run_per_length(model):
    """Prompts of different lengths: each length is its own distributed prefill, and every row
    gets what it gets when generated alone (greedy)."""
    mesh = make_mesh(sequence=4)
    rng = np.random.RandomState(4)
    prompts = [rng.randint(3, 96, n).tolist() for n in (64, 48, 64, 56)]
    opts = {"query_len": 2, "query_offset": 1}
    both = cpmjax.generate(model, prompts, 5, prefill="apb", mesh=mesh, prefill_options=opts)
    assert both.tokens.shape == (4, 5) and both.stats.prompt_tokens == 232
    for i, p in enumerate(prompts):
        alone = cpmjax.generate(model, [p], 5, prefill="apb", mesh=mesh, prefill_options=opts)
        np.testing.assert_array_equal(both.row(i), alone.row(0))


def test_ring_prefill_generates_like_local(model):
    """prefill='ring' is exact (BurstAttention): same greedy tokens as one device."""
    mesh = make_mesh(sequence=4)
    prompts = np.random.RandomState(2).randint(3, 96, (2, 30))
    local = cpmjax.generate(model, prompts, 6)
    ring = cpmjax.generate(model, prompts, 6, prefill="ring", mesh=mesh)
    np.testing.assert_array_equal(ring.tokens, local.tokens)
