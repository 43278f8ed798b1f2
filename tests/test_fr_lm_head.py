"""Frequency-ranked LM head: Pallas kernel (interpreted) and lax blockwise path vs the reference.

Ids must be the reference top-k up to ties (equal logits may come in either order), log-probs
within 1e-5; subsets are not multiples of the tile and top_k goes up to 64.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import fr_lm_head, fr_lm_head_blockwise, fr_lm_head_reference

jax.config.update("jax_default_matmul_precision", "highest")

# (name, hidden shape, vocab, subset size or None, top_k, block_v)
CASES = [
    ("full_vocab", (7, 16), 300, None, 8, 64),
    ("subset437_top64", (13, 32), 1000, 437, 64, 128),
    ("top_k_equals_subset", (1, 24), 200, 33, 33, 16),
    ("leading_dims", (2, 3, 20), 500, 250, 5, 64),
]


def _inputs(hidden_shape, vocab, subset, dtype=jnp.float32, seed=0):
    keys = jax.random.split(jax.random.key(seed), 3)
    dim = hidden_shape[-1]
    hidden = jax.random.normal(keys[0], hidden_shape, dtype)
    weight = jax.random.normal(keys[1], (vocab, dim), dtype)
    subset_ids = None
    if subset is not None:
        subset_ids = jax.random.permutation(keys[2], vocab)[:subset].astype(jnp.int32)
    # Ties: several tokens share one weight row, so their logits are equal in every row.
    ranked = np.arange(vocab) if subset_ids is None else np.asarray(subset_ids)
    for tied in ranked[1:4]:
        weight = weight.at[tied].set(weight[ranked[0]])
    return hidden, weight, subset_ids


def _check_against_reference(ids, logprobs, hidden, weight, subset_ids, top_k, tolerance):
    ref_ids, ref_logprobs = fr_lm_head_reference(hidden, weight, subset_ids, top_k=top_k)
    assert ids.shape == ref_ids.shape and ids.dtype == jnp.int32
    assert logprobs.shape == ref_logprobs.shape and logprobs.dtype == jnp.float32
    ids = np.asarray(ids).reshape(-1, top_k)
    logprobs = np.asarray(logprobs).reshape(-1, top_k)
    ref_ids = np.asarray(ref_ids).reshape(-1, top_k)
    ref_logprobs = np.asarray(ref_logprobs).reshape(-1, top_k)
    np.testing.assert_allclose(logprobs, ref_logprobs, atol=tolerance, rtol=0)
    # Each returned id's own log-prob (from the full subset distribution) is what was returned.
    flat_hidden = np.asarray(hidden, np.float64).reshape(-1, hidden.shape[-1])
    logits = flat_hidden @ np.asarray(weight, np.float64).T
    allowed = np.arange(weight.shape[0]) if subset_ids is None else np.asarray(subset_ids)
    sub_logits = logits[:, allowed]
    lse = np.log(np.exp(sub_logits - sub_logits.max(1, keepdims=True)).sum(1)) + sub_logits.max(1)
    own = np.take_along_axis(logits, ids, axis=1) - lse[:, None]
    np.testing.assert_allclose(own, logprobs, atol=tolerance, rtol=0)
    for row, ref_row, values in zip(ids, ref_ids, ref_logprobs, strict=True):
        assert len(set(row.tolist())) == top_k and set(row.tolist()) <= set(allowed.tolist())
        # Ids strictly above the k-th value are forced; only ties at the boundary may differ.
        forced = values > values[-1] + 1e-4
        assert set(ref_row[forced].tolist()) <= set(row.tolist())


class FrHeadTest:
    INTERPRET = True

    def head(self, hidden, weight, subset_ids, *, top_k, block_v):
        raise NotImplementedError

    @pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
    def test_matches_reference(self, case):
        _, hidden_shape, vocab, subset, top_k, block_v = case
        hidden, weight, subset_ids = _inputs(hidden_shape, vocab, subset)
        ids, logprobs = self.head(hidden, weight, subset_ids, top_k=top_k, block_v=block_v)
        _check_against_reference(ids, logprobs, hidden, weight, subset_ids, top_k, 1e-5)

    def test_bfloat16_inputs(self):
        hidden, weight, subset_ids = _inputs((9, 32), 700, 300, dtype=jnp.bfloat16, seed=2)
        ids, logprobs = self.head(hidden, weight, subset_ids, top_k=16, block_v=64)
        _check_against_reference(ids, logprobs, hidden, weight, subset_ids, 16, 1e-4)


class TestFrLmHeadInterpret(FrHeadTest):
    def head(self, hidden, weight, subset_ids, *, top_k, block_v):
        return fr_lm_head(
            hidden, weight, subset_ids, top_k=top_k, block_v=block_v, block_t=8,
            interpret=self.INTERPRET,
        )


class TestFrLmHeadBlockwise(FrHeadTest):
    def head(self, hidden, weight, subset_ids, *, top_k, block_v):
        return fr_lm_head_blockwise(hidden, weight, subset_ids, top_k=top_k, block_v=block_v)


def test_ties_break_towards_the_earlier_subset_position():
    """Identical logits: both tiled implementations order them as the reference does."""
    hidden, weight, subset_ids = _inputs((4, 16), 400, 150, seed=5)
    # One vector aligned with every hidden row, at subset positions in different tiles of 32.
    tied_ids = np.asarray(subset_ids)[[149, 0, 100, 40]]
    tied_row = 10.0 * jnp.sum(hidden / jnp.linalg.norm(hidden, axis=1, keepdims=True), axis=0)
    weight = weight.at[tied_ids].set(tied_row)
    ref_ids, _ = fr_lm_head_reference(hidden, weight, subset_ids, top_k=12)
    assert all(set(tied_ids.tolist()) <= set(row.tolist()) for row in np.asarray(ref_ids))
    for head in (fr_lm_head, fr_lm_head_blockwise):
        ids, _ = head(hidden, weight, subset_ids, top_k=12, block_v=32)
        np.testing.assert_array_equal(ids, ref_ids)


@pytest.mark.parametrize("head", [fr_lm_head, fr_lm_head_blockwise])
def test_logits_are_never_materialised(head):
    """XLA's temporary buffers stay below one [tokens, subset] float32 logits array."""
    tokens, subset, dim = 256, 8192, 8
    hidden = jax.ShapeDtypeStruct((tokens, dim), jnp.float32)
    weight = jax.ShapeDtypeStruct((subset, dim), jnp.float32)
    fn = jax.jit(lambda h, w: head(h, w, top_k=8, block_v=256))
    temp = fn.lower(hidden, weight).compile().memory_analysis().temp_size_in_bytes
    assert temp < tokens * subset * 4 / 4, temp


def test_input_errors():
    hidden, weight, subset_ids = _inputs((3, 8), 50, 10)
    with pytest.raises(ValueError, match="top_k"):
        fr_lm_head(hidden, weight, subset_ids, top_k=11)
    with pytest.raises(ValueError, match="weight dim"):
        fr_lm_head_blockwise(hidden, weight[:, :4], top_k=2)


def test_kernel_lowers_for_tpu():
    """Lowers through Mosaic TPU on this CPU machine (no device compile): hidden 2304
    (MiniCPM) runs as chunks of 256, the subset is not a tile multiple. (On GPU fr_lm_head
    runs the lax walk, see the module docstring.)"""
    spec = jax.ShapeDtypeStruct
    args = (spec((20, 2304), jnp.bfloat16), spec((8192, 2304), jnp.bfloat16),
            spec((1000,), jnp.int32))
    exported = jax.export.export(
        jax.jit(lambda h, w, s: fr_lm_head(h, w, s, top_k=64, interpret=False)),
        platforms=["tpu"],
    )(*args)
    assert "tpu_custom_call" in exported.mlir_module()
