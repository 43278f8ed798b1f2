"""Benchmark: APB vs Star Attention vs ring attention vs full attention for long-context prefill.

Measured side by side in one run on 8 simulated CPU devices (one mesh axis ``sequence``):

1. Per-device attention FLOPs from ``compiled.cost_analysis()`` of one attention layer with a
   MiniCPM-1B attention shape (24 query heads, 8 KV heads, head_dim 64, batch 1) at 32k / 64k /
   128k tokens (compile only; the materialised-score local attention is used so that XLA counts
   every matmul; loops would be counted once). Full attention is one device doing everything.
2. Per-device FLOPs of the whole-model prefill (compile only, abstract parameters) of a
   MiniCPM-1B-shaped model (hidden 1536, 24 / 8 heads, head_dim 64, MLP 3840, vocab 73440) at
   1 and 2 layers, extrapolated to MiniCPM-1B's 52 layers (``c0 + layers * c_layer``): APB and
   Star through ``cpmjax.generate.prefill.apb_prefill`` (what ``generate(prefill="apb"|"star")``
   runs), the ring as the model on the sequence-sharded input with an unrolled ring attention,
   full attention on one device.
3. Wall time (median of repeats, methods interleaved) of one attention layer (default 16k
   tokens, 8 query heads / 2 KV heads, head_dim 64, float32, O(seq)-memory blockwise local
   attention).
4. Wall time of the whole-model prefill through ``cpmjax.generate(..., prefill="apb" | "star"
   | "ring", mesh=...)`` and ``prefill="local"`` (one device), its ``stats.prefill_seconds``
   after a first call that compiles: a MiniCPM-shaped model (hidden 512, 8 / 2 heads,
   head_dim 64, MLP 1280, vocab 4096) with 1 and 2 layers, 32k tokens, float32, methods
   interleaved. The difference of the two is the time of one layer that is not the last (with
   a query, APB and Star skip the last layer's context outputs; see ``layer_difference``).

On simulated devices the 8 "hosts" share the machine's cores, so a distributed method's wall
time is the *sum* of its 8 hosts' work, not the time of the slowest host; full attention runs
once on one device. The per-device FLOPs are the critical path (for APB, the last host's).

APB defaults follow the paper on 8 hosts: ``anchor_len = block/4``, ``passing_len = block/8``,
query-aware compressor, a 64-token query embedded after the first token. Star: anchor = one
block. Ring: every host sees every block (``sharding.burst`` in the wall-time runs, the
unrolled ring below for FLOPs: ``cost_analysis`` counts a ``fori_loop`` body once).

Usage: ``python scripts/bench_apb.py [--wall-seq 16384] [--model-seq 32768] [--repeats 3]
[--flops-seqs 32768,...] [--model-flops-seqs 32768,131072]``. Writes ``docs/benchmarks/apb.json``.
"""

from __future__ import annotations

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()

import argparse  # noqa: E402
import functools  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax import lax  # noqa: E402
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec  # noqa: E402

from cpmjax.report import write_json  # noqa: E402
from sharding.apb import (  # noqa: E402
    apb_layer_attention,
    apb_local_attention,
    key_mask_segments,
    make_apb_layout,
    merge_partials,
)

AXIS = "sequence"
# MiniCPM-1B (openbmb/MiniCPM-1B-sft-bf16) minus its depth: FLOPs are counted at 1 and 2 layers
MINICPM_1B = dict(hidden=1536, heads=24, kv_heads=8, intermediate=3840, vocab=73440)
# the wall-time model: small enough for 2 shared CPU cores at 32k tokens
WALL_MODEL = dict(hidden=512, heads=8, kv_heads=2, intermediate=1280, vocab=4096)


def ring_attention(q, k, v, *, mesh, impl):
    """Exact causal ring attention (baseline): KV blocks travel around the ring with ppermute;
    every host attends to every block (future blocks masked), partials merged by LSE."""
    hosts = mesh.shape[AXIS]
    attend = apb_local_attention(impl)
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
                                segment_ids=key_mask_segments(q.shape[0], blk, keep),
                                sm_scale=scale))
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
    attend = apb_local_attention(impl)
    return {
        "apb": (lambda q, k, v: apb_layer_attention(q, k, v, mesh=mesh, layout=apb, axis=AXIS,
                                                    impl=impl), apb.expanded_len, mesh,
                dict(anchor_len=apb.anchor_len, passing_len=apb.passing_len,
                     block_len=apb.block_len, query_len=query_len)),
        "star": (lambda q, k, v: apb_layer_attention(q, k, v, mesh=mesh, layout=star, axis=AXIS,
                                                     impl=impl), star.expanded_len,
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
    """One attention layer: compile every method, then time them interleaved (every repeat runs
    each method once); medians over repeats."""
    out = {"seq": seq, "heads": heads, "kv_heads": kv_heads, "head_dim": dim}
    key = jax.random.PRNGKey(0)
    ready = {}
    for name, (fn, n, m, info) in methods(seq, mesh, "blockwise", query_len, use_burst).items():
        sharding = NamedSharding(m, PartitionSpec(None, AXIS))
        args = [jax.device_put(jax.random.normal(kk, (1, n, h, dim), jnp.float32), sharding)
                for kk, h in zip(jax.random.split(key, 3), (heads, kv_heads, kv_heads),
                                 strict=True)]
        t0 = time.perf_counter()
        compiled = jax.jit(fn).lower(*args).compile()
        jax.block_until_ready(compiled(*args))  # warm-up
        out[f"{name}_compile_s"] = time.perf_counter() - t0
        out[f"{name}_info"] = info
        ready[name] = (compiled, args)
    times: dict[str, list[float]] = {name: [] for name in ready}
    cpu: dict[str, list[float]] = {name: [] for name in ready}
    for _ in range(repeats):
        for name, (compiled, args) in ready.items():
            t0, c0 = time.perf_counter(), time.process_time()
            jax.block_until_ready(compiled(*args))
            times[name].append(time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)
    for name in ready:
        out[name] = statistics.median(times[name])
        out[f"{name}_times"] = times[name]
        out[f"{name}_cpu"] = statistics.median(cpu[name])
        out[f"{name}_cpu_times"] = cpu[name]
        print(f"wall seq={seq} {name}: median {out[name]:.3f}s, cpu {out[f'{name}_cpu']:.2f}s "
              f"over {repeats} (compile {out[f'{name}_compile_s']:.1f}s)", flush=True)
    return out


# ----------------------------------------------------------------------------- whole-model prefill

RING_FLOPS_BACKEND = "bench_unrolled_ring"


def model_config(hidden: int, heads: int, kv_heads: int, intermediate: int, layers: int,
                 vocab: int, max_len: int):
    """A MiniCPM-shaped config (μP scalings as MiniCPM, head_dim 64)."""
    from cpmjax.models import ModelConfig

    return ModelConfig(
        model_type="minicpm", vocab_size=vocab, hidden_size=hidden,
        intermediate_size=intermediate, num_hidden_layers=layers, num_attention_heads=heads,
        num_key_value_heads=kv_heads, head_dim=hidden // heads, max_position_embeddings=max_len,
        scale_emb=12.0, scale_depth=1.4, dim_model_base=256, tie_word_embeddings=True,
    )


def _prefill_options(seq: int, hosts: int, query_len: int) -> dict[str, dict]:
    probe = make_apb_layout(seq, hosts=hosts, anchor_len=0, passing_len=0)
    query_len = min(query_len, probe.block_len // 8)
    return {"apb": dict(query_len=query_len, query_offset=1), "star": dict(query_len=query_len)}


def model_flops_table(seqs, layer_counts, mesh, shape: dict, query_len=64):
    """Per-device whole-model prefill FLOPs (``cost_analysis``, compile only, abstract
    parameters) for every method, at every ``seq`` and layer count.

    APB / Star: ``cpmjax.generate.prefill.apb_prefill`` (the path of ``generate(prefill="apb" |
    "star")``) with materialised local attention; its ``lax.switch`` over hosts is counted at
    its most expensive branch, the last host. Ring: the model on the sequence-sharded input
    with the unrolled ring above as its attention (``sharding.burst``'s ring loops with
    ``fori_loop``, whose body ``cost_analysis`` counts once); every host visits every block.
    Full: one device, plain forward, ``"reference"`` attention; fitted as ``c0 + c1 s + c2 s^2``
    from three short lengths (the quadratic score matrices of 128K are not compiled)."""
    from flax import nnx

    from cpmjax import ops
    from cpmjax.generate.prefill import apb_prefill
    from cpmjax.models import CausalLM

    def ring_backend(q, k, v, *, mesh, causal=True, segment_ids=None, kv_segment_ids=None,
                     sm_scale=None, **_):
        return ring_attention(q, k, v, mesh=mesh, impl="reference")

    ops.register_attention_backend(RING_FLOPS_BACKEND, ring_backend)
    hosts = mesh.shape[AXIS]
    one = jax.devices()[0]
    single = Mesh(np.array([one]), (AXIS,), axis_types=(AxisType.Auto,))
    rows = []
    full_fit: dict[int, np.ndarray] = {}
    for layers in layer_counts:
        cfg = model_config(layers=layers, max_len=max(seqs) + 128, **shape)
        abstract = nnx.eval_shape(lambda cfg=cfg: CausalLM(cfg, rngs=nnx.Rngs(0)))
        graphdef, state = nnx.split(abstract)

        def lower(fn, seq, m, cache_len, shard_cache, graphdef=graphdef, state=state,
                  abstract=abstract):
            rep = NamedSharding(m, PartitionSpec())
            seq_sh = NamedSharding(m, PartitionSpec(None, AXIS))
            st = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=rep),
                              state)
            cache = jax.eval_shape(lambda: abstract.init_cache(1, cache_len))
            cache = jax.tree.map(lambda x: jax.ShapeDtypeStruct(
                x.shape, x.dtype, sharding=seq_sh if shard_cache else rep), cache)
            toks = jax.ShapeDtypeStruct((1, seq), jnp.int32, sharding=rep)
            compiled = jax.jit(functools.partial(fn, graphdef)).lower(st, toks, cache).compile()
            cost = compiled.cost_analysis()
            cost = cost[0] if isinstance(cost, list) else cost
            return float(cost["flops"])

        def distributed(method, options):
            def fn(graph, params, tokens, cache):
                model = nnx.merge(graph, params)
                logits, cache, _ = apb_prefill(model, tokens, cache, mesh=mesh, method=method,
                                               impl="reference", **options)
                return logits, cache
            return fn

        def ring(graph, params, tokens, cache):
            model = nnx.merge(graph, params)
            tokens = lax.with_sharding_constraint(
                tokens, NamedSharding(mesh, PartitionSpec(None, AXIS)))
            with ops.attention_backend(RING_FLOPS_BACKEND, mesh=mesh):
                hidden, cache = model(tokens, cache=cache, return_hidden=True)
            return ops.lm_head(hidden[:, -1], model.head_weight()), cache

        def full(graph, params, tokens, cache):
            model = nnx.merge(graph, params)
            with ops.attention_backend("reference"):
                hidden, cache = model(tokens, cache=cache, return_hidden=True)
            return ops.lm_head(hidden[:, -1], model.head_weight()), cache

        fit_seqs = (2048, 4096, 8192)
        counts = [lower(full, s, single, s, False) for s in fit_seqs]
        full_fit[layers] = np.linalg.solve(
            np.array([[1.0, s, s * s] for s in fit_seqs]), np.array(counts))
        for seq in seqs:
            cache_len = -(-seq // (hosts * 8)) * hosts * 8
            opts = _prefill_options(seq, hosts, query_len)
            entry = {"seq": seq, "layers": layers,
                     "apb": lower(distributed("apb", opts["apb"]), seq, mesh, cache_len, True),
                     "star": lower(distributed("star", opts["star"]), seq, mesh, cache_len,
                                   True),
                     "ring": lower(ring, seq, mesh, cache_len, True),
                     "full": float(full_fit[layers] @ np.array([1.0, seq, seq * seq])),
                     "full_note": f"fitted c0 + c1 s + c2 s^2 from {fit_seqs}"}
            rows.append(entry)
            print(f"model flops layers={layers} seq={seq}: " + ", ".join(
                f"{k}={entry[k]:.3e}" for k in ("apb", "star", "ring", "full")), flush=True)
    return rows


def extrapolate_layers(rows, layers_target: int):
    """Whole-model FLOPs are ``c0 + layers * c_layer`` (layers run in a Python loop): from the
    counts at two layer numbers, the count at ``layers_target``."""
    out = []
    by = {}
    for r in rows:
        by.setdefault(r["seq"], {})[r["layers"]] = r
    for seq, per in sorted(by.items()):
        if len(per) < 2:
            continue
        (l1, r1), (l2, r2) = sorted(per.items())[:2]
        entry = {"seq": seq, "layers": layers_target, "extrapolated_from": [l1, l2]}
        for m in ("apb", "star", "ring", "full"):
            per_layer = (r2[m] - r1[m]) / (l2 - l1)
            entry[m] = r1[m] + (layers_target - l1) * per_layer
        out.append(entry)
    return out


def model_wall_table(seq, mesh, repeats, shape: dict, layers: int, query_len=64):
    """Whole-model prefill wall time through ``cpmjax.generate`` (its ``stats.prefill_seconds``:
    the compiled prefill executable only, after a first call that compiles it), for
    ``prefill="apb" | "star" | "ring"`` on ``mesh`` and ``"local"`` (one device). Methods are
    interleaved in every repeat; medians over repeats."""
    from flax import nnx

    import cpmjax
    from cpmjax import ops
    from cpmjax.models import CausalLM

    cfg = model_config(layers=layers, max_len=2 * seq, **shape)
    model = CausalLM(cfg, rngs=nnx.Rngs(0))
    hosts = mesh.shape[AXIS]
    seq_mesh = sharding_mesh(mesh)
    tokens = np.asarray(jax.random.randint(jax.random.PRNGKey(1), (1, seq), 3, cfg.vocab_size))
    opts = _prefill_options(seq, hosts, query_len)
    runs = {
        "apb": dict(prefill="apb", mesh=seq_mesh, prefill_options=opts["apb"]),
        "star": dict(prefill="star", mesh=seq_mesh, prefill_options=opts["star"]),
        "ring": dict(prefill="ring", mesh=seq_mesh),
        "full": dict(prefill="local"),
    }
    out = {"seq": seq, "layers": layers, **shape, "parameters": model.num_parameters(),
           "query_len": opts["apb"]["query_len"]}
    times: dict[str, list[float]] = {name: [] for name in runs}
    def call(name, kw):
        if name != "full":
            return cpmjax.generate(model, tokens, 1, **kw)
        # the local path's default is the "reference" attention (materialised scores,
        # ~9x slower than blockwise on this CPU at 2k); run the same blockwise kernel that
        # APB, Star and the ring use
        with ops.attention_backend("blockwise"):
            return cpmjax.generate(model, tokens, 1, **kw)

    for name, kw in runs.items():  # first call compiles
        t0 = time.perf_counter()
        res = call(name, kw)
        out[f"{name}_first_call_s"] = time.perf_counter() - t0
        out[f"{name}_compile_s"] = res.stats.compile_seconds
        print(f"model wall seq={seq} {name}: first call {out[f'{name}_first_call_s']:.1f}s "
              f"(compile {res.stats.compile_seconds:.1f}s)", flush=True)
    cpu: dict[str, list[float]] = {name: [] for name in runs}
    for r in range(repeats):
        for name, kw in runs.items():
            c0 = time.process_time()
            res = call(name, kw)
            cpu[name].append(time.process_time() - c0)
            times[name].append(res.stats.prefill_seconds)
            print(f"model wall seq={seq} repeat {r} {name}: {res.stats.prefill_seconds:.2f}s "
                  f"(cpu of the whole generate call {cpu[name][-1]:.2f}s)", flush=True)
    for name in runs:
        out[name] = statistics.median(times[name])
        out[f"{name}_times"] = times[name]
        out[f"{name}_cpu"] = statistics.median(cpu[name])
        out[f"{name}_cpu_times"] = cpu[name]
    return out


def layer_difference(walls: dict[int, dict]) -> dict:
    """Seconds of one layer that is not the last, per method: the difference of the medians at
    two layer counts. With a query, APB and Star need no context output from the last layer
    (the query tokens run against the cache afterwards), so XLA drops that layer's attention
    and MLP; ring and full attention need the last token's hidden state and run it. The
    difference removes that edge effect (and the fixed costs), as in a deep model."""
    (l1, w1), (l2, w2) = sorted(walls.items())[:2]
    out = {"seq": w1["seq"], "layers": f"{l2}-{l1}"}
    for m in ("apb", "star", "ring", "full"):
        out[m] = (w2[m] - w1[m]) / (l2 - l1)
        out[f"{m}_cpu"] = (w2[f"{m}_cpu"] - w1[f"{m}_cpu"]) / (l2 - l1)
    return out


def sharding_mesh(mesh: Mesh) -> Mesh:
    """The library's 4-axis mesh with every device on ``sequence`` (what generate expects)."""
    from sharding.mesh import make_mesh

    return make_mesh(sequence=mesh.shape[AXIS], devices=list(mesh.devices.flat))


def _ratios(row, suffix=""):
    return {f"{m}_over_apb{suffix}": row[f"{m}{suffix}"] / row[f"apb{suffix}"]
            for m in ("ring", "star", "full")}


def _print_ratios(title, rows, keys=("seq",), suffix=""):
    print(f"\n{title}")
    print(" ".join(f"{k:>8}" for k in keys) + f" {'ring/apb':>9} {'star/apb':>9} {'full/apb':>9}")
    for r in rows:
        x = _ratios(r, suffix)
        print(" ".join(f"{r[k]:>8}" for k in keys) + " " + " ".join(
            f"{x[f'{m}_over_apb{suffix}']:>9.2f}" for m in ("ring", "star", "full")))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--flops-seqs", default="32768,65536,131072",
                        help="attention-layer FLOPs lengths ('' to skip)")
    parser.add_argument("--wall-seq", type=int, default=16384,
                        help="attention-layer wall-time length (0 to skip)")
    parser.add_argument("--model-flops-seqs", default="32768,131072",
                        help="whole-model FLOPs lengths ('' to skip)")
    parser.add_argument("--model-flops-layers", default="1,2",
                        help="two layer counts of the MiniCPM-1B-shaped model (extrapolated to 52)")
    parser.add_argument("--model-seq", type=int, default=32768,
                        help="whole-model wall-time length (0 to skip)")
    parser.add_argument("--model-layers", default="1,2",
                        help="layer counts of the wall-time model; with two, the difference is "
                             "the time of one layer that is not the last")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default="docs/benchmarks/apb.json")
    args = parser.parse_args()
    mesh = Mesh(np.array(jax.devices()[:8]), (AXIS,), axis_types=(AxisType.Auto,))
    result: dict = {"device": f"{jax.devices()[0].platform} x{len(jax.devices())} simulated, "
                              f"{os.cpu_count()} cores",
                    "command": "python scripts/bench_apb.py " + " ".join(
                        f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items())}

    def save():  # after every section, so that a later failure keeps what was measured
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        write_json(args.out, result)

    seqs = [int(s) for s in args.flops_seqs.split(",") if s]
    if seqs:
        result["flops"] = flops_table(seqs, mesh)
        result["ratios_flops"] = [{"seq": r["seq"], **_ratios(r)} for r in result["flops"]]
        _print_ratios("per-device attention FLOPs, one layer (cost_analysis; MiniCPM-1B "
                      "attention: 24 q / 8 kv heads, head_dim 64, batch 1)", result["flops"])
        save()
    model_seqs = [int(s) for s in args.model_flops_seqs.split(",") if s]
    if model_seqs:
        layer_counts = [int(x) for x in args.model_flops_layers.split(",")]
        rows = model_flops_table(model_seqs, layer_counts, mesh, MINICPM_1B)
        result["model_flops"] = {"shape": MINICPM_1B, "rows": rows,
                                 "minicpm_1b_52_layers": extrapolate_layers(rows, 52)}
        _print_ratios("per-device whole-model prefill FLOPs (MiniCPM-1B shape)", rows,
                      ("seq", "layers"))
        _print_ratios("... extrapolated to 52 layers", result["model_flops"][
            "minicpm_1b_52_layers"], ("seq", "layers"))
        save()
    if args.wall_seq:
        wall = wall_table(args.wall_seq, mesh, args.repeats)
        result["wall"] = wall
        result["ratios_wall"] = {"seq": wall["seq"], **_ratios(wall), **_ratios(wall, "_cpu")}
        _print_ratios(f"wall time, one attention layer (median of {args.repeats}; simulated "
                      "devices share the CPU cores)", [wall])
        _print_ratios("process CPU time, one attention layer", [wall], suffix="_cpu")
        save()
    if args.model_seq:
        walls = {}
        for layers in [int(x) for x in args.model_layers.split(",")]:
            walls[layers] = mw = model_wall_table(args.model_seq, mesh, args.repeats, WALL_MODEL,
                                                  layers)
            result.setdefault("model_wall", []).append(mw)
            result.setdefault("ratios_model_wall", []).append(
                {"seq": mw["seq"], "layers": layers, **_ratios(mw), **_ratios(mw, "_cpu")})
            _print_ratios(f"wall time, whole-model prefill ({layers} layers, median of "
                          f"{args.repeats}; simulated devices share the CPU cores)", [mw])
            _print_ratios(f"process CPU time of the generate call ({layers} layers)", [mw],
                          suffix="_cpu")
            save()
        if len(walls) >= 2:
            result["model_wall_per_layer"] = per_layer = layer_difference(walls)
            result["ratios_model_wall_per_layer"] = {**_ratios(per_layer),
                                                     **_ratios(per_layer, "_cpu")}
            _print_ratios("wall time of one more (not last) layer: difference of the medians",
                          [per_layer])
            _print_ratios("... process CPU time", [per_layer], suffix="_cpu")
    save()
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
