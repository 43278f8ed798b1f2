"""APB across two real processes (jax.distributed on 127.0.0.1, gloo CPU collectives, 4 devices
each) gives the same outputs as the 8-simulated-device run in this process."""

from __future__ import annotations

import textwrap

import jax
import numpy as np
import pytest
from helpers import run_two_processes
from jax.sharding import AxisType, Mesh

from sharding.apb import apb_attention

pytestmark = pytest.mark.slow  # two real processes

SEQ, QUERY = 72, 6
KW = dict(anchor_len=8, passing_len=3, query_len=QUERY, query_offset=1, scorer="query")

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
    from test_apb_multiprocess import KW, inputs
    from sharding.apb import apb_attention

    assert jax.device_count() == 8 and jax.local_device_count() == 4
    mesh = Mesh(np.array(jax.devices()), ("sequence",), axis_types=(AxisType.Auto,))
    sharding = NamedSharding(mesh, PartitionSpec(None, "sequence"))
    arrays = [jax.make_array_from_callback(x.shape, sharding, lambda idx, x=x: x[idx])
              for x in inputs()]
    out = jax.jit(lambda q, k, v: apb_attention(q, k, v, mesh=mesh, **KW))(*arrays)
    out = multihost_utils.process_allgather(out, tiled=True)
    if pid == 0:
        np.save(out_path, np.asarray(out))
    jax.distributed.shutdown()
""")


def inputs() -> list[np.ndarray]:
    """Deterministic numpy inputs (identical in every process), seq divisible by 8 devices."""
    rng = np.random.default_rng(5)
    return [rng.normal(size=(2, SEQ, h, 8)).astype(np.float32) for h in (4, 2, 2)]


def test_two_processes_equal_simulated_devices(tmp_path):
    out_path = tmp_path / "out.npy"
    run_two_processes(_CHILD, out_path, timeout=240)
    distributed = np.load(out_path)

    mesh = Mesh(np.array(jax.devices()), ("sequence",), axis_types=(AxisType.Auto,))
    simulated = jax.jit(lambda q, k, v: apb_attention(q, k, v, mesh=mesh, **KW))(*inputs())
    assert distributed.shape == simulated.shape == (2, SEQ, 4, 8)
    np.testing.assert_allclose(distributed, np.asarray(simulated), atol=1e-5, rtol=1e-5)
