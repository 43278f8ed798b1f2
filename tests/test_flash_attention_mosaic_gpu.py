"""The Mosaic GPU (Hopper) flash attention kernels, tested on a machine without a GPU.

Two kinds of evidence:

- numerics: the forward, dq and dk/dv kernels run in Pallas's Mosaic GPU interpreter (which
  simulates shared memory, TMA copies, barriers and wgmma on CPU) and are compared with
  ``attention_reference`` for the output, the log-sum-exp and the gradients of a loss using both.
  In float32 the interpreter multiplies in float32, so the kernels' masking, online softmax and
  gradient bookkeeping are checked at 1e-5 (the public API never sends float32 to these kernels
  on a GPU, where wgmma would round to tf32; it runs the lax path instead); bfloat16 runs through
  the public ``flash_attention(kernel="mosaic_gpu")`` at 2e-2.
- lowering: ``jax.export`` for platform ``cuda`` lowers forward and backward through Pallas's
  Mosaic GPU lowering (register layouts, TMA tile shapes, wgmma operand shapes) for several
  configurations; the module holds one ``mosaic_gpu`` custom call per kernel and no Triton call.
  ptxas and the run on an H200 are not covered here (see scripts/gpu_check_kernels.py).
"""

from __future__ import annotations

import functools
import importlib
import os
import pathlib
import subprocess
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_flash_attention import Case, _compare, _relative_error

from pallas_kernels import attention_reference, blockwise_attention, flash_attention
from pallas_kernels import flash_attention_mosaic_gpu as mgpu
from pallas_kernels.flash_attention import _flash_core, _scale

jax.config.update("jax_default_matmul_precision", "highest")


def _kernel_float32(q, k, v, *, causal, segment_ids, q_offset, return_lse):
    """The Mosaic GPU kernels on float32 inputs, in the interpreter (bypasses the dtype routing
    of ``flash_attention``)."""
    assert return_lse
    segs = None
    if segment_ids is not None:
        pair = segment_ids if isinstance(segment_ids, tuple) else (segment_ids, segment_ids)
        segs = tuple(jnp.asarray(s, jnp.int32) for s in pair)
    return _flash_core(
        q, k, v, segs, jnp.asarray(q_offset, jnp.int32), causal, _scale(None, q.shape[3]),
        128, 128, True, "mosaic_gpu",
    )


INTERPRETER_CASES = [
    # tails in both lengths, 2 query tiles x 3 key tiles, GQA 8:2, chunked-prefill offset
    Case("gqa8to2_q77_kv130_offset", 1, 77, 130, 8, 2, 16, 16, True, 53, "none"),
    # MLA head dims (24 / 16, padded to 64 inside), non-causal, shared segment ids, batch 2
    Case("mla_noncausal_segments", 2, 70, 70, 2, 1, 24, 16, False, 0, "shared"),
    # (q_seg, kv_seg) pairs with rows that see no key, negative offset
    Case("masked_rows_pairs_negative_offset", 1, 20, 50, 2, 2, 8, 8, True, -5, "pair"),
]


@pytest.mark.parametrize("case", INTERPRETER_CASES, ids=[c.name for c in INTERPRETER_CASES])
def test_kernels_float32_in_interpreter(case):
    _compare(case, _kernel_float32, jnp.float32, 1e-5)


def test_single_buffered_loops_in_interpreter(monkeypatch):
    """Wide heads (MLA 192 in the dk/dv kernel) get one buffer slot instead of two: force that
    path in all three kernels with a zero shared-memory budget."""
    monkeypatch.setattr(mgpu, "_SMEM_BUDGET", 0)
    _compare(INTERPRETER_CASES[0], _kernel_float32, jnp.float32, 1e-5)


def test_bfloat16_public_entry_in_interpreter():
    case = Case("bf16_gqa_causal_decode_chunk", 1, 65, 100, 4, 2, 32, 32, True, 35, "none")
    attend = functools.partial(flash_attention, kernel="mosaic_gpu", interpret=True)
    _compare(case, attend, jnp.bfloat16, 2e-2)


def test_float32_inputs_take_the_lax_path():
    """float32 with kernel="mosaic_gpu" gives the blockwise result (no tf32 rounding)."""
    keys = jax.random.split(jax.random.key(4), 3)
    q = jax.random.normal(keys[0], (1, 40, 2, 16))
    k = jax.random.normal(keys[1], (1, 40, 1, 16))
    v = jax.random.normal(keys[2], (1, 40, 1, 16))
    out = flash_attention(q, k, v, kernel="mosaic_gpu", interpret=False)
    np.testing.assert_array_equal(out, blockwise_attention(q, k, v, block_k=128, block_q=128))
    assert _relative_error(out, attention_reference(q, k, v)) <= 1e-5


# ----------------------------------------------------------------------------- lowering

LOWERING_CASES = [
    # name, q_len, kv_len, q_heads, kv_heads, qk_dim, v_dim, causal, segments
    ("causal_gqa8to2_len77", 77, 77, 8, 2, 64, 64, True, False),
    ("noncausal_len130", 130, 130, 2, 2, 128, 128, False, False),
    ("mla_192_128_segments", 100, 100, 4, 2, 192, 128, True, True),
    ("chunked_prefill_q33_kv130", 33, 130, 4, 1, 64, 64, True, False),
]


def _export_for_cuda(fn, *args):
    exported = jax.export.export(jax.jit(fn), platforms=["cuda"])(*args)
    text = exported.mlir_module()
    assert "triton" not in text.lower()
    return text.count("@mosaic_gpu_v2")


@pytest.mark.parametrize("case", LOWERING_CASES, ids=[c[0] for c in LOWERING_CASES])
def test_forward_and_backward_lower_through_mosaic_gpu(case):
    _, q_len, kv_len, q_heads, kv_heads, qk_dim, v_dim, causal, segments = case
    spec = jax.ShapeDtypeStruct
    q = spec((2, q_len, q_heads, qk_dim), jnp.bfloat16)
    k = spec((2, kv_len, kv_heads, qk_dim), jnp.bfloat16)
    v = spec((2, kv_len, kv_heads, v_dim), jnp.bfloat16)
    seg = spec((2, q_len), jnp.int32) if segments else None
    offset = spec((), jnp.int32)

    def attend(q, k, v, seg, offset):
        return flash_attention(
            q, k, v, causal=causal, segment_ids=seg, q_offset=offset, return_lse=True,
            interpret=False, kernel="mosaic_gpu",
        )

    def loss(q, k, v, seg, offset):
        out, lse = attend(q, k, v, seg, offset)
        return jnp.sum(out.astype(jnp.float32)) + jnp.sum(jnp.where(jnp.isfinite(lse), lse, 0))

    assert _export_for_cuda(attend, q, k, v, seg, offset) == 1
    grad = jax.grad(loss, argnums=(0, 1, 2))
    assert _export_for_cuda(grad, q, k, v, seg, offset) == 3  # forward, dq, dk/dv


def test_auto_kernel_is_portable_off_gpu():
    """On this CPU machine "auto" means the portable kernels (interpreted)."""
    spec = jax.ShapeDtypeStruct
    q = spec((1, 64, 2, 64), jnp.bfloat16)
    exported = jax.export.export(
        jax.jit(functools.partial(flash_attention, interpret=False)), platforms=["tpu"]
    )(q, q, q)
    assert "tpu_custom_call" in exported.mlir_module()


def test_unknown_kernel_is_rejected():
    q = jnp.zeros((1, 8, 2, 8))
    with pytest.raises(ValueError, match="kernel must be one of"):
        flash_attention(q, q, q, kernel="triton")


def test_gpu_check_script_refuses_to_run_without_a_gpu():
    """scripts/gpu_check_kernels.py parses its flags anywhere and exits 2 off GPU (run as a
    program, on the CPU backend)."""
    path = pathlib.Path(__file__).parents[1] / "scripts" / "gpu_check_kernels.py"
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}

    def run(*flags):
        return subprocess.run([sys.executable, str(path), *flags], capture_output=True,
                              text=True, env=env, timeout=300)

    shown = run("--help")
    assert shown.returncode == 0 and "--seq-lens" in shown.stdout
    refused = run("--seq-lens", "1024", "--skip-timing")  # the flags parse, then no GPU
    assert refused.returncode == 2
    assert "no GPU" in refused.stderr and "error:" not in refused.stderr


@pytest.mark.parametrize("dims", [(128, 128), (192, 128), (256, 256)], ids=str)
def test_shared_memory_fits_hopper(dims, monkeypatch):
    """Every kernel's shared-memory scratch, as Pallas's Mosaic GPU lowering allocates it,
    fits the 227 KiB an H100/H200 block may use (the device compile would reject more)."""
    from jax.experimental.mosaic.gpu import core as mosaic_gpu_core

    lower = getattr(mosaic_gpu_core, "_lower_as_gpu_kernel", None)
    # The hook this check intercepts; if a jax upgrade removes it, the check must be rewritten
    # against the new lowering, not silently dropped.
    assert lower is not None, "jax.experimental.mosaic.gpu.core._lower_as_gpu_kernel is gone"
    allocated = {}

    def spy(*args, **kwargs):
        allocated[kwargs["kernel_name"]] = kwargs["smem_scratch_shape"][0].shape[0]
        return lower(*args, **kwargs)

    monkeypatch.setattr(mosaic_gpu_core, "_lower_as_gpu_kernel", spy)
    qk_dim, v_dim = dims
    spec = jax.ShapeDtypeStruct
    q = spec((1, 512, 4, qk_dim), jnp.bfloat16)
    k = spec((1, 512, 2, qk_dim), jnp.bfloat16)
    v = spec((1, 512, 2, v_dim), jnp.bfloat16)
    seg = spec((1, 512), jnp.int32)

    def loss(q, k, v, seg):
        out = flash_attention(q, k, v, segment_ids=seg, interpret=False, kernel="mosaic_gpu")
        return jnp.sum(out.astype(jnp.float32))

    _export_for_cuda(jax.grad(loss, argnums=(0, 1, 2)), q, k, v, seg)
    assert len(allocated) == 3, allocated
    assert max(allocated.values()) <= 227 * 1024, allocated


@pytest.mark.parametrize(
    ("capability", "dtype", "expected"),
    [("9.0", jnp.bfloat16, "mosaic_gpu"), ("9.0", jnp.float16, "mosaic_gpu"),
     ("10.0", jnp.bfloat16, "blockwise"),
     ("9.0", jnp.float32, "blockwise"), ("8.0", jnp.bfloat16, "blockwise"),
     (None, jnp.bfloat16, "blockwise")],
)
def test_auto_kernel_choice_on_gpus(capability, dtype, expected, monkeypatch):
    """"auto" on a GPU: Mosaic GPU kernels on Hopper (9.x) for half-precision inputs, the lax
    path for float32, other NVIDIA generations (the kernels use Hopper's wgmma) and GPUs without
    a CUDA compute capability."""
    module = importlib.import_module("pallas_kernels.flash_attention")  # the module, not the fn
    device = types.SimpleNamespace(compute_capability=capability)
    monkeypatch.setattr(module.jax, "default_backend", lambda: "gpu")
    monkeypatch.setattr(module.jax, "devices", lambda *args: [device])
    assert module._select_kernel("auto", (dtype,) * 3, False) == expected
    assert module._select_kernel("auto", (dtype,) * 3, True) == "portable"
