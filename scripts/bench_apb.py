"""Benchmark: APB vs Star Attention vs ring attention vs full attention for long-context prefill.

Measured side by side in one run on 8 simulated CPU devices (one mesh axis ``sequence``):

1. Per-device attention FLOPs from ``compiled.cost_analysis()`` of one attention layer with a
   MiniCPM-1B attention shape (24 query heads, 8 KV heads, head_dim 64, batch 1) at 32k / 64k /
   128k tokens (compile only; the materialised-score local attention is used so that XLA counts
   every matmul; loops would be counted once). Full attention is one device doing everything.
2. Wall time (median of repeats) of one attention layer at a length this CPU runs in seconds
   (default 16k tokens, 8 query heads / 2 KV heads, head_dim 64, float32, O(seq)-memory
   blockwise local attention). On simulated devices the 8 "hosts" share the machine's cores,
   so a distributed method's wall time is the *sum* of its per-device work: the ratios between
   APB, Star and ring equal their per-device ratios; full attention runs once on one device.

APB defaults follow the paper on 8 hosts: ``anchor_len = block/4``, ``passing_len = block/8``,
query-aware compressor, a 64-token query. Star: anchor = one block. Ring: every host sees every
block (one ``ppermute`` per step; ``sharding.burst`` when present, else the ring below).

Usage: ``python scripts/bench_apb.py [--wall-seq 16384] [--repeats 3] [--flops-seqs 32768,...]``
Writes ``docs/benchmarks/apb.json``.
"""

from __future__ import annotations

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()

import argparse  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax import lax  # noqa: E402
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec  # noqa: E402

from sharding.apb import (  # noqa: E402
    _local_attention,
    _segments,
    apb_layer_attention,
    make_apb_layout,
    merge_partials,
)

AXIS = "sequence"


def ring_attention(q, k, v, *, mesh, impl):
    """Exact causal ring attention (baseline): KV blocks travel around the ring with ppermute;
    every host attends to every block (future blocks masked), partials merged by LSE."""
    hosts = mesh.shape[AXIS]
    attend = _local_attention(impl)
    scale = q.shape[-1] ** -0.5

    def shard(q, k, v):
        host = lax.axis_index(AXIS)
        blk = q.shape[1]
        parts = [attend(q, k, v, causal=True, segment_ids=None, sm_scale=scale)]
        kk, vv = k, v
        perm = [(i, (i + 1) % hosts) for i in range(hosts)]
        for step in range(1, hosts):
            kk, vv = lax.ppermute(kk, AXIS, perm), lax.ppermute(vv, AXIS, perm)
            keep = jnp.broadcast_to((host - step) % hosts < host, (blk,))
            parts.append(attend(q, kk, vv, causal=False,
                                segment_ids=_segments(q.shape[0], blk, keep), sm_scale=scale))
        return merge_partials(parts)[0]

    spec = PartitionSpec(None, AXIS)
    return jax.shard_map(shard, mesh=mesh, in_specs=(spec,) * 3, out_specs=spec,
                         check_vma=False)(q, k, v)


def _ring(impl):
    try:  # the library's BurstAttention ring when it exists
        from sharding.burst import burst_attention  # type: ignore[import-not-found]

        return "sharding.burst", lambda q, k, v, mesh: burst_attention(q, k, v, mesh=mesh,
                                                                        causal=True)
    except ImportError:
        return "bench ring", lambda q, k, v, mesh: ring_attention(q, k, v, mesh=mesh, impl=impl)


def methods(seq: int, mesh: Mesh, impl: str, query_len: int, use_burst: bool):
    """name -> (fn(q, k, v), input seq len, mesh or None for one device)."""
    hosts = mesh.shape[AXIS]
    probe = make_apb_layout(seq, hosts=hosts, anchor_len=0, passing_len=0)
    query_len = min(query_len, probe.block_len // 8)  # must fit in the anchor
    apb = make_apb_layout(seq, hosts=hosts, query_len=query_len, query_offset=1)
    star = make_apb_layout(seq, hosts=hosts, anchor_len=probe.block_len, passing_len=0,
                           embed_query=False)
    ring_name, ring = _ring(impl) if use_burst else ("bench ring", None)
    if ring is None:
        ring = lambda q, k, v, mesh: ring_attention(q, k, v, mesh=mesh, impl=impl)  # noqa: E731
    one = jax.devices()[0]
    single = Mesh(np.array([one]), (AXIS,), axis_types=(AxisType.Auto,))
    attend = _local_attention(impl)
    return {
        "apb": (lambda q, k, v: apb_layer_attention(q, k, v, mesh=mesh, layout=apb, axis=AXIS,
                                                    attention_impl=impl), apb.expanded_len, mesh,
                dict(anchor_len=apb.anchor_len, passing_len=apb.passing_len,
                     block_len=apb.block_len, query_len=query_len)),
        "star": (lambda q, k, v: apb_layer_attention(q, k, v, mesh=mesh, layout=star, axis=AXIS,
                                                     attention_impl=impl), star.expanded_len,
                 mesh, dict(anchor_len=star.anchor_len, block_len=star.block_len)),
        "ring": (lambda q, k, v: ring(q, k, v, mesh), seq, mesh, dict(impl=ring_name)),
        "full": (lambda q, k, v: attend(q, k, v, causal=True, segment_ids=None,
                                        sm_scale=q.shape[-1] ** -0.5)[0], seq, single, {}),
    }


def _structs(rows, heads, kv_heads, dim, dtype, mesh):
    sharding = NamedSharding(mesh, PartitionSpec(None, AXIS))
    return [jax.ShapeDtypeStruct((1, rows, h, dim), dtype, sharding=sharding)
            for h in (heads, kv_heads, kv_heads)]


def flops_table(seqs, mesh, heads=24, kv_heads=8, dim=64, query_len=64):
    rows = []
    full_base: dict[int, float] = {}
    for seq in seqs:
        entry = {"seq": seq}
        for name, (fn, n, m, info) in methods(seq, mesh, "reference", query_len, False).items():
            if name == "full" and seq > 16384:
                # exactly quadratic in seq: scale the 16k count (compiling a 128k x 128k score
                # matrix is pointless)
                if 16384 not in full_base:
                    full_base[16384] = _cost(fn, 16384, heads, kv_heads, dim, m)
                entry[name] = full_base[16384] * (seq / 16384) ** 2
                entry["full_note"] = "scaled from 16k (attention FLOPs are exactly quadratic)"
                continue
            entry[name] = _cost(fn, n, heads, kv_heads, dim, m)
            entry[f"{name}_info"] = info
        rows.append(entry)
        print(f"flops seq={seq}: " + ", ".join(
            f"{k}={entry[k]:.3e}" for k in ("apb", "star", "ring", "full")), flush=True)
    return rows


def _cost(fn, rows, heads, kv_heads, dim, mesh):
    compiled = jax.jit(fn).lower(*_structs(rows, heads, kv_heads, dim, jnp.bfloat16,
                                           mesh)).compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    return float(cost["flops"])


def wall_table(seq, mesh, repeats, heads=8, kv_heads=2, dim=64, query_len=64, use_burst=True):
    out = {"seq": seq, "heads": heads, "kv_heads": kv_heads, "head_dim": dim}
    key = jax.random.PRNGKey(0)
    for name, (fn, n, m, info) in methods(seq, mesh, "blockwise", query_len, use_burst).items():
        sharding = NamedSharding(m, PartitionSpec(None, AXIS))
        args = [jax.device_put(jax.random.normal(kk, (1, n, h, dim), jnp.float32), sharding)
                for kk, h in zip(jax.random.split(key, 3), (heads, kv_heads, kv_heads),
                                 strict=True)]
        t0 = time.perf_counter()
        compiled = jax.jit(fn).lower(*args).compile()
        compile_s = time.perf_counter() - t0
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            jax.block_until_ready(compiled(*args))
            times.append(time.perf_counter() - t0)
        out[name] = statistics.median(times)
        out[f"{name}_compile_s"] = compile_s
        out[f"{name}_info"] = info
        print(f"wall seq={seq} {name}: median {out[name]:.3f}s over {repeats} "
              f"(compile {compile_s:.1f}s)", flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--flops-seqs", default="32768,65536,131072")
    parser.add_argument("--wall-seq", type=int, default=16384)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default="docs/benchmarks/apb.json")
    args = parser.parse_args()
    mesh = Mesh(np.array(jax.devices()[:8]), (AXIS,), axis_types=(AxisType.Auto,))
    seqs = [int(s) for s in args.flops_seqs.split(",") if s]
    flops = flops_table(seqs, mesh)
    wall = wall_table(args.wall_seq, mesh, args.repeats)

    print("\nper-device attention FLOPs (cost_analysis; MiniCPM-1B attention: 24 q / 8 kv heads,"
          " head_dim 64, batch 1)")
    print(f"{'seq':>8} {'ring/apb':>9} {'star/apb':>9} {'full/apb':>9}")
    for r in flops:
        print(f"{r['seq']:>8} {r['ring'] / r['apb']:>9.2f} {r['star'] / r['apb']:>9.2f} "
              f"{r['full'] / r['apb']:>9.2f}")
    print(f"\nwall time, seq {wall['seq']} (median of {args.repeats}; simulated devices share "
          "the CPU cores)")
    print(f"{'ring/apb':>9} {'star/apb':>9} {'full/apb':>9}")
    print(f"{wall['ring'] / wall['apb']:>9.2f} {wall['star'] / wall['apb']:>9.2f} "
          f"{wall['full'] / wall['apb']:>9.2f}")
    result = {
        "device": f"{jax.devices()[0].platform} x{len(jax.devices())} simulated, "
                  f"{os.cpu_count()} cores",
        "flops": flops, "wall": wall,
        "ratios_flops": [{"seq": r["seq"], "ring_over_apb": r["ring"] / r["apb"],
                          "star_over_apb": r["star"] / r["apb"],
                          "full_over_apb": r["full"] / r["apb"]} for r in flops],
        "ratios_wall": {"seq": wall["seq"], "ring_over_apb": wall["ring"] / wall["apb"],
                        "star_over_apb": wall["star"] / wall["apb"],
                        "full_over_apb": wall["full"] / wall["apb"]},
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
