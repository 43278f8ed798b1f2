"""sharding.apb.critical: every host's work run alone on one device (the library's public
per-host entry points, no patching) equals that host's slice of the distributed run exactly,
and the critical-path summary picks the slowest host."""

import jax.numpy as jnp
import pytest

from sharding.apb import critical


@pytest.mark.slow
def test_one_host_functions_equal_the_distributed_library_exactly():
    """Each host alone (APB, Star via apb_host_attention; ring contiguous/zigzag via
    burst_forward_shard with a OneHostRing) equals its slice of apb_layer_attention /
    apb_attention / star_attention / burst_attention on 4 simulated devices: max error 0."""
    errors = critical.check_one_host(hosts=4, block=256, query_len=16, dtype=jnp.float32)
    assert set(errors) == {"apb", "star", "ring_contiguous", "ring_zigzag"}
    assert errors == {name: 0.0 for name in errors}, errors


def test_summary_takes_slowest_host_and_extrapolates_full():
    medians = {
        "apb/host0": 1.0, "apb/host7": 2.0, "star/host0": 0.5, "star/host7": 3.0,
        "ring_contiguous/host7": 8.0, "ring_zigzag/host7": 4.0, "full/1000": 1.0,
        "full/2000": 4.4, "tokenwise/1000": 0.5, "tokenwise/1250": 0.6, "tokenwise/2000": 1.0,
    }
    # three rounds around each median; the first round of apb/host7 is slow (other load)
    timings = {n: {"times": [t * 0.9, t, t * 1.1], "cpu_times": [t, t, t]}
               for n, t in medians.items()}
    timings["apb/host7"]["times"] = [5.0, 2.0, 1.9]
    result = {"timings": timings, "context_tokens": 8000, "hosts": 8,
              "tokenwise_rows": {"apb": {"rows": 1250}, "star": {"rows": 2000},
                                 "ring_contiguous": {"rows": 1000},
                                 "ring_zigzag": {"rows": 1000}}}
    critical.summarise(result)
    crit = result["critical_path"]
    assert crit["apb"]["host"] == "host7" and crit["apb"]["attention_s"] == 2.0
    assert crit["star"]["attention_s"] == 3.0
    c = (1.0 / 1000**2 + 4.4 / 2000**2) / 2
    assert crit["full"]["attention_s"] == pytest.approx(c * 8000**2)
    assert crit["full"]["tokenwise_s"] == pytest.approx(0.5 * 8)
    assert result["ratios_attention"]["ring_contiguous"] == pytest.approx(4.0)
    assert result["ratios_layer"]["star"] == pytest.approx(4.0 / 2.6)
    assert [p["star_over_apb"] for p in result["paired_rounds"]] == pytest.approx(
        [2.7 / 5.0, 3.0 / 2.0, 3.3 / 1.9])
    result["basis"] = "first"  # the first round of every function instead of the medians
    critical.summarise(result)
    assert result["critical_path"]["apb"]["attention_s"] == 5.0
    assert result["critical_path"]["star"]["attention_s"] == pytest.approx(2.7)


def test_communication_apb_moves_an_eighth_of_the_ring():
    com = critical.communication(131072, 8, itemsize=2)
    methods = com["methods"]
    # passing = B/8 tokens per block, 7 blocks each; ring: 7 whole blocks
    assert methods["ring_contiguous"]["bytes"] == 7 * 16384 * 8 * 128 * 2
    assert methods["apb"]["bytes"] * 8 == methods["ring_contiguous"]["bytes"]
    assert methods["star"]["bytes"] == 0
