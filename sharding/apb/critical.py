"""One host alone: the per-host work of APB, Star and the ring as one-device functions, checked
against the distributed run, and the critical-path accounting of a per-host benchmark.

On simulated CPU devices the wall time of a distributed method is the *sum* of its hosts' work.
Running every host's work alone on one device, with exactly the shapes that host holds and
receives, gives the parallel critical path (the slowest host). The functions here build that
work from the library's own per-host entry points (no patching):

- APB / Star: :func:`sharding.apb.apb_host_attention` with the host index as a runtime int32
  argument and ``gather=`` a :class:`sharding.apb.OneHostGather` answering the ``all_gather``
  from the passing blocks the host received (:func:`apb_host_fn`);
- ring: :func:`sharding.burst.burst_forward_shard` with a :class:`sharding.burst.OneHostRing`
  holding the blocks that arrive (:func:`ring_host_fn`);
- full attention on one device (:func:`full_fn`).

:func:`check_one_host` runs every host alone and compares it with the distributed library call;
:func:`communication`, :func:`analytic_pairs` and :func:`summarise` are the accounting of
``scripts/bench_apb_critical.py`` (bytes per host, query-key pairs, slowest host per method).
Shapes default to MiniCPM-1B attention (24 query heads, 8 KV heads, head_dim 64, batch 1).
"""

from __future__ import annotations

import functools
import statistics
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from sharding.apb.compressor import resolve_scorer
from sharding.apb.kernel import (
    OneHostGather,
    apb_attention,
    apb_host_attention,
    apb_layer_attention,
    apb_local_attention,
    star_attention,
)
from sharding.apb.layout import APBLayout, make_apb_layout, make_method_layout
from sharding.burst import OneHostRing, burst_attention, burst_forward_shard
from sharding.errors import ShardingError
from sharding.layout import layout_indices

__all__ = [
    "AXIS",
    "HEADS",
    "HEAD_DIM",
    "KV_HEADS",
    "LABELS",
    "METHODS",
    "POOL_SIZE",
    "QUERY_LEN",
    "QUERY_OFFSET",
    "analytic_pairs",
    "apb_host_fn",
    "check_one_host",
    "communication",
    "critical_layout",
    "full_fn",
    "pick_time",
    "ring_host_fn",
    "summarise",
]

AXIS = "sequence"
HEADS, KV_HEADS, HEAD_DIM = 24, 8, 64  # MiniCPM-1B attention
QUERY_LEN, QUERY_OFFSET = 64, 1
POOL_SIZE = 5


def critical_layout(method: str, context: int, hosts: int, query_len: int = QUERY_LEN
                    ) -> APBLayout:
    """The layout of ``method`` (``"apb"``: the paper's defaults, the query embedded at offset
    :data:`QUERY_OFFSET`; ``"star"``) for ``context`` tokens plus the ``query_len``-token query:
    ``block_len = context / hosts``."""
    if method == "apb":
        return make_apb_layout(context + query_len, hosts=hosts, query_len=query_len,
                               query_offset=QUERY_OFFSET)
    return make_method_layout("star", context + query_len, hosts=hosts, query_len=query_len)


def apb_host_fn(layout: APBLayout, scorer: Any, impl: str = "blockwise",
                pool_size: int = POOL_SIZE) -> Callable[..., tuple[jax.Array, ...]]:
    """One host's APB/Star attention (:func:`sharding.apb.apb_host_attention`) as a one-device
    function.

    ``fn(q [b, A+B, hq, d], k [b, A+B, hkv, d], v, host, *received)`` with ``host`` the host
    index (int32 scalar, a runtime value as ``axis_index`` is under ``shard_map``) and
    ``received`` (only when something is passed) the passing keys and values of the other
    hosts, ``[hosts - 1, b, passing_len, hkv, d]`` each. ``scorer``: as resolved by
    :func:`sharding.apb.resolve_scorer` (None when nothing is passed). Returns ``(out [b, A+B,
    hq, d], *sent)``: the host's rows of ``apb_layer_attention`` and the passing keys and
    values it sends ``[b, passing_len, hkv, d]`` (none for Star)."""

    def fn(q, k, v, host, *received):
        gather = OneHostGather(host, list(received))
        out = apb_host_attention(q, k, v, layout=layout, axis=AXIS, scorer=scorer,
                                 sm_scale=q.shape[-1] ** -0.5, impl=impl, pool_size=pool_size,
                                 host=host, gather=gather)
        return (out, *gather.sent)

    return fn


def ring_host_fn(layout: str, hosts: int, impl: str = "auto"
                 ) -> Callable[..., tuple[jax.Array, jax.Array]]:
    """One host's forward of :func:`sharding.burst.burst_attention` (causal): the library's
    :func:`~sharding.burst.burst_forward_shard` with a :class:`~sharding.burst.OneHostRing`.

    ``fn(q [b, L, hq, d], k [b, L, hkv, d], v, received_k [hosts - 1, b, L, hkv, d],
    received_v, me)``: ``received_*[t - 1]`` is the block that arrives at ring step ``t`` (the
    block of rank ``(me - t) % hosts``), ``me`` the host's rank (int32). Returns ``(o [b, L, hq,
    d], lse [b, hq, L])``."""

    def fn(q, k, v, received_k, received_v, me):
        ring = OneHostRing(me, hosts, (received_k, received_v, None))
        return burst_forward_shard(q, k, v, None, ring=ring, causal=True, layout=layout,
                                   impl=impl)

    return fn


def full_fn(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    """Full causal attention on one device (the local attention APB's hosts use):
    ``[b, s, hq, d] x [b, s, hkv, d] x [b, s, hkv, dv] -> [b, s, hq, dv]``."""
    attend = apb_local_attention("blockwise")
    return attend(q, k, v, causal=True, segment_ids=None, sm_scale=q.shape[-1] ** -0.5)[0]


def _normal(key: jax.Array, shape: tuple[int, ...], dtype: Any) -> jax.Array:
    return jax.random.normal(key, shape, jnp.float32).astype(dtype)


def check_one_host(hosts: int = 8, block: int = 512, query_len: int = QUERY_LEN,
                   dtype: Any = jnp.float32, atol: float = 2e-5) -> dict[str, float]:
    """Run every host alone at a small size and compare with the distributed library call on
    ``hosts`` devices: APB / Star hosts (:func:`apb_host_fn`) against their rows of
    ``apb_layer_attention`` (anchor and local rows) and of ``apb_attention`` /
    ``star_attention`` (local rows), ring hosts (:func:`ring_host_fn`) against their block of
    ``burst_attention``. Returns the max abs error per method (``"apb"``, ``"star"``,
    ``"ring_contiguous"``, ``"ring_zigzag"``); raises ``AssertionError`` on a mismatch beyond
    ``atol`` and ``ShardingError`` when fewer than ``hosts`` devices exist."""
    if len(jax.devices()) < hosts:
        raise ShardingError(f"the check needs {hosts} devices, have {len(jax.devices())}")
    mesh = Mesh(np.array(jax.devices()[:hosts]), (AXIS,), axis_types=(AxisType.Auto,))
    seq_sharding = NamedSharding(mesh, PartitionSpec(None, AXIS))
    context = hosts * block
    kq, kk, kv = jax.random.split(jax.random.PRNGKey(0), 3)
    seq = context + query_len
    q = _normal(kq, (1, seq, HEADS, HEAD_DIM), dtype)
    k = _normal(kk, (1, seq, KV_HEADS, HEAD_DIM), dtype)
    v = _normal(kv, (1, seq, KV_HEADS, HEAD_DIM), dtype)
    errors: dict[str, float] = {}

    for method in ("apb", "star"):
        lay = critical_layout(method, context, hosts, query_len)
        assert lay.block_len == block, (lay.block_len, block)
        scorer = resolve_scorer("query" if method == "apb" else None, None, lay)
        idx = np.maximum(lay.source_index(), 0)
        qe, ke, ve = (jax.device_put(x[:, idx], seq_sharding) for x in (q, k, v))
        expanded = jax.jit(functools.partial(
            apb_layer_attention, mesh=mesh, layout=lay, axis=AXIS))(qe, ke, ve)
        attention = apb_attention if method == "apb" else star_attention
        kwargs = dict(query_offset=QUERY_OFFSET) if method == "apb" else {}
        natural = jax.jit(functools.partial(attention, mesh=mesh, axis=AXIS,
                                            query_len=query_len, **kwargs))(q, k, v)
        n = lay.host_len
        host_fn = jax.jit(apb_host_fn(lay, scorer))
        per_host = [(qe[:, h * n:(h + 1) * n], ke[:, h * n:(h + 1) * n],
                     ve[:, h * n:(h + 1) * n], jnp.int32(h)) for h in range(hosts)]
        received: list[Any] = [()] * hosts
        if scorer is not None:  # what each host sends does not depend on what it receives
            shape = (hosts - 1, 1, lay.passing_len, KV_HEADS, HEAD_DIM)
            zeros = (jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))
            sent = [host_fn(*per_host[h], *zeros)[1:] for h in range(hosts)]
            received = [tuple(jnp.stack([sent[o][i] for o in range(hosts) if o != h])
                              for i in range(2)) for h in range(hosts)]
        err = 0.0
        for h in range(hosts):
            out = host_fn(*per_host[h], *received[h])[0]
            want = expanded[:, h * n:(h + 1) * n]
            np.testing.assert_allclose(out, want, atol=atol, rtol=1e-5,
                                       err_msg=f"{method} host {h} vs apb_layer_attention")
            np.testing.assert_allclose(out[:, lay.anchor_len:], natural[:, h * block:
                                       (h + 1) * block], atol=atol, rtol=1e-5,
                                       err_msg=f"{method} host {h} vs {attention.__name__}")
            err = max(err, float(jnp.max(jnp.abs(out - want))))
        errors[method] = err

    fn = jax.jit(ring_host_fn("contiguous", hosts)), jax.jit(ring_host_fn("zigzag", hosts))
    for layout, ring_fn in zip(("contiguous", "zigzag"), fn, strict=True):
        perm = layout_indices(context, hosts, layout)
        ql, kl, vl = (x[:, :context][:, perm] for x in (q, k, v))
        want = jax.jit(functools.partial(burst_attention, mesh=mesh, axis=AXIS,
                                         causal=True, layout=layout))(ql, kl, vl)
        blocks = [(kl[:, r * block:(r + 1) * block], vl[:, r * block:(r + 1) * block])
                  for r in range(hosts)]
        err = 0.0
        for r in range(hosts):
            arriving = [blocks[(r - t) % hosts] for t in range(1, hosts)]
            rk = jnp.stack([b[0] for b in arriving])
            rv = jnp.stack([b[1] for b in arriving])
            out = ring_fn(ql[:, r * block:(r + 1) * block], *blocks[r], rk, rv, jnp.int32(r))[0]
            expect = want[:, r * block:(r + 1) * block]
            np.testing.assert_allclose(out, expect, atol=atol, rtol=1e-5,
                                       err_msg=f"ring {layout} host {r} vs burst_attention")
            err = max(err, float(jnp.max(jnp.abs(out - expect))))
        errors[f"ring_{layout}"] = err
    return errors


def communication(context: int, hosts: int, itemsize: int,
                  bandwidths_gb_s: tuple[float, ...] = (900.0, 100.0)) -> dict[str, Any]:
    """Analytic bytes one host sends and receives per layer for each method, and the time at
    ``bandwidths_gb_s`` (one link per host, no overlap with compute, latency ignored)."""
    apb = critical_layout("apb", context, hosts)
    kv_token = KV_HEADS * 2 * HEAD_DIM * itemsize  # one token's key + value
    passing_block = apb.passing_len * kv_token
    ring_block = (context // hosts) * kv_token
    # query tail (Star's phase 2, APB and Star alike): the partial outputs and the softmax
    # weights of the query rows are summed over hosts (two all-reduces, float32)
    tail = QUERY_LEN * HEADS * (HEAD_DIM + 1) * 4
    tail_all_reduce = int(2 * (hosts - 1) / hosts * tail)
    rows = {
        "apb": {"what": f"all_gather of the passing blocks (keys+values, {apb.passing_len} "
                        f"tokens x {KV_HEADS} kv heads each): every host receives {hosts - 1} "
                        "blocks (ring all-gather: sends as many)",
                "bytes": (hosts - 1) * passing_block},
        "star": {"what": "nothing per layer for the context (the anchor's token ids are part "
                         "of every host's input, once; its keys/values are computed on each "
                         "host)",
                 "bytes": 0},
        "ring_contiguous": {"what": f"{hosts - 1} ring steps, each moving one key+value block "
                                    f"of {context // hosts} tokens", "bytes": (hosts - 1) *
                            ring_block},
        "ring_zigzag": {"what": "as contiguous (same blocks, other token order)",
                        "bytes": (hosts - 1) * ring_block},
    }
    for name, row in rows.items():
        if name in ("apb", "star"):
            row["query_tail_bytes"] = tail_all_reduce
        total = row["bytes"] + row.get("query_tail_bytes", 0)
        row["seconds"] = {f"{bw:g}GB/s": total / (bw * 1e9) for bw in bandwidths_gb_s}
    return {"itemsize": itemsize, "passing_block_bytes": passing_block,
            "ring_block_bytes": ring_block, "methods": rows,
            "note": "analytic: bytes / bandwidth, one link per host, latency ignored, no "
                    "overlap with compute assumed"}


METHODS = ("apb", "star", "ring_contiguous", "ring_zigzag")
LABELS = {"apb": "APB", "star": "Star", "ring_contiguous": "Ring (contiguous)",
          "ring_zigzag": "Ring (zigzag)", "full": "Full (1 device)"}


def analytic_pairs(method: str, context: int, hosts: int, host: int) -> float:
    """Query-key pairs one host scores per query head (causal blocks skipped; the masked halves
    of diagonal blocks and the compressor's ``query_len x B`` scores not counted)."""
    block = context // hosts
    if method == "full":
        return context**2 / 2
    if method == "ring_contiguous":
        return block**2 / 2 + host * block**2
    if method == "ring_zigzag":
        return block**2 / 2 + (hosts - 1) * block**2 / 2
    lay = critical_layout(method, context, hosts)
    a, passing = lay.anchor_len, lay.passing_len
    remote = (a if host > 0 else 0) + host * passing
    anchor = a**2 / 2 if (method == "apb" or host > 0) else 0.0
    return block**2 / 2 + block * remote + anchor


def pick_time(t: dict[str, Any], basis: str) -> float | None:
    """A function's time on ``basis``: ``"median"`` of its rounds or its ``"first"`` round."""
    if not t.get("times"):
        return None
    return statistics.median(t["times"]) if basis == "median" else t["times"][0]


def summarise(result: dict[str, Any]) -> None:
    """Add ``critical_path`` and ``ratios`` (method time / APB time) to ``result`` from its
    ``timings`` (what has been measured so far), on ``result["basis"]``: ``"median"`` of every
    function's rounds, or its ``"first"`` round (when every method ran once back to back and
    later rounds ran under other load). Also ``paired_rounds``: APB's and Star's last hosts
    round by round (they run next to each other in every round)."""
    timings, seq, hosts = result["timings"], result["context_tokens"], result["hosts"]
    basis = result.setdefault("basis", "median")
    critical: dict[str, dict[str, Any]] = {}
    for method in METHODS:
        rows = {n.split("/")[1]: pick_time(t, basis) for n, t in timings.items()
                if n.startswith(method + "/") and t.get("times")}
        if rows:
            slowest = max(rows, key=rows.get)
            critical[method] = {"attention_s": rows[slowest], "host": slowest, "hosts": rows}
    fit = [(int(n.split("/")[1]), pick_time(t, basis)) for n, t in timings.items()
           if n.startswith("full/") and t.get("times")]
    if fit:
        c = float(np.mean([t / s**2 for s, t in fit]))
        measured = dict(fit).get(seq)
        critical["full"] = {
            "attention_s": measured if measured is not None else c * seq**2,
            "host": "one device", "measured": measured is not None,
            "extrapolated_from": {str(s): t for s, t in fit}, "c_seconds_per_token2": c}
    pairs = []
    apb_t = timings.get(f"apb/{critical.get('apb', {}).get('host')}", {})
    star_t = timings.get(f"star/{critical.get('star', {}).get('host')}", {})
    rounds = min(len(apb_t.get("times", [])), len(star_t.get("times", [])))
    for i, (aw, sw) in enumerate(zip(apb_t.get("times", [])[:rounds],
                                     star_t.get("times", [])[:rounds], strict=True)):
        ac, sc = apb_t["cpu_times"][i], star_t["cpu_times"][i]
        pairs.append({"round": i + 1, "apb_s": aw, "star_s": sw, "apb_cpu_s": ac,
                      "star_cpu_s": sc, "star_over_apb": sw / aw, "star_over_apb_cpu": sc / ac})
    result["paired_rounds"] = pairs
    rows_of = result.get("tokenwise_rows", {})
    for method, row in critical.items():
        if method == "full":  # token-wise work is linear in rows: the ring host's x hosts
            n_rows, scale = seq // hosts, hosts
        else:
            n_rows, scale = rows_of.get(method, {}).get("rows"), 1
        t = timings.get(f"tokenwise/{n_rows}", {})
        if t.get("times"):
            row["tokenwise_s"] = pick_time(t, basis) * scale
            row["tokenwise_rows"] = n_rows * scale
            row["layer_s"] = row["attention_s"] + row["tokenwise_s"]
    for method, row in critical.items():
        host = int(row["host"].removeprefix("host")) if method != "full" else 0
        row["analytic_pairs"] = analytic_pairs(method, seq, hosts, host)
    result["critical_path"] = critical
    if "apb" in critical:
        result["ratios_analytic_pairs"] = {
            m: r["analytic_pairs"] / critical["apb"]["analytic_pairs"] for m, r in critical.items()}
        base = critical["apb"]
        result["ratios_attention"] = {m: r["attention_s"] / base["attention_s"]
                                      for m, r in critical.items()}
        if "layer_s" in base:
            result["ratios_layer"] = {m: r["layer_s"] / base["layer_s"]
                                      for m, r in critical.items() if "layer_s" in r}


