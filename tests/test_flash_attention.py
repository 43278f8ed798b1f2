"""Flash attention (Pallas, interpreted on CPU) and the lax blockwise path vs the reference.

Every case compares the output, the log-sum-exp and the gradients of a loss that uses both
(so the lse cotangent path is exercised) against ``attention_reference`` in float32 (relative
error <= 1e-5 of the largest reference magnitude) and in bfloat16 (<= 2e-2). ``q_offset`` is
passed as a traced argument, as a ring-attention step would.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import attention_reference, blockwise_attention, flash_attention

jax.config.update("jax_default_matmul_precision", "highest")


class Case(NamedTuple):
    name: str
    batch: int
    q_len: int
    kv_len: int
    q_heads: int
    kv_heads: int
    qk_dim: int
    v_dim: int
    causal: bool
    q_offset: int
    segments: str  # "none", "shared" ([b, s]) or "pair" ((q_seg, kv_seg))


CASES = [
    Case("decode_len1_gqa", 2, 1, 77, 4, 2, 16, 16, True, 76, "none"),
    Case("len77_gqa8to2", 1, 77, 77, 8, 2, 16, 16, True, 0, "none"),
    Case("len130_mla_noncausal", 1, 130, 130, 2, 2, 24, 16, False, 0, "none"),
    Case("len130_segments", 2, 130, 130, 4, 2, 16, 16, True, 0, "shared"),
    Case("chunked_prefill_mqa_mla", 1, 33, 130, 4, 1, 16, 8, True, 97, "none"),
    Case("masked_rows_offset_pairs", 1, 20, 50, 2, 2, 8, 8, True, -5, "pair"),
]


def _relative_error(actual, expected) -> float:
    actual = np.asarray(actual, np.float64)
    expected = np.asarray(expected, np.float64)
    scale = max(np.abs(expected).max(), 1e-30)
    return float(np.abs(actual - expected).max() / scale)


def _inputs(case: Case, dtype, seed: int = 0):
    keys = jax.random.split(jax.random.key(seed), 5)
    q = jax.random.normal(keys[0], (case.batch, case.q_len, case.q_heads, case.qk_dim), dtype)
    k = jax.random.normal(keys[1], (case.batch, case.kv_len, case.kv_heads, case.qk_dim), dtype)
    v = jax.random.normal(keys[2], (case.batch, case.kv_len, case.kv_heads, case.v_dim), dtype)
    segments = None
    if case.segments == "shared":
        segments = jnp.sort(jax.random.randint(keys[3], (case.batch, case.q_len), 0, 4), axis=1)
    elif case.segments == "pair":
        # the first query rows are in a segment no key has: fully masked rows
        q_seg = jnp.concatenate(
            [jnp.full((case.batch, 4), 9), jnp.ones((case.batch, case.q_len - 4))], axis=1
        ).astype(jnp.int32)
        kv_seg = jax.random.randint(keys[4], (case.batch, case.kv_len), 0, 2)
        segments = (q_seg, kv_seg)
    return q, k, v, segments


def _loss_and_grads(attend, causal):
    """jit(value_and_grad) of a loss on both outputs; q_offset is a traced argument."""

    def loss(q, k, v, segments, q_offset):
        out, lse = attend(
            q, k, v, causal=causal, segment_ids=segments, q_offset=q_offset, return_lse=True
        )
        out32 = out.astype(jnp.float32)
        finite_lse = jnp.where(jnp.isfinite(lse), lse, 0.0)
        return jnp.sum(out32 * jnp.cos(out32)) + 0.3 * jnp.sum(finite_lse), (out, lse)

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))


def _compare(case: Case, attend, dtype, tolerance: float):
    q, k, v, segments = _inputs(case, dtype)
    offset = jnp.int32(case.q_offset)
    (_, (out, lse)), grads = _loss_and_grads(attend, case.causal)(q, k, v, segments, offset)
    # Ground truth: float32 reference on the same (possibly bf16-rounded) inputs.
    q32, k32, v32 = (x.astype(jnp.float32) for x in (q, k, v))
    (_, (ref_out, ref_lse)), ref_grads = _loss_and_grads(attention_reference, case.causal)(
        q32, k32, v32, segments, offset
    )
    assert out.shape == ref_out.shape and out.dtype == dtype
    assert lse.shape == (case.batch, case.q_heads, case.q_len) and lse.dtype == jnp.float32
    masked = ~np.isfinite(np.asarray(ref_lse))
    np.testing.assert_array_equal(~np.isfinite(np.asarray(lse)), masked)
    assert np.all(np.asarray(lse)[masked] == -np.inf)
    errors = {
        "out": _relative_error(out, ref_out),
        "lse": _relative_error(np.where(masked, 0, lse), np.where(masked, 0, ref_lse)),
    }
    for name, grad, ref_grad in zip(("dq", "dk", "dv"), grads, ref_grads, strict=True):
        assert grad.shape == ref_grad.shape and grad.dtype == dtype
        assert np.all(np.isfinite(np.asarray(grad, np.float32))), name
        errors[name] = _relative_error(grad, ref_grad)
    assert max(errors.values()) <= tolerance, errors
    if masked.any():  # rows that see no key: exactly zero output
        out_rows = np.asarray(out, np.float32).transpose(0, 2, 1, 3)[masked]
        assert np.all(out_rows == 0)
    return errors


class AttentionKernelTest:
    """Shared checks; a subclass names the implementation in ``attend``."""

    INTERPRET = True

    def attend(self, q, k, v, **kwargs):
        raise NotImplementedError

    @pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
    def test_float32_matches_reference(self, case):
        _compare(case, self.attend, jnp.float32, 1e-5)

    def test_bfloat16_matches_reference(self):
        _compare(CASES[3], self.attend, jnp.bfloat16, 2e-2)

    def test_length_1000(self):
        case = Case("len1000", 1, 1000, 1000, 2, 1, 8, 8, True, 0, "shared")
        _compare(case, self.attend, jnp.float32, 1e-5)


class TestFlashAttentionInterpret(AttentionKernelTest):
    """The Pallas kernels in interpret mode (blocks smaller than the lengths, tails masked)."""

    INTERPRET = True

    def attend(self, q, k, v, **kwargs):
        block = 128 if q.shape[1] >= 1000 else 32
        return flash_attention(
            q, k, v, block_q=block, block_k=block // 2, interpret=self.INTERPRET, **kwargs
        )

    @pytest.mark.parametrize("case", CASES[:1], ids=[CASES[0].name])
    def test_default_blocks_and_no_lse(self, case):
        q, k, v, _ = _inputs(case, jnp.float32, seed=3)
        out = flash_attention(q, k, v, q_offset=case.q_offset, interpret=self.INTERPRET)
        ref = attention_reference(q, k, v, q_offset=case.q_offset)
        assert _relative_error(out, ref) <= 1e-5


class TestBlockwiseAttention(AttentionKernelTest):
    """The lax blockwise path (what CPU uses)."""

    def attend(self, q, k, v, **kwargs):
        return blockwise_attention(q, k, v, block_k=128 if q.shape[1] >= 1000 else 32, **kwargs)

    def test_memory_is_linear_in_sequence(self):
        """Forward + backward at 4096 tokens: XLA's temp buffers stay far below one score matrix."""
        seq = 4096
        q = jax.ShapeDtypeStruct((1, seq, 1, 16), jnp.float32)

        def loss(q, k, v):
            return jnp.sum(blockwise_attention(q, k, v, block_k=256))

        compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(q, q, q).compile()
        temp = compiled.memory_analysis().temp_size_in_bytes
        assert temp < seq * seq * 4 / 16, temp


def test_block_sizes_do_not_change_results():
    case = CASES[3]
    q, k, v, segments = _inputs(case, jnp.float32, seed=1)
    small = blockwise_attention(q, k, v, segment_ids=segments, block_k=16, block_q=8)
    large = blockwise_attention(q, k, v, segment_ids=segments, block_k=512)
    assert _relative_error(small, large) <= 1e-5


def test_input_errors_name_the_culprit():
    q = jnp.zeros((1, 8, 3, 8))
    k = jnp.zeros((1, 8, 2, 8))
    with pytest.raises(ValueError, match="multiple of kv heads"):
        blockwise_attention(q, k, k)
    q = jnp.zeros((1, 4, 2, 8))
    with pytest.raises(ValueError, match="q_len == kv_len"):
        flash_attention(q, k, k, segment_ids=jnp.zeros((1, 8), jnp.int32))
    with pytest.raises(ValueError, match="head_dim"):
        attention_reference(q, jnp.zeros((1, 8, 2, 4)), k)


def test_portable_kernels_lower_for_tpu():
    """Forward and backward lower through Mosaic TPU on this CPU machine.

    Lowering only: the device compiler never runs here, so this catches unsupported ops and
    block shapes at the Pallas level, not VMEM limits. The GPU kernels have their own tests in
    tests/test_flash_attention_mosaic_gpu.py."""
    spec = jax.ShapeDtypeStruct
    q = spec((1, 100, 4, 192), jnp.bfloat16)  # MLA: qk 192, v 128; GQA 4:2
    k = spec((1, 100, 2, 192), jnp.bfloat16)
    v = spec((1, 100, 2, 128), jnp.bfloat16)
    seg = spec((1, 100), jnp.int32)

    def loss(q, k, v, seg):
        out = flash_attention(q, k, v, segment_ids=seg, block_q=64, block_k=64, interpret=False,
                              kernel="portable")
        return jnp.sum(out.astype(jnp.float32))

    exported = jax.export.export(
        jax.jit(jax.grad(loss, argnums=(0, 1, 2))), platforms=["tpu"]
    )(q, k, v, seg)
    assert exported.mlir_module().count("tpu_custom_call") >= 3  # forward, dq and dk/dv
