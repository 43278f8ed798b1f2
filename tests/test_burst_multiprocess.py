"""BurstAttention across two real processes (jax.distributed on 127.0.0.1, gloo CPU collectives,
4 devices each): output and gradients equal the 8-simulated-device run in this process."""

from __future__ import annotations

import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import run_two_processes
from jax.sharding import AxisType, Mesh

from sharding.burst import burst_attention

pytestmark = pytest.mark.slow  # two real processes

_CHILD = textwrap.dedent("""
    import sys
    import jax
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.config.update("jax_default_matmul_precision", "highest")
    port, pid, out_path = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2,
                               process_id=pid)
    import numpy as np
    from jax.experimental import multihost_utils
    from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec
    sys.path.insert(0, sys.argv[4])
    from test_burst_multiprocess import inputs, loss_and_grads

    assert jax.device_count() == 8 and jax.local_device_count() == 4
    mesh = Mesh(np.array(jax.devices()), ("sequence",), axis_types=(AxisType.Auto,))
    specs = [PartitionSpec(None, "sequence")] * 4 + [PartitionSpec(None, "sequence")]
    arrays = [jax.make_array_from_callback(x.shape, NamedSharding(mesh, spec),
                                           lambda idx, x=x: x[idx])
              for x, spec in zip(inputs(), specs)]
    outs = jax.jit(lambda *a: loss_and_grads(mesh, *a))(*arrays)
    outs = [multihost_utils.process_allgather(x, tiled=True) for x in outs]
    if pid == 0:
        np.savez(out_path, *[np.asarray(x) for x in outs])
    jax.distributed.shutdown()
""")


def inputs() -> list[np.ndarray]:
    """Deterministic inputs (identical in every process): q, k, v, cotangent, segment ids."""
    rng = np.random.default_rng(9)
    q, k, v, ct = (rng.normal(size=(2, 64, h, 8)).astype(np.float32) for h in (4, 2, 2, 4))
    seg = np.sort(rng.integers(0, 3, size=(2, 64)), axis=1).astype(np.int32)
    return [q, k, v, ct, seg]


def loss_and_grads(mesh, q, k, v, ct, seg):
    """Burst output and (dq, dk, dv) of ``sum(o * ct)`` (zigzag layout, causal, segments)."""
    def loss(q, k, v):
        o = burst_attention(q, k, v, mesh=mesh, schedule="burst", segment_ids=seg)
        return jnp.sum(o * ct), o

    grads, out = jax.grad(loss, argnums=(0, 1, 2), has_aux=True)(q, k, v)
    return (out, *grads)


def test_two_processes_equal_simulated_devices(tmp_path):
    out_path = tmp_path / "out.npz"
    run_two_processes(_CHILD, out_path, timeout=300)
    with np.load(out_path) as saved:
        distributed = [saved[f"arr_{i}"] for i in range(4)]

    mesh = Mesh(np.array(jax.devices()), ("sequence",), axis_types=(AxisType.Auto,))
    simulated = jax.jit(lambda *a: loss_and_grads(mesh, *a))(*inputs())
    for name, a, b in zip(("out", "dq", "dk", "dv"), distributed, simulated, strict=True):
        assert a.shape == b.shape
        np.testing.assert_allclose(a, np.asarray(b), atol=1e-5, rtol=1e-5, err_msg=name)
