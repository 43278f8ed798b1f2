"""Benchmark: BurstAttention vs RingAttention vs all-gather on 8 simulated CPU devices.

For each sequence length and implementation, compiles the forward and the forward+backward
(``grad`` of ``sum(o * ct)`` w.r.t. q, k, v; causal, zigzag layout) and reports, per device:

- collective bytes sent, counted from the compiled HLO (``collective_bytes_from_hlo``: loop
  bodies times their trip counts), next to the volume model (``communication_bytes``);
- dot FLOPs from the compiled HLO, weighted the same way (XLA's ``cost_analysis`` counts a
  ``while`` body once, so its raw number is also stored but is not comparable across impls;
  loops whose trip count is only known at run time, like the causal diagonal blocks of the
  blockwise kernel, count once too, so all-gather's HLO FLOPs are a lower bound), next to the
  analytic causal count;
- memory from ``compiled.memory_analysis()`` (temporaries + arguments + outputs);
- wall time (median of ``--repeats`` runs) for the lengths in ``--time-lengths``.

``--wall`` measures wall time alone, burst vs ring vs all-gather round robin, for a
multi-head (4 heads) and a grouped-query (4 query heads, 1 kv head) config: the forward at every
``--lengths`` and forward+backward at ``--fwd-bwd-lengths``; it adds a ``"wall"`` entry to the
JSON and keeps the rest.

The 8 "devices" share this machine's CPU cores, so wall time measures the compute schedule and
memory traffic, not a network; the bytes are what a real ring would move.

    python scripts/bench_burst.py                       # defaults below, a few minutes
    python scripts/bench_burst.py --lengths 8192 --time-lengths 8192 --repeats 1
    python scripts/bench_burst.py --wall                # wall time 8k-64k, MHA and GQA

Writes docs/benchmarks/burst.json.
"""

from __future__ import annotations

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import argparse  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cpmjax.report import write_json  # noqa: E402
from cpmjax.timing import median_seconds  # noqa: E402
from sharding.burst import (  # noqa: E402
    burst_attention,
    choose_schedule,
    collective_bytes_from_hlo,
    communication_bytes,
    hlo_computation_weights,
)

_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%([\w.\-]+)\s*=\s*(\w+)\[([0-9,]*)\]")


def dot_flops_from_hlo(hlo_text: str) -> float:
    """2 * (result elements) * (contracted size) summed over dots, weighted by how often each
    computation runs (loop trip counts)."""
    computations, weights = hlo_computation_weights(hlo_text)
    shapes: dict[str, list[int]] = {}
    for lines in computations.values():
        for line in lines:
            m = _INSTR.match(line)
            if m:
                shapes[m.group(1)] = [int(d) for d in m.group(3).split(",") if d]
    total = 0.0
    for name, lines in computations.items():
        weight = weights.get(name, 0.0)
        if not weight:
            continue
        for line in lines:
            if " dot(" not in line:
                continue
            m = _INSTR.match(line)
            lhs = re.search(r" dot\(%([\w.\-]+)", line)
            contract = re.search(r"lhs_contracting_dims=\{([0-9,]*)\}", line)
            if not (m and lhs and contract) or lhs.group(1) not in shapes:
                continue
            out = np.prod([int(d) for d in m.group(3).split(",") if d] or [1])
            lhs_shape = shapes[lhs.group(1)]
            k = np.prod([lhs_shape[int(i)] for i in contract.group(1).split(",") if i] or [1])
            total += weight * 2.0 * float(out) * float(k)
    return total


def memory_bytes(compiled) -> int:
    mem = compiled.memory_analysis()
    if mem is None:
        return -1
    return int(mem.temp_size_in_bytes + mem.argument_size_in_bytes + mem.output_size_in_bytes)


def bench_case(mesh, seq, q_heads, kv_heads, dim, impl, timed, repeats):
    shapes = [(1, seq, q_heads, dim), (1, seq, kv_heads, dim), (1, seq, kv_heads, dim),
              (1, seq, q_heads, dim)]
    sharding = NamedSharding(mesh, PartitionSpec(None, "sequence"))
    rng = np.random.default_rng(0)
    arrays = [jax.device_put(rng.normal(size=s).astype(np.float32), sharding) for s in shapes]

    def forward(q, k, v, ct):
        return burst_attention(q, k, v, mesh=mesh, schedule=impl)

    def forward_backward(q, k, v, ct):
        return jax.grad(lambda q, k, v: jnp.sum(forward(q, k, v, ct) * ct),
                        argnums=(0, 1, 2))(q, k, v)

    row = {"seq": seq, "impl": impl, "q_heads": q_heads, "kv_heads": kv_heads, "dim": dim}
    # causal attention math per device, block granularity ignored: QK^T and PV forward; the
    # backward recomputes QK^T and does dV, dP, dQ, dK (5 matmuls)
    pairs = seq * seq / 2 / 8
    row["analytic_fwd_flops"] = pairs * q_heads * 2 * 2 * dim
    row["analytic_fwd_bwd_flops"] = pairs * q_heads * 7 * 2 * dim
    for label, fn in (("fwd", forward), ("fwd_bwd", forward_backward)):
        jitted = jax.jit(fn)
        compiled = jitted.lower(*arrays).compile()
        text = compiled.as_text()
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, list) else cost
        row[f"{label}_bytes"] = collective_bytes_from_hlo(text)["total"]
        row[f"{label}_flops"] = dot_flops_from_hlo(text)
        row[f"{label}_xla_cost_flops"] = float((cost or {}).get("flops", -1.0))
        row[f"{label}_memory"] = memory_bytes(compiled)
        if timed:
            row[f"{label}_seconds"] = median_seconds(compiled, *arrays, repeats=repeats)
    if impl in ("burst", "ring", "allgather"):
        model = communication_bytes(impl, batch=1, seq_len=seq, q_heads=q_heads,
                                    kv_heads=kv_heads, qk_dim=dim, v_dim=dim, num_shards=8)
        row["model_fwd_bytes"] = model["forward"]
        row["model_fwd_bwd_bytes"] = model["total"]
    return row


WALL_CONFIGS = {"mha": (4, 4), "gqa": (4, 1)}  # name: (q_heads, kv_heads)
WALL_IMPLS = ("burst", "ring", "allgather")


def wall_times(mesh, seq, q_heads, kv_heads, dim, label, repeats, warmup=True):
    """Median wall seconds of ``label`` ("fwd" or "fwd_bwd") for each impl, measured side by
    side: after one warm-up call each (``warmup``), the impls run in turn ``repeats`` times
    (round robin), so a load change on the shared machine hits all of them alike."""
    shapes = [(1, seq, q_heads, dim), (1, seq, kv_heads, dim), (1, seq, kv_heads, dim),
              (1, seq, q_heads, dim)]
    sharding = NamedSharding(mesh, PartitionSpec(None, "sequence"))
    rng = np.random.default_rng(0)
    arrays = [jax.device_put(rng.normal(size=s).astype(np.float32), sharding) for s in shapes]
    compiled = {}
    for impl in WALL_IMPLS:
        def forward(q, k, v, ct, impl=impl):
            return burst_attention(q, k, v, mesh=mesh, schedule=impl)

        def forward_backward(q, k, v, ct, forward=forward):
            return jax.grad(lambda q, k, v: jnp.sum(forward(q, k, v, ct) * ct),
                            argnums=(0, 1, 2))(q, k, v)

        fn = forward if label == "fwd" else forward_backward
        compiled[impl] = jax.jit(fn).lower(*arrays).compile()
        if warmup:
            jax.block_until_ready(compiled[impl](*arrays))
    times: dict[str, list[float]] = {impl: [] for impl in WALL_IMPLS}
    for _ in range(repeats):
        for impl in WALL_IMPLS:
            start = time.perf_counter()
            jax.block_until_ready(compiled[impl](*arrays))
            times[impl].append(time.perf_counter() - start)
    return {impl: statistics.median(t) for impl, t in times.items()}, times


def wall_main(args) -> None:
    """``--wall``: wall time only, written under the ``"wall"`` key of the JSON (the byte,
    FLOP and memory rows already there are kept, and so are wall rows of other cases)."""
    mesh = Mesh(np.array(jax.devices()), ("sequence",), axis_types=(AxisType.Auto,))
    out_path = Path(args.out)
    data = json.loads(out_path.read_text()) if out_path.exists() else {}
    wall = {"setup": {"devices": 8, "batch": 1, "dim": args.dim, "dtype": "float32",
                      "causal": True, "layout": "zigzag", "repeats": args.repeats,
                      "warmup_max_len": args.warmup_max_len,
                      "configs": {k: list(v) for k, v in WALL_CONFIGS.items()},
                      "cpu_count": os.cpu_count(), "platform": jax.default_backend()},
            "rows": list(data.get("wall", {}).get("rows", []))}
    print(f"wall time, 8 simulated CPU devices on {os.cpu_count()} cores, batch 1, dim "
          f"{args.dim}, float32, causal, zigzag; median of {args.repeats} (round robin)")
    print(f"{'config':>6} {'seq':>6} {'pass':>7} | {'burst s':>8} {'ring s':>8} "
          f"{'allgath s':>9} | {'burst/ring':>10} {'load':>5}")
    for name in args.wall_configs:
        q_heads, kv_heads = WALL_CONFIGS[name]
        for seq in args.lengths:
            labels = ["fwd"] + (["fwd_bwd"] if seq in args.fwd_bwd_lengths else [])
            for label in labels:
                medians, raw = wall_times(mesh, seq, q_heads, kv_heads, args.dim, label,
                                          args.repeats, warmup=seq <= args.warmup_max_len)
                load = os.getloadavg()[0]
                row = {"config": name, "q_heads": q_heads, "kv_heads": kv_heads, "seq": seq,
                       "pass": label, "repeats": args.repeats,
                       "warmup": seq <= args.warmup_max_len, "seconds": medians,
                       "all_seconds": raw,
                       "burst_over_ring": medians["burst"] / medians["ring"],
                       "load_average": load}
                wall["rows"] = [r for r in wall["rows"]
                                if (r["config"], r["seq"], r["pass"]) != (name, seq, label)]
                wall["rows"].append(row)
                print(f"{name:>6} {seq:>6} {label:>7} | {medians['burst']:8.2f} "
                      f"{medians['ring']:8.2f} {medians['allgather']:9.2f} | "
                      f"{row['burst_over_ring']:10.3f} {load:5.1f}", flush=True)
                data["wall"] = wall
                write_json(out_path, data)  # keep partial results
    print(f"\nwrote {out_path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[8192, 16384, 32768, 65536])
    parser.add_argument("--time-lengths", type=int, nargs="+", default=[8192, 16384])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--heads", type=int, default=2)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--out", default=str(ROOT / "docs" / "benchmarks" / "burst.json"))
    parser.add_argument("--wall", action="store_true",
                        help="only wall time of burst/ring/allgather per --wall-configs")
    parser.add_argument("--wall-configs", nargs="+", default=list(WALL_CONFIGS),
                        choices=list(WALL_CONFIGS))
    parser.add_argument("--fwd-bwd-lengths", type=int, nargs="+",
                        default=[8192, 16384, 32768],
                        help="with --wall: lengths that also time forward+backward")
    parser.add_argument("--warmup-max-len", type=int, default=16384,
                        help="with --wall: no warm-up call above this length (a run is long "
                             "enough that first-call costs vanish in it)")
    args = parser.parse_args()
    if args.wall:
        wall_main(args)
        return

    mesh = Mesh(np.array(jax.devices()), ("sequence",), axis_types=(AxisType.Auto,))
    rows = []
    print(f"8 simulated CPU devices, batch 1, MHA heads={args.heads}, dim={args.dim}, float32, "
          f"causal, zigzag; per-device numbers")
    header = (f"{'seq':>6} {'impl':>9} | {'fwd MB':>7} {'f+b MB':>7} {'model':>7} | "
              f"{'f+b GFLOP':>9} {'mem MB':>7} | {'fwd s':>6} {'f+b s':>6}")
    print(header)
    for seq in args.lengths:
        timed = seq in args.time_lengths
        for impl in ("burst", "ring", "allgather"):
            row = bench_case(mesh, seq, args.heads, args.heads, args.dim, impl, timed,
                             args.repeats)
            rows.append(row)
            print(f"{seq:>6} {impl:>9} | {row['fwd_bytes'] / 1e6:7.2f} "
                  f"{row['fwd_bwd_bytes'] / 1e6:7.2f} {row['model_fwd_bwd_bytes'] / 1e6:7.2f} | "
                  f"{row['fwd_bwd_flops'] / 1e9:9.2f} {row['fwd_bwd_memory'] / 1e6:7.1f} | "
                  f"{row.get('fwd_seconds', float('nan')):6.2f} "
                  f"{row.get('fwd_bwd_seconds', float('nan')):6.2f}", flush=True)

    # GQA: auto against both rings (bytes only), one length
    gqa = []
    gqa_seq = args.lengths[0]
    for q_heads, kv_heads in ((2, 2), (4, 2), (8, 2), (8, 1)):
        entry = {"seq": gqa_seq, "q_heads": q_heads, "kv_heads": kv_heads}
        for impl in ("burst", "ring", "auto"):
            mesh_row = bench_case(mesh, gqa_seq, q_heads, kv_heads, args.dim, impl, False, 1)
            entry[impl] = mesh_row["fwd_bwd_bytes"]
        entry["auto_choice"] = choose_schedule(batch=1, seq_len=gqa_seq, q_heads=q_heads,
                                           kv_heads=kv_heads, qk_dim=args.dim, v_dim=args.dim,
                                           num_shards=8)
        gqa.append(entry)

    print("\nratios (burst / ring), per device")
    ratios = []
    for seq in args.lengths:
        by = {r["impl"]: r for r in rows if r["seq"] == seq}
        b, r, a = by["burst"], by["ring"], by["allgather"]
        ratio = {
            "seq": seq,
            "fwd_bwd_bytes": b["fwd_bwd_bytes"] / r["fwd_bwd_bytes"],
            "allgather_over_ring_bytes": a["fwd_bwd_bytes"] / r["fwd_bwd_bytes"],
            "fwd_bwd_memory": b["fwd_bwd_memory"] / r["fwd_bwd_memory"],
            "allgather_over_ring_memory": a["fwd_bwd_memory"] / r["fwd_bwd_memory"],
        }
        if "fwd_bwd_seconds" in b:
            ratio["fwd_bwd_seconds"] = b["fwd_bwd_seconds"] / r["fwd_bwd_seconds"]
            ratio["fwd_seconds"] = b["fwd_seconds"] / r["fwd_seconds"]
        ratios.append(ratio)
        print("  " + ", ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}"
                               for k, v in ratio.items()))
    print(f"\nGQA at seq {gqa_seq}: forward+backward bytes per device (auto never above the cheaper)")
    for entry in gqa:
        best = min(entry["burst"], entry["ring"])
        print(f"  q_heads={entry['q_heads']} kv_heads={entry['kv_heads']}: burst "
              f"{entry['burst'] / 1e6:.2f} MB, ring {entry['ring'] / 1e6:.2f} MB, auto "
              f"{entry['auto'] / 1e6:.2f} MB ({entry['auto_choice']}), auto/cheaper "
              f"{entry['auto'] / best:.3f}")

    out = {
        "setup": {"devices": 8, "batch": 1, "heads": args.heads, "dim": args.dim,
                  "dtype": "float32", "causal": True, "layout": "zigzag",
                  "repeats": args.repeats, "platform": jax.default_backend(),
                  "cpu_count": os.cpu_count()},
        "rows": rows, "ratios": ratios, "gqa": gqa,
    }
    write_json(args.out, out)
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
