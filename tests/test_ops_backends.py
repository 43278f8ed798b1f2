"""The attention seam: every kernel backend gives the reference model's logits and gradients."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers import minicpm_hf_dict

from cpmjax import ops
from cpmjax.errors import ConfigError
from cpmjax.models import CausalLM, ModelConfig


def _model():
    config = ModelConfig.from_hf_dict(minicpm_hf_dict(num_hidden_layers=1))
    return CausalLM(config, rngs=nnx.Rngs(1))


def _loss(model, ids, segment_ids):
    logits = model(ids, segment_ids=segment_ids)
    return jnp.mean(jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, ids[..., None],
                                                                        -1)[..., 0])


@pytest.mark.parametrize("backend", ["blockwise", "pallas"])
def test_backend_matches_reference_values_and_grads(backend):
    model = _model()
    ids = jnp.asarray(np.random.RandomState(0).randint(0, 96, (2, 24)))
    segment_ids = jnp.asarray(np.repeat([[0] * 10 + [1] * 14], 2, 0))
    def run(model, ids, segment_ids):
        return model(ids, segment_ids=segment_ids), nnx.grad(_loss)(model, ids, segment_ids)

    ref_logits, ref_grads = nnx.jit(run)(model, ids, segment_ids)
    options = {"block_k": 8} if backend == "blockwise" else {"block_q": 8, "block_k": 8}
    with ops.attention_backend(backend, **options):  # read when nnx.jit traces
        logits, grads = nnx.jit(run)(model, ids, segment_ids)
    np.testing.assert_allclose(logits, ref_logits, rtol=1e-4, atol=1e-4)
    for (path, a), (_, b) in zip(nnx.to_flat_state(grads), nnx.to_flat_state(ref_grads), strict=True):
        np.testing.assert_allclose(a[...], b[...], rtol=1e-3, atol=1e-5, err_msg=str(path))


def test_unknown_backend_is_a_config_error():
    q = jnp.zeros((1, 4, 2, 8))
    with pytest.raises(ConfigError, match="nope"):
        ops.attention(q, q, q, impl="nope")


def test_default_backend_is_blockwise_for_long_keys(monkeypatch):
    """With no backend chosen, keys from LONG_SEQUENCE on run the blockwise kernel (a scan in
    the program), shorter ones the reference; both give the reference's values."""
    monkeypatch.setattr(ops, "LONG_SEQUENCE", 64)
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.standard_normal((1, 70, 4, 8)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((1, 70, 2, 8)), jnp.float32)
    v = jnp.asarray(rng.standard_normal((1, 70, 2, 8)), jnp.float32)
    seg = jnp.asarray(np.repeat([0, 1], 35)[None], jnp.int32)
    ref = ops.xla_attention(q, k, v, causal=True, segment_ids=seg)
    for length, uses_scan in [(70, True), (40, False)]:
        args = (q[:, :length], k[:, :length], v[:, :length])
        jaxpr = str(jax.make_jaxpr(lambda q, k, v, s=seg[:, :length]: ops.attention(
            q, k, v, causal=True, segment_ids=s))(*args))
        assert ("scan" in jaxpr) == uses_scan, length
    out = ops.attention(q, k, v, causal=True, segment_ids=seg)
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)


def test_one_vocabulary_and_deprecated_names():
    """impl= takes the library's names; backend= and "xla" still work with a DeprecationWarning
    and give the same numbers."""
    import pallas_kernels

    rng = np.random.default_rng(1)
    q = jnp.asarray(rng.standard_normal((1, 16, 4, 8)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((1, 16, 2, 8)), jnp.float32)
    ref = ops.attention(q, k, k, impl="reference")
    assert set(pallas_kernels.IMPLS) - {"auto"} <= set(ops.available_backends())
    with pytest.warns(DeprecationWarning, match="backend="):
        old = ops.attention(q, k, k, backend="blockwise", block_k=8)
    np.testing.assert_array_equal(old, ops.attention(q, k, k, impl="blockwise", block_k=8))
    with pytest.warns(DeprecationWarning, match="'xla'"):
        np.testing.assert_array_equal(ops.attention(q, k, k, impl="xla"), ref)
    with pytest.warns(DeprecationWarning, match="'xla'"):
        with ops.attention_backend("xla"):
            assert ops.current_backend()[0] == "reference"
    with pytest.warns(DeprecationWarning):
        assert pallas_kernels.resolve_impl("xla") == "reference"
    with pytest.raises(ValueError, match="impl='cuda'"):
        pallas_kernels.local_attention(q, k, k, causal=True, impl="cuda")
    # a callable local attention is accepted where a local attention is expected
    calls = []

    def mine(q, k, v, **kw):
        calls.append(kw["q_offset"])
        return pallas_kernels.local_attention(q, k, v, impl="reference", **kw)

    np.testing.assert_allclose(ops.attention(q, k, k, impl=mine), ref, rtol=1e-6, atol=1e-6)
    assert calls == [0]


def test_local_attention_keeps_each_call_sites_numbers():
    """The seam runs exactly the kernels the call sites ran before (same block sizes)."""
    from pallas_kernels import blockwise_attention, local_attention

    rng = np.random.default_rng(2)
    q = jnp.asarray(rng.standard_normal((1, 40, 4, 8)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((1, 600, 2, 8)), jnp.float32)
    out, lse = local_attention(q, k, k, causal=True, q_offset=560, impl="blockwise")
    want = blockwise_attention(q, k, k, causal=True, q_offset=560, block_k=512, return_lse=True)
    np.testing.assert_array_equal(out, want[0])
    np.testing.assert_array_equal(lse, want[1])
    assert lse.shape == (1, 4, 40) and lse.dtype == jnp.float32
